#!/usr/bin/env bash
# tools/run-tests.sh — set up (tools/setup.sh), then run the whole test suite:
#   cargo test --all-targets [ARGS...], then the `train` feature against libtorch
# The Rust integration tests run $CONMIM_PYTHON tests/python/check_dataset.py, so the
# venv comes first. Extra arguments go to cargo test (e.g. `-- --nocapture`).
# Exits non-zero when a phase fails; prints how long each phase took.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

timings=()
phase() {
    local name="$1"; shift
    local t0=$SECONDS rc=0
    echo "==> $name"
    "$@" || rc=$?
    local dt=$((SECONDS - t0))
    timings+=("$(printf '%-8s %5ds  %s' "$name" "$dt" "$([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)")")")
    echo "==> $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in ${dt}s"
    if [ $rc -ne 0 ]; then
        summary
        exit "$rc"
    fi
}
summary() {
    echo "==> phase times:"
    printf '    %s\n' "${timings[@]}"
}

# A first build needs about 2 GB under target/ (and the venv 5 GB): say so up front
# when the disk is short, since running out shows only as a linker crash.
free_kb=$(df -Pk . 2>/dev/null | awk 'NR==2 {print $4}')
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((4 * 1024 * 1024)) ]; then
    echo "==> warning: only $((free_kb / 1024)) MB free on this disk; a first build needs ~2 GB in target/ (and ~5 GB for the venv)" >&2
fi
phase setup bash tools/setup.sh
# shellcheck source=tools/env.sh
source tools/env.sh
echo "==> CONMIM_PYTHON=$CONMIM_PYTHON"
phase test cargo test --all-targets "$@"
# The GPU side (feature `train`) links libtorch from the venv's PyPI torch; this checks
# that it builds, links (rpath) and computes, CPU-only. Skipped with CONMIM_SKIP_TORCH=1.
# One test at a time: libtorch's random generator is process-global, and a test that
# checks bit-for-bit reproducibility (resume, replicas) must not share it with another
# test's weight initialisation running in a parallel thread (the `testing::seeded` lock
# covers the known ones; this covers the class). About 75 s instead of 50 s on 2 cores.
if [ "${CONMIM_SKIP_TORCH:-0}" != "1" ]; then
    phase train env LIBTORCH_USE_PYTORCH=1 PATH="$CONMIM_VENV/bin:$PATH" \
        cargo test --features train --lib train:: -- --test-threads 1
    # The command lines as built with `train` (pretrain, finetune, eval, ...): clap's
    # consistency checks of every subcommand's flags.
    phase cli env LIBTORCH_USE_PYTORCH=1 PATH="$CONMIM_VENV/bin:$PATH" \
        cargo test --features train --bins
fi
summary
