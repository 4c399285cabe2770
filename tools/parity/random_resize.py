#!/usr/bin/env python3
"""Random crop + resize cases through PIL, for the optional wider parity check.

    source tools/env.sh && $CONMIM_PYTHON tools/parity/random_resize.py /tmp/pil-resize 400
    PARITY_PIL_DIR=/tmp/pil-resize cargo test --release --test parity -- --ignored random_resizes

Writes ``DIR/cases.json`` and per case ``<name>.in`` (raw RGB8 input, ``h * w * 3``
bytes) and ``<name>.out`` (PIL's output). Cases (80 % / 20 %):

* ``crop``: torchvision ``F.resized_crop(pil, top, left, ch, cw, [oh, ow], BICUBIC)``
  (= ``img.crop(box).resize(size, BICUBIC)``), then ``F.hflip`` for half of them; random
  boxes of random 8-700 px images, outputs 224x224 or random 1-300 px (up and down).
* ``eval``: ``CenterCrop(crop)(Resize(short, BICUBIC)(pil))``; the resized size and the
  crop offsets are recorded so that the Rust side only resizes.

Images are 8x8 blocks of random colour with noise, a third of them with saturated
speckles (clipped edges, where intermediate rounding differences show most).
Deterministic for a given numpy / Pillow / torchvision.
"""

import json
import random
import sys

import numpy as np
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image


def main(out: str, n: int) -> None:
    rng = random.Random(1)
    nrng = np.random.default_rng(1)
    cases = []
    for i in range(n):
        w, h = rng.randint(8, 700), rng.randint(8, 700)
        speckled = rng.random() < 0.3
        base = nrng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w].astype(np.int16)
        img += nrng.integers(-40, 41, size=img.shape).astype(np.int16)
        if speckled:
            img[nrng.random(img.shape[:2]) < 0.1] = 255
        img = np.clip(img, 0, 255).astype(np.uint8)
        pil = Image.fromarray(img, "RGB")
        name = f"c{i}"
        img.tofile(f"{out}/{name}.in")
        if rng.random() < 0.8:
            cw, ch = rng.randint(1, w), rng.randint(1, h)
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            if rng.random() < 0.6:
                ow, oh = 224, 224
            else:
                ow, oh = rng.randint(1, 300), rng.randint(1, 300)
            flip = rng.random() < 0.5
            r = F.resized_crop(pil, top, left, ch, cw, [oh, ow], T.InterpolationMode.BICUBIC)
            if flip:
                r = F.hflip(r)
            np.asarray(r).tofile(f"{out}/{name}.out")
            cases.append(dict(name=name, op="crop", w=w, h=h, top=top, left=left, cw=cw,
                              ch=ch, ow=ow, oh=oh, flip=flip))
        else:
            short = rng.randint(8, 300)
            crop = rng.randint(1, short)
            full = T.Resize(short, T.InterpolationMode.BICUBIC)(pil)
            r = T.CenterCrop(crop)(full)
            np.asarray(r).tofile(f"{out}/{name}.out")
            rw, rh = full.size
            top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
            cases.append(dict(name=name, op="eval", w=w, h=h, rw=rw, rh=rh, left=left,
                              top=top, crop=crop))
    with open(f"{out}/cases.json", "w") as f:
        json.dump(cases, f)
    print(f"{len(cases)} cases in {out}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 400)
