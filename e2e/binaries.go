//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// trellisBuild is the trellis binary, built once per test run.
var trellisBuild struct {
	once sync.Once
	dir  string // temporary directory holding bin
	bin  string
	skip string // why there is nothing to build
	err  error
}

// trellisBinary returns the path of a trellis binary built from this
// checkout (or $TRELLIS_E2E_BINARY if set). It skips the test if
// cmd/trellis does not exist and fails it if the build fails.
func trellisBinary(t testing.TB) string {
	t.Helper()
	b := &trellisBuild
	b.once.Do(func() {
		if bin := os.Getenv("TRELLIS_E2E_BINARY"); bin != "" {
			b.bin, b.err = filepath.Abs(bin)
			return
		}
		root, err := moduleRoot()
		if err != nil {
			b.err = err
			return
		}
		if _, err := os.Stat(filepath.Join(root, "cmd", "trellis")); errors.Is(err, os.ErrNotExist) {
			b.skip = "cmd/trellis does not exist yet in " + root
			return
		}
		b.dir, b.err = os.MkdirTemp("", "trellis-e2e-bin-")
		if b.err != nil {
			return
		}
		b.bin = filepath.Join(b.dir, "trellis")
		cmd := exec.Command("go", "build", "-o", b.bin, "./cmd/trellis")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build ./cmd/trellis in %s: %w\n%s", root, err, out)
		}
	})
	if b.skip != "" {
		t.Skip(b.skip)
	}
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.bin
}

// moduleRoot finds the directory of go.mod above the package directory.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && strings.Contains(string(b), "module github.com/trellis-mesh/trellis") {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod of github.com/trellis-mesh/trellis above %s", dir)
		}
	}
}
