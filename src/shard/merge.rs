//! Combining `--part i/N` runs into one dataset.
//!
//! Each part run writes `{split}-partIIIofNNN-*.tar` shards plus its own index, manifest
//! and rejected list (see [`super::part_name`]), on its own machine or into a shared
//! directory. [`merge`] finds the part manifests of one `N` in the input directories,
//! checks that all `N` parts are there and were built with the same parameters, then:
//!
//! 1. moves every part's shards (part order, then shard order) to
//!    `out/{split}-{global:06}.tar`, numbered contiguously (rename; copy + remove
//!    across file systems);
//! 2. writes `out/{split}.index.parquet` with every row's `shard` rewritten to the
//!    global number, and `out/{split}.rejected.jsonl` (the parts' lists concatenated:
//!    each part lists the enumeration rejects whose source hashes to it, so each
//!    appears once; a repeat, should one come, is still kept once);
//! 3. writes `out/{split}.manifest.json` (dataset `merge`, the parts' common parameters
//!    plus `parts: N`) last;
//! 4. deletes the part indices, rejected lists and manifests.
//!
//! The part manifests are only deleted at the very end, so a merge interrupted anywhere
//! before step 4 can simply be run again: a shard whose part file is gone while its
//! target exists with the recorded size has already been moved. A finished merge is
//! never redone (its manifest exists).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use xxhash_rust::xxh3::xxh3_128;

use super::Summary;
use crate::error::{Error, Result};
use crate::format::index::IndexWriter;
use crate::format::manifest::{DatasetInfo, Manifest, ShardEntry, tool_name};
use crate::format::reject::Reject;
use crate::format::{self, SCHEMA_VERSION};

/// One part found in an input directory.
#[derive(Debug)]
struct PartRun {
    index: u32,
    count: u32,
    dir: PathBuf,
    /// `{split}-partIIIofNNN`.
    name: String,
    manifest_path: PathBuf,
    manifest: Manifest,
}

impl PartRun {
    fn index_path(&self) -> PathBuf {
        self.dir.join(format::index_name(&self.name))
    }
    fn rejected_path(&self) -> PathBuf {
        self.dir.join(format::rejected_name(&self.name))
    }
}

/// `(i, N)` of a file named `{split}-part{i}of{N}.manifest.json`.
fn parse_part_manifest(split: &str, file_name: &str) -> Option<(u32, u32)> {
    let rest = file_name
        .strip_prefix(split)?
        .strip_prefix("-part")?
        .strip_suffix(".manifest.json")?;
    let (i, n) = rest.split_once("of")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(i) || !digits(n) {
        return None;
    }
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// Parameters without `part` (what all parts must share).
fn common_params(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("part");
    }
    v
}

/// Dotted names of the parameters that differ between `a` and `b`.
fn param_diff(a: &serde_json::Value, b: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match (a.as_object(), b.as_object()) {
        (Some(x), Some(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = serde_json::Value::Null;
                let (va, vb) = (x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null));
                if va != vb {
                    param_diff(va, vb, &format!("{prefix}{k}."), out);
                }
            }
        }
        _ => {
            if a != b {
                let name = prefix.trim_end_matches('.');
                out.push(format!("{name} ({a} vs {b})"));
            }
        }
    }
}

fn find_parts(split: &str, inputs: &[PathBuf]) -> Result<Vec<PartRun>> {
    let mut seen_dirs = BTreeSet::new();
    let mut found: Vec<PartRun> = Vec::new();
    for dir in inputs {
        let real = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        if !seen_dirs.insert(real) {
            continue;
        }
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        for file_name in names {
            let Some((index, count)) = parse_part_manifest(split, &file_name) else {
                continue;
            };
            let manifest_path = dir.join(&file_name);
            let manifest: Manifest = format::read_json(&manifest_path)?;
            let name = file_name
                .strip_suffix(".manifest.json")
                .expect("suffix checked")
                .to_owned();
            found.push(PartRun {
                index,
                count,
                dir: dir.clone(),
                name,
                manifest_path,
                manifest,
            });
        }
    }
    Ok(found)
}

fn where_searched(inputs: &[PathBuf]) -> String {
    inputs
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that `found` is exactly parts `0..N` of one `N`, consistent with each other.
fn check_parts(split: &str, inputs: &[PathBuf], mut found: Vec<PartRun>) -> Result<Vec<PartRun>> {
    let searched = where_searched(inputs);
    let at = inputs.first().cloned().unwrap_or_default();
    if found.is_empty() {
        return Err(Error::input(
            at,
            format!(
                "no part manifests `{split}-partIIIofNNN.manifest.json` in {searched}; run \
                 `--part i/N` for every part first (a part is only complete once its manifest \
                 exists)"
            ),
        ));
    }
    let counts: BTreeSet<u32> = found.iter().map(|p| p.count).collect();
    if counts.len() > 1 {
        let list: Vec<String> = counts.iter().map(|n| n.to_string()).collect();
        return Err(Error::input(
            at,
            format!(
                "part manifests of different part counts N ({}) in {searched}; merge one \
                 set of parts at a time (move the others away)",
                list.join(", ")
            ),
        ));
    }
    let n = found[0].count;
    found.sort_by_key(|p| p.index);
    for w in found.windows(2) {
        if w[0].index == w[1].index {
            return Err(Error::input(
                &w[1].manifest_path,
                format!(
                    "part {}/{n} found twice (also {}); keep one of them",
                    w[0].index,
                    w[0].manifest_path.display()
                ),
            ));
        }
    }
    let have: BTreeSet<u32> = found.iter().map(|p| p.index).collect();
    let missing: Vec<String> = (0..n)
        .filter(|i| !have.contains(i))
        .map(|i| format!("{i}/{n}"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::input(
            at,
            format!(
                "parts {} are missing (no complete `{split}-partIIIof{n:03}.manifest.json` in \
                 {searched}); finish those runs, or add the directories holding them",
                missing.join(", ")
            ),
        ));
    }
    let first = &found[0];
    let base = common_params(&first.manifest.conmim.params);
    for p in &found {
        let info = &p.manifest.conmim;
        let expect_part = serde_json::json!({"index": p.index, "count": n});
        if info.params.get("part") != Some(&expect_part) || info.split != split {
            return Err(Error::input(
                &p.manifest_path,
                format!(
                    "the manifest does not describe part {}/{n} of split `{split}` (its params \
                     say part {}, split `{}`); was the file renamed?",
                    p.index,
                    info.params.get("part").unwrap_or(&serde_json::Value::Null),
                    info.split
                ),
            ));
        }
        if info.schema_version != SCHEMA_VERSION {
            return Err(Error::input(
                &p.manifest_path,
                format!(
                    "schema version {} but this tool writes {SCHEMA_VERSION}; re-run the part \
                     with this version",
                    info.schema_version
                ),
            ));
        }
        if info.dataset != first.manifest.conmim.dataset {
            return Err(Error::input(
                &p.manifest_path,
                format!(
                    "built by `{}` but part 0 by `{}`",
                    info.dataset, first.manifest.conmim.dataset
                ),
            ));
        }
        let mine = common_params(&info.params);
        if mine != base {
            let mut diff = Vec::new();
            param_diff(&base, &mine, "", &mut diff);
            return Err(Error::input(
                &p.manifest_path,
                format!(
                    "part {}/{n} was built with other parameters than part 0 ({}): {}; all \
                     parts must come from the same command apart from --part",
                    p.index,
                    first.manifest_path.display(),
                    diff.join("; ")
                ),
            ));
        }
        if info.num_shards != p.manifest.shardlist.len() as u64 {
            return Err(Error::input(
                &p.manifest_path,
                "num_shards disagrees with the shard list; the manifest is damaged",
            ));
        }
    }
    Ok(found)
}

/// What has to happen to one shard.
enum Step {
    Move,
    AlreadyMoved,
}

fn is_cross_device(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::CrossesDevices || e.raw_os_error() == Some(18)
}

/// Moves `src` to `dst` (replacing it); copies and removes across file systems.
fn move_file(src: &Path, dst: &Path) -> Result<()> {
    match std::fs::rename(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if is_cross_device(&e) => {
            let tmp = format::tmp_path(dst);
            std::fs::copy(src, &tmp).map_err(|e| Error::io(&tmp, e))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))?;
            std::fs::remove_file(src).map_err(|e| Error::io(src, e))
        }
        Err(e) => Err(Error::io(src, e)),
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Merges the complete `--part i/N` runs of `split` found in `inputs` into `out`.
pub fn merge(out: &Path, split: &str, inputs: &[PathBuf], progress: bool) -> Result<Summary> {
    let started = Instant::now();
    if inputs.is_empty() {
        return Err(Error::Config(
            "merge needs at least one directory holding part outputs".into(),
        ));
    }
    let final_manifest = out.join(format::manifest_name(split));
    if final_manifest.exists() {
        let leftovers = find_parts(split, inputs).map(|v| v.len()).unwrap_or(0);
        let mut message = format!(
            "a complete `{split}` dataset already exists here; nothing to merge (remove it, \
             or choose another --out, to merge again)"
        );
        if leftovers > 0 {
            message.push_str(&format!(
                "; {leftovers} part manifest(s) of `{split}` remain in the inputs, probably from \
                 an interrupted clean-up after the merge finished: check the dataset (`verify`) \
                 and delete them"
            ));
        }
        return Err(Error::Resume {
            path: final_manifest,
            message,
        });
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let parts = check_parts(split, inputs, find_parts(split, inputs)?)?;
    let n = parts[0].count;

    // Check everything before touching anything.
    let mut steps: Vec<(PathBuf, PathBuf, Step)> = Vec::new();
    let mut shardlist: Vec<ShardEntry> = Vec::new();
    let mut offsets: Vec<u32> = Vec::with_capacity(parts.len());
    for p in &parts {
        for f in [p.index_path(), p.rejected_path()] {
            if !f.is_file() {
                return Err(Error::input(
                    &f,
                    format!(
                        "missing, although part {}/{n}'s manifest exists; re-run that part \
                         (delete its manifest first)",
                        p.index
                    ),
                ));
            }
        }
        check_part_lists(p, n)?;
        offsets.push(shardlist.len() as u32);
        for entry in &p.manifest.shardlist {
            let global = shardlist.len();
            let src = p.dir.join(&entry.url);
            let url = format::shard_name(split, global);
            let dst = out.join(&url);
            let step = if src.is_file() {
                Step::Move
            } else {
                let moved = std::fs::metadata(&dst)
                    .map(|m| m.is_file() && m.len() == entry.filesize)
                    .unwrap_or(false);
                if !moved {
                    return Err(Error::input(
                        &src,
                        format!(
                            "shard of part {}/{n} is missing, and {} is not it (size differs \
                             or absent); the part must be re-run",
                            p.index,
                            dst.display()
                        ),
                    ));
                }
                Step::AlreadyMoved
            };
            steps.push((src, dst, step));
            shardlist.push(ShardEntry {
                url,
                nsamples: entry.nsamples,
                filesize: entry.filesize,
                md5sum: entry.md5sum.clone(),
            });
        }
    }

    // 1. Shards.
    let pb = if progress {
        let pb = ProgressBar::new(steps.len() as u64).with_style(
            ProgressStyle::with_template("{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len}")
                .expect("template"),
        );
        pb.set_prefix("merging");
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut resumed = 0u64;
    for (src, dst, step) in &steps {
        match step {
            Step::Move => move_file(src, dst)?,
            Step::AlreadyMoved => resumed += 1,
        }
        pb.inc(1);
    }
    pb.finish_and_clear();

    // 2. Index and rejected list.
    let index_path = out.join(format::index_name(split));
    let mut index = IndexWriter::create(&index_path)?;
    let mut samples = 0u64;
    let mut image_bytes = 0u64;
    // (Each part's rows and shard numbers were checked against its manifest before
    // step 1: `check_part_lists`.)
    for (p, &offset) in parts.iter().zip(&offsets) {
        crate::format::index::for_each_batch(&p.index_path(), |mut rows| {
            for r in rows.iter_mut() {
                r.shard += offset;
                image_bytes += r.image_bytes;
            }
            samples += rows.len() as u64;
            index.write(&rows)
        })?;
    }
    index.finish()?;

    let rejected_path = out.join(format::rejected_name(split));
    let (by_reason, repeats) = concat_rejects(&parts, &rejected_path)?;
    let rejected: u64 = by_reason.values().sum();

    // 3. Manifest.
    let first = &parts[0].manifest.conmim;
    let mut warnings = Vec::new();
    if repeats > 0 {
        warnings.push(format!(
            "{repeats} rejected-list records repeated across parts (inputs every part rejects \
             while enumerating) were kept once"
        ));
    }
    for p in &parts[1..] {
        let c = &p.manifest.conmim;
        if c.classes != first.classes || c.wnids != first.wnids || c.categories != first.categories
        {
            warnings.push(format!(
                "part {}/{n} has other classes or categories than part 0; the manifest keeps \
                 part 0's",
                p.index
            ));
        }
    }
    let mut params = common_params(&first.params);
    if let Some(o) = params.as_object_mut() {
        o.insert("parts".into(), serde_json::Value::from(n));
    }
    let total_bytes: u64 = shardlist.iter().map(|s| s.filesize).sum();
    let shards = shardlist.len() as u64;
    let info = DatasetInfo {
        schema_version: SCHEMA_VERSION,
        tool: tool_name(),
        dataset: "merge".into(),
        split: split.to_owned(),
        num_samples: samples,
        num_rejected: rejected,
        num_inputs: samples + rejected,
        num_shards: shards,
        total_bytes,
        rejected_by_reason: by_reason.clone(),
        classes: first.classes.clone(),
        wnids: first.wnids.clone(),
        categories: first.categories.clone(),
        params,
    };
    let manifest = Manifest::new(split, shardlist, info);
    format::atomic_write_json(&final_manifest, &manifest)?;

    // 4. Clean up the parts (manifests last).
    for p in &parts {
        remove_if_exists(&p.index_path())?;
        remove_if_exists(&p.rejected_path())?;
    }
    for p in &parts {
        remove_if_exists(&p.manifest_path)?;
    }

    Ok(Summary {
        out: out.to_owned(),
        name: split.to_owned(),
        inputs: samples + rejected,
        samples,
        rejected,
        rejected_by_reason: by_reason,
        shards,
        resumed_shards: resumed,
        bytes: total_bytes,
        image_bytes,
        elapsed: started.elapsed(),
        warnings,
    })
}

/// Checks part `p`'s index (its rows and the shards they name) and rejected list
/// against its manifest, before the merge moves anything: a part that fails here still
/// holds its shards and can be re-run.
fn check_part_lists(p: &PartRun, n: u32) -> Result<()> {
    let nshards = p.manifest.shardlist.len() as u32;
    let path = p.index_path();
    let mut rows = 0u64;
    crate::format::index::for_each_batch(&path, |batch| {
        if let Some(r) = batch.iter().find(|r| r.shard >= nshards) {
            return Err(Error::Index {
                path: path.clone(),
                message: format!(
                    "row `{}` names shard {} but part {}/{n} has {nshards}; re-run the part",
                    r.key, r.shard, p.index
                ),
            });
        }
        rows += batch.len() as u64;
        Ok(())
    })?;
    if rows != p.manifest.conmim.num_samples {
        return Err(Error::Index {
            path,
            message: format!(
                "{rows} rows but part {}/{n}'s manifest says {} samples; re-run the part",
                p.index, p.manifest.conmim.num_samples
            ),
        });
    }
    let rejected = p.rejected_path();
    let count = crate::format::reject::read_rejects(&rejected)?.len() as u64;
    if count != p.manifest.conmim.num_rejected {
        return Err(Error::input(
            &rejected,
            format!(
                "{count} rejects but part {}/{n}'s manifest says {}; re-run the part",
                p.index, p.manifest.conmim.num_rejected
            ),
        ));
    }
    Ok(())
}

/// Concatenates the parts' rejected lists into `dst` (atomically), line by line;
/// returns the counts by reason and how many cross-part repeats were dropped.
///
/// Every part enumerates the whole input, but lists only the enumeration rejects (bad
/// list rows, unsafe paths, ...) whose source hashes to it, and rejects found while
/// loading carry keys, which the parts partition: no record should repeat across
/// parts. Should one repeat (parts of an older conmim-shard, which listed every
/// enumeration reject in every part), the later copies are dropped and counted.
fn concat_rejects(parts: &[PartRun], dst: &Path) -> Result<(BTreeMap<String, u64>, u64)> {
    let tmp = format::tmp_path(dst);
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    let mut earlier: HashSet<u128> = HashSet::new();
    let mut repeats = 0u64;
    for p in parts {
        let path = p.rejected_path();
        let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut here: Vec<u128> = Vec::new();
        for line in BufReader::new(f).lines() {
            let line = line.map_err(|e| Error::io(&path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let r: Reject = serde_json::from_str(&line).map_err(|e| Error::Json {
                path: path.clone(),
                source: e,
            })?;
            let h = xxh3_128(line.as_bytes());
            if earlier.contains(&h) {
                repeats += 1;
                continue;
            }
            here.push(h);
            *by_reason.entry(r.reason).or_default() += 1;
            w.write_all(line.as_bytes())
                .and_then(|_| w.write_all(b"\n"))
                .map_err(|e| Error::io(&tmp, e))?;
        }
        earlier.extend(here);
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))?;
    Ok((by_reason, repeats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_manifest_names_parse() {
        assert_eq!(
            parse_part_manifest("train", "train-part002of008.manifest.json"),
            Some((2, 8))
        );
        assert_eq!(
            parse_part_manifest("train", "train-part1000of1200.manifest.json"),
            Some((1000, 1200))
        );
        assert_eq!(parse_part_manifest("train", "train.manifest.json"), None);
        assert_eq!(
            parse_part_manifest("train", "val-part000of002.manifest.json"),
            None
        );
        assert_eq!(
            parse_part_manifest("train", "train-partxof2.manifest.json"),
            None
        );
        assert_eq!(
            parse_part_manifest("train", "train-part000of002.index.parquet"),
            None
        );
    }

    #[test]
    fn param_diff_names_nested_keys() {
        let a = serde_json::json!({"seed": 1, "source": {"list": "a", "root": "r"}});
        let b = serde_json::json!({"seed": 2, "source": {"list": "b", "root": "r"}});
        let mut d = Vec::new();
        param_diff(&a, &b, "", &mut d);
        assert_eq!(d.len(), 2);
        assert!(d[0].starts_with("seed"), "{d:?}");
        assert!(d[1].starts_with("source.list"), "{d:?}");
    }
}
