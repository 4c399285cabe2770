# shellcheck shell=bash
# tools/env.sh — sourced (not run) by the project's scripts: where the Python venv
# that tools/setup.sh makes lives, and how to reach cargo.
#
#   CONMIM_VENV    the venv; default ~/.cache/conmim/venv-torch<version>, keyed by the
#                  torch version so every checkout on a machine shares one (override
#                  it to put the venv elsewhere)
#   CONMIM_PYTHON  its interpreter; the Rust test harness runs
#                  `$CONMIM_PYTHON tests/python/check_dataset.py DIR SPLIT`
#
# Safe to source more than once and under `set -euo pipefail`.

# Must match the torch pin in tools/requirements.txt (tools/setup.sh checks it).
CONMIM_TORCH_VERSION=2.11.0
export CONMIM_VENV="${CONMIM_VENV:-$HOME/.cache/conmim/venv-torch$CONMIM_TORCH_VERSION}"
export CONMIM_PYTHON="$CONMIM_VENV/bin/python"

# rustup installs into ~/.cargo/bin, which a non-login shell may not have on PATH.
if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
