package client

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/token"
)

// fetchCATimeout bounds FetchCA.
const fetchCATimeout = 10 * time.Second

// FetchCA gets the CA certificate (PEM) of the server at serverURL from
// api.PathCACerts and checks it against the CA hash of tok: a CA that
// does not match is a *CAMismatchError (IsPermanent). The request is not
// verified (the CA is not known yet); nothing secret is sent on it. A
// token without a CA hash cannot pin the CA: it is then trusted on first
// use, and the caller should warn.
func FetchCA(ctx context.Context, serverURL string, tok token.Token) ([]byte, error) {
	serverURL = strings.TrimSuffix(serverURL, "/")
	wrap := func(err error) error { return fmt.Errorf("fetch CA %s: %w", serverURL, err) }
	hc := &http.Client{
		Timeout: fetchCATimeout,
		Transport: &http.Transport{
			// Checked against the token's hash below instead.
			TLSClientConfig:    &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}, //nolint:gosec
			DisableCompression: true,
		},
	}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, serverURL+api.PathCACerts, nil)
	if err != nil {
		return nil, wrap(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, wrap(&UnreachableError{Err: err})
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, wrap(decodeError(resp))
	}
	ca, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, wrap(fmt.Errorf("read CA: %w", err))
	}
	if tok.HasCAHash && !tok.CAMatches(ca) {
		return nil, &CAMismatchError{URL: serverURL, SHA256: sha256.Sum256(ca)}
	}
	if !x509.NewCertPool().AppendCertsFromPEM(ca) {
		return nil, wrap(errors.New("the server's /cacerts answer is not a PEM certificate"))
	}
	return ca, nil
}
