package agent

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain checks that no test leaves a goroutine behind: the agent's
// parts (source, loop, status endpoint, tunnels) all stop with it.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
