//go:build tools

// Package tools pins the tailscale.com commands that the e2e tests build:
// tailscaled, tailscale and, in ./tsctl, an offline control server.
// It is a separate module so that the product's go.mod never requires
// tailscale.com.
package tools

import (
	_ "tailscale.com/cmd/tailscale"
	_ "tailscale.com/cmd/tailscaled"
)
