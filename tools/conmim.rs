//! `conmim`: the ConMIM pretraining tool. Subcommands:
//!
//! * `preview` — a picture grid of what the model is fed (weak view | strong view |
//!   masked view per sample), built exactly as the training loader builds it for the
//!   same `(seed, epoch, sample)`.
//! * `pretrain` (feature `train`) — ConMIM pretraining with presets after the paper's
//!   Table 11, checkpoints and exact resume.
//! * `export` (feature `train`) — a run's backbone (the teacher's, by default), or a
//!   fine-tuned classifier, as a safetensors state dict that timm loads strictly.
//! * `finetune`, `eval`, `knn` (feature `train`) — classification fine-tuning with the
//!   paper's recipe, exact-once evaluation of its checkpoints, and the k-NN monitor.
//!
//! Thin layer: parse -> validated config -> library calls -> summary / exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[path = "error_line.rs"]
mod error_line;
#[path = "source_args.rs"]
mod source_args;
#[path = "train_hint.rs"]
mod train_hint;
use source_args::SourceArgs;

use conmim::augment::views::ViewMaker;
use conmim::loader::{
    DEFAULT_IMAGE_SIZE, IMAGE_EXTS, MaskConfig, MaskKind, image_member, mask_rng,
};
use conmim::preview::{self, PreviewRow};
use conmim::stream::{DEFAULT_SEED, DEFAULT_SHUFFLE_BUFFER, DEFAULT_SPLIT, Stream, StreamConfig};

const EXAMPLES: &str = "\
Examples:
  conmim preview --data /data/in1k-wds -n 16 --out preview.png
  conmim preview --data '/data/in1k-wds/train-{000000..000146}.tar' --mask cell --epoch 3
  conmim preview --data https://example.org/in1k/train.manifest.json --seed 7";

/// The subcommands that need libtorch (cargo feature `train`).
const TRAIN_COMMANDS: [&str; 6] = ["pretrain", "export", "finetune", "eval", "knn", "linear"];

/// ConMIM pretraining: look at the data, train.
#[derive(Parser)]
#[command(name = "conmim", version, after_help = train_hint::after_help(EXAMPLES, &TRAIN_COMMANDS))]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Cmd {
    /// Write a picture grid of weak view, strong view and masked view per sample, so a
    /// person can see what the model is fed.
    ///
    /// Samples are taken in stream order (rank 0 of 1, the loader's shard and sample
    /// shuffle for --seed and --epoch), and each sample's views and mask are built from
    /// (seed, epoch, sample number) exactly as the training loader builds them.
    /// Layout: one row per sample, tiles weak | strong | masked (masked patches greyed,
    /// with their patch grid), 4-pixel white gaps.
    Preview(PreviewArgs),
    /// ConMIM pretraining (student ViT + momentum teacher, patch-level InfoNCE).
    ///
    /// Config: --preset (tiny, small, base, large: the paper's Table 11), then
    /// --config FILE (.json/.toml), then --set KEY=VALUE, then the flags. --lr is given as in
    /// the paper, for a batch of 2048, and scaled linearly to --batch (lr * batch /
    /// 2048; min_lr likewise). Writes OUT/config.json, OUT/metrics.jsonl (one line per
    /// step), atomic checkpoints in OUT/checkpoints/step-N (the last --keep), and
    /// OUT/summary.json. `--resume auto` continues from the newest checkpoint in OUT
    /// exactly (same batches, same random draws); with another number of torchrun ranks
    /// than the checkpoint's, the model and optimiser still resume exactly, and the data
    /// goes on with the shards of its epoch that the saved ranks had not read through,
    /// split anew.
    ///
    /// SIGTERM (a scheduler's preemption) or Ctrl-C stops the run after the step in
    /// progress, with a checkpoint of it, and exits with status 143 (130 for Ctrl-C);
    /// under torchrun every rank stops at the same step. A second Ctrl-C stops at once.
    #[cfg(feature = "train")]
    Pretrain(PretrainArgs),
    /// Export a run's backbone for fine-tuning elsewhere.
    ///
    /// Reads the newest complete checkpoint of RUN (or the checkpoint directory given)
    /// and writes the TEACHER's backbone (the official fine-tuning starts from it;
    /// --weights student for the student's) as a safetensors state dict that timm
    /// loads with strict=True: BEiT-style runs into timm's Beit (the shared relative
    /// position bias table copied into every block), timm-style runs into timm's
    /// VisionTransformer. The mask token and the projection head are dropped. Prints
    /// what was written and the Python line that loads it (also stored in the file's
    /// metadata).
    #[cfg(feature = "train")]
    Export(ExportArgs),
    /// Fine-tune a classifier (ImageNet recipe of the paper's Table 12).
    ///
    /// Config: --preset (small, base, large), then --config FILE, then --set KEY=VALUE,
    /// then the flags. Initialises from --init (a pretraining run or checkpoint
    /// directory: the teacher's backbone by default; a fine-tuning run or checkpoint;
    /// or an exported .safetensors), or
    /// randomly without it; a backbone pretrained at another --image-size has its
    /// position terms resampled. Mean-pooled patch tokens + fc_norm + linear head (init
    /// x 0.001), layer-wise lr decay, AdamW (0.9, 0.999), warmup + cosine, RandAugment,
    /// random erasing, mixup/cutmix with label smoothing. Evaluates on --val-split
    /// (resize 256 bicubic + centre crop 224, every sample exactly once) after every
    /// --eval-every epochs and at the end; writes OUT/metrics.jsonl, OUT/tb/,
    /// OUT/checkpoints/{last,best}, OUT/init.json (what was loaded, new, ignored,
    /// resampled), OUT/summary.json. `conmim export OUT` writes the classifier for timm.
    ///
    /// SIGTERM or Ctrl-C stops the run after the step in progress with a resumable
    /// checkpoints/last of it (exit status 143, 130 for Ctrl-C; `--resume auto`
    /// continues mid-epoch); under torchrun every rank stops at the same step.
    #[cfg(feature = "train")]
    Finetune(FinetuneArgs),
    /// Evaluate a fine-tuning checkpoint on a dataset (top-1 / top-5, every sample
    /// exactly once); prints one JSON object. Under torchrun the ranks share the work
    /// (each reads its own shards) and rank 0 prints.
    #[cfg(feature = "train")]
    Eval(EvalArgs),
    /// Weighted k-NN accuracy (DINO's: k=20, T=0.07) of a backbone's frozen features
    /// (mean of the patch tokens, L2-normalised) between a train and a val dataset; prints
    /// one JSON object. A monitor of pretraining quality. Under torchrun the ranks share
    /// the work (each reads its own shards) and rank 0 prints.
    #[cfg(feature = "train")]
    Knn(KnnArgs),
    /// Linear probe on a backbone's frozen features (the k-NN features, standardised):
    /// a linear classifier trained with Adam on the train set, top-1 / top-5 on val;
    /// prints one JSON object. A weak metric for MIM features (the paper says so);
    /// partial fine-tuning is `conmim finetune --set train_last_blocks=K`. Under
    /// torchrun the ranks share the feature pass and rank 0 prints.
    #[cfg(feature = "train")]
    Linear(LinearArgs),
}

#[cfg(feature = "train")]
#[derive(Args)]
struct LinearArgs {
    #[command(flatten)]
    features: FeatureArgs,
    /// Passes over the train features.
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Adam learning rate (cosine to 0).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of the head init and the minibatch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[cfg(feature = "train")]
fn linear_cmd(a: &LinearArgs) -> Result<()> {
    let f = &a.features;
    let (train, val) = f.datasets()?;
    let r = conmim::train::finetune::run::linear_probe(
        &f.checkpoint,
        weights_of(f.weights),
        (&f.train_data, &train),
        (&val.0, &val.1),
        a.epochs,
        a.lr,
        f.batch,
        f.threads,
        f.device.as_deref(),
        a.seed,
    )?;
    if r.rank == 0 {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

#[cfg(feature = "train")]
#[derive(Args)]
struct FinetuneArgs {
    /// Preset: small, base, large.
    #[arg(long, default_value = "base")]
    preset: String,
    /// JSON or TOML file of config overrides (keys as in OUT/config.json).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Config override KEY=VALUE (dotted keys, JSON values); repeatable.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Training dataset (directory, manifest, brace pattern, list, URL).
    #[arg(long)]
    data: String,
    /// Training split.
    #[arg(long, default_value = "train")]
    split: String,
    /// Validation dataset (default: --data).
    #[arg(long)]
    val_data: Option<String>,
    /// Validation split.
    #[arg(long, default_value = "val")]
    val_split: String,
    #[command(flatten)]
    source: SourceArgs,
    /// Pretrained weights: a pretraining run or checkpoint directory, a fine-tuning run
    /// or checkpoint (the head too, when the label set fits), or a .safetensors.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Which network of a pretraining checkpoint.
    #[arg(long, value_enum, default_value_t = WeightsArg::Teacher)]
    init_weights: WeightsArg,
    /// Run directory.
    #[arg(long)]
    out: PathBuf,
    /// Epochs.
    #[arg(long)]
    epochs: Option<u32>,
    /// Total batch size.
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate AT BATCH 1024 (scaled linearly to --batch).
    #[arg(long)]
    lr: Option<f64>,
    /// Classes of the head (default 1000).
    #[arg(long)]
    num_classes: Option<i64>,
    /// Input side in pixels, e.g. 384. A --init pretrained at another size (same patch
    /// size) has its position terms resampled to the new patch grid; eval_resize follows
    /// the official recipe (256 at 224, the size itself from 384) unless a --config or
    /// --set names it.
    #[arg(long)]
    image_size: Option<i64>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Loader threads.
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, cuda or cuda:N (default: CUDA when available).
    #[arg(long)]
    device: Option<String>,
    /// Evaluate every N epochs (and after the last).
    #[arg(long, default_value_t = 1)]
    eval_every: u32,
    /// `auto` (OUT/checkpoints/last, written after every epoch, else fresh) or a
    /// checkpoint directory. Without it, an OUT that holds a checkpoint is refused.
    #[arg(long)]
    resume: Option<String>,
    /// Stop cleanly after epoch N (checkpoint written), e.g. to fit a job's time slot;
    /// `--resume auto` continues the same run (a resume already past epoch N trains
    /// nothing).
    #[arg(long, value_name = "N")]
    stop_after_epoch: Option<u32>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[cfg(feature = "train")]
fn resume_of(r: Option<&str>) -> conmim::train::run::Resume {
    use conmim::train::run::Resume;
    match r {
        None => Resume::No,
        Some("auto") => Resume::Auto,
        Some(p) => Resume::Path(PathBuf::from(p)),
    }
}

#[cfg(feature = "train")]
fn weights_of(w: WeightsArg) -> conmim::train::export::Weights {
    match w {
        WeightsArg::Teacher => conmim::train::export::Weights::Teacher,
        WeightsArg::Student => conmim::train::export::Weights::Student,
    }
}

/// Whether this process prints the run's summary: a plain run, or rank 0 of a
/// torchrun job (every rank holds the same global figures; torch scripts print once).
#[cfg(feature = "train")]
fn rank_zero() -> bool {
    std::env::var("RANK").map_or(true, |r| r.trim() == "0")
}

/// `"{cmd}: "` on rank 0 (or without torchrun), `"{cmd} (rank N): "` on the others: each
/// rank reports the samples its own loader skipped.
#[cfg(feature = "train")]
fn rank_prefix(cmd: &str) -> String {
    match std::env::var("RANK") {
        Ok(r) if r.trim() != "0" => format!("{cmd} (rank {}): ", r.trim()),
        _ => format!("{cmd}: "),
    }
}

#[cfg(feature = "train")]
fn finetune_cmd(a: &FinetuneArgs) -> Result<()> {
    use conmim::train::finetune::run::{FinetuneOptions, finetune};
    let o = FinetuneOptions {
        preset: a.preset.clone(),
        config_file: a.config.clone(),
        sets: a.sets.clone(),
        data: a.data.clone(),
        train_split: a.split.clone(),
        val_data: a.val_data.clone(),
        val_split: a.val_split.clone(),
        allow_pipe: a.source.allow_pipe,
        http: a.source.http()?,
        init: a.init.clone(),
        init_weights: weights_of(a.init_weights),
        out: a.out.clone(),
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        num_classes: a.num_classes,
        image_size: a.image_size,
        seed: a.seed,
        threads: a.threads,
        device: a.device.clone(),
        eval_every: a.eval_every,
        progress: !a.quiet,
        resume: resume_of(a.resume.as_deref()),
        stop_after_epoch: a.stop_after_epoch,
    };
    let s = finetune(&o)?;
    // Stopped by SIGTERM / SIGINT (a resumable checkpoint written): as for pretrain.
    let status = s
        .stopped_by
        .as_deref()
        .map(conmim::train::signals::exit_status);
    // Every rank names what its loader skipped (capped by `--set max_errors=N`).
    let skipped = || {
        source_args::print_skipped(
            &rank_prefix("finetune"),
            s.skipped_samples,
            s.shard_errors,
            &s.errors,
        )
    };
    if !rank_zero() {
        skipped();
        if let Some(code) = status {
            std::process::exit(code);
        }
        return Ok(());
    }
    let fmt = |r: &Option<conmim::train::finetune::run::EvalResult>| {
        r.map_or("-".to_owned(), |r| {
            format!("top-1 {:.2}% top-5 {:.2}%", r.acc1, r.acc5)
        })
    };
    println!(
        "finetune: {}/{} epochs x {} steps, {} samples in {:.1} s ({:.1} img/s), final loss {}; last {}; best {} (epoch {}); checkpoint {}",
        s.epochs_done,
        s.epochs,
        s.steps_per_epoch,
        s.samples,
        s.wall_s,
        s.img_s,
        s.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        fmt(&s.last),
        fmt(&s.best),
        s.best_epoch.map_or("-".into(), |e| e.to_string()),
        s.checkpoint.display()
    );
    skipped();
    if let Some(code) = status {
        std::process::exit(code);
    }
    Ok(())
}

#[cfg(feature = "train")]
#[derive(Args)]
struct EvalArgs {
    /// Fine-tuning checkpoint directory, or its run directory (best, else last).
    checkpoint: PathBuf,
    /// Dataset.
    #[arg(long)]
    data: String,
    /// Split.
    #[arg(long, default_value = "val")]
    split: String,
    #[command(flatten)]
    source: SourceArgs,
    /// Batch size (per rank under torchrun).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Loader threads (0 = all cores; under torchrun, the node's cores / ranks per node).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu, cuda or cuda:N (default: under torchrun the rank's LOCAL_RANK GPU, else CUDA
    /// when available).
    #[arg(long)]
    device: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[cfg(feature = "train")]
fn eval_cmd(a: &EvalArgs) -> Result<()> {
    let opts = a.source.options(&a.split)?;
    let r = conmim::train::finetune::run::eval_checkpoint(
        &a.checkpoint,
        &a.data,
        &opts,
        a.batch,
        a.threads,
        a.device.as_deref(),
        !a.quiet,
    )?;
    if r.rank == 0 {
        let mut v = serde_json::to_value(r.result)?;
        v["checkpoint"] = r.checkpoint.display().to_string().into();
        v["ranks"] = r.ranks.into();
        println!("{v}");
    }
    Ok(())
}

#[cfg(feature = "train")]
#[derive(Args)]
struct FeatureArgs {
    /// Pretraining run / checkpoint directory, or a fine-tuning checkpoint.
    checkpoint: PathBuf,
    /// Which network of a pretraining checkpoint.
    #[arg(long, value_enum, default_value_t = WeightsArg::Teacher)]
    weights: WeightsArg,
    /// Labelled dataset for the neighbours / the probe's training (its --train-split).
    #[arg(long)]
    train_data: String,
    #[arg(long, default_value = "train")]
    train_split: String,
    /// Labelled dataset to classify (default: --train-data).
    #[arg(long)]
    val_data: Option<String>,
    #[arg(long, default_value = "val")]
    val_split: String,
    /// Batch size of the feature pass (per rank under torchrun).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Loader threads (0 = all cores; under torchrun, the node's cores / ranks per node).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu, cuda or cuda:N (default: under torchrun the rank's LOCAL_RANK GPU, else CUDA
    /// when available).
    #[arg(long)]
    device: Option<String>,
    #[command(flatten)]
    source: SourceArgs,
}

#[cfg(feature = "train")]
#[derive(Args)]
struct KnnArgs {
    #[command(flatten)]
    features: FeatureArgs,
    /// Neighbours.
    #[arg(long, default_value_t = conmim::train::finetune::knn::KNN_K)]
    k: usize,
    /// Vote temperature.
    #[arg(long, default_value_t = conmim::train::finetune::knn::KNN_TEMPERATURE)]
    temperature: f64,
}

#[cfg(feature = "train")]
fn knn_cmd(a: &KnnArgs) -> Result<()> {
    let f = &a.features;
    let (train, val) = f.datasets()?;
    let r = conmim::train::finetune::knn::knn(
        &f.checkpoint,
        weights_of(f.weights),
        (&f.train_data, &train),
        (&val.0, &val.1),
        a.k,
        a.temperature,
        f.batch,
        f.threads,
        f.device.as_deref(),
    )?;
    if r.rank == 0 {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

#[cfg(feature = "train")]
impl FeatureArgs {
    /// The source options of the train split, and the val dataset with its options.
    fn datasets(
        &self,
    ) -> Result<(
        conmim::stream::SourceOptions,
        (String, conmim::stream::SourceOptions),
    )> {
        let train = self.source.options(&self.train_split)?;
        let vopts = self.source.options(&self.val_split)?;
        let val = self
            .val_data
            .clone()
            .unwrap_or_else(|| self.train_data.clone());
        Ok((train, (val, vopts)))
    }
}

#[cfg(feature = "train")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    /// timm's state dict (`timm.create_model(...).load_state_dict(..., strict=True)`).
    Timm,
}

#[cfg(feature = "train")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum WeightsArg {
    /// The momentum teacher.
    Teacher,
    /// The student.
    Student,
}

#[cfg(feature = "train")]
#[derive(Args)]
struct ExportArgs {
    /// Pretraining run directory (its newest complete checkpoint) or checkpoint
    /// directory: the backbone; or a fine-tuning run (its best checkpoint) or checkpoint:
    /// the whole classifier, head included.
    run: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ExportFormat::Timm)]
    format: ExportFormat,
    /// Output file (.safetensors; written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Which network's backbone (of a pretraining checkpoint).
    #[arg(long, value_enum, default_value_t = WeightsArg::Teacher)]
    weights: WeightsArg,
}

#[cfg(feature = "train")]
fn export_cmd(a: &ExportArgs) -> Result<()> {
    use conmim::train::export::{ExportOptions, Weights, export_timm};
    let opts = ExportOptions {
        weights: match a.weights {
            WeightsArg::Teacher => Weights::Teacher,
            WeightsArg::Student => Weights::Student,
        },
    };
    let s = match a.format {
        ExportFormat::Timm => export_timm(&a.run, &a.out, &opts)?,
    };
    let what = match &s.classifier {
        Some(c) => format!("fine-tuned classifier ({c})"),
        None => format!("{} backbone", opts.weights.prefix()),
    };
    println!(
        "export: {} tensors ({} values, {} bytes) of the {what} ({:?} variant) from {} (step {}) -> {}",
        s.tensors,
        s.numel,
        s.bytes,
        s.variant,
        s.checkpoint.display(),
        s.step,
        s.out.display()
    );
    for e in &s.expanded {
        println!("  expanded: {e}");
    }
    for d in &s.dropped {
        println!("  dropped:  {d}");
    }
    println!("load it with:\n{}", s.python);
    Ok(())
}

#[cfg(feature = "train")]
#[derive(Args)]
struct PretrainArgs {
    /// Model preset: tiny, small, base, large.
    #[arg(long, default_value = "small")]
    preset: String,
    /// JSON or TOML file of config overrides (keys as in OUT/config.json), e.g.
    /// configs/pretrain-small.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Config override KEY=VALUE (dotted keys, JSON values), e.g.
    /// --set model.drop_path_rate=0.1; repeatable.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Dataset directory, manifest, brace pattern, list file, .tar, URL.
    #[arg(long)]
    data: String,
    /// Split whose manifest a dataset directory is read for.
    #[arg(long, default_value = DEFAULT_SPLIT)]
    split: String,
    #[command(flatten)]
    source: SourceArgs,
    /// Run directory.
    #[arg(long)]
    out: PathBuf,
    /// Total optimiser steps of the run (the schedules' length; a preset alone runs
    /// 1000, a config file may set `total_steps` or `epochs`).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// The run's length in epochs of the training data instead of steps: total steps =
    /// round(E * samples / batch), samples from the dataset's manifest (so another
    /// --batch keeps the recipe's epochs and warmup epochs).
    #[arg(long)]
    epochs: Option<f64>,
    /// Batch size, over all ranks (a preset alone: the paper's 2048, which needs
    /// several GPUs; lr scales linearly from it).
    #[arg(long)]
    batch: Option<usize>,
    /// View side in pixels.
    #[arg(long)]
    image_size: Option<i64>,
    /// Peak learning rate AT BATCH 2048 (scaled linearly to --batch).
    #[arg(long)]
    lr: Option<f64>,
    /// Warmup steps (default: the preset's warmup fraction of --steps).
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Seed of init, drop path and data.
    #[arg(long)]
    seed: Option<u64>,
    /// Loader threads.
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, cuda or cuda:N (default: CUDA when available).
    #[arg(long)]
    device: Option<String>,
    /// `auto` (newest checkpoint in OUT, else fresh) or a checkpoint directory.
    #[arg(long)]
    resume: Option<String>,
    /// Save a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 1000)]
    save_every: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Under torchrun: synchronised BatchNorm in the projection heads (statistics over
    /// every rank's rows, as torch.nn.SyncBatchNorm) instead of per-rank statistics (the
    /// official code's). Same as --set sync_bn=true.
    #[arg(long)]
    sync_bn: bool,
    /// k-NN monitor: labelled dataset of the neighbours; with it, every checkpoint also
    /// logs the teacher's k-NN accuracy (metrics.jsonl `knn_acc1`, TensorBoard knn/*).
    /// Under torchrun the ranks share it (each reads its own shards).
    #[arg(long)]
    knn_train_data: Option<String>,
    #[arg(long, default_value = "train")]
    knn_train_split: String,
    /// k-NN monitor: the dataset classified (default: --knn-train-data).
    #[arg(long)]
    knn_val_data: Option<String>,
    #[arg(long, default_value = "val")]
    knn_val_split: String,
}

#[cfg(feature = "train")]
fn pretrain_options(a: &PretrainArgs) -> Result<conmim::train::run::PretrainOptions> {
    use conmim::train::run::PretrainOptions;
    let resume = resume_of(a.resume.as_deref());
    Ok(PretrainOptions {
        preset: a.preset.clone(),
        config_file: a.config.clone(),
        sets: a
            .sets
            .iter()
            .cloned()
            .chain(a.sync_bn.then(|| "sync_bn=true".to_owned()))
            .collect(),
        data: a.data.clone(),
        split: a.split.clone(),
        allow_pipe: a.source.allow_pipe,
        http: a.source.http()?,
        out: a.out.clone(),
        steps: a.steps,
        epochs: a.epochs,
        batch: a.batch,
        image_size: a.image_size,
        lr: a.lr,
        warmup_steps: a.warmup_steps,
        seed: a.seed,
        threads: a.threads,
        device: a.device.clone(),
        resume,
        save_every: a.save_every,
        keep: a.keep,
        progress: !a.quiet,
        knn: a
            .knn_train_data
            .as_ref()
            .map(|t| conmim::train::run::KnnMonitor {
                train: t.clone(),
                train_split: a.knn_train_split.clone(),
                val: a.knn_val_data.clone().unwrap_or_else(|| t.clone()),
                val_split: a.knn_val_split.clone(),
                k: conmim::train::finetune::knn::KNN_K,
                temperature: conmim::train::finetune::knn::KNN_TEMPERATURE,
            }),
        faults: Default::default(),
    })
}

#[cfg(feature = "train")]
fn pretrain_cmd(a: &PretrainArgs) -> Result<()> {
    let s = conmim::train::run::pretrain(&pretrain_options(a)?)?;
    // Stopped by SIGTERM / SIGINT (checkpoint written): the conventional status of a
    // process that signal ended, so that schedulers and scripts see an unfinished run.
    let status = s
        .stopped_by
        .as_deref()
        .map(conmim::train::signals::exit_status);
    // Every rank names what its loader skipped (capped by `--set max_errors=N`).
    let skipped = || {
        source_args::print_skipped(
            &rank_prefix("pretrain"),
            s.skipped_samples,
            s.shard_errors,
            &s.errors,
        )
    };
    if !rank_zero() {
        skipped();
        if let Some(code) = status {
            std::process::exit(code);
        }
        return Ok(());
    }
    println!(
        "pretrain: {} steps ({} -> {} of {}), {} samples in {:.1} s ({:.1} img/s, {:.0}% waiting for data), final loss {}, checkpoint {}",
        s.steps,
        s.start_step,
        s.start_step + s.steps,
        s.total_steps,
        s.samples,
        s.wall_s,
        s.img_s,
        100.0 * s.data_wait_frac,
        s.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.checkpoint
            .as_ref()
            .map_or("-".into(), |p| p.display().to_string()),
    );
    skipped();
    if let Some(code) = status {
        std::process::exit(code);
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MaskArg {
    /// Random 75% of the patches (ConMIM ViT-S: 147 of 196).
    Patch,
    /// Random 75% of the 32-px cells (ConMIM ViT-B/L: 37 of 49 cells = 148 patches).
    Cell,
    /// BEiT block-wise masking (75 of 196 patches).
    Block,
}

impl From<MaskArg> for MaskKind {
    fn from(m: MaskArg) -> Self {
        match m {
            MaskArg::Patch => MaskKind::Patch,
            MaskArg::Cell => MaskKind::Cell,
            MaskArg::Block => MaskKind::Block,
        }
    }
}

#[derive(Args)]
struct PreviewArgs {
    /// Dataset directory, manifest, brace pattern, list file, single .tar, http(s) URL
    /// or pipe:CMD (with --allow-pipe).
    #[arg(long)]
    data: String,
    /// Split whose manifest a dataset directory is read for.
    #[arg(long, default_value = DEFAULT_SPLIT)]
    split: String,
    /// Samples (rows) to show.
    #[arg(short = 'n', long = "num", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    n: u32,
    /// Output PNG (written atomically).
    #[arg(long, default_value = "preview.png")]
    out: PathBuf,
    /// Seed of the shuffles, the augmentation and the masks (the loader's stream seed).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Epoch to show (its shard order, sample order and random parameters).
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// View side in pixels (a multiple of the 16-px patch).
    #[arg(long, default_value_t = DEFAULT_IMAGE_SIZE)]
    size: u32,
    /// Mask generator.
    #[arg(long, value_enum, default_value_t = MaskArg::Patch)]
    mask: MaskArg,
    /// Sample shuffle buffer; keep the training value to see the samples training sees.
    #[arg(long, default_value_t = DEFAULT_SHUFFLE_BUFFER)]
    shuffle_buffer: usize,
    #[command(flatten)]
    source: SourceArgs,
}

/// One sample of the picture.
struct Shown {
    key: String,
    weak: Vec<u8>,
    strong: Vec<u8>,
    mask: Vec<u8>,
}

fn preview_cmd(a: &PreviewArgs) -> Result<()> {
    let mask_cfg = MaskConfig::for_kind(a.mask.into());
    let masker = mask_cfg.build(a.size).with_context(|| {
        let mask = a.mask.to_possible_value().expect("no skipped values");
        format!("--size {} with --mask {}", a.size, mask.get_name())
    })?;
    let grid = masker.grid();
    let patch = mask_cfg.patch_size;
    let opts = a.source.options(&a.split)?;
    let cfg = StreamConfig {
        seed: a.seed,
        shuffle_buffer: a.shuffle_buffer,
        epochs: Some(a.epoch.saturating_add(1)),
        ..StreamConfig::default()
    };
    let mut stream =
        Stream::open(&a.data, &opts, cfg).with_context(|| format!("opening {}", a.data))?;
    if a.epoch > 0 {
        let mut state = stream.state();
        state.epoch = a.epoch;
        state.samples = 0;
        state.events = 0;
        stream
            .restore(&state)
            .context("moving the stream to --epoch")?;
    }

    let limits = conmim::loader::LoaderConfig::default().limits;
    let view_len = a.size as usize * a.size as usize * 3;
    let mut maker = ViewMaker::new();
    let mut rows: Vec<Shown> = Vec::new();
    let (mut skipped, mut shard_errors) = (0u64, 0u64);
    while rows.len() < a.n as usize {
        let Some(s) = stream.next_sample() else { break };
        for (url, e) in stream.take_errors() {
            shard_errors += 1;
            eprintln!("shard error: {url}: {e}");
        }
        let (shard, key, number) = (&s.sample.shard, &s.sample.key, s.number);
        let Some(bytes) = image_member(&s.sample) else {
            skipped += 1;
            let exts: Vec<&str> = s.sample.members.iter().map(|(e, _)| e.as_str()).collect();
            eprintln!(
                "skip {shard} {key}: no image member (one of {}); the sample has {exts:?}",
                IMAGE_EXTS.join(", ")
            );
            continue;
        };
        let (mut weak, mut strong) = (vec![0u8; view_len], vec![0u8; view_len]);
        let params = match maker.conmim_pair(
            bytes,
            &limits,
            a.seed,
            s.epoch,
            number,
            a.size,
            &mut weak,
            &mut strong,
        ) {
            Ok(p) => p,
            Err(e) => {
                skipped += 1;
                eprintln!("skip {shard} {key}: {e}");
                continue;
            }
        };
        let mut mask = vec![0u8; grid.num_patches()];
        let masked = masker.generate(&mut mask_rng(a.seed, s.epoch, number), &mut mask);
        let c = params.crop;
        let st = params.strong;
        let mut strong_ops = Vec::new();
        if st.jitter.apply {
            strong_ops.push("jitter");
        }
        if st.grayscale {
            strong_ops.push("gray");
        }
        if st.blur.is_some() {
            strong_ops.push("blur");
        }
        if st.solarize {
            strong_ops.push("solarize");
        }
        let label = s
            .sample
            .member("cls")
            .map(|b| String::from_utf8_lossy(b).trim().to_owned())
            .unwrap_or_else(|| "-".into());
        println!(
            "row {:>3}: {shard} {key} (epoch {}, sample {number}, cls {label}) crop {}x{}+{}+{}{} strong [{}] masked {masked}/{}",
            rows.len(),
            s.epoch,
            c.width,
            c.height,
            c.left,
            c.top,
            if params.flip { " flipped" } else { "" },
            strong_ops.join(" "),
            grid.num_patches(),
        );
        rows.push(Shown {
            key: key.clone(),
            weak,
            strong,
            mask,
        });
    }
    for (url, e) in stream.take_errors() {
        shard_errors += 1;
        eprintln!("shard error: {url}: {e}");
    }
    if rows.is_empty() {
        bail!(
            "no sample of epoch {} could be shown ({skipped} skipped, {shard_errors} shard errors)",
            a.epoch
        );
    }
    let view: Vec<PreviewRow<'_>> = rows
        .iter()
        .map(|r| PreviewRow {
            key: &r.key,
            weak: &r.weak,
            strong: &r.strong,
            mask: &r.mask,
        })
        .collect();
    let layout = preview::write_preview(&a.out, &view, a.size, patch)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if rows.len() < a.n as usize {
        eprintln!(
            "note: epoch {} ended after {} usable samples (-n {})",
            a.epoch,
            rows.len(),
            a.n
        );
    }
    println!(
        "preview: {} samples shown, {skipped} skipped, {shard_errors} shard errors; wrote {} ({}x{} px: rows of weak | strong | masked, {}-px views, {}-px patches)",
        rows.len(),
        a.out.display(),
        layout.width(),
        layout.height(),
        a.size,
        patch,
    );
    Ok(())
}

fn main() -> ExitCode {
    train_hint::exit_if_missing("conmim", &TRAIN_COMMANDS);
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Preview(a) => preview_cmd(a),
        #[cfg(feature = "train")]
        Cmd::Pretrain(a) => pretrain_cmd(a),
        #[cfg(feature = "train")]
        Cmd::Export(a) => export_cmd(a),
        #[cfg(feature = "train")]
        Cmd::Finetune(a) => finetune_cmd(a),
        #[cfg(feature = "train")]
        Cmd::Eval(a) => eval_cmd(a),
        #[cfg(feature = "train")]
        Cmd::Knn(a) => knn_cmd(a),
        #[cfg(feature = "train")]
        Cmd::Linear(a) => linear_cmd(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conmim: error: {}", error_line::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand's flags are consistent (clap checks names, conflicts and
    /// defaults), with and without `--features train`.
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// A build without `train` names the feature for a training command (and only then);
    /// a build with it parses them.
    #[test]
    fn training_commands_name_the_missing_feature() {
        for sub in TRAIN_COMMANDS {
            let msg = train_hint::missing_train_feature("conmim", sub, &TRAIN_COMMANDS);
            assert_eq!(msg.is_some(), !cfg!(feature = "train"), "{sub}");
            if let Some(m) = msg {
                assert!(m.contains("--features train") && m.contains(sub), "{m}");
            }
            let parsed = Cli::try_parse_from(["conmim", sub, "--help"]);
            // With `train`, --help is clap's DisplayHelp "error"; without, no such command.
            let kind = parsed.err().map(|e| e.kind());
            assert_eq!(
                kind == Some(clap::error::ErrorKind::DisplayHelp),
                cfg!(feature = "train"),
                "{sub}: {kind:?}"
            );
        }
        for other in ["preview", "--help", "help"] {
            assert_eq!(
                train_hint::missing_train_feature("conmim", other, &TRAIN_COMMANDS),
                None
            );
        }
        let help = train_hint::after_help(EXAMPLES, &TRAIN_COMMANDS);
        assert!(help.starts_with(EXAMPLES));
        assert_eq!(
            help.contains("pretrain, export"),
            !cfg!(feature = "train"),
            "{help}"
        );
    }

    /// `--sync-bn` is `--set sync_bn=true`, after the user's own `--set`s.
    #[cfg(feature = "train")]
    #[test]
    fn sync_bn_flag_sets_the_config_key() {
        let args = |extra: &[&str]| {
            let base = [
                "conmim", "pretrain", "--data", "d", "--out", "o", "--set", "seed=3",
            ];
            let cli = Cli::try_parse_from(base.iter().chain(extra)).unwrap();
            let Cmd::Pretrain(a) = cli.cmd else {
                panic!("not pretrain")
            };
            pretrain_options(&a).unwrap().sets
        };
        assert_eq!(args(&[]), ["seed=3"]);
        assert_eq!(args(&["--sync-bn"]), ["seed=3", "sync_bn=true"]);
    }
}
