#!/usr/bin/env bash
# tools/run-demo.sh [OUT_DIR] — the whole pipeline on an embedded demo, no data needed:
#   1. set up, build conmim-shard and run its demo: it makes a small synthetic
#      ImageNet-style folder (OUT/imagenet), shards it (OUT/dataset), verifies the
#      result and prints a summary;
#   2. build conmim (feature `train`, libtorch from the venv's torch) and write an
#      augmentation preview of the sharded train split (OUT/preview.png);
#   3. pretrain a small ViT on the streamed shards with configs/demo-tiny.toml (about
#      a minute on a 2-core CPU; CUDA is used automatically when present), into
#      OUT/pretrain: metrics.jsonl, checkpoints/, tb/ (TensorBoard), summary.json;
#   4. print where everything is and how the loss fell.
# OUT_DIR defaults to ./demo-out, both relative to the directory it is run from. With
# CONMIM_SKIP_TORCH=1 (no torch in the venv) steps 2-3 are skipped.
set -euo pipefail
caller=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# OUT_DIR (and its default) is relative to where the script was run from.
case "${1:-}" in
    "") out="$caller/demo-out" ;;
    /*) out="$1" ;;
    *) out="$caller/$1" ;;
esac
config=configs/demo-tiny.toml

bash tools/setup.sh
# shellcheck source=tools/env.sh
source tools/env.sh
echo "==> cargo build --release --bin conmim-shard"
cargo build --release --bin conmim-shard
echo "==> conmim-shard demo --out $out"
target/release/conmim-shard demo --out "$out"
# Absolute from here on (the demo accepts a relative OUT_DIR too).
out="$(cd "$out" && pwd)"
data="$out/dataset"

if [ "${CONMIM_SKIP_TORCH:-0}" = "1" ]; then
    echo
    echo "==> CONMIM_SKIP_TORCH=1: no torch in the venv, so the preview and pretraining"
    echo "    steps (conmim, feature \`train\`) are skipped. The sharded dataset is in $data"
    exit 0
fi

# The `train` feature links libtorch from the venv's PyPI torch (as tools/run-tests.sh).
echo "==> cargo build --release --features train --bin conmim"
LIBTORCH_USE_PYTORCH=1 PATH="$CONMIM_VENV/bin:$PATH" \
    cargo build --release --features train --bin conmim

# The preview at the training view size of the demo config.
size="$("$CONMIM_PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["model"]["image_size"])' "$config")"
echo "==> conmim preview --data $data -n 16 --size $size --out $out/preview.png"
target/release/conmim preview --data "$data" -n 16 --size "$size" --out "$out/preview.png"

# A fresh run each time, so that rerunning the demo repeats it (rather than resuming
# from, or stopping at, the previous run's final checkpoint).
run="$out/pretrain"
rm -rf "$run"
echo "==> conmim pretrain --preset tiny --config $config --data $data --out $run"
t0=$SECONDS
target/release/conmim pretrain --preset tiny --config "$config" --data "$data" --out "$run"
dt=$((SECONDS - t0))

echo
echo "==> demo done"
"$CONMIM_PYTHON" - "$out" "$run" "$dt" <<'PY'
import glob, json, os, sys

out, run, dt = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
loss = [l["loss"] for l in lines]
tail = min(10, len(loss))
ckpts = sorted(glob.glob(os.path.join(run, "checkpoints", "step-*")))
tb = sorted(glob.glob(os.path.join(run, "tb", "events.out.tfevents.*")))
def mean(xs):
    return sum(xs) / len(xs)
print(f"shards       {os.path.join(out, 'dataset')} (train.manifest.json, val.manifest.json)")
print(f"preview      {os.path.join(out, 'preview.png')} (rows of weak | strong | masked view)")
print(f"metrics      {os.path.join(run, 'metrics.jsonl')} (one line per step)")
print(f"checkpoint   {ckpts[-1] if ckpts else '(none)'}")
print(f"tensorboard  {tb[-1] if tb else '(none)'}  (tensorboard --logdir {os.path.join(run, 'tb')})")
print(f"summary      {os.path.join(run, 'summary.json')}")
print(f"pretrain     {len(loss)} steps in {dt} s")
print(f"loss         first {loss[0]:.4f} -> mean of the last {tail} {mean(loss[-tail:]):.4f} "
      f"({mean(loss[-tail:]) - loss[0]:+.4f})")
PY
