#!/usr/bin/env bash
# Build the rustbpe extension (rustbpe/) into a virtualenv with maturin.
#
#   scripts/build_rustbpe.sh                     # into $VENV, default ./.venv
#   RUSTBPE_OFFLINE=1 scripts/build_rustbpe.sh   # skip the network probe, build offline
#   RUSTBPE_INSTALL=0 scripts/build_rustbpe.sh   # only build the wheel (rustbpe/target/wheels)
#
# Online (crates.io reachable): `maturin build --release` from crates.io, then the wheel is
# installed into the venv (what `maturin develop --release` does, split in two so that
# scripts/setup.sh can compile while the Python dependencies install).
# Offline: the crates come from Debian's `librust-*-dev` packages (apt-get installs them when
# missing) through a cargo source replacement in a build-only CARGO_HOME under rustbpe/target/
# (ignored), so nothing offline-specific lands in tracked files or ~/.cargo: the same
# rustbpe/Cargo.toml builds from crates.io anywhere else.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${VENV:-$ROOT/.venv}" && pwd)"
MANIFEST="$ROOT/rustbpe/Cargo.toml"
DEBIAN_REGISTRY=/usr/share/cargo/registry
LOCK="$ROOT/rustbpe/Cargo.lock"
# What Debian writes as checksum for crates it could not checksum (pyo3*), thus into the lock.
DEBIAN_CHECKSUM="Could not get crate checksum"
# The Debian packages of the direct dependencies; apt pulls in the rest of the tree.
DEBIAN_CRATES=(librust-pyo3-dev librust-fancy-regex-dev librust-regex-dev librust-rayon-dev librust-ahash-dev)

command -v cargo >/dev/null || { echo "build_rustbpe: cargo not found (install Rust, e.g. rustup)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || { echo "build_rustbpe: no virtualenv at $VENV" >&2; exit 1; }
MATURIN="$VENV/bin/maturin"
[ -x "$MATURIN" ] || { echo "build_rustbpe: maturin missing in $VENV (pip install 'maturin>=1.5,<2')" >&2; exit 1; }

crates_io_reachable() {
    # The sparse index serves a tiny JSON file; 5 s is plenty where the network works.
    if command -v curl >/dev/null; then
        curl -fsS -m 5 -o /dev/null https://index.crates.io/config.json 2>/dev/null
    else
        "$VENV/bin/python" -c 'import urllib.request as u; u.urlopen("https://index.crates.io/config.json", timeout=5)' 2>/dev/null
    fi
}

if [ "${RUSTBPE_OFFLINE:-}" = 1 ] || ! crates_io_reachable; then
    echo "build_rustbpe: crates.io unreachable, building from Debian's crates in $DEBIAN_REGISTRY"
    missing=()
    for pkg in "${DEBIAN_CRATES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        SUDO=""
        [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    # maturin does not forward cargo's `--config` to its own `cargo metadata` call, hence a
    # throw-away CARGO_HOME (rustup finds its toolchains through RUSTUP_HOME, unaffected).
    export CARGO_HOME="$ROOT/rustbpe/target/offline-cargo-home"
    mkdir -p "$CARGO_HOME"
    cat >"$CARGO_HOME/config.toml" <<EOF
[source.crates-io]
replace-with = "debian-packages"

[source.debian-packages]
directory = "$DEBIAN_REGISTRY"

[net]
offline = true
EOF
    # A lock resolved elsewhere may name versions this Debian lacks: resolve afresh (on the
    # same Debian release this rewrites an identical file).
    rm -f "$LOCK"
elif [ -f "$LOCK" ] && grep -q "$DEBIAN_CHECKSUM" "$LOCK"; then
    # Resolved from Debian's registry, whose pyo3 has no real checksum: crates.io would
    # reject it, so resolve afresh online.
    rm -f "$LOCK"
fi

cd "$ROOT"
WHEELS="$ROOT/rustbpe/target/wheels"
rm -rf "$WHEELS"
"$MATURIN" build --release --quiet --manifest-path "$MANIFEST" --interpreter "$VENV/bin/python" --out "$WHEELS"
[ "${RUSTBPE_INSTALL:-1}" = 0 ] && exit 0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$WHEELS"/rustbpe-*.whl
"$VENV/bin/python" -c "import rustbpe; print('build_rustbpe: ok', rustbpe.__file__)"
