#!/usr/bin/env bash
# Installs trellis and its systemd unit on this machine.
#
#   scripts/install.sh server            # or: agent
#   BIN=bin/trellis PREFIX=/usr/local scripts/install.sh agent
#
# It copies the binary to $PREFIX/bin, the unit to /etc/systemd/system,
# creates /etc/trellis and an empty /etc/default/trellis-<role>, reloads
# systemd and enables the unit. It does not start it: write the settings
# first (docs/install.md), then `systemctl start trellis-<role>`.
# Uninstall: systemctl disable --now trellis-<role>; trellis cleanup;
# rm the binary and the unit.
set -euo pipefail
role="${1:-}"
case "$role" in
  server|agent) ;;
  *) echo "usage: $0 server|agent" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${BIN:-$root/bin/trellis}"
prefix="${PREFIX:-/usr/local}"
unitdir="${UNITDIR:-/etc/systemd/system}"
etc="${ETCDIR:-/etc}"
if [ ! -x "$bin" ]; then
  echo "install: $bin does not exist; build it first with 'make build' (or set BIN=)" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ] && [ -z "${DESTDIR:-}" ]; then
  echo "install: run as root (it writes $prefix/bin and $unitdir)" >&2
  exit 1
fi
d="${DESTDIR:-}"
install -D -m 0755 "$bin" "$d$prefix/bin/trellis"
unit="$root/deploy/systemd/trellis-$role.service"
if [ "$prefix" != /usr/local ]; then
  sed "s#/usr/local/bin/trellis#$prefix/bin/trellis#" "$unit" > "$d$unitdir/trellis-$role.service.tmp"
  install -D -m 0644 "$d$unitdir/trellis-$role.service.tmp" "$d$unitdir/trellis-$role.service"
  rm -f "$d$unitdir/trellis-$role.service.tmp"
else
  install -D -m 0644 "$unit" "$d$unitdir/trellis-$role.service"
fi
install -d -m 0755 "$d$etc/trellis" "$d$etc/trellis/config.yaml.d"
[ -e "$d$etc/default/trellis-$role" ] || install -D -m 0600 /dev/null "$d$etc/default/trellis-$role"
if [ -z "$d" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable "trellis-$role.service"
fi
echo "installed trellis $role: $d$prefix/bin/trellis, $d$unitdir/trellis-$role.service"
echo "next: write $etc/trellis/config.yaml (see docs/install.md), then: systemctl start trellis-$role"
