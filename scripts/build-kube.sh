#!/usr/bin/env bash
# Builds the Kubernetes binaries the e2e tests run (kube-apiserver,
# kube-controller-manager, kubelet, kubectl) and a single-member loopback
# etcd (etcdembed) from the separate module e2e/kube/tools, so that the
# product's go.mod never requires k8s.io/kubernetes. Cached between runs,
# keyed by the k8s.io/kubernetes version; etcdembed is rebuilt when its
# source changes.
#
#   scripts/build-kube.sh          # prints the directory of the binaries
#
# TRELLIS_KUBE_DIR overrides the cache directory (default
# ${XDG_CACHE_HOME:-~/.cache}/trellis-e2e/kube-v<version>). Cold on 2 cores:
# kube-apiserver ~10 min, kube-controller-manager +3, kubelet +3, kubectl +1
# (they share most packages); cached: under a second.
set -euo pipefail
tools="$(cd "$(dirname "$0")/../e2e/kube/tools" && pwd)"
version="$(awk '$1 == "k8s.io/kubernetes" { print $2 } $1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' "$tools/go.mod" | head -n1)"
[ -n "$version" ] || { echo "build-kube: no k8s.io/kubernetes version in $tools/go.mod" >&2; exit 1; }
dir="${TRELLIS_KUBE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trellis-e2e/kube-$version}"
mkdir -p "$dir"

log() { echo "build-kube: $*" >&2; }

short="${version#v}"
minor="${short#*.}"; minor="${minor%%.*}"
p=k8s.io/component-base/version
ldflags="-s -w -X $p.gitVersion=$version -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false"

for c in kube-apiserver kube-controller-manager kubelet kubectl; do
  [ -x "$dir/$c" ] && continue
  log "building $c $version into $dir (minutes when cold)"
  start=$(date +%s)
  (cd "$tools" && go build -trimpath -ldflags "$ldflags" -o "$dir/$c.new" "k8s.io/kubernetes/cmd/$c")
  mv "$dir/$c.new" "$dir/$c"
  log "built $c in $(( $(date +%s) - start ))s"
done

stamp="$(cat "$tools/go.sum" "$tools"/cmd/etcdembed/*.go | sha256sum | cut -c1-16)"
if [ ! -x "$dir/etcdembed" ] || [ "$(cat "$dir/etcdembed.stamp" 2>/dev/null)" != "$stamp" ]; then
  log "building etcdembed"
  (cd "$tools" && go build -trimpath -o "$dir/etcdembed.new" ./cmd/etcdembed)
  mv "$dir/etcdembed.new" "$dir/etcdembed"
  echo "$stamp" > "$dir/etcdembed.stamp"
fi
echo "$dir"
