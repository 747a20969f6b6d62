package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/tunnel"
)

// DialNode opens a connection to 127.0.0.1:port on node, carried by the
// server through the node's tunnel (client.Client.DialNode). A refusal
// comes back as an *api.Error that says what to do.
func (c *Client) DialNode(ctx context.Context, node string, port int) (net.Conn, error) {
	conn, err := c.api.DialNode(ctx, node, port)
	return conn, c.explain(err)
}

// Proxy carries every connection accepted on ln to 127.0.0.1:port on node
// until ctx ends; then it closes ln and the open connections and waits
// for them. Failures of single connections are logged.
func (c *Client) Proxy(ctx context.Context, node string, port int, ln net.Listener, log *slog.Logger) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	track := func(cn net.Conn, add bool) {
		mu.Lock()
		defer mu.Unlock()
		if add {
			conns[cn] = struct{}{}
		} else {
			delete(conns, cn)
		}
	}
	stop := context.AfterFunc(ctx, func() {
		_ = ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for cn := range conns {
			_ = cn.Close()
		}
	})
	defer stop()
	var err error
	for {
		var local net.Conn
		local, err = ln.Accept()
		if err != nil {
			break
		}
		track(local, true)
		wg.Go(func() {
			defer track(local, false)
			remote, err := c.DialNode(ctx, node, port)
			if err != nil {
				log.Warn("proxy connection failed", "from", local.RemoteAddr(), "node", node, "port", port, "err", err)
				_ = local.Close()
				return
			}
			track(remote, true)
			defer track(remote, false)
			tunnel.Splice(local, remote)
		})
	}
	stop()
	_ = ln.Close()
	mu.Lock()
	for cn := range conns {
		_ = cn.Close()
	}
	mu.Unlock()
	wg.Wait()
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
}

// NodeStatus fetches a node's own status through its tunnel.
func (c *Client) NodeStatus(ctx context.Context, node string) (*api.NodeStatus, error) {
	st, err := c.api.NodeStatus(ctx, node)
	return st, c.explain(err)
}

// TunnelColumn is the TUNNEL cell of the node table: "up 5m", "down 2m",
// "down" or "-" (unknown).
func TunnelColumn(t *api.TunnelStatus, now time.Time) string {
	switch {
	case t == nil:
		return "-"
	case t.Connected:
		return "up " + Age(now.Sub(t.Since))
	case t.Since.IsZero():
		return "down"
	}
	return "down " + Age(now.Sub(t.Since))
}

// PrintStatus writes a node's status as text ("" or "table") or JSON.
func PrintStatus(w io.Writer, st *api.NodeStatus, format string, now time.Time) error {
	switch format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	case "", "table":
	default:
		return fmt.Errorf("unknown output format %q: use table or json", format)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	fmt.Fprintf(tw, "NODE:\t%s\n", st.Name)
	fmt.Fprintf(tw, "SERVER:\t%s\n", st.ServerURL)
	fmt.Fprintf(tw, "TUNNEL:\t%s\n", TunnelColumn(&st.Tunnel, now))
	dp := st.DataPlane
	if st.Interface != "" {
		dp = fmt.Sprintf("%s (%s, mtu %d, port %d)", st.DataPlane, st.Interface, st.MTU, st.ListenPort)
	}
	fmt.Fprintf(tw, "DATA PLANE:\t%s\n", dp)
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(st.Peers) == 0 {
		_, err := fmt.Fprintln(w, "\nno WireGuard peers")
		return err
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	fmt.Fprintln(tw, "PEER\tENDPOINT\tHANDSHAKE\tRX\tTX\tPUBLIC-KEY")
	for _, p := range st.Peers {
		ep, hs := "<none>", "never"
		if p.Endpoint.IsValid() {
			ep = p.Endpoint.String()
		}
		if !p.LastHandshake.IsZero() {
			hs = Age(st.Time.Sub(p.LastHandshake)) + " ago"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", orNone(p.Name), ep, hs, bytesString(p.RxBytes), bytesString(p.TxBytes), p.PublicKey)
	}
	return tw.Flush()
}

// bytesString formats a byte count: 512 B, 1.5 KiB, 3.2 MiB.
func bytesString(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
