//! `conmim-bench`: loader throughput, its per-stage cost, and the PyTorch peer side by
//! side. Thin CLI over [`conmim::loader`]; see `conmim-bench loader --help`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[path = "error_line.rs"]
mod error_line;
#[path = "source_args.rs"]
mod source_args;
#[path = "train_hint.rs"]
mod train_hint;
use source_args::SourceArgs;

use conmim::image::ImageLimits;
use conmim::image::pixels::Decoder;
use conmim::loader::{Loader, LoaderConfig, LoaderStats, MaskConfig, MaskKind, Task};
use conmim::stream::{Mode, SourceOptions, Stream, StreamConfig};

#[derive(Parser)]
#[command(
    name = "conmim-bench",
    version,
    about = "Benchmarks of the conmim data path",
    after_help = train_hint::after_help("", &["train"]).trim_start().to_owned()
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Loader throughput (img/s) with a per-stage breakdown, CPU use, queue depths and
    /// peak RSS; also a plain single-thread decode of the same files (the "moonshot"
    /// ratio). `--json` prints one JSON object.
    Loader(LoaderArgs),
    /// Runs `loader` and then the PyTorch reference path (tools/bench/torch_loader.py:
    /// webdataset + PIL + torchvision, same transform and mask) with the same
    /// settings, and prints both and the per-core ratio.
    Compare(CompareArgs),
    /// Thread scaling: runs `loader` with 1 thread and with `--threads` threads, N times
    /// alternating (1, N, 1, N, ...), and prints each round's speed-up and the median
    /// (alternating exposes both to the same drift of a shared machine).
    Scaling(ScalingArgs),
    /// Writes an ImageNet-like benchmark dataset: photo-like JPEGs of typical ImageNet
    /// sizes (500x375, 375x500, 500x333, 640x480, ...) at quality 75-96, in shards with
    /// a manifest (no Parquet index; the loader needs none).
    MakeData(MakeDataArgs),
    /// Training throughput of the ConMIM step (feature `train`): img/s for a preset on
    /// synthetic device-side input, or on the real loader with the fraction of time
    /// waiting for data. Compare with tools/bench/torch_train.py on the same GPU.
    #[cfg(feature = "train")]
    Train(TrainArgs),
}

#[cfg(feature = "train")]
#[derive(Args)]
struct TrainArgs {
    /// Model preset: tiny, small, base, large.
    #[arg(long, default_value = "small")]
    preset: String,
    /// timm-style backbone (absolute position embedding) instead of BEiT-style.
    #[arg(long)]
    timm_style: bool,
    /// Images per step.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Measured steps.
    #[arg(long, default_value_t = 30)]
    steps: u64,
    /// Steps before measuring.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// cpu, cuda or cuda:N (default: CUDA when available).
    #[arg(long)]
    device: Option<String>,
    /// fp32 instead of bf16 autocast on CUDA.
    #[arg(long)]
    no_amp: bool,
    /// Train on this dataset through the loader (default: synthetic input on the device).
    #[arg(long)]
    data: Option<String>,
    /// Split to read from a dataset directory.
    #[arg(long, default_value = "train")]
    split: String,
    /// Loader threads (0: the machine's cores, divided by LOCAL_WORLD_SIZE under
    /// torchrun).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// View side (default: the preset's 224).
    #[arg(long)]
    image_size: Option<i64>,
    /// After timing, profile 3 more steps and write libtorch's Chrome trace here
    /// (summarise with tools/bench/trace_summary.py). Synthetic input only: refused
    /// with --data.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "train")]
fn bench_train(a: &TrainArgs) -> Result<()> {
    use conmim::train::bench::{TrainBenchOptions, bench_train};
    let device = conmim::train::run::parse_device(a.device.as_deref())?;
    let r = bench_train(&TrainBenchOptions {
        preset: a.preset.clone(),
        timm_style: a.timm_style,
        batch: a.batch,
        steps: a.steps,
        warmup: a.warmup,
        device,
        amp: !a.no_amp,
        data: a.data.clone(),
        split: a.split.clone(),
        threads: a.threads,
        image_size: a.image_size,
        profile: a.profile.clone(),
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} ({}, {}): {:.1} img/s, {:.1} ms/step, batch {}, waiting for data {:.1}%, \
             peak GPU memory {}, loss {:.4} -> {:.4}",
            r.model,
            r.variant,
            r.input,
            r.img_per_s,
            r.step_ms,
            r.batch,
            100.0 * r.data_wait_frac,
            r.peak_mem_bytes
                .map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or_else(|| "n/a".into()),
            r.loss_first,
            r.loss_last
        );
    }
    Ok(())
}

#[derive(Args)]
struct MakeDataArgs {
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 2000)]
    images: usize,
    /// Images per shard.
    #[arg(long, default_value_t = 500)]
    per_shard: usize,
    /// Number of classes (labels are `i % classes`).
    #[arg(long, default_value_t = 100)]
    classes: usize,
    /// Split name.
    #[arg(long, default_value = "train")]
    split: String,
    /// Seed of the pixels, sizes and qualities.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum TaskArg {
    /// Weak + strong views and a patch mask.
    Conmim,
    /// Crop + flip only.
    ClassifyTrain,
    /// Resize + centre crop.
    ClassifyEval,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum MaskArg {
    Patch,
    Cell,
    Block,
}

#[derive(Args, Clone)]
struct LoaderArgs {
    /// Dataset directory (with `{split}.manifest.json`), shard pattern, list file or URL.
    #[arg(long)]
    data: String,
    /// Split to read from a dataset directory.
    #[arg(long, default_value = "train")]
    split: String,
    /// Decoding threads (besides one reader and one collator thread).
    #[arg(long, default_value_t = conmim::loader::default_threads())]
    threads: usize,
    /// Samples per batch.
    #[arg(long, default_value_t = conmim::loader::DEFAULT_BATCH_SIZE)]
    batch: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Batches consumed before measuring (default: max(2, 2 x threads), as the PyTorch
    /// peer: with N workers its first N batches arrive together). `compare` passes the
    /// value used here to the peer.
    #[arg(long, value_name = "N")]
    warmup_batches: Option<usize>,
    /// View side.
    #[arg(long, default_value_t = conmim::loader::DEFAULT_IMAGE_SIZE)]
    size: u32,
    /// What each sample becomes.
    #[arg(long, value_enum, default_value = "conmim")]
    task: TaskArg,
    /// Mask generator (conmim task).
    #[arg(long, value_enum, default_value = "patch")]
    mask: MaskArg,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sample shuffle buffer.
    #[arg(long, default_value_t = conmim::stream::DEFAULT_SHUFFLE_BUFFER)]
    shuffle_buffer: usize,
    /// Seconds of the single-thread plain-decode baseline: zune-jpeg full decodes of the
    /// stream's first 256 images (0 = skip).
    #[arg(long, default_value_t = 3.0)]
    decode_seconds: f64,
    /// Corrupt samples tolerated (skipped, counted in the report, the first ones named
    /// on stderr) before the run fails; default: skip them all.
    #[arg(long, value_name = "N")]
    max_errors: Option<u64>,
    #[command(flatten)]
    source: SourceArgs,
    /// Print one JSON object on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompareArgs {
    #[command(flatten)]
    loader: LoaderArgs,
    /// Python interpreter with torch, torchvision, webdataset (default:
    /// $CONMIM_PYTHON, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// The peer script.
    #[arg(long, default_value = "tools/bench/torch_loader.py")]
    peer: PathBuf,
    /// Run the pair this many times, alternating (ours, peer, ours, peer, ...), and
    /// report every round's ratio and their median: on a shared or throttling machine
    /// the speed drifts over minutes, and alternating exposes both sides to the same
    /// drift.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

#[derive(Args)]
struct ScalingArgs {
    /// The loader settings; `--threads` is the many-thread side (the other is 1).
    #[command(flatten)]
    loader: LoaderArgs,
    /// Pairs of runs (1 thread, then `--threads`).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// Per-image milliseconds of each stage: time inside the stage, summed over threads.
/// That is CPU time while every thread has a core to itself; on an oversubscribed
/// machine it also counts time a thread was descheduled mid-stage (the report's
/// `cpu_ms_per_image` is the process's measured CPU time).
#[derive(Serialize, Debug, Default)]
struct StageMs {
    read: f64,
    decode: f64,
    crop_resize: f64,
    strong_aug: f64,
    mask: f64,
    collate: f64,
    total: f64,
}

#[derive(Serialize, Debug)]
struct Report {
    #[serde(rename = "impl")]
    implementation: &'static str,
    version: &'static str,
    data: String,
    task: String,
    img_per_s: f64,
    per_thread_img_per_s: f64,
    threads: usize,
    batch: usize,
    warmup_batches: usize,
    images: u64,
    seconds: f64,
    image_size: u32,
    stage_ms_per_image: StageMs,
    /// Process CPU time (all threads, /proc) per measured image, in ms.
    cpu_ms_per_image: Option<f64>,
    /// Seconds per measured second that workers waited for input / for a free slot,
    /// and the collator for the consumer (summed over threads).
    wait_input_per_s: f64,
    wait_slot_per_s: f64,
    wait_consumer_per_s: f64,
    /// Process CPU time / wall time (cores kept busy) and that / available cores.
    cpu_cores_busy: Option<f64>,
    cpu_utilisation: Option<f64>,
    cpu_count: usize,
    queue_depths_mean: QueueMeans,
    peak_rss_mb: Option<f64>,
    read_mb_per_s: f64,
    sample_errors: u64,
    shard_errors: u64,
    decode_baseline_img_per_s: Option<f64>,
    decode_baseline_images: usize,
    /// (img_per_s / threads) / decode_baseline_img_per_s.
    moonshot_ratio: Option<f64>,
}

#[derive(Serialize, Debug, Default)]
struct QueueMeans {
    jobs: f64,
    done: f64,
    free_slots: f64,
    batches: f64,
}

fn main() -> std::process::ExitCode {
    train_hint::exit_if_missing("conmim-bench", &["train"]);
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line, as `conmim` prints it (no backtrace for a
            // user's mistake, whatever RUST_BACKTRACE says).
            eprintln!("conmim-bench: error: {}", error_line::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Loader(a) => {
            let r = bench_loader(&a)?;
            print_report(&r, a.json)?;
        }
        Cmd::Compare(c) => compare(&c)?,
        Cmd::Scaling(c) => scaling(&c)?,
        Cmd::MakeData(m) => make_data(&m)?,
        #[cfg(feature = "train")]
        Cmd::Train(t) => bench_train(&t)?,
    }
    Ok(())
}

fn loader_config(a: &LoaderArgs) -> LoaderConfig {
    LoaderConfig {
        stream: StreamConfig {
            seed: a.seed,
            mode: Mode::Resampled,
            shuffle_buffer: a.shuffle_buffer,
            ..StreamConfig::default()
        },
        threads: a.threads,
        batch_size: a.batch,
        image_size: a.size,
        task: match a.task {
            TaskArg::Conmim => Task::ConMim,
            TaskArg::ClassifyTrain => Task::ClassifyTrain,
            TaskArg::ClassifyEval => Task::ClassifyEval,
        },
        mask: MaskConfig::for_kind(match a.mask {
            MaskArg::Patch => MaskKind::Patch,
            MaskArg::Cell => MaskKind::Cell,
            MaskArg::Block => MaskKind::Block,
        }),
        max_errors: a.max_errors,
        ..LoaderConfig::default()
    }
}

/// (user + system CPU seconds of this process, peak RSS in MiB), from /proc.
fn proc_usage() -> (Option<f64>, Option<f64>) {
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0) // USER_HZ is 100 on Linux
        });
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb / 1024.0)
        });
    (cpu, rss)
}

fn sub(a: &LoaderStats, b: &LoaderStats) -> LoaderStats {
    LoaderStats {
        read_s: a.read_s - b.read_s,
        decode_s: a.decode_s - b.decode_s,
        resize_s: a.resize_s - b.resize_s,
        strong_s: a.strong_s - b.strong_s,
        mask_s: a.mask_s - b.mask_s,
        collate_s: a.collate_s - b.collate_s,
        worker_wait_job_s: a.worker_wait_job_s - b.worker_wait_job_s,
        worker_wait_slot_s: a.worker_wait_slot_s - b.worker_wait_slot_s,
        wait_consumer_s: a.wait_consumer_s - b.wait_consumer_s,
        read_bytes: a.read_bytes - b.read_bytes,
        samples: a.samples - b.samples,
        dropped: a.dropped - b.dropped,
        batches: a.batches - b.batches,
        grown_buffers: a.grown_buffers - b.grown_buffers,
    }
}

/// Batches consumed before measuring: `--warmup-batches`, else max(2, 2 x threads).
fn warmup_batches(a: &LoaderArgs) -> usize {
    a.warmup_batches.unwrap_or_else(|| (2 * a.threads).max(2))
}

/// Longest measured window accepted, in seconds (a day).
const MAX_BENCH_SECONDS: f64 = 86_400.0;

fn check_seconds(a: &LoaderArgs) -> Result<()> {
    if !(a.seconds > 0.0 && a.seconds <= MAX_BENCH_SECONDS) {
        bail!(
            "--seconds must be positive and at most {MAX_BENCH_SECONDS} (got {})",
            a.seconds
        );
    }
    if !(a.decode_seconds >= 0.0 && a.decode_seconds <= MAX_BENCH_SECONDS) {
        bail!(
            "--decode-seconds must be 0 (skip) or positive, at most {MAX_BENCH_SECONDS} (got {})",
            a.decode_seconds
        );
    }
    Ok(())
}

fn bench_loader(a: &LoaderArgs) -> Result<Report> {
    check_seconds(a)?;
    let warmup = warmup_batches(a);
    let opts = a.source.options(&a.split)?;
    let cfg = loader_config(a);
    cfg.validate().context("invalid loader settings")?;
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("style"));
    pb.enable_steady_tick(Duration::from_millis(200));

    let baseline = if a.decode_seconds > 0.0 {
        pb.set_message("plain single-thread decode baseline");
        Some(decode_baseline(&a.data, &opts, a.decode_seconds)?)
    } else {
        None
    };

    pb.set_message(format!("warming up ({warmup} batches of {})", a.batch));
    let mut loader =
        Loader::open(&a.data, &opts, cfg).with_context(|| format!("cannot open {}", a.data))?;
    for _ in 0..warmup {
        match loader.next() {
            Some(b) => drop(b.context("loader failed during warm-up")?),
            None => bail!("the data ended during warm-up"),
        }
    }
    let s0 = loader.stats();
    let (cpu0, _) = proc_usage();
    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(a.seconds);
    let mut images = 0u64;
    let mut q = QueueMeans::default();
    let mut nq = 0u64;
    while t0.elapsed() < limit {
        let Some(b) = loader.next() else { break };
        let b = b.context("loader failed")?;
        images += b.len() as u64;
        drop(b);
        let d = loader.queue_depths();
        q.jobs += d.jobs as f64;
        q.done += d.done as f64;
        q.free_slots += d.free_slots as f64;
        q.batches += d.batches as f64;
        nq += 1;
        let el = t0.elapsed().as_secs_f64();
        pb.set_message(format!(
            "{images} images, {:.0} img/s, queues: jobs {} done {} free slots {} batches {}",
            images as f64 / el.max(1e-9),
            d.jobs,
            d.done,
            d.free_slots,
            d.batches
        ));
    }
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, rss) = proc_usage();
    let st = sub(&loader.stats(), &s0);
    let errors = loader.errors();
    drop(loader);
    pb.finish_and_clear();
    let first: Vec<_> = errors
        .shards
        .iter()
        .chain(&errors.samples)
        .cloned()
        .collect();
    source_args::print_skipped("", errors.sample_errors, errors.shard_errors, &first);
    if nq > 0 {
        let n = nq as f64;
        q.jobs /= n;
        q.done /= n;
        q.free_slots /= n;
        q.batches /= n;
    }
    let per = |s: f64| {
        if st.samples > 0 {
            s * 1e3 / st.samples as f64
        } else {
            0.0
        }
    };
    let stage = StageMs {
        read: per(st.read_s),
        decode: per(st.decode_s),
        crop_resize: per(st.resize_s),
        strong_aug: per(st.strong_s),
        mask: per(st.mask_s),
        collate: per(st.collate_s),
        total: per(st.read_s + st.decode_s + st.resize_s + st.strong_s + st.mask_s + st.collate_s),
    };
    let img_per_s = images as f64 / wall;
    let cpu_count = conmim::loader::default_threads();
    let busy = cpu0.zip(cpu1).map(|(a, b)| (b - a) / wall);
    let per_thread = img_per_s / a.threads as f64;
    Ok(Report {
        implementation: "conmim",
        version: env!("CARGO_PKG_VERSION"),
        data: a.data.clone(),
        task: format!("{:?}", a.task).to_lowercase(),
        img_per_s,
        per_thread_img_per_s: per_thread,
        threads: a.threads,
        batch: a.batch,
        warmup_batches: warmup,
        images,
        seconds: wall,
        image_size: a.size,
        stage_ms_per_image: stage,
        cpu_ms_per_image: cpu0
            .zip(cpu1)
            .filter(|_| images > 0)
            .map(|(a, b)| (b - a) * 1e3 / images as f64),
        wait_input_per_s: st.worker_wait_job_s / wall,
        wait_slot_per_s: st.worker_wait_slot_s / wall,
        wait_consumer_per_s: st.wait_consumer_s / wall,
        cpu_cores_busy: busy,
        cpu_utilisation: busy.map(|b| b / cpu_count as f64),
        cpu_count,
        queue_depths_mean: q,
        peak_rss_mb: rss,
        read_mb_per_s: st.read_bytes as f64 / wall / 1e6,
        sample_errors: errors.sample_errors,
        shard_errors: errors.shard_errors,
        decode_baseline_img_per_s: baseline.map(|b| b.0),
        decode_baseline_images: baseline.map_or(0, |b| b.1),
        moonshot_ratio: baseline.map(|b| per_thread / b.0),
    })
}

/// Images kept in memory for the decode baseline.
const BASELINE_IMAGES: usize = 256;

/// Single-thread full decode (zune-jpeg to RGB8, the plain path) of the first
/// [`BASELINE_IMAGES`] images of the stream, repeated for `seconds`:
/// `(img/s, images in the set)`.
fn decode_baseline(data: &str, opts: &SourceOptions, seconds: f64) -> Result<(f64, usize)> {
    let cfg = StreamConfig {
        shuffle_buffer: 0,
        shuffle_shards: false,
        epochs: Some(1),
        ..StreamConfig::default()
    };
    let mut stream = Stream::open(data, opts, cfg)?;
    let mut set = Vec::new();
    while set.len() < BASELINE_IMAGES {
        let Some(s) = stream.next_sample() else { break };
        if let Some(b) = conmim::loader::image_member(&s.sample) {
            set.push(b.to_vec());
        }
    }
    if set.is_empty() {
        bail!("{data}: no image found for the decode baseline");
    }
    let limits = ImageLimits::default();
    let mut d = Decoder::new();
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < seconds {
        for b in &set {
            // Undecodable images count: the loader pays for trying them too.
            let _ = d.decode_rgb(b, &limits);
            n += 1;
        }
    }
    Ok((n as f64 / t.elapsed().as_secs_f64(), set.len()))
}

fn print_report(r: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let s = &r.stage_ms_per_image;
    println!(
        "conmim loader: {:.0} img/s with {} threads ({:.0} img/s per thread), batch {}, {} images in {:.1} s",
        r.img_per_s, r.threads, r.per_thread_img_per_s, r.batch, r.images, r.seconds
    );
    println!(
        "  stage ms per image (summed over threads): read {:.3}, decode {:.3}, crop+resize {:.3}, strong aug {:.3}, mask {:.4}, collate {:.3} (total {:.3})",
        s.read, s.decode, s.crop_resize, s.strong_aug, s.mask, s.collate, s.total
    );
    if let Some(c) = r.cpu_ms_per_image {
        println!("  process CPU ms per image: {c:.3}");
    }
    if let (Some(b), Some(u)) = (r.cpu_cores_busy, r.cpu_utilisation) {
        println!(
            "  CPU: {b:.2} cores busy of {} ({:.0}%)",
            r.cpu_count,
            u * 100.0
        );
    }
    let q = &r.queue_depths_mean;
    println!(
        "  queues (mean): jobs {:.1}, results {:.1}, free slots {:.1}, ready batches {:.1}; waits per s: input {:.2}, slots {:.2}, consumer {:.2}",
        q.jobs,
        q.done,
        q.free_slots,
        q.batches,
        r.wait_input_per_s,
        r.wait_slot_per_s,
        r.wait_consumer_per_s
    );
    if let Some(rss) = r.peak_rss_mb {
        println!("  peak RSS {rss:.0} MiB; read {:.1} MB/s", r.read_mb_per_s);
    }
    if let (Some(d), Some(m)) = (r.decode_baseline_img_per_s, r.moonshot_ratio) {
        println!(
            "  plain decode baseline: {d:.0} img/s on one thread ({} images); moonshot ratio (pipeline per thread / plain decode) {:.0}%",
            r.decode_baseline_images,
            m * 100.0
        );
    }
    if r.sample_errors + r.shard_errors > 0 {
        println!(
            "  skipped: {} samples, {} shards",
            r.sample_errors, r.shard_errors
        );
    }
    Ok(())
}

fn compare(c: &CompareArgs) -> Result<()> {
    let a = &c.loader;
    let python = c
        .python
        .clone()
        .or_else(|| std::env::var_os("CONMIM_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"));
    if !std::path::Path::new(&a.data).is_dir() {
        bail!(
            "compare needs a dataset directory for the peer script, got {}",
            a.data
        );
    }
    // The peer implements the ConMIM pair with the random patch mask only: comparing
    // anything else would time different work.
    if !matches!(a.task, TaskArg::Conmim) || !matches!(a.mask, MaskArg::Patch) {
        bail!(
            "compare runs the peer's ConMIM transform with the random patch mask: use \
             --task conmim --mask patch (got --task {:?} --mask {:?})",
            a.task,
            a.mask
        );
    }
    let mut rounds = Vec::new();
    for round in 1..=c.rounds {
        if c.rounds > 1 {
            eprintln!("round {round}/{}", c.rounds);
        }
        let ours = bench_loader(&LoaderArgs {
            json: true,
            ..a.clone()
        })?;
        let peer = run_peer(&python, &c.peer, a)?;
        let peer_rate = peer["img_per_s"]
            .as_f64()
            .context("peer JSON has no img_per_s")?;
        let peer_threads = peer["threads"].as_u64().unwrap_or(a.threads as u64).max(1) as f64;
        let ratio = (ours.img_per_s / ours.threads as f64) / (peer_rate / peer_threads);
        if c.rounds > 1 {
            eprintln!(
                "round {round}: conmim {:.0} img/s, pytorch {peer_rate:.0} img/s, per-core ratio {ratio:.2}x",
                ours.img_per_s
            );
        }
        rounds.push((ours, peer, peer_rate, peer_threads, ratio));
    }
    let mut ratios: Vec<f64> = rounds.iter().map(|r| r.4).collect();
    let median = sorted_median(&mut ratios);
    if a.json {
        // The last round at the top level, as the text report prints it; every round
        // under `rounds`.
        let (ours, peer, _, _, ratio) = &rounds[rounds.len() - 1];
        let mut j = serde_json::json!({
            "conmim": ours,
            "pytorch": peer,
            "per_core_ratio": if rounds.len() == 1 { *ratio } else { median },
        });
        if rounds.len() > 1 {
            j["rounds"] = rounds
                .iter()
                .map(|(o, p, _, _, r)| serde_json::json!({"conmim": o, "pytorch": p, "per_core_ratio": r}))
                .collect();
            j["per_core_ratio_min"] = ratios[0].into();
            j["per_core_ratio_max"] = ratios[ratios.len() - 1].into();
        }
        println!("{j}");
    } else {
        let (ours, _, peer_rate, peer_threads, ratio) = &rounds[rounds.len() - 1];
        print_report(ours, false)?;
        println!(
            "pytorch peer: {peer_rate:.0} img/s with {peer_threads} workers ({:.0} img/s per worker)",
            peer_rate / peer_threads
        );
        if rounds.len() == 1 {
            println!("per-core ratio conmim / pytorch: {ratio:.1}x");
        } else {
            let each: Vec<String> = rounds.iter().map(|r| format!("{:.2}x", r.4)).collect();
            println!(
                "per-core ratio conmim / pytorch over {} alternating rounds: median {median:.2}x (each: {})",
                rounds.len(),
                each.join(", ")
            );
        }
    }
    Ok(())
}

/// Sorts `v` (not empty) and returns its median.
fn sorted_median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn scaling(c: &ScalingArgs) -> Result<()> {
    let a = &c.loader;
    if a.threads < 2 {
        bail!("scaling compares 1 thread with --threads N: give N >= 2");
    }
    let mut rounds = Vec::new();
    for round in 1..=c.rounds {
        let run = |threads: usize| {
            bench_loader(&LoaderArgs {
                threads,
                json: true,
                decode_seconds: 0.0,
                ..a.clone()
            })
        };
        let one = run(1)?;
        let many = run(a.threads)?;
        let speedup = many.img_per_s / one.img_per_s;
        eprintln!(
            "round {round}/{}: 1 thread {:.0} img/s, {} threads {:.0} img/s, {speedup:.2}x",
            c.rounds, one.img_per_s, a.threads, many.img_per_s
        );
        rounds.push((one.img_per_s, many.img_per_s, speedup));
    }
    let mut speedups: Vec<f64> = rounds.iter().map(|r| r.2).collect();
    let median = sorted_median(&mut speedups);
    if a.json {
        let j = serde_json::json!({
            "threads": a.threads,
            "rounds": rounds
                .iter()
                .map(|(one, many, s)| serde_json::json!({
                    "img_per_s_1": one, "img_per_s_n": many, "speedup": s,
                }))
                .collect::<Vec<_>>(),
            "speedup_median": median,
            "speedup_min": speedups[0],
            "speedup_max": speedups[speedups.len() - 1],
        });
        println!("{j}");
    } else {
        println!(
            "speed-up from 1 to {} threads over {} alternating rounds: median {median:.2}x \
             (range {:.2}-{:.2}x)",
            a.threads,
            rounds.len(),
            speedups[0],
            speedups[speedups.len() - 1]
        );
    }
    Ok(())
}

/// Runs the peer script with the loader's settings and returns its JSON object.
fn run_peer(
    python: &std::path::Path,
    script: &std::path::Path,
    a: &LoaderArgs,
) -> Result<serde_json::Value> {
    eprintln!(
        "running the PyTorch peer: {} {} ({} s)",
        python.display(),
        script.display(),
        a.seconds
    );
    let out = Command::new(python)
        .arg(script)
        .args(["--data", &a.data, "--split", &a.split])
        .args(["--threads", &a.threads.to_string()])
        .args(["--batch", &a.batch.to_string()])
        .args(["--seconds", &a.seconds.to_string()])
        .args(["--seed", &a.seed.to_string()])
        .args(["--size", &a.size.to_string()])
        .args(["--shuffle-buffer", &a.shuffle_buffer.to_string()])
        .args(["--warmup-batches", &warmup_batches(a).to_string()])
        .arg("--json")
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!("the peer script failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("the peer script printed no JSON object")?;
    serde_json::from_str(line).context("peer JSON")
}

/// ImageNet's common sizes.
const BENCH_SIZES: &[(u32, u32)] = &[
    (500, 375),
    (500, 375),
    (375, 500),
    (500, 333),
    (333, 500),
    (500, 400),
    (640, 480),
    (500, 500),
];

fn make_data(m: &MakeDataArgs) -> Result<()> {
    use conmim::format::manifest::{DatasetInfo, Manifest, ShardEntry};
    use conmim::format::tar::ShardWriter;
    use conmim::testkit::{JpegSpec, derive_seed, jpeg};
    use rayon::prelude::*;

    if m.images == 0 || m.per_shard == 0 || m.classes == 0 {
        bail!("--images, --per-shard and --classes must be positive");
    }
    std::fs::create_dir_all(&m.out).with_context(|| format!("creating {}", m.out.display()))?;
    let nshards = m.images.div_ceil(m.per_shard);
    let pb = ProgressBar::new(m.images as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
            .expect("style"),
    );
    let entries: Vec<Result<(ShardEntry, u64)>> = (0..nshards)
        .into_par_iter()
        .map(|s| {
            let name = conmim::format::shard_name(&m.split, s);
            let path = m.out.join(&name);
            let mut w = ShardWriter::create(&path)?;
            let lo = s * m.per_shard;
            let hi = (lo + m.per_shard).min(m.images);
            let mut bytes = 0u64;
            for i in lo..hi {
                let r = derive_seed(m.seed, i as u64);
                let (width, height) = BENCH_SIZES[(r % BENCH_SIZES.len() as u64) as usize];
                let quality = 75 + ((r >> 16) % 22) as u8;
                let spec = JpegSpec {
                    quality,
                    ..JpegSpec::rgb(width, height, r)
                };
                let img = jpeg(&spec);
                bytes += img.len() as u64;
                let key = format!("img{i:08}");
                w.append(
                    &key,
                    &[
                        ("jpg".to_owned(), img),
                        ("cls".to_owned(), (i % m.classes).to_string().into_bytes()),
                    ],
                )?;
                pb.inc(1);
            }
            let f = w.finish()?;
            Ok((
                ShardEntry {
                    url: name,
                    nsamples: (hi - lo) as u64,
                    filesize: f.filesize,
                    md5sum: f.md5sum,
                },
                bytes,
            ))
        })
        .collect();
    pb.finish_and_clear();
    let mut list = Vec::new();
    let mut total = 0;
    for e in entries {
        let (entry, bytes) = e?;
        total += bytes;
        list.push(entry);
    }
    let info = DatasetInfo {
        schema_version: conmim::format::SCHEMA_VERSION,
        tool: conmim::format::manifest::tool_name(),
        dataset: "bench".into(),
        split: m.split.clone(),
        num_samples: m.images as u64,
        num_rejected: 0,
        num_inputs: m.images as u64,
        num_shards: nshards as u64,
        total_bytes: total,
        rejected_by_reason: Default::default(),
        classes: None,
        wnids: None,
        categories: None,
        params: serde_json::json!({"seed": m.seed, "classes": m.classes}),
    };
    let manifest = Manifest::new(&m.split, list, info);
    conmim::format::atomic_write_json(
        &m.out.join(conmim::format::manifest_name(&m.split)),
        &manifest,
    )?;
    eprintln!(
        "wrote {} images ({:.1} MB, {:.0} KB mean) in {nshards} shards to {}",
        m.images,
        total as f64 / 1e6,
        total as f64 / m.images as f64 / 1e3,
        m.out.display()
    );
    Ok(())
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

    /// Without `train`, `conmim-bench train` names the missing feature.
    #[test]
    fn train_names_the_missing_feature() {
        let msg = train_hint::missing_train_feature("conmim-bench", "train", &["train"]);
        assert_eq!(msg.is_some(), !cfg!(feature = "train"));
        assert_eq!(
            train_hint::missing_train_feature("conmim-bench", "loader", &["train"]),
            None
        );
    }
}
