//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"sync"
	"testing"
)

// IPv6 for the lab. netlab.go builds IPv4 networks; the helpers here add
// IPv6 to them: a dual-stack internet router, IPv6 addresses on a cloud's
// existing public link (dual-stack clouds) and clouds whose public link
// carries IPv6 only. "Public" IPv6 addresses come from the documentation
// prefix 2001:db8::/32, one /64 per public subnet; the router holds its
// first address. Duplicate address detection is off (every address is
// added with nodad), so addresses are usable at once.

// lab6 is the IPv6 state of one lab.
type lab6 struct {
	mu       sync.Mutex
	router   bool                    // the router forwards IPv6
	gateways map[netip.Prefix]bool   // router addresses added, by subnet
	public6  map[*Node]netip.Addr    // a node's public IPv6 address
	bridges  map[netip.Prefix]string // IPv6-only subnet -> router bridge
}

var labs6 sync.Map // *Lab -> *lab6

func (l *Lab) v6() *lab6 {
	s, loaded := labs6.LoadOrStore(l, &lab6{
		gateways: map[netip.Prefix]bool{},
		public6:  map[*Node]netip.Addr{},
		bridges:  map[netip.Prefix]string{},
	})
	if !loaded {
		l.t.Cleanup(func() { labs6.Delete(l) })
	}
	return s.(*lab6)
}

// noDAD turns duplicate address detection off for interfaces created
// later in namespace ns.
func (l *Lab) noDAD(ns string) {
	l.t.Helper()
	l.sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")
	l.sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
}

// Internet6 returns the lab's internet router with IPv6 forwarding on.
func (l *Lab) Internet6() *Router {
	l.t.Helper()
	r := l.Internet()
	s := l.v6()
	s.mu.Lock()
	done := s.router
	s.router = true
	s.mu.Unlock()
	if !done {
		l.noDAD(r.NS)
		l.sysctl(r.NS, "net.ipv6.conf.all.forwarding", "1")
	}
	return r
}

// addRouterGateway6 gives bridge br of the router the first address of
// public IPv6 subnet p, once.
func (l *Lab) addRouterGateway6(br string, p netip.Prefix) netip.Addr {
	l.t.Helper()
	r := l.Internet6()
	gw := p.Addr().Next()
	s := l.v6()
	s.mu.Lock()
	done := s.gateways[p]
	s.gateways[p] = true
	s.mu.Unlock()
	if !done {
		l.must("ip", "-n", r.NS, "addr", "add", netip.PrefixFrom(gw, p.Bits()).String(), "dev", br, "nodad")
	}
	return gw
}

// AddPublic6 makes n's public link dual-stack: it adds IPv6 address cidr
// (e.g. "2001:db8:1::10/64") to n's eth0, the subnet's first address to
// the router's side of the same link, and an IPv6 default route.
func (n *Node) AddPublic6(cidr string) {
	l := n.lab
	l.t.Helper()
	if !n.PublicIP.IsValid() {
		l.t.Fatalf("node %s has no public IPv4 link to add IPv6 to; use Lab.Cloud6 for an IPv6-only cloud", n.Name)
	}
	p := mustPrefix6(l.t, cidr)
	l.mu.Lock()
	var br string
	for sub, b := range l.segments {
		if sub.Contains(n.PublicIP) {
			br = b
		}
	}
	l.mu.Unlock()
	if br == "" {
		l.t.Fatalf("node %s: no internet segment holds %s", n.Name, n.PublicIP)
	}
	gw := l.addRouterGateway6(br, p.Masked())
	l.noDAD(n.NS)
	l.must("ip", "-n", n.NS, "addr", "add", p.String(), "dev", "eth0", "nodad")
	l.must("ip", "-n", n.NS, "-6", "route", "add", "default", "via", gw.String(), "dev", "eth0")
	s := l.v6()
	s.mu.Lock()
	s.public6[n] = p.Addr()
	s.mu.Unlock()
}

// Cloud6 creates a cloud whose public link carries IPv6 only: a LAN named
// name+"-lan" with IPv4 subnet lanCIDR, and one node on it (eth1) that also
// has eth0 on the internet with IPv6 address publicCIDR and an IPv6
// default route, and no IPv4 route beyond its LAN.
func (l *Lab) Cloud6(name, publicCIDR, lanCIDR string) *Node {
	l.t.Helper()
	if len(name) > 12 {
		l.t.Fatalf("node name %q is longer than 12 characters (interface names derive from it)", name)
	}
	l.mu.Lock()
	_, dup := l.nodes[name]
	l.mu.Unlock()
	if dup {
		l.t.Fatalf("node %q exists already", name)
	}
	pub := mustPrefix6(l.t, publicCIDR)
	lan := l.LAN(name, lanCIDR)
	r := l.Internet6()
	n := &Node{Name: name, NS: l.newNamespace(name), LAN: lan, lab: l}
	l.noDAD(n.NS)
	l.sysctl(n.NS, "net.ipv4.ip_forward", "1")

	s := l.v6()
	s.mu.Lock()
	br, ok := s.bridges[pub.Masked()]
	if !ok {
		br = fmt.Sprintf("pub6x%d", len(s.bridges))
		s.bridges[pub.Masked()] = br
	}
	s.mu.Unlock()
	if !ok {
		l.must("ip", "-n", r.NS, "link", "add", br, "type", "bridge")
		l.must("ip", "-n", r.NS, "link", "set", br, "up")
	}
	gw := l.addRouterGateway6(br, pub.Masked())
	l.veth(n.NS, "eth0", r.NS, name)
	l.must("ip", "-n", r.NS, "link", "set", name, "master", br)
	l.must("ip", "-n", n.NS, "addr", "add", pub.String(), "dev", "eth0", "nodad")
	l.must("ip", "-n", n.NS, "-6", "route", "add", "default", "via", gw.String(), "dev", "eth0")

	lp := mustPrefix(l.t, lanCIDR)
	n.LANIP = lp.Addr()
	lan.plug(n.NS, "eth1", lp)

	l.mu.Lock()
	l.nodes[name] = n
	l.mu.Unlock()
	s.mu.Lock()
	s.public6[n] = pub.Addr()
	s.mu.Unlock()
	return n
}

// PublicIP6 is the node's public IPv6 address; invalid if it has none.
func (n *Node) PublicIP6() netip.Addr {
	s := n.lab.v6()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.public6[n]
}

// IP6 returns the pod's global IPv6 address, or an error if CNI gave it
// none.
func (p *Pod) IP6() (netip.Addr, error) {
	out, err := p.Node.lab.Output(p.NS, "ip", "-j", "-6", "addr", "show", "dev", "eth0", "scope", "global")
	if err != nil {
		return netip.Addr{}, err
	}
	var links []struct {
		AddrInfo []struct {
			Local string `json:"local"`
		} `json:"addr_info"`
	}
	if err := json.Unmarshal([]byte(out), &links); err != nil {
		return netip.Addr{}, fmt.Errorf("pod %s: parse ip -j addr: %w: %q", p.Name, err, out)
	}
	for _, l := range links {
		for _, a := range l.AddrInfo {
			if ip, err := netip.ParseAddr(a.Local); err == nil {
				return ip, nil
			}
		}
	}
	return netip.Addr{}, fmt.Errorf("pod %s has no global IPv6 address on eth0: %s", p.Name, out)
}

func mustPrefix6(t testing.TB, s string) netip.Prefix {
	t.Helper()
	p, err := netip.ParsePrefix(s)
	if err != nil || !p.Addr().Is6() || p.Addr().Is4In6() {
		t.Fatalf("want an IPv6 address with prefix length such as 2001:db8:1::10/64, got %q (%v)", s, err)
	}
	return p
}
