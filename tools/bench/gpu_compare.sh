#!/usr/bin/env bash
# tools/bench/gpu_compare.sh — the training table of the README in one GPU call: Rust
# (conmim-bench train, synthetic input) and PyTorch eager (torch_train.py) for ViT-S/B/L,
# same GPU, same call; plus the kernel profile summary of the Rust ViT-S step. Same
# conventions as gpu_session.sh (BIN, OUT, PY). Results: $OUT/results.jsonl.
# For a lent machine use gpu_next.sh instead: it has a deadline (this script's timeouts
# add up to more than one 600 s command) and keeps stderr and its files to what comes back.
set -uo pipefail
BIN=${BIN:-target/release}
OUT=${OUT:-/tmp/conmim-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$($PY -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib:${LD_LIBRARY_PATH:-}
res="$OUT/results.jsonl"
run() { # run NAME TIMEOUT CMD...: the last stdout line (JSON) -> results.jsonl
    local name=$1 to=$2; shift 2
    local out
    out=$(timeout "$to" "$@" 2> /dev/null | tail -n 1)
    echo "{\"name\":\"$name\",\"out\":${out:-null}}" >> "$res"
}
R="$BIN/conmim-bench train --json"
T="$PY tools/bench/torch_train.py --device cuda"
run rust_small_timm 90 $R --preset small --timm-style --batch 256 --steps 30 --warmup 10 --profile /tmp/rs.json
run torch_small_timm 120 $T --model small --batch 256 --steps 30 --warmup 10
run rust_small_beit 90 $R --preset small --batch 256 --steps 30 --warmup 10
run torch_small_beit 120 $T --model small --variant beit --batch 256 --steps 30 --warmup 10
run rust_base_timm 120 $R --preset base --timm-style --batch 256 --steps 20 --warmup 8
run torch_base_timm 150 $T --model base --batch 256 --steps 20 --warmup 8
run rust_large_timm 150 $R --preset large --timm-style --batch 128 --steps 15 --warmup 6
run torch_large_timm 150 $T --model large --batch 128 --steps 15 --warmup 6
$PY tools/bench/trace_summary.py /tmp/rs.json --top 12 > "$OUT/rust_small.summary.json" 2>&1
