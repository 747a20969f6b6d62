#!/bin/sh
# Runs every Trellis benchmark on this machine and writes the results to
# $OUT (default docs/bench): machine.md, dataplane.md, join.md,
# convergence.log, loadgen.{json,md,png}, kube/loadgen.{json,md,png}.
# Needs root (network namespaces)
# for the data plane and convergence parts; iperf3, wg and ethtool.
#
#   make bench                          # everything (about 30-60 minutes)
#   BENCH_AGENTS=100,1000 make bench    # smaller control-plane runs
#   BENCH_WHOLE= make bench             # skip the whole-netmap comparison runs
#   BENCH_KUBE=100 make bench           # agents of the Kubernetes-mode run (default 1000)
#   BENCH_ONLY=loadgen make bench       # one part: machine, dataplane, join, convergence, loadgen, kube
set -eu
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench}
AGENTS=${BENCH_AGENTS:-100,1000,5000}
WHOLE=${BENCH_WHOLE-100,1000} # also run with whole netmaps (as before deltas), to compare; empty: none
KUBE=${BENCH_KUBE:-1000}
ONLY=${BENCH_ONLY:-}
mkdir -p "$OUT" bin
OUT=$(cd "$OUT" && pwd)
step() { printf '\n==> %s  (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

step "build bin/trellis and bin/trellis-loadgen"
CGO_ENABLED=0 go build -trimpath -o bin/trellis ./cmd/trellis
go build -o bin/trellis-loadgen ./cmd/trellis-loadgen

if want machine; then
	step "machine -> $OUT/machine.md"
	{
		echo "| | |"
		echo "|---|---|"
		echo "| CPU | $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs |"
		echo "| memory | $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) |"
		echo "| kernel | $(uname -sr) |"
		echo "| Go | $(go version | cut -d' ' -f3-) |"
		echo "| iperf3 | $(iperf3 --version 2>/dev/null | head -1 | cut -d' ' -f1-2) |"
		echo "| commit | $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with local changes)') |"
		echo "| date | $(date -u +%Y-%m-%dT%H:%MZ) |"
	} >"$OUT/machine.md"
	cat "$OUT/machine.md"
fi

export TRELLIS_BENCH=1 TRELLIS_BENCH_OUT="$OUT" TRELLIS_E2E_BINARY="$PWD/bin/trellis"
if want dataplane; then
	step "data plane: raw veth, wireguard-go daemon (node and pod to pod), Trellis (node and pod to pod), 5 rounds (iperf3, ping, CPU per GB) -> $OUT/dataplane.md"
	go test -tags e2e -count=1 -timeout 20m -run '^TestBenchDataPlane$' -v ./e2e 2>&1 | grep -E '^\s*(bench_test.go|reference daemon|---|ok|FAIL|PASS)' || true
	cat "$OUT/dataplane.md"
fi
if want join; then
	step "convergence: ${TRELLIS_BENCH_NODES:-20}-node join -> first packet to every peer -> $OUT/join.md"
	go test -tags e2e -count=1 -timeout 20m -run '^TestBenchJoin$' -v ./e2e 2>&1 | grep -E '^\s*(---|ok|FAIL|PASS)' || true
	cat "$OUT/join.md"
fi
if want convergence; then
	step "convergence: what the e2e tests measure (3-node join, restarts, IP change, relay loss, delete, server loss) -> $OUT/convergence.log"
	go test -tags e2e -count=1 -timeout 20m -run '^(TestMulticloudMesh|TestNATRelaysAndDynamicIPs|TestHAServers)$' -v ./e2e >"$OUT/e2e.log" 2>&1 || echo "(some e2e tests failed; see $OUT/e2e.log)"
	grep -E 'measured:|removed .* peer|→ .* [0-9.]+s$|^\s*(first start|agent restart|server restart|join \(4th node\))' "$OUT/e2e.log" | sed 's/^ *//' >"$OUT/convergence.log" || true
	rm -f "$OUT/e2e.log"
	cat "$OUT/convergence.log"
fi
if want loadgen; then
	step "control plane: $AGENTS virtual agents against one server (deltas), $WHOLE again with whole netmaps -> $OUT/loadgen.{json,md,png}"
	bin/trellis-loadgen -trellis bin/trellis -agents "$AGENTS" -whole "$WHOLE" -phase-timeout 10m -out "$OUT"
fi
if want kube; then
	step "control plane in Kubernetes mode: $KUBE agents without Kubernetes, then $KUBE with their Nodes in a real kube-apiserver (created through the API, then 3 deleted) -> $OUT/kube/loadgen.{json,md,png}"
	# The Kubernetes binaries as the tests use them (built and cached by
	# version on first use: about 20 minutes).
	TRELLIS_KUBE_DIR=${TRELLIS_KUBE_DIR:-$(scripts/build-kube.sh)}
	export TRELLIS_KUBE_DIR TRELLIS_REQUIRE_KUBE=1
	if TRELLIS_LOADGEN_KUBE_AGENTS="$KUBE" TRELLIS_LOADGEN_OUT="$OUT/kube" \
		go test -count=1 -timeout 60m -run '^TestKubeMode$' -v ./cmd/trellis-loadgen; then
		cat "$OUT/kube/loadgen.md"
	else
		echo "(the Kubernetes-mode run failed; see above)"
	fi
fi
step "done: results in $OUT"
