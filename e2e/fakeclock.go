//go:build e2e

package e2e

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// A trellis whose wall clock can be moved while it runs: the chaos suite's
// "clock jumped" fault. trellis is a static Go binary that reads the clock
// through the vDSO, so libfaketime cannot touch it, time namespaces cannot
// move CLOCK_REALTIME, and the host's clock is everyone's. This build
// (go build -overlay, for the tests only) changes the Go runtime's
// time.now to add the seconds held in the file $TRELLIS_FAKE_CLOCK_FILE,
// mapped shared, so that a write to the file moves the process's clock at
// once; the monotonic clock is untouched, as on a real host whose clock
// is stepped.

var fakeClockBuild struct {
	once sync.Once
	bin  string
	err  error
}

// fakeClockAsmAnchor is the line of the runtime's time.now (linux/amd64)
// after which the offset is added to the seconds.
const fakeClockAsmAnchor = "\tMOVQ\t16(SP), AX\t// realtime sec\n"

const fakeClockAsm = `	// Trellis e2e: add the seconds in $TRELLIS_FAKE_CLOCK_FILE.
	MOVQ	runtime·fakeClockOffset(SB), SI
	CMPQ	SI, $0
	JEQ	nofakeclock
	ADDQ	0(SI), AX
nofakeclock:
`

const fakeClockGo = `package runtime

import "unsafe"

// fakeClockOffset, if not nil, points at the first 8 bytes of the file
// named by TRELLIS_FAKE_CLOCK_FILE, mapped shared: seconds (a
// little-endian int64) that time.now adds to the wall clock. Only in the
// Trellis e2e tests' build of trellis.
var fakeClockOffset *int64

func init() {
	path := gogetenv("TRELLIS_FAKE_CLOCK_FILE")
	if path == "" {
		return
	}
	b := make([]byte, len(path)+1)
	copy(b, path)
	fd := open(&b[0], 0 /* O_RDONLY */, 0)
	if fd < 0 {
		throw("TRELLIS_FAKE_CLOCK_FILE cannot be opened")
	}
	p, err := mmap(nil, 8, 1 /* PROT_READ */, 1 /* MAP_SHARED */, fd, 0)
	closefd(fd)
	if err != 0 {
		throw("TRELLIS_FAKE_CLOCK_FILE cannot be mapped")
	}
	fakeClockOffset = (*int64)(unsafe.Pointer(p))
}
`

// fakeClockBinary returns a trellis built from this checkout with the
// movable clock, building it once per test run (a few minutes: the
// runtime changes, so nothing comes from the build cache the first time).
func fakeClockBinary(t testing.TB) string {
	t.Helper()
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skipf("the movable clock patches the linux/amd64 runtime; this is %s/%s", runtime.GOOS, runtime.GOARCH)
	}
	b := &fakeClockBuild
	b.once.Do(func() { b.bin, b.err = buildFakeClock() })
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.bin
}

func buildFakeClock() (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	out, err := exec.Command("go", "env", "GOROOT").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOROOT: %w", err)
	}
	goroot := strings.TrimSpace(string(out))
	asmPath := filepath.Join(goroot, "src", "runtime", "time_linux_amd64.s")
	asm, err := os.ReadFile(asmPath)
	if err != nil {
		return "", err
	}
	if strings.Count(string(asm), fakeClockAsmAnchor) != 1 {
		return "", fmt.Errorf("%s has no line %q (once) to add the clock offset after: this Go's runtime changed; update e2e/fakeclock.go", asmPath, fakeClockAsmAnchor)
	}
	dir, err := os.MkdirTemp("", "trellis-e2e-fakeclock-")
	if err != nil {
		return "", err
	}
	files := map[string]string{
		asmPath: strings.Replace(string(asm), fakeClockAsmAnchor, fakeClockAsmAnchor+fakeClockAsm, 1),
		filepath.Join(goroot, "src", "runtime", "zz_trellis_fakeclock.go"): fakeClockGo,
	}
	overlay := map[string]map[string]string{"Replace": {}}
	for target, content := range files {
		p := filepath.Join(dir, filepath.Base(target))
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return "", err
		}
		overlay["Replace"][target] = p
	}
	ob, _ := json.Marshal(overlay)
	if err := os.WriteFile(filepath.Join(dir, "overlay.json"), ob, 0o644); err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "trellis")
	cmd := exec.Command("go", "build", "-overlay", filepath.Join(dir, "overlay.json"), "-o", bin, "./cmd/trellis")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build trellis with a movable clock: %w\n%s", err, b)
	}
	return bin, nil
}

// fakeClock is the file that moves the clock of the processes started
// with TRELLIS_FAKE_CLOCK_FILE naming it.
type fakeClock struct{ path string }

func newFakeClock(dir string) (*fakeClock, error) {
	c := &fakeClock{path: filepath.Join(dir, "clock-offset")}
	return c, c.set(0)
}

// env is the environment variable that gives a process this clock.
func (c *fakeClock) env() string { return "TRELLIS_FAKE_CLOCK_FILE=" + c.path }

// follows checks that process pid reads this clock: its runtime mapped
// the file (/proc/PID/maps).
func (c *fakeClock) follows(pid int) error {
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return err
	}
	if !strings.Contains(string(maps), c.path) {
		return fmt.Errorf("process %d does not map %s: it does not run the movable-clock trellis with %s", pid, c.path, c.env())
	}
	return nil
}

// set moves the clock to seconds ahead of the host's (back with 0).
func (c *fakeClock) set(seconds int64) error {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, uint64(seconds))
	f, err := os.OpenFile(c.path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
