#!/usr/bin/env python3
"""Golden fixtures for timm RandAugment ops and RandomErasing box sampling
(tests/randaug_parity.rs, src/augment/randaug.rs).

Rerun (from the repository root; rewrites tests/fixtures/parity/randaug/ completely):

    source tools/env.sh && $CONMIM_PYTHON tools/parity/make_randaug_fixtures.py

timm's randomness is bypassed: every case fixes (op, magnitude, sign, interpolation),
the argument comes from timm's own ``LEVEL_TO_ARG[name]`` (with ``random.random``
patched to force the sign) and the pixels from timm's own op function
(``NAME_TO_OP[name]``) on a PIL RGB image, with the ImageNet-224 hparams that
``create_transform`` passes (``translate_const=100``, ``img_mean=(124, 116, 104)``).

Files (raw interleaved RGB8, row-major, ``h * w * 3`` bytes):

* ``in_<image>.rgb``: inputs, 33x25: ``grad`` (gradients + noise, full range),
  ``lowc`` (low-contrast noisy scene in [60, 180], one channel nearly flat), ``edges``
  (hard-edged blocks and stripes, 0/255 extremes).
* ``c<NNN>.rgb``: one output per case.
* ``cases.tsv``: ``id op image magnitude negate interp arg`` (``arg`` is timm's level
  argument as ``repr`` of the Python float; ``-`` for none).
* ``erase.tsv``: RandomErasing box parity: ``W H uniforms(comma-separated) ->
  top left h w used`` (or ``none used``), from ``timm.data.random_erasing.RandomErasing
  (0.25, mode='const', max_count=1)._erase`` with its ``random`` module replaced by a
  fake that returns the listed uniforms: ``random() = u``, ``uniform(a, b) = a + (b-a)*u``
  (CPython's formula), ``randint(a, b) = a + floor(u * (b - a + 1))``; the box is read
  back from the zeroed region of a ones tensor; ``used`` is the number of uniforms used
  (only those are written).
"""

from __future__ import annotations

import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
import timm
import torch
import timm.data.auto_augment as aa
import timm.data.random_erasing as re_mod

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity" / "randaug"
W, H = 33, 25
HPARAMS = dict(translate_const=int(224 * 0.45), img_mean=(124, 116, 104))


def make_images():
    rs = np.random.RandomState(1234)
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    grad = np.stack([x / (W - 1) * 255, y / (H - 1) * 255, (x + y) / (W + H - 2) * 255], -1)
    grad = np.clip(grad + rs.normal(0, 12, grad.shape), 0, 255).astype(np.uint8)
    lowc = np.stack(
        [
            60 + 120 * (0.5 + 0.5 * np.sin(x / 4.0 + y / 7.0)),
            100 + 40 * (y / (H - 1)),
            np.full_like(x, 130.0),
        ],
        -1,
    )
    lowc = np.clip(lowc + rs.normal(0, 6, lowc.shape), 60, 180)
    lowc[..., 2] = 130 + (rs.rand(H, W) < 0.1)  # nearly flat channel: 130/131 only
    lowc = lowc.astype(np.uint8)
    edges = np.zeros((H, W, 3), np.uint8)
    edges[:, : W // 3] = (255, 0, 0)
    edges[:, W // 3 : 2 * W // 3] = (0, 255, 255)
    edges[::4, :] = (255, 255, 255)
    edges[H // 2 :, :, 1] = rs.randint(0, 256, (H - H // 2, W))
    edges[5:12, 20:30] = (0, 0, 0)
    return {"grad": grad, "lowc": lowc, "edges": edges}


class _ForcedRandom:
    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


def level_arg(name, magnitude, negate):
    fn = aa.LEVEL_TO_ARG[name]
    if fn is None:
        return None
    saved = aa.random
    # _randomly_negate: -v if random.random() > 0.5
    aa.random = _ForcedRandom(0.9 if negate else 0.1)
    try:
        return fn(magnitude, HPARAMS)
    finally:
        aa.random = saved


INTERP = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def run_op(name, img, args, interp):
    kwargs = dict(fillcolor=HPARAMS["img_mean"], resample=INTERP[interp])
    return aa.NAME_TO_OP[name](img, *(args or ()), **kwargs)


class _FakeRandom:
    def __init__(self, us):
        self.us = list(us)
        self.used = 0

    def _next(self):
        u = self.us[self.used]
        self.used += 1
        return u

    def random(self):
        return self._next()

    def uniform(self, a, b):
        return a + (b - a) * self._next()

    def randint(self, a, b):
        return a + int(math.floor(self._next() * (b - a + 1)))


def erase_cases(lines):
    rs = np.random.RandomState(99)
    sizes = [(224, 224), (33, 25), (7, 5), (3, 40), (64, 48)]
    for i in range(60):
        w, h = sizes[i % len(sizes)]
        us = [float(v) for v in rs.rand(41)]
        us[0] = float(us[0]) * 0.3 if i % 4 else float(us[0])  # mostly erase
        fake = _FakeRandom(us)
        saved = re_mod.random
        re_mod.random = fake
        try:
            t = torch.ones(3, h, w)
            re_mod.RandomErasing(0.25, mode="const", max_count=1, device="cpu")._erase(
                t, 3, h, w, t.dtype
            )
        finally:
            re_mod.random = saved
        z = (t[0] == 0).nonzero()
        if len(z) == 0:
            box = "none"
        else:
            top, left = int(z[:, 0].min()), int(z[:, 1].min())
            hh, ww = int(z[:, 0].max()) - top + 1, int(z[:, 1].max()) - left + 1
            box = f"{top} {left} {hh} {ww}"
        lines.append(f"{w}\t{h}\t{','.join(repr(u) for u in us[: fake.used])}\t{box}\t{fake.used}")


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    imgs = make_images()
    for k, v in imgs.items():
        (OUT / f"in_{k}.rgb").write_bytes(v.tobytes())

    point = ["AutoContrast", "Equalize", "Invert"]
    levels = ["PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"]
    enh = ["ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"]
    geo = ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
    cases = []  # (op, image, magnitude, negate, interp)
    for op in point:
        for im in imgs:
            cases.append((op, im, 9.0, False, "bicubic"))
    for op in levels:
        for m in (0.0, 2.6, 5.0, 9.0, 9.7, 10.0):
            if op == "PosterizeIncreasing" and m >= 10.0:
                # bits_to_keep = 0: Pillow >= 10 raises ValueError (bits must be 1..8);
                # older Pillow (and the Rust port) return all zeros. Not a fixture.
                continue
            cases.append((op, "grad", m, False, "bicubic"))
        cases.append((op, "edges", 8.4, False, "bicubic"))
    for op in enh:
        for m, neg in ((0.0, False), (3.3, False), (9.0, False), (9.0, True), (10.0, True), (8.55, True)):
            cases.append((op, "grad", m, neg, "bicubic"))
        cases.append((op, "lowc", 9.0, True, "bicubic"))
        cases.append((op, "edges", 9.4, False, "bicubic"))
    for op in geo:
        for m, neg, interp, im in (
            (9.0, False, "bicubic", "grad"),
            (9.0, True, "bicubic", "edges"),
            (10.0, True, "bicubic", "grad"),
            (4.5, False, "bilinear", "grad"),
            (9.0, True, "bilinear", "edges"),
        ):
            cases.append((op, im, m, neg, interp))

    lines = []
    for i, (op, im, m, neg, interp) in enumerate(cases):
        args = level_arg(op, m, neg)
        pil = Image.fromarray(imgs[im], "RGB")
        out = np.asarray(run_op(op, pil, args, interp).convert("RGB"))
        assert out.shape == (H, W, 3)
        (OUT / f"c{i:03d}.rgb").write_bytes(out.tobytes())
        arg = "-" if args is None else repr(float(args[0]))
        lines.append(f"c{i:03d}\t{op}\t{im}\t{m!r}\t{int(neg)}\t{interp}\t{arg}")
    header = (
        f"# timm {timm.__version__} Pillow {PIL.__version__} numpy {np.__version__}; "
        f"{W}x{H}; id op image magnitude negate interp arg\n"
    )
    (OUT / "cases.tsv").write_text(header + "\n".join(lines) + "\n")

    elines = []
    erase_cases(elines)
    (OUT / "erase.tsv").write_text(
        "# W H uniforms box(top left h w | none) used\n" + "\n".join(elines) + "\n"
    )
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(cases)} op cases, {len(elines)} erase cases, {total} bytes to {OUT}")


if __name__ == "__main__":
    sys.exit(main())
