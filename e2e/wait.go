//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

const (
	// pollInterval is how often Poll retries.
	pollInterval = 100 * time.Millisecond
	// defaultTimeout is for waits on things that need no network protocol
	// to converge (a process to start, a counter to move).
	defaultTimeout = 10 * time.Second
)

// permanentError marks an error that waiting will not cure.
type permanentError struct{ err error }

func (e permanentError) Error() string { return e.err.Error() }
func (e permanentError) Unwrap() error { return e.err }

// Permanent wraps err so that Poll and WaitFor give up at once when a
// condition returns it (for example: the process that should do the work
// has exited).
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return permanentError{err}
}

// Poll calls cond until it returns nil or timeout has passed, and returns
// nil or an error that wraps cond's last error. It gives up early when cond
// returns an error marked Permanent. It is safe to call from any goroutine.
func Poll(timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if errors.As(err, new(permanentError)) {
			return fmt.Errorf("gave up: %w", err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still not true after %v: %w", timeout, err)
		}
		time.Sleep(pollInterval)
	}
}

// WaitFor polls cond until it returns nil and fails the test if that does
// not happen within timeout. what says what was expected; cond's last error
// says what was seen. It returns how long it took.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() error) time.Duration {
	t.Helper()
	start := time.Now()
	if err := Poll(timeout, cond); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
	return time.Since(start)
}
