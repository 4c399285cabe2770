#!/usr/bin/env python3
"""The Python peer of `conmim-shard imagenet` in copy mode, for benchmarks.

    python wds_shardwriter.py --root IMAGENET_TRAIN_DIR --out OUTDIR \
        [--maxsize BYTES] [--maxcount N]

Walks ROOT/<wnid>/* (wnids sorted: position = class index; files sorted by name),
reads each file's bytes and writes the sample
{"__key__": stem, "<ext>": bytes, "cls": str(label)} with webdataset.ShardWriter
to OUTDIR/train-%06d.tar. No decoding and no validation: the bytes are copied as
they are, which is what copy mode does. <ext> is the file's extension lowercased,
with jpeg mapped to jpg. Dots in a stem become "_" (a dot would split the key).

Prints one JSON line at the end:
{"files": n, "bytes": image bytes, "seconds": wall, "files_per_s": ..,
 "mb_per_s": .. (10^6 bytes per second), "shards": n}
Run it with the venv's interpreter ($CONMIM_PYTHON, see tools/env.sh).
"""

import argparse
import json
import os
import sys
import time

import webdataset as wds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="ImageNet train directory (ROOT/<wnid>/<file>)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--maxsize", type=float, default=3e9, help="max bytes per shard (default 3e9)")
    p.add_argument("--maxcount", type=int, default=100000, help="max samples per shard (default 100000)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    wnids = sorted(e.name for e in os.scandir(args.root) if e.is_dir())
    if not wnids:
        print(f"wds_shardwriter: no class directories under {args.root}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)

    files = 0
    total = 0
    pattern = os.path.join(args.out, "train-%06d.tar")
    with wds.ShardWriter(pattern, maxsize=args.maxsize, maxcount=args.maxcount, verbose=0) as sink:
        for label, wnid in enumerate(wnids):
            class_dir = os.path.join(args.root, wnid)
            names = sorted(e.name for e in os.scandir(class_dir) if e.is_file())
            for name in names:
                stem, dot, ext = name.rpartition(".")
                if not dot or not stem:
                    stem, ext = name, "bin"
                ext = ext.lower()
                if ext == "jpeg":
                    ext = "jpg"
                with open(os.path.join(class_dir, name), "rb") as f:
                    data = f.read()
                sink.write({"__key__": stem.replace(".", "_"), ext: data, "cls": str(label)})
                files += 1
                total += len(data)
        shards = sink.shard
    seconds = time.perf_counter() - t0

    print(json.dumps({
        "files": files,
        "bytes": total,
        "seconds": round(seconds, 6),
        "files_per_s": round(files / seconds, 3) if seconds > 0 else None,
        "mb_per_s": round(total / 1e6 / seconds, 3) if seconds > 0 else None,
        "shards": shards,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
