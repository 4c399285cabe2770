#!/usr/bin/env bash
# tools/bench/gpu_prepare.sh — builds here (no GPU needed) everything tools/bench/gpu_next.sh
# runs on a lent GPU machine, into the git-ignored .gpu/ (carry it: the limit is 64 MiB):
#   .gpu/conmim, .gpu/conmim-bench   release binaries with --features train, stripped
#   .gpu/conmim-tests                the release library test binary (SyncBN/NCCL checks)
#   .gpu/wheels/                     webdataset + braceexpand, for the PyTorch loader peer
# Usage (repository root, after tools/setup.sh):
#   tools/bench/gpu_prepare.sh
# then, on the GPU machine (carry .gpu):
#   BIN=.gpu WHEELS=.gpu/wheels OUT=$OUT DEADLINE_S=480 tools/bench/gpu_next.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source tools/env.sh
export LIBTORCH_USE_PYTORCH=1 PATH="$CONMIM_VENV/bin:$PATH"
cargo build --release --features train --bins
tests=$(cargo test --release --features train --lib --no-run --message-format=json |
    "$CONMIM_PYTHON" -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] == "conmim" and m["profile"]["test"]:
        print(m["executable"])')
[ -n "$tests" ] || { echo "gpu_prepare: no library test binary was built" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu
for b in conmim conmim-bench; do strip -o ".gpu/$b" "target/release/$b"; done
strip -o .gpu/conmim-tests "$tests"
"$CONMIM_PYTHON" -m pip download -q --no-deps -d .gpu/wheels webdataset braceexpand
du -sh .gpu
total=$(du -sb .gpu | cut -f1)
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
    echo "gpu_prepare: .gpu is $total bytes, over the 64 MiB carry limit" >&2
    exit 1
fi
echo "gpu_prepare: ready; carry .gpu and run: BIN=.gpu WHEELS=.gpu/wheels OUT=\$OUT DEADLINE_S=480 tools/bench/gpu_next.sh"
