# Trellis: `make run` starts a single-node server on the embedded defaults,
# `make test` runs every test (as root for the namespace tests).
GO ?= go
BIN := bin/trellis

.PHONY: build run test unit e2e bench chaos clean

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN) ./cmd/trellis

run: build
	./$(BIN) server

test:
	./scripts/test.sh

unit:
	E2E=0 FUZZTIME=1s ./scripts/test.sh

e2e:
	$(GO) test -tags e2e -count=1 -v ./e2e/...

# Every benchmark, with progress, results in docs/bench (docs/benchmarks.md).
bench:
	./scripts/bench.sh

# The chaos soak: 30 minutes of overlapping faults with a random seed
# (TRELLIS_CHAOS_SEED, TRELLIS_CHAOS_DURATION override), report in
# docs/chaos/. `make test` runs a short fixed-seed run of it.
chaos:
	./scripts/chaos.sh

clean:
	rm -rf bin
