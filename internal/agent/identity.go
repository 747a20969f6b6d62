package agent

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/pki"
)

// identity is what makes a node the same node across restarts: its
// WireGuard key and its node password, both kept 0600 in the data dir.
type identity struct {
	privateKey wgtypes.Key
	publicKey  api.Key // of privateKey, derived once: netmaps compare it per peer
	password   string
}

func loadOrCreateIdentity(c *Config) (identity, error) {
	var id identity
	keyPath := c.dir("wireguard.key")
	b, err := os.ReadFile(keyPath)
	switch {
	case err == nil:
		k, err := wgtypes.ParseKey(strings.TrimSpace(string(b)))
		if err != nil {
			return id, fmt.Errorf("WireGuard key %s is damaged (%v); remove it to make a new one (the node then needs a re-join)", keyPath, err)
		}
		id.privateKey = k
	case errors.Is(err, os.ErrNotExist):
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return id, fmt.Errorf("generate WireGuard key: %w", err)
		}
		if err := pki.WriteFileAtomic(keyPath, []byte(k.String()+"\n"), 0o600); err != nil {
			return id, fmt.Errorf("save WireGuard key: %w", err)
		}
		id.privateKey = k
	default:
		return id, fmt.Errorf("read WireGuard key: %w", err)
	}
	id.publicKey = api.Key(id.privateKey.PublicKey())
	if err := pki.CheckPrivate(keyPath); err != nil {
		c.Logger.Warn("WireGuard private key is readable by others", "err", err)
	}

	pwPath := c.dir("node-password")
	b, err = os.ReadFile(pwPath)
	switch {
	case err == nil:
		id.password = strings.TrimSpace(string(b))
	case errors.Is(err, os.ErrNotExist):
		buf := make([]byte, 24)
		if _, err := rand.Read(buf); err != nil {
			return id, fmt.Errorf("generate node password: %w", err)
		}
		id.password = base64.RawURLEncoding.EncodeToString(buf)
		if err := pki.WriteFileAtomic(pwPath, []byte(id.password+"\n"), 0o600); err != nil {
			return id, fmt.Errorf("save node password: %w", err)
		}
	default:
		return id, fmt.Errorf("read node password: %w", err)
	}
	return id, nil
}
