// Package tailscale is the Tailscale (and headscale) VPN provider: it drives
// the node's tailscaled through the tailscale command, as an operator
// would.
package tailscale

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/trellis-mesh/trellis/internal/vpn"
)

// Defaults of Config.
const (
	DefaultBinary    = "tailscale"
	DefaultUpTimeout = 60 * time.Second
	// commandTimeout bounds every tailscale command but `up`.
	commandTimeout = 15 * time.Second
)

// Config configures a Client. Zero values mean the documented defaults.
type Config struct {
	// Auth is the parsed --vpn-auth; Auth.Name must be "tailscale".
	Auth vpn.Auth
	// Binary is the tailscale command. Default "tailscale", found on PATH.
	Binary string
	// UpTimeout bounds `tailscale up` (its --timeout). Default 60 s.
	UpTimeout time.Duration
	// KeyDir is where the join key is written, mode 0600, for the moment
	// `tailscale up --auth-key=file:PATH` runs: the key never appears in a
	// process's arguments. Default os.TempDir().
	KeyDir string
	// Logger receives the provider's logs. Default slog.Default().
	Logger *slog.Logger
}

// Client is a vpn.Provider that runs the tailscale command.
type Client struct {
	cfg Config
	log *slog.Logger
}

var _ vpn.Provider = (*Client)(nil)

// New returns a Client for cfg. It does not run anything. A Client without
// a join key can do everything but log in.
func New(cfg Config) (*Client, error) {
	if cfg.Auth.Name != "tailscale" {
		return nil, fmt.Errorf("tailscale provider: --vpn-auth names provider %q", cfg.Auth.Name)
	}
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	if cfg.UpTimeout <= 0 {
		cfg.UpTimeout = DefaultUpTimeout
	}
	if cfg.KeyDir == "" {
		cfg.KeyDir = os.TempDir()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Client{cfg: cfg, log: cfg.Logger.With("vpn", "tailscale")}, nil
}

// Name implements vpn.Provider.
func (c *Client) Name() string { return "tailscale" }

// Backend states of tailscaled (ipn.State) that matter here.
const (
	stateRunning    = "Running"
	stateStopped    = "Stopped"
	stateNeedsLogin = "NeedsLogin"
)

// Up implements vpn.Provider. A node that is logged in and running is left
// as it is (its control server and prefs too) except that it is made to
// accept routes; a logged-in node that was stopped is brought up without
// logging in again; any other node logs in with the join key.
func (c *Client) Up(ctx context.Context) (vpn.State, error) {
	st, err := c.status(ctx)
	if err != nil {
		return vpn.State{}, err
	}
	switch {
	case st.BackendState == stateRunning:
		c.log.Info("tailscale is logged in and running already; not logging in again", "addresses", st.TailscaleIPs)
	case st.BackendState == stateStopped && st.loggedIn():
		c.log.Info("tailscale is logged in but stopped; bringing it up")
		if _, err := c.run(ctx, c.cfg.UpTimeout+commandTimeout, "up", "--timeout="+c.cfg.UpTimeout.String()); err != nil {
			return vpn.State{}, fmt.Errorf("bring tailscale up: %w", err)
		}
	default:
		if err := c.login(ctx, st.BackendState); err != nil {
			return vpn.State{}, err
		}
	}
	if _, err := c.run(ctx, commandTimeout, "set", "--accept-routes=true"); err != nil {
		return vpn.State{}, fmt.Errorf("make tailscale accept the other nodes' routes: %w", err)
	}
	s, err := c.State(ctx)
	if err != nil {
		return s, err
	}
	if !s.Running || len(s.Addrs) == 0 {
		return s, errors.New("tailscale up returned, but tailscale is not running with an address; check 'tailscale status'")
	}
	return s, nil
}

// login runs `tailscale up` with the join key in a file.
func (c *Client) login(ctx context.Context, state string) error {
	if c.cfg.Auth.JoinKey == "" {
		return fmt.Errorf("tailscale is not logged in (state %s) and --vpn-auth gives no joinKey", state)
	}
	f, err := os.CreateTemp(c.cfg.KeyDir, ".trellis-vpn-key-")
	if err != nil {
		return fmt.Errorf("write the join key for tailscale up: %w", err)
	}
	keyPath := f.Name()
	defer os.Remove(keyPath)
	err = f.Chmod(0o600) // CreateTemp makes it 0600 already; keep it so under any umask
	if err == nil {
		_, err = f.WriteString(c.cfg.Auth.JoinKey)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write the join key for tailscale up: %w", err)
	}
	args := []string{"up", "--auth-key=file:" + keyPath, "--timeout=" + c.cfg.UpTimeout.String(), "--accept-routes"}
	if u := c.cfg.Auth.ControlServerURL; u != "" {
		args = append(args, "--login-server="+u)
	}
	args = append(args, c.cfg.Auth.ExtraArgs...)
	start := time.Now()
	c.log.Info("joining the tailnet", "state", state, "controlServerURL", orDefault(c.cfg.Auth.ControlServerURL), "extraArgs", c.cfg.Auth.ExtraArgs)
	if _, err := c.run(ctx, c.cfg.UpTimeout+commandTimeout, args...); err != nil {
		return fmt.Errorf("join the tailnet (tailscale up): %w; check the joinKey and controlServerURL of --vpn-auth", err)
	}
	c.log.Info("joined the tailnet", "took", time.Since(start).Round(time.Millisecond))
	return nil
}

func orDefault(u string) string {
	if u == "" {
		return "(tailscale default)"
	}
	return u
}

// State implements vpn.Provider.
func (c *Client) State(ctx context.Context) (vpn.State, error) {
	st, err := c.status(ctx)
	if err != nil {
		return vpn.State{}, err
	}
	s := st.state()
	if s.Advertised, err = c.advertised(ctx); err != nil {
		return s, err
	}
	if s.Running {
		s.Filter, s.FilterKnown = c.filter(ctx)
	}
	return s, nil
}

// filter reads the node's inbound packet filter (the compiled rules of the
// tailnet policy) through tailscaled's debug LocalAPI: the live filter of
// the current netmap (action current-netmap), or, from a tailscale without
// that action, debug-packet-filter-matches (which in tailscale 1.102 can
// lag behind: a filter that control sends as a delta update is applied but
// not shown there). ok is false when it cannot be read (no netmap yet):
// the caller then knows nothing about the policy.
func (c *Client) filter(ctx context.Context) (rules []vpn.Rule, ok bool) {
	out, err := c.run(ctx, commandTimeout, "debug", "localapi", "POST", "debug?action=current-netmap")
	if err == nil {
		rules, err = parseNetmapFilter(out)
	} else if out, err = c.run(ctx, commandTimeout, "debug", "localapi", "debug-packet-filter-matches"); err == nil {
		rules, err = parseFilterMatches(out)
	}
	if err != nil {
		c.log.Debug("cannot read tailscale's packet filter", "err", err)
		return nil, false
	}
	return rules, true
}

// parseNetmapFilter parses the packet filter out of a netmap as LocalAPI's
// debug action current-netmap prints it.
func parseNetmapFilter(b []byte) ([]vpn.Rule, error) {
	var nm struct{ PacketFilter json.RawMessage }
	if err := json.Unmarshal(b, &nm); err != nil {
		return nil, fmt.Errorf("parse tailscale's netmap: %w", err)
	}
	if len(nm.PacketFilter) == 0 {
		return nil, nil // no filter: nothing may come in
	}
	return parseFilterMatches(nm.PacketFilter)
}

// filterMatch is the part of tailscale's filter.Match (as LocalAPI's
// debug-packet-filter-matches prints it) that Trellis reads.
type filterMatch struct {
	Srcs []netip.Prefix
	Dsts []struct{ Net netip.Prefix }
}

// parseFilterMatches parses the output of `tailscale debug localapi
// debug-packet-filter-matches`: a JSON list of matches, or null for none.
func parseFilterMatches(b []byte) ([]vpn.Rule, error) {
	var ms []filterMatch
	if err := json.Unmarshal(b, &ms); err != nil {
		return nil, fmt.Errorf("parse tailscale's packet filter: %w", err)
	}
	rules := make([]vpn.Rule, 0, len(ms))
	for _, m := range ms {
		r := vpn.Rule{Srcs: slices.Clone(m.Srcs)}
		for _, d := range m.Dsts {
			r.Dsts = append(r.Dsts, d.Net)
		}
		rules = append(rules, r)
	}
	return rules, nil
}

// AdvertiseRoutes implements vpn.Provider.
func (c *Client) AdvertiseRoutes(ctx context.Context, routes []netip.Prefix) ([]netip.Prefix, error) {
	cur, err := c.advertised(ctx)
	if err != nil {
		return nil, err
	}
	var added []netip.Prefix
	next := slices.Clone(cur)
	for _, r := range routes {
		r = r.Masked()
		if !slices.Contains(next, r) {
			next = append(next, r)
			added = append(added, r)
		}
	}
	if len(added) == 0 {
		return nil, nil
	}
	if err := c.setAdvertised(ctx, next); err != nil {
		return nil, err
	}
	c.log.Info("advertising routes on the tailnet", "added", added, "all", next)
	return added, nil
}

// WithdrawRoutes implements vpn.Provider.
func (c *Client) WithdrawRoutes(ctx context.Context, routes []netip.Prefix) error {
	cur, err := c.advertised(ctx)
	if err != nil {
		return err
	}
	next := slices.DeleteFunc(slices.Clone(cur), func(p netip.Prefix) bool { return slices.Contains(routes, p) })
	if len(next) == len(cur) {
		return nil
	}
	if err := c.setAdvertised(ctx, next); err != nil {
		return err
	}
	c.log.Info("withdrew routes from the tailnet", "withdrawn", routes, "kept", next)
	return nil
}

// advertised returns the routes the node advertises, without the exit node
// routes (0.0.0.0/0, ::/0), which `tailscale set --advertise-routes` keeps
// by itself.
func (c *Client) advertised(ctx context.Context) ([]netip.Prefix, error) {
	out, err := c.run(ctx, commandTimeout, "get", "advertise-routes")
	if err != nil {
		// tailscale before "get" existed: read the prefs.
		out, err2 := c.run(ctx, commandTimeout, "debug", "prefs")
		if err2 != nil {
			return nil, fmt.Errorf("read the routes this node advertises: %w", err)
		}
		var prefs struct{ AdvertiseRoutes []netip.Prefix }
		if err := json.Unmarshal(out, &prefs); err != nil {
			return nil, fmt.Errorf("read the routes this node advertises: parse 'tailscale debug prefs': %w", err)
		}
		return slices.DeleteFunc(prefs.AdvertiseRoutes, func(p netip.Prefix) bool { return p.Bits() == 0 }), nil
	}
	return parseRoutes(string(out))
}

func parseRoutes(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\r' || r == '\t' }) {
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("read the routes this node advertises: 'tailscale get advertise-routes' printed %q", s)
		}
		if p.Bits() != 0 {
			out = append(out, p)
		}
	}
	return out, nil
}

func (c *Client) setAdvertised(ctx context.Context, routes []netip.Prefix) error {
	s := make([]string, 0, len(routes))
	for _, r := range routes {
		if r.Bits() != 0 {
			s = append(s, r.String())
		}
	}
	if _, err := c.run(ctx, commandTimeout, "set", "--advertise-routes="+strings.Join(s, ",")); err != nil {
		return fmt.Errorf("set the routes this node advertises: %w", err)
	}
	return nil
}

// status is the part of `tailscale status --json` (ipnstate.Status) that
// Trellis reads.
type status struct {
	BackendState string
	TailscaleIPs []netip.Addr
	Self         *peerStatus
	Peer         map[string]*peerStatus
	User         map[string]struct{ LoginName string }
}

type peerStatus struct {
	HostName      string
	Tags          []string
	UserID        json.Number
	TailscaleIPs  []netip.Addr
	AllowedIPs    []netip.Prefix
	PrimaryRoutes []netip.Prefix
}

func (st *status) loggedIn() bool { return st.Self != nil && len(st.TailscaleIPs) > 0 }

// routes are the subnet routes a node serves: its primary routes and its
// allowed IPs that are not its own addresses.
func (p *peerStatus) routes() []netip.Prefix {
	out := slices.Clone(p.PrimaryRoutes)
	for _, a := range p.AllowedIPs {
		if a.IsSingleIP() && slices.Contains(p.TailscaleIPs, a.Addr()) {
			continue
		}
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	slices.SortFunc(out, comparePrefix)
	return out
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

func (st *status) state() vpn.State {
	s := vpn.State{Running: st.BackendState == stateRunning, Addrs: slices.Clone(st.TailscaleIPs)}
	if st.Self != nil {
		s.Approved = st.Self.routes()
		s.Tags = slices.Clone(st.Self.Tags)
		if u, ok := st.User[st.Self.UserID.String()]; ok {
			s.LoginName = u.LoginName
		}
	}
	for _, p := range st.Peer {
		if p == nil {
			continue
		}
		s.Peers = append(s.Peers, vpn.Peer{Name: p.HostName, Addrs: slices.Clone(p.TailscaleIPs), Routes: p.routes()})
	}
	slices.SortFunc(s.Peers, func(a, b vpn.Peer) int { return strings.Compare(a.Name, b.Name) })
	return s
}

func (c *Client) status(ctx context.Context) (*status, error) {
	out, err := c.run(ctx, commandTimeout, "status", "--json")
	if err != nil {
		return nil, fmt.Errorf("ask tailscaled for its status (is tailscaled installed and running?): %w", err)
	}
	var st status
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("parse 'tailscale status --json': %w", err)
	}
	return &st, nil
}

// run runs the tailscale command with args and returns its standard
// output. On failure the error holds what tailscale printed, with the join
// key removed should it ever appear.
func (c *Client) run(ctx context.Context, timeout time.Duration, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.cfg.Binary, args...)
	cmd.WaitDelay = time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err == nil {
		return stdout.Bytes(), nil
	}
	msg := strings.TrimSpace(stderr.String())
	if msg == "" {
		msg = strings.TrimSpace(stdout.String())
	}
	msg = c.redact(msg)
	if len(msg) > 2000 {
		msg = "..." + msg[len(msg)-2000:]
	}
	what := "tailscale " + args[0]
	if ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		err = fmt.Errorf("timed out after %v", timeout)
	}
	if msg == "" {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return nil, fmt.Errorf("%s: %w: %s", what, err, msg)
}

func (c *Client) redact(s string) string {
	if k := c.cfg.Auth.JoinKey; k != "" {
		s = strings.ReplaceAll(s, k, "<join key>")
	}
	return s
}
