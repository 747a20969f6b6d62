#!/usr/bin/env bash
# The project's whole test suite: static checks, unit tests with the race
# detector, a short run of every fuzzer, and the end-to-end tests in
# network namespaces (those need root; without it they skip and say why).
#
#   FUZZTIME=5s   how long each fuzzer runs (default 5s)
#   E2E=0         skip the end-to-end tests
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n=== %s\n' "$*"; }

step "gofmt"
bad=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$bad" ]; then echo "gofmt would change:"; echo "$bad"; exit 1; fi

step "go vet"
go vet ./...
go vet -tags e2e ./e2e/...

step "staticcheck"
if command -v staticcheck >/dev/null; then
  staticcheck ./...
elif [ -x "$(go env GOPATH)/bin/staticcheck" ]; then
  "$(go env GOPATH)/bin/staticcheck" ./...
else
  echo "staticcheck not installed (go install honnef.co/go/tools/cmd/staticcheck@v0.8.2); skipping"
fi

step "unit and namespace tests (-race)"
# The store conformance suite runs against PostgreSQL too when one can be
# started here (root and Debian's postgresql package); external etcd runs
# in-process always.
if [ -z "${TRELLIS_TEST_POSTGRES_DSN:-}" ] && [ "$(id -u)" = 0 ] && compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  if dsn=$(scripts/start-postgres.sh 2>/tmp/trellis-postgres.log); then
    export TRELLIS_TEST_POSTGRES_DSN="$dsn"
    # Stop it at the end only if this run started it.
    grep -q 'already running' /tmp/trellis-postgres.log || trap 'scripts/start-postgres.sh stop' EXIT
  else
    echo "PostgreSQL did not start (/tmp/trellis-postgres.log); its conformance run is skipped"
  fi
fi
go test -race -count=1 -timeout 20m ./...

step "fuzzers (${FUZZTIME:-5s} each)"
for pkg in $(go list ./...); do
  for f in $(go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
    echo "--- $pkg $f"
    # A finding is written to testdata/fuzz and fails the run. On a loaded
    # machine Go's fuzzer sometimes ends with "context deadline exceeded"
    # and no input: that is the harness, not a finding, so run again once.
    if ! go test -run '^$' -fuzz "^${f}\$" -fuzztime "${FUZZTIME:-5s}" "$pkg" >/tmp/trellis-fuzz.log 2>&1; then
      if grep -q 'Failing input\|testdata/fuzz' /tmp/trellis-fuzz.log; then cat /tmp/trellis-fuzz.log; exit 1; fi
      echo "    (fuzzer ended without a finding; running it again)"
      go test -run '^$' -fuzz "^${f}\$" -fuzztime "${FUZZTIME:-5s}" "$pkg" >/tmp/trellis-fuzz.log 2>&1 || { cat /tmp/trellis-fuzz.log; exit 1; }
    fi
  done
done

if [ "${E2E:-1}" != 0 ]; then
  step "end-to-end tests in network namespaces"
  go test -tags e2e -count=1 -timeout 30m -v ./e2e/... 2>&1 | tee /tmp/trellis-e2e.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|e2e_|measured|took' || true
  if ! grep -q '^ok' /tmp/trellis-e2e.log || grep -q -- '--- FAIL' /tmp/trellis-e2e.log; then
    echo "end-to-end tests failed; full log:"; tail -200 /tmp/trellis-e2e.log; exit 1
  fi
fi
step "all tests passed"
