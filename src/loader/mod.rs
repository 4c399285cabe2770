//! The multithreaded loader: a [`Stream`] of raw samples in, batches of ConMIM view
//! pairs (or classification views) out.
//!
//! ```text
//!             jobs (bounded)            done (reorder by seq)       batches (bounded)
//! reader ──> [seq, sample] ──> N workers ──> collator ──> [Batch] ──> consumer
//!  Stream      + markers        decode, crop, flip,   copies slots into      drops the
//!  (1 thread)                   strong ops, mask      pooled batch buffers   Batch: its
//!      ^                        into a free *slot*    in seq order           buffers go
//!      |                            ^        |                               back to the
//!      |                            └─ free slots ─┘                         pool
//! ```
//!
//! * **Order and determinism.** The reader numbers every stream event with a sequence
//!   number `seq`; workers take jobs in any order, and the collator consumes their
//!   results strictly in `seq` order. A sample's random parameters come from
//!   `(seed, rank, epoch, number)` ([`crate::augment::params::sample_rng`] for the
//!   views, [`mask_rng`] for the mask, both with [`rank_seed`]), so batches (pixels,
//!   masks, labels, keys) are the same whatever the thread count, and ranks draw
//!   independently of each other.
//! * **Memory.** A worker takes a free slot (two views + mask) *before* taking a job,
//!   so every job in flight holds a slot and the reorder window is bounded by the slot
//!   count (`2 * threads + 2`); this also makes the ordering deadlock-free (the sample
//!   the collator waits for always owns a slot). Batch buffers come from a pool of
//!   `prefetch + 1` batches that the consumer returns by dropping [`Batch`]es. A
//!   consumer that keeps more batches alive than that (collects them, say) is not
//!   deadlocked: when it waits for a batch while every buffer is in its hands, the
//!   collator allocates one more (counted in [`LoaderStats::grown_buffers`]); the
//!   extra buffers are freed when the pool is full again. Steady state allocates no
//!   output buffers: slots, batch buffers, key strings and each
//!   worker's decode buffers are reused (the raw compressed bytes of each sample are
//!   still read into fresh buffers by the tar reader).
//! * **Errors.** A sample that fails to decode is skipped, counted and logged with its
//!   shard and key ([`ErrorLog`]); more than `max_errors` end the stream with
//!   [`Error::TooManyErrors`]. Shard errors (unreachable, truncated: the samples before
//!   the damage are kept) are logged and the stream moves on. A panicking thread ends
//!   the stream with [`Error::ThreadPanicked`]; no finished sample and no reading
//!   (a resumed epoch's replay and the shuffle buffer's fill read without yielding)
//!   for `stall_timeout_s` seconds ends it with [`Error::Stalled`] (for http shards at
//!   least their retry budget plus [`HTTP_STALL_MARGIN`], so a shard is retried to
//!   the end, then logged, as promised, not mistaken for a stall). Nothing hangs: dropping
//!   the [`Loader`] stops and joins every thread except a reader blocked in I/O,
//!   which is detached and exits at its next step.
//! * **Epochs.** Batches never mix epochs. An epoch's last partial batch is dropped
//!   (`drop_last`, the default for training) or yielded short. With `drop_last`, an
//!   epoch that cannot fill one batch ends the stream with
//!   [`Error::EpochSmallerThanBatch`] (it would otherwise never yield).
//! * **Resume.** Every [`Batch`] carries the [`LoaderState`] to resume after it;
//!   [`Loader::with_state`] continues with exactly the batches an uninterrupted
//!   loader would have yielded next.

mod batch;
mod config;

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use serde::Serialize;

pub use batch::{Batch, LoaderState};
pub use config::{
    DEFAULT_BATCH_SIZE, DEFAULT_BLOCK_MIN_ASPECT, DEFAULT_BLOCK_MIN_PATCHES, DEFAULT_BLOCK_PATCHES,
    DEFAULT_EVAL_RESIZE, DEFAULT_IMAGE_SIZE, DEFAULT_LABEL_EXT, DEFAULT_MASK_CELL,
    DEFAULT_MASK_RATIO, DEFAULT_PATCH_SIZE, DEFAULT_PREFETCH, DEFAULT_STALL_TIMEOUT_S, IMAGE_EXTS,
    LoaderConfig, MAX_ERROR_RECORDS, MAX_STALL_TIMEOUT_S, MaskConfig, MaskKind, Task,
    default_threads, default_threads_per_process,
};

use crate::augment::params::sample_rng;
use crate::augment::views::ViewMaker;
use crate::error::{Error, Result};
use crate::mask::MaskGenerator;
use crate::seed::{SplitMix64, rank_seed};
use crate::stream::{Event, RawSample, SourceOptions, Stream, StreamState};
use batch::BatchBuf;

/// Domain separating the mask's random stream from the views' (`"MASK"`).
pub const MASK_DOMAIN: u64 = 0x4d41_534b;

/// Domain of the classification-training augmentations' random stream (RandAugment,
/// random erasing), `"CLSA"`.
pub const CLASSIFY_AUG_DOMAIN: u64 = 0x434c_5341;
/// ImageNet mean / std (the erased pixels' normalisation).
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The mask's random stream for one sample: [`sample_rng`] with the seed xor
/// [`MASK_DOMAIN`].
pub fn mask_rng(seed: u64, epoch: u64, sample: u64) -> SplitMix64 {
    sample_rng(seed ^ MASK_DOMAIN, epoch, sample)
}

/// The image member of a sample: the first of [`IMAGE_EXTS`] present.
pub fn image_member(sample: &RawSample) -> Option<&[u8]> {
    IMAGE_EXTS.iter().find_map(|ext| sample.member(ext))
}

/// What the stall watchdog waits beyond an http shard's retry budget
/// ([`crate::stream::Opener::retry_budget`]) when that is longer than `stall_timeout_s`.
pub const HTTP_STALL_MARGIN: Duration = Duration::from_secs(60);

/// Parses a label member (ASCII integer, surrounding whitespace allowed).
pub fn parse_label(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// One failed sample or shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedItem {
    /// Shard URL.
    pub shard: String,
    /// Sample key (empty for a shard error).
    pub key: String,
    /// Epoch.
    pub epoch: u64,
    /// What went wrong.
    pub message: String,
}

/// What the loader skipped so far: counts, and the first [`MAX_ERROR_RECORDS`]
/// items of each kind.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ErrorLog {
    /// Samples that failed (all counted).
    pub sample_errors: u64,
    /// Shards that failed to open or were damaged.
    pub shard_errors: u64,
    /// The first failed samples.
    pub samples: Vec<FailedItem>,
    /// The first failed shards.
    pub shards: Vec<FailedItem>,
}

/// Counters shared by the loader's threads (nanoseconds summed over threads).
#[derive(Debug, Default)]
struct Counters {
    read_ns: AtomicU64,
    decode_ns: AtomicU64,
    resize_ns: AtomicU64,
    strong_ns: AtomicU64,
    mask_ns: AtomicU64,
    collate_ns: AtomicU64,
    worker_wait_job_ns: AtomicU64,
    worker_wait_slot_ns: AtomicU64,
    wait_consumer_ns: AtomicU64,
    read_bytes: AtomicU64,
    samples: AtomicU64,
    dropped: AtomicU64,
    batches: AtomicU64,
    grown_buffers: AtomicU64,
}

/// A snapshot of the loader's counters. Stage times are wall time inside each stage,
/// summed over threads: divided by `samples` they give the cost per sample of each
/// stage, which is its CPU cost while every thread has a core to itself (on an
/// oversubscribed machine it includes time a thread was descheduled mid-stage; a
/// thread-CPU clock per stage would cost more than the cheapest stages measure).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LoaderStats {
    /// Seconds the reader spent reading and parsing shards (and shuffling).
    pub read_s: f64,
    /// Seconds decoding images.
    pub decode_s: f64,
    /// Seconds cropping, resizing and flipping.
    pub resize_s: f64,
    /// Seconds in the strong view's photometric ops.
    pub strong_s: f64,
    /// Seconds generating masks.
    pub mask_s: f64,
    /// Seconds copying finished samples into batches.
    pub collate_s: f64,
    /// Seconds workers waited for the reader (starved of input).
    pub worker_wait_job_s: f64,
    /// Seconds workers waited for a free slot (output backed up).
    pub worker_wait_slot_s: f64,
    /// Seconds the collator waited for the consumer to return a batch buffer or take
    /// a batch.
    pub wait_consumer_s: f64,
    /// Compressed bytes read (all members).
    pub read_bytes: u64,
    /// Samples delivered in batches.
    pub samples: u64,
    /// Good samples dropped with an epoch's partial last batch.
    pub dropped: u64,
    /// Batches delivered.
    pub batches: u64,
    /// Batch buffers allocated beyond the pool because the consumer held every pooled
    /// batch while waiting for the next one (0 for a consumer that drops its batches).
    pub grown_buffers: u64,
}

impl Counters {
    fn snapshot(&self) -> LoaderStats {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LoaderStats {
            read_s: s(&self.read_ns),
            decode_s: s(&self.decode_ns),
            resize_s: s(&self.resize_ns),
            strong_s: s(&self.strong_ns),
            mask_s: s(&self.mask_ns),
            collate_s: s(&self.collate_ns),
            worker_wait_job_s: s(&self.worker_wait_job_ns),
            worker_wait_slot_s: s(&self.worker_wait_slot_ns),
            wait_consumer_s: s(&self.wait_consumer_ns),
            read_bytes: n(&self.read_bytes),
            samples: n(&self.samples),
            dropped: n(&self.dropped),
            batches: n(&self.batches),
            grown_buffers: n(&self.grown_buffers),
        }
    }
}

fn add_ns(a: &AtomicU64, d: Duration) {
    a.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
}

/// Current fill of the loader's queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepths {
    /// Jobs read but not yet taken by a worker.
    pub jobs: usize,
    /// Results waiting for the collator.
    pub done: usize,
    /// Free slots.
    pub free_slots: usize,
    /// Finished batches waiting for the consumer.
    pub batches: usize,
}

/// Per-sample output of a worker.
struct Slot {
    weak: Vec<u8>,
    strong: Vec<u8>,
    mask: Vec<u8>,
    key: String,
    label: i64,
    number: u64,
}

enum Marker {
    ShardError { url: String, error: Error },
    EpochEnd,
    End,
}

enum Job {
    Sample {
        seq: u64,
        state: StreamState,
        epoch: u64,
        number: u64,
        sample: RawSample,
    },
    Marker {
        seq: u64,
        state: StreamState,
        epoch: u64,
        marker: Marker,
    },
}

enum Done {
    Sample {
        seq: u64,
        state: StreamState,
        epoch: u64,
        slot: Slot,
    },
    Failed {
        seq: u64,
        item: FailedItem,
    },
    Marker {
        seq: u64,
        state: StreamState,
        epoch: u64,
        marker: Marker,
    },
    Panic {
        thread: String,
        message: String,
    },
}

impl Done {
    fn seq(&self) -> Option<u64> {
        match self {
            Done::Sample { seq, .. } | Done::Failed { seq, .. } | Done::Marker { seq, .. } => {
                Some(*seq)
            }
            Done::Panic { .. } => None,
        }
    }
}

enum Out {
    Batch(Batch),
    Error(Error),
    End,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// The multithreaded batch loader (see the module docs). Iterate it for
/// `Result<Batch>`; after an `Err` (or the end of the last epoch) it yields `None`.
pub struct Loader {
    cfg: LoaderConfig,
    out: Option<Receiver<Out>>,
    stop: Arc<AtomicBool>,
    /// Set while [`Loader::next`] waits for a batch (see [`Collator::take`]).
    consumer_waiting: Arc<AtomicBool>,
    counters: Arc<Counters>,
    errors: Arc<Mutex<ErrorLog>>,
    joined: Vec<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    depth_jobs: Option<Receiver<Job>>,
    depth_done: Option<Receiver<Done>>,
    depth_free: Option<Receiver<Slot>>,
    finished: bool,
}

impl Loader {
    /// Resolves `spec` ([`crate::stream::ShardList::resolve`]) and starts loading.
    pub fn open(spec: &str, opts: &SourceOptions, cfg: LoaderConfig) -> Result<Self> {
        cfg.validate()?;
        let stream = Stream::open(spec, opts, cfg.stream.clone())?;
        Self::start(stream, cfg, None, None)
    }

    /// Starts loading from `stream` (positioned at its start).
    pub fn new(stream: Stream, cfg: LoaderConfig) -> Result<Self> {
        Self::start(stream, cfg, None, None)
    }

    /// Starts loading from a `stream` just [rejoined](Stream::rejoin) (a run resumed on
    /// another number of ranks). Its first epoch is what was left of the saved one, so
    /// with `drop_last` a share too small for one batch is not an
    /// [`Error::EpochSmallerThanBatch`]: it is dropped (counted in
    /// [`LoaderStats::dropped`]) and the next epoch starts.
    pub fn rejoined(stream: Stream, cfg: LoaderConfig) -> Result<Self> {
        let epoch = stream.epoch();
        Self::start(stream, cfg, None, Some(epoch))
    }

    /// Starts loading from `stream` at `state`, saved from a [`Batch`] of a loader with
    /// the same source and config: the batches that follow equal those the saved
    /// loader would have yielded after that batch.
    pub fn with_state(mut stream: Stream, cfg: LoaderConfig, state: &LoaderState) -> Result<Self> {
        if state.settings != 0 && state.settings != cfg.settings_fingerprint() {
            return Err(Error::Config(
                "the loader state was saved with other loader settings (batch size, \
                 drop_last, image size, task, mask, eval resize, augmentations or label \
                 member); resume with the settings it was saved with"
                    .into(),
            ));
        }
        stream.restore(&state.stream)?;
        Self::start(stream, cfg, Some(state.next_batch), None)
    }

    /// `short_epoch_ok`: an epoch in which too few samples for one batch are dropped
    /// rather than ending the stream ([`Loader::rejoined`]).
    fn start(
        stream: Stream,
        cfg: LoaderConfig,
        next_batch: Option<u64>,
        short_epoch_ok: Option<u64>,
    ) -> Result<Self> {
        cfg.validate()?;
        if stream.config() != &cfg.stream {
            return Err(Error::Config(
                "the stream's config differs from the loader config's `stream`".into(),
            ));
        }
        let mask = if cfg.task.is_conmim() {
            Some(cfg.mask.build(cfg.image_size)?)
        } else {
            None
        };
        let stop = Arc::new(AtomicBool::new(false));
        let consumer_waiting = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let errors = Arc::new(Mutex::new(ErrorLog::default()));
        let last_shard = Arc::new(Mutex::new(String::new()));

        let nslots = 2 * cfg.threads + 2;
        let (job_tx, job_rx) = bounded::<Job>(2 * cfg.threads + 4);
        let (done_tx, done_rx) = unbounded::<Done>();
        let (free_tx, free_rx) = bounded::<Slot>(nslots);
        let (pool_tx, pool_rx) = bounded::<BatchBuf>(cfg.prefetch + 1);
        let (out_tx, out_rx) = bounded::<Out>(cfg.prefetch);

        // A shard being retried over http is no stall until its retries are spent.
        let stall = match stream.retry_budget() {
            Duration::ZERO => Duration::from_secs_f64(cfg.stall_timeout_s),
            budget => Duration::from_secs_f64(cfg.stall_timeout_s)
                .max(budget.saturating_add(HTTP_STALL_MARGIN)),
        };
        let vb = cfg.view_bytes();
        for _ in 0..nslots {
            let slot = Slot {
                weak: vec![0; vb],
                strong: if cfg.task.is_conmim() {
                    vec![0; vb]
                } else {
                    Vec::new()
                },
                mask: vec![0; cfg.mask_len()],
                key: String::with_capacity(64),
                label: -1,
                number: 0,
            };
            free_tx.send(slot).expect("channel sized for every slot");
        }
        for _ in 0..=cfg.prefetch {
            let buf = BatchBuf::new(cfg.batch_size, vb, cfg.task.is_conmim(), cfg.mask_len());
            pool_tx.send(buf).expect("pool sized for every batch");
        }

        let mut joined = Vec::new();
        let epoch = stream.epoch();
        let reading = stream.progress();
        let reader = {
            let (stop, counters, done_tx, last_shard) = (
                stop.clone(),
                counters.clone(),
                done_tx.clone(),
                last_shard.clone(),
            );
            std::thread::Builder::new()
                .name("conmim-reader".into())
                .spawn(move || read_loop(stream, job_tx, done_tx, stop, counters, last_shard))
                .map_err(|e| Error::io("<thread>", e))?
        };
        for i in 0..cfg.threads {
            let w = Worker {
                randaug: cfg.rand_augment_config()?,
                jitter: cfg.color_jitter_applied(),
                erase: (cfg.reprob > 0.0).then(|| crate::augment::randaug::EraseConfig {
                    probability: cfg.reprob,
                    ..Default::default()
                }),
                aug_scratch: Vec::new(),
                cfg: cfg.clone(),
                mask: mask.clone(),
                views: ViewMaker::new(),
                jobs: job_rx.clone(),
                done: done_tx.clone(),
                free: free_rx.clone(),
                stop: stop.clone(),
                counters: counters.clone(),
            };
            joined.push(
                std::thread::Builder::new()
                    .name(format!("conmim-worker-{i}"))
                    .spawn(move || w.run(i))
                    .map_err(|e| Error::io("<thread>", e))?,
            );
        }
        drop(done_tx);
        let collator = Collator {
            batch_size: cfg.batch_size,
            drop_last: cfg.drop_last,
            max_errors: cfg.max_errors,
            image_size: cfg.image_size,
            view_bytes: vb,
            mask_len: cfg.mask_len(),
            stall,
            out: out_tx,
            done: done_rx.clone(),
            free: free_tx,
            pool_rx,
            pool_tx,
            consumer_waiting: consumer_waiting.clone(),
            conmim: cfg.task.is_conmim(),
            stop: stop.clone(),
            counters: counters.clone(),
            errors: errors.clone(),
            last_shard,
            pending: VecDeque::new(),
            next_seq: 0,
            current: None,
            epoch,
            next_batch: next_batch.unwrap_or(0),
            short_epoch_ok,
            reading,
            settings: cfg.settings_fingerprint(),
        };
        joined.push(
            std::thread::Builder::new()
                .name("conmim-collator".into())
                .spawn(move || collator.run())
                .map_err(|e| Error::io("<thread>", e))?,
        );
        Ok(Loader {
            cfg,
            out: Some(out_rx),
            stop,
            consumer_waiting,
            counters,
            errors,
            joined,
            reader: Some(reader),
            depth_jobs: Some(job_rx),
            depth_done: Some(done_rx),
            depth_free: Some(free_rx),
            finished: false,
        })
    }

    /// The config.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Counters so far.
    pub fn stats(&self) -> LoaderStats {
        self.counters.snapshot()
    }

    /// Failed samples and shards so far.
    pub fn errors(&self) -> ErrorLog {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Current queue fill.
    pub fn queue_depths(&self) -> QueueDepths {
        QueueDepths {
            jobs: self.depth_jobs.as_ref().map_or(0, |r| r.len()),
            done: self.depth_done.as_ref().map_or(0, |r| r.len()),
            free_slots: self.depth_free.as_ref().map_or(0, |r| r.len()),
            batches: self.out.as_ref().map_or(0, |r| r.len()),
        }
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.out = None;
        self.depth_jobs = None;
        self.depth_done = None;
        self.depth_free = None;
        for h in self.joined.drain(..) {
            let _ = h.join();
        }
        // A reader blocked in I/O (a stalled pipe or socket) is left to exit at its
        // next step: its job channel is closed.
        if let Some(r) = self.reader.take()
            && r.is_finished()
        {
            let _ = r.join();
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.finished {
            return None;
        }
        self.consumer_waiting.store(true, Ordering::SeqCst);
        let out = self.out.as_ref()?.recv();
        self.consumer_waiting.store(false, Ordering::SeqCst);
        match out {
            Ok(Out::Batch(b)) => Some(Ok(b)),
            Ok(Out::Error(e)) => {
                self.finished = true;
                Some(Err(e))
            }
            Ok(Out::End) => {
                self.finished = true;
                None
            }
            Err(_) => {
                self.finished = true;
                Some(Err(Error::ThreadPanicked {
                    thread: "conmim-collator".into(),
                    message: "the collating thread ended without a result".into(),
                }))
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn read_loop(
    mut stream: Stream,
    jobs: Sender<Job>,
    done: Sender<Done>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    last_shard: Arc<Mutex<String>>,
) {
    let run = AssertUnwindSafe(|| {
        let mut seq = 0u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let t = Instant::now();
            let epoch = stream.epoch();
            let ev = stream.next();
            add_ns(&counters.read_ns, t.elapsed());
            let state = stream.state();
            let job = match ev {
                Some(Event::Sample(s)) => {
                    let bytes: usize = s.sample.members.iter().map(|(_, b)| b.len()).sum();
                    counters
                        .read_bytes
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    if let Ok(mut l) = last_shard.lock()
                        && *l != s.sample.shard
                    {
                        l.clone_from(&s.sample.shard);
                    }
                    Job::Sample {
                        seq,
                        state,
                        epoch: s.epoch,
                        number: s.number,
                        sample: s.sample,
                    }
                }
                Some(Event::ShardError { url, error }) => Job::Marker {
                    seq,
                    state,
                    epoch,
                    marker: Marker::ShardError { url, error },
                },
                Some(Event::EpochEnd { epoch, .. }) => Job::Marker {
                    seq,
                    state,
                    epoch,
                    marker: Marker::EpochEnd,
                },
                None => Job::Marker {
                    seq,
                    state,
                    epoch,
                    marker: Marker::End,
                },
            };
            let end = matches!(
                job,
                Job::Marker {
                    marker: Marker::End,
                    ..
                }
            );
            if jobs.send(job).is_err() || end {
                return;
            }
            seq += 1;
        }
    });
    if let Err(p) = catch_unwind(run) {
        let _ = done.send(Done::Panic {
            thread: "conmim-reader".into(),
            message: panic_message(p.as_ref()),
        });
    }
}

/// Receives from `rx`, looking at `stop` every [`POLL`]; `None` when stopped or
/// disconnected.
fn recv_or_stop<T>(rx: &Receiver<T>, stop: &AtomicBool) -> Option<T> {
    loop {
        match rx.recv_timeout(POLL) {
            Ok(v) => return Some(v),
            Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => {}
            Err(_) => return None,
        }
    }
}

struct Worker {
    cfg: LoaderConfig,
    /// [`Task::ClassifyTrain`] extras: RandAugment, random erasing, their scratch.
    randaug: Option<crate::augment::randaug::RandAugConfig>,
    /// Colour jitter strength of the classification views (without RandAugment).
    jitter: Option<f64>,
    erase: Option<crate::augment::randaug::EraseConfig>,
    aug_scratch: Vec<u8>,
    mask: Option<Arc<dyn MaskGenerator>>,
    views: ViewMaker,
    jobs: Receiver<Job>,
    done: Sender<Done>,
    free: Receiver<Slot>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl Worker {
    fn run(mut self, index: usize) {
        let mut slot: Option<Slot> = None;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            // A slot first, then a job: every job in flight owns a slot.
            if slot.is_none() {
                let t = Instant::now();
                match recv_or_stop(&self.free, &self.stop) {
                    Some(s) => slot = Some(s),
                    None => return,
                }
                add_ns(&self.counters.worker_wait_slot_ns, t.elapsed());
            }
            let t = Instant::now();
            let Some(job) = recv_or_stop(&self.jobs, &self.stop) else {
                return;
            };
            add_ns(&self.counters.worker_wait_job_ns, t.elapsed());
            let done = match job {
                Job::Marker {
                    seq,
                    state,
                    epoch,
                    marker,
                } => Done::Marker {
                    seq,
                    state,
                    epoch,
                    marker,
                },
                Job::Sample {
                    seq,
                    state,
                    epoch,
                    number,
                    sample,
                } => {
                    let mut s = slot.take().expect("slot taken above");
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        self.process(epoch, number, &sample, &mut s)
                    }));
                    match r {
                        Ok(Ok(())) => Done::Sample {
                            seq,
                            state,
                            epoch,
                            slot: s,
                        },
                        Ok(Err(message)) => {
                            slot = Some(s);
                            Done::Failed {
                                seq,
                                item: FailedItem {
                                    shard: sample.shard,
                                    key: sample.key,
                                    epoch,
                                    message,
                                },
                            }
                        }
                        Err(p) => {
                            let _ = self.done.send(Done::Panic {
                                thread: format!("conmim-worker-{index}"),
                                message: format!(
                                    "{} (shard {}, sample {})",
                                    panic_message(p.as_ref()),
                                    sample.shard,
                                    sample.key
                                ),
                            });
                            return;
                        }
                    }
                }
            };
            if self.done.send(done).is_err() {
                return;
            }
        }
    }

    fn process(
        &mut self,
        epoch: u64,
        number: u64,
        sample: &RawSample,
        slot: &mut Slot,
    ) -> std::result::Result<(), String> {
        let cfg = &self.cfg;
        if cfg.fault_panic_key.as_deref() == Some(sample.key.as_str()) {
            panic!("fault injection: panicking on sample {}", sample.key);
        }
        let Some(bytes) = image_member(sample) else {
            let exts: Vec<&str> = sample.members.iter().map(|(e, _)| e.as_str()).collect();
            return Err(format!(
                "no image member (one of {}); the sample has {exts:?}",
                IMAGE_EXTS.join(", ")
            ));
        };
        let label = match sample.member(&cfg.label_ext) {
            // Pretraining reads no label: one that is not an integer (a WordNet id, a
            // caption) is -1 like a missing one, not a reason to drop the image.
            Some(b) if cfg.task.is_conmim() => parse_label(b).unwrap_or(-1),
            Some(b) => parse_label(b).ok_or_else(|| {
                format!(
                    "label member .{} is not an integer: {:?}",
                    cfg.label_ext,
                    String::from_utf8_lossy(&b[..b.len().min(32)])
                )
            })?,
            None if cfg.task.is_conmim() => -1,
            None => return Err(format!("no label member .{}", cfg.label_ext)),
        };
        let seed = rank_seed(cfg.stream.seed, cfg.stream.rank);
        let r = match cfg.task {
            Task::ConMim => self
                .views
                .conmim_pair(
                    bytes,
                    &cfg.limits,
                    seed,
                    epoch,
                    number,
                    cfg.image_size,
                    &mut slot.weak,
                    &mut slot.strong,
                )
                .map(|_| ()),
            Task::ClassifyTrain => self
                .views
                .train_view(
                    bytes,
                    &cfg.limits,
                    seed,
                    epoch,
                    number,
                    cfg.image_size,
                    &mut slot.weak,
                )
                .map(|_| ())
                .map(|()| {
                    let t = Instant::now();
                    let side = cfg.image_size as usize;
                    let mut rng = sample_rng(seed ^ CLASSIFY_AUG_DOMAIN, epoch, number);
                    if let Some(ra) = &self.randaug {
                        let p = crate::augment::randaug::RandAugParams::sample_from(&mut rng, ra);
                        crate::augment::randaug::apply(
                            &p,
                            &mut slot.weak,
                            side,
                            side,
                            &mut self.aug_scratch,
                        );
                    }
                    if let Some(strength) = self.jitter {
                        let p = crate::augment::params::ColorJitterParams::sample_no_hue(
                            &mut rng, strength,
                        );
                        crate::augment::color::color_jitter_no_hue(&mut slot.weak, &p);
                    }
                    if let Some(er) = &self.erase
                        && let Some(b) = crate::augment::randaug::sample_erase(
                            &mut rng,
                            cfg.image_size,
                            cfg.image_size,
                            er,
                        )
                    {
                        crate::augment::randaug::erase_pixels_u8(
                            &mut slot.weak,
                            side,
                            side,
                            &b,
                            IMAGENET_MEAN,
                            IMAGENET_STD,
                            &mut rng,
                        );
                    }
                    add_ns(&self.counters.strong_ns, t.elapsed());
                }),
            Task::ClassifyEval => self.views.eval_view(
                bytes,
                &cfg.limits,
                cfg.eval_resize,
                cfg.image_size,
                &mut slot.weak,
            ),
        };
        let times = self.views.take_times();
        add_ns(&self.counters.decode_ns, times.decode);
        add_ns(&self.counters.resize_ns, times.resize);
        add_ns(&self.counters.strong_ns, times.strong);
        r.map_err(|e| e.to_string())?;
        if let Some(masker) = &self.mask {
            let t = Instant::now();
            masker.generate(&mut mask_rng(seed, epoch, number), &mut slot.mask);
            add_ns(&self.counters.mask_ns, t.elapsed());
        }
        slot.key.clear();
        slot.key.push_str(&sample.key);
        slot.label = label;
        slot.number = number;
        Ok(())
    }
}

struct Collator {
    batch_size: usize,
    drop_last: bool,
    max_errors: Option<u64>,
    image_size: u32,
    view_bytes: usize,
    mask_len: usize,
    stall: Duration,
    out: Sender<Out>,
    done: Receiver<Done>,
    free: Sender<Slot>,
    pool_rx: Receiver<BatchBuf>,
    pool_tx: Sender<BatchBuf>,
    consumer_waiting: Arc<AtomicBool>,
    conmim: bool,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    errors: Arc<Mutex<ErrorLog>>,
    last_shard: Arc<Mutex<String>>,
    pending: VecDeque<Option<Done>>,
    next_seq: u64,
    current: Option<BatchBuf>,
    epoch: u64,
    next_batch: u64,
    /// The epoch (the rest of a rejoined one) that may be too short for a batch.
    short_epoch_ok: Option<u64>,
    /// [`Stream::progress`]: the reader's reading, which counts as progress while no
    /// sample comes out (a resumed epoch's replay, the shuffle buffer's first fill).
    reading: Arc<AtomicU64>,
    /// [`LoaderConfig::settings_fingerprint`], stamped on every state.
    settings: u64,
}

/// Whether the collator goes on.
enum Flow {
    Go,
    Stop,
}

/// How often blocked loader threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

impl Collator {
    fn run(mut self) {
        let mut progress = Instant::now();
        let mut read = self.reading.load(Ordering::Relaxed);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            match self.done.recv_timeout(POLL.min(self.stall)) {
                Ok(d) => {
                    progress = Instant::now();
                    let Some(seq) = d.seq() else {
                        if let Done::Panic { thread, message } = d {
                            self.fail(Error::ThreadPanicked { thread, message });
                        }
                        return;
                    };
                    let at = (seq - self.next_seq) as usize;
                    if self.pending.len() <= at {
                        self.pending.resize_with(at + 1, || None);
                    }
                    self.pending[at] = Some(d);
                    while matches!(self.pending.front(), Some(Some(_))) {
                        let d = self.pending.pop_front().flatten().expect("checked");
                        self.next_seq += 1;
                        if let Flow::Stop = self.handle(d) {
                            return;
                        }
                        // Waiting on the consumer is not a stall.
                        progress = Instant::now();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let now_read = self.reading.load(Ordering::Relaxed);
                    if now_read != read {
                        // The reader works on (replaying, filling the buffer).
                        read = now_read;
                        progress = Instant::now();
                    }
                    if progress.elapsed() >= self.stall {
                        let shard = self
                            .last_shard
                            .lock()
                            .map(|s| s.clone())
                            .unwrap_or_default();
                        self.fail(Error::Stalled {
                            seconds: progress.elapsed().as_secs_f64(),
                            waiting_for: format!(
                                "event #{} (the reader was last in shard {shard:?})",
                                self.next_seq
                            ),
                        });
                        return;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail(Error::ThreadPanicked {
                        thread: "conmim-worker".into(),
                        message: "every worker ended before the stream did".into(),
                    });
                    return;
                }
            }
        }
    }

    fn fail(&self, e: Error) {
        let _ = self.out.send(Out::Error(e));
    }

    fn handle(&mut self, d: Done) -> Flow {
        match d {
            Done::Sample {
                state, epoch, slot, ..
            } => {
                self.epoch = epoch;
                self.take(slot, state)
            }
            Done::Failed { item, .. } => {
                let mut log = self.errors.lock().unwrap_or_else(|p| p.into_inner());
                log.sample_errors += 1;
                let n = log.sample_errors;
                if let Some(limit) = self.max_errors
                    && n > limit
                {
                    drop(log);
                    self.fail(Error::TooManyErrors {
                        errors: n,
                        limit,
                        shard: item.shard,
                        key: item.key,
                        message: item.message,
                    });
                    return Flow::Stop;
                }
                if log.samples.len() < MAX_ERROR_RECORDS {
                    log.samples.push(item);
                }
                Flow::Go
            }
            Done::Marker {
                state,
                epoch,
                marker,
                ..
            } => match marker {
                Marker::ShardError { url, error } => {
                    let mut log = self.errors.lock().unwrap_or_else(|p| p.into_inner());
                    log.shard_errors += 1;
                    if log.shards.len() < MAX_ERROR_RECORDS {
                        log.shards.push(FailedItem {
                            shard: url,
                            key: String::new(),
                            epoch,
                            message: error.to_string(),
                        });
                    }
                    Flow::Go
                }
                Marker::EpochEnd => {
                    let partial = self.current.as_ref().map_or(0, |b| b.len);
                    if self.drop_last
                        && self.next_batch == 0
                        && partial < self.batch_size
                        && self.short_epoch_ok != Some(epoch)
                    {
                        // Not one batch in a whole epoch: every epoch would be dropped.
                        self.fail(Error::EpochSmallerThanBatch {
                            epoch,
                            samples: partial,
                            batch: self.batch_size,
                        });
                        return Flow::Stop;
                    }
                    let flow = match self.current.as_mut() {
                        Some(b) if b.len > 0 && !self.drop_last => {
                            self.epoch = epoch;
                            self.emit(state)
                        }
                        Some(b) => {
                            self.counters
                                .dropped
                                .fetch_add(b.len as u64, Ordering::Relaxed);
                            b.len = 0;
                            Flow::Go
                        }
                        None => Flow::Go,
                    };
                    self.next_batch = 0;
                    flow
                }
                Marker::End => {
                    let _ = self.out.send(Out::End);
                    Flow::Stop
                }
            },
            Done::Panic { .. } => unreachable!("panics are handled on arrival"),
        }
    }

    fn take(&mut self, slot: Slot, state: StreamState) -> Flow {
        if self.current.is_none() {
            let t = Instant::now();
            loop {
                match self.pool_rx.recv_timeout(POLL) {
                    Ok(mut b) => {
                        b.len = 0;
                        self.current = Some(b);
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) if !self.stop.load(Ordering::Relaxed) => {
                        // No buffer came back for a whole poll, no batch is queued and
                        // the consumer waits for one: it holds every pooled batch, and
                        // waiting longer would deadlock. Allocate one more.
                        if self.out.is_empty() && self.consumer_waiting.load(Ordering::SeqCst) {
                            self.counters.grown_buffers.fetch_add(1, Ordering::Relaxed);
                            self.current = Some(BatchBuf::new(
                                self.batch_size,
                                self.view_bytes,
                                self.conmim,
                                self.mask_len,
                            ));
                            break;
                        }
                    }
                    Err(_) => return Flow::Stop,
                }
            }
            add_ns(&self.counters.wait_consumer_ns, t.elapsed());
        }
        let t = Instant::now();
        let b = self.current.as_mut().expect("acquired above");
        let i = b.len;
        let vb = self.view_bytes;
        b.weak[i * vb..(i + 1) * vb].copy_from_slice(&slot.weak);
        if !slot.strong.is_empty() {
            b.strong[i * vb..(i + 1) * vb].copy_from_slice(&slot.strong);
        }
        let m = self.mask_len;
        b.mask[i * m..(i + 1) * m].copy_from_slice(&slot.mask);
        b.labels[i] = slot.label;
        b.numbers[i] = slot.number;
        b.keys[i].clear();
        b.keys[i].push_str(&slot.key);
        b.len += 1;
        let full = b.len == self.batch_size;
        add_ns(&self.counters.collate_ns, t.elapsed());
        let _ = self.free.send(slot);
        if full { self.emit(state) } else { Flow::Go }
    }

    fn emit(&mut self, state: StreamState) -> Flow {
        let buf = self.current.take().expect("a batch is being filled");
        let len = buf.len as u64;
        let batch = Batch {
            buf: Some(buf),
            pool: self.pool_tx.clone(),
            epoch: self.epoch,
            index: self.next_batch,
            state: LoaderState {
                next_batch: if state.epoch == self.epoch {
                    self.next_batch + 1
                } else {
                    0
                },
                stream: state,
                settings: self.settings,
            },
            image_size: self.image_size,
            view_bytes: self.view_bytes,
            mask_len: self.mask_len,
        };
        self.next_batch += 1;
        let t = Instant::now();
        let sent = self.out.send(Out::Batch(batch)).is_ok();
        add_ns(&self.counters.wait_consumer_ns, t.elapsed());
        if !sent {
            return Flow::Stop;
        }
        self.counters.samples.fetch_add(len, Ordering::Relaxed);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        Flow::Go
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        assert_eq!(parse_label(b"42"), Some(42));
        assert_eq!(parse_label(b" 7\n"), Some(7));
        assert_eq!(parse_label(b"-1"), Some(-1));
        assert_eq!(parse_label(b"x"), None);
        assert_eq!(parse_label(&[0xff]), None);
    }

    #[test]
    fn mask_stream_differs_from_view_stream() {
        let (mut a, mut b) = (mask_rng(3, 1, 9), sample_rng(3, 1, 9));
        assert_ne!(a.next_u64(), b.next_u64());
        assert_eq!(mask_rng(3, 1, 9).next_u64(), mask_rng(3, 1, 9).next_u64());
    }
}
