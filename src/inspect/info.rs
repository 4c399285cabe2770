//! `conmim-shard info`: what a dataset holds, from its manifest and index alone (no
//! shard is read).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::human_bytes;
use crate::error::Result;
use crate::format::index::{IndexRow, for_each_batch};
use crate::format::manifest::Manifest;
use crate::format::{self, read_json};

/// Classes listed in the human report's largest / smallest tables.
const SHOWN_CLASSES: usize = 10;

/// A distribution: extremes, percentiles (nearest rank) and mean.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dist {
    pub min: f64,
    pub p1: f64,
    pub p5: f64,
    pub p25: f64,
    pub p50: f64,
    pub p75: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Dist {
    /// The distribution of `values` (`None` when empty). NaNs are ignored.
    pub fn of(mut values: Vec<f64>) -> Option<Dist> {
        values.retain(|v| !v.is_nan());
        values.sort_by(f64::total_cmp);
        let sum = values.iter().sum::<f64>();
        Self::ranked(values.len() as u64, sum, |rank| values[rank as usize - 1])
    }

    /// The distribution of whole numbers, exactly (the sum does not round).
    pub fn of_ints(mut values: Vec<u64>) -> Option<Dist> {
        values.sort_unstable();
        let sum = values.iter().map(|&v| v as u128).sum::<u128>();
        Self::ranked(values.len() as u64, sum as f64, |rank| {
            values[rank as usize - 1] as f64
        })
    }

    /// The distribution of values given as `(value, how many times)`, in any order: the
    /// same as [`Dist::of`] on the repeated values, in memory for the distinct ones
    /// only. NaNs are ignored.
    pub fn of_counts(mut counts: Vec<(f64, u64)>) -> Option<Dist> {
        counts.retain(|(v, c)| !v.is_nan() && *c > 0);
        counts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut upto = Vec::with_capacity(counts.len()); // values up to and including i
        let (mut n, mut sum) = (0u64, 0.0);
        for &(v, c) in &counts {
            n += c;
            sum += v * c as f64;
            upto.push(n);
        }
        Self::ranked(n, sum, |rank| counts[upto.partition_point(|&u| u < rank)].0)
    }

    /// Percentiles by nearest rank from the `rank`th smallest value (1-based) of `n`.
    fn ranked(n: u64, sum: f64, at: impl Fn(u64) -> f64) -> Option<Dist> {
        if n == 0 {
            return None;
        }
        let pct = |p: f64| at((((p / 100.0) * n as f64).ceil() as u64).clamp(1, n));
        Some(Dist {
            min: at(1),
            p1: pct(1.0),
            p5: pct(5.0),
            p25: pct(25.0),
            p50: pct(50.0),
            p75: pct(75.0),
            p95: pct(95.0),
            p99: pct(99.0),
            max: at(n),
            mean: sum / n as f64,
        })
    }

    fn cells(&self) -> [f64; 10] {
        [
            self.min, self.p1, self.p5, self.p25, self.p50, self.p75, self.p95, self.p99, self.max,
            self.mean,
        ]
    }
}

/// Samples of one class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClassCount {
    /// Class index.
    pub label: i64,
    /// Name from the manifest's class table, where there is one.
    pub name: Option<String>,
    /// Samples.
    pub count: u64,
}

impl fmt::Display for ClassCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n} ({}): {}", self.label, self.count),
            None => write!(f, "{}: {}", self.label, self.count),
        }
    }
}

/// The class histogram.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassSummary {
    /// Classes in the manifest's class table (0 when it has none).
    pub table_classes: u64,
    /// Distinct labels with at least one sample.
    pub classes_with_samples: u64,
    /// Table classes without samples.
    pub empty_classes: u64,
    /// Samples with a label.
    pub labelled: u64,
    /// Samples without one.
    pub unlabelled: u64,
    /// Labels seen in the index that the class table does not list.
    pub unknown_labels: Vec<i64>,
    /// Samples per class, over the table's classes (empty ones count 0) plus any
    /// unknown label; over the labels seen when there is no table.
    pub per_class: Option<Dist>,
    /// The largest classes (count descending, then label).
    pub largest: Vec<ClassCount>,
    /// The smallest classes (count ascending, then label).
    pub smallest: Vec<ClassCount>,
    /// Every class, by label.
    pub histogram: Vec<ClassCount>,
}

/// COCO annotation counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CocoSummary {
    /// Images with at least one annotation.
    pub with_annotations: u64,
    /// Images without any.
    pub without_annotations: u64,
    /// Annotations over all images.
    pub annotations: u64,
}

/// What `info` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetSummary {
    /// Dataset directory.
    pub dataset: PathBuf,
    /// Split.
    pub split: String,
    /// Builder that made it (`imagenet`, `index`, ...).
    pub kind: String,
    /// Tool and version that wrote it.
    pub tool: String,
    /// Format version.
    pub schema_version: u32,
    /// Index rows.
    pub samples: u64,
    /// Samples the shards hold according to the manifest (differs from `samples` when
    /// indexed existing shards hold rejected samples).
    pub shard_samples: u64,
    /// Shards.
    pub shards: u64,
    /// Total shard bytes.
    pub total_bytes: u64,
    /// Total image bytes.
    pub image_bytes: u64,
    /// Inputs rejected.
    pub rejected: u64,
    /// Rejects by reason.
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Samples per image format.
    pub formats: BTreeMap<String, u64>,
    /// Class histogram, when any sample has a label or the manifest a class table.
    pub classes: Option<ClassSummary>,
    /// Image width.
    pub width: Option<Dist>,
    /// Image height.
    pub height: Option<Dist>,
    /// Pixels per image.
    pub pixels: Option<Dist>,
    /// Image member size in bytes.
    pub image_bytes_dist: Option<Dist>,
    /// Width / height.
    pub aspect: Option<Dist>,
    /// Images re-encoded with `--max-side`.
    pub reencoded: u64,
    /// Samples with a caption.
    pub captions: u64,
    /// Samples with a segmentation target.
    pub targets: u64,
    /// COCO annotation counts, for datasets that record them.
    pub coco: Option<CocoSummary>,
}

/// Summarises dataset `split` in `dir` from its manifest and index. The index is
/// streamed: what stays in memory is 8 bytes per sample (the image sizes, for exact
/// percentiles) plus a count per distinct image size, class and format.
pub fn info(dir: &Path, split: &str) -> Result<DatasetSummary> {
    let manifest: Manifest = read_json(&dir.join(format::manifest_name(split)))?;
    let mut tally = Tally::default();
    for_each_batch(&dir.join(format::index_name(split)), |rows| {
        rows.iter().for_each(|r| tally.add(r));
        Ok(())
    })?;
    Ok(tally.finish(dir, split, &manifest))
}

/// [`info`] on already loaded parts.
pub fn summarize(dir: &Path, split: &str, m: &Manifest, rows: &[IndexRow]) -> DatasetSummary {
    let mut tally = Tally::default();
    rows.iter().for_each(|r| tally.add(r));
    tally.finish(dir, split, m)
}

/// What [`info`] keeps of the index rows seen so far.
#[derive(Default)]
struct Tally {
    samples: u64,
    formats: BTreeMap<String, u64>,
    reencoded: u64,
    captions: u64,
    targets: u64,
    /// Annotation counts, once any row has them.
    coco: Option<CocoSummary>,
    /// Samples per (width, height).
    dims: HashMap<(u32, u32), u64>,
    image_bytes: Vec<u64>,
    /// Samples per label.
    labels: BTreeMap<i64, u64>,
}

impl Tally {
    fn add(&mut self, r: &IndexRow) {
        self.samples += 1;
        match self.formats.get_mut(&r.format) {
            Some(n) => *n += 1,
            None => {
                self.formats.insert(r.format.clone(), 1);
            }
        }
        self.reencoded += r.reencoded as u64;
        self.captions += r.caption.is_some() as u64;
        self.targets += r.target.is_some() as u64;
        if r.has_annotations.is_some() || r.num_annotations.is_some() {
            let coco = self.coco.get_or_insert(CocoSummary {
                with_annotations: 0,
                without_annotations: 0,
                annotations: 0,
            });
            match r.has_annotations {
                Some(true) => coco.with_annotations += 1,
                Some(false) => coco.without_annotations += 1,
                None => {}
            }
            coco.annotations += r.num_annotations.unwrap_or(0) as u64;
        }
        *self.dims.entry((r.width, r.height)).or_insert(0) += 1;
        self.image_bytes.push(r.image_bytes);
        if let Some(l) = r.label {
            *self.labels.entry(l).or_insert(0) += 1;
        }
    }

    fn finish(self, dir: &Path, split: &str, m: &Manifest) -> DatasetSummary {
        let c = &m.conmim;
        let dist = |f: &dyn Fn(u32, u32) -> Option<f64>| {
            Dist::of_counts(
                self.dims
                    .iter()
                    .filter_map(|(&(w, h), &n)| Some((f(w, h)?, n)))
                    .collect(),
            )
        };
        DatasetSummary {
            dataset: dir.to_owned(),
            split: split.to_owned(),
            kind: c.dataset.clone(),
            tool: c.tool.clone(),
            schema_version: c.schema_version,
            samples: self.samples,
            shard_samples: m.shardlist.iter().map(|s| s.nsamples).sum(),
            shards: m.shardlist.len() as u64,
            total_bytes: m.shardlist.iter().map(|s| s.filesize).sum(),
            image_bytes: self.image_bytes.iter().sum(),
            rejected: c.num_rejected,
            rejected_by_reason: c.rejected_by_reason.clone(),
            classes: class_summary(m, self.labels, self.samples),
            width: dist(&|w, _| Some(w as f64)),
            height: dist(&|_, h| Some(h as f64)),
            pixels: dist(&|w, h| Some(w as f64 * h as f64)),
            aspect: dist(&|w, h| (h > 0).then(|| w as f64 / h as f64)),
            image_bytes_dist: Dist::of_ints(self.image_bytes),
            formats: self.formats,
            reencoded: self.reencoded,
            captions: self.captions,
            targets: self.targets,
            coco: self.coco,
        }
    }
}

/// The class histogram from the samples per label.
fn class_summary(m: &Manifest, labels: BTreeMap<i64, u64>, samples: u64) -> Option<ClassSummary> {
    let table: BTreeMap<i64, String> = m
        .conmim
        .classes
        .iter()
        .flatten()
        .map(|c| (c.index, c.name.clone()))
        .collect();
    let labelled = labels.values().sum::<u64>();
    let mut counts: BTreeMap<i64, u64> = table.keys().map(|&k| (k, 0)).collect();
    counts.extend(labels);
    if counts.is_empty() {
        return None;
    }
    let histogram: Vec<ClassCount> = counts
        .iter()
        .map(|(&label, &count)| ClassCount {
            label,
            name: table.get(&label).cloned(),
            count,
        })
        .collect();
    let mut by_count = histogram.clone();
    by_count.sort_by(|a, b| b.count.cmp(&a.count).then(a.label.cmp(&b.label)));
    let largest = by_count.iter().take(SHOWN_CLASSES).cloned().collect();
    by_count.sort_by(|a, b| a.count.cmp(&b.count).then(a.label.cmp(&b.label)));
    let smallest = by_count.iter().take(SHOWN_CLASSES).cloned().collect();
    Some(ClassSummary {
        table_classes: table.len() as u64,
        classes_with_samples: counts.values().filter(|&&c| c > 0).count() as u64,
        empty_classes: counts.values().filter(|&&c| c == 0).count() as u64,
        labelled,
        unlabelled: samples - labelled,
        unknown_labels: if table.is_empty() {
            Vec::new()
        } else {
            counts
                .keys()
                .filter(|k| !table.contains_key(k))
                .copied()
                .collect()
        },
        per_class: Dist::of(counts.values().map(|&c| c as f64).collect()),
        largest,
        smallest,
        histogram,
    })
}

/// A number for a table cell: integers without decimals.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() < 0.01 {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

fn counts_line(map: &BTreeMap<String, u64>) -> String {
    let mut v: Vec<(&String, &u64)> = map.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for DatasetSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dataset     {} ({}): {}, written by {}, schema {}",
            self.dataset.display(),
            self.split,
            self.kind,
            self.tool,
            self.schema_version
        )?;
        write!(
            f,
            "samples     {} in {} shards, {} ({} of images",
            self.samples,
            self.shards,
            human_bytes(self.total_bytes),
            human_bytes(self.image_bytes)
        )?;
        if let Some(per) = self.image_bytes.checked_div(self.samples) {
            write!(f, ", {} per image", human_bytes(per))?;
        }
        writeln!(f, ")")?;
        if self.shard_samples != self.samples {
            writeln!(
                f,
                "in shards   {} samples (the shards also hold rejected ones)",
                self.shard_samples
            )?;
        }
        write!(f, "rejected    {}", self.rejected)?;
        if !self.rejected_by_reason.is_empty() {
            write!(f, " ({})", counts_line(&self.rejected_by_reason))?;
        }
        writeln!(f)?;
        writeln!(f, "formats     {}", counts_line(&self.formats))?;
        writeln!(
            f,
            "reencoded   {}   captions {}   targets {}",
            self.reencoded, self.captions, self.targets
        )?;
        if let Some(c) = &self.coco {
            writeln!(
                f,
                "coco        {} with annotations, {} without, {} annotations",
                c.with_annotations, c.without_annotations, c.annotations
            )?;
        }
        if let Some(c) = &self.classes {
            write!(
                f,
                "classes     {} with samples, {} in the class table, {} empty; {} labelled, {} unlabelled",
                c.classes_with_samples, c.table_classes, c.empty_classes, c.labelled, c.unlabelled
            )?;
            if let Some(d) = &c.per_class {
                write!(
                    f,
                    "\n  per class min {} / median {} / max {} (mean {})",
                    num(d.min),
                    num(d.p50),
                    num(d.max),
                    num(d.mean)
                )?;
            }
            if !c.unknown_labels.is_empty() {
                let shown: Vec<String> = c
                    .unknown_labels
                    .iter()
                    .take(SHOWN_CLASSES)
                    .map(|l| l.to_string())
                    .collect();
                write!(f, "\n  labels not in the class table: {}", shown.join(" "))?;
            }
            let list = |v: &[ClassCount]| {
                v.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            write!(f, "\n  largest   {}", list(&c.largest))?;
            writeln!(f, "\n  smallest  {}", list(&c.smallest))?;
        }
        let rows = [
            ("width", &self.width),
            ("height", &self.height),
            ("pixels", &self.pixels),
            ("bytes", &self.image_bytes_dist),
            ("aspect", &self.aspect),
        ];
        write!(f, "{:<8}", "")?;
        for h in [
            "min", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "max", "mean",
        ] {
            write!(f, " {h:>10}")?;
        }
        for (name, d) in rows {
            write!(f, "\n{name:<8}")?;
            match d {
                Some(d) => {
                    for v in d.cells() {
                        write!(f, " {:>10}", num(v))?;
                    }
                }
                None => write!(f, " {:>10}", "-")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let d = Dist::of((1..=100).map(|v| v as f64).collect()).unwrap();
        assert_eq!(
            (d.min, d.p1, d.p5, d.p50, d.p99, d.max),
            (1.0, 1.0, 5.0, 50.0, 99.0, 100.0)
        );
        assert_eq!(d.mean, 50.5);
        let one = Dist::of(vec![7.0]).unwrap();
        assert_eq!((one.min, one.p50, one.max), (7.0, 7.0, 7.0));
        assert!(Dist::of(Vec::new()).is_none());
    }

    /// `info` keeps counts per distinct value (and the image sizes as integers) instead
    /// of every row's values; the distributions must not change.
    #[test]
    fn counted_and_integer_distributions_equal_the_plain_one() {
        let values: Vec<u64> = (0..1000u64)
            .map(|i| (i * 7919) % 13 * 100 + i % 3)
            .collect();
        let plain = Dist::of(values.iter().map(|&v| v as f64).collect()).unwrap();
        assert_eq!(Dist::of_ints(values.clone()).unwrap(), plain);
        let mut counts: HashMap<u64, u64> = HashMap::new();
        for &v in &values {
            *counts.entry(v).or_default() += 1;
        }
        let counted = Dist::of_counts(counts.into_iter().map(|(v, n)| (v as f64, n)).collect());
        assert_eq!(counted.unwrap(), plain);
        assert_eq!(
            Dist::of_counts(vec![(2.0, 1), (f64::NAN, 4), (1.0, 3), (9.0, 0)]).unwrap(),
            Dist::of(vec![1.0, 1.0, 1.0, 2.0]).unwrap()
        );
        assert!(Dist::of_counts(Vec::new()).is_none());
        assert!(Dist::of_ints(Vec::new()).is_none());
    }

    #[test]
    fn numbers_for_tables() {
        assert_eq!(num(64.0), "64");
        assert_eq!(num(1.3333333), "1.333");
        assert_eq!(num(1234.56), "1234.6");
        assert_eq!(num(0.000333), "3.33e-4");
    }
}
