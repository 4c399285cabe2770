//! The planner: one global, seeded sample order with bounded memory.
//!
//! Enumeration streams items into `B` bucket files chosen by a seeded hash of the key
//! (so duplicates always meet in the same bucket). Replaying the buckets in order, each
//! shuffled with its own seeded generator, gives a uniformly random permutation of the
//! whole input (random assignment + per-bucket shuffle) while holding only one bucket
//! in memory. Every item, duplicates included, gets one position in this order; the
//! writer turns each position into exactly one sample or one reject.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::source::{Entry, Item, Source};
use crate::error::{Error, Result};
use crate::format::reject::Reject;
use crate::seed::{SplitMix64, hash_str};

/// Items per bucket the planner aims for.
pub const ITEMS_PER_BUCKET: u64 = 100_000;
/// Upper bound on buckets (open files while planning).
pub const MAX_BUCKETS: u64 = 512;
const PART_SALT: u64 = 0x5041_5254; // "PART"

/// A slice of the input for multi-machine runs: part `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// 0-based part number.
    pub index: u32,
    /// Number of parts.
    pub count: u32,
}

impl Part {
    /// Whether `key` belongs to this part (seeded hash, so parts are random subsets).
    pub fn contains(&self, seed: u64, key: &str) -> bool {
        hash_str(seed ^ PART_SALT, key) % self.count as u64 == self.index as u64
    }
}

impl std::str::FromStr for Part {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: expected i/N, e.g. 0/4"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: bad part index"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: bad part count"))?;
        if count == 0 || index >= count {
            return Err(format!("`{s}`: need 0 <= i < N"));
        }
        Ok(Part { index, count })
    }
}

/// What planning produced; stored as `plan.json` in the work directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanInfo {
    /// Items planned (each gets one position).
    pub items: u64,
    /// Bucket files.
    pub buckets: u64,
    /// Inputs rejected during enumeration.
    pub enum_rejects: u64,
    /// Items outside this part (not counted anywhere else).
    pub other_parts: u64,
}

fn bucket_path(work: &Path, b: u64) -> PathBuf {
    work.join(format!("bucket-{b:05}.jsonl"))
}

/// Path of the enumeration rejects inside a work directory.
pub fn enum_rejects_path(work: &Path) -> PathBuf {
    work.join("enumerate.rejected.jsonl")
}

/// Enumerates `source` into bucket files under `work`. `on_item` is called per
/// enumerated input (for progress).
pub fn build(
    source: &dyn Source,
    seed: u64,
    part: Option<Part>,
    work: &Path,
    mut on_item: impl FnMut(u64),
) -> Result<PlanInfo> {
    let hint = source.size_hint()?;
    let buckets = hint.div_ceil(ITEMS_PER_BUCKET).clamp(1, MAX_BUCKETS);
    let mut writers = Vec::with_capacity(buckets as usize);
    for b in 0..buckets {
        let p = bucket_path(work, b);
        let f = File::create(&p).map_err(|e| Error::io(&p, e))?;
        writers.push(BufWriter::with_capacity(64 << 10, f));
    }
    let rej_path = enum_rejects_path(work);
    let mut rejects: Vec<Reject> = Vec::new();
    let mut info = PlanInfo {
        items: 0,
        buckets,
        enum_rejects: 0,
        other_parts: 0,
    };
    let mut seen = 0u64;
    source.enumerate(&mut |entry| {
        seen += 1;
        on_item(seen);
        match entry {
            Entry::Reject(r) => {
                // Each part reports the enumeration rejects that hash to it, so merged
                // parts list every reject exactly once.
                if let Some(p) = part
                    && !p.contains(seed, &r.source)
                {
                    info.other_parts += 1;
                    return Ok(());
                }
                rejects.push(r);
                info.enum_rejects += 1;
            }
            Entry::Item(item) => {
                if let Some(p) = part
                    && !p.contains(seed, &item.key)
                {
                    info.other_parts += 1;
                    return Ok(());
                }
                let b = hash_str(seed, &item.key) % buckets;
                let w = &mut writers[b as usize];
                let p = bucket_path(work, b);
                serde_json::to_writer(&mut *w, &item).map_err(|e| Error::Json {
                    path: p.clone(),
                    source: e,
                })?;
                w.write_all(b"\n").map_err(|e| Error::io(&p, e))?;
                info.items += 1;
            }
        }
        Ok(())
    })?;
    for (b, mut w) in writers.into_iter().enumerate() {
        let p = bucket_path(work, b as u64);
        w.flush().map_err(|e| Error::io(&p, e))?;
        w.into_inner()
            .map_err(|e| Error::io(&p, e.into_error()))?
            .sync_all()
            .map_err(|e| Error::io(&p, e))?;
    }
    crate::format::reject::write_rejects(&rej_path, &rejects)?;
    Ok(info)
}

/// Bucket `b`'s items in enumeration order.
fn read_bucket(work: &Path, b: u64) -> Result<Vec<Item>> {
    let p = bucket_path(work, b);
    let f = File::open(&p).map_err(|e| Error::io(&p, e))?;
    let mut items = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| Error::io(&p, e))?;
        let item: Item = serde_json::from_str(&line).map_err(|e| Error::Json {
            path: p.clone(),
            source: e,
        })?;
        items.push(item);
    }
    Ok(items)
}

/// Where bucket `b`'s duplicate decisions are kept once made (see `finish_bucket`).
fn decisions_path(work: &Path, b: u64) -> PathBuf {
    work.join(format!("bucket-{b:05}.duplicates.json"))
}

/// One duplicate decision: the item at `index` (enumeration order within its bucket)
/// is `duplicate_of` `winner`, with `if_loads` as `Item::duplicate_if_loads`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Decision {
    index: usize,
    winner: String,
    if_loads: bool,
}

/// Marks duplicates among `items` (bucket `b`, in enumeration order; every input of a
/// key hashes to the same bucket), then puts them in their final order. Of the inputs
/// that share a key, the first that `loads` (the source would store it) keeps the key
/// and the later ones are `duplicate_of` it; those before it report their own
/// failure when written (`duplicate_if_loads`: or `duplicate_key`, should one load
/// then after all), and so do all of them when none loads. So an input that is rejected
/// anyway (a missing or truncated file) never takes the key from a good one. Only
/// keys with several inputs are tried, so `loads` runs for the rare duplicates alone.
///
/// `loads` can change between runs (a transient read failure), so the decisions are
/// written to the work directory before any item of the bucket is handed out, and a
/// resumed run reuses them: a key that was stored before the interruption is never
/// given to another input after it.
fn finish_bucket(
    mut items: Vec<Item>,
    seed: u64,
    b: u64,
    work: &Path,
    loads: &dyn Fn(&Item) -> bool,
) -> Result<Vec<Item>> {
    let path = decisions_path(work, b);
    let decisions: Vec<Decision> = if path.exists() {
        crate::format::read_json(&path)?
    } else {
        let decisions = decide_duplicates(&items, loads);
        if !decisions.is_empty() {
            crate::format::atomic_write_json(&path, &decisions)?;
        }
        decisions
    };
    let n = items.len();
    for d in decisions {
        let item = items.get_mut(d.index).ok_or_else(|| Error::Json {
            path: path.clone(),
            source: serde::de::Error::custom(format!(
                "duplicate decision for item {} of a bucket of {}: the work directory \
                 does not belong to this plan; delete it to start over",
                d.index, n
            )),
        })?;
        item.duplicate_of = Some(d.winner);
        item.duplicate_if_loads = d.if_loads;
    }
    SplitMix64::new(seed, b).shuffle(&mut items);
    Ok(items)
}

/// The duplicate decisions for one bucket's `items` (see `finish_bucket`).
fn decide_duplicates(items: &[Item], loads: &dyn Fn(&Item) -> bool) -> Vec<Decision> {
    let mut by_key: HashMap<&str, Vec<usize>> = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        by_key.entry(item.key.as_str()).or_default().push(i);
    }
    // Groups in enumeration order of their first input (HashMap order must not leak).
    let mut groups: Vec<Vec<usize>> = by_key.into_values().filter(|g| g.len() > 1).collect();
    groups.sort_unstable_by_key(|g| g[0]);
    let mut decisions = Vec::new();
    for g in groups {
        // None loads: each reports why it cannot be stored.
        if let Some(w) = g.iter().position(|&i| loads(&items[i])) {
            let winner = &items[g[w]].source;
            // Those before it failed the trial; should one load when written (a
            // transient failure), it must not take the key a second time.
            for (k, &index) in g.iter().enumerate().filter(|&(k, _)| k != w) {
                decisions.push(Decision {
                    index,
                    winner: winner.clone(),
                    if_loads: k < w,
                });
            }
        }
    }
    decisions
}

/// Replays the plan from global position `start`: `(position, item)` in order.
pub fn replay<'a>(
    work: PathBuf,
    seed: u64,
    info: &PlanInfo,
    start: u64,
    loads: &'a dyn Fn(&Item) -> bool,
) -> impl Iterator<Item = Result<(u64, Item)>> + 'a {
    let buckets = info.buckets;
    let mut b = 0u64;
    let mut pos = 0u64;
    let mut current: std::vec::IntoIter<Item> = Vec::new().into_iter();
    std::iter::from_fn(move || {
        loop {
            if let Some(item) = current.next() {
                let p = pos;
                pos += 1;
                if p < start {
                    continue;
                }
                return Some(Ok((p, item)));
            }
            if b >= buckets {
                return None;
            }
            // Skip whole buckets before `start` (without trying their duplicates).
            match read_bucket(&work, b) {
                Ok(items) => {
                    b += 1;
                    if pos + (items.len() as u64) <= start {
                        pos += items.len() as u64;
                        continue;
                    }
                    match finish_bucket(items, seed, b - 1, &work, loads) {
                        Ok(items) => current = items.into_iter(),
                        Err(e) => {
                            b = buckets;
                            return Some(Err(e));
                        }
                    }
                }
                Err(e) => {
                    b = buckets;
                    return Some(Err(e));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_parses_and_partitions() {
        let p: Part = "1/3".parse().unwrap();
        assert_eq!(p, Part { index: 1, count: 3 });
        assert!("3/3".parse::<Part>().is_err());
        assert!("x".parse::<Part>().is_err());
        let parts: Vec<Part> = (0..3).map(|i| Part { index: i, count: 3 }).collect();
        for k in 0..100 {
            let key = format!("k{k}");
            assert_eq!(parts.iter().filter(|p| p.contains(9, &key)).count(), 1);
        }
    }

    /// Of a key's inputs, the first that loads keeps it; the later ones are duplicates
    /// outright, the earlier ones only should they load when written.
    #[test]
    fn the_first_input_that_loads_keeps_a_duplicated_key() {
        let items: Vec<Item> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Item::new(
                    i as u64,
                    if *s == "d" { "other" } else { "k" }.into(),
                    (*s).into(),
                )
            })
            .collect();
        let marks = |loads: &dyn Fn(&Item) -> bool| {
            let work = tempfile::tempdir().unwrap();
            let mut out: Vec<_> = finish_bucket(items.clone(), 1, 0, work.path(), loads)
                .unwrap()
                .into_iter()
                .map(|it| (it.source, it.duplicate_of, it.duplicate_if_loads))
                .collect();
            out.sort();
            out
        };
        let b = Some("b".to_owned());
        assert_eq!(
            marks(&|it| it.source != "a"),
            [
                ("a".into(), b.clone(), true),
                ("b".into(), None, false),
                ("c".into(), b, false),
                ("d".into(), None, false),
            ]
        );
        // None loads: each reports its own failure.
        assert!(marks(&|_| false).iter().all(|(_, d, f)| d.is_none() && !f));
    }

    /// A resumed run keeps the duplicate decisions of the interrupted one even when an
    /// input's load result changed in between (a transient failure), so a key stored
    /// before the interruption is never stored again by another input.
    #[test]
    fn resume_reuses_the_duplicate_decisions() {
        let work = tempfile::tempdir().unwrap();
        let items: Vec<Item> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, s)| Item::new(i as u64, "k".into(), (*s).into()))
            .collect();
        let marks = |out: Vec<Item>| {
            let mut out: Vec<_> = out
                .into_iter()
                .map(|it| (it.source, it.duplicate_of, it.duplicate_if_loads))
                .collect();
            out.sort();
            out
        };
        // First run: "a" fails to load, so "b" keeps the key.
        let first = finish_bucket(items.clone(), 1, 0, work.path(), &|it| it.source != "a");
        let first = marks(first.unwrap());
        assert_eq!(first[1], ("b".into(), None, false));
        // Resumed: "a" loads now; the decision made before stands.
        let again = finish_bucket(items.clone(), 1, 0, work.path(), &|_| true).unwrap();
        assert_eq!(marks(again), first);
        // A fresh work directory decides anew.
        let fresh = tempfile::tempdir().unwrap();
        let anew = finish_bucket(items, 1, 0, fresh.path(), &|_| true).unwrap();
        assert_eq!(marks(anew)[0], ("a".into(), None, false));
    }
}
