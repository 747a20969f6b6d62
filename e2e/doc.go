// Package e2e runs Trellis clusters inside network namespaces: "clouds" with
// public subnets joined by an "internet" router, "homes" behind NAT routers,
// real trellis processes, and pods attached through the real CNI bridge
// plugin.
//
// Everything except this file is behind the build tag e2e, and the tests
// need root:
//
//	go test -tags e2e ./e2e/...
//	go test -tags e2e -run TestLab -v ./e2e/     # the harness on its own
//
// The harness (netlab.go, proc.go, pod.go, wg.go, wait.go) creates
// namespaces named "tr-<pid>-<lab>-...", uses only documentation and
// benchmarking address ranges plus 10.x inside them, routes nothing to or
// from the host's interfaces, and removes what it made when a test ends,
// and what a crashed run left behind when the next run starts. On failure
// the tails of the process logs are printed and the full logs are copied to
// e2e/artifacts/<test>/ (also on success with TRELLIS_E2E_KEEP_LOGS=1).
// TRELLIS_E2E_BINARY=PATH tests a prebuilt trellis binary instead of
// building ./cmd/trellis.
package e2e
