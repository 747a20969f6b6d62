package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/token"
)

// permanentError is an answer from the server that retrying will not
// change (wrong token, name taken, bad request).
type permanentError struct {
	status int
	apiErr api.Error
}

func (e *permanentError) Error() string {
	return fmt.Sprintf("server refused (%d %s): %s", e.status, http.StatusText(e.status), e.apiErr.Message)
}

func decodeError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var ae api.Error
	if json.Unmarshal(body, &ae) != nil || ae.Message == "" {
		ae.Message = string(bytes.TrimSpace(body))
	}
	if resp.StatusCode >= 400 && resp.StatusCode < 500 && resp.StatusCode != http.StatusTooManyRequests {
		return &permanentError{status: resp.StatusCode, apiErr: ae}
	}
	return fmt.Errorf("server error %d: %s", resp.StatusCode, ae.Message)
}

// fetchCA gets the server's CA and checks it against the token's CA hash.
// A token without a hash cannot pin the CA: the CA is then trusted on
// first use and the caller warns.
func fetchCA(ctx context.Context, serverURL string, tok token.Token) ([]byte, error) {
	c := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			// The CA is not known yet; it is verified against the token
			// hash below, and nothing secret is sent on this connection.
			TLSClientConfig: &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}, //nolint:gosec
		},
	}
	defer c.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, serverURL+api.PathCACerts, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, decodeError(resp)
	}
	ca, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("read CA: %w", err)
	}
	if tok.HasCAHash && !tok.CAMatches(ca) {
		sum := sha256.Sum256(ca)
		return nil, &permanentError{status: 0, apiErr: api.Error{Message: fmt.Sprintf(
			"the server at %s presents a CA (sha256 %s) that does not match the join token: the token is from another cluster, or something is intercepting the connection; copy the token again from the server's <data-dir>/server/token",
			serverURL, hex.EncodeToString(sum[:])[:16])}}
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, errors.New("the server's /cacerts answer is not a PEM certificate")
	}
	return ca, nil
}

// apiClient talks to the server with the verified CA and, once joined,
// the node certificate.
type apiClient struct {
	base string
	http *http.Client
}

func newAPIClient(base string, caPEM []byte, cert *tls.Certificate) *apiClient {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return &apiClient{base: base, http: &http.Client{Transport: &http.Transport{
		TLSClientConfig:       cfg,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}).DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		IdleConnTimeout:       60 * time.Second,
	}}}
}

func (c *apiClient) close() { c.http.CloseIdleConnections() }

func (c *apiClient) join(ctx context.Context, tok string, req api.JoinRequest) (*api.JoinResponse, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+api.PathJoin, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	hr.Header.Set("Authorization", "Bearer "+tok)
	hr.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(hr)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, decodeError(resp)
	}
	var jr api.JoinResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&jr); err != nil {
		return nil, fmt.Errorf("decode join response: %w", err)
	}
	return &jr, nil
}

// streamIdle is how long the netmap stream may stay silent (the server
// sends a keepalive line every 15 s) before it is considered dead.
const streamIdle = 45 * time.Second

// streamNetmaps reads netmaps until ctx ends or the stream fails, calling
// fn for each one. It asks for deltas and applies them to the last
// netmap: fn always gets a whole one, and whether it came as a delta.
// With last (the netmap an earlier stream ended with) the server may start
// from it instead of sending the whole netmap again (api.NetmapHaveParam).
func (c *apiClient) streamNetmaps(parent context.Context, last *api.NetMap, fn func(nm api.NetMap, delta bool)) error {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	var nm api.NetMap
	have := false
	q := url.Values{api.NetmapDeltasParam: {"1"}}
	if last != nil {
		if d, err := last.Digest(); err == nil {
			q.Set(api.NetmapHaveParam, api.FormatHave(last.Version, d))
			nm, have = *last, true
		}
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+api.PathNetmap+"?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(hr)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return decodeError(resp)
	}
	idle := time.AfterFunc(streamIdle, cancel)
	defer idle.Stop()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	for sc.Scan() {
		idle.Reset(streamIdle)
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue // keepalive
		}
		var l api.NetMapLine
		if err := json.Unmarshal(line, &l); err != nil {
			return fmt.Errorf("decode netmap: %w", err)
		}
		switch {
		case l.Delta == nil:
			nm, have = l.NetMap, true
		case !have:
			return errors.New("netmap stream began with a delta")
		default:
			if nm, err = nm.Apply(*l.Delta); err != nil {
				return err // a lost line: reconnect for a whole netmap
			}
		}
		fn(nm, l.Delta != nil)
	}
	switch {
	case parent.Err() != nil:
		return parent.Err()
	case ctx.Err() != nil:
		return fmt.Errorf("netmap stream silent for %s", streamIdle)
	case sc.Err() != nil:
		return fmt.Errorf("netmap stream: %w", sc.Err())
	}
	return errors.New("netmap stream closed by the server")
}
