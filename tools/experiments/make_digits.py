#!/usr/bin/env python3
"""Builds a small REAL labelled image set offline: scikit-learn's bundled UCI
handwritten digits (1,797 8x8 grey images, 10 classes; shipped inside the
scikit-learn wheel, no download), upscaled to SIZE px (PIL bicubic), as RGB JPEGs in
the ImageNet folder layout that `conmim-shard imagenet` reads:

    ROOT/train/n0000000<c>/<i>.JPEG   (80 %, a fixed per-class split)
    ROOT/val/n0000000<c>/<i>.JPEG     (20 %)

Usage: make_digits.py ROOT [--size 48]
"""
import argparse
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--size", type=int, default=48)
    a = ap.parse_args()
    d = load_digits()
    rng = np.random.default_rng(0)
    counts = {"train": 0, "val": 0}
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        rng.shuffle(idx)
        n_val = len(idx) // 5
        for k, i in enumerate(idx):
            split = "val" if k < n_val else "train"
            px = (d.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            im = Image.fromarray(px, "L").resize((a.size, a.size), Image.BICUBIC).convert("RGB")
            out = os.path.join(a.root, split, f"n{c:08d}")
            os.makedirs(out, exist_ok=True)
            im.save(os.path.join(out, f"{i:04d}.JPEG"), quality=95)
            counts[split] += 1
    print(f"digits: {counts['train']} train + {counts['val']} val images, 10 classes, {a.size} px -> {a.root}")


if __name__ == "__main__":
    main()
