#!/usr/bin/env bash
# Builds the Debian package, target/debian/walsafe_<version>-1_<arch>.deb:
# the release binary (no debug info), a man page per command and shell
# completions generated from the command-line definitions, the systemd
# units of systemd/ and their templates walsafe@NAME (one per cluster,
# reading /etc/walsafe/NAME.toml), the annotated /etc/walsafe/walsafe.toml.
# Installs cargo-deb when it is missing.
#
# Usage: scripts/package.sh
#   WALSAFE_DEB_BINARY=target/debug/walsafe scripts/package.sh
#   packages that binary instead of building one (tests/package.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "==> installing cargo-deb"
    cargo install --locked cargo-deb
fi
if [ -n "${WALSAFE_DEB_BINARY:-}" ]; then
    profile=package-test
    mkdir -p "target/$profile"
    cp "$WALSAFE_DEB_BINARY" "target/$profile/walsafe"
else
    profile=release
    cargo build --locked --release --bin walsafe
fi
bin="target/$profile/walsafe"

assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/systemd"
"$bin" generate-assets "$assets"
gzip -9n "$assets"/man/*.1

# The package's binary is /usr/bin/walsafe. Each unit also becomes a
# template, NAME being the cluster: its config /etc/walsafe/NAME.toml, its
# credentials /etc/walsafe/NAME.env, its state /var/lib/walsafe/NAME, and
# the units it follows of the same NAME.
for unit in systemd/*.service systemd/*.timer; do
    base="$(basename "$unit")"
    stem="${base%.*}"
    ext="${base##*.}"
    sed 's#/usr/local/bin/walsafe#/usr/bin/walsafe#g' "$unit" >"$assets/systemd/$base"
    {
        echo "# Template of $base for one cluster of several: NAME (%i) reads"
        echo "# /etc/walsafe/NAME.toml. systemctl enable --now $stem@NAME.$ext"
        sed -e 's#/usr/local/bin/walsafe#/usr/bin/walsafe#g' \
            -e 's#/etc/walsafe/walsafe\.toml#/etc/walsafe/%i.toml#g' \
            -e 's#/etc/walsafe/walsafe\.env#/etc/walsafe/%i.env#g' \
            -e 's#^StateDirectory=walsafe$#StateDirectory=walsafe/%i#' \
            -e 's#^\(Description=.*\)$#\1 (%i)#' \
            -e '/^After=/s#\(walsafe[a-z-]*\)\.service#\1@%i.service#g' \
            "$unit"
    } >"$assets/systemd/$stem@.$ext"
done

cargo deb --no-build --profile "$profile" --output target/debian/
