//! `conmim-shard`: build, check and describe WebDataset datasets.
//! Thin layer: parse -> validated config -> library call -> summary / exit status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[path = "error_line.rs"]
mod error_line;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use conmim::image::{DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageLimits};
use conmim::shard::source::ade20k::{Ade20k, AdeSplit};
use conmim::shard::source::coco::Coco;
use conmim::shard::source::files::{Files, FilesSpec, ListFormat};
use conmim::shard::source::imagenet::{Imagenet, Split};
use conmim::shard::source::{Reencode, Source, Validation};
use conmim::shard::{self, DEFAULT_MAX_REJECT_FRAC, DEFAULT_SEED, Part, ShardConfig, Summary};

const EXAMPLES: &str = "\
Examples:
  conmim-shard imagenet --root /data/imagenet --split train --out /data/in1k-wds
  conmim-shard imagenet --root /data/imagenet --split val --out /data/in1k-wds
  conmim-shard files --list yfcc15m.tsv --root /data/yfcc --path-template '{id[0:3]}/{id[3:6]}/{id}.jpg' \\
      --out /data/yfcc-wds --max-side 512 --quality 90 --part 0/8
  conmim-shard merge --out /data/yfcc-wds --split train /data/yfcc-wds
  conmim-shard index /data/yfcc-img2dataset
  conmim-shard ade20k --root /data/ADEChallengeData2016 --split train --out /data/ade-wds
  conmim-shard coco --root /data/coco --split train --out /data/coco-wds
  conmim-shard verify /data/in1k-wds --split train --decode
  conmim-shard info /data/in1k-wds --split train
  conmim-shard demo --out /tmp/conmim-demo";

/// Turn image datasets into WebDataset tar shards with a Parquet index and a manifest.
///
/// Every input ends up either in the index or in `{split}.rejected.jsonl` with a reason;
/// outputs are deterministic for a given seed whatever the thread count, and appear
/// atomically, so an interrupted run can be finished with `--resume`.
#[derive(Parser)]
#[command(name = "conmim-shard", version, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// ImageNet-1K: `train/<wnid>/*.JPEG`; val as class folders or flat with labels.
    Imagenet(ImagenetArgs),
    /// A list of images (tsv/csv with a header row, jsonl, parquet) relative to --root.
    Files(FilesArgs),
    /// Combine the outputs of `--part i/N` runs into one dataset. The parts' shards are
    /// moved into --out (copied then deleted across file systems) and their part files
    /// deleted.
    Merge(MergeArgs),
    /// Index existing WebDataset shards (e.g. img2dataset output) without rewriting them.
    Index(IndexArgs),
    /// ADE20K scene parsing (ADEChallengeData2016): image + 150-class label map (seg.png).
    Ade20k(Ade20kArgs),
    /// COCO instances: image + per-image annotation JSON; categories in the manifest.
    Coco(CocoArgs),
    /// Re-read every shard against index and manifest; exit 1 on any mismatch.
    Verify(VerifyArgs),
    /// Counts, class histogram, image size and byte distributions.
    Info(InfoArgs),
    /// Build a small synthetic ImageNet folder, shard it, verify it, print the summary.
    Demo(DemoArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the global sample shuffle.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Finish an interrupted run (complete shards are kept, not rewritten).
    #[arg(long)]
    resume: bool,
    /// Roll shards over before this size (e.g. 1G, 500M, 2GiB; 0 = no limit).
    #[arg(long, default_value = "1G", value_parser = parse_bytes)]
    max_shard_bytes: u64,
    /// Roll shards over at this many samples (0 = no limit).
    #[arg(long, default_value_t = 0)]
    max_shard_count: u64,
    /// Re-encode images whose longer side exceeds N to JPEG (else bytes stay untouched).
    #[arg(long, value_name = "N")]
    max_side: Option<u32>,
    /// JPEG quality for --max-side re-encoding.
    #[arg(long, default_value_t = 90, requires = "max_side")]
    quality: u8,
    /// Follow symlinks that point outside the input root.
    #[arg(long)]
    follow_symlinks: bool,
    /// fsync every shard before publishing it: survives power loss and OS crashes,
    /// not only a killed process (atomic renames already cover that).
    #[arg(long)]
    fsync: bool,
    #[command(flatten)]
    checks: Checks,
}

/// How inputs are checked, and the run's threads and output (shared by every builder).
#[derive(Args, Clone)]
struct Checks {
    /// Fully decode every image (default: header-only validation).
    #[arg(long)]
    decode: bool,
    /// Reject images with a side shorter than this.
    #[arg(long, default_value_t = DEFAULT_MIN_SIDE)]
    min_side: u32,
    /// Reject images with more pixels than this (checked from the header, before decoding).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// Exit non-zero if more than this fraction of inputs is rejected.
    #[arg(long, default_value_t = DEFAULT_MAX_REJECT_FRAC)]
    max_reject_frac: f64,
    /// Worker threads (0 = all cores); never changes the output.
    #[arg(long, default_value_t = 0, value_parser = parse_threads)]
    threads: usize,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

impl Checks {
    fn validation(&self) -> Validation {
        if self.decode {
            Validation::Decode
        } else {
            Validation::Header
        }
    }

    fn limits(&self) -> ImageLimits {
        ImageLimits {
            max_pixels: self.max_pixels,
            min_side: self.min_side,
            ..ImageLimits::default()
        }
    }
}

impl Common {
    fn config(&self, split: &str, part: Option<Part>) -> ShardConfig {
        let mut c = ShardConfig::new(&self.out, split);
        c.seed = self.seed;
        c.threads = self.checks.threads;
        c.resume = self.resume;
        c.max_shard_bytes = self.max_shard_bytes;
        c.max_shard_count = self.max_shard_count;
        c.validation = self.checks.validation();
        c.limits = self.checks.limits();
        c.reencode = self.max_side.map(|max_side| Reencode {
            max_side,
            quality: self.quality,
        });
        c.max_reject_frac = self.checks.max_reject_frac;
        c.part = part;
        c.follow_symlinks = self.follow_symlinks;
        c.fsync = self.fsync;
        c.progress = !self.checks.quiet;
        c
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Train,
    Val,
}

#[derive(Args)]
struct ImagenetArgs {
    /// Folder holding train/ and val/ (e.g. ILSVRC/Data/CLS-LOC).
    #[arg(long)]
    root: PathBuf,
    /// Which split to shard.
    #[arg(long, value_enum)]
    split: SplitArg,
    /// Labels for a flat val folder (LOC_val_solution.csv or `filename label` lines);
    /// found next to val/ when not given.
    #[arg(long)]
    val_labels: Option<PathBuf>,
    /// Fail unless exactly this many class folders exist (1000 for ImageNet-1K).
    #[arg(long)]
    expect_classes: Option<usize>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct FilesArgs {
    /// List file: .tsv/.txt or .csv with a header row, .jsonl/.ndjson, or .parquet.
    #[arg(long)]
    list: PathBuf,
    /// Folder the listed paths are relative to (nothing outside it is read).
    #[arg(long)]
    root: PathBuf,
    /// List format (default: from the extension): tsv, csv, jsonl, parquet.
    #[arg(long)]
    format: Option<ListFormat>,
    /// Output split name.
    #[arg(long, default_value = "train")]
    split: String,
    /// Path column (default: path, filepath, file, image, filename).
    #[arg(long, conflicts_with = "path_template")]
    path_col: Option<String>,
    /// Build paths from columns, e.g. `{id[0:3]}/{id[3:6]}/{id}.jpg` (YFCC15M).
    #[arg(long)]
    path_template: Option<String>,
    /// Id column, the sample key (default: id, key, photoid; else the file stem).
    #[arg(long)]
    id_col: Option<String>,
    /// Integer label column (default: label, class).
    #[arg(long)]
    label_col: Option<String>,
    /// Caption column (default: caption, title, description, text).
    #[arg(long)]
    caption_col: Option<String>,
    /// Only shard part i of N (a seeded random subset); run all parts, then `merge`.
    #[arg(long, value_name = "i/N")]
    part: Option<Part>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct MergeArgs {
    /// Directory for the merged dataset.
    #[arg(long)]
    out: PathBuf,
    /// Split whose parts to merge.
    #[arg(long, default_value = "train")]
    split: String,
    /// Directories holding part outputs (default: --out).
    inputs: Vec<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct IndexArgs {
    /// Directory holding the shards.
    dir: PathBuf,
    /// Split name of the index, rejected list and manifest.
    #[arg(long, default_value = "train")]
    split: String,
    /// Where to write them (default: DIR); must be DIR or a folder above it.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Which shards, relative to DIR, as a brace pattern like '{00000..00127}.tar'
    /// (default: every *.tar, by name).
    #[arg(long, value_name = "PATTERN")]
    shards: Option<String>,
    #[command(flatten)]
    checks: Checks,
}

#[derive(Args)]
struct Ade20kArgs {
    /// The ADEChallengeData2016 folder (holding images/ and annotations/).
    #[arg(long)]
    root: PathBuf,
    /// Which split to shard (training/ or validation/).
    #[arg(long, value_enum)]
    split: SplitArg,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct CocoArgs {
    /// Folder holding the image folders (train2017/, val2017/) and annotations/.
    #[arg(long)]
    root: PathBuf,
    /// Image folder name (train2017, val2017, ...); train/val/test mean the 2017 folders.
    #[arg(long)]
    split: String,
    /// Instances JSON (default: `ROOT/annotations/instances_<folder>.json`).
    #[arg(long)]
    annotations: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct VerifyArgs {
    /// Dataset directory.
    dataset: PathBuf,
    /// Split (needed when the directory holds several).
    #[arg(long)]
    split: Option<String>,
    /// Also decode every image.
    #[arg(long)]
    decode: bool,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0, value_parser = parse_threads)]
    threads: usize,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// Dataset directory.
    dataset: PathBuf,
    /// Split (needed when the directory holds several).
    #[arg(long)]
    split: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Where to put the demo image folder and dataset.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Classes in the synthetic ImageNet.
    #[arg(long, default_value_t = 10, value_parser = parse_positive)]
    classes: usize,
    /// Training images per class.
    #[arg(long, default_value_t = 40, value_parser = parse_positive)]
    per_class: usize,
}

/// A byte size: a number with an optional unit, K/M/G/T (or KB, ...) in powers of
/// 1000, KiB/MiB/GiB/TiB in powers of 1024.
fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let (prefix, base) = match unit.strip_suffix("IB") {
                Some(p) => (p, 1024u64),
                None => (unit.strip_suffix('B').unwrap_or(&unit), 1000u64),
            };
            let power = match prefix {
                "" if base == 1000 => 0,
                "K" => 1,
                "M" => 2,
                "G" => 3,
                "T" => 4,
                _ => {
                    return Err(format!(
                        "`{s}`: unknown unit (use K, M, G, T or KiB, MiB, GiB, TiB)"
                    ));
                }
            };
            (&s[..i], base.pow(power))
        }
        None => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("`{s}`: a size must be 0 or positive"));
    }
    Ok((n * mult as f64) as u64)
}

fn parse_positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{s}`: expected a positive whole number")),
    }
}

/// Most worker threads accepted: each is a decoding worker plus a shard writer, and far
/// more than the machine's cores only adds overhead (10^6 made a run crawl for minutes).
const MAX_THREADS: usize = 1024;

fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a thread count"))?;
    if n > MAX_THREADS {
        return Err(format!(
            "{n} threads: at most {MAX_THREADS} (0 = all cores, usually best)"
        ));
    }
    Ok(n)
}

fn report(summary: &Summary, json: bool, limit: f64) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
    } else {
        println!("{summary}");
    }
    summary.check_rejects(limit)?;
    Ok(())
}

fn shard_with(
    source: &dyn Source,
    common: &Common,
    split: &str,
    part: Option<Part>,
) -> Result<Summary> {
    let cfg = common.config(split, part);
    let summary = shard::run(source, &cfg)?;
    report(&summary, common.checks.json, cfg.max_reject_frac)?;
    Ok(summary)
}

fn split_name(s: SplitArg) -> (&'static str, Split) {
    match s {
        SplitArg::Train => ("train", Split::Train),
        SplitArg::Val => ("val", Split::Val),
    }
}

/// The split to use in `dir`: the given one, or the only manifest there.
fn detect_split(dir: &Path, split: Option<String>) -> Result<String> {
    if let Some(s) = split {
        return Ok(s);
    }
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(s) = name.strip_suffix(".manifest.json") {
            found.push(s.to_owned());
        }
    }
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "{}: no *.manifest.json here; is this a dataset directory?",
            dir.display()
        ),
        _ => bail!(
            "{}: several splits ({}); pass --split",
            dir.display(),
            found.join(", ")
        ),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Imagenet(a) => {
            let (name, split) = split_name(a.split);
            let src = Imagenet::new(
                &a.root,
                split,
                a.val_labels,
                a.expect_classes,
                a.common.follow_symlinks,
            )?;
            shard_with(&src, &a.common, name, None)?;
        }
        Cmd::Files(a) => {
            let spec = FilesSpec {
                list: a.list,
                root: a.root,
                format: a.format,
                path_col: a.path_col,
                path_template: a.path_template,
                id_col: a.id_col,
                label_col: a.label_col,
                caption_col: a.caption_col,
                follow_symlinks: a.common.follow_symlinks,
            };
            let src = Files::new(spec)?;
            shard_with(&src, &a.common, &a.split, a.part)?;
        }
        Cmd::Merge(a) => {
            let inputs = if a.inputs.is_empty() {
                vec![a.out.clone()]
            } else {
                a.inputs
            };
            let s = conmim::shard::merge::merge(&a.out, &a.split, &inputs, !a.quiet)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{s}");
            }
        }
        Cmd::Index(a) => {
            let opts = conmim::shard::existing::IndexOptions {
                split: a.split.clone(),
                pattern: a.shards.clone(),
                validation: a.checks.validation(),
                limits: a.checks.limits(),
                threads: a.checks.threads,
                progress: !a.checks.quiet,
            };
            let out = a.out.clone().unwrap_or_else(|| a.dir.clone());
            let summary = conmim::shard::existing::index_existing(&a.dir, &out, &opts)?;
            report(&summary, a.checks.json, a.checks.max_reject_frac)?;
        }
        Cmd::Ade20k(a) => {
            if a.common.max_side.is_some() {
                bail!(
                    "--max-side is not supported for ade20k: label maps must stay pixel-aligned with the images"
                );
            }
            let (name, split) = match a.split {
                SplitArg::Train => ("train", AdeSplit::Train),
                SplitArg::Val => ("val", AdeSplit::Val),
            };
            let src = Ade20k::new(&a.root, split, a.common.follow_symlinks)?;
            shard_with(&src, &a.common, name, None)?;
        }
        Cmd::Coco(a) => {
            if a.common.max_side.is_some() {
                bail!(
                    "--max-side is not supported for coco: boxes and masks are in original pixel coordinates"
                );
            }
            let src = Coco::new(&a.root, &a.split, a.annotations, a.common.follow_symlinks)?;
            shard_with(&src, &a.common, &a.split, None)?;
        }
        Cmd::Verify(a) => {
            let split = detect_split(&a.dataset, a.split)?;
            let opts = conmim::inspect::verify::VerifyOptions {
                decode: a.decode,
                threads: a.threads,
                progress: !a.quiet,
            };
            let report = conmim::inspect::verify::verify(&a.dataset, &split, &opts)?;
            println!("{report}");
            if !report.ok() {
                bail!("verification failed: {} problem(s)", report.problems.len());
            }
        }
        Cmd::Info(a) => {
            let split = detect_split(&a.dataset, a.split)?;
            let info = conmim::inspect::info::info(&a.dataset, &split)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{info}");
            }
        }
        Cmd::Demo(a) => demo(&a)?,
    }
    Ok(())
}

fn demo(a: &DemoArgs) -> Result<()> {
    let images = a.out.join("imagenet");
    let data = a.out.join("dataset");
    // A folder made by an earlier demo (marked) is replaced; anything else is kept.
    let marker = a.out.join(".conmim-demo");
    if marker.exists() {
        for d in [&images, &data] {
            if d.exists() {
                std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
            }
        }
    } else if images.exists() || data.exists() {
        bail!(
            "{} holds imagenet/ or dataset/ not made by the demo; pass another --out",
            a.out.display()
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    std::fs::write(
        &marker,
        b"made by conmim-shard demo; rerunning the demo replaces this folder\n",
    )?;
    eprintln!(
        "demo: writing a synthetic ImageNet ({} classes) to {}",
        a.classes,
        images.display()
    );
    let spec = conmim::testkit::ImagenetDemo {
        classes: a.classes,
        train_per_class: a.per_class,
        val_per_class: (a.per_class / 4).max(1),
        seed: 0,
        min_side: 64,
        max_side: 320,
    };
    conmim::testkit::write_imagenet_demo(&images, &spec)
        .with_context(|| format!("writing {}", images.display()))?;
    let nasty = conmim::testkit::add_nasty_imagenet_files(&images)
        .with_context(|| format!("adding awkward files to {}", images.display()))?;
    eprintln!(
        "demo: added {} awkward files (CMYK, progressive, PNG named .JPEG, truncated, empty, ...)",
        nasty.len()
    );
    let common = Common::parse_from_defaults(&data);
    for (name, split) in [("train", Split::Train), ("val", Split::Val)] {
        eprintln!("demo: sharding {name}");
        let src = Imagenet::new(&images, split, None, None, false)?;
        let mut c = common.clone();
        c.max_shard_bytes = 2_000_000;
        c.checks.max_reject_frac = 0.5;
        shard_with(&src, &c, name, None)?;
        let opts = conmim::inspect::verify::VerifyOptions {
            decode: true,
            threads: 0,
            progress: false,
        };
        let report = conmim::inspect::verify::verify(&data, name, &opts)?;
        println!("{report}");
        if !report.ok() {
            bail!("demo dataset failed verification");
        }
    }
    println!("\n{}", conmim::inspect::info::info(&data, "train")?);
    println!("\ndemo: done; the dataset is in {}", data.display());
    Ok(())
}

impl Common {
    fn parse_from_defaults(out: &Path) -> Common {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            c: Common,
        }
        Wrap::parse_from(["demo", "--out", &out.display().to_string()]).c
    }
}

/// Restores the default SIGPIPE action (Rust ignores it), so that `conmim-shard info
/// ... | head` ends quietly when `head` closes the pipe, as other Unix tools do, instead
/// of panicking in `println!`. (This binary writes to no socket.)
fn default_sigpipe() {
    #[cfg(unix)]
    {
        unsafe extern "C" {
            fn signal(signum: i32, handler: usize) -> usize;
        }
        const SIGPIPE: i32 = 13;
        const SIG_DFL: usize = 0;
        // SAFETY: installs the default disposition; no handler code runs in Rust.
        unsafe { signal(SIGPIPE, SIG_DFL) };
    }
}

fn main() -> ExitCode {
    default_sigpipe();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_bytes("123").unwrap(), 123);
        assert!(parse_bytes("1X").is_err());
        // Binary units are powers of 1024 (`1MiB` was 1,000,000); negative sizes are
        // refused (`-5M` was 0, i.e. no limit).
        assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("2gib").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5K").unwrap(), 1500);
        assert!(parse_bytes("-5M").is_err());
        assert!(parse_bytes("inf").is_err());
        assert!(parse_bytes("1iB").is_err());
        assert_eq!(parse_threads("0").unwrap(), 0);
        assert!(parse_threads("1000000").is_err());
    }
}
