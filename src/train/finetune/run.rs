//! `conmim finetune`, `conmim eval` and `conmim knn`.
//!
//! Fine-tuning run directory `OUT`:
//!
//! ```text
//! OUT/config.json          the effective FinetuneConfig
//! OUT/init.json            what the initialisation loaded, left new and ignored
//! OUT/metrics.jsonl        {"step",...,"loss","lr","grad_norm","img_s"} per step and
//!                          {"epoch","step","acc1","acc5","val_loss","val_images"} per eval
//! OUT/tb/events.out.tfevents.*   the same as TensorBoard scalars (train/*, val/*)
//! OUT/checkpoints/last/    after every epoch; OUT/checkpoints/best/ (highest top-1)
//! OUT/summary.json         at the end
//! ```
//!
//! An "epoch" is `floor(train samples / batch)` steps (the sample count comes from the
//! dataset's manifest); the schedule (linear warmup over `warmup_epochs`, then cosine to
//! `min_lr`, per step) is sized from it. The training stream is endless and reshuffled
//! every pass.
//!
//! Evaluation reads the validation set exactly once: no shard or sample shuffle, every
//! shard (no remainder dropped), the last short batch kept, and a sample that fails to
//! decode is an error (it would silently change the denominator). Keys are checked to be
//! unique and, when the manifest knows the sample count, the number evaluated must match
//! it. A label outside `[0, num_classes)` is an error naming the key.
//!
//! Under torchrun (any WORLD_SIZE; outside it, WORLD_SIZE > 1): `--batch` is global and
//! split per rank, every rank starts from rank 0's weights, gradients are averaged (DDP's
//! bucketed reducer, as in pretraining), the logged loss is the mean over ranks,
//! training shards are split by rank (the stream's epoch rules), each rank evaluates its
//! own validation shards (every shard exactly once) and the counts are summed; rank 0
//! writes the run directory.
//!
//! Resume: `checkpoints/last` holds the optimiser moments and every rank's loader
//! position at the end of each epoch, or of the step a SIGTERM / Ctrl-C stopped the run
//! at ([`crate::train::signals`]); `--resume auto` continues from it exactly.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::config::FinetuneConfig;
use super::layer_decay::param_groups_of;
use super::model::{self, Classifier, FINETUNE_KIND, FinetuneState, InitReport, ResumeState};
use crate::loader::{Loader, LoaderConfig, Task, default_threads_per_process};
use crate::stream::{Remainder, ShardList, SourceOptions, StreamConfig};
use crate::train::dist::ProcessGroup;
use crate::train::export::Weights;
use crate::train::mixup::{self, MixupConfig, soft_target_cross_entropy};
use crate::train::optim::{AdamW, GroupSpec};
use crate::train::run::{Resume, check_writable, group_and_device, parse_set, truncate_metrics_by};
use crate::train::schedule::CosineSchedule;
use crate::train::tensorboard::EventWriter;
use crate::train::vit::Config;

/// Everything `conmim finetune` takes.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    pub preset: String,
    pub config_file: Option<PathBuf>,
    pub sets: Vec<String>,
    pub data: String,
    pub train_split: String,
    /// Validation data (default: `data`) and split.
    pub val_data: Option<String>,
    pub val_split: String,
    pub allow_pipe: bool,
    /// Retries and timeouts of http(s) sources.
    pub http: crate::stream::HttpOptions,
    /// Pretrained weights (run / checkpoint directory, or .safetensors); `None`: random
    /// initialisation (the baseline).
    pub init: Option<PathBuf>,
    pub init_weights: Weights,
    pub out: PathBuf,
    pub epochs: Option<u32>,
    pub batch: Option<usize>,
    /// Peak lr for a batch of 1024.
    pub lr: Option<f64>,
    pub num_classes: Option<i64>,
    pub image_size: Option<i64>,
    pub seed: Option<u64>,
    pub threads: Option<usize>,
    pub device: Option<String>,
    /// Evaluate every this many epochs (and always after the last).
    pub eval_every: u32,
    pub progress: bool,
    /// Continue from `OUT/checkpoints/last` (written at the end of every epoch) or a
    /// given checkpoint; [`Resume::No`] refuses an OUT that already holds one.
    pub resume: Resume,
    /// Stop cleanly after this epoch (its checkpoint written), as a preemptible job
    /// would; `--resume auto` continues the run. `None`: run every epoch.
    pub stop_after_epoch: Option<u32>,
}

/// Top-1 / top-5 of one evaluation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    pub images: u64,
    pub acc1: f64,
    pub acc5: f64,
    pub loss: f64,
}

/// The final summary of `conmim finetune`.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneSummary {
    pub preset: String,
    pub device: String,
    pub init: Option<PathBuf>,
    pub epochs: u32,
    pub steps: u64,
    pub steps_per_epoch: u64,
    pub samples: u64,
    pub wall_s: f64,
    pub img_s: f64,
    pub final_loss: Option<f64>,
    pub last: Option<EvalResult>,
    pub best: Option<EvalResult>,
    pub best_epoch: Option<u32>,
    /// Epochs completed (fewer than `epochs` after `stop_after_epoch`).
    pub epochs_done: u32,
    /// The step this invocation started from (0, or the resumed checkpoint's).
    pub resumed_at_step: u64,
    /// `checkpoints/best`, or `checkpoints/last` when no evaluation wrote a `best`.
    pub checkpoint: PathBuf,
    /// The run stopped early on this signal, after a resumable `checkpoints/last` of its
    /// last step: "SIGTERM", "SIGINT", or "SIGTERM (on another rank)".
    pub stopped_by: Option<String>,
    /// Corrupt training samples this process's loader skipped in this invocation
    /// (counted; the first ones named in `errors`). The config's `max_errors` bounds it.
    pub skipped_samples: u64,
    /// Training shards that failed (unreadable, damaged, unreachable).
    pub shard_errors: u64,
    /// The first skipped samples and failed shards (shard, key, message).
    pub errors: Vec<crate::loader::FailedItem>,
}

/// The effective config: preset, file, `--set`s, flags.
pub fn build_config(o: &FinetuneOptions) -> Result<FinetuneConfig> {
    let cfg = FinetuneConfig::preset(&o.preset)?;
    let mut all = Vec::new();
    if let Some(f) = &o.config_file {
        all.push((
            format!("config {}", f.display()),
            crate::train::pretrain_config::PretrainConfig::read_overrides(f)?,
        ));
    }
    for s in &o.sets {
        all.push((format!("--set {s}"), parse_set(s)?));
    }
    let mut flags = serde_json::Map::new();
    let mut model = serde_json::Map::new();
    if let Some(e) = o.epochs {
        flags.insert("epochs".into(), e.into());
        // Shortened runs keep the preset's proportion of warmup, unless a config file or
        // --set names warmup_epochs.
        let named = all.iter().any(|(_, v)| v.get("warmup_epochs").is_some());
        if !named && cfg.warmup_epochs > e {
            let w = (cfg.warmup_epochs as f64 * e as f64 / cfg.epochs as f64).round() as u32;
            flags.insert("warmup_epochs".into(), w.min(e).into());
        }
    }
    if let Some(b) = o.batch {
        flags.insert("batch_size".into(), b.into());
    }
    if let Some(lr) = o.lr {
        flags.insert("lr".into(), lr.into());
    }
    if let Some(s) = o.seed {
        flags.insert("seed".into(), s.into());
    }
    if let Some(t) = o.threads {
        flags.insert("data_threads".into(), t.into());
    }
    if let Some(n) = o.num_classes {
        model.insert("num_classes".into(), n.into());
    }
    if let Some(s) = o.image_size {
        model.insert("image_size".into(), s.into());
        // The official evaluation resize for that size, unless a layer names one.
        if !all.iter().any(|(_, v)| v.get("eval_resize").is_some()) {
            flags.insert("eval_resize".into(), official_eval_resize(s).into());
        }
    }
    if !model.is_empty() {
        flags.insert("model".into(), serde_json::Value::Object(model));
    }
    all.push(("flags".to_owned(), serde_json::Value::Object(flags)));
    cfg.with_all_overrides(&all)
}

/// The evaluation resize the official (BEiT) fine-tuning code uses at `image_size`:
/// `int(image_size / crop_pct)` with `crop_pct` 224/256 below 384 px and 1 from 384 px
/// on (256 at 224, no crop at 384).
pub fn official_eval_resize(image_size: i64) -> i64 {
    if image_size >= 384 {
        image_size
    } else {
        (image_size as f64 / (224.0 / 256.0)) as i64
    }
}

fn threads(n: usize) -> usize {
    if n == 0 {
        default_threads_per_process()
    } else {
        n
    }
}

/// The training loader config of `cfg`.
pub fn train_loader_config(cfg: &FinetuneConfig) -> LoaderConfig {
    LoaderConfig {
        stream: StreamConfig {
            seed: cfg.seed,
            shuffle_buffer: cfg.shuffle_buffer,
            epochs: None,
            ..Default::default()
        },
        threads: threads(cfg.data_threads),
        batch_size: cfg.batch_size,
        drop_last: true,
        image_size: cfg.model.image_size as u32,
        task: Task::ClassifyTrain,
        rand_augment: cfg.rand_augment.clone(),
        color_jitter: cfg.color_jitter,
        reprob: cfg.reprob,
        max_errors: cfg.max_errors,
        ..Default::default()
    }
}

/// The exact-once evaluation loader config (see the module docs).
pub fn eval_loader_config(
    image_size: u32,
    eval_resize: u32,
    batch: usize,
    threads_: usize,
) -> LoaderConfig {
    LoaderConfig {
        stream: StreamConfig {
            shuffle_shards: false,
            shuffle_buffer: 0,
            remainder: Remainder::Keep,
            equalize_samples: false,
            epochs: Some(1),
            ..Default::default()
        },
        threads: threads(threads_),
        batch_size: batch,
        drop_last: false,
        image_size,
        task: Task::ClassifyEval,
        eval_resize,
        max_errors: Some(0),
        ..Default::default()
    }
}

/// Checks the labels of a batch against the head.
fn check_labels(labels: &[i64], keys: &[String], classes: i64, what: &str) -> Result<()> {
    if let Some(i) = labels.iter().position(|&l| l < 0 || l >= classes) {
        bail!(
            "{what} sample `{}` has label {}, outside the head's 0..{classes} (set \
             --num-classes / model.num_classes to the dataset's class count)",
            keys[i],
            labels[i]
        );
    }
    Ok(())
}

/// Evaluates `net` over `data` exactly once (see the module docs): top-1, top-5, mean
/// cross-entropy. `show` draws a progress bar.
pub fn evaluate(
    net: &Classifier,
    data: &str,
    opts: &SourceOptions,
    eval_resize: u32,
    batch: usize,
    threads_: usize,
    show: bool,
) -> Result<EvalResult> {
    evaluate_dist(net, data, opts, eval_resize, batch, threads_, show, None)
}

/// [`evaluate`] over the ranks of `pg`: each rank reads its own shards (every shard
/// read by exactly one rank, `Remainder::Keep`), then the counts are summed.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_dist(
    net: &Classifier,
    data: &str,
    opts: &SourceOptions,
    eval_resize: u32,
    batch: usize,
    threads_: usize,
    show: bool,
    pg: Option<&ProcessGroup>,
) -> Result<EvalResult> {
    let device = net.vs.device();
    let amp = device.is_cuda();
    let expected = ShardList::resolve(data, opts)
        .with_context(|| format!("opening {data}"))?
        .total_samples();
    let mut cfg = eval_loader_config(net.cfg.image_size as u32, eval_resize, batch, threads_);
    if let Some(pg) = pg {
        cfg.stream.rank = pg.rank;
        cfg.stream.world_size = pg.world_size;
    }
    let loader = Loader::open(data, opts, cfg).with_context(|| format!("opening {data}"))?;
    let pb = if show {
        ProgressBar::new(expected.unwrap_or(0))
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("eval {elapsed_precise} [{wide_bar}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let classes = net.cfg.num_classes;
    let k5 = classes.min(5);
    let (mut n, mut c1, mut c5, mut loss_sum) = (0u64, 0f64, 0f64, 0f64);
    let mut seen: HashSet<String> = HashSet::new();
    tch::no_grad(|| -> Result<()> {
        for batch in loader {
            let batch = batch.context("reading the validation set")?;
            let b = batch.len();
            check_labels(batch.labels(), batch.keys(), classes, "validation")?;
            for k in batch.keys() {
                if !seen.insert(k.clone()) {
                    bail!("validation sample `{k}` came twice: the set must hold unique keys");
                }
            }
            let s = batch.image_size() as i64;
            let host = Tensor::from_slice(batch.weak()).view([b as i64, s, s, 3]);
            let x = crate::train::cuda::upload(&host, device)?;
            let labels = Tensor::from_slice(batch.labels()).to_device(device);
            let logits = net.logits_u8(&x, false, amp)?;
            let (_, top) = logits.topk(k5, 1, true, true);
            let hit = top.eq_tensor(&labels.unsqueeze(1));
            let parts = Tensor::stack(
                &[
                    hit.narrow(1, 0, 1).sum(Kind::Double),
                    hit.sum(Kind::Double),
                    logits
                        .cross_entropy_for_logits(&labels)
                        .to_kind(Kind::Double)
                        * b as f64,
                ],
                0,
            )
            .to_device(Device::Cpu);
            let v = Vec::<f64>::try_from(&parts)?;
            c1 += v[0];
            c5 += v[1];
            loss_sum += v[2];
            n += b as u64;
            pb.set_position(n);
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    if let Some(pg) = pg {
        let t = Tensor::from_slice(&[c1, c5, loss_sum, n as f64]);
        pg.all_reduce_sum(&t)
            .context("summing the evaluation over ranks")?;
        let v = Vec::<f64>::try_from(&t)?;
        (c1, c5, loss_sum, n) = (v[0], v[1], v[2], v[3] as u64);
    }
    if n == 0 {
        bail!("{data}: the validation set has no samples");
    }
    if let Some(e) = expected
        && e != n
    {
        bail!("{data}: evaluated {n} samples, the manifest lists {e}");
    }
    Ok(EvalResult {
        images: n,
        acc1: 100.0 * c1 / n as f64,
        acc5: 100.0 * c5 / n as f64,
        loss: loss_sum / n as f64,
    })
}

/// Partial fine-tuning: only the last `k` blocks and what sits above them (final
/// norm / fc_norm, head) train; the patch embedding, tokens, position terms and the
/// first `depth - k` blocks are frozen (no gradient, not in the optimiser).
pub fn freeze_all_but_last(net: &Classifier, k: i64) {
    let depth = net.cfg.depth;
    let first_trained = super::layer_decay::top_layer(depth) - k.clamp(0, depth) as usize;
    for (name, t) in net.vs.variables() {
        if super::layer_decay::layer_id(&name, depth) < first_trained && t.requires_grad() {
            // In place: the module holds the same tensor.
            let _ = t.set_requires_grad(false);
        }
    }
}

/// AdamW over the layer-decay groups of `net` (the spec's fine-tuning optimiser).
pub fn optimizer(net: &Classifier, cfg: &FinetuneConfig) -> Result<AdamW> {
    let groups = param_groups_of(
        &net.vs,
        net.cfg.depth,
        cfg.layer_decay,
        cfg.optim.weight_decay,
    )?;
    let vars = net.vs.variables();
    let specs = groups
        .iter()
        .map(|g| GroupSpec {
            name: g.name(),
            weight_decay: g.weight_decay,
            lr_scale: g.lr_scale,
            vars: g
                .names
                .iter()
                .map(|n| (n.clone(), vars[n].shallow_clone()))
                .collect(),
        })
        .collect();
    Ok(AdamW::with_groups(cfg.optim, specs)?)
}

#[derive(Serialize)]
struct TrainLine {
    step: u64,
    epoch: u32,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    img_s: f64,
}

#[derive(Serialize)]
struct EvalLine {
    epoch: u32,
    step: u64,
    acc1: f64,
    acc5: f64,
    val_loss: f64,
    val_images: u64,
}

/// Restores weights, optimiser moments and step from resumable checkpoint `dir`
/// (a `checkpoints/last`) into `net` / `opt`, and returns the run position saved with
/// it. The checkpoint must come from the same config: the schedules, the data order
/// and the optimiser layout all depend on it.
fn resume(
    dir: &Path,
    net: &Classifier,
    opt: &mut AdamW,
    cfg: &FinetuneConfig,
    net_cfg: &Config,
    device: Device,
) -> Result<ResumeState> {
    let state = model::read_state(dir)?;
    // The loader thread count changes no batch (a restart on another machine may pass
    // another --threads), nor does the error budget; everything else must be the
    // checkpoint's.
    let comparable = |c: &FinetuneConfig| {
        let mut v = serde_json::to_value(c)?;
        v["data_threads"] = serde_json::Value::Null;
        v["max_errors"] = serde_json::Value::Null;
        anyhow::Ok(v)
    };
    let (saved, now) = (comparable(&state.config)?, comparable(cfg)?);
    if saved != now {
        let differ = crate::train::run::json_differences(&saved, &now, "checkpoint", "this run");
        bail!(
            "the checkpoint was written with another config ({}); resume with the same \
             preset, --set and flags",
            differ.join("; ")
        );
    }
    if &state.net != net_cfg {
        bail!("the checkpoint's network differs from this run's");
    }
    let r = state.resume.clone().context(
        "the checkpoint holds no resume data (a `best` checkpoint, or one written before \
         conmim could resume fine-tuning): resume from checkpoints/last",
    )?;
    if r.optimizer_layout != opt.layout() {
        bail!("the checkpoint's optimiser layout differs from this run's");
    }
    model::load_weights(net, dir)?;
    let file = dir.join(crate::train::checkpoint::OPTIMIZER_FILE);
    let t = crate::train::checkpoint::read_optimizer(&file, device)?;
    opt.load_state(&t, state.step)?;
    Ok(r)
}

/// The evaluation's metrics keys and TensorBoard tags.
const VAL_SCALARS: [(&str, &str); 3] = [
    ("acc1", "val/acc1"),
    ("acc5", "val/acc5"),
    ("val_loss", "val/loss"),
];

/// Runs `conmim finetune`.
pub fn finetune(o: &FinetuneOptions) -> Result<FinetuneSummary> {
    let cfg = build_config(o)?;
    // Data parallelism under torchrun (`DistEnv::wants_group`): --batch is global.
    let (pg, device) = group_and_device(o.device.as_deref(), Some(cfg.batch_size))?;
    let (rank, world) = pg.as_ref().map_or((0, 1), |p| (p.rank, p.world_size));
    let main = rank == 0;
    let per_rank = cfg.batch_size / world;
    if (cfg.mixup > 0.0 || cfg.cutmix > 0.0) && cfg.mixup_prob > 0.0 && per_rank % 2 == 1 {
        bail!(
            "--batch {} is {per_rank} samples per rank on {world} ranks, and with mixup / \
             cutmix on every rank's batch must be even (timm mixes a batch with its flip): \
             use a multiple of {}",
            cfg.batch_size,
            2 * world
        );
    }
    if let Some(pg) = &pg {
        // What every rank must agree on: the config but its loader thread count, and
        // when evaluations (collectives) run and the run stops.
        let mut config = serde_json::to_value(&cfg)?;
        config["data_threads"] = serde_json::Value::Null;
        let source = |split: &str| crate::stream::SourceOptions {
            split: split.to_owned(),
            allow_pipe: o.allow_pipe,
            http: o.http,
        };
        let identity = crate::train::run::data_identity;
        let settings = serde_json::json!({
            "config": config,
            "eval_every": o.eval_every,
            "stop_after_epoch": o.stop_after_epoch,
            "data": identity(&o.data, &source(&o.train_split)),
            "val_data": identity(o.val_data.as_deref().unwrap_or(&o.data), &source(&o.val_split)),
        });
        crate::train::run::check_same_settings(pg, "finetune", &settings)?;
        if main {
            eprintln!("conmim finetune: {}", pg.describe(cfg.batch_size));
        }
    }
    let amp = device.is_cuda();
    if amp {
        crate::train::cuda::set_tf32(true)?;
    }
    let train_opts = SourceOptions {
        split: o.train_split.clone(),
        allow_pipe: o.allow_pipe,
        http: o.http,
    };
    let val_data = o.val_data.clone().unwrap_or_else(|| o.data.clone());
    let val_opts = SourceOptions {
        split: o.val_split.clone(),
        allow_pipe: o.allow_pipe,
        http: o.http,
    };
    let n_train = ShardList::resolve(&o.data, &train_opts)
        .with_context(|| format!("opening {} (split {})", o.data, o.train_split))?
        .total_samples()
        .with_context(|| {
            format!(
                "{}: the training set's sample count is unknown (no manifest); conmim-shard \
                 writes one, and fine-tuning sizes its epochs from it",
                o.data
            )
        })?;
    let steps_per_epoch = n_train / cfg.batch_size as u64;
    if steps_per_epoch == 0 {
        bail!(
            "{}: {n_train} training samples is fewer than one batch of {}",
            o.data,
            cfg.batch_size
        );
    }
    let total = steps_per_epoch * cfg.epochs as u64;
    if main {
        check_writable(&o.out)?;
    }
    let _lock = crate::train::run::lock_run_dir("finetune", &o.out, pg.as_ref())?;
    let ck_root = crate::train::checkpoint::dir_of(&o.out);
    // What a run killed mid-save left (every rank: it is idempotent, and each must see
    // the same checkpoints).
    crate::train::run::report_recovery("finetune", &ck_root, rank)?;
    let last_dir = ck_root.join("last");
    let has_last = last_dir
        .join(crate::train::checkpoint::STATE_FILE)
        .is_file();
    let found = match &o.resume {
        Resume::No | Resume::Auto => has_last.then(|| last_dir.clone()),
        Resume::Path(p) => Some(p.clone()),
    };
    // Every rank must take what rank 0 takes (each reads the checkpoint itself).
    if let Some(pg) = &pg {
        crate::train::checkpoint::agree_across_ranks(pg, &o.out, found.as_deref())?;
    }
    let resume_from = match (&o.resume, found) {
        (Resume::No, Some(_)) => bail!(
            "{} already holds fine-tuning checkpoint {}; pass --resume auto to continue it, \
             or another --out",
            o.out.display(),
            last_dir.display()
        ),
        (_, found) => found,
    };

    tch::manual_seed((cfg.seed >> 1) as i64);
    let net_cfg: Config = cfg.net_config();
    let net = Classifier::new(&net_cfg, device)?;
    // A resumed run takes every weight from its checkpoint: --init is not read again
    // (it may have moved since), and init.json stays the first start's.
    let init_report = match (&o.init, &resume_from) {
        (_, Some(_)) => None,
        (Some(p), None) => Some(model::load_pretrained(&net, p, o.init_weights)?),
        (None, None) => Some(InitReport {
            weights: "random".into(),
            new: vec!["every variable (random initialisation)".into()],
            ..Default::default()
        }),
    };
    if let Some(pg) = &pg {
        // Every rank starts from rank 0's weights.
        tch::no_grad(|| -> Result<()> {
            let mut vars: Vec<(String, Tensor)> = net.vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, t) in vars {
                pg.broadcast(&t, 0)
                    .with_context(|| format!("broadcasting {name} from rank 0"))?;
            }
            Ok(())
        })?;
    }
    if let (Some(init_report), true) = (&init_report, o.progress && main) {
        eprintln!(
            "conmim finetune: init from {} ({}): {} loaded, {} new, {} ignored{}{}",
            o.init
                .as_ref()
                .map_or("scratch".into(), |p| p.display().to_string()),
            init_report.weights,
            init_report.loaded.len(),
            init_report.new.len(),
            init_report.ignored.len(),
            if init_report.expanded.is_empty() {
                String::new()
            } else {
                format!("; {}", init_report.expanded.join("; "))
            },
            match init_report.resized.as_slice() {
                [] => String::new(),
                [one] => format!("; resampled {one}"),
                [first, rest @ ..] => format!("; resampled {first} (and {} more)", rest.len()),
            }
        );
    }
    // Rank 0 writes the run directory; the other ranks log to a scratch directory that
    // is removed at the end.
    let log_guard = crate::train::dist::LogDir::for_rank(&o.out, rank, "finetune")?;
    let log_dir = log_guard.path();
    if let Some(k) = cfg.train_last_blocks {
        freeze_all_but_last(&net, k);
    }
    let mut opt = optimizer(&net, &cfg)?;
    let resumed = match &resume_from {
        Some(dir) => Some(
            resume(dir, &net, &mut opt, &cfg, &net_cfg, device)
                .with_context(|| format!("resuming from {}", dir.display()))?,
        ),
        None => None,
    };
    crate::format::atomic_write_json(&log_dir.join("config.json"), &cfg)?;
    if let Some(init_report) = &init_report {
        crate::format::atomic_write_json(&log_dir.join("init.json"), init_report)?;
    }
    let start_step = opt.step;
    if let (Some(dir), true) = (&resume_from, o.progress && main) {
        eprintln!(
            "conmim finetune: resumed from {} after epoch {} (step {start_step})",
            dir.display(),
            start_step / steps_per_epoch
        );
    }
    // Data parallelism: DDP's reducer averages the gradients during backward.
    let mut reducer = match &pg {
        Some(pg) => Some(
            crate::train::dist::GradReducer::new(pg, &opt.vars())
                .context("setting up DDP's reducer")?,
        ),
        None => None,
    };
    let sched = CosineSchedule {
        peak: cfg.scaled_lr(),
        final_value: cfg.scaled_min_lr(),
        total_steps: total,
        warmup_steps: steps_per_epoch * cfg.warmup_epochs as u64,
        warmup_start: 0.0,
    };
    let mix = MixupConfig {
        mixup_alpha: cfg.mixup,
        cutmix_alpha: cfg.cutmix,
        prob: cfg.mixup_prob,
        switch_prob: cfg.mixup_switch_prob,
        label_smoothing: cfg.label_smoothing,
    };
    let mixing = (cfg.mixup > 0.0 || cfg.cutmix > 0.0) && cfg.mixup_prob > 0.0;
    let classes = net_cfg.num_classes;

    let metrics_path = log_dir.join("metrics.jsonl");
    // Keep what the resumed checkpoint covers: train lines before its step and the
    // evaluations up to it (nothing when starting fresh).
    truncate_metrics_by(&metrics_path, |v| {
        let step = v.get("step").and_then(|s| s.as_u64()).unwrap_or(u64::MAX);
        step < start_step || (v.get("acc1").is_some() && step <= start_step)
    })?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;
    let mut tb = EventWriter::create(&log_dir.join("tb"))?;
    tb.session_start(start_step)?;
    crate::train::run::replay_scalars_at(&metrics_path, &mut tb, start_step, &VAL_SCALARS)?;
    let ck = crate::train::checkpoint::dir_of(log_dir);
    let mut lc = train_loader_config(&cfg);
    if world > 1 {
        // Per-rank batch; shards split by RANK / WORLD_SIZE (the stream's epoch rules).
        lc.batch_size /= world;
        lc = lc
            .with_env_distribution()
            .context("splitting the data by rank")?;
    }
    let at = match &resumed {
        Some(r) => crate::train::dist::resume_at(&r.loader_states, None, rank, world),
        None => crate::train::dist::ResumeAt::Start,
    };
    let (mut loader, rejoin) = crate::train::dist::open_loader_at(&o.data, &train_opts, lc, &at)
        .context("opening the training data")?;
    if let (Some(r), true) = (rejoin, main) {
        eprintln!("conmim finetune: {}", r.describe(world));
    }
    // The position after the last batch trained on (saved at the end of each epoch).
    let mut loader_state: Option<crate::loader::LoaderState>;
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
    let mut last_t = Instant::now();
    let r0 = resumed.clone();
    let (mut samples, mut final_loss) = (
        r0.as_ref().map_or(0, |r| r.samples),
        r0.as_ref().and_then(|r| r.final_loss),
    );
    let (mut best, mut best_epoch, mut last) = (
        r0.as_ref().and_then(|r| r.best),
        r0.as_ref().and_then(|r| r.best_epoch),
        r0.as_ref().and_then(|r| r.last),
    );
    let samples_at_start = samples;
    let mut epochs_done = (start_step / steps_per_epoch) as u32;
    // SIGTERM / SIGINT from here on: stop after the step in progress, with a checkpoint.
    let signals = crate::train::signals::StopGuard::arm()?;
    let mut stopped_by: Option<String> = None;
    // A resume that is already at or past `--stop-after-epoch` trains nothing (before,
    // it trained one more epoch and then stopped).
    let end = match o.stop_after_epoch {
        Some(k) if start_step < total && epochs_done >= k => {
            pb.println(format!(
                "already {epochs_done} epochs done, at or past --stop-after-epoch {k}: \
                 nothing trained; continue without it (or with a larger one)"
            ));
            start_step
        }
        _ => total,
    };
    for step in start_step..end {
        let epoch = (step / steps_per_epoch) as u32;
        let batch = match loader.next() {
            Some(b) => b.context("loading training data")?,
            None => bail!("the training stream ended at step {step}"),
        };
        check_labels(batch.labels(), batch.keys(), classes, "training")?;
        let b = batch.len();
        let s = batch.image_size() as i64;
        let lr = sched.at(step);
        // Per-rank draws (drop path, mixup); rank 0 = the single-process sequence.
        let seed = crate::seed::rank_seed(cfg.seed, rank);
        tch::manual_seed((crate::seed::SplitMix64::new(seed, step).next_u64() >> 1) as i64);
        let host = Tensor::from_slice(batch.weak()).view([b as i64, s, s, 3]);
        let x = crate::train::cuda::upload(&host, device)?;
        let labels = Tensor::from_slice(batch.labels()).to_device(device);
        loader_state = Some(batch.state());
        drop(batch);
        let mut x = crate::train::input::normalize_nhwc(
            &x,
            crate::train::input::IMAGENET_MEAN,
            crate::train::input::IMAGENET_STD,
        )?;
        let targets = if mixing {
            let p = mix.draw(&mut MixupConfig::rng_for_step(seed, step), (s, s));
            mixup::apply(&mut x, &labels, &p, classes, cfg.label_smoothing)?
        } else {
            mixup::mixup_target(&labels, classes, 1.0, cfg.label_smoothing)
        };
        let logits = net.logits(&x, true, amp)?;
        let loss = soft_target_cross_entropy(&logits, &targets);
        if let Some(r) = &mut reducer {
            r.prepare().context("arming the gradient all-reduce")?;
        }
        loss.f_backward().context("the backward pass")?;
        let grads = opt.gradients()?;
        // The step's one sync: loss, gradient norm (already global) and this rank's stop
        // vote; over the ranks the loss is averaged and a vote anywhere stops everyone.
        let mut parts = Tensor::stack(
            &[
                loss.detach().to_kind(Kind::Double),
                grads.norm.to_kind(Kind::Double),
            ],
            0,
        )
        .to_device(Device::Cpu);
        let vote = if signals.received().is_some() {
            1.0
        } else {
            0.0
        };
        parts = Tensor::cat(&[parts, Tensor::from_slice(&[vote])], 0);
        if let Some(pg) = &pg {
            pg.all_reduce_mean(&mut parts)
                .context("averaging the loss over ranks")?;
        }
        let got = Vec::<f64>::try_from(&parts)?;
        let (loss_v, norm, stop) = (got[0], got[1], got[2] > 0.0);
        if let Some(why) = crate::train::optim::unusable_step(loss_v, norm, step) {
            opt.zero_grad();
            bail!(why);
        }
        opt.apply(grads, lr, cfg.clip_grad)?;
        samples += (b * world) as u64;
        final_loss = Some(loss_v);
        let dt = last_t.elapsed().as_secs_f64().max(1e-9);
        last_t = Instant::now();
        let line = TrainLine {
            step,
            epoch,
            loss: loss_v,
            lr,
            grad_norm: norm,
            img_s: (b * world) as f64 / dt,
        };
        writeln!(metrics, "{}", serde_json::to_string(&line)?)?;
        tb.add_scalars(
            step,
            &[
                ("train/loss", loss_v),
                ("train/lr", lr),
                ("train/grad_norm", norm),
                ("train/img_s", line.img_s),
            ],
        )?;
        pb.set_position(step + 1);
        pb.set_message(format!("epoch {epoch} loss {loss_v:.4} lr {lr:.2e}"));

        let end_of_epoch = (step + 1) % steps_per_epoch == 0;
        if end_of_epoch || stop {
            // Epochs completed (a stop mid-epoch saves a resumable `last` of this step).
            let done = if end_of_epoch { epoch + 1 } else { epoch };
            let is_last = end_of_epoch && done == cfg.epochs;
            let mut state = FinetuneState {
                kind: FINETUNE_KIND.into(),
                config: cfg.clone(),
                net: net_cfg.clone(),
                epoch: done,
                step: step + 1,
                acc1: None,
                acc5: None,
                resume: None,
            };
            if end_of_epoch && (is_last || done.is_multiple_of(o.eval_every.max(1))) {
                let r = evaluate_dist(
                    &net,
                    &val_data,
                    &val_opts,
                    cfg.eval_resize as u32,
                    cfg.batch_size / world,
                    cfg.data_threads,
                    false,
                    pg.as_ref(),
                )
                .with_context(|| format!("evaluating after epoch {done}"))?;
                let el = EvalLine {
                    epoch: done,
                    step: step + 1,
                    acc1: r.acc1,
                    acc5: r.acc5,
                    val_loss: r.loss,
                    val_images: r.images,
                };
                writeln!(metrics, "{}", serde_json::to_string(&el)?)?;
                tb.add_scalars(
                    step + 1,
                    &[
                        (VAL_SCALARS[0].1, r.acc1),
                        (VAL_SCALARS[1].1, r.acc5),
                        (VAL_SCALARS[2].1, r.loss),
                    ],
                )?;
                pb.println(format!(
                    "epoch {done}/{}: top-1 {:.2}% top-5 {:.2}% val loss {:.4} ({} images)",
                    cfg.epochs, r.acc1, r.acc5, r.loss, r.images
                ));
                state.acc1 = Some(r.acc1);
                state.acc5 = Some(r.acc5);
                last = Some(r);
                if best.is_none_or(|b| r.acc1 > b.acc1) {
                    best = Some(r);
                    best_epoch = Some(done);
                    if main {
                        model::save(&ck.join("best"), &net, &state, None)?;
                    }
                }
            }
            let own = loader_state.context("no training batch in the epoch")?;
            let loader_states = match &pg {
                Some(pg) => pg
                    .gather_loader_states(&own)
                    .context("gathering loader positions")?,
                None => vec![own],
            };
            state.resume = Some(ResumeState {
                samples,
                final_loss,
                last,
                best,
                best_epoch,
                loader_states,
                optimizer_layout: opt.layout(),
            });
            if main {
                model::save(&ck.join("last"), &net, &state, Some(&opt))?;
            }
            metrics.flush()?;
            tb.flush()?;
            epochs_done = done;
            if stop {
                let why = signals
                    .received()
                    .unwrap_or("SIGTERM (on another rank)")
                    .to_owned();
                pb.println(format!(
                    "conmim finetune: {why}: stopped after step {} of {total}, checkpoint {}; \
                     continue with --resume auto",
                    step + 1,
                    ck.join("last").display()
                ));
                stopped_by = Some(why);
                break;
            }
            if o.stop_after_epoch.is_some_and(|k| done >= k) && !is_last {
                pb.println(format!(
                    "stopping after epoch {done} (--stop-after-epoch); continue with --resume auto"
                ));
                break;
            }
        }
    }
    drop(signals);
    pb.finish();
    metrics.flush()?;
    tb.flush()?;
    if let Some(pg) = &pg {
        pg.check_replicas_agree(&opt.vars(), "fine-tuned weights")?;
    }
    let wall = t0.elapsed().as_secs_f64();
    let log = loader.errors();
    let summary = FinetuneSummary {
        preset: cfg.preset.clone(),
        device: format!("{device:?}"),
        init: o.init.clone(),
        epochs: cfg.epochs,
        steps: total,
        steps_per_epoch,
        samples,
        wall_s: wall,
        img_s: (samples - samples_at_start) as f64 / wall.max(1e-9),
        final_loss,
        last,
        best,
        best_epoch,
        epochs_done,
        resumed_at_step: start_step,
        // `best` once an evaluation wrote one (not before the first, e.g. a run stopped
        // by a signal or --stop-after-epoch early), else the resumable `last`.
        checkpoint: if ck.join("best").is_dir() {
            ck.join("best")
        } else {
            ck.join("last")
        },
        stopped_by,
        skipped_samples: log.sample_errors,
        shard_errors: log.shard_errors,
        errors: log.shards.into_iter().chain(log.samples).collect(),
    };
    crate::format::atomic_write_json(&log_dir.join("summary.json"), &summary)?;
    Ok(summary)
}

/// `conmim eval`: a fine-tuning checkpoint over a dataset, exactly once.
pub fn eval_checkpoint(
    checkpoint: &Path,
    data: &str,
    opts: &SourceOptions,
    batch: usize,
    threads_: usize,
    device: Option<&str>,
    show: bool,
) -> Result<EvalReport> {
    let (pg, device) = group_and_device(device, None)?;
    if let Some(pg) = &pg {
        // Ranks over other shards would count some images twice and others never.
        let settings = serde_json::json!({
            "data": crate::train::run::data_identity(data, opts),
        });
        crate::train::run::check_same_settings(pg, "eval", &settings)?;
    }
    let rank = pg.as_ref().map_or(0, |p| p.rank);
    let (net, state, dir) = model::load(checkpoint, device)?;
    let result = evaluate_dist(
        &net,
        data,
        opts,
        state.config.eval_resize as u32,
        batch,
        threads_,
        show && rank == 0,
        pg.as_ref(),
    )?;
    Ok(EvalReport {
        result,
        checkpoint: dir,
        ranks: pg.as_ref().map_or(1, |p| p.world_size),
        rank,
    })
}

/// What `conmim eval` reports: the evaluation, the checkpoint directory it read and,
/// under torchrun, how many ranks shared the work (each read its own shards) and this
/// process's rank (every rank gets the result; the CLI prints it on rank 0).
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub result: EvalResult,
    pub checkpoint: PathBuf,
    pub ranks: usize,
    pub rank: usize,
}

/// What `conmim linear` reports.
#[derive(Debug, Clone, Serialize)]
pub struct LinearResult {
    pub epochs: usize,
    pub lr: f64,
    pub train_images: u64,
    pub val_images: u64,
    pub classes: i64,
    /// Top-1 / top-5 (%) on the train features (fit) and on val.
    pub train_acc1: f64,
    pub acc1: f64,
    pub acc5: f64,
    /// The processes that shared the feature pass (1 outside torchrun).
    pub ranks: usize,
    /// This process's rank (the CLI prints the result on rank 0 only).
    #[serde(skip)]
    pub rank: usize,
}

/// Linear probe on frozen features (the k-NN features, standardised with the train
/// features' mean and std, i.e. a BatchNorm without affine as MAE's probe): a linear
/// classifier trained with Adam (`lr`, cosine to 0) on minibatches of 256 for `epochs`
/// passes, then top-1 / top-5 on val. As the paper notes, a weak metric for MIM
/// features; fine-tuning is the measure that counts. Under torchrun the ranks share the
/// feature pass (each reads its own shards), then each fits the same probe on all of
/// them.
#[allow(clippy::too_many_arguments)]
pub fn linear_probe(
    source: &Path,
    weights: Weights,
    train: (&str, &SourceOptions),
    val: (&str, &SourceOptions),
    epochs: usize,
    lr: f64,
    batch: usize,
    threads_: usize,
    device: Option<&str>,
    seed: u64,
) -> Result<LinearResult> {
    use tch::nn::{Module, OptimizerConfig};
    let (pg, device) = group_and_device(device, None)?;
    if let Some(pg) = &pg {
        // Every rank fits the same probe on all the features: the same data, epochs,
        // lr and seed, or the ranks' probes (and what rank 0 reports) would differ.
        let identity = crate::train::run::data_identity;
        let settings = serde_json::json!({
            "epochs": epochs,
            "lr": lr,
            "seed": seed,
            "train_data": identity(train.0, train.1),
            "val_data": identity(val.0, val.1),
        });
        crate::train::run::check_same_settings(pg, "linear", &settings)?;
    }
    let backbone = backbone_of(source, weights, device)?;
    let (tf, tl, vf, vl, classes) = super::knn::train_val_features(
        &backbone.1,
        device,
        train,
        val,
        batch,
        threads_,
        pg.as_ref(),
    )?;
    // Under torchrun the ranks extracted their own shards; every rank then fits the
    // same probe on all the features (same seed, same result).
    let (tf, tl, vf, vl) = match &pg {
        None => (tf, tl, vf, vl),
        Some(pg) => {
            let g = |t: &Tensor| {
                super::knn::gather_rows(pg, t).context("gathering the features over the ranks")
            };
            (g(&tf)?, g(&tl)?, g(&vf)?, g(&vl)?)
        }
    };
    let mean = tf.mean_dim([0i64].as_slice(), true, None::<Kind>);
    let std = tf
        .std_mean_dim([0i64].as_slice(), false, true)
        .0
        .clamp_min(1e-6);
    let (tf, vf) = ((&tf - &mean) / &std, (&vf - &mean) / &std);
    tch::manual_seed((seed >> 1) as i64);
    let vs = tch::nn::VarStore::new(device);
    let dim = tf.size()[1];
    let head = tch::nn::linear(vs.root() / "head", dim, classes, Default::default());
    let mut opt = tch::nn::Adam::default().build(&vs, lr)?;
    let n = tf.size()[0];
    let mb = 256i64.min(n);
    let steps_per_epoch = (n + mb - 1) / mb;
    let total = (steps_per_epoch * epochs as i64).max(1);
    let mut step = 0i64;
    for _ in 0..epochs {
        let perm = Tensor::randperm(n, (Kind::Int64, device));
        let mut i = 0;
        while i < n {
            let len = mb.min(n - i);
            let idx = perm.narrow(0, i, len);
            let x = tf.index_select(0, &idx);
            let y = tl.index_select(0, &idx);
            let loss = head.forward(&x).cross_entropy_for_logits(&y);
            opt.set_lr(
                lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos()),
            );
            opt.backward_step(&loss);
            i += len;
            step += 1;
        }
    }
    let acc = |x: &Tensor, y: &Tensor| -> (f64, f64) {
        tch::no_grad(|| {
            let (_, top) = head.forward(x).topk(classes.min(5), 1, true, true);
            let hit = top.eq_tensor(&y.unsqueeze(1));
            let n = x.size()[0] as f64;
            (
                100.0 * hit.narrow(1, 0, 1).sum(Kind::Double).double_value(&[]) / n,
                100.0 * hit.sum(Kind::Double).double_value(&[]) / n,
            )
        })
    };
    let (train_acc1, _) = acc(&tf, &tl);
    let (acc1, acc5) = acc(&vf, &vl);
    Ok(LinearResult {
        epochs,
        lr,
        train_images: n as u64,
        val_images: vf.size()[0] as u64,
        classes,
        train_acc1,
        acc1,
        acc5,
        ranks: pg.as_ref().map_or(1, |p| p.world_size),
        rank: pg.as_ref().map_or(0, |p| p.rank),
    })
}

/// A backbone (final norm, no head) loaded from a pretraining run / checkpoint or a
/// fine-tuning checkpoint.
pub fn backbone_of(
    source: &Path,
    weights: Weights,
    device: Device,
) -> Result<(tch::nn::VarStore, crate::train::vit::VisionTransformer)> {
    if let Some(dir) = model::checkpoint_dir(source) {
        if weights == Weights::Student {
            bail!(
                "{}: a fine-tuning checkpoint holds one network; --weights student applies \
                 to pretraining checkpoints",
                dir.display()
            );
        }
        let (net, _, _) = model::load(&dir, device)?;
        return Ok((net.vs, net.vit));
    }
    let (src, cfg, _) = model::read_source(source, weights)?;
    let cfg =
        cfg.context("k-NN needs a run or checkpoint directory (its config names the model)")?;
    let cfg = cfg.with_mask_token(false).with_num_classes(0);
    let vs = tch::nn::VarStore::new(device);
    let vit = crate::train::vit::VisionTransformer::new(&cfg, vs.root())?;
    tch::no_grad(|| -> Result<()> {
        for (name, mut v) in vs.variables() {
            let t = src
                .get(&name)
                .with_context(|| format!("{}: `{name}` missing", source.display()))?;
            v.f_copy_(t)?;
        }
        Ok(())
    })?;
    Ok((vs, vit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{self, JpegSpec};
    use crate::train::run::{PretrainOptions, Resume, pretrain};

    /// A labelled split: shard `i` holds `sizes[i]` JPEGs of label `(i + j) % classes`
    /// (keys `{split}{i}_{j}`).
    fn labelled(dir: &Path, split: &str, sizes: &[u64], classes: u64) {
        testkit::write_sharded(dir, split, sizes, |i, j| {
            let label = (i as u64 + j) % classes;
            let bytes = testkit::jpeg(&JpegSpec::rgb(40 + (j as u32 % 3) * 8, 36, label * 7 + j));
            (
                format!("{split}{i}_{j}"),
                vec![
                    ("jpg".to_owned(), bytes),
                    ("cls".to_owned(), label.to_string().into_bytes()),
                ],
            )
        })
        .unwrap();
    }

    /// Pretrained at 32 px (4x4 patches), fine-tuned at 48 px (6x6): the shared relative
    /// position bias is resampled (then copied into every block), eval_resize follows
    /// `--image-size`, and the run trains and evaluates; a timm-style backbone has its
    /// `pos_embed` resampled.
    #[test]
    fn finetune_at_another_resolution_resamples_position_terms() {
        let _rng = crate::train::testing::seeded(0); // libtorch's global generator
        let dir = tempfile::tempdir().unwrap();
        let data = train_and_val(dir.path());
        let pre = dir.path().join("pre");
        let mut po = pretrain_micro_opts(&data, &pre);
        po.knn = None;
        pretrain(&po).unwrap();

        let out = dir.path().join("ft48");
        let mut o = ft_opts(&data, &out, Some(pre.clone()));
        o.sets.retain(|s| !s.starts_with("eval_resize="));
        o.image_size = Some(48);
        o.epochs = Some(1);
        assert_eq!(build_config(&o).unwrap().eval_resize, 54); // int(48 / 0.875)
        let s = finetune(&o).unwrap();
        assert_eq!(s.last.unwrap().images, 7);
        let init: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("init.json")).unwrap()).unwrap();
        assert_eq!(
            init["resized"],
            serde_json::json!([
                "rel_pos_bias.relative_position_bias_table: 4x4 -> 6x6 patches \
                 (BEiT's geometric-progression interpolation)"
            ])
        );
        let (src, _, _) = model::read_source(&pre, Weights::Teacher).unwrap();
        let want = crate::train::pos_resize::resize_rel_pos_bias_table(
            &src["rel_pos_bias.relative_position_bias_table"],
            6,
        )
        .unwrap();
        let net = Classifier::new(&build_config(&o).unwrap().net_config(), Device::Cpu).unwrap();
        let r = model::map_into(&net, src).unwrap();
        assert_eq!(r.resized.len(), 1);
        assert!(net.vs.variables()["blocks.1.attn.relative_position_bias_table"].equal(&want));

        // A fine-tuning run as --init, at 64 px (8x8) with another label set: its
        // per-block tables are resampled, fc_norm loads, the head starts new.
        let out64 = dir.path().join("ft64");
        let mut o64 = ft_opts(&data, &out64, Some(out.clone()));
        o64.sets.retain(|s| !s.starts_with("eval_resize="));
        (o64.image_size, o64.epochs, o64.num_classes) = (Some(64), Some(1), Some(6));
        finetune(&o64).unwrap();
        let init: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out64.join("init.json")).unwrap()).unwrap();
        assert_eq!(init["weights"], "finetuned");
        let resized = init["resized"].to_string();
        assert!(
            resized.contains("blocks.0.attn.relative_position_bias_table: 6x6 -> 8x8")
                && resized.contains("blocks.1.attn"),
            "{resized}"
        );
        assert!(
            init["loaded"].to_string().contains("fc_norm.weight"),
            "{init}"
        );
        assert!(init["new"].to_string().contains("head.weight"), "{init}");
        assert!(
            init["ignored"]
                .to_string()
                .contains("the source's classifier is [4, 32], this one [6, 32]"),
            "{init}"
        );
        // The same label set keeps the head.
        let (src, src_cfg, what) = model::read_source(&out, Weights::Teacher).unwrap();
        assert_eq!(
            (src_cfg.unwrap().image_size, what.as_str()),
            (48, "finetuned")
        );
        let same = Classifier::new(&build_config(&o).unwrap().net_config(), Device::Cpu).unwrap();
        let r = model::map_into(&same, src).unwrap();
        assert!(r.loaded.contains(&"head.weight".to_owned()), "{r:?}");
        assert!(r.resized.is_empty());
        // A classifier that pools the CLS token does not take a mean-pooled head: the
        // head and the final norm start new, fc_norm is left out.
        let mut cls = o.clone();
        cls.sets.push("pooling=\"cls\"".into());
        let cls = Classifier::new(&build_config(&cls).unwrap().net_config(), Device::Cpu).unwrap();
        let (src, _, _) = model::read_source(&out, Weights::Teacher).unwrap();
        let r = model::map_into(&cls, src).unwrap();
        for name in ["head.weight", "head.bias", "norm.weight", "norm.bias"] {
            assert!(r.new.contains(&name.to_owned()), "{name}: {r:?}");
        }
        let ignored = r.ignored.join("; ");
        assert!(
            ignored.contains(
                "head.weight: the source's classifier reads the mean of the patch \
                              tokens after fc_norm, this one the CLS token after norm"
            ) && ignored.contains("fc_norm.weight: the classifier reads the CLS token"),
            "{ignored}"
        );
        let e = model::read_source(&out, Weights::Student)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds one network"), "{e}");
        let e = format!(
            "{:#}",
            backbone_of(&out, Weights::Student, Device::Cpu)
                .err()
                .unwrap()
        );
        assert!(e.contains("holds one network"), "{e}");
        let file = out.join("checkpoints/best/model.safetensors");
        let e = model::read_source(&file, Weights::Student)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a .safetensors file holds one network"), "{e}");

        // A timm-style backbone: pos_embed, 1 + 16 tokens -> 1 + 36.
        let timm = |size: &str| {
            let mut o = ft_opts(&data, &out, None);
            o.sets.push("model.variant=\"Timm\"".into());
            o.sets.push(format!("model.image_size={size}"));
            o.sets.push(format!("eval_resize={size}"));
            Classifier::new(&build_config(&o).unwrap().net_config(), Device::Cpu).unwrap()
        };
        let (small, large) = (timm("32"), timm("48"));
        let src: std::collections::BTreeMap<String, Tensor> =
            small.cpu_tensors().into_iter().collect();
        let want = crate::train::pos_resize::resample_pos_embed(&src["pos_embed"], 6).unwrap();
        let r = model::map_into(&large, src).unwrap();
        assert_eq!(
            r.resized,
            ["pos_embed: 4x4 -> 6x6 patches (bicubic)".to_owned()]
        );
        assert!(large.vs.variables()["pos_embed"].equal(&want));

        // --image-size sets eval_resize only when no layer names it: MICRO's --set
        // eval_resize=36 stays, and is too small for 48 px (the error says what to do).
        let mut o = ft_opts(&data, &out, None);
        o.image_size = Some(48);
        let e = format!("{:#}", build_config(&o).unwrap_err());
        assert!(
            e.contains("eval_resize 36 must be >= model.image_size 48"),
            "{e}"
        );
        assert!(e.contains("set eval_resize too"), "{e}");
        o.sets.retain(|s| !s.starts_with("eval_resize="));
        o.image_size = Some(384);
        assert_eq!(build_config(&o).unwrap().eval_resize, 384);
        assert_eq!(official_eval_resize(224), 256);
    }

    /// `dir/data`: 4 classes, a train split of 2 shards of 6 and a val split of 3 + 4.
    fn train_and_val(dir: &Path) -> PathBuf {
        let data = dir.join("data");
        std::fs::create_dir(&data).unwrap();
        labelled(&data, "train", &[6, 6], 4);
        labelled(&data, "val", &[3, 4], 4);
        data
    }

    const MICRO: [&str; 8] = [
        "model.image_size=32",
        "model.patch_size=8",
        "model.embed_dim=32",
        "model.depth=2",
        "model.num_heads=4",
        "eval_resize=36",
        "shuffle_buffer=4",
        "model.num_classes=4",
    ];

    /// `--epochs` shorter than the preset's warmup scales the warmup (small: 5 of 200
    /// epochs), but a warmup a config file or `--set` names is kept.
    #[test]
    fn short_epochs_keep_a_named_warmup() {
        let mut o = ft_opts(Path::new("unused"), Path::new("unused"), None);
        o.epochs = Some(4);
        assert_eq!(build_config(&o).unwrap().warmup_epochs, 0); // round(5 * 4 / 200)
        o.sets.push("warmup_epochs=1".into());
        assert_eq!(build_config(&o).unwrap().warmup_epochs, 1);
        o.epochs = Some(100);
        assert_eq!(build_config(&o).unwrap().warmup_epochs, 1);
    }

    /// A run stopped before its first evaluation has no `best`: its summary names the
    /// resumable `last`.
    #[test]
    fn summary_names_last_before_any_evaluation() {
        let _rng = crate::train::testing::seeded(0); // libtorch's global generator
        let dir = tempfile::tempdir().unwrap();
        let data = train_and_val(dir.path());
        let out = dir.path().join("ft");
        let mut o = ft_opts(&data, &out, None);
        (o.eval_every, o.stop_after_epoch) = (5, Some(1));
        let s = finetune(&o).unwrap();
        assert_eq!((s.epochs_done, s.best_epoch), (1, None));
        assert_eq!(s.checkpoint, out.join("checkpoints/last"));
        assert!(s.checkpoint.is_dir());
    }

    /// A corrupt training sample is skipped, counted and named in the summary (it was
    /// dropped silently); with `max_errors = 0` the run stops with an error naming it.
    #[test]
    fn finetune_reports_and_caps_corrupt_samples() {
        let _rng = crate::train::testing::seeded(0);
        let dir = tempfile::tempdir().unwrap();
        testkit::write_sharded(dir.path(), "train", &[6, 6], |i, j| {
            let key = format!("train{i}_{j}");
            let jpg = if key == "train1_4" {
                b"\xff\xd8\xff\xe0 not a jpeg at all".to_vec()
            } else {
                testkit::jpeg(&JpegSpec::rgb(40, 36, (i * 10) as u64 + j))
            };
            let label = ((i as u64 + j) % 4).to_string().into_bytes();
            (
                key,
                vec![("jpg".to_owned(), jpg), ("cls".to_owned(), label)],
            )
        })
        .unwrap();
        labelled(dir.path(), "val", &[4], 4);
        let out = dir.path().join("ft");
        let mut o = ft_opts(dir.path(), &out, None);
        o.epochs = Some(1);
        let s = finetune(&o).unwrap();
        assert!(s.skipped_samples >= 1, "{s:?}");
        assert_eq!(s.shard_errors, 0);
        assert_eq!(s.errors[0].key, "train1_4", "{s:?}");
        let json = std::fs::read_to_string(out.join("summary.json")).unwrap();
        assert!(
            json.contains("\"skipped_samples\"") && json.contains("train1_4"),
            "{json}"
        );

        let mut o = ft_opts(dir.path(), &dir.path().join("capped"), None);
        o.epochs = Some(1);
        o.sets.push("max_errors=0".into());
        let err = format!(
            "{:#}",
            finetune(&o).expect_err("max_errors=0 must stop the run")
        );
        assert!(err.contains("train1_4"), "{err}");
    }

    fn ft_opts(data: &Path, out: &Path, init: Option<PathBuf>) -> FinetuneOptions {
        FinetuneOptions {
            preset: "small".into(),
            config_file: None,
            sets: MICRO.iter().map(|s| s.to_string()).collect(),
            data: data.to_str().unwrap().into(),
            train_split: "train".into(),
            val_data: None,
            val_split: "val".into(),
            allow_pipe: false,
            http: Default::default(),
            init,
            init_weights: Weights::Teacher,
            out: out.to_path_buf(),
            epochs: Some(2),
            batch: Some(4),
            lr: Some(1e-2),
            num_classes: None,
            image_size: None,
            seed: Some(1),
            threads: Some(2),
            device: Some("cpu".into()),
            eval_every: 1,
            progress: false,
            resume: Resume::No,
            stop_after_epoch: None,
        }
    }

    fn pretrain_micro(data: &Path, out: &Path) {
        pretrain(&pretrain_micro_opts(data, out)).unwrap();
    }

    /// 2 steps of a micro ViT with the k-NN monitor at its step-2 checkpoint.
    fn pretrain_micro_opts(data: &Path, out: &Path) -> PretrainOptions {
        PretrainOptions {
            preset: "tiny".into(),
            config_file: None,
            sets: [
                "model.patch_size=8",
                "model.embed_dim=32",
                "model.depth=2",
                "model.num_heads=4",
                "head.in_dim=32",
                "head.hidden_dim=64",
                "head.out_dim=24",
                "shuffle_buffer=4",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            data: data.to_str().unwrap().into(),
            split: "train".into(),
            allow_pipe: false,
            http: Default::default(),
            out: out.to_path_buf(),
            steps: Some(2),
            epochs: None,
            batch: Some(4),
            image_size: Some(32),
            lr: Some(1.0),
            warmup_steps: Some(1),
            seed: Some(3),
            threads: Some(2),
            device: Some("cpu".into()),
            resume: Resume::No,
            save_every: 2,
            keep: 1,
            progress: false,
            knn: Some(crate::train::run::KnnMonitor {
                train: data.to_str().unwrap().into(),
                train_split: "train".into(),
                val: data.to_str().unwrap().into(),
                val_split: "val".into(),
                k: 20,
                temperature: 0.07,
            }),
            faults: crate::train::run::Faults::default(),
        }
    }

    /// The body of `issue5_sigterm_stops_finetune_with_a_resumable_checkpoint`'s child
    /// processes (no-op otherwise): 3 epochs of 3 steps, `--resume auto`.
    #[test]
    fn finetune_signal_child() {
        let Some(out) = std::env::var_os("CONMIM_FT_CHILD_OUT") else {
            return;
        };
        let out = PathBuf::from(out);
        let mut o = ft_opts(out.parent().unwrap(), &out, None);
        o.epochs = Some(3);
        o.resume = Resume::Auto;
        let s = finetune(&o).unwrap();
        println!(
            "FT_CHILD_DONE stopped_by {:?} epochs_done {}",
            s.stopped_by, s.epochs_done
        );
    }

    /// Issue 5 with issue 4's graceful stop: a SIGTERM stops `conmim finetune` after the
    /// step in progress, mid-epoch if it comes mid-epoch, with a resumable
    /// `checkpoints/last` of that step; `--resume auto` then ends with the same metric
    /// lines (losses, learning rates, evaluations) as the uninterrupted run.
    #[test]
    fn issue5_sigterm_stops_finetune_with_a_resumable_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        labelled(dir.path(), "train", &[6, 6], 4);
        labelled(dir.path(), "val", &[3, 4], 4);
        let child = |out: &Path| {
            let mut c = std::process::Command::new(std::env::current_exe().unwrap());
            c.args([
                "train::finetune::run::tests::finetune_signal_child",
                "--exact",
                "--nocapture",
            ])
            .env("CONMIM_FT_CHILD_OUT", out)
            .env("OMP_NUM_THREADS", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
            c
        };
        let text = crate::train::testing::output_text;
        let full = dir.path().join("full");
        let o = child(&full).output().unwrap();
        assert!(
            text(&o).contains("FT_CHILD_DONE stopped_by None epochs_done 3"),
            "{}",
            text(&o)
        );
        let want = metric_lines(&full);

        let out = dir.path().join("stopped");
        let c = child(&out).spawn().unwrap();
        let train_lines = || {
            std::fs::read_to_string(out.join("metrics.jsonl"))
                .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
                .unwrap_or(0)
        };
        while train_lines() < 1 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        crate::train::testing::send_signal(c.id(), "TERM");
        let o = c.wait_with_output().unwrap();
        let t = text(&o);
        assert!(
            o.status.success() && t.contains("FT_CHILD_DONE stopped_by Some(\"SIGTERM\")"),
            "{t}"
        );
        let state = model::read_state(&out.join("checkpoints/last")).unwrap();
        assert!(
            (1..9).contains(&state.step),
            "stopped at step {}",
            state.step
        );
        assert!(state.resume.is_some(), "a resumable checkpoint");
        let o = child(&out).output().unwrap();
        assert!(
            text(&o).contains("FT_CHILD_DONE stopped_by None epochs_done 3"),
            "{}",
            text(&o)
        );
        assert_eq!(metric_lines(&out), want, "{}", text(&o));
    }

    /// The metric lines of a run without the wall-clock field.
    fn metric_lines(run: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("img_s");
                v
            })
            .collect()
    }

    /// Issue 5: fine-tuning resumes exactly. Three epochs in one go equal one epoch,
    /// `--stop-after-epoch 1`, then `--resume auto` for the other two: the same losses,
    /// learning rates, gradient norms and evaluations, and the same final weights (CPU;
    /// to float reduction order), also with another `--threads` and an `--init` that is
    /// gone. A fresh run into an OUT that holds a checkpoint is
    /// refused.
    #[test]
    fn issue5_finetune_resumes_exactly() {
        // The runs draw drop path from libtorch's global generator: no other test of
        // this process may draw from it meanwhile.
        let _rng = crate::train::testing::seeded(0);
        let dir = tempfile::tempdir().unwrap();
        labelled(dir.path(), "train", &[6, 6], 4);
        labelled(dir.path(), "val", &[3, 4], 4);
        let full = dir.path().join("full");
        let mut o = ft_opts(dir.path(), &full, None);
        o.epochs = Some(3);
        let a = finetune(&o).unwrap();
        assert_eq!((a.epochs_done, a.resumed_at_step), (3, 0));

        let part = dir.path().join("part");
        let mut o = ft_opts(dir.path(), &part, None);
        o.epochs = Some(3);
        o.stop_after_epoch = Some(1);
        let b1 = finetune(&o).unwrap();
        assert_eq!(b1.epochs_done, 1);
        assert!(
            part.join("checkpoints/last/optimizer.safetensors")
                .is_file()
        );
        // Resumed at the epoch it stops after: nothing more is trained.
        let last_state = std::fs::read(part.join("checkpoints/last/state.json")).unwrap();
        o.resume = Resume::Auto;
        let again = finetune(&o).unwrap();
        assert_eq!((again.epochs_done, again.resumed_at_step), (1, 3));
        let after = std::fs::read(part.join("checkpoints/last/state.json")).unwrap();
        assert_eq!(last_state, after, "the checkpoint was rewritten");
        o.resume = Resume::No;
        o.stop_after_epoch = None;
        let err = format!("{:#}", finetune(&o).unwrap_err());
        assert!(err.contains("--resume auto"), "{err}");
        // As if killed while replacing `last` at the end of epoch 2 (between its two
        // renames: no `last`, the epoch-1 one moved aside, the new one in scratch): the
        // resume puts epoch 1's back, continues from it and cleans up.
        let ck = part.join("checkpoints");
        std::fs::rename(ck.join("last"), ck.join(".old-last-4242")).unwrap();
        std::fs::create_dir(ck.join(".tmp-last-4242")).unwrap();
        o.resume = Resume::Auto;
        o.threads = Some(1); // another loader thread count changes no batch
        o.init = Some(dir.path().join("gone")); // a resume does not read --init again
        let b = finetune(&o).unwrap();
        let hidden: Vec<_> = std::fs::read_dir(&ck)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(hidden.is_empty(), "{hidden:?}");
        assert_eq!((b.epochs_done, b.resumed_at_step), (3, 3));
        assert_eq!((b.samples, b.best_epoch), (a.samples, a.best_epoch));
        // Equal up to float reduction order: tests running alongside share libtorch's
        // intra-op thread pool (alone, the two runs are bit-identical).
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-5 * x.abs().max(y.abs()).max(1e-3);
        let same_eval = |x: Option<EvalResult>, y: Option<EvalResult>| {
            let (x, y) = (x.unwrap(), y.unwrap());
            x.images == y.images
                && close(x.acc1, y.acc1)
                && close(x.acc5, y.acc5)
                && close(x.loss, y.loss)
        };
        assert!(same_eval(b.last, a.last), "{:?} vs {:?}", b.last, a.last);
        assert!(same_eval(b.best, a.best), "{:?} vs {:?}", b.best, a.best);
        assert!(close(b.final_loss.unwrap(), a.final_loss.unwrap()));
        let (mb, ma) = (metric_lines(&part), metric_lines(&full));
        assert_eq!(mb.len(), ma.len(), "the same metric lines");
        for (x, y) in mb.iter().zip(&ma) {
            let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
            for (k, v) in x {
                match (v.as_f64(), y[k].as_f64()) {
                    (Some(p), Some(q)) => assert!(close(p, q), "{k}: {p} vs {q}"),
                    _ => assert_eq!(v, &y[k], "{k}"),
                }
            }
        }
        let read = |run: &Path| -> Vec<(String, Vec<f32>)> {
            let mut t =
                Tensor::read_safetensors(run.join("checkpoints/last/model.safetensors")).unwrap();
            t.sort_by(|x, y| x.0.cmp(&y.0));
            t.into_iter()
                .map(|(n, t)| (n, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
                .collect()
        };
        for ((n, x), (m, y)) in read(&part).iter().zip(&read(&full)) {
            assert_eq!(n, m);
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() <= 1e-5 * p.abs().max(1.0), "{n}: {p} vs {q}");
            }
        }

        // A checkpoint of another config is refused, naming the difference.
        let mut other = ft_opts(dir.path(), &part, None);
        other.epochs = Some(4);
        other.resume = Resume::Auto;
        let err = format!("{:#}", finetune(&other).unwrap_err());
        assert!(
            err.contains("another config") && err.contains("epochs"),
            "{err}"
        );
    }

    /// Issue 5: partial fine-tuning of the last k blocks: everything below is frozen
    /// (not in the optimiser) and stays bit-identical after a training run.
    #[test]
    fn issue5_partial_finetune_trains_only_the_last_blocks() {
        let _rng = crate::train::testing::seeded(0); // libtorch's global generator
        let dir = tempfile::tempdir().unwrap();
        let data = train_and_val(dir.path());
        let mut o = ft_opts(&data, &dir.path().join("ft"), None);
        o.epochs = Some(1);
        o.sets.push("train_last_blocks=1".into());
        let cfg = build_config(&o).unwrap();
        tch::manual_seed((cfg.seed >> 1) as i64);
        let net = Classifier::new(&cfg.net_config(), Device::Cpu).unwrap();
        freeze_all_but_last(&net, 1);
        let opt = optimizer(&net, &cfg).unwrap();
        let trained: Vec<String> = opt.layout().concat();
        assert!(
            trained.iter().all(|n| !n.starts_with("blocks.0.")
                && !n.starts_with("patch_embed")
                && n != "cls_token"),
            "{trained:?}"
        );
        assert!(
            trained.iter().any(|n| n.starts_with("blocks.1."))
                && trained.contains(&"head.weight".to_string())
        );
        // Two optimiser steps on the same net: the frozen part stays bit-identical.
        let mut opt = opt;
        // (copies: on the CPU, `cpu_tensors` shares the live storage)
        let before: Vec<(String, Tensor)> = net
            .cpu_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        for step in 0..2 {
            let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
            let y = Tensor::from_slice(&[0i64, 1, 2, 3]);
            let loss = net
                .logits(&x, true, false)
                .unwrap()
                .cross_entropy_for_logits(&y);
            loss.backward();
            let _ = opt.step(1e-2 * (step + 1) as f64, None).unwrap();
        }
        for ((name, a), (_, b)) in before.iter().zip(net.cpu_tensors()) {
            let frozen = name.starts_with("blocks.0.")
                || name.starts_with("patch_embed")
                || name == "cls_token";
            if frozen {
                assert!(a.equal(&b), "{name} changed");
            } else if name == "head.weight" || name == "blocks.1.mlp.fc1.weight" {
                assert!(!a.equal(&b), "{name} did not train");
            }
        }
        // And the whole run takes the option.
        finetune(&o).unwrap();
        let mut bad = o.clone();
        bad.sets.push("train_last_blocks=3".into());
        let e = format!("{:#}", build_config(&bad).unwrap_err());
        assert!(e.contains("train_last_blocks"), "{e}");
    }

    /// The body of each rank of `issue6_finetune_under_torchrun` (no-op otherwise).
    #[test]
    fn finetune_rank_child() {
        let Some(out) = std::env::var_os("CONMIM_FT_CHILD_OUT") else {
            return;
        };
        let out = PathBuf::from(out);
        let data = out.parent().unwrap().join("data");
        let mut o = ft_opts(&data, &out, None);
        o.epochs = Some(1);
        // Epochs of the run, and the epoch after which it stops ("EPOCHS:STOP").
        if let Ok(spec) = std::env::var("CONMIM_FT_CHILD_EPOCHS_STOP") {
            let (epochs, stop) = spec.split_once(':').unwrap();
            o.epochs = Some(epochs.parse().unwrap());
            o.stop_after_epoch = Some(stop.parse().unwrap());
        }
        if let Ok(b) = std::env::var("CONMIM_FT_CHILD_BATCH") {
            o.batch = Some(b.parse().unwrap());
        }
        let s = finetune(&o).unwrap();
        let r = s.last.unwrap();
        println!(
            "FT_OK samples {} val {} acc1 {:.4}",
            s.samples, r.images, r.acc1
        );
        // `conmim eval` of the result, shared by the ranks.
        let e = eval_last(&out, &data);
        println!(
            "EVAL_OK ranks {} {}",
            e.ranks,
            serde_json::to_string(&e.result).unwrap()
        );
    }

    /// `conmim eval` of `out`'s `checkpoints/last` on `data`'s val split (batch 3, CPU).
    fn eval_last(out: &Path, data: &Path) -> EvalReport {
        let opts = SourceOptions {
            split: "val".into(),
            allow_pipe: false,
            ..SourceOptions::default()
        };
        let last = out.join("checkpoints/last");
        eval_checkpoint(
            &last,
            data.to_str().unwrap(),
            &opts,
            3,
            1,
            Some("cpu"),
            false,
        )
        .unwrap()
    }

    /// Issue 6: `conmim finetune` under `torchrun --nproc-per-node 2` (Gloo, CPU):
    /// global batch 4 = 2 per rank over disjoint shards, and the evaluation counts every
    /// validation sample exactly once across the ranks (3 on one, 4 on the other), with
    /// the same result on both ranks; rank 0 writes the run directory; and the two
    /// replicas end with the same weights (the run checks it: gradients averaged).
    #[test]
    fn issue6_finetune_under_torchrun() {
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = train_and_val(dir.path());
        let out = dir.path().join("ft");
        let o =
            crate::train::testing::torchrun(2, "train::finetune::run::tests::finetune_rank_child")
                .env("CONMIM_FT_CHILD_OUT", &out)
                .env("CONMIM_DIST_TIMEOUT_S", "120")
                .output()
                .unwrap();
        let text = crate::train::testing::output_text(&o);
        assert!(o.status.success(), "{text}");
        let oks: Vec<&str> = text.lines().filter(|l| l.contains("FT_OK")).collect();
        assert_eq!(oks.len(), 2, "{text}");
        assert!(oks[0].contains("samples 12 val 7"), "{text}");
        let same = |l: &str| l[l.find("FT_OK").unwrap()..].to_owned();
        assert_eq!(same(oks[0]), same(oks[1]), "ranks agree on the evaluation");
        // `conmim eval` under torchrun: the two ranks read their own shards and both get
        // the one-process result.
        let evals: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once("EVAL_OK ranks 2 ").map(|(_, j)| j))
            .collect();
        assert_eq!(evals.len(), 2, "{text}");
        let one = eval_last(&out, &data);
        assert_eq!(one.ranks, 1);
        for e in evals {
            let e: EvalResult = serde_json::from_str(e).unwrap();
            assert_eq!(
                (e.images, e.acc1, e.acc5),
                (7, one.result.acc1, one.result.acc5)
            );
            assert!((e.loss - one.result.loss).abs() < 1e-5, "{e:?} {one:?}");
        }
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["last"]["images"], 7);
        assert!(out.join("checkpoints/last/model.safetensors").is_file());
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(
            lines.lines().count(),
            3 + 1,
            "rank 0 alone wrote 3 steps + 1 eval"
        );

        // The first epoch of a 2-epoch run on 2 ranks, the second resumed in one process
        // (another world size: the data goes on with what is left of its epoch, split for
        // one process).
        let out = dir.path().join("ft-then-one");
        let o =
            crate::train::testing::torchrun(2, "train::finetune::run::tests::finetune_rank_child")
                .env("CONMIM_FT_CHILD_OUT", &out)
                .env("CONMIM_FT_CHILD_EPOCHS_STOP", "2:1")
                .env("CONMIM_DIST_TIMEOUT_S", "120")
                .output()
                .unwrap();
        let text = crate::train::testing::output_text(&o);
        assert!(o.status.success(), "{text}");
        let mut o = ft_opts(&data, &out, None);
        o.epochs = Some(2);
        o.resume = Resume::Auto;
        let s = finetune(&o).unwrap();
        assert_eq!((s.epochs_done, s.resumed_at_step), (2, 3));
        assert_eq!((s.samples, s.last.unwrap().images), (24, 7));
        // The first epoch's evaluation (logged at step 3) is in the resumed TensorBoard
        // session too, which starts at step 3 and so hides the earlier file's point.
        let first_eval: serde_json::Value = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v.get("acc1").is_some())
            .unwrap();
        assert_eq!(first_eval["step"], 3);
        let resumed = crate::train::tensorboard::read::event_files(&out.join("tb"))
            .iter()
            .map(|p| crate::train::tensorboard::read::events(p))
            .find(|ev| ev[1].session_status.is_some() && ev[1].step == 3)
            .expect("the resumed session");
        let val: Vec<(u64, f32)> = resumed[2..]
            .iter()
            .flat_map(|e| {
                e.scalars
                    .iter()
                    .filter(|(t, _)| t == "val/acc1")
                    .map(move |(_, v)| (e.step, *v))
            })
            .collect();
        assert_eq!(
            val[0],
            (3, first_eval["acc1"].as_f64().unwrap() as f32),
            "{val:?}"
        );

        // A global batch of 6 is 3 per rank: odd, so mixup cannot pair it with its flip;
        // an error at the start that says what to use.
        let out = dir.path().join("ft-odd");
        let o =
            crate::train::testing::torchrun(2, "train::finetune::run::tests::finetune_rank_child")
                .env("CONMIM_FT_CHILD_OUT", &out)
                .env("CONMIM_FT_CHILD_BATCH", "6")
                .env("CONMIM_DIST_TIMEOUT_S", "120")
                .output()
                .unwrap();
        let text = crate::train::testing::output_text(&o);
        assert!(!o.status.success(), "{text}");
        assert!(
            text.contains("3 samples per rank on 2 ranks") && text.contains("multiple of 4"),
            "{text}"
        );
    }

    /// The train / val options of [`labelled`] data.
    fn split(name: &str) -> SourceOptions {
        SourceOptions {
            split: name.into(),
            allow_pipe: false,
            ..SourceOptions::default()
        }
    }

    /// `conmim knn` of pretraining run `run`'s teacher on `data` (train -> val, CPU).
    fn knn_of_run(run: &Path, data: &Path) -> super::super::knn::KnnResult {
        let d = data.to_str().unwrap();
        let (t, v) = (split("train"), split("val"));
        super::super::knn::knn(
            run,
            Weights::Teacher,
            (d, &t),
            (d, &v),
            20,
            0.07,
            4,
            1,
            Some("cpu"),
        )
        .unwrap()
    }

    /// `conmim linear` of `run`'s teacher on `data` (30 epochs, lr 1e-2, CPU).
    fn probe_of_run(run: &Path, data: &Path) -> LinearResult {
        let d = data.to_str().unwrap();
        let (t, v) = (split("train"), split("val"));
        linear_probe(
            run,
            Weights::Teacher,
            (d, &t),
            (d, &v),
            30,
            1e-2,
            4,
            1,
            Some("cpu"),
            0,
        )
        .unwrap()
    }

    /// The body of each rank of `issue6_knn_monitor_and_knn_under_torchrun` (no-op
    /// otherwise): a 2-rank pretraining run with the k-NN monitor, then `conmim knn` of
    /// its checkpoint.
    #[test]
    fn knn_torchrun_child() {
        let Some(dir) = std::env::var_os("CONMIM_KNN_CHILD_DIR") else {
            return;
        };
        let dir = PathBuf::from(dir);
        let data = dir.join("data");
        if std::env::var_os("CONMIM_KNN_CHILD_OTHER_K").is_some() {
            // Rank 1 asks for another k than rank 0, over the same run.
            let d = data.to_str().unwrap();
            let k = if std::env::var("RANK").as_deref() == Ok("1") {
                5
            } else {
                20
            };
            let (t, v) = (split("train"), split("val"));
            let pre = dir.join("pre");
            let r = super::super::knn::knn(
                &pre,
                Weights::Teacher,
                (d, &t),
                (d, &v),
                k,
                0.07,
                4,
                1,
                Some("cpu"),
            );
            println!(
                "KNN_ERR {}",
                r.err().map_or("none".into(), |e| format!("{e:#}"))
            );
            return;
        }
        pretrain_micro(&data, &dir.join("pre"));
        let k = knn_of_run(&dir.join("pre"), &data);
        println!("KNN_OK {}", serde_json::to_string(&k).unwrap());
        let lp = probe_of_run(&dir.join("pre"), &data);
        println!("LINEAR_OK {}", serde_json::to_string(&lp).unwrap());
    }

    /// Issue 6: under torchrun (2 ranks, Gloo) the pretraining k-NN monitor and `conmim
    /// knn` share the work (each rank reads its own shards, both ranks get the result)
    /// and give the accuracy of the one-process k-NN of the same checkpoint.
    #[test]
    fn issue6_knn_monitor_and_knn_under_torchrun() {
        if !crate::train::testing::gloo_built() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = train_and_val(dir.path());
        let o =
            crate::train::testing::torchrun(2, "train::finetune::run::tests::knn_torchrun_child")
                .env("CONMIM_KNN_CHILD_DIR", dir.path())
                .env("CONMIM_DIST_TIMEOUT_S", "120")
                .output()
                .unwrap();
        let text = crate::train::testing::output_text(&o);
        assert!(o.status.success(), "{text}");
        let oks: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| {
                l.split_once("KNN_OK ")
                    .map(|(_, j)| serde_json::from_str(j).unwrap())
            })
            .collect();
        assert_eq!(oks.len(), 2, "{text}");
        assert_eq!(oks[0], oks[1], "both ranks get the result");
        let k = &oks[0];
        assert_eq!(
            (
                &k["ranks"],
                &k["train_images"],
                &k["val_images"],
                &k["classes"]
            ),
            (&2.into(), &12.into(), &7.into(), &4.into()),
            "{k}"
        );
        // One process, same checkpoint.
        let pre = dir.path().join("pre");
        let one = knn_of_run(&pre, &data);
        assert_eq!(one.ranks, 1);
        assert_eq!(
            (k["acc1"].as_f64(), k["acc5"].as_f64()),
            (Some(one.acc1), Some(one.acc5))
        );
        // The monitor ran at the step-2 checkpoint (the final weights): rank 0 logged it,
        // with the same accuracy.
        let m = std::fs::read_to_string(pre.join("metrics.jsonl")).unwrap();
        let line: serde_json::Value = m
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v.get("knn_acc1").is_some())
            .expect("a k-NN line");
        assert_eq!(line["step"], 2);
        assert_eq!(
            (line["knn_acc1"].as_f64(), line["knn_acc5"].as_f64()),
            (Some(one.acc1), Some(one.acc5))
        );
        assert_eq!(m.matches("knn_acc1").count(), 1, "rank 0 alone logs: {m}");

        // `conmim linear`: the ranks share the feature pass, then fit the same probe on
        // all of it (here in the one-process row order: one train shard per rank).
        let lps: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| {
                l.split_once("LINEAR_OK ")
                    .map(|(_, j)| serde_json::from_str(j).unwrap())
            })
            .collect();
        assert_eq!(lps.len(), 2, "{text}");
        assert_eq!(lps[0], lps[1], "both ranks fit the same probe");
        let one = probe_of_run(&pre, &data);
        let lp = &lps[0];
        assert_eq!(
            (&lp["ranks"], &lp["train_images"], &lp["val_images"]),
            (&2.into(), &12.into(), &7.into())
        );
        assert_eq!(
            (lp["acc1"].as_f64(), lp["train_acc1"].as_f64()),
            (Some(one.acc1), Some(one.train_acc1)),
            "{lp} vs {one:?}"
        );

        // Ranks that ask for another k would merge candidate lists of other lengths:
        // both fail at once instead, rank 1 naming the setting.
        let o =
            crate::train::testing::torchrun(2, "train::finetune::run::tests::knn_torchrun_child")
                .env("CONMIM_KNN_CHILD_DIR", dir.path())
                .env("CONMIM_KNN_CHILD_OTHER_K", "1")
                .env("CONMIM_DIST_TIMEOUT_S", "120")
                .output()
                .unwrap();
        let text = crate::train::testing::output_text(&o);
        assert!(
            text.contains("conmim knn: rank 1 runs with other settings than rank 0 (k: rank 0 20, this rank 5)")
                && text.contains("conmim knn: the settings of rank 1 differ from rank 0's"),
            "{text}"
        );
    }

    /// Issue 5: 13 validation samples in shards of 5, 3 and 5, batch 4 (not a multiple):
    /// every sample evaluated exactly once, and the accuracy equals a direct count over
    /// a plain forward pass of each sample.
    #[test]
    fn issue5_evaluation_sees_every_sample_exactly_once() {
        let _rng = crate::train::testing::seeded(0); // libtorch's global generator
        let dir = tempfile::tempdir().unwrap();
        labelled(dir.path(), "val", &[5, 3, 5], 4);
        let cfg = build_config(&ft_opts(dir.path(), dir.path(), None)).unwrap();
        tch::manual_seed(0);
        let net = Classifier::new(&cfg.net_config(), Device::Cpu).unwrap();
        let data = dir.path().to_str().unwrap();
        let opts = SourceOptions {
            split: "val".into(),
            allow_pipe: false,
            ..SourceOptions::default()
        };
        let r = evaluate(&net, data, &opts, 36, 4, 2, false).unwrap();
        assert_eq!(r.images, 13);
        // Reference: batch 1, one thread.
        let lc = eval_loader_config(32, 36, 1, 1);
        let mut keys = Vec::new();
        let (mut c1, mut c5) = (0, 0);
        for b in Loader::open(data, &opts, lc).unwrap() {
            let b = b.unwrap();
            keys.push(b.keys()[0].clone());
            let x = Tensor::from_slice(b.weak()).view([1, 32, 32, 3]);
            let l = net.logits_u8(&x, false, false).unwrap();
            let order = Vec::<i64>::try_from(l.argsort(1, true).view(-1)).unwrap();
            let label = b.labels()[0];
            c1 += (order[0] == label) as u32;
            c5 += order[..4].contains(&label) as u32;
        }
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 13);
        assert!(
            (r.acc1 - 100.0 * c1 as f64 / 13.0).abs() < 1e-9,
            "{r:?} vs {c1}"
        );
        assert!(
            (r.acc5 - 100.0 * c5 as f64 / 13.0).abs() < 1e-9,
            "{r:?} vs {c5}"
        );
        assert_eq!(r.acc5, 100.0, "4 classes: top-5 always hits");
    }

    /// Issue 5: pretrain -> fine-tune from the teacher (mapping logged, shared table
    /// expanded), evaluation each epoch, best/last checkpoints, `conmim eval` and k-NN
    /// on the result; bad input gives clear errors.
    #[test]
    fn issue5_finetune_from_a_pretraining_run() {
        let _rng = crate::train::testing::seeded(0); // libtorch's global generator
        let dir = tempfile::tempdir().unwrap();
        let data = train_and_val(dir.path());
        let pre = dir.path().join("pre");
        pretrain_micro(&data, &pre);
        // The k-NN monitor wrote its line at the (step-2) checkpoint.
        let m = std::fs::read_to_string(pre.join("metrics.jsonl")).unwrap();
        let knn_line: serde_json::Value = m
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v.get("knn_acc1").is_some())
            .expect("a k-NN line");
        assert_eq!(knn_line["step"], 2);
        // `--resume auto` on the finished run keeps that line, and writes the point again
        // into its TensorBoard session, which starts at step 2 (TensorBoard drops the
        // earlier files' points from there on).
        let mut again = pretrain_micro_opts(&data, &pre);
        again.resume = Resume::Auto;
        pretrain(&again).unwrap();
        let m2 = std::fs::read_to_string(pre.join("metrics.jsonl")).unwrap();
        assert_eq!(m2, m, "the resume kept every line");
        let files = crate::train::tensorboard::read::event_files(&pre.join("tb"));
        assert_eq!(files.len(), 2, "{files:?}");
        let resumed = files
            .iter()
            .map(|p| crate::train::tensorboard::read::events(p))
            .find(|ev| ev[1].session_status.is_some() && ev[1].step == 2)
            .expect("the resumed session");
        let knn_tb: Vec<(u64, f32)> = resumed[2..]
            .iter()
            .flat_map(|e| {
                e.scalars
                    .iter()
                    .filter(|(t, _)| t == "knn/acc1")
                    .map(move |(_, v)| (e.step, *v))
            })
            .collect();
        assert_eq!(knn_tb, [(2, knn_line["knn_acc1"].as_f64().unwrap() as f32)]);

        let out = dir.path().join("ft");
        let s = finetune(&ft_opts(&data, &out, Some(pre.clone()))).unwrap();
        assert_eq!((s.epochs, s.steps_per_epoch, s.steps), (2, 3, 6));
        assert_eq!(s.samples, 24);
        let last = s.last.unwrap();
        assert_eq!(last.images, 7);
        let init: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("init.json")).unwrap()).unwrap();
        assert_eq!(init["weights"], "teacher");
        let loaded: Vec<&str> = init["loaded"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(loaded.contains(&"blocks.1.attn.relative_position_bias_table"));
        assert!(loaded.contains(&"patch_embed.proj.weight"));
        let new = init["new"].to_string();
        assert!(
            new.contains("head.weight") && new.contains("fc_norm.weight"),
            "{new}"
        );
        let ignored = init["ignored"].to_string();
        assert!(
            ignored.contains("projectors") && ignored.contains("mask_token"),
            "{ignored}"
        );
        assert!(init["expanded"].to_string().contains("rel_pos_bias"));
        // The backbone really is the teacher's.
        let (src, _, _) = model::read_source(&pre, Weights::Teacher).unwrap();
        let fresh = Classifier::new(
            &build_config(&ft_opts(&data, &out, None))
                .unwrap()
                .net_config(),
            Device::Cpu,
        )
        .unwrap();
        model::map_into(
            &fresh,
            src.iter()
                .map(|(k, t)| (k.clone(), t.shallow_clone()))
                .collect(),
        )
        .unwrap();
        let v = fresh.vs.variables();
        assert!(
            v["blocks.0.attn.relative_position_bias_table"]
                .equal(&src["rel_pos_bias.relative_position_bias_table"])
        );

        // Metrics: 6 train lines and 2 eval lines; checkpoints; eval reproduces `last`.
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(text.lines().filter(|l| l.contains("\"acc1\"")).count(), 2);
        assert_eq!(
            text.lines().filter(|l| l.contains("\"grad_norm\"")).count(),
            6
        );
        let opts = SourceOptions {
            split: "val".into(),
            allow_pipe: false,
            ..SourceOptions::default()
        };
        let EvalReport {
            result: r,
            checkpoint: ck,
            ..
        } = eval_checkpoint(
            &out.join("checkpoints/last"),
            data.to_str().unwrap(),
            &opts,
            3,
            1,
            Some("cpu"),
            false,
        )
        .unwrap();
        assert_eq!(r.images, 7);
        assert!(
            (r.acc1 - last.acc1).abs() < 1e-9 && (r.loss - last.loss).abs() < 1e-4,
            "{r:?} {last:?}"
        );
        assert!(ck.ends_with("checkpoints/last"));
        assert!(out.join("checkpoints/best/model.safetensors").is_file());
        assert!(out.join("summary.json").is_file());
        let tb = crate::train::tensorboard::read::event_files(&out.join("tb"));
        assert_eq!(tb.len(), 1);

        // k-NN on the pretrained teacher (train -> val) and on the fine-tuned model.
        let topts = SourceOptions {
            split: "train".into(),
            allow_pipe: false,
            ..SourceOptions::default()
        };
        let d = data.to_str().unwrap();
        for src in [&pre, &out] {
            let k = super::super::knn::knn(
                src,
                Weights::Teacher,
                (d, &topts),
                (d, &opts),
                20,
                0.07,
                4,
                1,
                Some("cpu"),
            )
            .unwrap();
            assert_eq!(
                (k.train_images, k.val_images, k.classes, k.k),
                (12, 7, 4, 20)
            );
            assert!((0.0..=100.0).contains(&k.acc1) && k.acc5 >= k.acc1, "{k:?}");
        }

        // Linear probe on the teacher's frozen features.
        let lp = linear_probe(
            &pre,
            Weights::Teacher,
            (d, &topts),
            (d, &opts),
            30,
            1e-2,
            4,
            1,
            Some("cpu"),
            0,
        )
        .unwrap();
        assert_eq!((lp.train_images, lp.val_images, lp.classes), (12, 7, 4));
        assert!(
            lp.train_acc1 > 50.0,
            "a linear fit of 12 points, 4 classes: {lp:?}"
        );

        // Bad input. Labels outside the head.
        let mut o = ft_opts(&data, &dir.path().join("bad1"), None);
        o.num_classes = Some(2);
        let e = format!("{:#}", finetune(&o).unwrap_err());
        assert!(e.contains("outside the head's 0..2"), "{e}");
        // A checkpoint of another architecture.
        let mut o = ft_opts(&data, &dir.path().join("bad2"), Some(pre.clone()));
        o.sets.push("model.depth=3".into());
        let e = format!("{:#}", finetune(&o).unwrap_err());
        assert!(e.contains("another architecture"), "{e}");
        // An empty validation set.
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        labelled(&empty, "val", &[0], 4);
        let e = format!(
            "{:#}",
            eval_checkpoint(
                &out,
                empty.to_str().unwrap(),
                &opts,
                4,
                1,
                Some("cpu"),
                false
            )
            .unwrap_err()
        );
        assert!(e.contains("no samples"), "{e}");
        // A pretraining checkpoint is not a fine-tuning one.
        let e = format!(
            "{:#}",
            eval_checkpoint(&pre, d, &opts, 4, 1, Some("cpu"), false).unwrap_err()
        );
        assert!(e.contains("no fine-tuning checkpoint"), "{e}");
        // Nothing of the good run was touched by the failures.
        assert!(out.join("checkpoints/last/model.safetensors").is_file());
    }
}
