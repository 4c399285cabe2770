//! `conmim pretrain`: a whole run — config (preset, JSON or TOML file, overrides),
//! resume, the training loop with a progress bar, JSONL metrics and TensorBoard
//! scalars, periodic atomic checkpoints and a final summary.
//!
//! Run directory `OUT`:
//!
//! ```text
//! OUT/config.json      the effective config of the (latest) invocation
//! OUT/metrics.jsonl    one line per step: step, loss, accuracy, lr, momentum,
//!                      grad_norm, img_s, data_wait_frac, gpu_mem_bytes (the CUDA
//!                      allocator's peak bytes; null on the CPU)
//! OUT/tb/events.out.tfevents.<secs>.<host>
//!                      TensorBoard scalars of the same metrics at each step, tagged
//!                      `train/<key>` (`tensorboard --logdir OUT/tb`); flushed at each
//!                      checkpoint and at the end
//! OUT/checkpoints/     see `checkpoint`
//! OUT/summary.json     written at the end of a successful run
//! ```
//!
//! On resume, metric lines of steps at or after the resumed step are dropped first, so
//! the file reads like one uninterrupted run. TensorBoard gets a new event file per
//! invocation (TensorBoard merges the files of a directory); it begins with a
//! `SessionLog START` at the resumed step, which makes TensorBoard drop the older
//! files' points from that step on. Where a reader does not, the steps between the
//! checkpoint and the interruption show twice, which is harmless.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tch::Device;

use super::checkpoint;
use super::dist::{Backend, DistEnv, ProcessGroup};
use super::input::DeviceBatch;
use super::pretrain_config::PretrainConfig;
use super::tensorboard::EventWriter;
use super::trainer::Trainer;
use crate::stream::{HttpOptions, SourceOptions};

/// Where to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Start fresh (an existing checkpoint in OUT is an error, to protect it).
    No,
    /// The newest complete checkpoint in OUT, or fresh when there is none.
    Auto,
    /// This checkpoint directory.
    Path(PathBuf),
}

/// Everything `conmim pretrain` takes.
#[derive(Debug, Clone)]
pub struct PretrainOptions {
    pub preset: String,
    pub config_file: Option<PathBuf>,
    /// `key.path=JSON value` overrides, applied after the file.
    pub sets: Vec<String>,
    pub data: String,
    pub split: String,
    pub allow_pipe: bool,
    /// Retries and timeouts of http(s) sources.
    pub http: HttpOptions,
    pub out: PathBuf,
    pub steps: Option<u64>,
    /// The run's length in epochs (`epochs` of the config; `steps` wins).
    pub epochs: Option<f64>,
    pub batch: Option<usize>,
    pub image_size: Option<i64>,
    pub lr: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub seed: Option<u64>,
    pub threads: Option<usize>,
    /// "cpu", "cuda" or "cuda:N"; `None`: CUDA when available.
    pub device: Option<String>,
    pub resume: Resume,
    pub save_every: u64,
    pub keep: usize,
    /// Draw the progress bar (to stderr).
    pub progress: bool,
    /// The k-NN monitor, run on the teacher at every checkpoint (by every rank together;
    /// rank 0 logs it).
    pub knn: Option<KnnMonitor>,
    /// Fault injection for tests.
    #[doc(hidden)]
    pub faults: Faults,
}

/// Fault injection for tests (all off by default).
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The process exits (status 3, no cleanup, as if killed) right after this step.
    pub exit_after_step: Option<u64>,
    /// Sleep this long after every step (slow steps, to let a test act mid-run).
    pub step_delay: Option<std::time::Duration>,
}

/// `conmim pretrain --knn-train-data D --knn-val-data D`: DINO's weighted k-NN
/// accuracy of the teacher's features at every checkpoint, as metric lines
/// `{"step", "knn_acc1", "knn_acc5"}` and TensorBoard `knn/acc1`, `knn/acc5`.
#[derive(Debug, Clone)]
pub struct KnnMonitor {
    pub train: String,
    pub train_split: String,
    pub val: String,
    pub val_split: String,
    pub k: usize,
    pub temperature: f64,
}

impl KnnMonitor {
    /// Fails now, not at the first checkpoint hours later, when a monitor dataset cannot
    /// be opened (its shard list resolves) or k / the temperature make no sense.
    fn check(&self, o: &PretrainOptions) -> Result<()> {
        if self.k == 0 || self.temperature.is_nan() || self.temperature <= 0.0 {
            bail!(
                "k-NN monitor: k must be >= 1 and the temperature > 0 (got k {}, T {})",
                self.k,
                self.temperature
            );
        }
        for (what, data, split) in [
            ("--knn-train-data", &self.train, &self.train_split),
            ("--knn-val-data", &self.val, &self.val_split),
        ] {
            crate::stream::ShardList::resolve(data, &Self::source(o, split)).with_context(
                || format!("k-NN monitor: {what} {data} (split {split}) cannot be opened"),
            )?;
        }
        Ok(())
    }

    /// How the monitor reads `split` of its datasets: the run's pipe and http options.
    fn source(o: &PretrainOptions, split: &str) -> SourceOptions {
        SourceOptions {
            split: split.to_owned(),
            allow_pipe: o.allow_pipe,
            http: o.http,
        }
    }
}

/// The final summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub preset: String,
    pub device: String,
    pub start_step: u64,
    pub steps: u64,
    pub total_steps: u64,
    pub samples: u64,
    pub wall_s: f64,
    pub img_s: f64,
    pub data_wait_frac: f64,
    pub final_loss: Option<f64>,
    pub mean_loss_last_10: Option<f64>,
    pub checkpoint: Option<PathBuf>,
    /// Corrupt samples this process's loader skipped (counted; the first ones named in
    /// `errors`). The config's `max_errors` bounds it.
    pub skipped_samples: u64,
    /// Shards this process's loader could not open or found damaged.
    pub shard_errors: u64,
    /// The first skipped samples and failed shards (shard, key, message).
    pub errors: Vec<crate::loader::FailedItem>,
    /// The run stopped early on this signal (after a checkpoint of its last step):
    /// "SIGTERM", "SIGINT", or "SIGTERM (on another rank)".
    pub stopped_by: Option<String>,
}

#[derive(Serialize)]
struct MetricLine {
    step: u64,
    loss: f64,
    accuracy: f64,
    lr: f64,
    momentum: f64,
    grad_norm: f64,
    img_s: f64,
    data_wait_frac: f64,
    /// Peak bytes of the CUDA caching allocator (`None` on the CPU).
    gpu_mem_bytes: Option<u64>,
}

impl MetricLine {
    /// The TensorBoard scalars of this line: every metric but `step`, tagged
    /// `train/<key>`; `gpu_mem_bytes` only when known.
    fn scalars(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("train/loss", self.loss),
            ("train/accuracy", self.accuracy),
            ("train/lr", self.lr),
            ("train/momentum", self.momentum),
            ("train/grad_norm", self.grad_norm),
            ("train/img_s", self.img_s),
            ("train/data_wait_frac", self.data_wait_frac),
        ];
        if let Some(b) = self.gpu_mem_bytes {
            v.push(("train/gpu_mem_bytes", b as f64));
        }
        v
    }
}

/// Parses `--device`.
pub fn parse_device(s: Option<&str>) -> Result<Device> {
    Ok(match s {
        None => Device::cuda_if_available(),
        Some("cpu") => Device::Cpu,
        Some(d) if d == "cuda" || d.starts_with("cuda:") => {
            let i: usize = match d.strip_prefix("cuda:") {
                Some(n) => n.parse().with_context(|| format!("bad device `{d}`"))?,
                None => 0,
            };
            if !tch::Cuda::is_available() {
                bail!("--device {d}: CUDA is not available on this machine (use --device cpu)");
            }
            let n = tch::Cuda::device_count() as usize;
            if i >= n {
                bail!(
                    "--device {d}: this process sees {n} CUDA device(s), cuda:0 to cuda:{} \
                     (CUDA_VISIBLE_DEVICES decides which)",
                    n.saturating_sub(1)
                );
            }
            Device::Cuda(i)
        }
        Some(d) => bail!("unknown device `{d}` (cpu, cuda or cuda:N)"),
    })
}

/// `a.b.c=VALUE` (VALUE as JSON, else as a string) -> `{"a":{"b":{"c":VALUE}}}`.
pub fn parse_set(s: &str) -> Result<serde_json::Value> {
    let Some((key, val)) = s.split_once('=') else {
        bail!("--set `{s}`: expected KEY=VALUE (e.g. model.drop_path_rate=0.1)");
    };
    let mut v: serde_json::Value =
        serde_json::from_str(val).unwrap_or_else(|_| serde_json::Value::String(val.to_owned()));
    for part in key.trim().split('.').rev() {
        if part.is_empty() {
            bail!("--set `{s}`: empty key part");
        }
        let mut m = serde_json::Map::new();
        m.insert(part.to_owned(), v);
        v = serde_json::Value::Object(m);
    }
    Ok(v)
}

/// The effective config of `o`: preset, then the file, then `--set`s, then the flags.
pub fn build_config(o: &PretrainOptions) -> Result<PretrainConfig> {
    let cfg = PretrainConfig::preset(&o.preset)?;
    let mut all = Vec::new();
    if let Some(f) = &o.config_file {
        all.push((
            format!("config {}", f.display()),
            steps_clear_epochs(PretrainConfig::read_overrides(f)?),
        ));
    }
    for s in &o.sets {
        all.push((format!("--set {s}"), steps_clear_epochs(parse_set(s)?)));
    }
    let mut flags = serde_json::Map::new();
    if let Some(e) = o.epochs {
        flags.insert("epochs".into(), e.into());
    }
    if let Some(s) = o.steps {
        flags.insert("total_steps".into(), s.into());
        flags.insert("epochs".into(), serde_json::Value::Null);
    }
    if let Some(b) = o.batch {
        flags.insert("batch_size".into(), b.into());
    }
    if let Some(s) = o.image_size {
        flags.insert("model".into(), serde_json::json!({ "image_size": s }));
    }
    if let Some(lr) = o.lr {
        flags.insert("lr".into(), lr.into());
    }
    if let Some(w) = o.warmup_steps {
        flags.insert("warmup_steps".into(), w.into());
    }
    if let Some(s) = o.seed {
        flags.insert("seed".into(), s.into());
    }
    if let Some(t) = o.threads {
        flags.insert("data_threads".into(), t.into());
    }
    all.push(("flags".to_owned(), serde_json::Value::Object(flags)));
    cfg.with_all_overrides(&all)
}

/// An override that gives `total_steps` and says nothing of `epochs` sets the run's
/// length in steps: it clears an earlier layer's `epochs` (which would otherwise decide
/// the length), as `--steps` does.
fn steps_clear_epochs(mut layer: serde_json::Value) -> serde_json::Value {
    if let Some(m) = layer.as_object_mut()
        && m.get("total_steps").is_some_and(|v| !v.is_null())
        && !m.contains_key("epochs")
    {
        m.insert("epochs".into(), serde_json::Value::Null);
    }
    layer
}

/// Creates `out` and checks that it is writable (a clear error before any work).
pub(crate) fn check_writable(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output directory {}", out.display()))?;
    let probe = out.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("the output directory {} is not writable", out.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// `--resume PATH` into a run directory whose checkpoints go further than `PATH` (a
/// roll-back after a loss spike, say) is an error: the resumed run would write its
/// checkpoints among the abandoned ones, and `--resume auto` would later take up the
/// abandoned run again.
fn refuse_newer_checkpoints(ck_root: &Path, from: &Path) -> Result<()> {
    let step = checkpoint::read_state(from)?.step;
    let newer: Vec<String> = checkpoint::list(ck_root)?
        .into_iter()
        .filter(|(s, _)| *s > step)
        .map(|(_, p)| p.display().to_string())
        .collect();
    if !newer.is_empty() {
        bail!(
            "--resume {} is at step {step}, but {} holds later checkpoints ({}): a run \
             resumed from it would write its own among them, and --resume auto would later \
             go back to them. Move them out of {} (or delete them), or resume into another \
             --out",
            from.display(),
            ck_root.display(),
            newer.join(", "),
            ck_root.display()
        );
    }
    Ok(())
}

/// What a resumed run changes of the checkpoint's config (`None`: nothing that
/// matters): every differing key but the loader thread count, the error budget and the
/// derived or informational `epochs` and `preset`. Changing the length or the lr is
/// allowed (extending a run is common), but the schedules then follow this run's
/// values from the step resumed, so say so.
pub(crate) fn config_changes_note(
    saved: &PretrainConfig,
    now: &PretrainConfig,
) -> Result<Option<String>> {
    let strip = |c: &PretrainConfig| -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(c)?;
        for k in ["data_threads", "max_errors", "epochs", "preset"] {
            v[k] = serde_json::Value::Null;
        }
        Ok(v)
    };
    let differ = json_differences(&strip(saved)?, &strip(now)?, "checkpoint", "this run");
    Ok((!differ.is_empty()).then(|| {
        format!(
            "this run's config differs from the checkpoint's ({}); the schedules and the \
             step go on with this run's values",
            differ.join("; ")
        )
    }))
}

/// The differences between two JSON values, one per leaf that differs, by dotted
/// path: `model.depth: A 12, B 6` (`a_name` / `b_name` say whose values they are).
pub(crate) fn json_differences(
    a: &serde_json::Value,
    b: &serde_json::Value,
    a_name: &str,
    b_name: &str,
) -> Vec<String> {
    fn walk(
        a: &serde_json::Value,
        b: &serde_json::Value,
        path: &str,
        names: (&str, &str),
        out: &mut Vec<String>,
    ) {
        use serde_json::Value;
        if let (Value::Object(x), Value::Object(y)) = (a, b) {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let (va, vb) = (x.get(k), y.get(k));
                walk(
                    va.unwrap_or(&Value::Null),
                    vb.unwrap_or(&Value::Null),
                    &sub,
                    names,
                    out,
                );
            }
        } else if a != b {
            out.push(format!("{path}: {} {a}, {} {b}", names.0, names.1));
        }
    }
    let mut out = Vec::new();
    walk(a, b, "", (a_name, b_name), &mut out);
    out
}

/// Makes sure every rank of a torchrun job runs `cmd` with rank 0's `settings` (the
/// effective config and every option that decides what the ranks do together; not
/// paths or thread counts, which may differ from node to node). A collective. Ranks
/// with other settings (another config file on a node, another command line, another
/// conmim build) would train differently, or call their collectives at other steps
/// and hang until the timeout: instead every rank fails at once, and each differing
/// rank names the keys in which it differs.
pub(crate) fn check_same_settings(
    pg: &ProcessGroup,
    cmd: &str,
    settings: &serde_json::Value,
) -> Result<()> {
    let mut mine = settings.clone();
    mine["conmim_version"] = env!("CARGO_PKG_VERSION").into();
    let bytes = serde_json::to_vec(&mine)?;
    let all = pg
        .gather_i64(&[xxhash_rust::xxh3::xxh3_64(&bytes) as i64])
        .context("comparing the ranks' settings")?;
    let differ: Vec<usize> = (0..all.len()).filter(|&r| all[r] != all[0]).collect();
    if differ.is_empty() {
        return Ok(());
    }
    // Rank 0's settings to every rank, so that each differing rank names its keys.
    let len = tch::Tensor::from_slice(&[bytes.len() as i64]);
    pg.broadcast(&len, 0)?;
    let n = i64::try_from(&len)?;
    let buf = if pg.rank == 0 {
        tch::Tensor::from_slice(&bytes)
    } else {
        tch::Tensor::zeros([n], (tch::Kind::Uint8, Device::Cpu))
    };
    pg.broadcast(&buf, 0)?;
    let root: serde_json::Value = serde_json::from_slice(&Vec::<u8>::try_from(&buf)?)?;
    let fix = "every node must run the same command line, config file and conmim build, \
               over the same shards";
    if differ.contains(&pg.rank) {
        let keys = json_differences(&root, &mine, "rank 0", "this rank");
        let data = keys.iter().any(|k| {
            ["data.", "val_data.", "knn_data."]
                .iter()
                .any(|p| k.starts_with(p))
        });
        bail!(
            "conmim {cmd}: rank {} runs with other settings than rank 0 ({}): {}",
            pg.rank,
            keys.join("; "),
            if data {
                "the data must name the same shards, with the same sample counts, on \
                 every node (a shared path, an http(s) manifest, or identical copies)"
            } else {
                fix
            }
        );
    }
    bail!(
        "conmim {cmd}: the settings of {} differ from rank 0's (their own errors name the \
         keys): {fix}",
        crate::train::dist::rank_ranges(&differ)
    )
}

/// An exclusive lock on a run directory (`OUT/.lock`), held for the whole run by the
/// process that writes the directory (rank 0). A second run on the same directory (a
/// job requeued while the first still runs, a command started twice) fails at once,
/// instead of deleting the first one's unfinished checkpoint as debris and writing its
/// checkpoints and metrics among the first one's. The OS releases the lock when the
/// process ends, however it ends (`kill -9` included).
#[derive(Debug)]
pub(crate) struct RunLock {
    _file: std::fs::File,
}

/// The name of [`RunLock`]'s file in a run directory.
pub(crate) const LOCK_FILE: &str = ".lock";

/// Takes [`RunLock`] on `out` (which must exist) on rank 0 of `pg` (the only process
/// without a group); under torchrun every rank learns whether rank 0 got it, before
/// any rank touches the directory (a collective).
pub(crate) fn lock_run_dir(
    cmd: &str,
    out: &Path,
    pg: Option<&ProcessGroup>,
) -> Result<Option<RunLock>> {
    let rank = pg.map_or(0, |p| p.rank);
    let mine = (rank == 0).then(|| try_lock_run_dir(cmd, out));
    if let Some(pg) = pg {
        let failed = matches!(mine, Some(Err(_)));
        let mut t = tch::Tensor::from_slice(&[if failed { 1.0f64 } else { 0.0 }]);
        pg.all_reduce_mean(&mut t)
            .context("agreeing on the run directory's lock")?;
        if rank != 0 && t.double_value(&[0]) > 0.0 {
            bail!(
                "rank 0 could not lock the run directory {} (another run is writing it; see \
                 rank 0's error)",
                out.display()
            );
        }
    }
    mine.transpose()
}

fn try_lock_run_dir(cmd: &str, out: &Path) -> Result<RunLock> {
    use std::io::{Read, Seek, Write};
    let path = out.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            // Who holds it, for the error of the next one.
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let who = format!(
                "conmim {cmd}, pid {} on {}",
                std::process::id(),
                host.trim()
            );
            let _ = file.set_len(0);
            let _ = file.rewind();
            let _ = file.write_all(who.as_bytes());
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "{} is being written by another run ({}): wait for it to end or stop it, or \
                 pass another --out",
                out.display(),
                if holder.is_empty() {
                    "unknown process"
                } else {
                    holder.trim()
                }
            );
        }
        // A filesystem without locks (some network mounts): go on, but say so.
        Err(std::fs::TryLockError::Error(e)) => eprintln!(
            "conmim {cmd}: note: cannot lock {} ({e}); make sure no other run writes {}",
            path.display(),
            out.display()
        ),
    }
    Ok(RunLock { _file: file })
}

/// Runs [`checkpoint::recover`] on `root` and says on stderr (rank 0) what it did.
pub(crate) fn report_recovery(cmd: &str, root: &Path, rank: usize) -> Result<()> {
    let r = checkpoint::recover(root).with_context(|| {
        format!(
            "cleaning up after an interrupted save in {}",
            root.display()
        )
    })?;
    if rank == 0 {
        for name in &r.restored {
            eprintln!(
                "conmim {cmd}: put back checkpoint {} (the run was killed while replacing it)",
                root.join(name).display()
            );
        }
        if !r.removed.is_empty() {
            eprintln!(
                "conmim {cmd}: removed {} unfinished checkpoint write(s) left by a killed run in {}",
                r.removed.len(),
                root.display()
            );
        }
    }
    Ok(())
}

/// Keeps the metric lines a checkpoint of step `at` covers: the step lines before it
/// (0-based step indices) and the k-NN lines up to it (logged after `at` steps).
fn truncate_metrics(path: &Path, at: u64) -> Result<()> {
    truncate_metrics_by(path, |v| {
        v.get("step")
            .and_then(|s| s.as_u64())
            .is_some_and(|s| s < at || (s == at && v.get("knn_acc1").is_some()))
    })
}

/// A resumed run's TensorBoard session starts at step `at`, which makes TensorBoard
/// drop every point at `at` or later from the earlier event files, the evaluation
/// logged after `at` steps included. Writes those points again into the new file:
/// for each metrics line of step `at` that has every key of `keys`, the scalars
/// `(key, tag)`.
pub(crate) fn replay_scalars_at(
    metrics: &Path,
    tb: &mut EventWriter,
    at: u64,
    keys: &[(&str, &str)],
) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(metrics) else {
        return Ok(());
    };
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        if v.get("step").and_then(|s| s.as_u64()) != Some(at) {
            continue;
        }
        let values: Option<Vec<(&str, f64)>> = keys
            .iter()
            .map(|(k, tag)| v.get(*k).and_then(|x| x.as_f64()).map(|x| (*tag, x)))
            .collect();
        if let Some(values) = values {
            tb.add_scalars(at, &values)?;
        }
    }
    Ok(())
}

/// The k-NN monitor's metrics keys and TensorBoard tags.
const KNN_SCALARS: [(&str, &str); 2] = [("knn_acc1", "knn/acc1"), ("knn_acc5", "knn/acc5")];

/// Keeps only the metric lines (JSON objects) for which `keep` holds; a missing file
/// is left missing.
pub(crate) fn truncate_metrics_by(
    path: &Path,
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| keep(&v)))
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    crate::format::atomic_write(path, body.as_bytes())
        .with_context(|| format!("rewriting {}", path.display()))?;
    Ok(())
}

/// How long a collective may wait for the other ranks (`CONMIM_DIST_TIMEOUT_S`, default
/// 600 s): a dead or hung rank makes the others fail with an error after this.
pub(crate) fn dist_timeout() -> std::time::Duration {
    let s = std::env::var("CONMIM_DIST_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(600.0);
    std::time::Duration::from_secs_f64(s)
}

/// The k-NN accuracy (top-1, top-5, %) of the teacher's current features; under
/// torchrun every rank takes part (each extracts the features of its own shards) and
/// gets the result.
fn knn_monitor(trainer: &Trainer, m: &KnnMonitor, o: &PretrainOptions) -> Result<(f64, f64)> {
    let (acc1, acc5, ..) = super::finetune::knn::knn_of(
        &trainer.teacher.vit,
        trainer.device,
        (&m.train, &KnnMonitor::source(o, &m.train_split)),
        (&m.val, &KnnMonitor::source(o, &m.val_split)),
        m.k,
        m.temperature,
        KNN_BATCH,
        trainer.cfg.data_threads,
        trainer.dist.as_ref(),
    )?;
    Ok((acc1, acc5))
}

/// Images per feature batch (per rank) of the pretraining k-NN monitor.
const KNN_BATCH: usize = 256;

/// torchrun's environment when the run trains through a process group
/// ([`DistEnv::wants_group`]: WORLD_SIZE > 1, or any world size under torchrun; then
/// `batch`, the global batch if any, must divide by WORLD_SIZE), and the device: `--device`
/// (a bare `cuda` under torchrun: the rank's `LOCAL_RANK` GPU, or the one GPU it sees),
/// else that GPU under torchrun, else CUDA when available; a CUDA device becomes the
/// current one (as `torch.cuda.set_device`).
pub(crate) fn dist_and_device(
    device: Option<&str>,
    batch: Option<usize>,
) -> Result<(Option<DistEnv>, Device)> {
    let dist_env = DistEnv::from_env()
        .context("reading torchrun's environment")?
        .filter(|e| e.wants_group());
    let device = match (device, &dist_env) {
        (None, Some(e)) => e.device(),
        // Under torchrun a bare `cuda` is this rank's GPU (LOCAL_RANK), not GPU 0 for
        // every rank of the node.
        (Some("cuda"), Some(e)) => {
            let visible = if tch::Cuda::is_available() {
                tch::Cuda::device_count() as usize
            } else {
                0
            };
            parse_device(Some(&format!("cuda:{}", e.gpu_index(visible)))).with_context(|| {
                format!(
                    "--device cuda on LOCAL_RANK {} ({visible} CUDA devices visible)",
                    e.local_rank
                )
            })?
        }
        _ => parse_device(device)?,
    };
    if let (Some(e), Some(batch)) = (&dist_env, batch)
        && !batch.is_multiple_of(e.world_size)
    {
        bail!(
            "--batch {batch} is the global batch and must divide by WORLD_SIZE {}",
            e.world_size
        );
    }
    super::cuda::set_current_device(device)
        .with_context(|| format!("selecting {device:?} as the current CUDA device"))?;
    Ok((dist_env, device))
}

/// The process group of a torchrun job (none outside one; joined with the
/// `CONMIM_DIST_TIMEOUT_S` timeout, host tensors staged through `device` under NCCL) and
/// the device, as [`dist_and_device`] picks them (`batch`: a global batch to split).
pub(crate) fn group_and_device(
    device: Option<&str>,
    batch: Option<usize>,
) -> Result<(Option<ProcessGroup>, Device)> {
    let (dist_env, device) = dist_and_device(device, batch)?;
    let pg = match &dist_env {
        Some(e) => Some(
            ProcessGroup::new(e, Backend::for_device(device), dist_timeout())
                .context("joining the process group")?
                .on_device(device),
        ),
        None => None,
    };
    Ok((pg, device))
}

/// What every rank of a pretraining job must agree on ([`check_same_settings`]): the
/// config but its loader thread count, when checkpoints (a collective) are written, and
/// the k-NN monitor's k and temperature (its datasets may be at other paths).
fn collective_settings(cfg: &PretrainConfig, o: &PretrainOptions) -> Result<serde_json::Value> {
    let mut config = serde_json::to_value(cfg)?;
    config["data_threads"] = serde_json::Value::Null;
    let source = |split: &str| SourceOptions {
        split: split.to_owned(),
        allow_pipe: o.allow_pipe,
        http: o.http,
    };
    Ok(serde_json::json!({
        "config": config,
        "save_every": o.save_every,
        "knn": o.knn.as_ref().map(|k| (k.k, k.temperature)),
        "data": data_identity(&o.data, &source(&o.split)),
        "knn_data": o.knn.as_ref().map(|k| [
            data_identity(&k.train, &source(&k.train_split)),
            data_identity(&k.val, &source(&k.val_split)),
        ]),
    }))
}

/// What a rank's data source holds, for [`check_same_settings`]: the number of shards,
/// of samples (when known) and [`crate::stream::list_fingerprint`] (names and counts,
/// not the path: identical copies at other paths agree), or the error resolving it.
/// Ranks that see other shards would split the epoch inconsistently (shards read
/// twice or never, or sample counts that end the ranks' epochs at other steps).
pub(crate) fn data_identity(spec: &str, opts: &SourceOptions) -> serde_json::Value {
    match crate::stream::ShardList::resolve(spec, opts) {
        Ok(list) => serde_json::json!({
            "shards": list.len(),
            "samples": list.total_samples(),
            "list": format!("{:016x}", crate::stream::list_fingerprint(&list)),
        }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}

/// Runs `conmim pretrain`.
pub fn pretrain(o: &PretrainOptions) -> Result<Summary> {
    let mut cfg = build_config(o)?;
    let opts = SourceOptions {
        split: o.split.clone(),
        allow_pipe: o.allow_pipe,
        http: o.http,
    };
    let length = match cfg.epochs {
        Some(_) => {
            let list = crate::stream::ShardList::resolve(&o.data, &opts)
                .with_context(|| format!("counting the training samples of {}", o.data))?;
            cfg.resolve_epochs(list.total_samples(), &o.data)?
        }
        None => None,
    };
    if let Some(m) = &o.knn {
        m.check(o)?;
    }
    let (pg, device) = group_and_device(o.device.as_deref(), Some(cfg.batch_size))?;
    if let Some(pg) = &pg {
        check_same_settings(pg, "pretrain", &collective_settings(&cfg, o)?)?;
    }
    check_writable(&o.out)?;
    let _lock = lock_run_dir("pretrain", &o.out, pg.as_ref())?;
    let ck_root = checkpoint::dir_of(&o.out);
    // What a run killed mid-save left (every rank: it is idempotent, and each must see
    // the same checkpoints).
    report_recovery("pretrain", &ck_root, pg.as_ref().map_or(0, |p| p.rank))?;
    let found = match &o.resume {
        Resume::No | Resume::Auto => checkpoint::latest(&ck_root)?,
        Resume::Path(p) => Some(p.clone()),
    };
    // Every rank must take what rank 0 takes (each reads the checkpoint itself).
    if let Some(pg) = &pg {
        checkpoint::agree_across_ranks(pg, &o.out, found.as_deref())?;
    }
    let resume_from = match (&o.resume, found) {
        (Resume::No, Some(p)) => bail!(
            "{} already holds checkpoint {}; pass --resume auto to continue it, or another \
             --out",
            o.out.display(),
            p.display()
        ),
        (_, found) => found,
    };
    if let (Resume::Path(p), Some(_)) = (&o.resume, &resume_from) {
        refuse_newer_checkpoints(&ck_root, p)?;
    }
    let mut trainer = Trainer::new(cfg.clone(), device)?;
    if let Some(pg) = pg {
        if pg.rank == 0 {
            eprintln!("conmim pretrain: {}", pg.describe(cfg.batch_size));
        }
        trainer.join(pg)?;
    } else if cfg.sync_bn {
        eprintln!(
            "conmim pretrain: note: sync_bn has no effect in a single process (it \
             synchronises BatchNorm across the ranks of a torchrun job)"
        );
    }
    // Rank 0 writes the run directory; other ranks log to a scratch directory that is
    // removed at the end.
    let main = trainer.rank() == 0;
    if let (Some(l), true) = (&length, main) {
        eprintln!("conmim pretrain: {l}");
    }
    let log_guard = crate::train::dist::LogDir::for_rank(&o.out, trainer.rank(), "pretrain")?;
    let log_dir = log_guard.path();
    if let Some(p) = &resume_from {
        trainer
            .load_checkpoint(p)
            .with_context(|| format!("resuming from {}", p.display()))?;
        if main {
            eprintln!(
                "conmim pretrain: resumed from {} at step {}",
                p.display(),
                trainer.step()
            );
            if let Some(note) = config_changes_note(&checkpoint::read_state(p)?.config, &cfg)? {
                eprintln!("conmim pretrain: note: {note}");
            }
        }
    }
    crate::format::atomic_write_json(&log_dir.join("config.json"), &cfg)
        .context("writing config.json")?;
    let metrics_path = log_dir.join("metrics.jsonl");
    truncate_metrics(&metrics_path, trainer.step())?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;

    let start_step = trainer.step();
    let mut tb = EventWriter::create(&log_dir.join("tb"))?;
    tb.session_start(start_step)?;
    replay_scalars_at(&metrics_path, &mut tb, start_step, &KNN_SCALARS)?;
    let total = cfg.total_steps;
    let at = trainer.resume_at();
    let (mut loader, rejoin) = trainer.open_loader_at(&o.data, &opts, &at)?;
    if let (Some(r), true) = (rejoin, main) {
        eprintln!("conmim pretrain: {}", r.describe(trainer.world_size()));
    }

    let pb = if o.progress && main {
        ProgressBar::new(total)
    } else {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden())
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} ETA {eta_precise} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(start_step);

    let t0 = Instant::now();
    let (mut wait_total, mut samples) = (0.0f64, 0u64);
    let mut recent: Vec<f64> = Vec::new();
    let mut last_ck = None;
    let mut last_step_end = Instant::now();
    // Batch k+1 is fetched and uploaded while step k runs on the device (the trainer's
    // `between` hook); "waiting for data" is the time blocked on the loader there.
    let fetch = |loader: &mut crate::loader::Loader, step: u64| -> Result<(DeviceBatch, f64)> {
        let (x, wait, _upload) = DeviceBatch::next_from(loader, device, step)?;
        Ok((x, wait))
    };
    let mut next = if trainer.step() < total {
        Some(fetch(&mut loader, trainer.step())?)
    } else {
        None
    };
    // SIGTERM / SIGINT from here on: stop after the step in progress, with a checkpoint.
    let signals = super::signals::StopGuard::arm()?;
    trainer.stop_poll = Some(super::signals::stop_requested);
    let mut stopped_by: Option<String> = None;
    while trainer.step() < total {
        let (batch, mut wait) = next.take().expect("prefetched batch");
        let more = trainer.step() + 1 < total;
        let step_now = trainer.step();
        let stats = trainer
            .train_step_device(&batch, || {
                if more {
                    let (x, w) = fetch(&mut loader, step_now + 1)?;
                    wait += w;
                    next = Some((x, 0.0));
                }
                Ok(())
            })
            .with_context(|| {
                format!(
                    "step {} (the last checkpoint is untouched{})",
                    trainer.step(),
                    last_ck
                        .as_ref()
                        .map(|p: &PathBuf| format!(": {}", p.display()))
                        .unwrap_or_default()
                )
            })?;
        wait_total += wait;
        drop(batch);
        let dt = last_step_end.elapsed().as_secs_f64().max(1e-9);
        last_step_end = Instant::now();
        // Images over all ranks.
        let world = trainer.dist.as_ref().map_or(1, |d| d.world_size);
        let step_images = stats.batch * world;
        samples += step_images as u64;
        let line = MetricLine {
            step: stats.step,
            loss: stats.loss,
            accuracy: stats.accuracy,
            lr: stats.lr,
            momentum: stats.momentum,
            grad_norm: stats.grad_norm,
            img_s: step_images as f64 / dt,
            data_wait_frac: (wait / dt).min(1.0),
            gpu_mem_bytes: super::cuda::memory_stats(device).map(|m| m.peak_allocated),
        };
        writeln!(metrics, "{}", serde_json::to_string(&line)?)
            .with_context(|| format!("writing {}", metrics_path.display()))?;
        tb.add_scalars(line.step, &line.scalars())?;
        recent.push(stats.loss);
        if recent.len() > 10 {
            recent.remove(0);
        }
        pb.set_position(trainer.step());
        pb.set_message(format!(
            "loss {:.4} lr {:.2e} {:.1} img/s",
            stats.loss, stats.lr, line.img_s
        ));
        let step = trainer.step();
        if step % o.save_every.max(1) == 0 || step == total || stats.stop {
            metrics.flush()?;
            tb.flush()?;
            trainer.gather_loader_states()?;
            if main {
                let p = checkpoint::save(&ck_root, &trainer, o.keep)?;
                last_ck = Some(p);
            }
            if let Some(m) = &o.knn {
                // Every rank takes part; rank 0 logs.
                let (a1, a5) = knn_monitor(&trainer, m, o)
                    .with_context(|| format!("k-NN monitor at step {step}"))?;
                if main {
                    writeln!(
                        metrics,
                        "{}",
                        serde_json::json!({"step": step, "knn_acc1": a1, "knn_acc5": a5})
                    )?;
                    tb.add_scalars(step, &[(KNN_SCALARS[0].1, a1), (KNN_SCALARS[1].1, a5)])?;
                    pb.println(format!("step {step}: k-NN top-1 {a1:.2}% top-5 {a5:.2}%"));
                    metrics.flush()?;
                }
            }
        }
        if o.faults.exit_after_step == Some(step) {
            metrics.flush()?;
            std::process::exit(3);
        }
        if let Some(d) = o.faults.step_delay {
            std::thread::sleep(d);
        }
        if stats.stop {
            stopped_by = Some(
                signals
                    .received()
                    .unwrap_or("SIGTERM (on another rank)")
                    .to_owned(),
            );
            break;
        }
    }
    drop(signals);
    pb.finish();
    if let (Some(why), true) = (&stopped_by, main) {
        eprintln!(
            "conmim pretrain: {why}: stopped after step {} of {total}, checkpoint {}; \
             continue with --resume auto",
            trainer.step(),
            last_ck
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string())
        );
    }
    if let Some(pg) = &trainer.dist {
        pg.check_replicas_agree(&trainer.opt.vars(), "student weights")?;
        let teacher = super::teacher::flats(&trainer.ema.groups);
        pg.check_replicas_agree(&teacher.iter().collect::<Vec<_>>(), "teacher weights")?;
    }
    metrics.flush()?;
    tb.flush()?;
    let wall = t0.elapsed().as_secs_f64();
    let log = loader.errors();
    let summary = Summary {
        preset: cfg.preset.clone(),
        device: format!("{device:?}"),
        start_step,
        steps: trainer.step() - start_step,
        total_steps: total,
        samples,
        wall_s: wall,
        img_s: samples as f64 / wall.max(1e-9),
        data_wait_frac: wait_total / wall.max(1e-9),
        final_loss: recent.last().copied(),
        mean_loss_last_10: (!recent.is_empty())
            .then(|| recent.iter().sum::<f64>() / recent.len() as f64),
        checkpoint: last_ck.or(resume_from),
        skipped_samples: log.sample_errors,
        shard_errors: log.shard_errors,
        errors: log.shards.into_iter().chain(log.samples).collect(),
        stopped_by,
    };
    crate::format::atomic_write_json(&log_dir.join("summary.json"), &summary)
        .context("writing summary.json")?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testing::{one_process, output_text, seeded, send_signal, torchrun};
    use crate::train::train_data::dataset;

    /// The rank body of the torchrun tests below.
    const RANK_CHILD: &str = "train::run::tests::pretrain_rank_child";

    /// The steps of the complete checkpoints of run `out`, oldest first.
    fn checkpoint_steps(out: &Path) -> Vec<u64> {
        checkpoint::list(&checkpoint::dir_of(out))
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    fn opts(data: &Path, out: &Path) -> PretrainOptions {
        PretrainOptions {
            preset: "tiny".into(),
            config_file: None,
            sets: vec![
                "model.patch_size=8".into(),
                "model.embed_dim=32".into(),
                "model.depth=2".into(),
                "model.num_heads=4".into(),
                "head.in_dim=32".into(),
                "head.hidden_dim=64".into(),
                "head.out_dim=24".into(),
                "shuffle_buffer=4".into(),
            ],
            data: data.to_str().unwrap().into(),
            split: "train".into(),
            allow_pipe: false,
            http: Default::default(),
            out: out.to_path_buf(),
            steps: Some(6),
            epochs: None,
            batch: Some(4),
            image_size: Some(32),
            lr: Some(1.0),
            warmup_steps: Some(1),
            seed: Some(3),
            threads: Some(2),
            device: Some("cpu".into()),
            resume: Resume::Auto,
            save_every: 2,
            keep: 2,
            progress: false,
            knn: None,
            faults: Faults::default(),
        }
    }

    fn losses(out: &Path) -> Vec<(u64, f64)> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
            })
            .collect()
    }

    /// The loss of each step as last logged: a restarted run logs the steps after its
    /// checkpoint twice, and its second attempt's lines come last.
    fn last_losses(out: &Path) -> Vec<(u64, f64)> {
        let last: std::collections::BTreeMap<u64, f64> = losses(out).into_iter().collect();
        last.into_iter().collect()
    }

    /// The loader positions in run `out`'s last checkpoint: one per rank (a single
    /// process: its own).
    fn saved_positions(out: &Path) -> Vec<crate::loader::LoaderState> {
        let ck = checkpoint::latest(&checkpoint::dir_of(out))
            .unwrap()
            .unwrap();
        let s = checkpoint::read_state(&ck).unwrap();
        if s.rank_loader_states.is_empty() {
            s.loader_state.into_iter().collect()
        } else {
            s.rank_loader_states
        }
    }

    /// Run `out` completed `steps` steps: its last checkpoint is of that step and holds
    /// the loader positions of `ranks` ranks, and it logged one loss per step.
    fn assert_completed(out: &Path, steps: u64, ranks: usize) {
        assert_eq!(checkpoint_steps(out).last(), Some(&steps));
        assert_eq!(last_losses(out).len() as u64, steps);
        let ck = checkpoint::latest(&checkpoint::dir_of(out))
            .unwrap()
            .unwrap();
        let state = checkpoint::read_state(&ck).unwrap();
        assert_eq!(state.rank_loader_states.len(), ranks);
    }

    /// A temporary directory holding the torchrun tests' dataset in `data/` (where
    /// `pretrain_rank_child` looks for it, next to the run directories).
    fn with_dataset() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        dataset(&data, &[6, 6]);
        dir
    }

    /// The environment of `pretrain_rank_child`: run directory `out`, `steps` steps,
    /// a checkpoint every 2, a 60 s collective timeout.
    fn rank_child_env(c: &mut std::process::Command, out: &Path, steps: u64) {
        c.env("CONMIM_PRETRAIN_CHILD_OUT", out)
            .env("CONMIM_PRETRAIN_CHILD_STEPS", steps.to_string())
            .env("CONMIM_PRETRAIN_CHILD_SAVE_EVERY", "2")
            .env("CONMIM_DIST_TIMEOUT_S", "60")
            .env("OMP_NUM_THREADS", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
    }

    /// `pretrain_rank_child` as 2 ranks under torchrun ([`rank_child_env`], plus
    /// `env`): whether the job succeeded, and its output.
    fn two_rank_job(out: &Path, steps: u64, env: &[(&str, &str)]) -> (bool, String) {
        let mut c = torchrun(2, RANK_CHILD);
        rank_child_env(&mut c, out, steps);
        let o = c.envs(env.iter().copied()).output().unwrap();
        (o.status.success(), output_text(&o))
    }

    /// The body of `issue4_kill_9_at_any_moment_resumes_exactly`'s child processes (no-op
    /// otherwise): `pretrain --resume auto`, 8 steps, a checkpoint every 2, keep 2.
    #[test]
    fn pretrain_kill_child() {
        let Some(out) = std::env::var_os("CONMIM_KILL_CHILD_OUT") else {
            return;
        };
        if std::env::var_os("CONMIM_KILL_CHILD_WAIT_BEFORE").is_some() {
            // Arm and disarm the stop handlers once, then idle outside any run.
            drop(crate::train::signals::StopGuard::arm().unwrap());
            println!("DISARMED");
            std::thread::sleep(std::time::Duration::from_secs(30));
            return;
        }
        let out = PathBuf::from(out);
        let data = out.parent().unwrap().join("data");
        let mut o = opts(&data, &out);
        o.resume = Resume::Auto;
        o.steps = Some(8);
        o.save_every = 2;
        o.keep = 2;
        if let Ok(every) = std::env::var("CONMIM_KILL_CHILD_SAVE_EVERY") {
            o.save_every = every.parse().unwrap();
        }
        if let Ok(steps) = std::env::var("CONMIM_KILL_CHILD_STEPS") {
            o.steps = Some(steps.parse().unwrap());
        }
        let s = pretrain(&o).unwrap();
        println!("KILL_CHILD_DONE stopped_by {:?}", s.stopped_by);
    }

    /// The number of complete lines in `out`'s metrics.
    fn metric_lines(out: &Path) -> usize {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|t| t.matches('\n').count())
            .unwrap_or(0)
    }

    /// A SIGTERM (a scheduler's preemption) stops `pretrain` after the step in
    /// progress with a checkpoint of that step, where the periodic ones would have lost
    /// the interval since the last; `--resume auto` then continues exactly. Outside
    /// the training loop the signal keeps its default action.
    #[test]
    fn issue4_sigterm_stops_with_a_checkpoint_and_resumes_exactly() {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        dataset(&data, &[6, 6]);
        let child = |out: &Path| {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args([
                "train::run::tests::pretrain_kill_child",
                "--exact",
                "--nocapture",
            ])
            .env("CONMIM_KILL_CHILD_OUT", out)
            .env("CONMIM_KILL_CHILD_SAVE_EVERY", "100")
            // Enough steps after the signal's that the run cannot end before it lands.
            .env("CONMIM_KILL_CHILD_STEPS", "24")
            .env_remove("CONMIM_TEST_CRASH_AT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            c
        };
        let text = output_text;
        let full = dir.path().join("full");
        let o = child(&full).output().unwrap();
        assert!(
            text(&o).contains("KILL_CHILD_DONE stopped_by None"),
            "{}",
            text(&o)
        );
        let want = losses(&full);
        assert_eq!(want.len(), 24);

        let out = dir.path().join("stopped");
        let c = child(&out).spawn().unwrap();
        while metric_lines(&out) < 2 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        send_signal(c.id(), "TERM");
        let o = c.wait_with_output().unwrap();
        let t = text(&o);
        assert!(
            o.status.success() && t.contains("KILL_CHILD_DONE stopped_by Some(\"SIGTERM\")"),
            "{t}"
        );
        let steps = checkpoint_steps(&out);
        assert!(
            steps.len() == 1 && (2..24).contains(&steps[0]),
            "one checkpoint, of the step the signal stopped at: {steps:?}\n{t}"
        );
        assert!(t.contains("continue with --resume auto"), "{t}");
        let o = child(&out).output().unwrap();
        assert!(
            text(&o).contains("KILL_CHILD_DONE stopped_by None"),
            "{}",
            text(&o)
        );
        assert_eq!(losses(&out), want, "{}", text(&o));

        // Before the loop is armed (and after it), SIGTERM ends the process as usual.
        let mut idle = Command::new(std::env::current_exe().unwrap())
            .args([
                "train::run::tests::pretrain_kill_child",
                "--exact",
                "--nocapture",
            ])
            .env("CONMIM_KILL_CHILD_OUT", dir.path().join("never"))
            .env("CONMIM_KILL_CHILD_WAIT_BEFORE", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(idle.stdout.take().unwrap()));
        assert!(
            lines.any(|l| l.unwrap().contains("DISARMED")),
            "the idle child never disarmed"
        );
        send_signal(idle.id(), "TERM");
        let o = idle.wait_with_output().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(o.status.signal(), Some(15), "{o:?}");
    }

    /// Issue 4: killed at any moment, a resumed run continues exactly. A real SIGKILL of
    /// a `pretrain` process after its 1st, 2nd (around the step-2 save), 4th and 6th
    /// step, and an exit in the middle of writing the step-4 checkpoint (its model file
    /// written, the rest not): each time `--resume auto` ends with the loss sequence of
    /// the uninterrupted run, and no half-written checkpoint is left on disk.
    #[test]
    fn issue4_kill_9_at_any_moment_resumes_exactly() {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        dataset(&data, &[6, 6]);
        let child = |out: &Path, crash_at: Option<&str>| {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args([
                "train::run::tests::pretrain_kill_child",
                "--exact",
                "--nocapture",
            ])
            .env("CONMIM_KILL_CHILD_OUT", out)
            .env_remove("CONMIM_TEST_CRASH_AT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            if let Some(point) = crash_at {
                c.env("CONMIM_TEST_CRASH_AT", point);
            }
            c
        };
        let text = output_text;
        let finish = |out: &Path| {
            let o = child(out, None).output().unwrap();
            let t = text(&o);
            assert!(o.status.success() && t.contains("KILL_CHILD_DONE"), "{t}");
            t
        };
        let scratch = |out: &Path| -> Vec<String> {
            std::fs::read_dir(checkpoint::dir_of(out))
                .map(|rd| {
                    rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with('.'))
                        .collect()
                })
                .unwrap_or_default()
        };
        let full = dir.path().join("full");
        finish(&full);
        let want = losses(&full);
        assert_eq!(want.len(), 8);

        let mut killed = 0;
        for k in [1, 2, 4, 6] {
            let out = dir.path().join(format!("killed-after-{k}"));
            let mut c = child(&out, None).spawn().unwrap();
            while metric_lines(&out) < k && c.try_wait().unwrap().is_none() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            c.kill().unwrap(); // SIGKILL
            if c.wait().unwrap().success() {
                eprintln!("NOTICE: the child finished before the kill after step {k}");
                continue;
            }
            killed += 1;
            let t = finish(&out);
            assert_eq!(losses(&out), want, "killed after step {k}:\n{t}");
            assert!(scratch(&out).is_empty(), "{:?}", scratch(&out));
        }
        assert!(
            killed >= 2,
            "only {killed} of the kills landed before the run ended"
        );

        let out = dir.path().join("killed-in-save");
        let o = child(&out, Some("written@step-00000004")).output().unwrap();
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        let left = scratch(&out);
        assert!(
            left.len() == 1 && left[0].starts_with(".tmp-step-00000004-"),
            "{left:?}"
        );
        let steps = checkpoint_steps(&out);
        assert_eq!(steps, [2], "the half-written step 4 is no checkpoint");
        let t = finish(&out);
        assert!(t.contains("removed 1 unfinished checkpoint write"), "{t}");
        assert_eq!(losses(&out), want, "{t}");
        assert!(scratch(&out).is_empty(), "{:?}", scratch(&out));
    }

    /// The body of each rank of `issue6_pretrain_under_torchrun` (no-op otherwise).
    #[test]
    fn pretrain_rank_child() {
        let Some(out) = std::env::var_os("CONMIM_PRETRAIN_CHILD_OUT") else {
            return;
        };
        let out = PathBuf::from(out);
        let data = out.parent().unwrap().join("data");
        let mut o = opts(&data, &out);
        o.resume = Resume::Auto;
        if let Ok(steps) = std::env::var("CONMIM_PRETRAIN_CHILD_STEPS") {
            o.steps = Some(steps.parse().unwrap());
            o.save_every = 4;
        }
        // "RANK:STEP": that rank dies right after that step.
        if let Ok(spec) = std::env::var("CONMIM_PRETRAIN_CHILD_DIE") {
            let (rank, step) = spec.split_once(':').unwrap();
            if std::env::var("RANK").unwrap() == rank {
                o.faults.exit_after_step = Some(step.parse().unwrap());
            }
        }
        // Rank 1 alone gets these `--set`s, this thread count and this dataset (another
        // node's config file, core count, copy of the data).
        if std::env::var("RANK").as_deref() == Ok("1") {
            if let Some(d) = std::env::var_os("CONMIM_PRETRAIN_CHILD_RANK1_DATA") {
                o.data = d.to_str().unwrap().into();
            }
            if let Ok(set) = std::env::var("CONMIM_PRETRAIN_CHILD_RANK1_SET") {
                o.sets.push(set);
            }
            if let Ok(t) = std::env::var("CONMIM_PRETRAIN_CHILD_RANK1_THREADS") {
                o.threads = Some(t.parse().unwrap());
            }
        }
        // The same, the first time only: a torchrun job's first attempt, whichever node
        // the rank is on (`--max-restarts`; marker files next to OUT, as each agent
        // counts its restarts for itself).
        let first_time = |what: &str| {
            let rank = std::env::var("RANK").unwrap_or_default();
            let marker = out.with_extension(format!("rank-{rank}.{what}"));
            let first = !marker.exists();
            std::fs::write(&marker, b"").unwrap();
            first
        };
        if let Ok(spec) = std::env::var("CONMIM_PRETRAIN_CHILD_DIE_FIRST") {
            let (rank, step) = spec.split_once(':').unwrap();
            if std::env::var("RANK").unwrap() == rank && first_time("died") {
                o.faults.exit_after_step = Some(step.parse().unwrap());
            }
        }
        // Rank 0 of a restarted attempt joins late (this many ms): the other ranks look
        // for it in a store that still holds the dead attempt's keys.
        if let Ok(ms) = std::env::var("CONMIM_PRETRAIN_CHILD_LATE_RANK0_MS")
            && std::env::var("RANK").as_deref() == Ok("0")
            && !first_time("started")
        {
            std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap()));
        }
        // Steps this slow (ms) while the job has one rank (until another node joins).
        if let Ok(ms) = std::env::var("CONMIM_PRETRAIN_CHILD_SLOW_ALONE_MS")
            && std::env::var("WORLD_SIZE").as_deref() == Ok("1")
        {
            o.faults.step_delay = Some(std::time::Duration::from_millis(ms.parse().unwrap()));
        }
        if let Ok(every) = std::env::var("CONMIM_PRETRAIN_CHILD_SAVE_EVERY") {
            o.save_every = every.parse().unwrap();
        }
        if std::env::var_os("CONMIM_PRETRAIN_CHILD_PIDS").is_some() {
            let rank = std::env::var("RANK").unwrap();
            let pid = out.with_extension(format!("rank-{rank}.pid"));
            std::fs::write(pid, std::process::id().to_string()).unwrap();
        }
        let s = pretrain(&o).unwrap();
        println!(
            "PRETRAIN_OK samples {} stopped_by {:?}",
            s.samples, s.stopped_by
        );
        // Where torchrun put this rank (the multi-node test checks it).
        let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".into());
        println!(
            "RANK_ENV rank {} local_rank {} local_world_size {} node {} agent_store {}",
            var("RANK"),
            var("LOCAL_RANK"),
            var("LOCAL_WORLD_SIZE"),
            var("GROUP_RANK"),
            var("TORCHELASTIC_USE_AGENT_STORE"),
        );
    }

    /// Issue 6: `torchrun --no-python --nproc-per-node 2` running the pretraining loop:
    /// 2 ranks (Gloo on the CPU), global batch 4 = 2 per rank, disjoint shards; rank 0
    /// writes metrics and checkpoints, the others nothing in OUT.
    #[test]
    fn issue6_pretrain_under_torchrun() {
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        dataset(&data, &[6, 6]);
        let launch = |out: &Path, steps: Option<u64>, env: &[(&str, &str)]| {
            let mut c = torchrun(2, RANK_CHILD);
            c.env("CONMIM_PRETRAIN_CHILD_OUT", out)
                .env("CONMIM_DIST_TIMEOUT_S", "120");
            if let Some(s) = steps {
                c.env("CONMIM_PRETRAIN_CHILD_STEPS", s.to_string());
            }
            c.envs(env.iter().copied());
            let o = c.output().unwrap();
            (o.status.success(), output_text(&o))
        };
        let run_ok = |out: &Path, steps: Option<u64>| -> String {
            let (ok, text) = launch(out, steps, &[]);
            assert!(ok, "{text}");
            text
        };
        // Whole run: 6 steps x global batch 4, counted once per rank.
        let out = dir.path().join("run");
        let text = run_ok(&out, None);
        assert_eq!(text.matches("PRETRAIN_OK samples 24").count(), 2, "{text}");
        let want = losses(&out);
        assert_eq!(want.len(), 6, "rank 0 wrote one metrics line per step");
        assert!(
            checkpoint::latest(&checkpoint::dir_of(&out))
                .unwrap()
                .is_some()
        );
        // As after a crash past step 4: keep only the step-4 checkpoint, resume (each rank
        // from its own saved loader position): the same losses as the whole 2-rank run.
        let part = dir.path().join("part");
        run_ok(&part, Some(6));
        std::fs::remove_dir_all(checkpoint::dir_of(&part).join("step-00000006")).unwrap();
        let text = run_ok(&part, Some(6));
        assert!(text.contains("resumed from"), "{text}");
        assert_eq!(
            losses(&part),
            want,
            "resumed 2-rank run equals the whole run"
        );

        // A real failure: rank 1 dies (exit, no cleanup) right after step 3. The job
        // fails, promptly, with rank 0's checkpoint of step 2 intact; `--resume auto`
        // under torchrun again continues from it, to the same losses as the whole run
        // (steps 1-3 were logged twice: the rerun's lines come last).
        let crashed = dir.path().join("crashed");
        let t0 = std::time::Instant::now();
        let (ok, text) = launch(
            &crashed,
            Some(6),
            &[
                ("CONMIM_PRETRAIN_CHILD_DIE", "1:3"),
                ("CONMIM_PRETRAIN_CHILD_SAVE_EVERY", "2"),
                ("CONMIM_DIST_TIMEOUT_S", "20"),
            ],
        );
        assert!(!ok, "a dead rank must fail the job:\n{text}");
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "the job took {:?} to fail",
            t0.elapsed()
        );
        let steps = checkpoint_steps(&crashed);
        assert_eq!(steps, [2], "{text}");
        let text = run_ok(&crashed, Some(6));
        assert!(text.contains("resumed from"), "{text}");
        assert_eq!(
            last_losses(&crashed),
            want,
            "resumed after a dead rank equals the whole run"
        );
    }

    /// Issue 6: the README's multi-node recipe, as two one-GPU "nodes" on loopback: two
    /// torchrun agents of one job (`--nnodes 2`), each starting one rank, meeting by
    /// the static rendezvous (`--node-rank`, `--master-addr/--master-port`: node 0's
    /// agent hosts the store) and by the elastic one (`--rdzv-backend c10d`: the agent
    /// that becomes node 0 hosts the workers' store on a port of its own). Rank 1 is
    /// then local rank 0 of its node, and both are clients of an agent's store. Each
    /// job trains exactly as the one-node job of two ranks does (the same global batch
    /// split over the same ranks), and only rank 0 writes the run directory.
    ///
    /// Then `--out` on a node-local disk: after a restart, rank 0 sees its checkpoint
    /// and rank 1 none. Both nodes fail at once, naming what each rank sees and what to
    /// do (each rank reads the checkpoint itself: before, rank 1 trained from step 0
    /// while rank 0 resumed, and their collectives no longer matched).
    #[test]
    fn issue6_two_nodes_under_torchrun_train_like_one_node() {
        use crate::train::testing::{Rendezvous, free_port, torchrun_node};
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = with_dataset();
        // One job of two one-rank nodes, node K writing to (its view of) `outs[K]`:
        // whether each node succeeded, and their output.
        let job_env = |rdzv: Rendezvous, outs: [&Path; 2], steps: u64, env: &[(&str, &str)]| {
            let port = free_port();
            let nodes: Vec<_> = (0..2)
                .map(|node| {
                    let mut c = torchrun_node("2", node, 1, rdzv, port, RANK_CHILD);
                    rank_child_env(&mut c, outs[node], steps);
                    c.envs(env.iter().copied()).spawn().unwrap()
                })
                .collect();
            let mut text = String::new();
            let ok: Vec<bool> = nodes
                .into_iter()
                .map(|n| {
                    let o = n.wait_with_output().unwrap();
                    text += &output_text(&o);
                    o.status.success()
                })
                .collect();
            (ok, text)
        };
        let job = |rdzv: Rendezvous, outs: [&Path; 2], steps: u64| job_env(rdzv, outs, steps, &[]);

        let one_node = dir.path().join("one-node");
        let (ok, text) = two_rank_job(&one_node, 6, &[]);
        assert!(ok, "{text}");
        let want = losses(&one_node);
        assert_eq!(want.len(), 6);

        for rdzv in [Rendezvous::Static, Rendezvous::C10d] {
            let out = dir.path().join(format!("{rdzv:?}"));
            let (ok, text) = job(rdzv, [&out, &out], 6);
            assert_eq!(ok, [true, true], "{rdzv:?}: a node failed:\n{text}");
            assert_eq!(
                text.matches("PRETRAIN_OK samples 24").count(),
                2,
                "{rdzv:?}:\n{text}"
            );
            for rank in 0..2 {
                let line = format!(
                    "RANK_ENV rank {rank} local_rank 0 local_world_size 1 node {rank} \
                     agent_store True"
                );
                assert!(text.contains(&line), "{rdzv:?}: no {line:?} in\n{text}");
            }
            assert_eq!(
                text.matches("data parallel over 2 ranks (gloo), global batch 4 = 2 per rank")
                    .count(),
                1,
                "{rdzv:?}: rank 0 alone logs the group:\n{text}"
            );
            assert_eq!(
                losses(&out),
                want,
                "{rdzv:?}: two nodes of one rank train as one node of two\n{text}"
            );
            assert_eq!(checkpoint_steps(&out), [4, 6], "{rdzv:?}");
        }

        // Node-local run directories (same path, other disks): node 1's stays empty.
        let (local0, local1) = (dir.path().join("node0"), dir.path().join("node1"));
        let (ok, text) = job(Rendezvous::Static, [&local0, &local1], 4);
        assert_eq!(ok, [true, true], "{text}");
        assert_eq!(checkpoint_steps(&local0), [2, 4]);
        assert!(checkpoint_steps(&local1).is_empty());
        let t0 = Instant::now();
        let (ok, text) = job(Rendezvous::Static, [&local0, &local1], 6);
        assert_eq!(
            ok,
            [false, false],
            "the restart must fail on both nodes:\n{text}"
        );
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(50),
            "it took {:?}, past the collective timeout?\n{text}",
            t0.elapsed()
        );
        let msg = "do not see the same checkpoint to resume from";
        assert_eq!(text.matches(msg).count(), 2, "each rank says why:\n{text}");
        assert!(
            text.contains("step 4 on rank 0; no checkpoint on rank 1")
                && text.contains("put --out on a filesystem that every node shares"),
            "{text}"
        );
        assert_eq!(
            checkpoint_steps(&local0),
            [2, 4],
            "nothing written:\n{text}"
        );

        // `--max-restarts` across nodes, elastic rendezvous: rank 1 dies after step 3;
        // its agent restarts it and opens a new rendezvous round, the other agent
        // restarts its rank for that round without counting a restart (so
        // TORCHELASTIC_RESTART_COUNT differs between the nodes, and cannot name the
        // attempt), and rank 0 of the new round joins late. The job resumes from step
        // 2 and ends with the one-node losses.
        let out = dir.path().join("restarted");
        let (ok, text) = job_env(
            Rendezvous::C10d,
            [&out, &out],
            6,
            &[
                ("PET_MAX_RESTARTS", "1"),
                ("CONMIM_PRETRAIN_CHILD_DIE_FIRST", "1:3"),
                ("CONMIM_PRETRAIN_CHILD_LATE_RANK0_MS", "1500"),
            ],
        );
        assert_eq!(ok, [true, true], "{text}");
        assert!(text.contains("resumed from"), "{text}");
        assert_eq!(
            last_losses(&out),
            want,
            "the restarted two-node job equals the one-node one:\n{text}"
        );
    }

    /// Issue 6: torchrun's own fault tolerance, `--max-restarts`: rank 1 dies after
    /// step 3, torchrun restarts both ranks, and they resume from the step-2 checkpoint
    /// to the losses of an uninterrupted run. The agent's store outlives the workers and
    /// still holds what the dead attempt's group wrote (rank 0's old Gloo address among
    /// it); the restarted rank 0 joins late here, so a rank that took the old keys for
    /// the new ones would fail ("connectFullMesh ... Connection refused": it did, one
    /// restart in three, before each attempt got keys of its own).
    #[test]
    fn issue6_torchrun_max_restarts_restarts_and_resumes() {
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = with_dataset();
        let launch = |out: &Path, env: &[(&str, &str)]| {
            let (ok, text) = two_rank_job(out, 6, env);
            assert!(ok, "{text}");
            text
        };
        let full = dir.path().join("full");
        launch(&full, &[]);
        let want = losses(&full);
        assert_eq!(want.len(), 6);

        let out = dir.path().join("restarted");
        let text = launch(
            &out,
            &[
                ("PET_MAX_RESTARTS", "1"), // = torchrun --max-restarts 1
                ("CONMIM_PRETRAIN_CHILD_DIE_FIRST", "1:3"),
                ("CONMIM_PRETRAIN_CHILD_LATE_RANK0_MS", "1500"),
            ],
        );
        assert!(text.contains("resumed from"), "{text}");
        assert!(
            text.contains("per rank; torchrun restart 1 of at most 1 (this node's count)"),
            "{text}"
        );
        assert_eq!(text.matches("PRETRAIN_OK").count(), 2, "{text}");
        assert_eq!(
            last_losses(&out),
            want,
            "the restarted job equals the uninterrupted one:\n{text}"
        );
    }

    /// Issue 6: a checkpoint resumed with another number of ranks (a job moved to fewer
    /// or more GPUs, an elastic rendezvous back with fewer nodes): the model, optimiser
    /// and schedules continue from the checkpoint's step; the per-rank data positions do
    /// not apply to the new split, so the data goes on with the shards of the epoch
    /// the saved ranks had not read through, split anew (here none was: two shards, each
    /// still in the shuffle buffer), and rank 0 says so. 2 ranks -> 1 process, and 1 -> 2.
    /// (Which shards are left out when some were read through: `Stream::rejoin`'s tests
    /// in tests/stream.rs.)
    #[test]
    fn issue6_resume_with_another_number_of_ranks() {
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = with_dataset(); // 2 shards of 6 samples
        // (epoch, samples read in it) of each saved loader position of the last checkpoint.
        let loader_at = |out: &Path| -> Vec<(u64, u64)> {
            saved_positions(out)
                .iter()
                .map(|l| (l.stream.epoch, l.stream.samples))
                .collect()
        };
        let one = |out: &Path, steps: u64| {
            let mut c = one_process(RANK_CHILD);
            rank_child_env(&mut c, out, steps);
            let o = c.output().unwrap();
            let text = output_text(&o);
            assert!(o.status.success(), "{text}");
            text
        };
        let two = |out: &Path, steps: u64| {
            let (ok, text) = two_rank_job(out, steps, &[]);
            assert!(ok, "{text}");
            text
        };

        // 4 steps of 2 x 2 images: each rank is 2 samples into epoch 1 (6 per rank).
        let out = dir.path().join("two-then-one");
        two(&out, 4);
        assert_eq!(loader_at(&out), [(1, 2), (1, 2)]);
        let text = one(&out, 6);
        assert!(
            text.contains("resumed from") && text.contains("at step 4"),
            "{text}"
        );
        assert!(
            text.contains(
                "the checkpoint is from a run of 2 ranks and this run has 1 process: the \
                 weights, optimiser and schedules resume exactly, but the shards are split \
                 over the ranks differently, so the data goes on with the 2 shards of \
                 epoch 1 that the saved ranks had not finished (0 were done), split anew; \
                 about 4 samples of shards the saved ranks had begun but not finished are \
                 read again; nothing is skipped"
            ),
            "{text}"
        );
        assert!(text.contains("PRETRAIN_OK samples 8"), "{text}");
        assert_eq!(checkpoint_steps(&out).last(), Some(&6));
        // 2 steps of 4 from the start of epoch 1 (12 samples for one process).
        assert_eq!(loader_at(&out), [(1, 8)]);

        // And back: one process 4 steps of 4 (4 samples into epoch 1), then 2 ranks.
        let out = dir.path().join("one-then-two");
        one(&out, 4);
        assert_eq!(loader_at(&out), [(1, 4)]);
        let text = two(&out, 6);
        assert!(
            text.contains("a run of 1 process and this run has 2 ranks")
                && text.contains("goes on with the 2 shards of epoch 1")
                && text.contains("about 4 samples"),
            "{text}"
        );
        assert_eq!(
            text.matches("split anew").count(),
            1,
            "rank 0 alone: {text}"
        );
        assert_eq!(loader_at(&out), [(1, 4), (1, 4)]);
        // The 2-rank step-6 checkpoint resumes exactly with 2 ranks (no notice; each
        // rank goes on from its own position: 2 more steps, 4 more samples each).
        let text = two(&out, 8);
        assert!(!text.contains("split anew"), "{text}");
        assert_eq!(loader_at(&out), [(2, 2), (2, 2)]);

        // torchrun with one rank, then a plain process: the same world size, an exact
        // resume, and the plain run's checkpoint holds its own position (it used to
        // carry the torchrun rank's again, and the next resume went back to it).
        let out = dir.path().join("torchrun-one-then-plain");
        let mut c = torchrun(1, RANK_CHILD);
        rank_child_env(&mut c, &out, 2);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", output_text(&o));
        assert_eq!(loader_at(&out), [(0, 8)]);
        let text = one(&out, 4);
        assert!(!text.contains("split anew"), "{text}");
        assert_eq!(loader_at(&out), [(1, 4)]);
    }

    /// Issue 6: a run resumed with another number of ranks leaves out the shards its
    /// saved ranks had read through. 2 ranks over 8 shards of 4 samples (shuffle buffer
    /// 4) stop 12 samples into their 16; one process goes on with the shards left (rank
    /// 0 names how many were done), and its checkpoint, still in that epoch, carries
    /// them; 2 ranks again go on from it, adding what the one process read through, and
    /// complete the run.
    #[test]
    fn issue6_resume_with_another_number_of_ranks_leaves_out_read_shards() {
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        dataset(&data, &[4; 8]);
        let out = dir.path().join("run");
        let states = || saved_positions(&out);
        let done_in = |text: &str| -> usize {
            let at = text.find(" were done)").unwrap_or_else(|| panic!("{text}"));
            let open = text[..at].rfind('(').unwrap();
            text[open + 1..at].parse().unwrap()
        };
        let (ok, text) = two_rank_job(&out, 6, &[]);
        assert!(ok, "{text}");
        let saved = states();
        assert!(
            saved
                .iter()
                .all(|s| (s.stream.epoch, s.stream.samples) == (0, 12)),
            "{saved:?}"
        );
        assert!(saved.iter().any(|s| s.stream.done > 0), "{saved:?}");

        let mut c = one_process(RANK_CHILD);
        rank_child_env(&mut c, &out, 8);
        let o = c.output().unwrap();
        let text = output_text(&o);
        assert!(o.status.success(), "{text}");
        let done = done_in(&text);
        assert!(done > 0 && text.contains("split anew"), "{text}");
        let one = states();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].stream.epoch, 0, "{one:?}");
        assert_eq!(
            one[0].stream.excluded.as_ref().map(|e| e.len()),
            Some(done),
            "{one:?}"
        );

        let (ok, text) = two_rank_job(&out, 10, &[]);
        assert!(ok, "{text}");
        assert!(done_in(&text) >= done, "{text}");
        assert_completed(&out, 10, 2);
    }

    /// Issue 6, elastic: a job of 1 to 2 nodes (`--nnodes 1:2`, c10d rendezvous,
    /// `--max-restarts 1`) loses a node for good (its agent and rank SIGKILLed, as a
    /// preempted machine; rank 0 or 1, whichever it ran): the surviving node's rank
    /// fails at its next collective, its agent restarts it in a new rendezvous round of
    /// the one node left, and the run resumes from rank 0's last checkpoint as one rank
    /// (the data going on with what is left of its epoch, as rank 0 says) and completes.
    #[test]
    fn issue6_elastic_job_goes_on_when_a_node_is_lost() {
        use crate::train::testing::{Rendezvous, free_port, torchrun_node};
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = with_dataset();
        let out = dir.path().join("elastic");
        let steps = 60;
        let port = free_port();
        let node = || {
            let mut c = torchrun_node("1:2", 0, 1, Rendezvous::C10d, port, RANK_CHILD);
            rank_child_env(&mut c, &out, steps);
            // A round waits 5 s for more nodes once it has one; the agents notice a
            // lost node after 3 missed heartbeats of 1 s (defaults: 30 s, 3 of 5 s).
            c.env(
                "PET_RDZV_CONF",
                "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3",
            )
            .env("PET_MAX_RESTARTS", "1")
            // As the README's elastic recipe (see the test of a node joining).
            .env("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
            .env("CONMIM_PRETRAIN_CHILD_PIDS", "1")
            .spawn()
            .unwrap()
        };
        // The node that stays starts first and so hosts the rendezvous store (the
        // endpoint of `--rdzv-endpoint`: a job cannot outlive that node).
        let stays = node();
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed().as_secs() < 60, "no rendezvous store on {port}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let lost = node();
        // Lose the second node, agent and rank, once the two ranks have saved a
        // checkpoint (under load the first rendezvous round may have started without
        // the second node, and restarted with it).
        let parent = |pid: u32| -> Option<u32> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
        };
        let ranks_saved = || -> Option<usize> {
            let ck = checkpoint::latest(&checkpoint::dir_of(&out)).ok()??;
            Some(checkpoint::read_state(&ck).ok()?.rank_loader_states.len())
        };
        let worker = loop {
            assert!(t0.elapsed().as_secs() < 120, "no 2-rank checkpoint");
            std::thread::sleep(std::time::Duration::from_millis(10));
            if ranks_saved() != Some(2) {
                continue;
            }
            let on_lost = (0..2)
                .filter_map(|r| {
                    std::fs::read_to_string(out.with_extension(format!("rank-{r}.pid"))).ok()
                })
                .filter_map(|p| p.trim().parse::<u32>().ok())
                .find(|&p| parent(p) == Some(lost.id()));
            if let Some(w) = on_lost {
                break w;
            }
        };
        send_signal(lost.id(), "KILL");
        send_signal(worker, "KILL");
        drop(lost.wait_with_output());
        let o = stays.wait_with_output().unwrap();
        let text = output_text(&o);
        assert!(o.status.success(), "{text}");
        assert!(
            text.contains("resumed from")
                && text
                    .contains("the checkpoint is from a run of 2 ranks and this run has 1 process"),
            "{text}"
        );
        assert!(text.contains("PRETRAIN_OK"), "{text}");
        assert_completed(&out, steps, 1);
    }

    /// Issue 6, elastic: a node joins a running `--nnodes 1:2` job. torchrun's agent
    /// stops its rank with SIGTERM to admit the new node; the rank stops after the step
    /// in progress with a checkpoint of it (nothing lost), and both ranks of the new
    /// round resume from it (the data going on with what is left of its epoch, split
    /// over the 2 ranks) and complete the run.
    #[test]
    fn issue6_elastic_job_takes_in_a_node_that_joins() {
        use crate::train::testing::{Rendezvous, free_port, torchrun_node};
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = with_dataset();
        let out = dir.path().join("elastic");
        let steps = 40;
        let port = free_port();
        let node = || {
            let mut c = torchrun_node("1:2", 0, 1, Rendezvous::C10d, port, RANK_CHILD);
            rank_child_env(&mut c, &out, steps);
            // The first node starts alone (a round waits 1 s for more once it has one),
            // with slow steps while alone, so the second one joins mid-run. torch
            // 2.11's agents keep the first round's address of the store they share
            // with the workers, so a node joining a later round waits for keys nobody
            // writes (the job fails after 60 s; seen here): the README's elastic recipe
            // sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a store per round, hosted by
            // rank 0).
            c.env("PET_RDZV_CONF", "last_call_timeout=1")
                .env("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
                .env("CONMIM_PRETRAIN_CHILD_SLOW_ALONE_MS", "500")
                .spawn()
                .unwrap()
        };
        let first = node();
        // Once the one-rank run has saved a checkpoint, the second node comes.
        let t0 = Instant::now();
        while checkpoint_steps(&out).is_empty() {
            assert!(
                t0.elapsed().as_secs() < 120,
                "no checkpoint of the one-rank run"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let second = node();
        let outs: Vec<_> = [first, second]
            .into_iter()
            .map(|n| n.wait_with_output().unwrap())
            .collect();
        let text: String = outs.iter().map(output_text).collect();
        assert!(outs.iter().all(|o| o.status.success()), "{text}");
        // The one-rank attempt stopped on torchrun's SIGTERM with a checkpoint of its
        // last step, the one the two ranks resumed from.
        let stopped = text
            .lines()
            .find(|l| l.contains("stopped by SIGTERM") || l.contains("stopped_by Some"))
            .unwrap_or_else(|| panic!("no graceful stop:\n{text}"));
        assert!(stopped.contains("SIGTERM"), "{stopped}");
        assert!(
            text.contains("the checkpoint is from a run of 1 process and this run has 2 ranks"),
            "{text}"
        );
        assert_eq!(text.matches("PRETRAIN_OK").count(), 3, "{text}");
        assert_completed(&out, steps, 2);
    }

    /// Issue 6: the ranks of a job must run with the same settings. A node with another
    /// config (here rank 1 with another mask ratio) would train differently from the
    /// others, or call its collectives at other steps and hang them until the timeout;
    /// instead both ranks fail at once, rank 1 naming the key and both values. What may
    /// differ between nodes, the loader's thread count, does not count. The same for
    /// the data: ranks that see other shards (another sample count in a node's copy,
    /// no copy at all) would split the epoch inconsistently, or end their epochs at
    /// other steps and hang; a copy at another path is fine.
    #[test]
    fn issue6_ranks_with_other_settings_fail_at_once() {
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = with_dataset();
        let launch = |out: &Path, env: &[(&str, &str)]| two_rank_job(out, 2, env);
        let (ok, text) = launch(
            &dir.path().join("threads"),
            &[("CONMIM_PRETRAIN_CHILD_RANK1_THREADS", "1")],
        );
        assert!(ok, "{text}");
        let t0 = Instant::now();
        let out = dir.path().join("mask");
        let (ok, text) = launch(
            &out,
            &[("CONMIM_PRETRAIN_CHILD_RANK1_SET", "mask_ratio=0.5")],
        );
        assert!(!ok, "{text}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(40), "{text}");
        let want = "conmim pretrain: rank 1 runs with other settings than rank 0 \
                    (config.mask_ratio: rank 0 0.75, this rank 0.5)";
        assert!(text.contains(want), "{text}");
        assert!(
            text.contains("the settings of rank 1 differ from rank 0's"),
            "{text}"
        );
        assert!(checkpoint_steps(&out).is_empty());

        // The data: an identical copy elsewhere is fine (as on a node-local scratch
        // disk); a copy with another sample count in one shard is not, nor is a
        // missing one, and rank 1 names what differs.
        let copy = dir.path().join("copy/of/data");
        std::fs::create_dir_all(&copy).unwrap();
        dataset(&copy, &[6, 6]);
        let (ok, text) = launch(
            &dir.path().join("copy-ok"),
            &[("CONMIM_PRETRAIN_CHILD_RANK1_DATA", copy.to_str().unwrap())],
        );
        assert!(ok, "{text}");
        let other = dir.path().join("other/data");
        std::fs::create_dir_all(&other).unwrap();
        dataset(&other, &[6, 5]);
        let missing = dir.path().join("missing");
        for (d, what) in [
            (&other, "data.samples: rank 0 12, this rank 11"),
            (&missing, "data.error: rank 0 null, this rank \""),
        ] {
            let out = dir
                .path()
                .join(format!("bad-{}", d.file_name().unwrap().display()));
            let t0 = Instant::now();
            let (ok, text) = launch(
                &out,
                &[("CONMIM_PRETRAIN_CHILD_RANK1_DATA", d.to_str().unwrap())],
            );
            assert!(!ok, "{text}");
            assert!(t0.elapsed() < std::time::Duration::from_secs(40), "{text}");
            assert!(
                text.contains("rank 1 runs with other settings than rank 0")
                    && text.contains(what)
                    && text.contains("the data must name the same shards"),
                "{text}"
            );
            assert!(checkpoint_steps(&out).is_empty());
        }
    }

    /// Issue 6: under torchrun, one process takes the distributed path too (a process
    /// group of one: DDP's reducer, metrics reduced over the group; what the GPU check
    /// runs on NCCL to measure the path's cost), and trains exactly as the plain
    /// single process does.
    #[test]
    fn issue6_torchrun_world_one_takes_the_distributed_path() {
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        dataset(&data, &[6, 6]);
        let run = |out: &Path, under_torchrun: bool| -> String {
            let mut c = if under_torchrun {
                torchrun(1, RANK_CHILD)
            } else {
                let mut c = std::process::Command::new(std::env::current_exe().unwrap());
                c.args([RANK_CHILD, "--exact", "--nocapture"]);
                c
            };
            for k in ["WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"] {
                c.env_remove(k);
            }
            let o = c
                .env("CONMIM_PRETRAIN_CHILD_OUT", out)
                .env("CONMIM_DIST_TIMEOUT_S", "120")
                .env("OMP_NUM_THREADS", "1")
                .output()
                .unwrap();
            let text = output_text(&o);
            assert!(o.status.success() && text.contains("PRETRAIN_OK"), "{text}");
            text
        };
        let plain = dir.path().join("plain");
        let text = run(&plain, false);
        assert!(!text.contains("data parallel"), "{text}");
        let one = dir.path().join("one");
        let text = run(&one, true);
        assert!(
            text.contains("data parallel over 1 rank (gloo), global batch 4 = 4 per rank"),
            "{text}"
        );
        assert_eq!(losses(&one), losses(&plain), "{text}");
    }

    /// Issue 6 with issue 4's graceful stop: a SIGTERM to one rank of a torchrun job
    /// (say, one node preempted first) stops every rank after the same step; rank 0
    /// saves one checkpoint holding both ranks' loader positions, both exit cleanly,
    /// and `--resume auto` under torchrun ends with the uninterrupted run's losses.
    #[test]
    fn issue6_sigterm_to_one_rank_stops_every_rank_at_one_checkpoint() {
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        dataset(&data, &[6, 6]);
        let launch = |out: &Path| {
            let mut c = torchrun(2, RANK_CHILD);
            c.env("CONMIM_PRETRAIN_CHILD_OUT", out)
                .env("CONMIM_PRETRAIN_CHILD_STEPS", "12")
                .env("CONMIM_PRETRAIN_CHILD_SAVE_EVERY", "100")
                .env("CONMIM_PRETRAIN_CHILD_PIDS", "1")
                .env("CONMIM_DIST_TIMEOUT_S", "120")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        };
        let finish = |c: std::process::Child| {
            let o = c.wait_with_output().unwrap();
            let text = output_text(&o);
            assert!(o.status.success(), "{text}");
            text
        };
        let full = dir.path().join("full");
        let text = finish(launch(&full));
        assert_eq!(text.matches("stopped_by None").count(), 2, "{text}");
        let want = losses(&full);
        assert_eq!(want.len(), 12);

        let out = dir.path().join("stopped");
        let c = launch(&out);
        let pid1 = out.with_extension("rank-1.pid");
        while metric_lines(&out) < 2 || !pid1.exists() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let pid: u32 = std::fs::read_to_string(&pid1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        send_signal(pid, "TERM");
        let text = finish(c);
        assert_eq!(
            text.matches("stopped_by Some(\"SIGTERM\")").count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches("stopped_by Some(\"SIGTERM (on another rank)\")")
                .count(),
            1,
            "{text}"
        );
        let steps = checkpoint_steps(&out);
        assert!(
            steps.len() == 1 && (2..12).contains(&steps[0]),
            "{steps:?}\n{text}"
        );
        let text = finish(launch(&out));
        assert!(text.contains("resumed from"), "{text}");
        assert_eq!(losses(&out), want, "{text}");
    }

    /// A corrupt sample is skipped, counted and named in the summary; with
    /// `max_errors = 0` the run stops with an error naming it.
    #[test]
    fn issue3_pretrain_reports_and_caps_corrupt_samples() {
        let _rng = seeded(9);
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        crate::testkit::write_sharded(&data, "train", &[6, 6], |i, j| {
            let key = format!("s{i}_{j}");
            let jpg = if key == "s1_4" {
                b"\xff\xd8\xff\xe0 not a jpeg at all".to_vec()
            } else {
                crate::testkit::jpeg(&crate::testkit::JpegSpec::rgb(40, 36, (i * 100) as u64 + j))
            };
            (
                key,
                vec![("jpg".to_owned(), jpg), ("cls".to_owned(), b"1".to_vec())],
            )
        })
        .unwrap();
        // 3 steps of 4: epoch 0 (11 good samples, 2 batches) is passed completely.
        let mut o = opts(&data, &dir.path().join("run"));
        o.steps = Some(3);
        o.resume = Resume::No;
        let s = pretrain(&o).unwrap();
        // Once per epoch the loader passed (it reads ahead of the steps: 1 to 3).
        assert!(s.skipped_samples >= 1, "{s:?}");
        assert_eq!(s.errors.len() as u64, s.skipped_samples);
        assert_eq!(s.errors[0].epoch, 0);
        assert_eq!(s.shard_errors, 0);
        assert_eq!(s.errors[0].key, "s1_4", "{s:?}");
        assert!(s.errors[0].shard.ends_with("train-000001.tar"), "{s:?}");
        let json = std::fs::read_to_string(dir.path().join("run/summary.json")).unwrap();
        assert!(
            json.contains("\"skipped_samples\"") && json.contains("s1_4"),
            "{json}"
        );

        let mut o = opts(&data, &dir.path().join("capped"));
        o.steps = Some(3);
        o.resume = Resume::No;
        o.sets.push("max_errors=0".into());
        let err = format!(
            "{:#}",
            pretrain(&o).expect_err("max_errors=0 must stop the run")
        );
        assert!(err.contains("s1_4"), "{err}");
    }

    /// `--resume PATH` from an older checkpoint of a run directory that holds later ones
    /// (a roll-back) is refused before anything is written: the resumed run would prune
    /// or mix with them, and `--resume auto` would later go back to them. With them
    /// moved away it resumes.
    #[test]
    fn issue4_resume_from_an_older_checkpoint_next_to_later_ones_is_refused() {
        let _rng = seeded(9);
        let dir = with_dataset();
        let data = dir.path().join("data");
        let out = dir.path().join("run");
        let mut o = opts(&data, &out);
        o.keep = 3;
        pretrain(&o).unwrap();
        let ck = checkpoint::dir_of(&out);
        let steps = |ck: &Path| -> Vec<u64> {
            checkpoint::list(ck)
                .unwrap()
                .into_iter()
                .map(|(s, _)| s)
                .collect()
        };
        assert_eq!(steps(&ck), [2, 4, 6]);
        o.resume = Resume::Path(ck.join("step-00000002"));
        let e = format!("{:#}", pretrain(&o).unwrap_err());
        assert!(
            e.contains("is at step 2")
                && e.contains("later checkpoints")
                && e.contains("step-00000006"),
            "{e}"
        );
        assert_eq!(steps(&ck), [2, 4, 6], "nothing touched");
        let aside = dir.path().join("abandoned");
        std::fs::create_dir(&aside).unwrap();
        for s in ["step-00000004", "step-00000006"] {
            std::fs::rename(ck.join(s), aside.join(s)).unwrap();
        }
        let s = pretrain(&o).unwrap();
        assert_eq!((s.start_step, s.steps), (2, 4));
        assert_eq!(steps(&ck), [2, 4, 6]);
    }

    /// One run writes a run directory at a time: a second run on it (a requeued job
    /// while the first still runs) fails before touching it, naming the holder; once
    /// the first ends (its lock goes with its process), the directory is free again.
    #[test]
    fn a_run_directory_is_written_by_one_run_at_a_time() {
        let _rng = seeded(9);
        let dir = with_dataset();
        let data = dir.path().join("data");
        let out = dir.path().join("run");
        std::fs::create_dir_all(checkpoint::dir_of(&out)).unwrap();
        // An unfinished save of the first run, which a second run must not clean up.
        let debris = checkpoint::dir_of(&out).join(".tmp-step-00000002-1");
        std::fs::create_dir(&debris).unwrap();
        let first = lock_run_dir("pretrain", &out, None).unwrap();
        let e = format!("{:#}", pretrain(&opts(&data, &out)).unwrap_err());
        assert!(
            e.contains("is being written by another run")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        assert!(
            debris.exists(),
            "the second run touched the first one's files"
        );
        drop(first);
        let s = pretrain(&opts(&data, &out)).unwrap();
        assert_eq!(s.steps, 6);
        assert!(!debris.exists(), "recovered once the directory was free");
    }

    /// Resuming with another length or lr is allowed but said; the thread count, the
    /// error budget and how the length was given (epochs) are not worth a note.
    #[test]
    fn a_resume_with_another_config_says_what_changed() {
        let saved = PretrainConfig::preset("small").unwrap();
        let mut now = saved.clone();
        (now.data_threads, now.max_errors, now.epochs) = (7, Some(3), Some(300.0));
        assert_eq!(config_changes_note(&saved, &now).unwrap(), None);
        (now.total_steps, now.lr) = (2000, 1e-3);
        let note = config_changes_note(&saved, &now).unwrap().unwrap();
        assert!(
            note.contains("lr: checkpoint 0.0005, this run 0.001")
                && note.contains("total_steps: checkpoint 1000, this run 2000"),
            "{note}"
        );
        // A checkpoint from before teacher drop path existed: its teacher ran without, and
        // a resume with today's default says so.
        let mut old = serde_json::to_value(&saved).unwrap();
        old.as_object_mut().unwrap().remove("teacher_drop_path");
        let old: PretrainConfig = serde_json::from_value(old).unwrap();
        assert!(!old.teacher_drop_path && saved.teacher_drop_path);
        let note = config_changes_note(&old, &saved).unwrap().unwrap();
        assert!(
            note.contains("teacher_drop_path: checkpoint false, this run true"),
            "{note}"
        );
    }

    /// `--epochs` (or `epochs` in a config) sets the run's length from the manifest's
    /// sample count; `--steps` wins over a config's epochs; data without sample counts
    /// is an error that says to give steps.
    #[test]
    fn issue4_epochs_set_the_run_length_from_the_manifest() {
        let _rng = seeded(9);
        let dir = with_dataset();
        let data = dir.path().join("data");
        // 12 samples, batch 4: 2 epochs are 6 steps.
        let mut o = opts(&data, &dir.path().join("epochs"));
        (o.steps, o.epochs, o.save_every) = (None, Some(2.0), 100);
        let s = pretrain(&o).unwrap();
        assert_eq!((s.steps, s.total_steps), (6, 6));
        let cfg: PretrainConfig =
            serde_json::from_slice(&std::fs::read(dir.path().join("epochs/config.json")).unwrap())
                .unwrap();
        assert_eq!((cfg.epochs, cfg.total_steps), (Some(2.0), 6));
        // Flags over the config: --steps clears a config's epochs.
        let mut o = opts(&data, &dir.path().join("unused"));
        o.sets.push("epochs=2".into());
        assert_eq!(build_config(&o).unwrap().epochs, None);
        o.steps = None;
        assert_eq!(build_config(&o).unwrap().epochs, Some(2.0));
        // So does a later override that gives total_steps without epochs.
        o.sets.push("total_steps=5".into());
        let c = build_config(&o).unwrap();
        assert_eq!((c.epochs, c.total_steps), (None, 5));
        o.sets.push("epochs=3".into());
        assert_eq!(build_config(&o).unwrap().epochs, Some(3.0));
        o.sets = vec!["total_steps=5".into(), "epochs=2".into()];
        assert_eq!(build_config(&o).unwrap().epochs, Some(2.0));
        // A list of shard files has no sample counts.
        let mut o = opts(&data, &dir.path().join("list"));
        (o.steps, o.epochs) = (None, Some(2.0));
        o.data = format!("{}/train-{{000000..000001}}.tar", data.display());
        let e = format!("{:#}", pretrain(&o).unwrap_err());
        assert!(
            e.contains("needs the number of training samples") && e.contains("--steps"),
            "{e}"
        );
        assert!(
            !dir.path().join("list").exists(),
            "nothing written before the error"
        );
    }

    #[test]
    fn pretrain_runs_resumes_and_rejects_bad_input() {
        let _rng = seeded(9);
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        dataset(&data, &[6, 6]);

        // Whole run.
        let full = dir.path().join("full");
        let s = pretrain(&opts(&data, &full)).unwrap();
        assert_eq!((s.steps, s.total_steps), (6, 6));
        let want = losses(&full);
        assert_eq!(want.len(), 6);
        let cks = checkpoint_steps(&full);
        assert_eq!(cks, vec![4, 6]);
        // TensorBoard: one event file, the same losses as metrics.jsonl.
        let tb = crate::train::tensorboard::read::event_files(&full.join("tb"));
        assert_eq!(tb.len(), 1, "{tb:?}");
        let ev = crate::train::tensorboard::read::events(&tb[0]);
        assert_eq!(ev[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!((ev[1].step, ev[1].session_status), (0, Some(1)));
        let tb_losses: Vec<(u64, f32)> = ev[2..]
            .iter()
            .map(|e| {
                let tags: Vec<&str> = e.scalars.iter().map(|(t, _)| t.as_str()).collect();
                assert_eq!(
                    tags,
                    [
                        "train/loss",
                        "train/accuracy",
                        "train/lr",
                        "train/momentum",
                        "train/grad_norm",
                        "train/img_s",
                        "train/data_wait_frac"
                    ]
                );
                (e.step, e.scalars[0].1)
            })
            .collect();
        let want_f32: Vec<(u64, f32)> = want.iter().map(|&(s, l)| (s, l as f32)).collect();
        assert_eq!(tb_losses, want_f32);

        // 4 steps, then a run to 6 with --resume auto (as after a kill).
        let part = dir.path().join("part");
        let mut o = opts(&data, &part);
        o.steps = Some(6);
        o.save_every = 4;
        // Simulate a kill after step 5: run to 6 but keep only the step-4 checkpoint
        // and pretend steps 4 and 5 were logged before the crash.
        pretrain(&o).unwrap();
        std::fs::remove_dir_all(checkpoint::dir_of(&part).join("step-00000006")).unwrap();
        // The restart streams a copy of the data staged elsewhere (issue 6: a per-job
        // scratch directory): the same shards resume.
        let staged = dir.path().join("scratch/job2/data");
        std::fs::create_dir_all(&staged).unwrap();
        for f in std::fs::read_dir(&data).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, staged.join(f.file_name().unwrap())).unwrap();
        }
        o.data = staged.to_str().unwrap().into();
        let s2 = pretrain(&o).unwrap();
        assert_eq!(s2.start_step, 4);
        // The resumed invocation: a second event file, starting a session at step 4.
        let tb = crate::train::tensorboard::read::event_files(&part.join("tb"));
        assert_eq!(tb.len(), 2, "{tb:?}");
        let resumed = tb
            .iter()
            .map(|p| crate::train::tensorboard::read::events(p))
            .find(|ev| ev[1].step == 4)
            .expect("an event file of the resumed run");
        assert_eq!(resumed[1].session_status, Some(1));
        assert_eq!(
            resumed[2..].iter().map(|e| e.step).collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(
            losses(&part),
            want,
            "resumed metrics equal the uninterrupted run"
        );

        // Bad input.
        let mut bad = opts(&data, &full);
        bad.preset = "huge".into();
        assert!(format!("{:#}", pretrain(&bad).unwrap_err()).contains("unknown preset"));
        let mut bad = opts(&data, &full);
        bad.sets.push("model.depht=3".into());
        assert!(format!("{:#}", pretrain(&bad).unwrap_err()).contains("unknown config key"));
        let mut bad = opts(&data, &full);
        bad.resume = Resume::No;
        assert!(format!("{:#}", pretrain(&bad).unwrap_err()).contains("already holds"));
        // Checkpoint of another model: clear error, the checkpoint is untouched.
        let before =
            std::fs::read(checkpoint::dir_of(&full).join("step-00000006/model.safetensors"))
                .unwrap();
        let mut bad = opts(&data, &full);
        bad.sets.push("model.depth=3".into());
        let e = format!("{:#}", pretrain(&bad).unwrap_err());
        assert!(e.contains("another model"), "{e}");
        let after =
            std::fs::read(checkpoint::dir_of(&full).join("step-00000006/model.safetensors"))
                .unwrap();
        assert_eq!(before, after);
        // A k-NN monitor dataset that does not open fails at the start, not at the
        // first checkpoint; so does a k of 0.
        let mut bad = opts(&data, &dir.path().join("knn"));
        let monitor = KnnMonitor {
            train: data.to_str().unwrap().into(),
            train_split: "train".into(),
            val: dir.path().join("no-such-data").to_str().unwrap().into(),
            val_split: "val".into(),
            k: 20,
            temperature: 0.07,
        };
        bad.knn = Some(monitor.clone());
        let e = format!("{:#}", pretrain(&bad).unwrap_err());
        assert!(
            e.contains("--knn-val-data") && e.contains("no-such-data"),
            "{e}"
        );
        bad.knn = Some(KnnMonitor {
            k: 0,
            val: monitor.train.clone(),
            ..monitor
        });
        let e = format!("{:#}", pretrain(&bad).unwrap_err());
        assert!(e.contains("k must be >= 1"), "{e}");
        assert!(!dir.path().join("knn").exists(), "nothing written");
        // Unwritable output.
        let mut bad = opts(&data, &full);
        bad.out = PathBuf::from("/proc/conmim-no-such-dir");
        let e = format!("{:#}", pretrain(&bad).unwrap_err());
        assert!(e.contains("output directory"), "{e}");
        // NaN loss (an absurd learning rate makes the weights overflow).
        let mut bad = opts(&data, &dir.path().join("nan"));
        bad.lr = Some(1e30);
        bad.sets.push("clip_grad=null".into());
        bad.sets.push("optim.weight_decay=0.0".into());
        match pretrain(&bad) {
            Err(e) => assert!(format!("{e:#}").contains("loss is"), "{e:#}"),
            Ok(s) => eprintln!("NOTICE: lr 1e30 did not produce a NaN loss: {s:?}"),
        }
    }
}
