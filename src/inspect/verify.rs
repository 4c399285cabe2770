//! `conmim-shard verify`: re-read every shard against the manifest and the index.
//!
//! Dataset level: the manifest's counts agree with the index and the rejected list,
//! no index row points outside the shard list, keys are unique.
//!
//! Shard level (in parallel over shards): the file exists, its size and md5 equal the
//! manifest entry, the tar parses, and its samples, in stored order, are exactly the
//! index rows of that shard sorted by offset: same key, offset, length and member list;
//! the image member's length and sha256 equal `image_bytes` / `sha256`, its header
//! dimensions and format equal `width` / `height` / `format`; `cls` equals `label`.
//! With `decode` every image (and every `seg.png` target) is fully decoded. The shard's
//! sample count must equal the manifest's `nsamples`.
//!
//! Samples present in a tar but not indexed are problems, unless the rejected list
//! names them as `{url}:{key}`: that is how `conmim-shard index` records samples of
//! existing shards it could not index (the tar still holds them, so `nsamples` counts
//! them, as `wids` needs). Tar members that belong to no sample (scan issues) are
//! likewise problems unless listed as `{url}:{member name}`.
//!
//! Nothing stops the check early: every problem is collected (at most
//! [`MAX_PROBLEMS_PER_SHARD`] per shard, then a count of the rest).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use super::{bytes_bar, human_bytes, is_image_ext, parse_cls, rows_bar, thread_pool};
use crate::error::{Error, Result};
use crate::format::index::{IndexBatches, IndexRow, for_each_batch};
use crate::format::manifest::{Manifest, ShardEntry, WIDS_KIND};
use crate::format::reject::read_rejects;
use crate::format::tar::{Member, ScannedSample, md5_file, scan_shard};
use crate::format::{self, read_json, split_member_name};
use crate::image::{self, ImageInfo, ImageLimits};
use crate::shard::source::sha256_hex;

/// Problems kept per shard; further ones are only counted.
pub const MAX_PROBLEMS_PER_SHARD: usize = 100;
/// Problems kept for dataset-level checks of one kind (bad shard references, keys).
const MAX_DATASET_PROBLEMS: usize = 100;
/// Problems the human report lists.
const SHOWN_PROBLEMS: usize = 20;

/// How to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Fully decode every image (default: header probe only).
    pub decode: bool,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Show a progress bar.
    pub progress: bool,
}

/// One thing that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Shard file (its manifest url), or the dataset file the problem is about.
    pub shard: String,
    /// Sample key, where the problem concerns one sample.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    fn new(shard: impl Into<String>, key: Option<&str>, message: impl Into<String>) -> Self {
        Problem {
            shard: shard.into(),
            key: key.map(str::to_owned),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{}: sample {k}: {}", self.shard, self.message),
            None => write!(f, "{}: {}", self.shard, self.message),
        }
    }
}

/// What verification found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Dataset directory.
    pub dataset: PathBuf,
    /// Split.
    pub split: String,
    /// Shards in the manifest.
    pub shards: u64,
    /// Samples found in the shards.
    pub samples: u64,
    /// Index rows.
    pub indexed: u64,
    /// Samples found in the shards that the rejected list accounts for.
    pub rejected_in_shards: u64,
    /// Shard bytes read.
    pub bytes: u64,
    /// Whether images were fully decoded.
    pub decoded: bool,
    /// Everything that is wrong, dataset-level first, then shard by shard.
    pub problems: Vec<Problem>,
    /// Wall time.
    pub elapsed: Duration,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "verify    {} ({}){}",
            self.dataset.display(),
            self.split,
            if self.decoded { ", full decode" } else { "" }
        )?;
        writeln!(
            f,
            "checked   {} shards, {} samples ({} indexed, {} rejected in shards), {} in {:.2} s ({:.1} MB/s)",
            self.shards,
            self.samples,
            self.indexed,
            self.rejected_in_shards,
            human_bytes(self.bytes),
            secs,
            self.bytes as f64 / 1e6 / secs
        )?;
        if self.ok() {
            return write!(f, "result    OK");
        }
        write!(f, "result    FAILED: {} problem(s)", self.problems.len())?;
        for p in self.problems.iter().take(SHOWN_PROBLEMS) {
            write!(f, "\n  {p}")?;
        }
        if self.problems.len() > SHOWN_PROBLEMS {
            write!(
                f,
                "\n  ... and {} more",
                self.problems.len() - SHOWN_PROBLEMS
            )?;
        }
        Ok(())
    }
}

/// Problems of one shard, capped.
struct Sink {
    shard: String,
    problems: Vec<Problem>,
    dropped: u64,
}

impl Sink {
    fn new(shard: &str) -> Self {
        Sink {
            shard: shard.to_owned(),
            problems: Vec::new(),
            dropped: 0,
        }
    }

    fn push(&mut self, key: Option<&str>, message: impl Into<String>) {
        if self.problems.len() < MAX_PROBLEMS_PER_SHARD {
            self.problems
                .push(Problem::new(self.shard.clone(), key, message));
        } else {
            self.dropped += 1;
        }
    }

    fn finish(mut self) -> Vec<Problem> {
        if self.dropped > 0 {
            let m = format!("... and {} more problems in this shard", self.dropped);
            self.problems
                .push(Problem::new(self.shard.clone(), None, m));
        }
        self.problems
    }
}

/// What checking one shard gave.
struct ShardOutcome {
    samples: u64,
    rejected: u64,
    bytes: u64,
    problems: Vec<Problem>,
}

/// Everything a shard check needs besides the shard itself.
struct Ctx<'a> {
    dir: &'a Path,
    rejected: &'a HashSet<String>,
    limits: ImageLimits,
    decode: bool,
}

/// Verifies dataset `split` in `dir`. Fails only when the manifest or index cannot be
/// read at all; everything else becomes a [`Problem`] in the report.
pub fn verify(dir: &Path, split: &str, opts: &VerifyOptions) -> Result<VerifyReport> {
    let started = Instant::now();
    let manifest_file = format::manifest_name(split);
    let index_file = format::index_name(split);
    let rejected_file = format::rejected_name(split);
    let manifest: Manifest = read_json(&dir.join(&manifest_file))?;
    let mut problems = Vec::new();

    // Rejected list (optional, but its sources account for unindexed tar samples).
    let rejected_path = dir.join(&rejected_file);
    let mut rejected = HashSet::new();
    if rejected_path.exists() {
        match read_rejects(&rejected_path) {
            Ok(list) => {
                if list.len() as u64 != manifest.conmim.num_rejected {
                    problems.push(Problem::new(
                        &manifest_file,
                        None,
                        format!(
                            "num_rejected is {} but {rejected_file} lists {}",
                            manifest.conmim.num_rejected,
                            list.len()
                        ),
                    ));
                }
                rejected.extend(list.into_iter().map(|r| r.source));
            }
            Err(e) => problems.push(Problem::new(&rejected_file, None, e.to_string())),
        }
    } else if manifest.conmim.num_rejected > 0 {
        problems.push(Problem::new(
            &rejected_file,
            None,
            format!(
                "missing, but the manifest counts {} rejects",
                manifest.conmim.num_rejected
            ),
        ));
    }

    // Dataset-level checks, streaming the index once.
    let index_path = dir.join(&index_file);
    let nshards = manifest.shardlist.len();
    let mut keys = KeyCheck::new(nshards, manifest.conmim.num_samples);
    let pb = rows_bar(opts.progress, manifest.conmim.num_samples, "index");
    for rows in IndexBatches::open(&index_path)? {
        let rows = rows?;
        rows.iter().for_each(|r| keys.add(r));
        pb.inc(rows.len() as u64);
    }
    pb.finish_and_clear();
    let indexed = keys.rows;
    let in_shard_order = keys.in_shard_order;
    manifest_problems(&manifest, &manifest_file, indexed, &mut problems);
    keys.finish(&index_path, &index_file, &mut problems)?;

    let limits = manifest
        .conmim
        .params
        .get("limits")
        .and_then(|l| serde_json::from_value::<ImageLimits>(l.clone()).ok())
        .unwrap_or_default();
    let ctx = Ctx {
        dir,
        rejected: &rejected,
        limits,
        decode: opts.decode,
    };
    let total: u64 = manifest.shardlist.iter().map(|s| s.filesize).sum();
    let pb = bytes_bar(opts.progress, total, "verify");
    let done = AtomicU64::new(0);
    let pool = thread_pool(opts.threads)?;
    // Then each shard against its rows: streamed a shard at a time when the index is in
    // shard order, as conmim-shard writes it; else gathered in memory first.
    let groups: Box<dyn Iterator<Item = Result<(usize, Vec<IndexRow>)>> + Send> = if in_shard_order
    {
        Box::new(ShardGroups::new(IndexBatches::open(&index_path)?, nshards))
    } else {
        let mut per_shard: Vec<Vec<IndexRow>> = vec![Vec::new(); nshards];
        for_each_batch(&index_path, |rows| {
            for r in rows {
                if let Some(v) = per_shard.get_mut(r.shard as usize) {
                    v.push(r);
                }
            }
            Ok(())
        })?;
        Box::new(per_shard.into_iter().enumerate().map(Ok))
    };
    let failed = std::sync::Mutex::new(None);
    let mut outcomes: Vec<(usize, ShardOutcome)> = pool.install(|| {
        groups
            .par_bridge()
            .filter_map(|group| match group {
                Ok((i, mut rows)) => {
                    rows.sort_by_key(|r| r.offset);
                    let entry = &manifest.shardlist[i];
                    let out = check_shard(&ctx, entry, &rows);
                    pb.inc(entry.filesize);
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    pb.set_message(format!("{n}/{nshards} shards"));
                    Some((i, out))
                }
                Err(e) => {
                    failed.lock().unwrap().get_or_insert(e);
                    None
                }
            })
            .collect()
    });
    if let Some(e) = failed.into_inner().unwrap() {
        pb.finish_and_clear();
        return Err(e);
    }
    outcomes.sort_by_key(|(i, _)| *i);
    pb.finish_and_clear();

    let mut samples = 0;
    let mut rejected_in_shards = 0;
    let mut bytes = 0;
    for (_, o) in outcomes {
        samples += o.samples;
        rejected_in_shards += o.rejected;
        bytes += o.bytes;
        problems.extend(o.problems);
    }
    Ok(VerifyReport {
        dataset: dir.to_owned(),
        split: split.to_owned(),
        shards: nshards as u64,
        samples,
        indexed,
        rejected_in_shards,
        bytes,
        decoded: opts.decode,
        problems,
        elapsed: started.elapsed(),
    })
}

/// The manifest's own consistency, and its counts against the index.
fn manifest_problems(m: &Manifest, file: &str, index_rows: u64, out: &mut Vec<Problem>) {
    let mut bad = |msg: String| out.push(Problem::new(file, None, msg));
    if m.kind != WIDS_KIND {
        bad(format!("__kind__ is `{}`, expected `{WIDS_KIND}`", m.kind));
    }
    let c = &m.conmim;
    if c.num_samples != index_rows {
        bad(format!(
            "num_samples is {} but the index has {index_rows} rows",
            c.num_samples
        ));
    }
    if c.num_shards != m.shardlist.len() as u64 {
        bad(format!(
            "num_shards is {} but the shard list has {} entries",
            c.num_shards,
            m.shardlist.len()
        ));
    }
    let total: u64 = m.shardlist.iter().map(|s| s.filesize).sum();
    if c.total_bytes != total {
        bad(format!(
            "total_bytes is {} but the shard list sums to {total}",
            c.total_bytes
        ));
    }
    if c.num_inputs != c.num_samples + c.num_rejected {
        bad(format!(
            "num_inputs {} != num_samples {} + num_rejected {}",
            c.num_inputs, c.num_samples, c.num_rejected
        ));
    }
    let by_reason: u64 = c.rejected_by_reason.values().sum();
    if by_reason != c.num_rejected {
        bad(format!(
            "rejected_by_reason sums to {by_reason}, num_rejected is {}",
            c.num_rejected
        ));
    }
    let mut urls = HashSet::new();
    for s in &m.shardlist {
        if !urls.insert(s.url.as_str()) {
            bad(format!("shard {} is listed twice", s.url));
        }
    }
}

/// Index rows pointing outside the shard list; duplicate keys. Fed one row at a time,
/// it keeps 24 bytes per row (a hash of the key and the shard), not the keys.
struct KeyCheck {
    shards: usize,
    rows: u64,
    /// Whether the rows inside the shard list come in shard order.
    in_shard_order: bool,
    last_shard: u32,
    /// Per shard number outside the list: rows, first key.
    outside: Vec<(u32, u64, String)>,
    /// Each row's key hash and shard; sorted at the end, equal hashes are duplicates.
    hashes: Vec<(KeyHash, u32)>,
}

/// A 128-bit hash standing for a key: two different keys of a dataset share one with a
/// chance of about n^2 / 2^129 (1e-25 for 15 million keys).
type KeyHash = [u64; 2];

fn key_hash(key: &str) -> KeyHash {
    let h = xxhash_rust::xxh3::xxh3_128(key.as_bytes());
    [(h >> 64) as u64, h as u64]
}

impl KeyCheck {
    /// For an index of about `rows` rows.
    fn new(shards: usize, rows: u64) -> Self {
        let mut hashes = Vec::new();
        // Address space only, until written; a manifest with a wrong count costs nothing.
        let _ = hashes.try_reserve_exact(rows as usize);
        KeyCheck {
            shards,
            rows: 0,
            in_shard_order: true,
            last_shard: 0,
            outside: Vec::new(),
            hashes,
        }
    }

    fn add(&mut self, r: &IndexRow) {
        self.rows += 1;
        if r.shard as usize >= self.shards {
            match self.outside.iter_mut().find(|o| o.0 == r.shard) {
                Some(o) => o.1 += 1,
                None => self.outside.push((r.shard, 1, r.key.clone())),
            }
        } else {
            self.in_shard_order &= r.shard >= self.last_shard;
            self.last_shard = r.shard;
        }
        self.hashes.push((key_hash(&r.key), r.shard));
    }

    /// Reports what was found. Names duplicate keys by reading the index at `index`
    /// once more, which happens only when there are any.
    fn finish(self, index: &Path, file: &str, out: &mut Vec<Problem>) -> Result<()> {
        let n = self.shards;
        for (shard, count, key) in self.outside.into_iter().take(MAX_DATASET_PROBLEMS) {
            out.push(Problem::new(
                file,
                Some(&key),
                format!(
                    "{count} index row(s) reference shard {shard}, but the manifest lists only {n} shards"
                ),
            ));
        }
        let mut hashes = self.hashes;
        hashes.sort_unstable();
        let mut dups = 0usize;
        let mut shown: Vec<(KeyHash, u32, u32)> = Vec::new(); // key, first shard, other
        for same in hashes.chunk_by(|a, b| a.0 == b.0) {
            for &(h, shard) in &same[1..] {
                if shown.len() < MAX_DATASET_PROBLEMS {
                    shown.push((h, same[0].1, shard));
                }
                dups += 1;
            }
        }
        drop(hashes);
        if shown.is_empty() {
            return Ok(());
        }
        let wanted: HashSet<KeyHash> = shown.iter().map(|d| d.0).collect();
        let mut keys: HashMap<KeyHash, String> = HashMap::new();
        for_each_batch(index, |rows| {
            for r in rows {
                let h = key_hash(&r.key);
                if wanted.contains(&h) {
                    keys.entry(h).or_insert(r.key);
                }
            }
            Ok(())
        })?;
        for (h, first, shard) in shown {
            out.push(Problem::new(
                file,
                keys.get(&h).map(String::as_str),
                format!("key appears more than once in the index (shards {first} and {shard})"),
            ));
        }
        if dups > MAX_DATASET_PROBLEMS {
            out.push(Problem::new(
                file,
                None,
                format!(
                    "... and {} more duplicate keys",
                    dups - MAX_DATASET_PROBLEMS
                ),
            ));
        }
        Ok(())
    }
}

/// The rows of an index in shard order, grouped by shard: `(shard, rows)` for every
/// shard of the list in turn, empty for a shard without rows. Rows outside the list
/// are left out (the [`KeyCheck`] reports them).
struct ShardGroups {
    batches: IndexBatches,
    shards: usize,
    /// The shard whose group comes next.
    next: usize,
    group: Vec<IndexRow>,
    pending: std::vec::IntoIter<IndexRow>,
    /// A row read that opens a later shard's group.
    held: Option<IndexRow>,
    failed: bool,
}

impl ShardGroups {
    fn new(batches: IndexBatches, shards: usize) -> Self {
        ShardGroups {
            batches,
            shards,
            next: 0,
            group: Vec::new(),
            pending: Vec::new().into_iter(),
            held: None,
            failed: false,
        }
    }
}

impl Iterator for ShardGroups {
    type Item = Result<(usize, Vec<IndexRow>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.next >= self.shards {
            return None;
        }
        loop {
            let r = match self.held.take().or_else(|| self.pending.next()) {
                Some(r) => r,
                None => match self.batches.next() {
                    Some(Ok(rows)) => {
                        self.pending = rows.into_iter();
                        continue;
                    }
                    Some(Err(e)) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                    // The end: this group, then the empty ones of the shards left.
                    None => break,
                },
            };
            let shard = r.shard as usize;
            if shard >= self.shards {
                continue;
            }
            if shard < self.next {
                // The first pass found them in order: the file changed in between.
                self.failed = true;
                return Some(Err(Error::Index {
                    path: self.batches.path().to_owned(),
                    message: format!(
                        "row `{}` of shard {shard} comes after shard {}'s rows; was the index \
                         rewritten during the check?",
                        r.key, self.next
                    ),
                }));
            }
            if shard == self.next {
                self.group.push(r);
            } else {
                self.held = Some(r);
                break;
            }
        }
        let i = self.next;
        self.next += 1;
        Some(Ok((i, std::mem::take(&mut self.group))))
    }
}

/// Checks one shard file against its manifest entry and index rows.
fn check_shard(ctx: &Ctx<'_>, entry: &ShardEntry, rows: &[IndexRow]) -> ShardOutcome {
    let mut sink = Sink::new(&entry.url);
    let mut outcome = ShardOutcome {
        samples: 0,
        rejected: 0,
        bytes: 0,
        problems: Vec::new(),
    };
    let path = ctx.dir.join(&entry.url);
    match std::fs::metadata(&path) {
        Err(e) => {
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                "shard file is missing".to_owned()
            } else {
                format!("cannot read shard file: {e}")
            };
            sink.push(None, format!("{what} ({} index rows)", rows.len()));
            outcome.problems = sink.finish();
            return outcome;
        }
        Ok(meta) if !meta.is_file() => {
            sink.push(None, "not a regular file");
            outcome.problems = sink.finish();
            return outcome;
        }
        Ok(_) => {}
    }
    match md5_file(&path) {
        Ok((md5, size)) => {
            outcome.bytes = size;
            if size != entry.filesize {
                sink.push(
                    None,
                    format!(
                        "file size is {size} bytes, the manifest says {}",
                        entry.filesize
                    ),
                );
            }
            if md5 != entry.md5sum {
                sink.push(
                    None,
                    format!("md5 is {md5}, the manifest says {}", entry.md5sum),
                );
            }
        }
        Err(e) => sink.push(None, format!("cannot read: {e}")),
    }

    let prefix = format!("{}:", entry.url);
    let listed = |name: &str| ctx.rejected.contains(&format!("{prefix}{name}"));
    let mut next = 0usize;
    let mut issues = Vec::new();
    let scanned = scan_shard(
        &path,
        |s| {
            outcome.samples += 1;
            while next < rows.len() && rows[next].offset < s.offset {
                let r = &rows[next];
                sink.push(
                    Some(&r.key),
                    format!("no sample starts at index offset {}", r.offset),
                );
                next += 1;
            }
            if next < rows.len() && rows[next].offset == s.offset {
                check_sample(ctx, &rows[next], &s, &mut sink);
                next += 1;
            } else if listed(&s.key) {
                outcome.rejected += 1;
            } else {
                sink.push(
                    Some(&s.key),
                    format!(
                        "sample at offset {} is in the shard but neither in the index nor in the rejected list",
                        s.offset
                    ),
                );
            }
            Ok(())
        },
        |i| issues.push(i),
    );
    for i in issues {
        if !listed(&i.name) {
            sink.push(None, format!("member `{}`: {}", i.name, i.message));
        }
    }
    match scanned {
        Ok(n) => {
            if n != entry.nsamples {
                sink.push(
                    None,
                    format!(
                        "shard holds {n} samples, the manifest says nsamples = {}",
                        entry.nsamples
                    ),
                );
            }
            for r in &rows[next.min(rows.len())..] {
                sink.push(
                    Some(&r.key),
                    format!("indexed at offset {} but not found in the shard", r.offset),
                );
            }
        }
        Err(e) => {
            let msg = match e {
                Error::CorruptShard { message, .. } => format!("unreadable tar: {message}"),
                other => format!("unreadable tar: {other}"),
            };
            // Resynchronise: check the rows not reached at their recorded offsets.
            let left = &rows[next.min(rows.len())..];
            if left.is_empty() {
                sink.push(None, msg);
            } else {
                sink.push(
                    None,
                    format!(
                        "{msg}; the {} index rows after that point are checked at their \
                         recorded offsets",
                        left.len()
                    ),
                );
                outcome.samples += check_rows_at_offsets(ctx, &path, left, &mut sink);
            }
        }
    }
    outcome.problems = sink.finish();
    outcome
}

/// Checks `rows` by reading each one's byte range directly (after the tar stream broke
/// down). Returns how many samples could be read.
fn check_rows_at_offsets(ctx: &Ctx<'_>, path: &Path, rows: &[IndexRow], sink: &mut Sink) -> u64 {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            sink.push(None, format!("cannot reopen: {e}"));
            return 0;
        }
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut read = 0;
    for r in rows {
        let key = Some(r.key.as_str());
        let end = r.offset.saturating_add(r.length);
        if end > size {
            sink.push(
                key,
                format!(
                    "indexed at bytes {}..{end}, but the shard ends at {size}",
                    r.offset
                ),
            );
            continue;
        }
        let mut buf = vec![0u8; r.length as usize];
        if let Err(e) = file
            .seek(SeekFrom::Start(r.offset))
            .and_then(|_| file.read_exact(&mut buf))
        {
            sink.push(
                key,
                format!("cannot read bytes at offset {}: {e}", r.offset),
            );
            continue;
        }
        match sample_at(&buf, r.offset) {
            Ok(s) => {
                read += 1;
                check_sample(ctx, r, &s, sink);
            }
            Err(m) => sink.push(key, format!("at offset {}: {m}", r.offset)),
        }
    }
    read
}

/// Parses the bytes of one sample (its members' headers and data) read from `offset`.
fn sample_at(buf: &[u8], offset: u64) -> std::result::Result<ScannedSample, String> {
    let mut archive = tar::Archive::new(buf);
    let mut sample: Option<ScannedSample> = None;
    for entry in archive
        .entries()
        .map_err(|e| format!("bad tar structure: {e}"))?
    {
        let mut entry = entry.map_err(|e| format!("bad tar structure: {e}"))?;
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (key, ext) =
            split_member_name(&name).ok_or_else(|| format!("member `{name}` has no extension"))?;
        if entry.size() > crate::stream::MAX_MEMBER_BYTES {
            return Err(format!("member `{name}` claims {} bytes", entry.size()));
        }
        let mut data =
            Vec::with_capacity(entry.size().min(crate::format::tar::PREALLOC_MAX) as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| format!("member `{name}`: {e}"))?;
        let member = Member {
            ext,
            header_offset: offset + entry.raw_header_position(),
            data,
        };
        match sample.as_mut() {
            None => {
                sample = Some(ScannedSample {
                    key: key.to_owned(),
                    offset,
                    length: buf.len() as u64,
                    members: vec![member],
                })
            }
            Some(s) if s.key == key => s.members.push(member),
            Some(s) => {
                return Err(format!(
                    "member `{name}` lies inside the range of sample `{}`",
                    s.key
                ));
            }
        }
    }
    sample.ok_or_else(|| "no tar member there".to_owned())
}

/// The member holding a sample's image: the first image-extension member whose
/// extension names `format`, else the first image-extension member.
pub fn image_member<'a>(s: &'a ScannedSample, format: &str) -> Option<&'a Member> {
    let images = || s.members.iter().filter(|m| is_image_ext(&m.ext));
    images()
        .find(|m| image::ImageFormat::from_ext(&m.ext).is_some_and(|f| f.name() == format))
        .or_else(|| images().next())
}

/// Compares one scanned sample with its index row.
fn check_sample(ctx: &Ctx<'_>, row: &IndexRow, s: &ScannedSample, sink: &mut Sink) {
    let key = Some(row.key.as_str());
    if s.key != row.key {
        sink.push(
            key,
            format!(
                "the shard has key `{}` at offset {}, not this one",
                s.key, s.offset
            ),
        );
        return;
    }
    if s.length != row.length {
        sink.push(
            key,
            format!(
                "spans {} bytes in the shard, the index says {}",
                s.length, row.length
            ),
        );
    }
    let members: Vec<&str> = s.members.iter().map(|m| m.ext.as_str()).collect();
    let members = members.join(",");
    if members != row.members {
        sink.push(
            key,
            format!("members are `{members}`, the index says `{}`", row.members),
        );
    }
    match image_member(s, &row.format) {
        None => sink.push(key, format!("no image member (format {})", row.format)),
        Some(m) => {
            if m.data.len() as u64 != row.image_bytes {
                sink.push(
                    key,
                    format!(
                        "image member `{}` has {} bytes, the index says {}",
                        m.ext,
                        m.data.len(),
                        row.image_bytes
                    ),
                );
            }
            let sha = sha256_hex(&m.data);
            if sha != row.sha256 {
                sink.push(
                    key,
                    format!(
                        "image member `{}` sha256 is {sha}, the index says {}",
                        m.ext, row.sha256
                    ),
                );
            }
            let checked = if ctx.decode {
                image::decode_check(&m.data, &ctx.limits)
            } else {
                image::probe(&m.data, &ctx.limits)
            };
            match checked {
                Ok(info) => dims_problems(&info, row, &m.ext, sink),
                Err(p) => sink.push(
                    key,
                    format!(
                        "image member `{}` {}: {p}",
                        m.ext,
                        if ctx.decode {
                            "fails to decode"
                        } else {
                            "header"
                        }
                    ),
                ),
            }
        }
    }
    if ctx.decode
        && let Some(seg) = s.member("seg.png")
        && let Err(p) = image::decode_check(&seg.data, &ctx.limits)
    {
        sink.push(key, format!("`seg.png` fails to decode: {p}"));
    }
    let cls = s.member("cls");
    let stored = cls.and_then(|m| parse_cls(&m.data));
    if stored != row.label {
        let shown = match (cls, stored) {
            (None, _) => "no cls member".to_owned(),
            (Some(_), None) => "a cls member that is not an integer".to_owned(),
            (Some(_), Some(l)) => format!("cls {l}"),
        };
        let want = row
            .label
            .map_or_else(|| "no label".to_owned(), |l| format!("label {l}"));
        sink.push(key, format!("the shard has {shown}, the index says {want}"));
    }
}

fn dims_problems(info: &ImageInfo, row: &IndexRow, ext: &str, sink: &mut Sink) {
    let key = Some(row.key.as_str());
    if (info.width, info.height) != (row.width, row.height) {
        sink.push(
            key,
            format!(
                "image member `{ext}` is {}x{}, the index says {}x{}",
                info.width, info.height, row.width, row.height
            ),
        );
    }
    if info.format.name() != row.format {
        sink.push(
            key,
            format!(
                "image member `{ext}` is {}, the index says {}",
                info.format.name(),
                row.format
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_caps_and_counts() {
        let mut s = Sink::new("a.tar");
        for i in 0..(MAX_PROBLEMS_PER_SHARD + 5) {
            s.push(Some("k"), format!("p{i}"));
        }
        let p = s.finish();
        assert_eq!(p.len(), MAX_PROBLEMS_PER_SHARD + 1);
        assert!(p.last().unwrap().message.contains("5 more"));
        assert_eq!(p[0].to_string(), "a.tar: sample k: p0");
    }

    #[test]
    fn report_lists_a_limited_number_of_problems() {
        let mut r = VerifyReport {
            dataset: "d".into(),
            split: "train".into(),
            shards: 1,
            samples: 2,
            indexed: 2,
            rejected_in_shards: 0,
            bytes: 10,
            decoded: false,
            problems: Vec::new(),
            elapsed: Duration::from_millis(5),
        };
        assert!(r.ok());
        assert!(r.to_string().ends_with("OK"));
        r.problems = (0..30)
            .map(|i| Problem::new("x.tar", None, format!("p{i}")))
            .collect();
        let text = r.to_string();
        assert!(text.contains("FAILED: 30 problem(s)"));
        assert!(text.contains("x.tar: p19"));
        assert!(!text.contains("x.tar: p20"));
        assert!(text.contains("and 10 more"));
    }

    fn row(key: String, shard: u32, offset: u64) -> IndexRow {
        IndexRow {
            key,
            shard,
            offset,
            ..Default::default()
        }
    }

    /// Issue 2 (verify a 15M-sample index without holding it): the groups come a shard
    /// at a time across batch boundaries, every shard of the list once (empty ones too),
    /// every row inside the list once, in its shard's group.
    #[test]
    fn issue2_verify_streams_the_index_a_shard_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.index.parquet");
        // 7 shards; shard 2 and 6 have no rows; 3 spans two read batches; one row
        // points outside the list.
        let sizes = [5usize, 3, 0, crate::format::index::READ_BATCH + 10, 1, 2, 0];
        let mut rows = Vec::new();
        for (s, &n) in sizes.iter().enumerate() {
            for k in 0..n {
                rows.push(row(format!("{s}/{k}"), s as u32, (n - k) as u64));
            }
            if s == 4 {
                rows.push(row("outside".into(), 9, 0));
            }
        }
        crate::format::index::write_index(&path, &rows).unwrap();

        let mut keys = KeyCheck::new(sizes.len(), 0);
        for b in IndexBatches::open(&path).unwrap() {
            b.unwrap().iter().for_each(|r| keys.add(r));
        }
        assert!(keys.in_shard_order);
        assert_eq!(keys.rows, rows.len() as u64);

        let groups: Vec<(usize, Vec<IndexRow>)> =
            ShardGroups::new(IndexBatches::open(&path).unwrap(), sizes.len())
                .map(Result::unwrap)
                .collect();
        assert_eq!(
            groups.iter().map(|g| g.0).collect::<Vec<_>>(),
            (0..sizes.len()).collect::<Vec<_>>()
        );
        for (s, group) in &groups {
            let expected: Vec<&IndexRow> = rows.iter().filter(|r| r.shard as usize == *s).collect();
            assert_eq!(group.iter().collect::<Vec<_>>(), expected, "shard {s}");
        }
    }

    #[test]
    fn key_check_finds_duplicates_outside_rows_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.index.parquet");
        let rows = [
            row("a".into(), 0, 0),
            row("b".into(), 1, 0),
            row("a".into(), 1, 5),
            row("c".into(), 7, 0),
            row("d".into(), 0, 9),
            row("a".into(), 1, 7),
        ];
        crate::format::index::write_index(&path, &rows).unwrap();
        let mut k = KeyCheck::new(2, 1 << 60);
        rows.iter().for_each(|r| k.add(r));
        assert!(!k.in_shard_order, "shard 0 after shard 1");
        let mut out = Vec::new();
        k.finish(&path, "t.index.parquet", &mut out).unwrap();
        let text: Vec<String> = out.iter().map(|p| p.to_string()).collect();
        assert_eq!(out.len(), 3, "{text:#?}");
        assert_eq!(out[0].key.as_deref(), Some("c"), "{text:#?}");
        assert!(out[0].message.contains("shard 7"), "{text:#?}");
        for p in &out[1..] {
            assert_eq!(p.key.as_deref(), Some("a"), "{text:#?}");
            assert!(p.message.contains("shards 0 and 1"), "{text:#?}");
        }
    }
}
