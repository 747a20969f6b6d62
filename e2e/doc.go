// Package e2e runs Trellis clusters inside network namespaces: "clouds" with
// public subnets joined by an "internet" router, "homes" behind NAT routers,
// real trellis processes, and pods attached through the real CNI bridge
// plugin.
//
// Everything except this file, kubelet_doc.go (the real kubelet's notes)
// and pause/ (the sandbox program the kubelet's pods run) is behind the
// build tag e2e, and the tests need root:
//
//	go test -tags e2e ./e2e/...
//	go test -tags e2e -run TestLab -v ./e2e/     # the harness on its own
//
// The harness (netlab.go, proc.go, pod.go, wg.go, wait.go) creates
// namespaces named "tr-<pid>-<lab>-...", uses only documentation and
// benchmarking address ranges plus 10.x inside them, routes nothing to or
// from the host's interfaces, and removes what it made when a test ends,
// and what a crashed run left behind when the next run starts. On failure
// the tails of the process logs are printed and the full logs are copied to
// e2e/artifacts/<test>/ (also on success with TRELLIS_E2E_KEEP_LOGS=1).
// TRELLIS_E2E_BINARY=PATH tests a prebuilt trellis binary instead of
// building ./cmd/trellis; TRELLIS_E2E_LOG_LEVEL=debug (or info, warn,
// error) adds --log-level to every trellis process the tests start.
//
// # How to write an e2e test
//
// Build the machines with the lab, then the cluster with the builder
// (builder_test.go), which starts every trellis process:
//
//	lab := NewLab(t)
//	c1 := lab.Cloud("cloud1", "198.51.100.10/24", "10.1.0.10/24")
//	c2 := lab.Cloud("cloud2", "203.0.113.20/24", "10.2.0.20/24")
//	home := lab.Home("home1", "198.18.0.50/24", "192.168.1.10/24")
//
//	c := newCluster(t, lab)              // cluster-wide options go here
//	srv := c.startServer(c1)             // waits for its join token
//	a2 := c.startAgent(c2, asRelay())    // joins the first server
//	a3 := c.startAgent(home, withFlags("--tunnel-allow-port", "8080"))
//	all := []*member{srv, a2, a3}
//	nodes := c.waitNodes(all...)         // listed exactly, all ready
//	for _, m := range all {
//		c.attachPod(m)                   // waits for its CNI config
//	}
//	c.checkPods("three nodes", all, all, meshTimeout)
//
// A member gets --data-dir and --cni-conf-dir of its own, --node-name (the
// machine's name), --node-ip and --node-external-ip from the machine's LAN
// and public addresses (each if it has one), and --log-level from
// TRELLIS_E2E_LOG_LEVEL. A server also gets the seed page's data-plane
// flags, --token, --cluster-cidr and --https-listen-port 6443; an agent
// --server (its server's public address, or its LAN address when they
// share a LAN) and the server's full token. The first line of each
// process's log shows its command line. Options change that, per start or,
// given to newCluster, for every start:
//
//	withFlags(f...)         extra flags, appended
//	withAddressFlags(f...)  the address flags instead of the machine's (none: the node finds them)
//	withServerFlags(f...)   servers' data-plane flags instead of seedServerFlags
//	withClusterCIDR(cidrs)  --cluster-cidr; with an IPv6 range the pod checks use both families
//	dualStack()             both cluster CIDRs, no --flannel-external-ip
//	withClusterInit(), via(srv)  HA: a server that starts embedded etcd, one that joins srv;
//	                        via(srv) on an agent joins through srv
//	overIPv6(), withServerURL(u)  where an agent joins
//	asRelay(), withMetrics(a), withVPNAuth(v), withEnv(kv...)
//	overTailnet(tn)         the members run on tailscaled nodes of tn (Tailnet.Start)
//	flagsOnly(f...)         the command line is `trellis ROLE f...` (a --config file)
//	noWait()                a server that is expected to fail: no token wait
//	beforeStart(hook)       runs before each start with the member and its configuration
//
// c.newMember plus c.start(m, opts...) starts a member whose directories the
// test prepares first, or starts a stopped member again with new flags;
// m.proc.Restart() restarts it with the same ones. A new kind of cluster
// (Kubernetes: a kube-apiserver next to each server, --kubeconfig on its
// command line) is a cluster option built on beforeStart: the hook starts
// the extra process with m.Start on the member's machine (the lab logs and
// stops it) and appends the flag to the start's configuration, as
// overTailnet does for tailscaled's PATH.
//
// Wait with WaitFor and Poll (wait.go), returning Permanent (or a
// process's Err) for what waiting cannot cure; c.waitToken, c.waitListed
// and c.waitCNIConfig wait for the usual milestones. c.cli runs the trellis
// CLI with the admin configuration on the server's machine; c.nodes and
// c.paths parse its JSON. Measured times go to t.Logf as "measured: ..."
// lines, and c.firstPackets records join → first packet per pair.
package e2e
