package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"

	"github.com/trellis-mesh/trellis/internal/pki"
	"github.com/trellis-mesh/trellis/internal/server"
	"github.com/trellis-mesh/trellis/internal/store"
)

// haFlags are the server flags of highly available servers.
type haFlags struct {
	clusterInit      bool
	join             string
	etcdPeerPort     int
	etcdClientPort   int
	maxPeerRTT       time.Duration
	allowRemotePeers bool
}

func (h *haFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&h.clusterInit, "cluster-init", false, "start a new embedded etcd cluster (highly available servers in one location)")
	fs.StringVar(&h.join, "server", "", "an existing server to join, e.g. https://10.0.0.1:6443 (needs its server token in --token)")
	fs.IntVar(&h.etcdPeerPort, "etcd-peer-port", store.DefaultEtcdPeerPort, "TCP port embedded etcd members reach each other at")
	fs.IntVar(&h.etcdClientPort, "etcd-client-port", store.DefaultEtcdClientPort, "loopback TCP port of the embedded etcd member's clients")
	fs.DurationVar(&h.maxPeerRTT, "etcd-max-peer-rtt", server.DefaultMaxPeerRTT, "refuse to join an embedded etcd cluster whose server is farther (round trip)")
	fs.BoolVar(&h.allowRemotePeers, "etcd-allow-remote-peers", false, "only warn when joining an embedded etcd cluster in another location (not supported)")
}

func (h *haFlags) config() server.HAConfig {
	return server.HAConfig{
		ClusterInit:      h.clusterInit,
		JoinURL:          strings.TrimSuffix(h.join, "/"),
		EtcdPeerPort:     h.etcdPeerPort,
		EtcdClientPort:   h.etcdClientPort,
		MaxPeerRTT:       h.maxPeerRTT,
		AllowRemotePeers: h.allowRemotePeers,
	}
}

// runDatastore implements 'trellis datastore snapshot save|restore FILE'.
func runDatastore(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	const usage = "usage: trellis datastore snapshot save FILE | trellis datastore snapshot restore FILE [--data-dir D]"
	if len(args) < 3 || args[0] != "snapshot" || (args[1] != "save" && args[1] != "restore") {
		return errors.New(usage)
	}
	op, file := args[1], args[2]
	fs := flag.NewFlagSet("datastore snapshot "+op, flag.ContinueOnError)
	fs.SetOutput(stderr)
	dataDir := fs.String("data-dir", "/var/lib/trellis", "the server's data dir")
	etcdClientPort := fs.Int("etcd-client-port", store.DefaultEtcdClientPort, "loopback port of the embedded etcd member")
	etcdPeerPort := fs.Int("etcd-peer-port", store.DefaultEtcdPeerPort, "peer port of the embedded etcd member (restore)")
	nodeName := fs.String("node-name", "", "the server's node name (restore of embedded etcd)")
	nodeIP := fs.String("node-ip", "", "the server's node IP, its etcd peer address (restore of embedded etcd)")
	if err := fs.Parse(args[3:]); err != nil {
		return err
	}
	if err := settle(fs, getenv, nil); err != nil {
		return err
	}
	srvDir := filepath.Join(*dataDir, "server")
	embedded := false
	if _, err := os.Stat(filepath.Join(srvDir, "db", "etcd", "member")); err == nil {
		embedded = true
	}
	switch {
	case op == "save" && !embedded:
		if err := store.SnapshotSQLite(ctx, srvDir, file); err != nil {
			return err
		}
	case op == "restore" && !embedded:
		if err := store.RestoreSQLite(ctx, srvDir, file); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "datastore restored from %s; start the server\n", file)
		return nil
	case op == "save":
		tlsDir := filepath.Join(srvDir, "tls")
		info := transport.TLSInfo{
			CertFile:      filepath.Join(tlsDir, pki.EtcdCertFile),
			KeyFile:       filepath.Join(tlsDir, pki.EtcdKeyFile),
			TrustedCAFile: filepath.Join(tlsDir, pki.CACertFile),
		}
		tc, err := info.ClientConfig()
		if err != nil {
			return fmt.Errorf("etcd client credentials in %s: %w", tlsDir, err)
		}
		if _, err := os.Stat(file); err == nil {
			return fmt.Errorf("%s exists: choose a new file for the snapshot", file)
		}
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		endpoint := fmt.Sprintf("https://127.0.0.1:%d", *etcdClientPort)
		if err := store.SnapshotEtcd(ctx, endpoint, tc, f); err != nil {
			f.Close()
			os.Remove(file)
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	default:
		if *nodeName == "" || *nodeIP == "" {
			return errors.New("restoring an embedded etcd member needs the server's --node-name and --node-ip (its etcd peer address)")
		}
		ip, err := netip.ParseAddr(*nodeIP)
		if err != nil {
			return fmt.Errorf("--node-ip: %w", err)
		}
		tlsDir := filepath.Join(srvDir, "tls")
		m := store.Embedded{
			Name:       *nodeName,
			Dir:        filepath.Join(srvDir, "db", "etcd"),
			PeerAddr:   netip.AddrPortFrom(ip, uint16(*etcdPeerPort)),
			ClientAddr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(*etcdClientPort)),
			CertFile:   filepath.Join(tlsDir, pki.EtcdCertFile),
			KeyFile:    filepath.Join(tlsDir, pki.EtcdKeyFile),
			CAFile:     filepath.Join(tlsDir, pki.CACertFile),
		}
		n, err := store.RestoreEtcd(ctx, file, m, slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "embedded etcd restored from %s (%d keys) as a cluster of one member; start this server with --cluster-init, then join the other servers again with empty data dirs\n", file, n)
		return nil
	}
	fmt.Fprintf(stdout, "snapshot saved to %s\n", file)
	return nil
}

// runServerLeave implements 'trellis server leave': the server of the
// admin config (this host's) leaves the cluster of servers.
func runServerLeave(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("server leave", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	c, err := adminClient(fs, getenv)
	if err != nil {
		return err
	}
	resp, err := c.LeaveServer(ctx)
	if err != nil {
		return fmt.Errorf("leave: %w", err)
	}
	fmt.Fprintf(stdout, "server %s left the cluster (etcd member removed: %v); stop it now, then remove its data dir before it joins again\n", resp.Server, resp.EtcdMemberRemoved)
	return nil
}
