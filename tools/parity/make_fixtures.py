#!/usr/bin/env python3
"""Golden fixtures for the torchvision / PIL parity test (tests/parity.rs).

Rerun (from the repository root; rewrites tests/fixtures/parity/ completely):

    source tools/env.sh && $CONMIM_PYTHON tools/parity/make_fixtures.py

The output is deterministic for a given torch / torchvision / Pillow / numpy (the
versions used are recorded in index.json); the Rust test needs no Python.

What is generated
-----------------
Inputs (raw interleaved RGB8, row-major, ``height * width * 3`` bytes, ``*.rgb``):

* ``gradnoise`` 64x48: smooth gradients plus Gaussian noise.
* ``photo`` 64x48: a photo-like synthetic scene (sky gradient, shaded discs with hard
  edges, stripes, saturated and gray patches, clipped black and white areas).
* ``hue_edges`` 64x48: hue edge cases: all 256 grays, every max/min tie pattern
  ((a,a,b), (a,b,a), (b,a,a), ...), primaries and secondaries, 0/255 extremes, then
  uniform random pixels.
* ``jpeg`` 64x48: ``jpeg.jpg`` (written by PIL, quality 90, 4:2:0) and ``jpeg.rgb``,
  PIL's decoding of it (decode parity of the Rust decoder).
* ``big`` 128x96 (also ``big.png``) and ``tall`` 75x101 (also ``tall.png``): sources
  for crop + resize and the eval transform; PNG so that decoding is lossless.

Cases (one ``*.rgb`` output each), with the reference implementation:

* colour ops on uint8 CHW tensors with ``torchvision.transforms.functional``:
  ``adjust_brightness``, ``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``,
  ``rgb_to_grayscale(num_output_channels=3)`` (op ``grayscale``), ``solarize(128)``,
  ``hflip``, and ``color_jitter`` (the four adjust_* in the given order, which is what
  ``ColorJitter.forward`` does with ``fn_idx = order``).
* ``gaussian_blur``: ``PIL.ImageFilter.GaussianBlur(radius=sigma)`` on a PIL RGB image,
  as the official ConMIM/BEiT code does.
* ``apply_strong``: optional colour jitter (tensor ops, in order), optional grayscale,
  optional PIL Gaussian blur, optional solarize(128) -- the teacher view's order.
* ``crop_resize``: ``F.resized_crop(pil_img, top, left, h, w, [oh, ow], BICUBIC)`` on a
  PIL image (what ``RandomResizedCrop`` in the official pipeline calls).
* ``eval``: ``Resize(resize_short, BICUBIC)`` then ``CenterCrop(crop)`` on the PIL image
  decoded from the committed PNG / JPEG.
* ``decode``: PIL's RGB decoding of ``jpeg.jpg``.

Factors and sigmas are float32 values (stored as the double of the float32), because
the Rust side takes ``f32`` parameters; torch converts the Python float the same way.

index.json: ``{"generator", "rerun", "versions", "inputs": {name: {file, width,
height, encoded?}}, "cases": [{name, op, input, params, width, height, file,
identity}]}``; ``identity`` says whether the parameters leave the image unchanged (the
test checks that the others do change it; for ``decode`` the expected output is the
input's own pixels).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "parity"
RERUN = "source tools/env.sh && $CONMIM_PYTHON tools/parity/make_fixtures.py"


def f32(x: float) -> float:
    """The double value of the float32 nearest to x."""
    return float(np.float32(x))


# ---------------------------------------------------------------------------- inputs


def gradnoise(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255.0 * x / (w - 1)
    g = 255.0 * y / (h - 1)
    b = 127.5 + 127.5 * np.sin(2 * np.pi * (x + y) / (w + h))
    img = np.stack([r, g, b], axis=-1) + rng.normal(0.0, 12.0, (h, w, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def photo(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    # Sky: vertical blue-to-warm gradient.
    t = y / (h - 1)
    img = np.stack([70 + 150 * t, 120 + 80 * t, 230 - 120 * t], axis=-1)
    # Ground: green-brown, lower third.
    ground = y > 0.66 * h
    img[ground] = np.array([95.0, 120.0, 40.0]) + 30.0 * np.sin(x[ground] / 3.0)[:, None]
    # Shaded discs with hard edges.
    for _ in range(5):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rad = rng.uniform(0.08, 0.25) * min(w, h)
        col = rng.uniform(0, 255, 3)
        d = np.hypot(x - cx, y - cy)
        inside = d < rad
        shade = (1.0 - 0.5 * (d / rad))[..., None]
        img = np.where(inside[..., None], col * shade, img)
    # Stripes (high frequency), a saturated patch, a gray patch, clipped corners.
    sx0, sy0 = w // 8, h // 8
    stripes = ((x // 2) % 2 == 0) & (x >= sx0) & (x < sx0 + w // 5) & (y >= sy0) & (y < sy0 + h // 4)
    img[stripes] = [250, 240, 20]
    img[(x >= w - w // 6) & (y < h // 5)] = [255, 0, 0]
    img[(x >= w - w // 6) & (y >= h // 5) & (y < 2 * h // 5)] = [0, 40, 255]
    img[(x < w // 6) & (y >= h // 2) & (y < h // 2 + h // 6)] = [128, 128, 128]
    img[(x < 4) & (y < 4)] = [255, 255, 255]
    img[(x >= w - 4) & (y >= h - 4)] = [0, 0, 0]
    img = img + rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def hue_edges(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    px: list[list[int]] = [[v, v, v] for v in range(256)]
    for _ in range(120):
        a, b = (int(v) for v in rng.integers(0, 256, 2))
        px += [[a, a, b], [a, b, a], [b, a, a]]
    for a in (0, 1, 127, 128, 254, 255):
        for b in (0, 1, 128, 255):
            px += [[a, b, b], [b, a, b], [b, b, a], [a, a, b], [a, b, a], [b, a, a]]
    px += [
        [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255],
        [255, 128, 0], [128, 255, 0], [0, 255, 128], [0, 128, 255], [128, 0, 255], [255, 0, 128],
        [1, 0, 0], [0, 1, 0], [0, 0, 1], [255, 254, 254], [254, 255, 254], [254, 254, 255],
    ]
    # Distinct channels a > b > c in all six orders.
    for _ in range(60):
        a, b, c = sorted((int(v) for v in rng.choice(256, 3, replace=False)), reverse=True)
        px += [[a, b, c], [a, c, b], [b, a, c], [c, a, b], [b, c, a], [c, b, a]]
    n = w * h
    assert len(px) <= n, len(px)
    rest = rng.integers(0, 256, (n - len(px), 3))
    arr = np.concatenate([np.array(px, dtype=np.int64), rest], axis=0)
    return arr.reshape(h, w, 3).astype(np.uint8)


# ----------------------------------------------------------------------- reference ops


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def from_tensor(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.uint8
    return np.ascontiguousarray(t.permute(1, 2, 0).numpy())


def pil_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(a, "RGB").filter(ImageFilter.GaussianBlur(radius=sigma)))


JITTER = {
    0: lambda t, p: F.adjust_brightness(t, p["brightness"]),
    1: lambda t, p: F.adjust_contrast(t, p["contrast"]),
    2: lambda t, p: F.adjust_saturation(t, p["saturation"]),
    3: lambda t, p: F.adjust_hue(t, p["hue"]),
}


def jitter(a: np.ndarray, p: dict) -> np.ndarray:
    t = to_tensor(a)
    for op in p["order"]:
        t = JITTER[op](t, p)
    return from_tensor(t)


def strong(a: np.ndarray, p: dict) -> np.ndarray:
    if p["jitter"] is not None:
        a = jitter(a, p["jitter"])
    if p["grayscale"]:
        a = from_tensor(F.rgb_to_grayscale(to_tensor(a), num_output_channels=3).contiguous())
    if p["blur"] is not None:
        a = pil_blur(a, p["blur"])
    if p["solarize"]:
        a = from_tensor(F.solarize(to_tensor(a), 128))
    return a


def colour(op: str, a: np.ndarray, p: dict) -> np.ndarray:
    t = to_tensor(a)
    if op == "adjust_brightness":
        t = F.adjust_brightness(t, p["factor"])
    elif op == "adjust_contrast":
        t = F.adjust_contrast(t, p["factor"])
    elif op == "adjust_saturation":
        t = F.adjust_saturation(t, p["factor"])
    elif op == "adjust_hue":
        t = F.adjust_hue(t, p["factor"])
    elif op == "grayscale":
        t = F.rgb_to_grayscale(t, num_output_channels=3).contiguous()
    elif op == "solarize":
        t = F.solarize(t, p["threshold"])
    elif op == "hflip":
        t = F.hflip(t).contiguous()
    else:
        raise ValueError(op)
    return from_tensor(t)


def crop_resize(a: np.ndarray, p: dict) -> np.ndarray:
    img = Image.fromarray(a, "RGB")
    out = F.resized_crop(
        img, p["top"], p["left"], p["height"], p["width"],
        [p["out_height"], p["out_width"]], InterpolationMode.BICUBIC,
    )
    return np.asarray(out.convert("RGB"))


def eval_view(encoded: bytes, p: dict) -> np.ndarray:
    img = Image.open(io.BytesIO(encoded)).convert("RGB")
    tf = T.Compose([
        T.Resize(p["resize_short"], interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(p["crop"]),
    ])
    return np.asarray(tf(img))


# ------------------------------------------------------------------------------- main


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.use_deterministic_algorithms(True)

    inputs: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    encoded: dict[str, bytes] = {}

    def add_input(name: str, a: np.ndarray, enc: tuple[str, bytes] | None = None) -> None:
        h, w, c = a.shape
        assert c == 3 and a.dtype == np.uint8
        (OUT / f"{name}.rgb").write_bytes(a.tobytes())
        entry = {"file": f"{name}.rgb", "width": w, "height": h}
        if enc is not None:
            (OUT / enc[0]).write_bytes(enc[1])
            entry["encoded"] = enc[0]
            encoded[name] = enc[1]
        inputs[name] = entry
        arrays[name] = a

    add_input("gradnoise", gradnoise(64, 48, 1))
    add_input("photo", photo(64, 48, 2))
    add_input("hue_edges", hue_edges(64, 48, 3))
    buf = io.BytesIO()
    Image.fromarray(photo(64, 48, 4), "RGB").save(buf, "JPEG", quality=90, subsampling=2)
    jpg = buf.getvalue()
    add_input("jpeg", np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")), ("jpeg.jpg", jpg))
    for name, a in (("big", photo(128, 96, 5)), ("tall", gradnoise(75, 101, 6))):
        buf = io.BytesIO()
        Image.fromarray(a, "RGB").save(buf, "PNG", optimize=True)
        png = buf.getvalue()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), a)
        add_input(name, a, (f"{name}.png", png))

    cases: list[dict] = []

    def add_case(name: str, op: str, inp: str, params: dict, out: np.ndarray, identity: bool = False) -> None:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, out.shape
        assert all(c["name"] != name for c in cases), name
        h, w, _ = out.shape
        file = f"{name}.rgb"
        (OUT / file).write_bytes(np.ascontiguousarray(out).tobytes())
        cases.append({
            "name": name, "op": op, "input": inp, "params": params,
            "width": w, "height": h, "file": file, "identity": identity,
        })

    # Single colour ops.
    factors = {
        "adjust_brightness": [0.0, 0.6, 0.85, 1.0, 1.4],
        "adjust_contrast": [0.0, 0.6, 1.0, 1.234, 1.4],
        "adjust_saturation": [0.0, 0.8, 1.0, 1.2, 1.9],
        "adjust_hue": [-0.5, -0.1, -0.037, 0.0, 0.05, 0.1, 0.25, 1.0 / 3.0, 0.5],
    }
    for op, fs in factors.items():
        srcs = ["gradnoise", "photo", "hue_edges"] if op == "adjust_hue" else ["gradnoise", "photo"]
        for src in srcs:
            for f in fs:
                f = f32(f)
                out = colour(op, arrays[src], {"factor": f})
                neutral = 0.0 if op == "adjust_hue" else 1.0
                add_case(f"{op}_{src}_{f:+.4f}", op, src, {"factor": f}, out, identity=f == neutral)
    for src in ("photo", "hue_edges", "jpeg"):
        add_case(f"grayscale_{src}", "grayscale", src, {}, colour("grayscale", arrays[src], {}))
    for src in ("gradnoise", "photo"):
        add_case(f"solarize_{src}", "solarize", src, {"threshold": 128},
                 colour("solarize", arrays[src], {"threshold": 128}))
        add_case(f"hflip_{src}", "hflip", src, {}, colour("hflip", arrays[src], {}))

    # Colour jitter in several orders (ColorJitter.forward with fn_idx = order).
    jitters = [
        ([0, 1, 2, 3], 1.3, 0.7, 1.15, 0.08),
        ([3, 2, 1, 0], 0.65, 1.35, 0.85, -0.09),
        ([1, 3, 0, 2], 1.1, 0.9, 0.95, 0.1),
        ([2, 0, 3, 1], 0.8, 1.2, 1.2, -0.1),
    ]
    for i, (order, b, c, s, h) in enumerate(jitters):
        p = {"order": order, "brightness": f32(b), "contrast": f32(c), "saturation": f32(s), "hue": f32(h)}
        for src in ("gradnoise", "photo"):
            add_case(f"color_jitter_{src}_{i}", "color_jitter", src, p, jitter(arrays[src], p))

    # PIL Gaussian blur.
    for src, sigmas in (("photo", [0.1, 0.3, 0.5, 0.77, 1.0, 1.5, 2.0, 3.0, 6.5]), ("gradnoise", [0.2, 1.2, 1.9]), ("hue_edges", [0.9])):
        for s in sigmas:
            s = f32(s)
            add_case(f"gaussian_blur_{src}_{s:.4f}", "gaussian_blur", src, {"sigma": s}, pil_blur(arrays[src], s))

    # The whole strong view.
    strongs = [
        {"jitter": {"order": [3, 0, 2, 1], "brightness": 0.9, "contrast": 1.3, "saturation": 0.8, "hue": 0.05},
         "grayscale": False, "blur": None, "solarize": False},
        {"jitter": {"order": [0, 1, 2, 3], "brightness": 1.2, "contrast": 0.75, "saturation": 1.1, "hue": -0.07},
         "grayscale": False, "blur": 1.3, "solarize": True},
        {"jitter": {"order": [2, 3, 1, 0], "brightness": 0.7, "contrast": 1.1, "saturation": 0.9, "hue": 0.02},
         "grayscale": True, "blur": 0.6, "solarize": False},
        {"jitter": None, "grayscale": True, "blur": None, "solarize": True},
        {"jitter": None, "grayscale": False, "blur": 1.8, "solarize": False},
        {"jitter": {"order": [1, 0, 3, 2], "brightness": 1.05, "contrast": 1.39, "saturation": 1.19, "hue": 0.1},
         "grayscale": False, "blur": None, "solarize": True},
    ]
    for i, p in enumerate(strongs):
        if p["jitter"] is not None:
            p["jitter"] = {k: (v if k == "order" else f32(v)) for k, v in p["jitter"].items()}
        if p["blur"] is not None:
            p["blur"] = f32(p["blur"])
        for src in ("photo", "gradnoise"):
            add_case(f"apply_strong_{src}_{i}", "apply_strong", src, p, strong(arrays[src], p))

    # Crop + resize (RandomResizedCrop's F.resized_crop on a PIL image, bicubic).
    crops = [
        ("big", 10, 20, 60, 80, 224, 224),
        ("big", 0, 0, 96, 128, 48, 48),
        ("big", 30, 40, 37, 29, 56, 56),
        ("big", 5, 3, 90, 100, 40, 40),
        ("big", 17, 9, 23, 23, 23, 23),
        ("tall", 7, 2, 80, 61, 32, 32),
        ("tall", 50, 30, 13, 17, 44, 44),
    ]
    for src, top, left, h, w, oh, ow in crops:
        p = {"top": top, "left": left, "height": h, "width": w, "out_height": oh, "out_width": ow}
        add_case(f"crop_resize_{src}_{top}_{left}_{h}x{w}_to_{ow}x{oh}", "crop_resize", src, p,
                 crop_resize(arrays[src], p))

    # Eval transform: Resize(short, bicubic) + CenterCrop(crop) on the decoded file.
    for src, short, crop in (("big", 48, 40), ("big", 64, 56), ("tall", 40, 32), ("jpeg", 40, 36)):
        p = {"resize_short": short, "crop": crop}
        add_case(f"eval_{src}_{short}_{crop}", "eval", src, p, eval_view(encoded[src], p))

    # JPEG decode (PIL / libjpeg-turbo) of jpeg.jpg.
    add_case("decode_jpeg", "decode", "jpeg", {}, arrays["jpeg"], identity=True)

    index = {
        "generator": "tools/parity/make_fixtures.py",
        "rerun": RERUN,
        "layout": "raw interleaved RGB8, row-major, height * width * 3 bytes",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
        "inputs": inputs,
        "cases": cases,
    }
    (OUT / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {len(cases)} cases, {len(inputs)} inputs, {total} bytes to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
