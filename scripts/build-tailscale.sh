#!/usr/bin/env bash
# Builds tailscaled, tailscale and tsctl (an offline control server on
# tailscale.com/tstest/integration/testcontrol) for the e2e tests, from the
# separate module e2e/tailscale/tools, so that the product's go.mod never
# requires tailscale.com. The binaries are cached between runs, keyed by the
# tailscale.com version; tsctl is rebuilt when its source changes.
#
#   scripts/build-tailscale.sh          # prints the directory of the binaries
#
# TRELLIS_TAILSCALE_DIR overrides the cache directory (default
# ${XDG_CACHE_HOME:-~/.cache}/trellis-e2e/tailscale-v<version>). A cold build
# takes about 3-15 minutes on 2 cores; a cached one under a second.
set -euo pipefail
tools="$(cd "$(dirname "$0")/../e2e/tailscale/tools" && pwd)"
version="$(awk '$1 == "require" && $2 == "tailscale.com" { print $3 } $1 == "tailscale.com" { print $2 }' "$tools/go.mod" | head -n1)"
[ -n "$version" ] || { echo "build-tailscale: no tailscale.com version in $tools/go.mod" >&2; exit 1; }
dir="${TRELLIS_TAILSCALE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trellis-e2e/tailscale-$version}"
mkdir -p "$dir"

log() { echo "build-tailscale: $*" >&2; }

if [ ! -x "$dir/tailscaled" ] || [ ! -x "$dir/tailscale" ]; then
  log "building tailscaled and tailscale $version into $dir (minutes when cold)"
  start=$(date +%s)
  short="${version#v}"
  (cd "$tools" && go build -trimpath \
    -ldflags "-X tailscale.com/version.longStamp=$short -X tailscale.com/version.shortStamp=$short" \
    -o "$dir/.new/" tailscale.com/cmd/tailscaled tailscale.com/cmd/tailscale)
  mv "$dir/.new/tailscaled" "$dir/.new/tailscale" "$dir/"
  rmdir "$dir/.new"
  log "built in $(( $(date +%s) - start ))s"
fi

stamp="$(cat "$tools/go.sum" "$tools"/tsctl/*.go | sha256sum | cut -c1-16)"
if [ ! -x "$dir/tsctl" ] || [ "$(cat "$dir/tsctl.stamp" 2>/dev/null)" != "$stamp" ]; then
  log "building tsctl"
  (cd "$tools" && go build -trimpath -o "$dir/tsctl.new" ./tsctl)
  mv "$dir/tsctl.new" "$dir/tsctl"
  echo "$stamp" > "$dir/tsctl.stamp"
fi
echo "$dir"
