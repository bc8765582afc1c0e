#!/usr/bin/env bash
# Fresh-machine set-up (what `make setup` runs): a venv with CPU PyTorch, the project and its
# dev tools, and the rustbpe extension.
#
#   PYTHON=python3 VENV=.venv TORCH_SPEC='torch==2.13.0' scripts/setup.sh
#
# Measured on a fresh 2-core box: pip took 113 s for the project's dependencies and 37 s for
# the local torch wheel, uv 9 s and 4 s, so uv (from PyPI, into the venv) installs where it
# can and pip is the fallback. pip still chooses the torch wheel: it reads the machine's pip
# config (local find-links, constraints), which uv ignores, and a bare torch from uv's view
# of PyPI is a multi-GB CUDA build. rustbpe compiles (cargo, ~40 s) meanwhile.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

step() { printf 'setup: %s (%ss)\n' "$1" "$SECONDS"; }

test -x "$VENV/bin/python" || { step "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
step "installing uv and maturin"
if "${PIP[@]}" uv 'maturin>=1.5,<2'; then
    INSTALL=("$VENV/bin/uv" pip install -q --python "$VENV/bin/python")
else
    echo "setup: uv unavailable, installing with pip (slower)"
    "${PIP[@]}" 'maturin>=1.5,<2'
    INSTALL=("${PIP[@]}")
fi

step "building rustbpe in the background (log: $VENV/rustbpe-build.log)"
VENV="$VENV" RUSTBPE_INSTALL=0 bash scripts/build_rustbpe.sh >"$VENV/rustbpe-build.log" 2>&1 &
build_pid=$!

# pip picks the torch wheel (honouring this machine's pip config), uv installs it with the rest.
step "fetching $TORCH_SPEC"
rm -rf "$VENV/torch-wheel"
"$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$VENV/torch-wheel" "$TORCH_SPEC"
step "installing torch, the project and its dev tools"
"${INSTALL[@]}" "$VENV"/torch-wheel/torch-*.whl -e '.[dev]'
rm -rf "$VENV/torch-wheel"

step "waiting for the rustbpe build"
if ! wait "$build_pid"; then
    cat "$VENV/rustbpe-build.log" >&2
    echo "setup: the rustbpe build failed (log above)" >&2
    exit 1
fi
"${INSTALL[@]}" --no-deps --force-reinstall rustbpe/target/wheels/rustbpe-*.whl
"$VENV/bin/python" -c "import rustbpe, torch; print('setup: torch', torch.__version__, '| rustbpe', rustbpe.__file__)"
step "done"
