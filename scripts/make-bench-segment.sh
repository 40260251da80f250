#!/usr/bin/env bash
# Makes a real 16 MiB WAL segment for benches/envelope.rs.
#
# Starts a throwaway PostgreSQL (as the postgres user when run as root) on
# 127.0.0.1 and a free port with its socket in a temp dir, loads pgbench
# at scale 20, runs pgbench transactions, and copies a complete segment
# written during the transactions (the realistic mix of heap/index records
# and full-page images) to target/bench-wal-segment (or $1).
#
# Usage: scripts/make-bench-segment.sh [OUTPUT]
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/target/bench-wal-segment}"

bindir="$(pg_config --bindir 2>/dev/null || true)"
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
fi
[ -x "$bindir/initdb" ] || { echo "no PostgreSQL binaries found (pg_config or /usr/lib/postgresql/*/bin)" >&2; exit 1; }

work="$(mktemp -d /tmp/walsafe-bench-XXXXXX)"
run() { "$@"; }
if [ "$(id -u)" = 0 ]; then
    chown postgres: "$work"
    run() { runuser -u postgres -- "$@"; }
fi
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

cleanup() {
    run "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

run "$bindir/initdb" -D "$work/data" -U postgres --no-sync >/dev/null
mkdir -p "$work/sock" && { [ "$(id -u)" != 0 ] || chown postgres: "$work/sock"; }
cat >>"$work/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$work/sock'
fsync = off
max_wal_size = 4GB
wal_keep_size = 4GB
checkpoint_timeout = 1h
EOF
run "$bindir/pg_ctl" -D "$work/data" -l "$work/server.log" -w start >/dev/null

pg() { run "$@" -h "$work/sock" -p "$port" -U postgres; }
pg "$bindir/pgbench" -i -s 20 -q postgres >/dev/null 2>&1
pg "$bindir/psql" -qAt -c "CHECKPOINT" postgres >/dev/null
first="$(pg "$bindir/psql" -qAt -c "SELECT pg_walfile_name(pg_current_wal_lsn())" postgres)"
pg "$bindir/pgbench" -c 4 -j 2 -T 20 postgres >/dev/null 2>&1
last="$(pg "$bindir/psql" -qAt -c "SELECT pg_walfile_name(pg_current_wal_lsn())" postgres)"
pg "$bindir/psql" -qAt -c "SELECT pg_switch_wal()" postgres >/dev/null

# A complete segment strictly after the checkpoint's and before the current one.
pick="$(ls "$work/data/pg_wal" | grep -E '^[0-9A-F]{24}$' | sort | awk -v a="$first" -v b="$last" '$0 > a && $0 < b' | tail -n2 | head -n1)"
[ -n "$pick" ] || { echo "pgbench wrote less than two segments between $first and $last" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
cp "$work/data/pg_wal/$pick" "$out"
echo "wrote $out (segment $pick, $(stat -c %s "$out") bytes)"
