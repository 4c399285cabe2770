#!/usr/bin/env bash
# tools/experiments/digits_transfer.sh OUT — the issue-5 evidence experiment, offline:
#
#   1. a small REAL labelled image set: scikit-learn's bundled UCI digits (1,442 train +
#      355 val, 10 classes), upscaled to 48 px (tools/experiments/make_digits.py), sharded
#      with conmim-shard;
#   2. ConMIM pretraining of a small ViT (96-dim, 4 blocks, patch 4 at 32 px) on the
#      train split, labels unused, with checkpoints along the way;
#      (fine-tuning keeps RandAugment and drop path but turns mixup, cutmix and random
#      erasing off: on 1,442 images of 10 classes they only slow the comparison down)
#   3. the k-NN monitor (conmim knn, k=20, T=0.07, train -> val) at random init and at
#      each checkpoint: it should rise;
#   4. fine-tuning with the same budget from the pretrained teacher and from random
#      init: pretrained should win.
#
# Writes OUT/results.md (the table) and OUT/results.json. Needs a release build with
# feature `train` (BIN, default target/release): source tools/env.sh; LIBTORCH_USE_PYTORCH=1
# cargo build --release --features train --bins. scikit-learn is installed into the venv
# when missing. Environment: DEVICE (cpu|cuda, default: CUDA when available), THREADS
# (loader threads, default 2), PRE_STEPS (2000), FT_EPOCHS (30).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=tools/env.sh
source "$root/tools/env.sh"
out="${1:?usage: digits_transfer.sh OUT}"
bin="${BIN:-$root/target/release}"
threads="${THREADS:-2}"
pre_steps="${PRE_STEPS:-2000}"
ft_epochs="${FT_EPOCHS:-30}"
dev=()
[ -n "${DEVICE:-}" ] && dev=(--device "$DEVICE")
for b in conmim conmim-shard; do
    [ -x "$bin/$b" ] || { echo "digits: $bin/$b missing (build with --features train)" >&2; exit 1; }
done
"$CONMIM_PYTHON" -c 'import sklearn' 2>/dev/null \
    || "$CONMIM_PYTHON" -m pip install -q --disable-pip-version-check scikit-learn==1.8.0
mkdir -p "$out"
t0=$SECONDS
if [ ! -f "$out/wds/val.manifest.json" ]; then
    rm -rf "$out/raw" "$out/wds"
    "$CONMIM_PYTHON" "$here/make_digits.py" "$out/raw" --size 48
    for s in train val; do
        "$bin/conmim-shard" imagenet --root "$out/raw" --split "$s" --out "$out/wds" \
            --max-shard-count 200 >/dev/null
    done
fi
data="$out/wds"
model=(--set model.patch_size=8 --set model.embed_dim=96 --set model.depth=4 --set model.num_heads=3)
head=(--set head.in_dim=96 --set head.hidden_dim=512 --set head.out_dim=128)
common_pre=(--preset tiny "${model[@]}" "${head[@]}" --set shuffle_buffer=512 --data "$data"
    --batch 64 --image-size 32 --threads "$threads" "${dev[@]}" --quiet)
# Random init as a checkpoint: one step at lr 0 changes nothing.
rm -rf "$out/init" "$out/pre" "$out/ft-pre" "$out/ft-scratch"
"$bin/conmim" pretrain "${common_pre[@]}" --out "$out/init" --steps 1 --lr 0 --warmup-steps 0 >/dev/null
echo "digits: pretraining $pre_steps steps"
"$bin/conmim" pretrain "${common_pre[@]}" --out "$out/pre" --steps "$pre_steps" --lr 3e-2 \
    --save-every $((pre_steps / 8)) --keep 10 | tail -n 1
knn() {
    "$bin/conmim" knn "$1" --train-data "$data" --val-data "$data" --threads "$threads" "${dev[@]}"
}
{
    echo "{\"step\": 0, \"knn\": $(knn "$out/init")}"
    for ck in "$out"/pre/checkpoints/step-*; do
        s=$((10#${ck##*step-}))
        echo "{\"step\": $s, \"knn\": $(knn "$ck")}"
    done
} >"$out/knn.jsonl"
ft=(--preset small "${model[@]}" --set eval_resize=36 --set shuffle_buffer=512 --data "$data"
    --num-classes 10 --image-size 32 --batch 64 --epochs "$ft_epochs" --lr 6.4e-2
    --set mixup=0 --set cutmix=0 --set reprob=0
    --threads "$threads" --eval-every 5 "${dev[@]}" --quiet)
echo "digits: fine-tuning from the pretrained teacher ($ft_epochs epochs)"
"$bin/conmim" finetune "${ft[@]}" --init "$out/pre" --out "$out/ft-pre"
echo "digits: fine-tuning from random init ($ft_epochs epochs)"
"$bin/conmim" finetune "${ft[@]}" --out "$out/ft-scratch"
"$CONMIM_PYTHON" - "$out" "$((SECONDS - t0))" <<'PY'
import json, sys, platform, os
out, wall = sys.argv[1], int(sys.argv[2])
knn = [json.loads(l) for l in open(f"{out}/knn.jsonl")]
pre = json.load(open(f"{out}/ft-pre/summary.json"))
scr = json.load(open(f"{out}/ft-scratch/summary.json"))
res = {"knn": knn, "finetune_pretrained": pre, "finetune_scratch": scr, "wall_s": wall,
       "machine": f"{platform.machine()} {os.cpu_count()} cpus, device {pre['device']}"}
json.dump(res, open(f"{out}/results.json", "w"), indent=1)
lines = ["| pretraining step | k-NN top-1 (val) |", "| ---: | ---: |"]
lines += [f"| {k['step']} | {k['knn']['acc1']:.1f} % |" for k in knn]
lines += ["", "| fine-tuning (same budget) | best top-1 | last top-1 | final train loss |",
          "| --- | ---: | ---: | ---: |"]
for name, s in [("from the ConMIM teacher", pre), ("from random init", scr)]:
    lines.append(f"| {name} | {s['best']['acc1']:.1f} % (epoch {s['best_epoch']}) | "
                 f"{s['last']['acc1']:.1f} % | {s['final_loss']:.3f} |")
lines.append("")
lines.append(f"{res['machine']}; whole script {wall} s.")
open(f"{out}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
