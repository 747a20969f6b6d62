//go:build e2e

package e2e

import (
	"fmt"
)

// CloudNAT creates a cloud whose node has only a private address, behind
// a 1:1 NAT the way AWS gives an instance a public IP: a router with
// public address publicCIDR on the internet maps that address to the
// node's lanCIDR address both ways (every port), and the node's default
// route goes through it. The node's PublicIP stays invalid (no interface
// holds it); its NATIP is the public address (what --node-external-ip
// names on such a node).
func (l *Lab) CloudNAT(name, publicCIDR, lanCIDR string) *Node {
	l.t.Helper()
	if len(name) > 11 {
		l.t.Fatalf("cloud %s: name longer than 11 characters (interface names derive from it)", name)
	}
	pub := mustPrefix(l.t, publicCIDR)
	lan := l.LAN(name, lanCIDR)
	lan.Gateway = lan.Prefix.Addr().Next()
	node := mustPrefix(l.t, lanCIDR).Addr()
	if node == lan.Gateway {
		l.t.Fatalf("cloud %s: node address %s is the gateway's address", name, lanCIDR)
	}
	return l.natted("cloud", name, pub, lan, lanCIDR, fmt.Sprintf(`add table ip nat
add chain ip nat prerouting { type nat hook prerouting priority dstnat; policy accept; }
add chain ip nat postrouting { type nat hook postrouting priority srcnat; policy accept; }
add rule ip nat prerouting iifname "eth0" ip daddr %[1]s dnat to %[2]s
add rule ip nat postrouting oifname "eth0" ip saddr %[2]s snat to %[1]s
`, pub.Addr(), node))
}
