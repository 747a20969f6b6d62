package cli

import (
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/trellis-mesh/trellis/internal/api"
)

// printVPN writes, below the node table, the VPN carrier of the nodes that
// have one, and their warnings in full (for unapproved routes, the
// autoApprovers stanza to add to the tailnet policy).
func printVPN(w io.Writer, nodes []api.Node) error {
	var vpnNodes []api.Node
	for _, n := range nodes {
		if n.VPN != nil {
			vpnNodes = append(vpnNodes, n)
		}
	}
	if len(vpnNodes) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	fmt.Fprintln(tw, "NAME\tVPN\tPOD-CIDR-ROUTES\tROUTES-APPROVED")
	for _, n := range vpnNodes {
		approved := "False"
		if n.VPN.RoutesApproved {
			approved = "True"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", n.Name, n.VPN.Provider, orNone(joinPrefixes(n.VPN.Routes)), approved)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, n := range vpnNodes {
		if n.VPN.Warning != "" {
			if _, err := fmt.Fprintf(w, "\nWARNING: node %s: %s\n", n.Name, n.VPN.Warning); err != nil {
				return err
			}
		}
	}
	return nil
}
