//! `conmim-shard index`: a Parquet index and a manifest for WebDataset shards that
//! already exist (img2dataset output `00000.tar`, ... holding `key.jpg`, `key.txt`,
//! `key.json`), without rewriting a byte of them.
//!
//! Every shard is scanned (in parallel; results are merged in shard order, so the
//! output never depends on the thread count). Each sample, as WebDataset groups members
//! (key = member name up to the first dot of its basename), becomes:
//!
//! * an index row, when it has an image member (the first member with an image
//!   extension: jpg, jpeg, png, webp, gif, bmp, tif, tiff) that passes the header probe
//!   (or a full decode with [`Validation::Decode`]). `label` comes from an integer `cls`
//!   member, `caption` from `txt`, dimensions and format from the image bytes, `source`
//!   is `{url}:{key}`;
//! * or a reject with source `{url}:{key}`: `no_image_member`, the image problem's code,
//!   or `duplicate_key` when an earlier sample (earlier shard, or earlier in the same
//!   shard) has the same key.
//!
//! Tar members that belong to no sample (links, names without an extension) are
//! rejected as `bad_member` with source `{url}:{member name}`. A shard that is not a
//! readable tar is left out of the shard list altogether and rejected as
//! `corrupt_shard` (source: its url), with a warning.
//!
//! **Sample counts.** Rejected samples stay in their tar, since nothing is rewritten.
//! The `wids` reader addresses sample `i` of a shard by counting the tar's samples, so
//! each shard list entry's `nsamples` is the number of samples the tar holds, rejected
//! ones included, while the manifest's `conmim.num_samples` is the number of index
//! rows. `verify` accounts for the difference through the rejected list: a tar sample
//! that is not indexed is fine when the list names it as `{url}:{key}`.
//!
//! Shard urls are relative to the output directory (the manifest's directory) and,
//! as `schemas/manifest.schema.json` requires, lead only downwards (no `..`, never
//! absolute): the output must be the shard directory or a folder above it.
//!
//! Keys are kept exactly as WebDataset groups them (`__key__`), even where they hold
//! characters outside `[A-Za-z0-9_-]` (`dir.v2/000001`); the summary warns about them,
//! since renaming would mean rewriting the shards.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::seen::SeenKeys;
use super::source::{Validation, sha256_hex};
use super::{ShardConfig, Summary};
use crate::error::{Error, Result};
use crate::format::index::{IndexRow, IndexWriter};
use crate::format::manifest::{DatasetInfo, Manifest, ShardEntry, tool_name};
use crate::format::reject::{Reject, write_rejects};
use crate::format::tar::{ScanIssue, ScannedSample, md5_file, scan_shard};
use crate::format::{self, SCHEMA_VERSION};
use crate::image::{self, ImageLimits};
use crate::inspect::{bytes_bar, is_image_ext, parse_cls, thread_pool};

/// Most names one brace pattern may expand to.
pub const MAX_EXPANSION: usize = 10_000_000;

/// How existing shards are indexed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexOptions {
    /// Split name: prefix of the index, rejected list and manifest.
    pub split: String,
    /// Which shards, relative to the shard directory: a brace pattern such as
    /// `{00000..00127}.tar` (no globs), or `None` for every `*.tar` there, by name.
    pub pattern: Option<String>,
    /// Header-only or full-decode validation of the images.
    pub validation: Validation,
    /// Image size limits.
    pub limits: ImageLimits,
    /// Worker threads (0 = all cores). Never changes the output.
    pub threads: usize,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            split: "train".into(),
            pattern: None,
            validation: Validation::Header,
            limits: ImageLimits::default(),
            threads: 0,
            progress: false,
        }
    }
}

// ---------------------------------------------------------------------------------
// Brace patterns

/// Expands a brace pattern the way `braceexpand` (and WebDataset) do: `{a,b}` lists,
/// `{000..146}` numeric ranges (zero-padded to the longer bound when a bound has a
/// leading zero; descending ranges and a step `{0..100..10}` work too), nested and
/// repeated braces (cartesian product, left to right). A brace pair with neither a
/// comma nor a range stays literal (`{x}`); unbalanced braces are an error.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    expand(pattern).map_err(|m| Error::Config(format!("shard pattern `{pattern}`: {m}")))
}

fn expand(p: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = p.find(['{', '}']) else {
        return Ok(vec![p.to_owned()]);
    };
    if p.as_bytes()[open] == b'}' {
        return Err(format!("unmatched `}}` at byte {open}"));
    }
    let close = matching_brace(p, open)?;
    let (prefix, inner, suffix) = (&p[..open], &p[open + 1..close], &p[close + 1..]);
    let alts: Vec<String> = match numeric_range(inner)? {
        Some(r) => r,
        None => {
            let parts = split_top_level_commas(inner);
            if parts.len() >= 2 {
                let mut v = Vec::new();
                for part in parts {
                    v.extend(expand(part)?);
                    check_size(v.len())?;
                }
                v
            } else {
                expand(inner)?
                    .into_iter()
                    .map(|e| format!("{{{e}}}"))
                    .collect()
            }
        }
    };
    let rest = expand(suffix)?;
    check_size(alts.len().saturating_mul(rest.len()))?;
    let mut out = Vec::with_capacity(alts.len() * rest.len());
    for a in &alts {
        for r in &rest {
            out.push(format!("{prefix}{a}{r}"));
        }
    }
    Ok(out)
}

fn check_size(n: usize) -> std::result::Result<(), String> {
    if n > MAX_EXPANSION {
        return Err(format!("expands to more than {MAX_EXPANSION} names"));
    }
    Ok(())
}

/// Index of the `}` closing the `{` at `open`.
fn matching_brace(p: &str, open: usize) -> std::result::Result<usize, String> {
    let mut depth = 0usize;
    for (i, b) in p.bytes().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            _ => {}
        }
    }
    Err(format!("unmatched `{{` at byte {open}"))
}

fn split_top_level_commas(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'{' => depth += 1,
            b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// `a..b` or `a..b..step` with integer bounds, else `None`.
fn numeric_range(s: &str) -> std::result::Result<Option<Vec<String>>, String> {
    let parts: Vec<&str> = s.split("..").collect();
    if !(2..=3).contains(&parts.len()) {
        return Ok(None);
    }
    let is_int = |t: &str| {
        let d = t.strip_prefix('-').unwrap_or(t);
        !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
    };
    if !parts.iter().all(|t| is_int(t)) {
        return Ok(None);
    }
    let parse = |t: &str| {
        t.parse::<i64>()
            .map_err(|_| format!("`{t}` is out of range"))
    };
    let (a, b) = (parse(parts[0])?, parse(parts[1])?);
    let step = match parts.get(2) {
        Some(t) => parse(t)?.unsigned_abs(),
        None => 1,
    };
    if step == 0 {
        return Err(format!("`{{{s}}}`: step must not be 0"));
    }
    let digits = |t: &str| t.strip_prefix('-').unwrap_or(t).len();
    let padded = |t: &str| {
        let d = t.strip_prefix('-').unwrap_or(t);
        d.len() > 1 && d.starts_with('0')
    };
    let width = if padded(parts[0]) || padded(parts[1]) {
        digits(parts[0]).max(digits(parts[1]))
    } else {
        0
    };
    let count = (a.abs_diff(b) / step).saturating_add(1);
    check_size(usize::try_from(count).unwrap_or(usize::MAX))?;
    let mut out = Vec::with_capacity(count as usize);
    let mut v = a as i128;
    let (end, step) = (b as i128, step as i128);
    let fmt = |v: i128| {
        if v < 0 {
            format!("-{:0width$}", -v)
        } else {
            format!("{v:0width$}")
        }
    };
    if a <= b {
        while v <= end {
            out.push(fmt(v));
            v += step;
        }
    } else {
        while v >= end {
            out.push(fmt(v));
            v -= step;
        }
    }
    Ok(Some(out))
}

// ---------------------------------------------------------------------------------
// Indexing

/// One shard as found on disk.
struct Candidate {
    path: PathBuf,
    url: String,
    size: u64,
}

/// What scanning one shard gave.
struct ScannedShard {
    /// `nsamples`, `filesize`, `md5sum` (url filled in).
    entry: ShardEntry,
    /// Rows in tar order (`shard` not yet set).
    rows: Vec<IndexRow>,
    /// Rejects in tar order, then the shard's stray members.
    rejects: Vec<Reject>,
}

/// Indexes the existing shards in `dir`, writing `{split}.index.parquet`,
/// `{split}.rejected.jsonl` and, last, `{split}.manifest.json` into `out` (which may
/// equal `dir`). The shards are only read.
pub fn index_existing(dir: &Path, out: &Path, opts: &IndexOptions) -> Result<Summary> {
    let started = Instant::now();
    let mut cfg = ShardConfig::new(out, &opts.split);
    cfg.limits = opts.limits;
    cfg.validate()?;
    let split = opts.split.as_str();
    if !dir.is_dir() {
        return Err(Error::input(dir, "not a directory"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let manifest_path = out.join(format::manifest_name(split));
    if manifest_path.exists() {
        return Err(Error::Resume {
            path: manifest_path,
            message: "a dataset with this split name already exists here; remove its \
                      manifest (or choose another --out / --split) to index again"
                .into(),
        });
    }

    let candidates = candidates(dir, out, opts.pattern.as_deref())?;
    let pool = thread_pool(opts.threads)?;
    let threads = pool.current_num_threads();
    let pb = bytes_bar(
        opts.progress,
        candidates.iter().map(|c| c.size).sum(),
        "indexing",
    );
    let index_path = out.join(format::index_name(split));
    let mut index = IndexWriter::create(&index_path)?;
    let mut shardlist: Vec<ShardEntry> = Vec::new();
    let mut rejects: Vec<Reject> = Vec::new();
    let mut warnings = Vec::new();
    let mut seen = SeenKeys::new(); // key -> shard position of its first occurrence
    let (mut samples, mut image_bytes) = (0u64, 0u64);
    let mut unindexed_in_tars = 0u64;
    let mut odd_keys: (u64, Vec<String>) = (0, Vec::new());
    let mut done = 0usize;

    // Windows of shards are scanned in parallel and merged in order, which bounds
    // memory to a window's rows while keeping the output independent of timing.
    for window in candidates.chunks(threads.max(1) * 2) {
        let scanned: Vec<std::result::Result<ScannedShard, Reject>> = pool.install(|| {
            window
                .par_iter()
                .map(|c| {
                    let r = scan_one(c, opts);
                    pb.inc(c.size);
                    r
                })
                .collect()
        });
        for (c, result) in window.iter().zip(scanned) {
            done += 1;
            pb.set_message(format!("{done}/{} shards", candidates.len()));
            let mut s = match result {
                Ok(s) => s,
                Err(r) => {
                    warnings.push(format!("{} left out of the dataset: {}", c.url, r.detail));
                    rejects.push(r);
                    continue;
                }
            };
            let pos = shardlist.len() as u32;
            let mut kept = Vec::with_capacity(s.rows.len());
            for mut row in s.rows {
                if let Some(first) = seen.first_or_insert(&row.key, pos) {
                    let first_url = shardlist
                        .get(first as usize)
                        .map_or(c.url.as_str(), |e| e.url.as_str());
                    let detail = format!("key `{}` already indexed from {first_url}", row.key);
                    s.rejects.push(Reject::new(
                        row.source,
                        Some(row.key),
                        "duplicate_key",
                        detail,
                    ));
                    continue;
                }
                if !plain_key(&row.key) {
                    odd_keys.0 += 1;
                    if odd_keys.1.len() < 3 {
                        odd_keys.1.push(row.key.clone());
                    }
                }
                row.shard = pos;
                kept.push(row);
            }
            let not_indexed = s.entry.nsamples - kept.len() as u64;
            unindexed_in_tars += not_indexed;
            samples += kept.len() as u64;
            image_bytes += kept.iter().map(|r| r.image_bytes).sum::<u64>();
            index.write(&kept)?;
            rejects.extend(s.rejects);
            shardlist.push(s.entry);
        }
    }
    pb.finish_and_clear();
    index.finish()?;
    write_rejects(&out.join(format::rejected_name(split)), &rejects)?;

    if unindexed_in_tars > 0 {
        warnings.push(format!(
            "{unindexed_in_tars} samples stay in their shards without an index row (see {}); \
             the manifest's nsamples count them, as wids expects",
            format::rejected_name(split)
        ));
    }
    if odd_keys.0 > 0 {
        warnings.push(format!(
            "{} keys hold characters outside [A-Za-z0-9_-] (e.g. {}); they are indexed as \
             WebDataset groups them, but schemas/README.md asks for plain keys",
            odd_keys.0,
            odd_keys.1.join(", ")
        ));
    }
    let mut by_reason = BTreeMap::new();
    for r in &rejects {
        *by_reason.entry(r.reason.clone()).or_insert(0u64) += 1;
    }
    let total_bytes: u64 = shardlist.iter().map(|s| s.filesize).sum();
    let inputs = samples + rejects.len() as u64;
    let info = DatasetInfo {
        schema_version: SCHEMA_VERSION,
        tool: tool_name(),
        dataset: "index".into(),
        split: split.to_owned(),
        num_samples: samples,
        num_rejected: rejects.len() as u64,
        num_inputs: inputs,
        num_shards: shardlist.len() as u64,
        total_bytes,
        rejected_by_reason: by_reason.clone(),
        classes: None,
        wnids: None,
        categories: None,
        params: serde_json::json!({
            "source": {
                "dir": dir.display().to_string(),
                "pattern": opts.pattern,
                "candidates": candidates.len(),
            },
            "split": split,
            "validation": opts.validation,
            "limits": opts.limits,
            "schema_version": SCHEMA_VERSION,
        }),
    };
    let shards = shardlist.len() as u64;
    let manifest = Manifest::new(split, shardlist, info);
    format::atomic_write_json(&manifest_path, &manifest)?;
    Ok(Summary {
        out: out.to_owned(),
        name: split.to_owned(),
        inputs,
        samples,
        rejected: rejects.len() as u64,
        rejected_by_reason: by_reason,
        shards,
        resumed_shards: 0,
        bytes: total_bytes,
        image_bytes,
        elapsed: started.elapsed(),
        warnings,
    })
}

/// Whether `key` is a plain WebDataset key (`[A-Za-z0-9_-]+`, as this crate writes them).
fn plain_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The shards to index, in order, with their urls relative to `out`.
fn candidates(dir: &Path, out: &Path, pattern: Option<&str>) -> Result<Vec<Candidate>> {
    let names: Vec<String> = match pattern {
        Some(p) => {
            let mut names = expand_braces(p)?;
            let mut seen = std::collections::HashSet::new();
            names.retain(|n| seen.insert(n.clone()));
            let missing: Vec<&String> = names
                .iter()
                .filter(|n| !dir.join(n.as_str()).is_file())
                .collect();
            if !missing.is_empty() {
                let shown: Vec<&str> = missing.iter().take(5).map(|s| s.as_str()).collect();
                return Err(Error::input(
                    dir,
                    format!(
                        "{} of the {} shards named by `{p}` do not exist here: {}{}",
                        missing.len(),
                        names.len(),
                        shown.join(", "),
                        if missing.len() > 5 { ", ..." } else { "" }
                    ),
                ));
            }
            names
        }
        None => {
            let mut names = Vec::new();
            for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
                let e = e.map_err(|e| Error::io(dir, e))?;
                let file_name = e.file_name();
                if !file_name.as_encoded_bytes().ends_with(b".tar") || !e.path().is_file() {
                    continue;
                }
                let Some(name) = file_name.to_str() else {
                    return Err(not_utf8(&e.path()));
                };
                names.push(name.to_owned());
            }
            names.sort();
            names
        }
    };
    if names.is_empty() {
        return Err(Error::input(dir, "no .tar shards to index here"));
    }
    let real_dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let real_out = out.canonicalize().map_err(|e| Error::io(out, e))?;
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            let size = std::fs::metadata(&path)
                .map_err(|e| Error::io(&path, e))?
                .len();
            let url = shard_url(&real_dir, &real_out, &name).map_err(|e| match e {
                NoUrl::Outside => Error::Config(format!(
                    "shard {} is not inside the output directory {}: manifest urls are \
                     relative paths below the manifest's directory (no `..`, not absolute; \
                     schemas/manifest.schema.json), so --out must be the shard directory \
                     or a folder above it",
                    path.display(),
                    out.display()
                )),
                NoUrl::NotUtf8(rel) => not_utf8(&real_out.join(rel)),
            })?;
            Ok(Candidate { path, url, size })
        })
        .collect::<Result<Vec<Candidate>>>()
        .map(|all| {
            // One shard named twice (`{a,./a}.tar`, `sub/../a.tar`): once, by its url.
            let mut seen = std::collections::HashSet::new();
            all.into_iter()
                .filter(|c| seen.insert(c.url.clone()))
                .collect()
        })
}

/// A shard path that manifest urls cannot name: not valid UTF-8 (urls are text).
fn not_utf8(path: &Path) -> Error {
    Error::input(
        path,
        "the shard's path (below the output directory) is not valid UTF-8, and manifest \
         urls are UTF-8 text; rename it (a shard can also be left out with --pattern)",
    )
}

/// Why a shard has no url in the manifest.
#[derive(Debug, PartialEq)]
enum NoUrl {
    /// No relative path leads only downwards from the output directory to it.
    Outside,
    /// The relative path (this one) is not valid UTF-8.
    NotUtf8(PathBuf),
}

/// The url of shard `name` (relative to `real_dir`) in a manifest in `real_out`: a
/// relative path going only downwards, in UTF-8.
fn shard_url(real_dir: &Path, real_out: &Path, name: &str) -> std::result::Result<String, NoUrl> {
    let clean = |p: &Path| {
        p.components().all(|c| matches!(c, Component::Normal(_))) && p.components().next().is_some()
    };
    if real_dir == real_out && clean(Path::new(name)) {
        return Ok(name.to_owned());
    }
    let abs = real_dir.join(name);
    let abs = if clean(Path::new(name)) {
        abs
    } else {
        abs.canonicalize().map_err(|_| NoUrl::Outside)?
    };
    let rel = relative_path(real_out, &abs).ok_or(NoUrl::Outside)?;
    if !clean(&rel) {
        return Err(NoUrl::Outside);
    }
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    match parts {
        Some(parts) => Ok(parts.join("/")),
        None => Err(NoUrl::NotUtf8(rel)),
    }
}

/// `to` relative to directory `from` (both absolute), when one exists.
fn relative_path(from: &Path, to: &Path) -> Option<PathBuf> {
    if !from.is_absolute() || !to.is_absolute() {
        return None;
    }
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    if f.first() != t.first() {
        return None; // different roots / prefixes (Windows drives)
    }
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..f.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c.as_os_str());
    }
    Some(rel)
}

/// Scans one shard into rows and rejects; an unreadable shard is one reject.
fn scan_one(c: &Candidate, opts: &IndexOptions) -> std::result::Result<ScannedShard, Reject> {
    let mut rows = Vec::new();
    let mut rejects = Vec::new();
    let mut issues: Vec<ScanIssue> = Vec::new();
    let scanned = scan_shard(
        &c.path,
        |s| {
            match sample_row(&c.url, &s, opts) {
                Ok(row) => rows.push(row),
                Err(r) => rejects.push(r),
            }
            Ok(())
        },
        |i| issues.push(i),
    );
    let shard_reject = |reason: &str, detail: String| {
        Reject::new(c.url.clone(), None, reason, format!("{}: {detail}", c.url))
    };
    let nsamples = match scanned {
        Ok(n) => n,
        Err(Error::CorruptShard { message, .. }) => {
            let detail = format!(
                "{message} (after {} readable samples); not a usable tar",
                rows.len() + rejects.len()
            );
            return Err(shard_reject("corrupt_shard", detail));
        }
        Err(e) => return Err(shard_reject("unreadable_shard", e.to_string())),
    };
    for i in issues {
        rejects.push(Reject::new(
            format!("{}:{}", c.url, i.name),
            None,
            "bad_member",
            format!("{}: member `{}`: {}", c.url, i.name, i.message),
        ));
    }
    let (md5sum, filesize) =
        md5_file(&c.path).map_err(|e| shard_reject("unreadable_shard", e.to_string()))?;
    Ok(ScannedShard {
        entry: ShardEntry {
            url: c.url.clone(),
            nsamples,
            filesize,
            md5sum,
        },
        rows,
        rejects,
    })
}

/// The index row of one scanned sample, or why it cannot have one.
fn sample_row(
    url: &str,
    s: &ScannedSample,
    opts: &IndexOptions,
) -> std::result::Result<IndexRow, Reject> {
    let source = format!("{url}:{}", s.key);
    let members: Vec<&str> = s.members.iter().map(|m| m.ext.as_str()).collect();
    let Some(img) = s.members.iter().find(|m| is_image_ext(&m.ext)) else {
        return Err(Reject::new(
            source,
            Some(s.key.clone()),
            "no_image_member",
            format!("members: {}", members.join(",")),
        ));
    };
    let checked = match opts.validation {
        Validation::Header => image::probe(&img.data, &opts.limits),
        Validation::Decode => image::decode_check(&img.data, &opts.limits),
    };
    let info = checked.map_err(|p| {
        Reject::new(
            source.clone(),
            Some(s.key.clone()),
            p.code(),
            format!("{url}: {}.{}: {p}", s.key, img.ext),
        )
    })?;
    Ok(IndexRow {
        key: s.key.clone(),
        shard: 0,
        offset: s.offset,
        length: s.length,
        label: s.member("cls").and_then(|m| parse_cls(&m.data)),
        width: info.width,
        height: info.height,
        format: info.format.name().to_owned(),
        image_bytes: img.data.len() as u64,
        sha256: sha256_hex(&img.data),
        source,
        members: members.join(","),
        caption: s
            .member("txt")
            .map(|m| String::from_utf8_lossy(&m.data).into_owned()),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &str) -> Vec<String> {
        expand_braces(p).unwrap()
    }

    #[test]
    fn plain_patterns_stay() {
        assert_eq!(ex("00000.tar"), ["00000.tar"]);
        assert_eq!(ex(""), [""]);
        assert_eq!(ex("{x}.tar"), ["{x}.tar"]);
        assert_eq!(ex("a{}b"), ["a{}b"]);
    }

    #[test]
    fn zero_padded_ranges() {
        let v = ex("{000000..000146}.tar");
        assert_eq!(v.len(), 147);
        assert_eq!(v[0], "000000.tar");
        assert_eq!(v[146], "000146.tar");
        assert_eq!(ex("s-{08..11}"), ["s-08", "s-09", "s-10", "s-11"]);
        assert_eq!(ex("{8..11}"), ["8", "9", "10", "11"]);
        assert_eq!(ex("{3..1}"), ["3", "2", "1"]);
        assert_eq!(ex("{0..10..5}"), ["0", "5", "10"]);
        assert_eq!(ex("{-1..1}"), ["-1", "0", "1"]);
        assert_eq!(ex("{5..5}"), ["5"]);
    }

    #[test]
    fn lists_nesting_and_products() {
        assert_eq!(ex("{a,b}.tar"), ["a.tar", "b.tar"]);
        assert_eq!(ex("{,x}y"), ["y", "xy"]);
        assert_eq!(ex("{a,b}-{0..1}"), ["a-0", "a-1", "b-0", "b-1"]);
        assert_eq!(ex("x{a,b{1,2}}z"), ["xaz", "xb1z", "xb2z"]);
        assert_eq!(
            ex("d/{train,val}-{00..01}.tar"),
            [
                "d/train-00.tar",
                "d/train-01.tar",
                "d/val-00.tar",
                "d/val-01.tar"
            ]
        );
        assert_eq!(ex("{{a,b}}"), ["{a}", "{b}"]);
        assert_eq!(ex("{a..b}"), ["{a..b}"]);
    }

    #[test]
    fn bad_patterns_fail() {
        assert!(expand_braces("{a,b").is_err());
        assert!(expand_braces("a}b").is_err());
        assert!(expand_braces("{0..5..0}").is_err());
        assert!(expand_braces("{0..99999999999}").is_err());
        assert!(expand_braces("{0..9999}{0..9999}").is_err());
    }

    #[test]
    fn urls_only_lead_downwards() {
        let d = Path::new("/data/shards");
        assert_eq!(shard_url(d, d, "00000.tar").as_deref(), Ok("00000.tar"));
        assert_eq!(
            shard_url(d, d, "sub/00000.tar").as_deref(),
            Ok("sub/00000.tar")
        );
        assert_eq!(
            shard_url(d, Path::new("/data"), "00000.tar").as_deref(),
            Ok("shards/00000.tar")
        );
        assert_eq!(
            shard_url(d, Path::new("/data/index"), "00000.tar"),
            Err(NoUrl::Outside)
        );
        assert_eq!(shard_url(d, d, "/abs/00000.tar"), Err(NoUrl::Outside));
    }

    #[test]
    fn relative_paths() {
        let r = |a: &str, b: &str| relative_path(Path::new(a), Path::new(b)).unwrap();
        assert_eq!(r("/d/out", "/d/shards/0.tar"), Path::new("../shards/0.tar"));
        assert_eq!(r("/d", "/d/s/0.tar"), Path::new("s/0.tar"));
        assert_eq!(r("/a/b/c", "/x.tar"), Path::new("../../../x.tar"));
        assert!(relative_path(Path::new("rel"), Path::new("/x")).is_none());
    }
}
