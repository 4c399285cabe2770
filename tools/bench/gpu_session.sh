#!/usr/bin/env bash
# tools/bench/gpu_session.sh — every GPU-machine measurement in one call (the machine is
# lent for minutes): loader throughput on all cores vs the PyTorch peer, training img/s
# of the Rust trainer vs the PyTorch eager reference (tools/bench/torch_train.py) for
# ViT-S/B/L, loader-fed training with its data-wait fraction, and the CUDA unit checks.
#
# Usage (on the GPU machine, from the repository root, with release binaries built with
# `--features train` in $BIN and a Python that has torch + timm):
#   BIN=target/release OUT=/tmp/out tools/bench/gpu_session.sh
# Each result goes to $OUT/<name>.json / .log as soon as it exists, so a run cut short
# still returns what it measured. Optional: WHEELS=dir of webdataset wheels for the peer.
set -uo pipefail
BIN=${BIN:-target/release}
OUT=${OUT:-/tmp/conmim-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
TORCH_LIB=$($PY -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TORCH_LIB:${LD_LIBRARY_PATH:-}
DATA=${DATA:-/tmp/conmim-bench-data}
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/session.log"; }
run() { # run NAME TIMEOUT CMD...: stdout -> NAME.json, stderr -> NAME.log
    local name=$1 to=$2; shift 2
    log "start $name"
    timeout "$to" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
    log "end $name rc=$? $(tail -c 400 "$OUT/$name.json" | tr '\n' ' ')"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; $PY -c 'import torch,timm;print(torch.__version__,timm.__version__)'; } > "$OUT/machine.txt" 2>&1
if [ -n "${WHEELS:-}" ] && ! $PY -c 'import webdataset' 2>/dev/null; then
    $PY -m pip install -q --no-index --find-links "$WHEELS" webdataset braceexpand > "$OUT/pip.log" 2>&1
fi

# 1. Sanity: CUDA, bf16 autocast, a tiny training run on the GPU.
run sanity 60 "$BIN/conmim-bench" train --preset tiny --image-size 64 --batch 32 --steps 3 --warmup 1 --device cuda --json

# 2. Training img/s, synthetic input: Rust (timm-style = same model as the reference,
#    and the BEiT-style default) vs PyTorch eager, ViT-S first.
run rust_small_timm 90 "$BIN/conmim-bench" train --preset small --timm-style --batch 256 --steps 30 --warmup 10 --json
run torch_small 120 $PY tools/bench/torch_train.py --model small --batch 256 --steps 30 --warmup 10 --device cuda
run rust_small_beit 90 "$BIN/conmim-bench" train --preset small --batch 256 --steps 30 --warmup 10 --json
run torch_small_beit 120 $PY tools/bench/torch_train.py --model small --variant beit --batch 256 --steps 30 --warmup 10 --device cuda

# 3. The loader on all cores, and the PyTorch peer with as many workers.
"$BIN/conmim-bench" make-data --out "$DATA" --images 6000 --per-shard 250 > "$OUT/make_data.log" 2>&1
log "data made"
NT=$(nproc)
run loader_all 60 "$BIN/conmim-bench" loader --data "$DATA" --threads "$NT" --batch 256 --seconds 15 --decode-seconds 3 --json
run compare_all 120 env CONMIM_PYTHON=$PY "$BIN/conmim-bench" compare --data "$DATA" --threads "$NT" --batch 256 --seconds 15 --decode-seconds 0

# 4. Loader-fed training (ViT-S, all cores but two for the loader).
run rust_small_loader 120 "$BIN/conmim-bench" train --preset small --timm-style --batch 256 --steps 40 --warmup 10 --data "$DATA" --threads $((NT - 2)) --json

# 4b. The whole `conmim pretrain` path on the GPU (metrics with GPU memory, TensorBoard,
#     checkpoint), ViT-S for 30 steps from the loader.
run pretrain_small 150 "$BIN/conmim" pretrain --preset small --data "$DATA" --out "$OUT/run-small" --steps 30 --batch 256 --threads $((NT - 2)) --device cuda
rm -rf "$OUT/run-small/checkpoints"

# 5. ViT-B and ViT-L.
run rust_base_timm 120 "$BIN/conmim-bench" train --preset base --timm-style --batch 256 --steps 20 --warmup 8 --json
run torch_base 150 $PY tools/bench/torch_train.py --model base --batch 256 --steps 20 --warmup 8 --device cuda
run rust_large_timm 150 "$BIN/conmim-bench" train --preset large --timm-style --batch 128 --steps 15 --warmup 6 --json
run torch_large 150 $PY tools/bench/torch_train.py --model large --batch 128 --steps 15 --warmup 6 --device cuda

# 6. If time is left: compiled reference for ViT-S.
run torch_small_compiled 200 $PY tools/bench/torch_train.py --model small --batch 256 --steps 30 --warmup 10 --device cuda --compile
log "done"
