package agent

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/trellis-mesh/trellis/internal/api"
	"github.com/trellis-mesh/trellis/internal/pki"
)

// serversFile is where the agent remembers every server's URL across
// restarts, in its data dir.
const serversFile = "servers.json"

// serverList is the servers an agent may talk to: the one it was given
// (--server) first, then those the cluster announced (join answer and
// netmaps). API calls go to the current one; when it is lost the agent
// moves to the next. Safe for concurrent use.
type serverList struct {
	path    string
	log     *slog.Logger
	first   string          // --server, always kept
	aliases map[string]bool // other URLs of the --server server (a server's own node)

	mu        sync.Mutex
	firstName string        // guarded by mu; name of the --server server, once known
	servers   []api.Server  // guarded by mu; the list the cluster announced last
	urls      []string      // guarded by mu; first is urls[0]
	cur       int           // guarded by mu; index of the current server
	changed   chan struct{} // guarded by mu; closed when urls changes
}

// savedServers is the file the list is remembered in.
type savedServers struct {
	FirstName string       `json:"firstName,omitempty"`
	Servers   []api.Server `json:"servers"`
}

// newServerList returns the list with first and what path remembers.
func newServerList(path, first string, aliases []string, log *slog.Logger) *serverList {
	l := &serverList{path: path, log: log, first: first, aliases: map[string]bool{}, urls: []string{first}, changed: make(chan struct{})}
	for _, a := range aliases {
		l.aliases[normalizeURL(a)] = true
	}
	if b, err := os.ReadFile(path); err == nil {
		var saved savedServers
		if json.Unmarshal(b, &saved) == nil {
			l.firstName, l.servers = saved.FirstName, saved.Servers
			l.merge()
		} else {
			log.Warn("ignoring unreadable server list", "file", path)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		log.Warn("cannot read the server list", "file", path, "err", err)
	}
	return l
}

func normalizeURL(u string) string { return strings.TrimSuffix(strings.TrimSpace(u), "/") }

// merge rebuilds urls: first, then the URLs of the announced servers
// other than first's own (by name or alias URL), valid https URLs only;
// it reports whether the list changed. Called with mu held or before use.
func (l *serverList) merge() bool {
	next := []string{l.first}
	for _, srv := range l.servers {
		u := normalizeURL(srv.URL)
		pu, err := url.Parse(u)
		if err != nil || pu.Scheme != "https" || pu.Host == "" || l.aliases[u] || slices.Contains(next, u) ||
			(l.firstName != "" && srv.Name == l.firstName) {
			continue
		}
		next = append(next, u)
	}
	slices.Sort(next[1:])
	if slices.Equal(next, l.urls) {
		return false
	}
	current := l.urls[l.cur]
	l.urls = next
	l.cur = max(0, slices.Index(next, current))
	close(l.changed)
	l.changed = make(chan struct{})
	return true
}

// update takes the server list the cluster announced (in an answer from
// the server named fromName at URL from) and remembers it.
func (l *serverList) update(from, fromName string, servers []api.Server) {
	if len(servers) == 0 {
		return
	}
	l.mu.Lock()
	if normalizeURL(from) == l.first && fromName != "" {
		l.firstName = fromName
	}
	l.servers = slices.Clone(servers)
	changed := l.merge()
	all := slices.Clone(l.urls)
	saved := savedServers{FirstName: l.firstName, Servers: l.servers}
	l.mu.Unlock()
	if !changed {
		return
	}
	l.log.Info("servers of the cluster", "servers", strings.Join(all, " "))
	b, _ := json.Marshal(saved)
	if err := pki.WriteFileAtomic(l.path, b, 0o600); err != nil {
		l.log.Warn("cannot remember the server list", "file", l.path, "err", err)
	}
}

// current returns the server API calls go to.
func (l *serverList) current() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.urls[l.cur]
}

// next moves to the next server and returns it.
func (l *serverList) next() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cur = (l.cur + 1) % len(l.urls)
	return l.urls[l.cur]
}

// all returns every server and a channel closed when the list changes.
func (l *serverList) all() ([]string, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.urls), l.changed
}

// runTunnels keeps a supervisor tunnel to every server of the list until
// ctx ends: a server reaches the node through its own tunnel, whichever
// server the node's API calls go to. The first server's tunnel client is
// the one the status endpoint reports.
func (a *Agent) runTunnels(ctx context.Context, servers *serverList) {
	type running struct {
		cancel context.CancelFunc
		done   chan struct{}
	}
	tunnels := map[string]*running{}
	defer func() {
		for _, r := range tunnels {
			r.cancel()
		}
		for _, r := range tunnels {
			<-r.done
		}
	}()
	for {
		urls, changed := servers.all()
		for u, r := range tunnels {
			if !slices.Contains(urls, u) {
				r.cancel()
				<-r.done
				delete(tunnels, u)
			}
		}
		for i, u := range urls {
			if tunnels[u] != nil {
				continue
			}
			tc, err := a.newTunnel(u)
			if err != nil {
				a.log.Warn("cannot start the tunnel to a server", "server", u, "err", err)
				continue
			}
			if i == 0 {
				a.tunnelState.Store(tc)
			}
			tctx, cancel := context.WithCancel(ctx)
			r := &running{cancel: cancel, done: make(chan struct{})}
			tunnels[u] = r
			go func() {
				defer close(r.done)
				_ = tc.Run(tctx)
			}()
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}
