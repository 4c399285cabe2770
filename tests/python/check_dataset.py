#!/usr/bin/env python3
"""Checks a conmim dataset split with the real Python libraries.

    $CONMIM_PYTHON tests/python/check_dataset.py DATASET_DIR SPLIT

Reads `{split}.index.parquet` (pyarrow and pandas), `{split}.manifest.json` and
`{split}.rejected.jsonl`, validates them against ../../schemas/, and reads every
shard twice: through the public `webdataset.WebDataset` pipeline (no decoding, so
values are the raw member bytes) and with `tarfile` (member offsets). Every
sample must agree with its index row. The format is described in schemas/README.md.

Exits 0 with a one-line summary when every check passes; otherwise prints the
first mismatches (naming shard and key) and exits 1.
"""

import argparse
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import warnings
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMAS = os.path.normpath(os.path.join(HERE, "..", "..", "schemas"))

# Keep webdataset from caching shards.
for _var in ("WDS_CACHE", "WDS_CACHE_SIZE"):
    os.environ.pop(_var, None)
# We read raw bytes and need nothing from torch, but webdataset imports it when it is
# installed (seconds per run). With torch blocked, webdataset uses its own torch-free
# stand-ins (webdataset/pytorch.py), exactly as where torch is not installed.
sys.modules.setdefault("torch", None)

import jsonschema  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

Image.MAX_IMAGE_PIXELS = None  # we only read headers; big images are fine

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
MEMBER_RE = re.compile(r"^([A-Za-z0-9_-]+)\.([a-z0-9]+(?:\.[a-z0-9]+)*)$")
FORMATS = ("jpeg", "png", "gif", "webp", "bmp", "tiff")
IMAGE_EXTS = {"jpg", "png", "gif", "webp", "bmp", "tiff"}
# Pillow's format names for the index's `format` values.
PIL_FORMATS = {
    "JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "GIF": "gif",
    "WEBP": "webp", "BMP": "bmp", "DIB": "bmp", "TIFF": "tiff",
}
USTAR_MAGIC = b"ustar\x0000"
BLOCK = 512


def image_ext(fmt):
    return "jpg" if fmt == "jpeg" else fmt


def md5_file(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_schema(name):
    with open(os.path.join(SCHEMAS, name), encoding="utf-8") as f:
        schema = json.load(f)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(validator, instance):
    """The validation errors of `instance`, as short strings."""
    out = []
    for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        out.append(f"{path}: {e.message[:300]}")
    return out


class Checker:
    def __init__(self, root, split, max_errors, check_images):
        self.root = root
        self.split = split
        self.max_errors = max_errors
        self.check_images = check_images
        self.errors = []

    def fail(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    def path(self, name):
        return os.path.join(self.root, name)

    # -- files -----------------------------------------------------------------

    def run(self):
        split = self.split
        manifest_name = f"{split}.manifest.json"
        index_name = f"{split}.index.parquet"
        rejected_name = f"{split}.rejected.jsonl"

        try:
            v_manifest = load_schema("manifest.schema.json")
            v_sample = load_schema("sample.schema.json")
            v_rejected = load_schema("rejected.schema.json")
            with open(os.path.join(SCHEMAS, "index.arrow.json"), encoding="utf-8") as f:
                golden = json.load(f)
        except (OSError, ValueError, jsonschema.SchemaError) as e:
            self.fail("schemas", f"cannot load the schemas in {SCHEMAS}: {e}")
            return None
        self.v_sample = v_sample

        # manifest
        try:
            with open(self.path(manifest_name), encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            self.fail(manifest_name, f"cannot read: {e}")
            return None
        errs = schema_errors(v_manifest, manifest)
        for e in errs:
            self.fail(manifest_name, f"schema: {e}")
        if errs:
            return None
        info = manifest["conmim"]
        shardlist = manifest["shardlist"]

        # index: both readers
        try:
            table = pq.read_table(self.path(index_name))
        except Exception as e:  # noqa: BLE001 — any reader failure is a finding
            self.fail(index_name, f"pyarrow.parquet.read_table failed: {e!r}")
            return None
        try:
            df = pd.read_parquet(self.path(index_name))
        except Exception as e:  # noqa: BLE001
            self.fail(index_name, f"pandas.read_parquet failed: {e!r}")
            return None
        got = [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in table.schema]
        if got != golden:
            for i in range(max(len(got), len(golden))):
                g = got[i] if i < len(got) else None
                w = golden[i] if i < len(golden) else None
                if g != w:
                    self.fail(index_name, f"schema column {i}: got {g}, golden schemas/index.arrow.json has {w}")
            return None
        if len(df) != table.num_rows or list(df.columns) != table.column_names:
            self.fail(index_name, f"pandas sees {len(df)} rows {list(df.columns)}, "
                                  f"pyarrow {table.num_rows} rows {table.column_names}")
        elif df["key"].tolist() != table.column("key").to_pylist():
            self.fail(index_name, "pandas and pyarrow disagree on the keys")
        rows = table.to_pylist()

        # rejected list
        rejected = []
        try:
            with open(self.path(rejected_name), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            self.fail(rejected_name, f"cannot read: {e}")
            lines = None
        for n, line in enumerate(lines or [], 1):
            if not line.strip():
                self.fail(f"{rejected_name}:{n}", "blank line")
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                self.fail(f"{rejected_name}:{n}", f"not JSON: {e}")
                continue
            for e in schema_errors(v_rejected, obj):
                self.fail(f"{rejected_name}:{n}", f"schema: {e}")
            rejected.append(obj)

        # counts
        total_ns = sum(s["nsamples"] for s in shardlist)
        if manifest["name"] != split or info["split"] != split:
            self.fail(manifest_name, f"name {manifest['name']!r} / conmim.split {info['split']!r} != split {split!r}")
        if not (info["num_samples"] == len(rows) == total_ns):
            self.fail(manifest_name, f"conmim.num_samples {info['num_samples']}, index rows {len(rows)}, "
                                     f"sum of shard nsamples {total_ns} differ")
        if lines is not None and info["num_rejected"] != len(lines):
            self.fail(manifest_name, f"conmim.num_rejected {info['num_rejected']} != "
                                     f"{len(lines)} lines in {rejected_name}")
        if info["num_inputs"] != info["num_samples"] + info["num_rejected"]:
            self.fail(manifest_name, f"conmim.num_inputs {info['num_inputs']} != num_samples + num_rejected")
        if info["num_shards"] != len(shardlist):
            self.fail(manifest_name, f"conmim.num_shards {info['num_shards']} != {len(shardlist)} shards")
        if info["total_bytes"] != sum(s["filesize"] for s in shardlist):
            self.fail(manifest_name, f"conmim.total_bytes {info['total_bytes']} != sum of shard filesizes")
        if lines is not None:
            by_reason = Counter(r.get("reason") for r in rejected)
            if dict(by_reason) != info["rejected_by_reason"]:
                self.fail(manifest_name, f"conmim.rejected_by_reason {info['rejected_by_reason']} != "
                                         f"counts in {rejected_name} {dict(by_reason)}")
        urls = [s["url"] for s in shardlist]
        if len(set(urls)) != len(urls):
            self.fail(manifest_name, "shardlist names a shard twice")

        # index rows: keys, shard positions
        seen = {}
        per_shard = defaultdict(list)
        for i, r in enumerate(rows):
            key = r["key"]
            where = f"{index_name} row {i} key {key!r}"
            if not KEY_RE.match(key):
                self.fail(where, "key has characters outside [A-Za-z0-9_-]")
            if key in seen:
                self.fail(where, f"duplicate key (also row {seen[key]})")
            seen[key] = i
            if r["format"] not in FORMATS:
                self.fail(where, f"format {r['format']!r} not one of {FORMATS}")
            if not re.fullmatch(r"[0-9a-f]{64}", r["sha256"]):
                self.fail(where, f"sha256 {r['sha256']!r} is not 64 lowercase hex digits")
            if r["shard"] >= len(shardlist):
                self.fail(where, f"shard {r['shard']} out of range (shardlist has {len(shardlist)})")
                continue
            per_shard[r["shard"]].append(r)

        # shards
        for n, entry in enumerate(shardlist):
            expected = sorted(per_shard.get(n, []), key=lambda r: r["offset"])
            self.check_shard(n, entry, expected)
            if len(self.errors) >= self.max_errors:
                break

        return {
            "samples": len(rows),
            "shards": len(shardlist),
            "rejected": len(rejected),
            "bytes": sum(s["filesize"] for s in shardlist),
            "dataset": info["dataset"],
        }

    # -- one shard ---------------------------------------------------------------

    def check_shard(self, n, entry, expected):
        url = entry["url"]
        path = self.path(url)
        where = f"shard {n} {url}"
        if not os.path.isfile(path):
            self.fail(where, "missing")
            return
        size = os.path.getsize(path)
        if size != entry["filesize"]:
            self.fail(where, f"size {size} != manifest filesize {entry['filesize']}")
        md5 = md5_file(path)
        if md5 != entry["md5sum"]:
            self.fail(where, f"md5 {md5} != manifest md5sum {entry['md5sum']}")
        if len(expected) != entry["nsamples"]:
            self.fail(where, f"index has {len(expected)} rows for it, manifest nsamples {entry['nsamples']}")

        self.check_tar_layout(where, path, size, expected)
        self.check_samples(where, path, expected)

    def check_tar_layout(self, where, path, size, expected):
        """Member names, order, ustar headers, and each sample's offset and length."""
        groups = []  # [key, header offset of first member, end of last member, [exts]]
        done = set()
        try:
            with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
                for ti in tf:
                    raw.seek(ti.offset)
                    header = raw.read(BLOCK)
                    if header[257:265] != USTAR_MAGIC:
                        self.fail(where, f"member {ti.name!r} at {ti.offset}: not a POSIX ustar header "
                                         f"(magic {header[257:265]!r})")
                    if not ti.isreg():
                        self.fail(where, f"member {ti.name!r}: not a regular file")
                        continue
                    m = MEMBER_RE.match(ti.name)
                    if not m:
                        self.fail(where, f"member {ti.name!r}: not named key.ext")
                        continue
                    key, ext = m.groups()
                    end = ti.offset_data + (ti.size + BLOCK - 1) // BLOCK * BLOCK
                    if groups and groups[-1][0] == key:
                        if ext in groups[-1][3]:
                            self.fail(where, f"key {key!r}: member .{ext} twice")
                        groups[-1][2] = end
                        groups[-1][3].append(ext)
                    else:
                        if key in done:
                            self.fail(where, f"key {key!r}: members not consecutive")
                        if groups:
                            done.add(groups[-1][0])
                        groups.append([key, ti.offset, end, [ext]])
        except (tarfile.TarError, OSError) as e:
            self.fail(where, f"tarfile cannot read it: {e}")
            return
        last_end = groups[-1][2] if groups else 0
        with open(path, "rb") as f:
            f.seek(last_end)
            tail = f.read()
        if len(tail) < 2 * BLOCK or tail.strip(b"\0"):
            self.fail(where, f"archive does not end with zero blocks after its last member "
                             f"({len(tail)} bytes after offset {last_end})")

        got_keys = [g[0] for g in groups]
        want_keys = [r["key"] for r in expected]
        if got_keys != want_keys:
            self.fail(where, f"tar holds {len(got_keys)} samples, index {len(want_keys)}; "
                             f"first difference: {first_diff(got_keys, want_keys)}")
            return
        for (key, start, end, exts), r in zip(groups, expected):
            kw = f"{where} key {key!r}"
            if start != r["offset"]:
                self.fail(kw, f"first header at {start}, index offset {r['offset']}")
            if end - start != r["length"]:
                self.fail(kw, f"members span {end - start} bytes, index length {r['length']}")
            if ",".join(exts) != r["members"]:
                self.fail(kw, f"members {','.join(exts)!r} in the tar, index members {r['members']!r}")

    def check_samples(self, where, path, expected):
        """Iterates the shard through webdataset and checks every sample's members."""
        ds = wds.WebDataset(
            [path],  # a list: no brace expansion of the path
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=None,
            empty_check=False,
        )
        count = 0
        it = iter(expected)
        try:
            for sample in ds:
                count += 1
                r = next(it, None)
                key = sample["__key__"]
                if r is None:
                    self.fail(where, f"webdataset yields an extra sample {key!r} (#{count})")
                    continue
                if key != r["key"]:
                    self.fail(where, f"webdataset sample #{count} is {key!r}, index says {r['key']!r}")
                    return
                self.check_sample(f"{where} key {key!r}", sample, r)
                if len(self.errors) >= self.max_errors:
                    return
        except Exception as e:  # noqa: BLE001 — a reader failure is a finding
            self.fail(where, f"webdataset failed after {count} samples: {e!r}")
            return
        if count != len(expected):
            self.fail(where, f"webdataset yields {count} samples, index has {len(expected)}")

    def check_sample(self, where, sample, r):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        listed = r["members"].split(",")
        if sorted(members) != sorted(listed):
            self.fail(where, f"webdataset members {sorted(members)} != index members {listed}")

        ext = image_ext(r["format"])
        data = members.get(ext)
        if data is None:
            self.fail(where, f"no image member .{ext} (format {r['format']})")
        else:
            if len(data) != r["image_bytes"]:
                self.fail(where, f".{ext} has {len(data)} bytes, index image_bytes {r['image_bytes']}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != r["sha256"]:
                self.fail(where, f".{ext} sha256 {digest} != index sha256 {r['sha256']}")
            if self.check_images:
                self.check_image(where, ext, data, r)
        others = [m for m in members if m in IMAGE_EXTS and m != ext]
        if others:
            self.fail(where, f"more than one image member: {others + [ext]}")

        cls = members.get("cls")
        if r["label"] is not None:
            if cls is None:
                self.fail(where, f"label {r['label']} but no .cls member")
            else:
                try:
                    value = int(cls.decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    value = None
                if value != r["label"]:
                    self.fail(where, f".cls is {cls[:40]!r}, index label {r['label']}")
        elif cls is not None:
            self.fail(where, f".cls member {cls[:40]!r} but index label is null")

        txt = members.get("txt")
        if txt is not None:
            try:
                text = txt.decode("utf-8")
            except UnicodeDecodeError as e:
                self.fail(where, f".txt is not UTF-8: {e}")
            else:
                if r["caption"] is not None and text != r["caption"]:
                    self.fail(where, f".txt {text[:60]!r} != index caption {r['caption'][:60]!r}")

        meta = members.get("json")
        if meta is not None:
            try:
                obj = json.loads(meta.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                self.fail(where, f".json does not parse: {e}")
            else:
                for e in schema_errors(self.v_sample, obj):
                    self.fail(where, f".json schema: {e}")

        seg = members.get("seg.png")
        if r["target"] is not None and seg is None:
            self.fail(where, f"index target {r['target']!r} but no .seg.png member")
        if seg is not None and self.check_images:
            try:
                with Image.open(io.BytesIO(seg)) as im:
                    if im.format != "PNG":
                        self.fail(where, f".seg.png is {im.format}, not PNG")
                    elif im.size != (r["width"], r["height"]):
                        self.fail(where, f".seg.png is {im.size[0]}x{im.size[1]}, "
                                         f"image {r['width']}x{r['height']}")
            except Exception as e:  # noqa: BLE001
                self.fail(where, f".seg.png: Pillow cannot open it: {e}")

    def check_image(self, where, ext, data, r):
        """The image header agrees with the index's format, width and height."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as im:
                    fmt = PIL_FORMATS.get(im.format, im.format)
                    w, h = im.size
        except Exception as e:  # noqa: BLE001
            self.fail(where, f".{ext}: Pillow cannot open it: {e}")
            return
        if fmt != r["format"]:
            self.fail(where, f".{ext} is {fmt}, index format {r['format']}")
        if (w, h) != (r["width"], r["height"]):
            self.fail(where, f".{ext} is {w}x{h}, index {r['width']}x{r['height']}")


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"#{i}: tar {x!r}, index {y!r}"
    i = min(len(a), len(b))
    return f"#{i}: tar {a[i] if i < len(a) else None!r}, index {b[i] if i < len(b) else None!r}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"check_dataset: {message}", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset_dir")
    p.add_argument("split")
    p.add_argument("--max-errors", type=int, default=20, help="stop after this many (default 20)")
    p.add_argument("--no-image-headers", action="store_true",
                   help="skip checking format/width/height against the image header (Pillow)")
    args = p.parse_args(argv)

    c = Checker(args.dataset_dir, args.split, max(1, args.max_errors), not args.no_image_headers)
    try:
        summary = c.run()
    except Exception as e:  # noqa: BLE001 — never a traceback instead of a verdict
        import traceback
        traceback.print_exc()
        c.fail("check_dataset", f"crashed: {e!r}")
        summary = None
    if c.errors:
        shown = c.errors[: args.max_errors]
        print(f"check_dataset: FAILED {args.dataset_dir} split {args.split}: "
              f"{len(c.errors)} problem(s){' (first ' + str(len(shown)) + ')' if len(shown) < len(c.errors) else ''}")
        for e in shown:
            print(f"  {e}")
        return 1
    if summary is None:  # cannot happen: every early return records an error
        print("check_dataset: FAILED (no summary)")
        return 1
    print(f"check_dataset: OK {args.dataset_dir} split {args.split}: {summary['samples']} samples in "
          f"{summary['shards']} shards ({summary['bytes']} bytes), {summary['rejected']} rejected, "
          f"dataset {summary['dataset']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
