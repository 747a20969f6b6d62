// # A real kubelet
//
// kubelet.go, noderuntime.go and images.go run a real kubelet with
// containerd on any lab node, and kubetest (internal/kube/kubetest) runs
// the control plane in a cloud node's network namespace:
//
//	env := kubetest.Start(t, kubetest.Options{NetNS: cp.NS, Address: cp.PublicIP, Kubelets: true,
//		NodeIPAM: ..., APIServerArgs: []string{...}})
//	cd := home.StartContainerd(t, ContainerdOptions{CNIConfDir: dir, Images: []Image{BusyboxImage(t)}})
//	k := cd.StartKubelet(t, env, KubeletOptions{})   // Node "home", InternalIP = its LAN address
//	k.WaitReady(t, 3*time.Minute)                    // Ready once dir holds a CNI conflist
//	pod, _ := RunPod(t, env.Admin(t), BusyboxPod("p", "home", BusyboxImage(t), "echo hi; exec httpd -f -p 8080"), 2*time.Minute)
//	out, err := env.Kubectl(t, "logs", "p")         // kubectl runs in the API server's netns
//
// containerd and the kubelet run in the node's network namespace (nsenter
// --net, not `ip netns exec`, which hides the cgroup mounts), in a private
// mount namespace of the node (its own /run, /var/lib/kubelet, /var/log
// and copies of the kernel settings a kubelet writes: several kubelets
// run on one machine) and in a cgroup subtree of the node that holds
// containerd, its shims, the kubelet and the pods; when the test ends
// everything in it is killed and the mounts go with the mount namespace.
// Images are OCI tarballs written by Go (a static pause program, Debian's
// busybox-static), cached in ~/.cache/trellis-e2e/images and imported with
// ctr; pods use imagePullPolicy: Never and spec.nodeName (no scheduler).
//
// TestRealKubelet needs root, containerd, runc, busybox-static and the
// Kubernetes binaries of scripts/build-kube.sh; without them it skips and
// says what is missing (TRELLIS_REQUIRE_KUBE=1 makes that a failure). The
// comment at the top of kubelet.go lists what runs where, every kubelet
// flag and the pitfalls of these machines with what the harness does
// about each.
package e2e
