#!/usr/bin/env python3
"""The PyTorch reference data path for ConMIM pretraining, for benchmarks.

    python torch_loader.py --data DIR [--split train] [--threads N] [--batch B]
        [--seconds S] [--warmup-batches K] [--json]

The "usual" PIL/torchvision input pipeline of the official ConMIM (BEiT-derived)
code, run on a dataset written by `conmim-shard` as the peer of our Rust loader:

  webdataset.WebDataset(shard urls of {DIR}/{split}.manifest.json)
    -> shuffle buffer -> decode("pilrgb") (PIL, converted to RGB like the
       official pil_loader) -> ConMIM transform -> DataLoader(num_workers=N)

ConMIM transform (CONMIM_SPEC.md, "Augmentation"), per sample:
  * shared: RandomHorizontalFlip(0.5), RandomResizedCrop(224, scale=(0.08, 1),
    ratio=(3/4, 4/3), bicubic) -> one crop;
  * student (weak) view: that crop;
  * teacher (strong) view: the same crop, then ColorJitter(0.4, 0.4, 0.2, 0.1)
    with p=0.8, RandomGrayscale(0.2), GaussianBlur (PIL ImageFilter, radius
    U(0.1, 2.0)) with p=0.1, Solarization (invert >= 128) with p=0.2;
  * both as uint8 CHW tensors (no normalisation: our loader ships u8 and
    normalising is the GPU's job), plus a random patch mask of exactly
    N - floor(N * 0.25) patches (147 of the 196 patches at 224/16), and the label.

Shards: by default `resampled=True` (each worker draws shards with replacement
forever, as large-scale WebDataset training does), so the measurement is steady
state with no epoch-end drain; `--no-resampled` reads shuffled epochs
(shardshuffle) split between workers and starts a new DataLoader epoch whenever
one ends (with fewer shards than workers, some workers sit idle there).

Timing: the first K batches (--warmup-batches, default 2 per worker, at least 2)
are not counted (worker start-up, first shards); then batches are counted for S
seconds. With --json prints one JSON object:
{"impl": "pytorch", "img_per_s", "images", "batches", "seconds", "threads",
 "batch", ..., "torch", "torchvision", "cpu_count"}; otherwise a short summary.
Run it with the venv's interpreter ($CONMIM_PYTHON, see tools/env.sh).
"""

import argparse
import json
import math
import os
import platform
import random
import sys
import time
import warnings

IMAGE_EXTS = "jpg;jpeg;png;webp;bmp;gif;tif;tiff"


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (head of this file) for the pipeline details.",
    )
    p.add_argument("--data", required=True,
                   help="dataset directory written by conmim-shard (or a .manifest.json)")
    p.add_argument("--split", default="train", help="split whose manifest is read (default train)")
    p.add_argument("--threads", type=int, default=1,
                   help="DataLoader worker processes (default 1; 0 = load in the main process)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="measured seconds after the warm-up (default 10)")
    p.add_argument("--warmup-batches", type=int, default=None,
                   help="batches not counted (default max(2, 2 * threads))")
    p.add_argument("--size", type=int, default=224, help="view side in pixels (default 224)")
    p.add_argument("--patch", type=int, default=16, help="patch size for the mask (default 16)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="masked fraction (default 0.75)")
    p.add_argument("--shuffle-buffer", type=int, default=2048,
                   help="sample shuffle buffer (default 2048, as our loader; 0 = off)")
    p.add_argument("--resampled", action=argparse.BooleanOptionalAction, default=True,
                   help="draw shards with replacement forever (default); "
                        "--no-resampled reads shuffled epochs")
    p.add_argument("--prefetch-factor", type=int, default=2,
                   help="batches prefetched per worker (default 2, DataLoader's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shard/sample shuffles")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error("--threads must be >= 0")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if not args.seconds > 0:
        p.error("--seconds must be > 0")
    if args.warmup_batches is not None and args.warmup_batches < 0:
        p.error("--warmup-batches must be >= 0")
    if args.size < 1 or args.patch < 1 or args.size % args.patch:
        p.error("--size must be a positive multiple of --patch")
    if not 0.0 <= args.mask_ratio <= 1.0:
        p.error("--mask-ratio must be in [0, 1]")
    if args.shuffle_buffer < 0 or args.prefetch_factor < 1:
        p.error("--shuffle-buffer must be >= 0 and --prefetch-factor >= 1")
    return args


def shard_urls(data, split):
    """Shard paths and total samples from a conmim-shard (wids-style) manifest."""
    manifest = data if data.endswith(".json") else os.path.join(data, f"{split}.manifest.json")
    with open(manifest) as f:
        m = json.load(f)
    base = os.path.dirname(os.path.abspath(manifest))
    urls, total = [], 0
    for entry in m.get("shardlist", []):
        url = entry["url"]
        if "://" not in url and not url.startswith("pipe:") and not os.path.isabs(url):
            url = os.path.join(base, url)
        urls.append(url)
        total += int(entry.get("nsamples") or 0)
    if not urls:
        raise ValueError(f"{manifest} lists no shards")
    return manifest, urls, total


class PILGaussianBlur:
    """Gaussian blur with a radius drawn from U(lo, hi) (BYOL/DINO/ConMIM style)."""

    def __init__(self, radius_min=0.1, radius_max=2.0):
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class PatchMask:
    """MAE-style random mask: exactly N - floor(N * (1 - ratio)) of N patches (1 = masked)."""

    def __init__(self, grid, ratio):
        import numpy as np

        self.n = grid * grid
        self.shape = (grid, grid)
        self.num_masked = self.n - int(math.floor(self.n * (1.0 - ratio)))
        self.template = np.hstack([np.zeros(self.n - self.num_masked, dtype=np.uint8),
                                   np.ones(self.num_masked, dtype=np.uint8)])

    def __call__(self):
        import numpy as np

        m = self.template.copy()
        np.random.shuffle(m)
        return m.reshape(self.shape)


class ConMIMTransform:
    """One crop shared by both views; the teacher's view gets the strong ops."""

    def __init__(self, size, patch, mask_ratio):
        from torchvision import transforms as T
        from torchvision.transforms import InterpolationMode

        self.common = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                                interpolation=InterpolationMode.BICUBIC),
        ])
        self.strong = T.Compose([
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PILGaussianBlur(0.1, 2.0)], p=0.1),
            T.RandomSolarize(threshold=128, p=0.2),
        ])
        self.mask = PatchMask(size // patch, mask_ratio)

    def __call__(self, img):
        import torch
        from torchvision.transforms import functional as F

        crop = self.common(img)
        weak = F.pil_to_tensor(crop)
        strong = F.pil_to_tensor(self.strong(crop))
        return weak, strong, torch.from_numpy(self.mask())


class MakeSample:
    """(image, cls) -> (weak, strong, mask, label); a class so it pickles for any start method."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, sample):
        img, label = sample
        weak, strong, mask = self.transform(img)
        return weak, strong, mask, int(label)


def build_loader(args, urls):
    import torch
    import webdataset as wds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wds warns about shardshuffle in resampled mode
        ds = wds.WebDataset(
            urls,
            resampled=args.resampled,
            shardshuffle=False if args.resampled else len(urls),
            handler=wds.warn_and_continue,
            empty_check=False,
            seed=args.seed,
        )
    if args.shuffle_buffer > 0:
        ds = ds.shuffle(args.shuffle_buffer)
    ds = (ds.decode("pilrgb", handler=wds.warn_and_continue)
            .to_tuple(IMAGE_EXTS, "cls", handler=wds.warn_and_continue)
            .map(MakeSample(ConMIMTransform(args.size, args.patch, args.mask_ratio)),
                 handler=wds.warn_and_continue))
    kw = {}
    if args.threads > 0:
        kw = {"persistent_workers": True, "prefetch_factor": args.prefetch_factor}
    return torch.utils.data.DataLoader(
        ds, batch_size=args.batch, num_workers=args.threads, pin_memory=False, **kw)


def run(args):
    import torch
    import torchvision

    manifest, urls, total = shard_urls(args.data, args.split)
    if not args.resampled and 0 < len(urls) < args.threads:
        print(f"torch_loader: {len(urls)} shards for {args.threads} workers: "
              f"{args.threads - len(urls)} workers idle (use --resampled)", file=sys.stderr)
    warmup = args.warmup_batches if args.warmup_batches is not None else max(2, 2 * args.threads)
    loader = build_loader(args, urls)

    images = batches = epochs = 0
    seen_warmup = 0
    t_start = time.perf_counter()
    t0 = None
    deadline = None
    it = None
    try:
        while True:
            got_any = False
            it = iter(loader)
            if warmup == 0 and t0 is None:
                # No warm-up: the clock starts before the first batch, as on the Rust side
                # (whose clock starts before its first `next()`).
                t0 = time.perf_counter()
                deadline = t0 + args.seconds
            for weak, strong, mask, _label in it:
                got_any = True
                n = weak.shape[0]
                if seen_warmup < warmup:
                    seen_warmup += 1
                    if seen_warmup == warmup:
                        t0 = time.perf_counter()
                        deadline = t0 + args.seconds
                    continue
                images += n
                batches += 1
                if time.perf_counter() >= deadline:
                    break
            else:
                # The loader's epoch ended (only without --resampled): start another one.
                epochs += 1
                if not got_any:
                    raise RuntimeError("the loader yields no samples (all shards failed or are empty?)")
                continue
            break
        t1 = time.perf_counter()
    finally:
        # Shut the persistent workers down before the interpreter exits.
        del it
        del loader
    seconds = t1 - t0
    return {
        "impl": "pytorch",
        "img_per_s": images / seconds if seconds > 0 else 0.0,
        "images": images,
        "batches": batches,
        "seconds": seconds,
        "threads": args.threads,
        "batch": args.batch,
        "warmup_batches": warmup,
        "warmup_seconds": t0 - t_start,
        "loader_epochs_ended": epochs,
        "size": args.size,
        "mask_patches": ConMIMTransform(args.size, args.patch, args.mask_ratio).mask.num_masked,
        "resampled": args.resampled,
        "shuffle_buffer": args.shuffle_buffer,
        "shards": len(urls),
        "dataset_samples": total,
        "manifest": manifest,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": __import__("PIL").__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def main(argv=None):
    args = parse_args(argv)
    try:
        r = run(args)
    except KeyboardInterrupt:
        print("torch_loader: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"torch_loader: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
    else:
        print(f"pytorch loader: {r['img_per_s']:.1f} img/s "
              f"({r['images']} images in {r['seconds']:.2f} s, {r['batches']} batches of {r['batch']}, "
              f"{r['threads']} workers, warm-up {r['warmup_batches']} batches in {r['warmup_seconds']:.2f} s)")
        print(f"  {r['shards']} shards, {r['dataset_samples']} samples, "
              f"{'resampled' if r['resampled'] else 'epochs'}, shuffle buffer {r['shuffle_buffer']}, "
              f"views {r['size']}px, {r['mask_patches']} masked patches")
        print(f"  torch {r['torch']}, torchvision {r['torchvision']}, pillow {r['pillow']}, "
              f"python {r['python']}, {r['cpu_count']} CPUs ({r['cpu_affinity']} usable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
