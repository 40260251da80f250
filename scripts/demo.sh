#!/usr/bin/env bash
# The quick start: installs PostgreSQL's server binaries from the
# distribution when they are missing, builds walsafe, and runs `walsafe demo`
# (extra arguments are passed on, e.g. --dir /tmp/d --keep).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v pg_config >/dev/null 2>&1; then
    echo "==> installing PostgreSQL from the distribution"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
cargo build --release --locked --bin walsafe
exec target/release/walsafe demo "$@"
