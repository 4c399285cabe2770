#!/usr/bin/env bash
# tools/bench/gpu_next.sh — the GPU checks the open issues still need, in one call, in
# order of priority, under one deadline (a lent machine has 15 minutes in all, start-up
# included):
#   1. issue 6: NCCL under torchrun (world size 1) vs the plain single process,
#      loader-fed ViT-S pretraining, the overhead, and each run's data-wait fraction
#      (issue 4's real-loader line) (tools/bench/gpu_dist.sh);
#   2. issue 4: training img/s of ViT-B and ViT-L (timm-style) vs PyTorch eager, same GPU,
#      then ViT-S (timm- and BEiT-style: the teacher drops paths since 2026-12-06), then
#      the loader-fed ViT-S step of `conmim-bench train --data`;
#   3. issue 6 (optional SyncBN): its unit tests on the GPU (NCCL, bf16), from the release
#      test binary $BIN/conmim-tests when it was carried;
#   4. issue 3: the loader on all cores, then against the PyTorch peer (needs webdataset:
#      WHEELS=dir of wheels to install it offline), if time is left;
#   5. issue 6 (optional SyncBN): the NCCL run of 1. with `sync_bn=true`, if time is left.
# A step whose time limit does not fit in what is left of DEADLINE_S is skipped (and
# logged as skipped), and a Rust/PyTorch pair runs only when both halves fit, so the
# call always returns inside the deadline with what it has.
#
# What comes back: the device tool returns at most 8 files from $OUT, so everything
# bulky or numerous (data, run folders, checkpoints, per-step logs) lives in $WORK, and
# $OUT gets only: next.log (one line per step), results.jsonl (per step: rc and its last
# JSON line), dist.json, machine.txt and logs.tgz (the tail of every step's stdout and
# stderr, packed on exit). results.jsonl is also printed at the end (output_tail).
#
# Usage: here, build everything into the git-ignored .gpu/ (stripped release binaries, the
# release test binary, the peer's wheels; ~41 MB, the carry limit is 64 MiB):
#   tools/bench/gpu_prepare.sh
# then on the GPU machine (repository root; carry .gpu):
#   BIN=.gpu WHEELS=.gpu/wheels OUT=$OUT DEADLINE_S=480 tools/bench/gpu_next.sh
set -uo pipefail
BIN=${BIN:-target/release}
OUT=${OUT:-/tmp/conmim-gpu}
WORK=${WORK:-/tmp/conmim-gpu-work}
PY=${PY:-python3}
DEADLINE_S=${DEADLINE_S:-480}
DATA=${DATA:-/tmp/conmim-bench-data}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
export LD_LIBRARY_PATH=$($PY -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib:${LD_LIBRARY_PATH:-}
t0=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - t0) )); }
log() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/next.log"; }
pack() { # the tail of every step's output, in one file
    mkdir -p "$WORK/tails"
    for f in "$WORK"/*.out "$WORK"/*.log "$WORK"/dist/*.log "$WORK"/dist/*.json; do
        [ -f "$f" ] && tail -c 200000 "$f" > "$WORK/tails/$(basename "$(dirname "$f")")_$(basename "$f")"
    done
    tar czf "$OUT/logs.tgz" -C "$WORK" tails 2> /dev/null
    echo "== results.jsonl"
    cat "$OUT/results.jsonl" 2> /dev/null
}
trap pack EXIT
step() { # step NAME LIMIT_S CMD...: stdout -> WORK/NAME.out, stderr -> WORK/NAME.log
    local name=$1 to=$2; shift 2
    if [ "$(left)" -lt "$to" ]; then
        log "skip $name (needs ${to}s, $(left)s left)"
        return
    fi
    log "start $name"
    local t1 rc
    t1=$(date +%s)
    timeout "$to" "$@" > "$WORK/$name.out" 2> "$WORK/$name.log"
    rc=$?
    "$PY" - "$name" "$rc" "$(( $(date +%s) - t1 ))" "$WORK/$name.out" "$WORK/$name.log" \
        >> "$OUT/results.jsonl" <<'PY'
import json, sys
name, rc, secs, out, err = sys.argv[1:]
def last_json(path):
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None
def tail(path):
    try:
        return open(path, errors="replace").read()[-400:]
    except OSError:
        return ""
res = last_json(out)
print(json.dumps({"step": name, "rc": int(rc), "s": int(secs), "result": res,
                  "err_tail": None if res is not None and rc == "0" else tail(err)}))
PY
    log "end $name rc=$rc"
}
fits() { [ "$(left)" -ge $(( $1 + $2 )) ]; } # fits A B: both halves of a pair fit
pair() { # pair NAME LIMIT_RUST LIMIT_TORCH -- RUST_ARGS... -- TORCH_ARGS...
    local name=$1 lr=$2 lt=$3; shift 4
    local r=() t=()
    while [ "$1" != "--" ]; do r+=("$1"); shift; done
    shift
    t=("$@")
    if ! fits "$lr" "$lt"; then
        log "skip pair $name (needs $((lr + lt))s, $(left)s left)"
        return
    fi
    step "rust_$name" "$lr" "$BIN/conmim-bench" train --json "${r[@]}"
    step "torch_$name" "$lt" "$PY" tools/bench/torch_train.py --device cuda "${t[@]}"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
  $PY -c 'import torch;print(torch.__version__)'; } > "$OUT/machine.txt" 2>&1
NT=$(nproc)
[ -f "$DATA/train.manifest.json" ] ||
    "$BIN/conmim-bench" make-data --out "$DATA" --images 6000 --per-shard 250 > "$WORK/make_data.log" 2>&1
log "data ready"

# 1. Issue 6 (and issue 4's loader-fed wait fraction): ~2 minutes measured on CPU-sized
#    guesses; the inner limits keep it inside the step's.
step dist 290 env BIN="$BIN" OUT="$WORK/dist" PY="$PY" DATA="$DATA" STEPS=120 \
    RUN_TIMEOUT=115 KNN_TIMEOUT=50 THREADS=$((NT - 2)) tools/bench/gpu_dist.sh
cp "$WORK/dist/dist.json" "$OUT/dist.json" 2> /dev/null

# 2. Issue 4: Rust vs PyTorch eager, each pair only when both halves fit; timed windows
#    of ~6 s (the run-to-run noise of 3 s windows was ~2 %).
pair base_timm 90 100 -- --preset base --timm-style --batch 256 --steps 40 --warmup 8 \
    -- --model base --batch 256 --steps 40 --warmup 8
pair large_timm 100 110 -- --preset large --timm-style --batch 128 --steps 30 --warmup 6 \
    -- --model large --batch 128 --steps 30 --warmup 6
pair small_timm 80 90 -- --preset small --timm-style --batch 256 --steps 60 --warmup 10 \
    -- --model small --batch 256 --steps 60 --warmup 10
pair small_beit 80 90 -- --preset small --batch 256 --steps 60 --warmup 10 \
    -- --model small --variant beit --batch 256 --steps 60 --warmup 10
step rust_small_loader 90 "$BIN/conmim-bench" train --json --preset small --batch 256 \
    --steps 60 --warmup 10 --data "$DATA" --threads $((NT - 2))

# 3. SyncBN's one-rank tests on the GPU (they pick CUDA + NCCL when there is a GPU), and
#    NCCL with world size 1.
if [ -x "$BIN/conmim-tests" ]; then
    step cuda_tests 90 "$BIN/conmim-tests" --exact --test-threads 1 --nocapture \
        train::dist::tests::nccl_world_one_works_with_cuda_and_is_a_clear_error_without \
        train::dist::tests::sync_batch_norm_on_one_rank_is_batch_norm \
        train::dist::tests::sync_batch_norm_takes_bf16_like_batch_norm
else
    log "skip cuda_tests (no $BIN/conmim-tests)"
fi

# 4. Issue 3: the loader on all cores, then side by side with the peer.
step loader_all 40 "$BIN/conmim-bench" loader --data "$DATA" --threads "$NT" --batch 256 \
    --seconds 15 --decode-seconds 3 --json
if [ -n "${WHEELS:-}" ] && ! $PY -c 'import webdataset' 2>/dev/null; then
    $PY -m pip install -q --no-index --find-links "$WHEELS" webdataset braceexpand > "$WORK/pip.log" 2>&1
fi
if $PY -c 'import webdataset' 2>/dev/null; then
    step compare_all 100 env CONMIM_PYTHON="$PY" "$BIN/conmim-bench" compare --data "$DATA" \
        --threads "$NT" --batch 256 --seconds 15 --decode-seconds 0 --json
else
    log "skip compare_all (no webdataset for the peer; set WHEELS)"
fi
# 5. SyncBN on NCCL (world size 1: the collectives run, the numbers are plain BN's).
TORCHRUN=$(command -v torchrun || echo "$(dirname "$(command -v "$PY")")/torchrun")
step syncbn 120 "$TORCHRUN" --no-python --nnodes 1 --nproc-per-node 1 "$BIN/conmim" pretrain \
    --preset small --data "$DATA" --steps 60 --batch 256 --threads $((NT - 2)) --device cuda \
    --save-every 100000 --quiet --set sync_bn=true --out "$WORK/syncbn"
log "done"
