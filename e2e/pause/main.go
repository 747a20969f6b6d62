// Command pause is the sandbox ("pause") process of the pods that the e2e
// tests run on a real kubelet: it holds the pod's namespaces, sleeps until
// SIGTERM or SIGINT, and reaps children that it inherits as PID 1. The
// harness builds it statically (CGO_ENABLED=0) into an image of one file.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
