//go:build e2e

package e2e

import (
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	RunHelper() // exits if this process is a helper (see pod.go)
	code := m.Run()
	if trellisBuild.dir != "" {
		os.RemoveAll(trellisBuild.dir)
	}
	os.Exit(code)
}
