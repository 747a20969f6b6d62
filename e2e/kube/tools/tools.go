//go:build tools

// Package tools pins the Kubernetes commands the e2e tests run: a real
// kube-apiserver, kube-controller-manager (node IPAM), kubelet and kubectl,
// built from the k8s.io/kubernetes module by scripts/build-kube.sh. This
// module stays out of the product's go.mod.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
