#!/usr/bin/env bash
# tools/bench/gpu_dist.sh — issue 6's GPU checks in one call: the NCCL path under
# torchrun (world size 1, c10d ProcessGroupNCCL + DDP's reducer) against the same run
# as a plain single process, loader-fed ViT-S ConMIM pretraining on the same data;
# prints both img/s (median of the second half of the steps) and the overhead; then
# `conmim knn` of that run under torchrun (the k-NN's gathers through NCCL).
#
# Usage (GPU machine, repository root, release binaries built with --features train in
# $BIN, a Python with torch, so that `torchrun` is on PATH or next to $PY):
#   BIN=target/release OUT=/tmp/out tools/bench/gpu_dist.sh
# Environment: STEPS (default 200), BATCH (256), THREADS (14), DATA (made when missing),
# RUN_TIMEOUT (300 s per pretraining run), KNN_TIMEOUT (120 s); for a dry run of the
# script on a CPU machine: DEVICE=cpu PRESET=tiny EXTRA="--image-size 64".
# Writes OUT/dist.json (img/s of both runs, the overhead, each run's data-wait fraction).
set -uo pipefail
BIN=${BIN:-target/release}
OUT=${OUT:-/tmp/conmim-gpu}
PY=${PY:-python3}
STEPS=${STEPS:-200}
BATCH=${BATCH:-256}
THREADS=${THREADS:-14}
DATA=${DATA:-/tmp/conmim-bench-data}
DEVICE=${DEVICE:-cuda}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
KNN_TIMEOUT=${KNN_TIMEOUT:-120}
PRESET=${PRESET:-small}
read -r -a EXTRA <<< "${EXTRA:-}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$($PY -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib:${LD_LIBRARY_PATH:-}
TORCHRUN=$(command -v torchrun || echo "$(dirname "$(command -v "$PY")")/torchrun")
[ -f "$DATA/train.manifest.json" ] || "$BIN/conmim-bench" make-data --out "$DATA" --images 6000 > "$OUT/make-data.log" 2>&1
common=(--preset "$PRESET" --data "$DATA" --steps "$STEPS" --batch "$BATCH" --threads "$THREADS"
    --device "$DEVICE" --save-every 100000 --quiet "${EXTRA[@]}")
rm -rf "$OUT/plain" "$OUT/nccl1"
timeout "$RUN_TIMEOUT" "$BIN/conmim" pretrain "${common[@]}" --out "$OUT/plain" > "$OUT/plain.log" 2>&1
echo "plain rc=$?"
timeout "$RUN_TIMEOUT" "$TORCHRUN" --no-python --nnodes 1 --nproc-per-node 1 \
    "$BIN/conmim" pretrain "${common[@]}" --out "$OUT/nccl1" > "$OUT/nccl1.log" 2>&1
echo "torchrun nccl rc=$?"
$PY - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def rate(run):
    try:
        rows = [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if '"loss"' in l]
    except OSError:
        return None
    v = [r["img_s"] for r in rows[len(rows) // 2:]]
    return statistics.median(v) if v else None
def wait(run):
    try:
        return json.load(open(f"{out}/{run}/summary.json")).get("data_wait_frac")
    except (OSError, ValueError):
        return None
p, d = rate("plain"), rate("nccl1")
# Rank 0 logs the process group it joined (a group of one under torchrun).
log = open(f"{out}/nccl1.log", errors="replace").read()
res = {"plain_img_s": p, "torchrun_nccl_world1_img_s": d,
       "overhead_pct": None if not (p and d) else 100.0 * (p - d) / p,
       "plain_data_wait_frac": wait("plain"), "nccl1_data_wait_frac": wait("nccl1"),
       "process_group": next((l.strip() for l in log.splitlines() if "data parallel over" in l), None)}
print(json.dumps(res))
json.dump(res, open(f"{out}/dist.json", "w"))
PY
grep -h "nccl\|NCCL\|error" "$OUT/nccl1.log" | tail -n 5
# The k-NN shared by the ranks (gathers through NCCL, host counts staged): conmim knn of
# the torchrun run's teacher, 2,000 train images against themselves, under torchrun.
rm -rf "$OUT/knn-data"; mkdir -p "$OUT/knn-data"
"$BIN/conmim-bench" make-data --out "$OUT/knn-data" --images 2000 > /dev/null 2>&1
timeout "$KNN_TIMEOUT" "$TORCHRUN" --no-python --nnodes 1 --nproc-per-node 1 \
    "$BIN/conmim" knn "$OUT/nccl1" --train-data "$OUT/knn-data" --val-split train \
    --device "$DEVICE" --threads "$THREADS" > "$OUT/knn.json" 2> "$OUT/knn.log"
echo "torchrun nccl knn rc=$? $(cat "$OUT/knn.json")"

