#!/usr/bin/env bash
# tools/bench/gpu_profile.sh — the second, shorter GPU call: kernel-level profiles of the
# Rust and PyTorch ViT-S steps (summarised by trace_summary.py), the BEiT-style and
# ViT-B/L re-measures, and `conmim pretrain` with batch prefetch. Same conventions as
# gpu_session.sh (BIN, OUT, PY).
set -uo pipefail
BIN=${BIN:-target/release}
OUT=${OUT:-/tmp/conmim-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$($PY -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib:${LD_LIBRARY_PATH:-}
DATA=${DATA:-/tmp/conmim-bench-data}
t0=$(date +%s)
res="$OUT/results.jsonl"
run() { # run NAME TIMEOUT CMD...: last stdout line -> results.jsonl, stderr tail -> NAME.log
    local name=$1 to=$2; shift 2
    echo "[$(( $(date +%s) - t0 ))s] start $name" >&2
    local out
    out=$(timeout "$to" "$@" 2> "$OUT/$name.log" | tail -n 1)
    case $out in \{*) ;; *) out=$(printf '%s' "$out" | $PY -c 'import json,sys;print(json.dumps(sys.stdin.read()))');; esac
    echo "{\"name\":\"$name\",\"out\":${out:-null}}" >> "$res"
    tail -c 1500 "$OUT/$name.log" > "$OUT/$name.log.tail"; rm -f "$OUT/$name.log"
}
run rust_small_timm 90 "$BIN/conmim-bench" train --preset small --timm-style --batch 256 --steps 30 --warmup 10 --profile /tmp/rust_small.trace.json --json
run torch_small 120 $PY tools/bench/torch_train.py --model small --batch 256 --steps 30 --warmup 10 --device cuda --profile /tmp/torch_small.trace.json
$PY tools/bench/trace_summary.py /tmp/rust_small.trace.json --top 30 > "$OUT/rust_small.summary.json" 2>&1
$PY tools/bench/trace_summary.py /tmp/torch_small.trace.json --top 30 > "$OUT/torch_small.summary.json" 2>&1
run rust_small_beit 90 "$BIN/conmim-bench" train --preset small --batch 256 --steps 30 --warmup 10 --json
run torch_small_beit 120 $PY tools/bench/torch_train.py --model small --variant beit --batch 256 --steps 30 --warmup 10 --device cuda
run rust_large_timm 120 "$BIN/conmim-bench" train --preset large --timm-style --batch 128 --steps 15 --warmup 6 --json
run rust_base_timm 120 "$BIN/conmim-bench" train --preset base --timm-style --batch 256 --steps 20 --warmup 8 --json
"$BIN/conmim-bench" make-data --out "$DATA" --images 4000 --per-shard 250 > /dev/null 2>&1
run pretrain_small 150 "$BIN/conmim" pretrain --preset small --data "$DATA" --out /tmp/run-small --steps 60 --batch 256 --threads 14 --device cuda
tail -n 3 /tmp/run-small/metrics.jsonl > "$OUT/pretrain_metrics_tail.jsonl" 2>/dev/null
ls /tmp/run-small/tb > "$OUT/pretrain_tb.txt" 2>&1
echo "[$(( $(date +%s) - t0 ))s] done" >&2
