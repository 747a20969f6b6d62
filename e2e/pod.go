//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// CNIBinDir holds the CNI plugins (containernetworking-plugins).
const CNIBinDir = "/usr/lib/cni"

// EchoPort is the TCP port of the echo server that Pod.ServeEcho starts.
const EchoPort = 7777

// helperEnv selects a helper mode of the test binary (see RunHelper).
const helperEnv = "TRELLIS_E2E_HELPER"

// Pod is a network namespace attached to a node the way a container runtime
// attaches a container: through a CNI plugin run in the node's namespace.
type Pod struct {
	Name string
	NS   string
	IP   netip.Addr
	Node *Node
	echo *Proc
}

// AddPod creates a pod namespace and attaches it with the first plugin of
// CNI network configuration list conflist (as a runtime would, with the
// list's cniVersion and name), running the real plugin binary from
// CNIBinDir in the node's namespace. host-local IPAM keeps its state under
// the lab's scratch directory unless the configuration names a dataDir.
func (n *Node) AddPod(conflist string) (*Pod, error) {
	l := n.lab
	conf, typ, err := l.firstPluginConf(n, conflist)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.pods++
	name := fmt.Sprintf("%s-pod%d", n.Name, l.pods)
	l.mu.Unlock()
	p := &Pod{Name: name, NS: l.newNamespace(name), Node: n}

	cmd := exec.Command("ip", "netns", "exec", n.NS, filepath.Join(CNIBinDir, typ))
	cmd.Env = append(os.Environ(),
		"CNI_COMMAND=ADD",
		"CNI_CONTAINERID="+p.NS,
		"CNI_NETNS=/var/run/netns/"+p.NS,
		"CNI_IFNAME=eth0",
		"CNI_PATH="+CNIBinDir,
	)
	cmd.Stdin = bytes.NewReader(conf)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("CNI ADD of pod %s with plugin %s on node %s: %w\nstdout: %s\nstderr: %s\nconfig: %s",
			p.NS, typ, n.Name, err, stdout.Bytes(), stderr.Bytes(), conf)
	}
	ip, err := resultIPv4(stdout.Bytes())
	if err != nil {
		return nil, fmt.Errorf("CNI ADD of pod %s on node %s: %w", p.NS, n.Name, err)
	}
	p.IP = ip
	return p, nil
}

// MustAddPod is AddPod that fails the test on error.
func (n *Node) MustAddPod(conflist string) *Pod {
	n.lab.t.Helper()
	p, err := n.AddPod(conflist)
	if err != nil {
		n.lab.t.Fatal(err)
	}
	return p
}

// firstPluginConf returns the network configuration to pass to the first
// plugin of conflist, and that plugin's type.
func (l *Lab) firstPluginConf(n *Node, conflist string) ([]byte, string, error) {
	raw, err := os.ReadFile(conflist)
	if err != nil {
		return nil, "", fmt.Errorf("read CNI config: %w", err)
	}
	var list map[string]any
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, "", fmt.Errorf("parse CNI config %s: %w\n%s", conflist, err, raw)
	}
	conf := list
	if plugins, ok := list["plugins"].([]any); ok {
		if len(plugins) == 0 {
			return nil, "", fmt.Errorf("CNI config %s has no plugins:\n%s", conflist, raw)
		}
		first, ok := plugins[0].(map[string]any)
		if !ok {
			return nil, "", fmt.Errorf("CNI config %s: first plugin is not an object:\n%s", conflist, raw)
		}
		conf = first
		conf["cniVersion"] = list["cniVersion"]
		conf["name"] = list["name"]
	}
	typ, _ := conf["type"].(string)
	if typ == "" || strings.Contains(typ, "/") {
		return nil, "", fmt.Errorf("CNI config %s: first plugin has no usable type:\n%s", conflist, raw)
	}
	if ipam, ok := conf["ipam"].(map[string]any); ok && ipam["type"] == "host-local" && ipam["dataDir"] == nil {
		dir := filepath.Join(l.dir, "ipam-"+n.Name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, "", err
		}
		ipam["dataDir"] = dir
	}
	b, err := json.Marshal(conf)
	return b, typ, err
}

// resultIPv4 returns the first IPv4 address of a CNI ADD result (spec
// 0.3.0 and later, or 0.1/0.2).
func resultIPv4(out []byte) (netip.Addr, error) {
	var res struct {
		IPs []struct {
			Address string `json:"address"`
		} `json:"ips"`
		IP4 *struct {
			IP string `json:"ip"`
		} `json:"ip4"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return netip.Addr{}, fmt.Errorf("parse CNI result: %w: %s", err, out)
	}
	addrs := []string{}
	for _, ip := range res.IPs {
		addrs = append(addrs, ip.Address)
	}
	if res.IP4 != nil {
		addrs = append(addrs, res.IP4.IP)
	}
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a); err == nil && p.Addr().Is4() {
			return p.Addr(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("CNI result has no IPv4 address: %s", out)
}

// Exec runs a command in the pod's namespace.
func (p *Pod) Exec(args ...string) (string, error) { return p.Node.lab.Exec(p.NS, args...) }

// Ping sends one ICMP echo from the pod to dst, waiting at most a second.
func (p *Pod) Ping(dst netip.Addr) error {
	if err := ping(p.Node.lab, p.NS, dst); err != nil {
		return fmt.Errorf("ping from pod %s (%s) to %s: %w", p.Name, p.IP, dst, err)
	}
	return nil
}

// ServeEcho starts a TCP echo server on EchoPort in the pod and waits until
// it accepts connections.
func (p *Pod) ServeEcho() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	p.echo = p.Node.lab.Start(p.NS, "env", helperEnv+"=echo-server", self, fmt.Sprintf(":%d", EchoPort))
	return Poll(10*time.Second, func() error {
		if err := p.echo.Err(); err != nil {
			return err
		}
		return p.TCPEcho(netip.MustParseAddr("127.0.0.1"))
	})
}

// TCPEcho connects from the pod to the echo server at dst:EchoPort, sends a
// line and checks that it comes back.
func (p *Pod) TCPEcho(dst netip.Addr) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	addr := netip.AddrPortFrom(dst, EchoPort).String()
	if _, err := p.Exec("env", helperEnv+"=tcp-echo", self, addr); err != nil {
		return fmt.Errorf("TCP echo from pod %s (%s) to %s: %w", p.Name, p.IP, addr, err)
	}
	return nil
}

// SendUDP sends one UDP datagram from namespace ns to dst.
func (l *Lab) SendUDP(ns string, dst netip.AddrPort) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	_, err = l.Exec(ns, "env", helperEnv+"=udp-send", self, dst.String())
	return err
}

// RunHelper turns the test binary into a small network tool when
// $TRELLIS_E2E_HELPER names one, and exits; otherwise it returns. TestMain
// calls it first. Modes (argument in os.Args[1]):
//
//	echo-server ADDR   serve TCP echo on ADDR until killed
//	tcp-echo HOST:PORT send a line to an echo server, expect it back
//	udp-send HOST:PORT send one UDP datagram
//
// extraHelpers are helper modes registered by other files (init).
var extraHelpers = map[string]func(arg string) error{}

func RunHelper() {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return
	}
	if len(os.Args) < 2 {
		fmt.Fprintf(os.Stderr, "helper %s: missing address argument\n", mode)
		os.Exit(2)
	}
	var err error
	switch mode {
	case "echo-server":
		err = echoServer(os.Args[1])
	case "tcp-echo":
		err = tcpEcho(os.Args[1])
	case "udp-send":
		err = udpSend(os.Args[1])
	default:
		if f := extraHelpers[mode]; f != nil {
			err = f(os.Args[1])
		} else {
			err = fmt.Errorf("unknown helper mode %q", mode)
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "helper %s: %v\n", mode, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func echoServer(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(time.Minute))
			_, _ = io.Copy(c, c)
		}()
	}
}

func tcpEcho(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	want := fmt.Sprintf("trellis-e2e %d %d\n", os.Getpid(), time.Now().UnixNano())
	if _, err := io.WriteString(c, want); err != nil {
		return err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if got != want {
		return fmt.Errorf("echo: sent %q, got %q", want, got)
	}
	return nil
}

func udpSend(addr string) error {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = io.WriteString(c, "trellis-e2e\n")
	return err
}
