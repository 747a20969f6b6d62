package kube

// KubeletPort returns the port of the kubelet of node as its Node reports
// it (status.daemonEndpoints.kubeletEndpoint), or 0 when the Node is not
// known or reports none. It reads the informer's cache: no API call.
func (c *Controller) KubeletPort(node string) int {
	n, err := c.lister.Get(node)
	if err != nil {
		return 0
	}
	return int(n.Status.DaemonEndpoints.KubeletEndpoint.Port)
}
