#!/usr/bin/env bash
# tools/bench/gpu_next.sh — the GPU checks the open issues still need, in one call, in
# order of priority, under one deadline (a lent machine has 15 minutes in all, start-up
# included):
#   1. issue 6: NCCL under torchrun (world size 1) vs the plain single process,
#      loader-fed ViT-S pretraining, and the overhead (tools/bench/gpu_dist.sh);
#   2. issue 4: training img/s of ViT-B and ViT-L (timm-style) vs PyTorch eager, same GPU,
#      then ViT-S (timm- and BEiT-style: the teacher drops paths since 2026-12-06);
#   3. issue 6 (optional SyncBN): its unit tests on the GPU (NCCL, bf16), from the release
#      test binary $BIN/conmim-tests when it was carried;
#   4. issue 3: the loader on all cores, then against the PyTorch peer (needs webdataset:
#      WHEELS=dir of wheels to install it offline), if time is left;
#   5. issue 6 (optional SyncBN): the NCCL run of 1. with `sync_bn=true`, if time is left.
# A step whose time limit does not fit in what is left of DEADLINE_S is skipped (and
# logged as skipped), so the call always returns inside the deadline with what it has.
#
# Usage: here, build everything into the git-ignored .gpu/ (stripped release binaries, the
# release test binary, the peer's wheels; ~41 MB, the carry limit is 64 MiB):
#   tools/bench/gpu_prepare.sh
# then on the GPU machine (repository root; carry .gpu):
#   BIN=.gpu WHEELS=.gpu/wheels OUT=$OUT DEADLINE_S=480 tools/bench/gpu_next.sh
# Results: $OUT/next.log (one line per step), $OUT/<step>.out / .log, $OUT/dist/.
set -uo pipefail
BIN=${BIN:-target/release}
OUT=${OUT:-/tmp/conmim-gpu}
PY=${PY:-python3}
DEADLINE_S=${DEADLINE_S:-480}
DATA=${DATA:-/tmp/conmim-bench-data}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$($PY -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib:${LD_LIBRARY_PATH:-}
t0=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - t0) )); }
log() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/next.log"; }
step() { # step NAME LIMIT_S CMD...: stdout -> NAME.out, stderr -> NAME.log
    local name=$1 to=$2; shift 2
    if [ "$(left)" -lt "$to" ]; then
        log "skip $name (needs ${to}s, $(left)s left)"
        return
    fi
    log "start $name"
    timeout "$to" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
    log "end $name rc=$? $(tail -c 300 "$OUT/$name.out" | tr '\n' ' ')"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
  $PY -c 'import torch;print(torch.__version__)'; } > "$OUT/machine.txt" 2>&1
NT=$(nproc)
[ -f "$DATA/train.manifest.json" ] ||
    "$BIN/conmim-bench" make-data --out "$DATA" --images 6000 --per-shard 250 > "$OUT/make_data.log" 2>&1
log "data ready"

# 1. Issue 6.
step dist 240 env BIN="$BIN" OUT="$OUT/dist" PY="$PY" DATA="$DATA" STEPS=120 \
    THREADS=$((NT - 2)) tools/bench/gpu_dist.sh

# 2. Issue 4: ViT-B and ViT-L, Rust vs PyTorch eager.
R=("$BIN/conmim-bench" train --json)
T=($PY tools/bench/torch_train.py --device cuda)
step rust_base_timm 120 "${R[@]}" --preset base --timm-style --batch 256 --steps 20 --warmup 8
step torch_base 150 "${T[@]}" --model base --batch 256 --steps 20 --warmup 8
step rust_large_timm 150 "${R[@]}" --preset large --timm-style --batch 128 --steps 15 --warmup 6
step torch_large 150 "${T[@]}" --model large --batch 128 --steps 15 --warmup 6
step rust_small_timm 60 "${R[@]}" --preset small --timm-style --batch 256 --steps 30 --warmup 10
step torch_small 80 "${T[@]}" --model small --batch 256 --steps 30 --warmup 10
step rust_small_beit 60 "${R[@]}" --preset small --batch 256 --steps 30 --warmup 10
step torch_small_beit 80 "${T[@]}" --model small --variant beit --batch 256 --steps 30 --warmup 10

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
    $PY -m pip install -q --no-index --find-links "$WHEELS" webdataset braceexpand > "$OUT/pip.log" 2>&1
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
    --save-every 100000 --quiet --set sync_bn=true --out "$OUT/syncbn"
log "done"
