//! Building datasets: [`run`] turns a [`source::Source`] into shards, index, manifest
//! and rejected list.
//!
//! 1. **Plan** ([`plan`]): enumerate the source into seeded hash buckets in a work
//!    directory `{out}/.{name}.work/`; replaying them gives one global order.
//! 2. **Load**: chunks of that order are loaded in parallel (rayon, `threads`); the
//!    chunk's results are collected in order, so thread count never changes output.
//! 3. **Write**: an assigner places samples in plan order (shard, offset), rolling shards
//!    over by size/count; shard writers write several shards at once, md5 as they go,
//!    then write a work record (rows, rejects) and rename the shard into place.
//! 4. **Finish**: index, rejected list, then the manifest (last: its presence marks a
//!    complete dataset); the work directory is removed.
//!
//! `--resume` reuses the plan and every shard whose record and file agree, and goes on
//! from the first position after them; the result equals an uninterrupted run.

pub mod existing;
pub mod merge;
pub mod plan;
mod seen;
pub mod source;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::index::IndexRow;
use crate::format::manifest::{DatasetInfo, Manifest, ShardEntry, tool_name};
use crate::format::reject::{Reject, read_rejects, write_rejects};
use crate::format::tar::ShardWriter;
use crate::format::{self, SCHEMA_VERSION};
use crate::image::ImageLimits;
pub use plan::Part;
use source::{Item, LoadContext, Reencode, Sample, Source, Validation};

/// Default shard size limit: ~1 GB, a good unit for streaming.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 1_000_000_000;
/// Default per-shard sample limit (0 = none).
pub const DEFAULT_MAX_SHARD_COUNT: u64 = 0;
/// Default largest tolerated fraction of rejected inputs.
pub const DEFAULT_MAX_REJECT_FRAC: f64 = 0.01;
/// Default seed.
pub const DEFAULT_SEED: u64 = 0;
/// Items loaded per parallel chunk, per thread.
const CHUNK_PER_THREAD: usize = 32;

/// How a dataset is written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardConfig {
    /// Output directory.
    pub out: PathBuf,
    /// Split name (`train`, `val`, ...): file-name prefix.
    pub split: String,
    /// Seed of the global shuffle.
    pub seed: u64,
    /// Worker threads (0 = all cores). Never changes the output.
    pub threads: usize,
    /// Continue an interrupted run.
    pub resume: bool,
    /// Roll a shard over before it would exceed this many bytes (0 = no limit).
    pub max_shard_bytes: u64,
    /// Roll a shard over at this many samples (0 = no limit).
    pub max_shard_count: u64,
    /// Header-only or full-decode validation.
    pub validation: Validation,
    /// Image size limits.
    pub limits: ImageLimits,
    /// Optional re-encoding of large originals.
    pub reencode: Option<Reencode>,
    /// Fail (after writing everything) if more than this fraction is rejected.
    pub max_reject_frac: f64,
    /// Only shard part `i` of `N` (multi-machine runs; combine with `merge`).
    pub part: Option<Part>,
    /// Allow symlinks that leave the input root.
    pub follow_symlinks: bool,
    /// fsync every shard before publishing it (survives power loss, not only a
    /// killed process; costs time on slow disks).
    pub fsync: bool,
    /// Show progress bars.
    pub progress: bool,
}

impl ShardConfig {
    /// A config with defaults for everything but the output and split.
    pub fn new(out: impl Into<PathBuf>, split: impl Into<String>) -> Self {
        ShardConfig {
            out: out.into(),
            split: split.into(),
            seed: DEFAULT_SEED,
            threads: 0,
            resume: false,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            max_shard_count: DEFAULT_MAX_SHARD_COUNT,
            validation: Validation::Header,
            limits: ImageLimits::default(),
            reencode: None,
            max_reject_frac: DEFAULT_MAX_REJECT_FRAC,
            part: None,
            follow_symlinks: false,
            fsync: false,
            progress: false,
        }
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.split.is_empty()
            || !self
                .split
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad(format!(
                "split `{}` must be non-empty and use only [A-Za-z0-9_-]",
                self.split
            ));
        }
        if !(0.0..=1.0).contains(&self.max_reject_frac) {
            return bad(format!(
                "--max-reject-frac {} must be within 0..1",
                self.max_reject_frac
            ));
        }
        if let Some(r) = self.reencode
            && (r.max_side == 0 || !(1..=100).contains(&r.quality))
        {
            return bad("--max-side must be > 0 and --quality within 1..100".into());
        }
        if self.limits.min_side == 0 || self.limits.min_side > self.limits.max_side {
            return bad("image limits: need 1 <= min side <= max side".into());
        }
        Ok(())
    }

    /// The name outputs are prefixed with: the split, or `{split}-partIIIofNNN`.
    pub fn name(&self) -> String {
        match self.part {
            None => self.split.clone(),
            Some(p) => part_name(&self.split, p),
        }
    }

    fn work_dir(&self) -> PathBuf {
        self.out.join(format!(".{}.work", self.name()))
    }

    /// Parameters that determine the output bytes (recorded in the manifest and used
    /// as the resume fingerprint).
    fn output_params(&self, source: &dyn Source) -> serde_json::Value {
        serde_json::json!({
            "source": source.params(),
            "seed": self.seed,
            "split": self.split,
            "max_shard_bytes": self.max_shard_bytes,
            "max_shard_count": self.max_shard_count,
            "validation": self.validation,
            "limits": self.limits,
            "reencode": self.reencode,
            "part": self.part,
            "follow_symlinks": self.follow_symlinks,
            "schema_version": SCHEMA_VERSION,
        })
    }
}

/// Output name of part `p` of `split`.
pub fn part_name(split: &str, p: Part) -> String {
    format!("{split}-part{:03}of{:03}", p.index, p.count)
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Output directory.
    pub out: PathBuf,
    /// Output name prefix.
    pub name: String,
    /// Inputs seen (samples + rejected).
    pub inputs: u64,
    /// Samples written to the index.
    pub samples: u64,
    /// Inputs rejected.
    pub rejected: u64,
    /// Rejects by reason.
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Shards in the dataset.
    pub shards: u64,
    /// Shards reused from an interrupted run.
    pub resumed_shards: u64,
    /// Total shard bytes.
    pub bytes: u64,
    /// Total image bytes.
    pub image_bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Things worth telling the user.
    pub warnings: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(f, "dataset   {}/{}", self.out.display(), self.name)?;
        writeln!(
            f,
            "inputs    {} -> {} samples in {} shards ({} reused), {} rejected",
            self.inputs, self.samples, self.shards, self.resumed_shards, self.rejected
        )?;
        for (reason, n) in &self.rejected_by_reason {
            writeln!(f, "  rejected {n:>8}  {reason}")?;
        }
        writeln!(
            f,
            "bytes     {:.1} MB in shards, {:.1} MB of images",
            self.bytes as f64 / 1e6,
            self.image_bytes as f64 / 1e6
        )?;
        write!(
            f,
            "time      {:.2} s, {:.0} inputs/s, {:.1} MB/s",
            secs,
            self.inputs as f64 / secs,
            self.image_bytes as f64 / 1e6 / secs
        )?;
        for w in &self.warnings {
            write!(f, "\nwarning   {w}")?;
        }
        Ok(())
    }
}

/// The work record of one finished shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardRecord {
    shard: u64,
    /// First plan position covered.
    start: u64,
    /// One past the last plan position covered.
    end: u64,
    entry: ShardEntry,
    rows: Vec<IndexRow>,
    rejects: Vec<Reject>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WorkState {
    params: serde_json::Value,
    plan: Option<plan::PlanInfo>,
    /// The source's warnings as of enumeration (a resumed run does not enumerate).
    #[serde(default)]
    warnings: Vec<String>,
}

fn record_path(work: &Path, shard: u64) -> PathBuf {
    work.join(format!("shard-{shard:06}.json"))
}

fn bar(progress: bool, len: Option<u64>, what: &str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let pb = match len {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta} {msg}",
            )
            .expect("template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{elapsed_precise}] {spinner} {pos} {per_sec} {msg}",
            )
            .expect("template"),
        ),
    };
    pb.set_prefix(what.to_owned());
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// `source.load`, with a panic in it (a decoder bug met on one odd file) turned into
/// that input's `decode_error` reject naming it, instead of the end of the whole run
/// (which `--resume` would meet again at the same file).
fn load_guarded(
    source: &dyn Source,
    item: &Item,
    ctx: &LoadContext,
) -> std::result::Result<Sample, Reject> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| source.load(item, ctx)))
        .unwrap_or_else(|payload| {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            Err(item.reject(
                "decode_error",
                format!("reading this input panicked (a decoder bug?): {msg}"),
            ))
        })
}

/// Builds (or resumes) a dataset from `source`.
pub fn run(source: &dyn Source, cfg: &ShardConfig) -> Result<Summary> {
    cfg.validate()?;
    let started = Instant::now();
    let name = cfg.name();
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let _lock = lock_dataset(&cfg.out, &name)?;
    let manifest_path = cfg.out.join(format::manifest_name(&name));
    let work = cfg.work_dir();
    let params = cfg.output_params(source);

    if manifest_path.exists() {
        let m: Manifest = format::read_json(&manifest_path)?;
        if cfg.resume && m.conmim.params == params {
            // Already complete: report it again. A run killed after publishing the
            // manifest but before removing its work directory left that behind.
            let mut warnings = vec!["dataset was already complete; nothing written".to_owned()];
            if work.exists() {
                std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
                warnings.push(format!(
                    "removed the work directory {} that a killed run left behind",
                    work.display()
                ));
            }
            return Ok(Summary {
                out: cfg.out.clone(),
                name,
                inputs: m.conmim.num_inputs,
                samples: m.conmim.num_samples,
                rejected: m.conmim.num_rejected,
                rejected_by_reason: m.conmim.rejected_by_reason.clone(),
                shards: m.conmim.num_shards,
                resumed_shards: m.conmim.num_shards,
                bytes: m.conmim.total_bytes,
                image_bytes: 0,
                elapsed: started.elapsed(),
                warnings,
            });
        }
        return Err(Error::Resume {
            path: manifest_path,
            message: "a complete dataset with this name already exists here (with other \
                      parameters, or --resume not given); remove it or choose another --out"
                .into(),
        });
    }

    // Work directory: fresh, or resumed with matching parameters.
    let state_path = work.join("state.json");
    let mut state = if work.exists() {
        if !cfg.resume {
            return Err(Error::Resume {
                path: work,
                message: "an interrupted run left this work directory; pass --resume to \
                          finish it, or delete it to start over"
                    .into(),
            });
        }
        let s: WorkState = format::read_json(&state_path).unwrap_or(WorkState {
            params: params.clone(),
            plan: None,
            warnings: Vec::new(),
        });
        if s.params != params {
            return Err(Error::Resume {
                path: work,
                message: "the interrupted run used other parameters or inputs; rerun with \
                          the same ones, or delete the work directory"
                    .into(),
            });
        }
        s
    } else {
        std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        WorkState {
            params: params.clone(),
            plan: None,
            warnings: Vec::new(),
        }
    };

    let plan_info = match &state.plan {
        Some(p) => p.clone(),
        None => {
            let pb = bar(cfg.progress, None, "planning");
            let info = plan::build(source, cfg.seed, cfg.part, &work, |n| {
                if n % 1024 == 0 {
                    pb.set_position(n)
                }
            })?;
            pb.finish_and_clear();
            // Nothing at all (an empty list, a wrong root): an error rather than an empty
            // "complete" dataset, whose manifest would then refuse the corrected rerun.
            // A part of a multi-machine run may hold nothing, and merges as such.
            if info.items == 0 && info.enum_rejects == 0 && cfg.part.is_none() {
                std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
                return Err(Error::NoInputs {
                    dataset: source.kind().to_owned(),
                });
            }
            state.plan = Some(info.clone());
            state.warnings = source.metadata().warnings;
            format::atomic_write_json(&state_path, &state)?;
            info
        }
    };

    // Reuse finished shards.
    let mut records_done = 0u64;
    let mut start = 0u64;
    loop {
        let rp = record_path(&work, records_done);
        if !rp.exists() {
            break;
        }
        let rec: ShardRecord = match format::read_json(&rp) {
            Ok(r) => r,
            Err(_) => break,
        };
        let shard_path = cfg.out.join(&rec.entry.url);
        let size_ok = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.len() == rec.entry.filesize)
                .unwrap_or(false)
        };
        let sealed = format::tmp_path(&shard_path);
        let ok = size_ok(&shard_path)
            || (size_ok(&sealed) && std::fs::rename(&sealed, &shard_path).is_ok());
        if !ok || rec.start != start {
            break;
        }
        start = rec.end;
        records_done += 1;
    }
    // Anything after the reusable prefix is stale.
    let mut stale = records_done;
    while record_path(&work, stale).exists() {
        let _ = std::fs::remove_file(record_path(&work, stale));
        stale += 1;
    }

    let threads = if cfg.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Config(format!("thread pool: {e}")))?;
    let ctx = LoadContext {
        validation: cfg.validation,
        limits: cfg.limits,
        reencode: cfg.reencode,
        follow_symlinks: cfg.follow_symlinks,
    };

    // Crash-test hook (tests/imagenet.rs): abort the process when the writer reaches
    // this plan position, as a kill -9 would.
    let abort_at: Option<u64> = std::env::var("CONMIM_SHARD_ABORT_AT")
        .ok()
        .and_then(|s| s.parse().ok());
    let pb = bar(cfg.progress, Some(plan_info.items), "sharding");
    pb.set_position(start);
    let chunk = CHUNK_PER_THREAD * threads;
    // Shards are written by `threads` shard writers, several shards at once; each
    // hashes as it writes, then records and publishes its shard. The assigner below
    // decides every sample's shard and offset arithmetically, in plan order.
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<ShardJob>(threads);
    let finish_error: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
    let finished = std::sync::atomic::AtomicU64::new(records_done);
    let mut writer = Assigner {
        jobs: Some(jobs_tx),
        cfg,
        name: &name,
        next_shard: records_done,
        open: None,
        pending: Vec::new(),
        rows: Vec::new(),
        shard_start: start,
        rejected: 0,
    };
    let (tx, rx) = sync_channel::<Result<Vec<(u64, std::result::Result<Sample, Reject>)>>>(1);
    let load = |item: &Item| -> std::result::Result<Sample, Reject> {
        let duplicate = |first: &str| {
            item.reject(
                "duplicate_key",
                format!("key `{}` already used by {first}", item.key),
            )
        };
        match &item.duplicate_of {
            Some(first) if item.duplicate_if_loads => {
                load_guarded(source, item, &ctx).and_then(|_| Err(duplicate(first)))
            }
            Some(first) => Err(duplicate(first)),
            None => load_guarded(source, item, &ctx),
        }
    };
    let scoped = std::thread::scope(|s| -> Result<()> {
        for _ in 0..threads {
            let jobs_rx = jobs_rx.clone();
            let finish_error = &finish_error;
            let finished = &finished;
            let work = &work;
            s.spawn(move || {
                for job in jobs_rx {
                    if let Err(e) = write_shard(job, work, cfg.fsync) {
                        finish_error.lock().expect("error slot").get_or_insert(e);
                    }
                    finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        drop(jobs_rx);
        let work_buf = work.clone();
        let plan_ref = &plan_info;
        let pool = &pool;
        let load = &load;
        // Whether an input would be stored: decides which of several inputs of one key
        // keeps it (see `plan::replay`).
        let loads = |item: &Item| load_guarded(source, item, &ctx).is_ok();
        s.spawn(move || {
            let mut batch: Vec<(u64, Item)> = Vec::with_capacity(chunk);
            let flush = |batch: &mut Vec<(u64, Item)>| {
                let out: Vec<_> =
                    pool.install(|| batch.par_iter().map(|(p, it)| (*p, load(it))).collect());
                batch.clear();
                out
            };
            for next in plan::replay(work_buf, cfg.seed, plan_ref, start, &loads) {
                match next {
                    Ok(x) => batch.push(x),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
                if batch.len() == chunk && tx.send(Ok(flush(&mut batch))).is_err() {
                    return;
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(Ok(flush(&mut batch)));
            }
        });
        let write_all = || -> Result<()> {
            let mut next = start;
            for msg in rx {
                for (pos, outcome) in msg? {
                    debug_assert_eq!(pos, next);
                    next = pos + 1;
                    if abort_at == Some(pos) {
                        // Crash after the shards closed so far are complete (so the
                        // test knows which ones must survive), mid-way through the next.
                        while finished.load(std::sync::atomic::Ordering::SeqCst) < writer.next_shard
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        std::process::abort();
                    }
                    writer.push(pos, outcome)?;
                    pb.inc(1);
                    if writer.rejected > 0 && pos % 256 == 0 {
                        pb.set_message(format!("{} rejected", writer.rejected));
                    }
                }
            }
            // Every planned position must have arrived (a loader that died would
            // otherwise end the stream early): never record a short final shard.
            if next != plan_info.items {
                return Err(Error::Config(format!(
                    "the loaders stopped at plan position {next} of {}; rerun with --resume",
                    plan_info.items
                )));
            }
            writer.close_shard(plan_info.items)
        };
        let written = write_all();
        // Lets the shard writers drain and stop, also after an error.
        writer.open = None;
        writer.jobs = None;
        written
    });
    // A shard writer's own error explains an assigner's "writer stopped".
    if let Some(e) = finish_error.into_inner().expect("error slot") {
        return Err(e);
    }
    scoped?;
    pb.finish_and_clear();
    let tail_rejects = std::mem::take(&mut writer.pending);
    let written = writer.next_shard;

    finish(
        source,
        cfg,
        &name,
        &work,
        &params,
        written,
        records_done,
        tail_rejects,
        state.warnings,
        started,
    )
}

/// Queue depth (samples) between the assigner and one shard writer.
const SHARD_QUEUE: usize = 64;

/// What the assigner sends a shard writer.
enum ShardMsg {
    /// Append a sample; `offset` is where the assigner placed it.
    Append {
        key: String,
        offset: u64,
        members: Vec<(String, Vec<u8>)>,
    },
    /// All samples sent: close, record and publish.
    Close(Box<ShardRecord>),
}

/// One shard for a shard writer: its path and its sample queue.
struct ShardJob {
    path: PathBuf,
    queue: crossbeam_channel::Receiver<ShardMsg>,
}

/// Writes one shard from its queue, then records it (work record first, then the
/// rename: a shard under its final name always has a record, so `--resume` never
/// rewrites it; a crash between the two leaves a complete `.partial` that resume
/// publishes).
fn write_shard(job: ShardJob, work: &Path, fsync: bool) -> Result<()> {
    let mut w = ShardWriter::create(&job.path)?;
    for msg in job.queue {
        match msg {
            ShardMsg::Append {
                key,
                offset,
                members,
            } => {
                let placed = w.append(&key, &members)?;
                if placed.offset != offset {
                    return Err(Error::CorruptSample {
                        shard: job.path.display().to_string(),
                        key,
                        message: format!(
                            "written at offset {} but planned at {offset} (member names too long?)",
                            placed.offset
                        ),
                    });
                }
            }
            ShardMsg::Close(mut rec) => {
                let closed = w.close(fsync)?;
                if closed.filesize() != rec.entry.filesize {
                    return Err(Error::CorruptShard {
                        shard: job.path.display().to_string(),
                        message: format!(
                            "{} bytes written, {} planned",
                            closed.filesize(),
                            rec.entry.filesize
                        ),
                    });
                }
                rec.entry.md5sum = closed.md5sum().to_owned();
                format::atomic_write_json(&record_path(work, rec.shard), &rec)?;
                closed.publish()?;
                return Ok(());
            }
        }
    }
    // The assigner stopped before closing (an error elsewhere): leave the `.partial`.
    Ok(())
}

/// The shard currently being filled.
struct OpenShard {
    queue: crossbeam_channel::Sender<ShardMsg>,
    /// Bytes placed so far (the next sample's offset).
    position: u64,
    nsamples: u64,
}

/// Decides, in plan order, which shard each sample goes to and where; rolls shards
/// over by size/count; hands samples to the shard writers.
struct Assigner<'a> {
    /// Where new shards go to be written.
    jobs: Option<crossbeam_channel::Sender<ShardJob>>,
    cfg: &'a ShardConfig,
    name: &'a str,
    next_shard: u64,
    open: Option<OpenShard>,
    /// Rejects since the open shard's start.
    pending: Vec<Reject>,
    rows: Vec<IndexRow>,
    shard_start: u64,
    rejected: u64,
}

impl Assigner<'_> {
    fn push(&mut self, pos: u64, outcome: std::result::Result<Sample, Reject>) -> Result<()> {
        let mut sample = match outcome {
            Err(r) => {
                self.rejected += 1;
                self.pending.push(r);
                return Ok(());
            }
            Ok(s) => s,
        };
        let size: u64 = sample
            .members
            .iter()
            .map(|(_, d)| format::tar::member_span(d.len() as u64))
            .sum();
        if let Some(w) = &self.open {
            let full_count = self.cfg.max_shard_count > 0 && w.nsamples >= self.cfg.max_shard_count;
            let full_bytes = self.cfg.max_shard_bytes > 0
                && w.position + size > self.cfg.max_shard_bytes
                && w.nsamples > 0;
            if full_count || full_bytes {
                self.close_shard(pos)?;
            }
        }
        if self.open.is_none() {
            let path = self
                .cfg
                .out
                .join(format::shard_name(self.name, self.next_shard as usize));
            let (queue, rx) = crossbeam_channel::bounded(SHARD_QUEUE);
            self.jobs
                .as_ref()
                .expect("shard writers running")
                .send(ShardJob { path, queue: rx })
                .map_err(|_| Error::Config("shard writer threads stopped".into()))?;
            self.open = Some(OpenShard {
                queue,
                position: 0,
                nsamples: 0,
            });
        }
        let w = self.open.as_mut().expect("open shard");
        sample.row.shard = self.next_shard as u32;
        sample.row.offset = w.position;
        sample.row.length = size;
        w.position += size;
        w.nsamples += 1;
        w.queue
            .send(ShardMsg::Append {
                key: sample.row.key.clone(),
                offset: sample.row.offset,
                members: sample.members,
            })
            .map_err(|_| Error::Config("a shard writer stopped".into()))?;
        self.rows.push(sample.row);
        Ok(())
    }

    /// Closes the open shard (covering positions up to `end`).
    fn close_shard(&mut self, end: u64) -> Result<()> {
        let Some(w) = self.open.take() else {
            return Ok(());
        };
        let rec = ShardRecord {
            shard: self.next_shard,
            start: self.shard_start,
            end,
            entry: ShardEntry {
                url: format::shard_name(self.name, self.next_shard as usize),
                nsamples: w.nsamples,
                filesize: w.position + format::tar::END_OF_ARCHIVE,
                md5sum: String::new(), // filled in by the shard writer
            },
            rows: std::mem::take(&mut self.rows),
            rejects: std::mem::take(&mut self.pending),
        };
        w.queue
            .send(ShardMsg::Close(Box::new(rec)))
            .map_err(|_| Error::Config("a shard writer stopped".into()))?;
        self.next_shard += 1;
        self.shard_start = end;
        Ok(())
    }
}

/// The lock that keeps one run per dataset name and output directory: `.{name}.lock`
/// in `out`, held (flock) until the returned guard drops. A second run, e.g. a
/// scheduler's restart with `--resume` while the first still runs, would truncate the
/// shard files the first is writing; it is refused instead.
fn lock_dataset(out: &Path, name: &str) -> Result<LockGuard> {
    let path = out.join(format!(".{name}.lock"));
    let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(LockGuard { path, _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Resume {
            path,
            message: format!(
                "another conmim-shard run is writing `{name}` in this directory; wait for \
                 it to end (or stop it) before running again"
            ),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

/// Holds a dataset's lock; removes the lock file when dropped (the lock goes with the
/// file descriptor).
struct LockGuard {
    path: PathBuf,
    _file: std::fs::File,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes the shard files of `name` in `out` that this run did not write: numbered at
/// or past `shards`, or unfinished (`.partial`), left by an earlier run whose work
/// directory was deleted to start over. Returns their names, sorted.
fn remove_stale_shards(out: &Path, name: &str, shards: u64) -> Result<Vec<String>> {
    let prefix = format!("{name}-");
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        let (number, partial) = match rest.strip_suffix(".tar.partial") {
            Some(n) => (n, true),
            None => match rest.strip_suffix(".tar") {
                Some(n) => (n, false),
                None => continue,
            },
        };
        let Ok(k) = number.parse::<u64>() else {
            continue;
        };
        if number.len() >= 6
            && number.bytes().all(|b| b.is_ascii_digit())
            && (partial || k >= shards)
        {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            stale.push(file.to_owned());
        }
    }
    stale.sort();
    Ok(stale)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    source: &dyn Source,
    cfg: &ShardConfig,
    name: &str,
    work: &Path,
    params: &serde_json::Value,
    shards: u64,
    resumed: u64,
    tail_rejects: Vec<Reject>,
    warnings: Vec<String>,
    started: Instant,
) -> Result<Summary> {
    let mut rejects = read_rejects(&plan::enum_rejects_path(work))?;
    let mut shardlist = Vec::with_capacity(shards as usize);
    let index_path = cfg.out.join(format::index_name(name));
    let mut index = format::index::IndexWriter::create(&index_path)?;
    let mut image_bytes = 0u64;
    let mut samples = 0u64;
    for k in 0..shards {
        let rec: ShardRecord = format::read_json(&record_path(work, k))?;
        image_bytes += rec.rows.iter().map(|r| r.image_bytes).sum::<u64>();
        samples += rec.rows.len() as u64;
        index.write(&rec.rows)?;
        rejects.extend(rec.rejects);
        shardlist.push(rec.entry);
    }
    index.finish()?;
    rejects.extend(tail_rejects);
    write_rejects(&cfg.out.join(format::rejected_name(name)), &rejects)?;

    let meta = source.metadata();
    let mut by_reason = BTreeMap::new();
    for r in &rejects {
        *by_reason.entry(r.reason.clone()).or_insert(0u64) += 1;
    }
    let total_bytes = shardlist.iter().map(|s| s.filesize).sum();
    let inputs = samples + rejects.len() as u64;
    let mut warnings = warnings;
    if inputs == 0 {
        // Only a `--part` gets here empty (a whole run stops after planning).
        warnings.push(format!(
            "no inputs of {} in this part (the part is empty)",
            source.kind()
        ));
    }
    let info = DatasetInfo {
        schema_version: SCHEMA_VERSION,
        tool: tool_name(),
        dataset: source.kind().to_owned(),
        split: cfg.split.clone(),
        num_samples: samples,
        num_rejected: rejects.len() as u64,
        num_inputs: inputs,
        num_shards: shards,
        total_bytes,
        rejected_by_reason: by_reason.clone(),
        classes: meta.classes,
        wnids: meta.wnids,
        categories: meta.categories,
        params: params.clone(),
    };
    let manifest = Manifest::new(name, shardlist, info);
    let stale = remove_stale_shards(&cfg.out, name, shards)?;
    if !stale.is_empty() {
        warnings.push(format!(
            "removed {} shard file(s) an earlier, abandoned run of `{name}` left in {} \
             (numbered past this run's {shards} shards, or unfinished): {}",
            stale.len(),
            cfg.out.display(),
            stale.join(", ")
        ));
    }
    format::atomic_write_json(&cfg.out.join(format::manifest_name(name)), &manifest)?;
    std::fs::remove_dir_all(work).map_err(|e| Error::io(work, e))?;

    let summary = Summary {
        out: cfg.out.clone(),
        name: name.to_owned(),
        inputs,
        samples,
        rejected: rejects.len() as u64,
        rejected_by_reason: by_reason,
        shards,
        resumed_shards: resumed,
        bytes: total_bytes,
        image_bytes,
        elapsed: started.elapsed(),
        warnings,
    };
    Ok(summary)
}

impl Summary {
    /// Fails with [`Error::TooManyRejects`] when more than `limit` of the inputs were
    /// rejected (the dataset is still written, so the rejected list can be read).
    pub fn check_rejects(&self, limit: f64) -> Result<()> {
        if self.inputs == 0 {
            return Ok(());
        }
        let frac = self.rejected as f64 / self.inputs as f64;
        if frac > limit {
            return Err(Error::TooManyRejects {
                rejected: self.rejected,
                total: self.inputs,
                frac,
                limit,
                list: self.out.join(format::rejected_name(&self.name)),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One run per dataset name and directory: a second is refused while the first
    /// holds the lock; other names are free; the lock file goes with the run.
    #[test]
    fn a_second_run_on_the_same_dataset_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dataset(dir.path(), "train").unwrap();
        let e = lock_dataset(dir.path(), "train").err().unwrap().to_string();
        assert!(
            e.contains("another conmim-shard run is writing `train`"),
            "{e}"
        );
        let val = lock_dataset(dir.path(), "val").unwrap();
        drop((held, val));
        assert!(!dir.path().join(".train.lock").exists());
        drop(lock_dataset(dir.path(), "train").unwrap());
    }

    /// Shard files of the name past this run's count, or unfinished, are an earlier
    /// run's; everything else stays.
    #[test]
    fn stale_shards_of_an_abandoned_run_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "train-000000.tar",
            "train-000001.tar",
            "train-000002.tar",
            "train-1000000.tar",
            "train-000001.tar.partial",
            "train-part000of002-000005.tar",
            "val-000007.tar",
            "train-00009.tar",
            "train-000009.txt",
        ];
        for n in names {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        let gone = remove_stale_shards(dir.path(), "train", 2).unwrap();
        assert_eq!(
            gone,
            [
                "train-000001.tar.partial",
                "train-000002.tar",
                "train-1000000.tar"
            ]
        );
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "train-000000.tar",
                "train-000001.tar",
                "train-000009.txt",
                "train-00009.tar",
                "train-part000of002-000005.tar",
                "val-000007.tar"
            ]
        );
    }
}
