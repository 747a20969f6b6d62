#!/usr/bin/env bash
# The chaos soak (issue 19): TestChaos with a random seed (or
# TRELLIS_CHAOS_SEED) for TRELLIS_CHAOS_DURATION (default 30m), as root.
# TRELLIS_CHAOS_GAP (default 8s) is the mean time between two faults.
# The report goes to docs/chaos/<date>-<seed>.md; the seed is the first
# line printed, and the logs of a failing run are in e2e/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seed="${TRELLIS_CHAOS_SEED:-$(( (RANDOM << 15 | RANDOM) % 1000000 ))}"
duration="${TRELLIS_CHAOS_DURATION:-30m}"
echo "chaos seed $seed (replay: TRELLIS_CHAOS_SEED=$seed TRELLIS_CHAOS_DURATION=$duration TRELLIS_CHAOS_GAP=${TRELLIS_CHAOS_GAP:-8s} make chaos)"
mkdir -p docs/chaos
report="$PWD/docs/chaos/$(date -u +%Y%m%d-%H%M)-$seed.md"
TRELLIS_CHAOS_SEED="$seed" TRELLIS_CHAOS_DURATION="$duration" TRELLIS_CHAOS_REPORT="$report" \
  go test -tags e2e -count=1 -timeout 0 -run '^TestChaos$' -v ./e2e/ 2>&1 | tee /tmp/trellis-chaos.log \
  | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|chaos:|measured' || true
echo "report: $report"
grep -q -- '--- PASS: TestChaos' /tmp/trellis-chaos.log
