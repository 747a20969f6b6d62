#!/usr/bin/env bash
# Builds headscale (the self-hosted Tailscale control server) for the e2e
# tests, from its own Go module on the module proxy. The binaries are cached
# between runs, keyed by version:
#
#   scripts/build-headscale.sh          # prints the cache root; each version in
#                                       # <root>/headscale-<version>/headscale
#
# HEADSCALE_VERSIONS (space separated, default "v0.27.1") chooses the
# versions; TRELLIS_HEADSCALE_DIR overrides the cache root (default
# ${XDG_CACHE_HOME:-~/.cache}/trellis-e2e). A cold build of v0.27.1 takes
# about 7 minutes on 2 cores (another version then about 4); a cached one
# under a second.
#
# A plain `go install github.com/juanfont/headscale/cmd/headscale@vX` fails
# on this kind of proxy twice over: it asks for the module's version list to
# check for deprecation (the proxy may refuse @v/list), and it verifies every
# dependency against the checksum database (which 404s for some of v0.28.0's
# pseudo-versions although headscale's go.sum has them). So: download the
# exact version (that writes @v/list into the module cache), download its
# dependencies from a copy of its source tree (verified against headscale's
# own go.sum), then `go install` with the module cache as the first GOPROXY
# and GOSUMDB=off for that one step (everything it needs is already in the
# cache, verified by the step before). The result is version-stamped.
set -euo pipefail
root="${TRELLIS_HEADSCALE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trellis-e2e}"
versions="${HEADSCALE_VERSIONS:-v0.27.1}"

log() { echo "build-headscale: $*" >&2; }

for v in $versions; do
  dir="$root/headscale-$v"
  [ -x "$dir/headscale" ] && continue
  log "building headscale $v into $dir (minutes when cold)"
  start=$(date +%s)
  mkdir -p "$dir"
  tmp="$(mktemp -d)"
  trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
  cache="$(go env GOMODCACHE)/cache/download"
  src="$(go mod download -json "github.com/juanfont/headscale@$v" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [ -d "$src" ] || { log "go mod download github.com/juanfont/headscale@$v gave no source directory"; exit 1; }
  cp -r "$src" "$tmp/src" && chmod -R u+w "$tmp/src"
  (cd "$tmp/src" && go list -deps ./cmd/headscale >/dev/null)
  GOPROXY="file://$cache,$(go env GOPROXY)" GOSUMDB=off GOBIN="$tmp/bin" \
    go install "github.com/juanfont/headscale/cmd/headscale@$v"
  mv "$tmp/bin/headscale" "$dir/headscale"
  chmod -R u+w "$tmp"; rm -rf "$tmp"; trap - EXIT
  log "headscale $v built in $(( $(date +%s) - start ))s"
done
echo "$root"
