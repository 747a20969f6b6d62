#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster on 127.0.0.1 for the store
# conformance suite (Debian's postgresql package: apt-get install
# postgresql). Prints the DSN to use as TRELLIS_TEST_POSTGRES_DSN on stdout;
# everything else goes to stderr. The cluster lives in a temporary
# directory; stop it with scripts/start-postgres.sh stop.
#
#   PGPORT=55432   the port (default 55432)
set -euo pipefail
port="${PGPORT:-55432}"
state=/tmp/trellis-test-postgres
if [ "${1:-}" = stop ]; then
  if [ -f "$state/dir" ]; then
    dir=$(cat "$state/dir")
    pg_bin=$(cat "$state/bin")
    su postgres -s /bin/sh -c "'$pg_bin/pg_ctl' -D '$dir/data' -m fast stop" >&2 || true
    rm -rf "$dir" "$state"
  fi
  exit 0
fi
pg_bin=""
for d in /usr/lib/postgresql/*/bin; do
  [ -x "$d/initdb" ] && pg_bin="$d"
done
if [ -z "$pg_bin" ]; then
  echo "start-postgres: PostgreSQL is not installed (apt-get install postgresql)" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ] && [ "$(id -un)" != postgres ]; then
  echo "start-postgres: run as root (the cluster runs as the postgres user)" >&2
  exit 1
fi
dsn="postgres://trellis:trellis@127.0.0.1:${port}/trellis_test?sslmode=disable"
if pg_isready -q -h 127.0.0.1 -p "$port" 2>/dev/null; then
  echo "start-postgres: already running on port $port" >&2
  echo "$dsn"
  exit 0
fi
dir=$(mktemp -d /tmp/trellis-pg.XXXXXX)
chown postgres: "$dir"
mkdir -p "$state"
echo "$dir" >"$state/dir"
echo "$pg_bin" >"$state/bin"
as_pg() { su postgres -s /bin/sh -c "$*"; }
as_pg "'$pg_bin/initdb' -D '$dir/data' -A trust -U postgres" >&2
as_pg "'$pg_bin/pg_ctl' -D '$dir/data' -l '$dir/log' -w -o \"-c listen_addresses=127.0.0.1 -p $port -k '$dir' -c fsync=off\" start" >&2
psql -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 -q >&2 <<SQL
CREATE ROLE trellis LOGIN PASSWORD 'trellis';
CREATE DATABASE trellis_test OWNER trellis;
SQL
echo "$dsn"
