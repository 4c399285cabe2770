#!/usr/bin/env bash
# tools/setup.sh — installs what building and testing conmim needs. Idempotent, and
# quick (well under a second) when everything is already there.
#
#   1. Debian packages: build-essential pkg-config cmake nasm libgloo-dev (the gloo
#      headers the c10d shim compiles against; apt-get, only if missing);
#   2. a Rust toolchain: checks that cargo is there (it does not install rustup);
#   3. the Python venv $CONMIM_VENV (tools/env.sh) with tools/requirements.txt;
#      pip runs only when the stamp file in the venv does not match that file.
#
# Environment:
#   CONMIM_VENV=DIR        where the venv goes (default: see tools/env.sh)
#   CONMIM_SKIP_TORCH=1    install everything but torch and its dependencies
#   CONMIM_BASE_PYTHON=PY  interpreter the venv is made from (default: python3)
#
# Run it as a program: it exports nothing. Scripts that need the venv source
# tools/env.sh. It writes nothing into the checkout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tools/env.sh
source "$here/env.sh"

log() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

# --- 1. Debian packages -------------------------------------------------------------
apt_packages=(build-essential pkg-config cmake nasm libgloo-dev)
if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for p in "${apt_packages[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]})); then
        command -v apt-get >/dev/null 2>&1 || die "missing packages ${missing[*]} and no apt-get"
        sudo=()
        if [ "$(id -u)" -ne 0 ]; then
            command -v sudo >/dev/null 2>&1 || die "missing packages ${missing[*]}; run as root or install sudo"
            sudo=(sudo)
        fi
        log "installing Debian packages: ${missing[*]}"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}"
    fi
else
    # Not Debian: just say what is missing.
    for tool in cc pkg-config cmake nasm; do
        command -v "$tool" >/dev/null 2>&1 || log "warning: '$tool' not found (install it with your package manager)"
    done
fi

# --- 2. Rust --------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    die "cargo not found. Install Rust with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    source \"\$HOME/.cargo/env\"
then run $0 again."
fi
# edition 2024 needs Rust 1.85.
rustc_version="$(rustc --version 2>/dev/null | awk '{print $2}')"
IFS=. read -r rmaj rmin _ <<<"${rustc_version:-0.0.0}"
if ((rmaj < 1 || (rmaj == 1 && rmin < 85))); then
    die "rustc ${rustc_version:-?} is too old: this crate (edition 2024) needs 1.85 or newer; run 'rustup update stable'"
fi

# --- 3. Python venv -------------------------------------------------------------------
req="$here/requirements.txt"
[ -f "$req" ] || die "$req is missing"
grep -Eq "^torch==${CONMIM_TORCH_VERSION//./\\.}([[:space:]]|$)" "$req" \
    || die "tools/requirements.txt does not pin torch==$CONMIM_TORCH_VERSION (CONMIM_TORCH_VERSION in tools/env.sh)"

req_hash="$(sha256sum "$req" | awk '{print $1}')"
want="torch"
[ "${CONMIM_SKIP_TORCH:-0}" = 1 ] && want="notorch"
stamp="$CONMIM_VENV/.conmim-requirements.sha256"

# The venv is up to date when its interpreter runs and the stamp names this
# requirements file, with torch unless torch is skipped (a full venv serves both).
venv_ok() {
    [ -f "$stamp" ] && "$CONMIM_PYTHON" -c '' >/dev/null 2>&1 || return 1
    local h t
    read -r h t <"$stamp" || return 1
    [ "$h" = "$req_hash" ] && { [ "$t" = torch ] || [ "$want" = notorch ]; }
}

if ! venv_ok; then
    mkdir -p "$(dirname "$CONMIM_VENV")"
    # Another checkout may be setting up the same shared venv: take turns.
    exec 9>"$CONMIM_VENV.lock"
    if command -v flock >/dev/null 2>&1; then flock 9; fi
    if ! venv_ok; then
        base_python="${CONMIM_BASE_PYTHON:-python3}"
        command -v "$base_python" >/dev/null 2>&1 || die "$base_python not found (need Python 3.11 or newer)"
        "$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || die "$base_python is $("$base_python" --version 2>&1); need Python 3.11 or newer"
        if ! "$CONMIM_PYTHON" -c '' >/dev/null 2>&1; then
            log "creating venv $CONMIM_VENV"
            rm -rf "$CONMIM_VENV"
            "$base_python" -m venv "$CONMIM_VENV"
        fi
        rm -f "$stamp"
        tmp_req="$(mktemp "${TMPDIR:-/tmp}/conmim-requirements.XXXXXX")"
        trap 'rm -f "$tmp_req"' EXIT
        if [ "$want" = torch ]; then
            cp "$req" "$tmp_req"
            log "installing tools/requirements.txt with torch $CONMIM_TORCH_VERSION (into a new venv: ~3 GB download, a few minutes)"
        else
            grep -v '#[[:space:]]*\[torch\]' "$req" >"$tmp_req"
            log "installing tools/requirements.txt without torch (CONMIM_SKIP_TORCH=1)"
        fi
        t0=$SECONDS
        # --no-cache-dir: pip's cache would keep a second copy of the ~3 GB of wheels.
        "$CONMIM_PYTHON" -m pip install --disable-pip-version-check --no-input --progress-bar off \
            --no-cache-dir -r "$tmp_req"
        echo "$req_hash $want" >"$stamp"
        log "pip done in $((SECONDS - t0))s"
    fi
    exec 9>&-
fi

log "python: $CONMIM_PYTHON"
