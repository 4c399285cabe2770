#!/usr/bin/env python3
"""Checks a conmim dataset split with the real Python libraries.

    $CONMIM_PYTHON tests/python/check_dataset.py DATASET_DIR SPLIT

Reads `{split}.index.parquet` (pyarrow and pandas), `{split}.manifest.json` and
`{split}.rejected.jsonl`, validates them against ../../schemas/, and reads every
shard twice: through the public `webdataset.WebDataset` pipeline (no decoding, so
values are the raw member bytes) and with `tarfile` (member offsets). Every
sample must agree with its index row. The format is described in schemas/README.md.

Datasets built by `conmim-shard index` (manifest `conmim.dataset == "index"`) index
WebDataset shards that conmim did not write and never rewrites, so for them, and
only for them:

* a tar may hold samples without an index row: each must be named in the rejected
  list by a record with source `{shard url}:{key}` (and that key), one record per
  such sample, and every such record must name one; a shard's `nsamples` is the
  number of samples the tar holds (what `wids` counts), while `conmim.num_samples`
  is the number of index rows;
* keys are WebDataset keys (the member name up to the first dot of its basename,
  directories included: `dir.v2/000001`), not only `[A-Za-z0-9_-]`; members whose
  name has no extension, and members that are neither regular files nor
  directories, belong to no sample and must be named by a `bad_member` record
  (source `{shard url}:{member name}`); directory members are skipped; GNU tar
  headers are accepted besides POSIX ustar ones;
* the index's claims are checked (key, offset, length, members, image member bytes,
  format and size, label from an integer `cls`, caption from `txt`), but not
  conmim's own writing rules for members it did not write: the image member is the
  first member with an image extension (jpg, jpeg, png, webp, gif, bmp, tif,
  tiff), other image members may follow, and `json`/`seg.png` members are not
  checked against conmim's schemas.

Exits 0 with a one-line summary when every check passes; otherwise prints the
first mismatches (naming shard and key) and exits 1.
"""

import argparse
import bisect
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
# Datasets of `conmim-shard index`: keys as WebDataset groups members (anything up to
# the first dot of the basename, directories included).
WDS_KEY_RE = re.compile(r"^(?:.*/)?[^./]+$", re.DOTALL)
# The image extensions `conmim-shard index` looks for, in src/inspect/mod.rs.
INDEX_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# `cls` as conmim-shard index parses it (Rust `str::trim().parse::<i64>()`).
CLS_RE = re.compile(r"^[+-]?[0-9]+$")
FORMATS = ("jpeg", "png", "gif", "webp", "bmp", "tiff")
IMAGE_EXTS = {"jpg", "png", "gif", "webp", "bmp", "tiff"}
# Pillow's format names for the index's `format` values.
PIL_FORMATS = {
    "JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "GIF": "gif",
    "WEBP": "webp", "BMP": "bmp", "DIB": "bmp", "TIFF": "tiff",
}
USTAR_MAGIC = b"ustar\x0000"
GNU_MAGIC = b"ustar  \x00"
BLOCK = 512


def image_ext(fmt):
    return "jpg" if fmt == "jpeg" else fmt


def member_end(ti):
    """Offset just past a member's data (padding included), as tarfile reads it."""
    size = ti.size if ti.isreg() or ti.type not in tarfile.SUPPORTED_TYPES else 0
    return ti.offset_data + (size + BLOCK - 1) // BLOCK * BLOCK


def split_member_name(name):
    """(key, lowercase ext) as WebDataset and conmim-shard index split a member name
    (src/format/mod.rs `split_member_name`), or None when it has no extension."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    if dot < 0:
        return None
    key, ext = name[:dot], name[dot + 1:]
    if not key or not ext:
        return None
    return key, ext.lower()


def parse_cls(data):
    """The label an index dataset takes from a `cls` member, or None."""
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not CLS_RE.match(text):
        return None
    value = int(text)
    return value if -(1 << 63) <= value < (1 << 63) else None


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
        # `conmim-shard index` over shards it did not write (see the module docstring).
        self.foreign = False
        # Index datasets: per shard url, the rejected records naming its samples
        # (source -> count) and its bad members (sources).
        self.sample_rejects = defaultdict(Counter)
        self.member_rejects = defaultdict(set)

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
        self.foreign = info["dataset"] == "index"

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
        if self.foreign:
            # nsamples counts the tar's samples, indexed or not (checked per shard).
            if info["num_samples"] != len(rows):
                self.fail(manifest_name, f"conmim.num_samples {info['num_samples']} != index rows {len(rows)}")
            if total_ns < len(rows):
                self.fail(manifest_name, f"sum of shard nsamples {total_ns} < index rows {len(rows)}")
        elif not (info["num_samples"] == len(rows) == total_ns):
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
        if self.foreign:
            self.sort_rejects(rejected_name, rejected, set(urls))

        # index rows: keys, shard positions
        seen = {}
        per_shard = defaultdict(list)
        for i, r in enumerate(rows):
            key = r["key"]
            where = f"{index_name} row {i} key {key!r}"
            if self.foreign:
                if not WDS_KEY_RE.match(key):
                    self.fail(where, "not a WebDataset key (empty basename, or a dot in it)")
            elif not KEY_RE.match(key):
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
            "tar_samples": total_ns,
        }

    def sort_rejects(self, rejected_name, rejected, urls):
        """Index datasets: files each rejected record under the shard its source names."""
        for n, r in enumerate(rejected, 1):
            source, reason, key = r.get("source"), r.get("reason"), r.get("key")
            if not isinstance(source, str):
                continue  # already a schema error
            where = f"{rejected_name}:{n}"
            if source in urls:
                self.fail(where, f"{reason} for shard {source!r}, which is in the shardlist "
                                 "(shards that cannot be read are left out of it)")
                continue
            # `{url}:{name}`; the first colon after which a listed url ends.
            url = next((source[:i] for i, c in enumerate(source) if c == ":" and source[:i] in urls), None)
            if url is None:
                continue  # a shard left out of the dataset (corrupt_shard, unreadable_shard)
            name = source[len(url) + 1:]
            if reason == "bad_member":
                if key is not None:
                    self.fail(where, f"bad_member record with key {key!r} (members of no sample have none)")
                self.member_rejects[url].add(name)
            else:
                if key != name:
                    self.fail(where, f"source {source!r} names key {name!r}, but the record's key is {key!r}")
                self.sample_rejects[url][source] += 1

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
        if self.foreign:
            self.check_indexed_shard(where, url, path, entry, expected)
            return
        if len(expected) != entry["nsamples"]:
            self.fail(where, f"index has {len(expected)} rows for it, manifest nsamples {entry['nsamples']}")

        self.check_tar_layout(where, path, size, expected)
        self.check_samples(where, path, expected)

    def read_tar(self, where, path):
        """Member names, order and headers, and the archive's end.

        Returns the tar's samples as WebDataset groups them, each
        [key, header offset of first member, end of last member, [exts]], and (index
        datasets) the members that belong to no sample, as [(name, why)]; None when
        tarfile cannot read the shard.
        """
        groups = []
        odd = []
        done = set()
        last_end = 0
        magics = (USTAR_MAGIC, GNU_MAGIC) if self.foreign else (USTAR_MAGIC,)
        try:
            with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
                for ti in tf:
                    raw.seek(ti.offset)
                    header = raw.read(BLOCK)
                    if header[257:265] not in magics:
                        kind = "a POSIX ustar or GNU" if self.foreign else "a POSIX ustar"
                        self.fail(where, f"member {ti.name!r} at {ti.offset}: not {kind} header "
                                         f"(magic {header[257:265]!r})")
                    last_end = max(last_end, member_end(ti))
                    if not ti.isreg():
                        if not self.foreign:
                            self.fail(where, f"member {ti.name!r}: not a regular file")
                        elif not ti.isdir():  # directories are skipped by everyone
                            odd.append((ti.name, "not a regular file"))
                        continue
                    if self.foreign:
                        split = split_member_name(ti.name)
                        if split is None:
                            odd.append((ti.name, "no extension"))
                            continue
                        key, ext = split
                    else:
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
                        # In foreign shards a key that comes back later is another tar
                        # sample (for WebDataset, wids and the index alike).
                        if key in done and not self.foreign:
                            self.fail(where, f"key {key!r}: members not consecutive")
                        if groups:
                            done.add(groups[-1][0])
                        groups.append([key, ti.offset, end, [ext]])
        except (tarfile.TarError, OSError) as e:
            self.fail(where, f"tarfile cannot read it: {e}")
            return None
        with open(path, "rb") as f:
            f.seek(last_end)
            tail = f.read()
        if len(tail) < 2 * BLOCK or tail.strip(b"\0"):
            self.fail(where, f"archive does not end with zero blocks after its last member "
                             f"({len(tail)} bytes after offset {last_end})")
        return groups, odd

    def check_group(self, where, group, r):
        """One tar sample against its index row."""
        key, start, end, exts = group
        kw = f"{where} key {key!r}"
        if key != r["key"]:
            self.fail(kw, f"the tar sample at offset {start} is {key!r}, index says {r['key']!r}")
        if start != r["offset"]:
            self.fail(kw, f"first header at {start}, index offset {r['offset']}")
        if end - start != r["length"]:
            self.fail(kw, f"members span {end - start} bytes, index length {r['length']}")
        if ",".join(exts) != r["members"]:
            self.fail(kw, f"members {','.join(exts)!r} in the tar, index members {r['members']!r}")

    def check_tar_layout(self, where, path, size, expected):
        """Member names, order, ustar headers, and each sample's offset and length."""
        read = self.read_tar(where, path)
        if read is None:
            return
        groups, _ = read
        got_keys = [g[0] for g in groups]
        want_keys = [r["key"] for r in expected]
        if got_keys != want_keys:
            self.fail(where, f"tar holds {len(got_keys)} samples, index {len(want_keys)}; "
                             f"first difference: {first_diff(got_keys, want_keys)}")
            return
        for g, r in zip(groups, expected):
            self.check_group(where, g, r)

    def check_indexed_shard(self, where, url, path, entry, expected):
        """A shard of an index dataset: every tar sample is an index row or rejected."""
        read = self.read_tar(where, path)
        if read is None:
            return
        groups, odd = read
        if len(groups) != entry["nsamples"]:
            self.fail(where, f"tar holds {len(groups)} samples, manifest nsamples {entry['nsamples']}")
        starts = [g[1] for g in groups]
        rows = {}  # tar position -> index row
        for r in expected:  # offset order, so tar order
            kw = f"{where} key {r['key']!r}"
            # The tar sample the offset falls in (check_group reports an offset that is
            # not its start, e.g. one past a pax or GNU long-name header).
            i = bisect.bisect_right(starts, r["offset"]) - 1
            if i < 0 or r["offset"] >= groups[i][2]:
                self.fail(kw, f"index offset {r['offset']} is in no sample of the tar")
            elif i in rows:
                self.fail(kw, f"index offset {r['offset']} is also the row of {rows[i]['key']!r}")
            else:
                rows[i] = r
                self.check_group(where, groups[i], r)

        rejected_name = f"{self.split}.rejected.jsonl"
        pending = Counter(self.sample_rejects.get(url, {}))
        for i, g in enumerate(groups):
            if i in rows:
                continue
            source = f"{url}:{g[0]}"
            if pending[source] > 0:
                pending[source] -= 1
            else:
                self.fail(f"{where} key {g[0]!r}", f"tar sample #{i} has no index row, and {rejected_name} "
                                                   f"has no (further) record with source {source!r}")
        for source, left in sorted(pending.items()):
            if left > 0:
                self.fail(where, f"{rejected_name} names {source!r} {left} more time(s) than the shard "
                                 "holds samples with that key and no index row")
        bad = self.member_rejects.get(url, set())
        for name, why in odd:
            if name not in bad:
                self.fail(where, f"member {name!r} ({why}) belongs to no sample, and {rejected_name} has "
                                 f"no bad_member record with source {url + ':' + name!r}")

        self.check_samples(where, path, [rows.get(i) for i in range(len(groups))],
                           [g[0] for g in groups])

    def check_samples(self, where, path, expected, keys=None):
        """Iterates the shard through webdataset and checks every sample's members.

        `expected`: the index rows in tar order. Index datasets pass `keys`, the keys
        of all the tar's samples, and for each of them its row or None (rejected).
        """
        ds = wds.WebDataset(
            [path],  # a list: no brace expansion of the path
            shardshuffle=False,
            nodesplitter=None,
            workersplitter=None,
            empty_check=False,
        )
        count = 0
        try:
            for sample in ds:
                count += 1
                key = sample["__key__"]
                if count > len(expected):
                    self.fail(where, f"webdataset yields an extra sample {key!r} (#{count})")
                    continue
                r = expected[count - 1]
                want = r["key"] if keys is None else keys[count - 1]
                if key != want:
                    self.fail(where, f"webdataset sample #{count} is {key!r}, "
                                     f"{'index' if keys is None else 'the tar'} says {want!r}")
                    return
                if r is not None:
                    self.check_sample(f"{where} key {key!r}", sample, r)
                if len(self.errors) >= self.max_errors:
                    return
        except Exception as e:  # noqa: BLE001 — a reader failure is a finding
            self.fail(where, f"webdataset failed after {count} samples: {e!r}")
            return
        if count != len(expected):
            self.fail(where, f"webdataset yields {count} samples, "
                             f"{'index has' if keys is None else 'the tar holds'} {len(expected)}")

    def check_sample(self, where, sample, r):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        listed = r["members"].split(",")
        if sorted(members) != sorted(listed):
            self.fail(where, f"webdataset members {sorted(members)} != index members {listed}")

        if self.foreign:
            # conmim-shard index takes the first member with an image extension.
            ext = next((e for e in listed if e in INDEX_IMAGE_EXTS), None)
            data = None if ext is None else members.get(ext)
            if data is None:
                self.fail(where, f"no image member among {sorted(members)} (index members {r['members']!r})")
        else:
            ext = image_ext(r["format"])
            data = members.get(ext)
            if data is None:
                self.fail(where, f"no image member .{ext} (format {r['format']})")
        if data is not None:
            if len(data) != r["image_bytes"]:
                self.fail(where, f".{ext} has {len(data)} bytes, index image_bytes {r['image_bytes']}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != r["sha256"]:
                self.fail(where, f".{ext} sha256 {digest} != index sha256 {r['sha256']}")
            if self.check_images:
                self.check_image(where, ext, data, r)
        others = [m for m in members if m in IMAGE_EXTS and m != ext]
        if others and not self.foreign:
            self.fail(where, f"more than one image member: {others + [ext]}")

        cls = members.get("cls")
        if self.foreign:
            # The label is the cls member when that is an integer, else null.
            value = None if cls is None else parse_cls(cls)
            if value != r["label"]:
                what = "no .cls member" if cls is None else f".cls is {cls[:40]!r}"
                self.fail(where, f"{what}, index label {r['label']}")
        elif r["label"] is not None:
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
        if self.foreign:
            # The caption is the txt member (invalid UTF-8 replaced), else null.
            text = None if txt is None else txt.decode("utf-8", "replace")
            if text != r["caption"]:
                what = "no .txt member" if text is None else f".txt {text[:60]!r}"
                caption = r["caption"] if r["caption"] is None else r["caption"][:60]
                self.fail(where, f"{what}, index caption {caption!r}")
        elif txt is not None:
            try:
                text = txt.decode("utf-8")
            except UnicodeDecodeError as e:
                self.fail(where, f".txt is not UTF-8: {e}")
            else:
                if r["caption"] is not None and text != r["caption"]:
                    self.fail(where, f".txt {text[:60]!r} != index caption {r['caption'][:60]!r}")

        meta = members.get("json")
        if meta is not None and not self.foreign:  # foreign json is not conmim's
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
        if seg is not None and self.check_images and not self.foreign:
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
          f"dataset {summary['dataset']}"
          + (f" ({summary['tar_samples']} samples in the tars)" if summary["dataset"] == "index" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
