#!/usr/bin/env bash
# Long fuzz run of walsafe's hostile-input properties: the same proptest
# properties the test suite runs with small case counts (tests/fuzz.rs: WAL
# pages, envelopes, chunk planning, conninfo, WAL file names; and the
# replication message decoder's in-module `fuzz_*` properties in
# src/pg/replication/wire.rs), here in the release profile with many cases.
#
# Usage: scripts/fuzz.sh [CASES_PER_PROPERTY]
#   CASES_PER_PROPERTY  default 100000 (or $PROPTEST_CASES); every property
#                       runs this many cases: 24 properties, so the
#                       default is 2.4 million cases in total: about 2
#                       minutes of cases on two cores after the release
#                       build (600000 per property, 14.4 million cases, took
#                       17 minutes). The 1 MiB segment properties are the
#                       slow ones.
#   PROPTEST_CASES      same as the argument (the argument wins).
#   FUZZ_THREADS        test threads (default 2).
#
# A failure prints proptest's minimal failing input; turn it into a plain
# #[test] next to the property (no seed files are persisted), fix the
# module, and run again. Random seeds differ on every run; set
# PROPTEST_RNG_SEED to repeat one.
set -euo pipefail
cd "$(dirname "$0")/.."

CASES="${1:-${PROPTEST_CASES:-100000}}"
export PROPTEST_CASES="$CASES"
export PROPTEST_MAX_SHRINK_ITERS="${PROPTEST_MAX_SHRINK_ITERS:-100000}"
export AWS_EC2_METADATA_DISABLED=true
THREADS="${FUZZ_THREADS:-2}"

echo "==> $CASES cases per property (release build)"
start=$(date +%s)
cargo test --release --locked --test fuzz -- --test-threads="$THREADS"
cargo test --release --locked --lib fuzz_ -- --test-threads="$THREADS"
echo "==> done in $(( $(date +%s) - start )) s, $CASES cases per property"
