#!/usr/bin/env bash
# Soak: the chaos test (tests/chaos.rs) for minutes instead of seconds, in
# a release build, with one long storage outage under load midway. Prints
# each fault as it happens and the per-fault table at the end (also kept in
# target/soak-<seed>.log).
#
#   scripts/soak.sh                      # 10 minutes, storage down 150 s once
#   WALSAFE_CHAOS_SECS=300 scripts/soak.sh
#   WALSAFE_CHAOS_SEED=1234 scripts/soak.sh   # replay a run
#
# Needs what scripts/test.sh installs (PostgreSQL, moto); run that once first.
set -euo pipefail
cd "$(dirname "$0")/.."

export WALSAFE_CHAOS_SECS="${WALSAFE_CHAOS_SECS:-600}"
export WALSAFE_CHAOS_LONG_OUTAGE_SECS="${WALSAFE_CHAOS_LONG_OUTAGE_SECS:-150}"
export WALSAFE_CHAOS_SEED="${WALSAFE_CHAOS_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"
# Tests talk to loopback only; never let a cloud SDK look for credentials elsewhere.
export AWS_EC2_METADATA_DISABLED=true

mkdir -p target
log="target/soak-$WALSAFE_CHAOS_SEED.log"
echo "==> soak: ${WALSAFE_CHAOS_SECS} s of faults, long outage ${WALSAFE_CHAOS_LONG_OUTAGE_SECS} s, seed $WALSAFE_CHAOS_SEED (log: $log)"
# cargo test rather than nextest: no per-test timeout to stretch.
set +e
cargo test --release --locked --test chaos -- --nocapture 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo
echo "==> soak report (seed $WALSAFE_CHAOS_SEED)"
sed -n '/^=== chaos report ===/,/^$/p' "$log"
grep -E '^chaos: (seed|restore|[0-9]+ complete)' "$log" || true
exit "$status"
