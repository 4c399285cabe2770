//! Reading datasets as one deterministic, resumable stream of raw samples per rank.
//!
//! ```text
//! source spec ──ShardList::resolve──> ShardList (urls + nsamples)
//!   ──epoch_plan(seed, epoch, rank/world)──> this rank's shards, in order
//!   ──Opener (file | pipe: | http(s))──> ShardSamples (streaming tar, grouped)
//!   ──ShuffleBuffer(seed, epoch, rank)──> Event::Sample { epoch, number, sample }
//! ```
//!
//! This module knows nothing about pixels: it yields [`RawSample`]s (key + member
//! bytes), each numbered.
//!
//! # Sources
//! [`ShardList::resolve`] takes a dataset directory (`{dir}/{split}.manifest.json`),
//! a manifest (local, or an `http(s)://` URL ending in `.manifest.json` or `/`, whose
//! relative shard names resolve next to it), a brace pattern
//! (`data/train-{000000..000146}.tar`, see [`expand_braces`]), a single `.tar`, a list
//! file, a URL or a `pipe:CMD`. `pipe:`
//! runs `sh -c CMD` and is refused (at resolution *and* at opening, with
//! [`Error::Config`]) unless `allow_pipe` is set, so a shard list cannot run commands
//! by default. http(s) URLs are read by [`HttpOpener`] (streaming GET, retries with
//! backoff, connect and read timeouts: [`HttpOptions`] in [`SourceOptions::http`]); any
//! other source plugs into [`Opener`] / [`DefaultOpener`].
//!
//! # Epoch semantics
//! Let `n` be the number of shards, `w` the world size, `r` the rank, `e` the epoch
//! (epochs count from 0 and the stream moves on to `e + 1` by itself).
//!
//! * [`Mode::Epoch`] (exact): the shard list is permuted with
//!   `SplitMix64::new(seed, stream_id(SHARD_SHUFFLE, e, 0))` (Fisher–Yates; identity
//!   when `shuffle_shards` is off) — the same permutation on every rank. Rank `r`
//!   takes the permutation's positions `i` with `i % w == r`, in increasing `i`. The
//!   `n % w` left-over positions follow [`Remainder`]: `Drop` (default) skips the last
//!   `n % w` positions so every rank reads `floor(n / w)` shards — the permutation
//!   changes every epoch, so the skipped shards rotate; `Pad` wraps around so every
//!   rank reads `ceil(n / w)` shards (a few read twice); `Keep` reads every shard
//!   exactly once with ranks differing by at most one shard. Across ranks the shards
//!   read are disjoint (`Drop`, `Keep`). With `equalize_samples` (default), known
//!   sample counts (a manifest) and `Drop` or `Pad`, every rank stops after the
//!   smallest per-rank sample count of the epoch, so all ranks yield the same number
//!   of samples (a rank loses the last samples it would have read).
//!   A shard that fails (see *Errors*) shortens its rank's epoch.
//! * [`Mode::Resampled`]: rank `r` draws `ceil(n / w)` shards per (virtual) epoch,
//!   uniformly with replacement, from `SplitMix64::new(seed, stream_id(RESAMPLE, e, r))`;
//!   ranks draw independently. Epochs continue forever unless `epochs` is set.
//!
//! Within an epoch, samples pass through a [`ShuffleBuffer`] of `shuffle_buffer`
//! samples seeded with `stream_id(SAMPLE_SHUFFLE, e, r)`; it is drained at the end of
//! the epoch, so no sample crosses an epoch boundary. Each sample gets `number`, its
//! position in the rank's output for the epoch (0, 1, 2, ...): downstream per-sample
//! randomness is keyed by `(seed, epoch, number)`.
//!
//! # Determinism and workers
//! The sequence is a pure function of (shard list, [`StreamConfig`], shard contents).
//! A [`Stream`] is read by one thread; decoding workers share its single numbered
//! sequence and the loader reorders their results by `number`, so the worker count
//! changes only *when* a sample is processed, never *which* sample comes next (unlike
//! a per-worker shard split, which would tie the data order to the thread count).
//!
//! # Resume
//! [`Stream::state`] is `(epoch, events emitted in the epoch, config fingerprint)`,
//! serde-serialisable. [`Stream::restore`] replays the epoch from its start and drops
//! that many events, which rebuilds the shuffle buffer exactly, so the resumed output
//! equals the uninterrupted output. Cost: this rank's shards of the epoch are read
//! again up to the saved position (I/O and tar parsing only, no decoding), but for the
//! shards it had read through ([`StreamState::done`]: every sample yielded before the
//! saved position, so the replay drops them whatever they hold): when their sample
//! counts are known (a manifest) and the epoch had no shard error before the position,
//! stand-ins of that many empty samples replace them, since the shuffle buffer's draws
//! depend on the number of samples alone. So a resume reads about a shuffle buffer's
//! worth of shards again (see *Resume with another world size* for how much), not up
//! to an epoch of one rank's data. The state refuses a different seed, rank, world
//! size, mode, buffer or shard list (changing `epochs` is allowed). The replay counts
//! events, shard errors included, so exactness assumes the shards read the same on
//! the replay: a shard that failed before the position (an http outage outlasting the
//! retries) and opens on resume shifts what follows: a few samples are read twice
//! or skipped. Shards are known
//! by their names relative to the directory they all share, so the same shards moved
//! elsewhere (a per-job scratch copy, another mount point, an http mirror) resume.
//!
//! # Resume with another world size
//! A run resumed on fewer or more ranks cannot take up each saved rank's position: the
//! shards are split differently. [`Stream::rejoin`] takes every saved rank's state and
//! goes on with the earliest epoch a saved rank was in, less the shards the saved ranks
//! had *read through* — the first [`StreamState::done`] shards of each one's plan,
//! every sample of which had been yielded (all of them for a rank already in a later
//! epoch). The rest of the epoch's permutation is split over the new ranks by the
//! rules above, as if it were the whole list; the left-out shards travel in the state
//! ([`StreamState::excluded`]), so the rejoined epoch resumes exactly in its turn and a
//! further change of world size adds to them; the next epoch is an ordinary one. When
//! fewer shards than ranks are left, the next epoch starts instead (the few left are
//! that epoch's remainder, as with [`Remainder::Drop`]). Otherwise nothing is skipped
//! but what the epoch's rules leave out of any epoch: with [`Remainder::Drop`], the
//! `left % world` shards that do not divide among the new ranks, and with
//! `equalize_samples` what is above the smallest rank's share; a rank's share that
//! cannot fill one batch is dropped by the loader ([`crate::loader::Loader::rejoined`])
//! and the next epoch starts. What is read twice are the samples the saved ranks had
//! yielded from shards they had begun but not read through. A shuffle
//! buffer of `B` samples keeps a few samples of a shard for about `B ln B` more, so
//! that is of the order of `B ln B` samples per saved rank (simulated with the default
//! 2,048 and ImageNet's 1,281-sample shards: 14-22 thousand), against up to the whole
//! epoch when the epoch starts afresh ([`Stream::seek_epoch`]).
//!
//! # Errors
//! A shard that cannot be opened or is damaged yields the samples complete before the
//! damage, then one [`Event::ShardError`] (url + error), and the stream goes on with
//! the next shard. An epoch that yields no sample at all ends the stream after its
//! [`Event::EpochEnd`], so a dataset whose every shard fails cannot spin forever (but
//! for the rest of an epoch after [`Stream::rejoin`], which may leave a rank nothing).
//! Nothing waits on another thread; only a `pipe:` command that never ends can block.

mod http;
mod plan;
mod reader;
mod shuffle;
mod url;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::shard::existing::expand_braces;
pub use http::{
    DEFAULT_BACKOFF, DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, DEFAULT_RETRIES, HttpOpener,
    HttpOptions,
};
pub use plan::{
    DEFAULT_SEED, DEFAULT_SHUFFLE_BUFFER, ENV_RANK, ENV_WORLD_SIZE, EpochPlan, MAX_SHUFFLE_BUFFER,
    Mode, Remainder, StreamConfig, epoch_plan, epoch_plan_excluding, parse_dist_env, shard_order,
    stream_id,
};
pub use reader::{
    MAX_MEMBER_BYTES, MAX_META_BYTES, RawSample, ShardSamples, TarDamage, TarEntry, TarReader,
};
pub use shuffle::ShuffleBuffer;
pub use url::{
    DEFAULT_SPLIT, DefaultOpener, FileOpener, Opener, PIPE_PREFIX, PipeOpener, READ_BUFFER,
    ShardList, ShardSpec, SourceOptions,
};

use crate::error::{Error, Result};

/// Version of [`StreamState`].
pub const STATE_VERSION: u32 = 1;

/// A sample with its place in the sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSample {
    /// Epoch it belongs to.
    pub epoch: u64,
    /// Position in this rank's output for the epoch (0-based).
    pub number: u64,
    /// The sample.
    pub sample: RawSample,
}

/// What the stream yields.
#[derive(Debug)]
pub enum Event {
    /// The next sample.
    Sample(StreamSample),
    /// A shard could not be opened or is damaged; the samples before the damage were
    /// yielded and the stream continues with the next shard.
    ShardError {
        /// The shard.
        url: String,
        /// What went wrong.
        error: Error,
    },
    /// This rank finished `epoch` after `samples` samples; the next event belongs to
    /// `epoch + 1` (if the stream goes on).
    EpochEnd {
        /// The finished epoch.
        epoch: u64,
        /// Samples yielded in it.
        samples: u64,
    },
}

/// Where a stream is, for resuming (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Current epoch.
    pub epoch: u64,
    /// Samples yielded in the epoch.
    pub samples: u64,
    /// Samples and shard errors yielded in the epoch.
    pub events: u64,
    /// Hash of the order-deciding config and the shard list.
    pub fingerprint: u64,
    /// How many shards at the front of this rank's plan for the epoch are read through
    /// and all their samples yielded ([`Stream::rejoin`] skips them; 0 in states saved
    /// before it existed: nothing is skipped).
    #[serde(default)]
    pub done: u64,
    /// The shards (positions in the list) this epoch leaves out because they were read
    /// before a change of world size ([`Stream::rejoin`]); `None` in an ordinary epoch.
    /// Shared, so a state is cheap to clone for every sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excluded: Option<Arc<[usize]>>,
}

/// What [`Stream::rejoin`] made of the saved ranks' positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejoin {
    /// The epoch the stream goes on with.
    pub epoch: u64,
    /// Ranks of the saved run.
    pub saved_world: usize,
    /// Shards of `epoch` that the saved ranks had read through (left out now).
    pub shards_done: usize,
    /// Shards of `epoch` still to be read, split over the new ranks.
    pub shards_left: usize,
    /// Samples the saved ranks had yielded that are read again: those of shards they
    /// had not finished (and of an epoch some of them had begun after `epoch`);
    /// `None` when the shards' sample counts are unknown (no manifest).
    pub reread: Option<u64>,
    /// Too few shards were left of the saved epoch for the new ranks (fewer than the
    /// world size), so the stream starts the next epoch instead.
    pub next_epoch: bool,
    /// Of `shards_left`, those that do not divide among the new ranks and are left out
    /// of the epoch as its remainder ([`Remainder::Drop`]: `shards_left % world`).
    pub remainder_left_out: usize,
}

impl Rejoin {
    /// One line for the log: what a resume across world sizes does to the data.
    pub fn describe(&self, world: usize) -> String {
        let ranks = |n: usize| {
            if n == 1 {
                "1 process".to_string()
            } else {
                format!("{n} ranks")
            }
        };
        let head = format!(
            "the checkpoint is from a run of {} and this run has {}: the weights, optimiser \
             and schedules resume exactly, but the shards are split over the ranks \
             differently",
            ranks(self.saved_world),
            ranks(world),
        );
        if self.next_epoch {
            return format!(
                "{head}, and only {} shard(s) of epoch {} were left, fewer than the ranks: \
                 the data goes on with epoch {} (what the saved ranks had not taken of those \
                 shards is left out of their epoch, as an epoch's remainder is)",
                self.shards_left,
                self.epoch.saturating_sub(1),
                self.epoch
            );
        }
        let reread = match self.reread {
            Some(n) => format!("about {n} samples"),
            None => "the samples".into(),
        };
        let skipped = match self.remainder_left_out {
            0 => "nothing is skipped".to_string(),
            k => format!(
                "{k} of them, which do not divide among the ranks, are left out of this \
                 epoch as its remainder (remainder = drop)"
            ),
        };
        format!(
            "{head}, so the data goes on with the {} shards of epoch {} that the saved ranks \
             had not finished ({} were done), split anew; {reread} of shards the saved ranks \
             had begun but not finished are read again; {skipped}",
            self.shards_left, self.epoch, self.shards_done
        )
    }
}

enum Pull {
    /// A sample and its position in the plan.
    Sample(usize, RawSample),
    Error(String, Error),
    Exhausted,
}

/// The numbered sample sequence of one rank (see the module docs).
pub struct Stream {
    list: ShardList,
    cfg: StreamConfig,
    opener: Arc<dyn Opener>,
    fingerprint: u64,
    epoch: u64,
    plan: EpochPlan,
    next_shard: usize,
    current: Option<ShardSamples>,
    input_done: bool,
    /// Samples with their plan position.
    buffer: ShuffleBuffer<(usize, RawSample)>,
    /// Per plan position: samples read and not yet yielded.
    pending: Vec<u32>,
    /// Plan positions at the front read through with every sample yielded.
    done: usize,
    /// Shards this epoch leaves out ([`Stream::rejoin`]).
    excluded: Option<Arc<[usize]>>,
    /// While replaying to a restored position: plan positions below this are stand-ins
    /// counted from the manifest, not read (see [`Stream::restore`]).
    phantom_below: usize,
    /// The stand-in shard being replayed: (next sample index, sample count).
    phantom: Option<(u64, u64)>,
    read: u64,
    samples: u64,
    events: u64,
    skip: u64,
    finished: bool,
    errors: Vec<(String, Error)>,
    /// Samples read and shards opened so far, for a watchdog in another thread
    /// ([`Stream::progress`]).
    progress: Arc<std::sync::atomic::AtomicU64>,
}

/// Each shard's name for the fingerprint: its URL less the longest prefix, ending in
/// `/`, that all URLs share (a single shard: its file name), and less the query string
/// and fragment of an http(s) URL (presigned URLs are signed again for each job). So
/// the same shards resume from another directory or an http mirror (a per-job scratch
/// copy, another mount point), while another list, order or sample count does not.
fn shard_names(list: &ShardList) -> Vec<&str> {
    let urls: Vec<&str> = list
        .shards()
        .iter()
        .map(|s| {
            let u = s.url.as_str();
            if u.starts_with("http://") || u.starts_with("https://") {
                u.split(['?', '#']).next().unwrap_or(u)
            } else {
                u
            }
        })
        .collect();
    let Some(first) = urls.first() else {
        return urls;
    };
    let mut common = first.len();
    for u in &urls[1..] {
        common = first
            .bytes()
            .zip(u.bytes())
            .take(common)
            .take_while(|(a, b)| a == b)
            .count();
    }
    // In bytes: URLs may first differ inside a multi-byte character; the cut follows
    // an ASCII `/`, a character boundary of every URL.
    let cut = first.as_bytes()[..common]
        .iter()
        .rposition(|&b| b == b'/')
        .map_or(0, |i| i + 1);
    urls.iter().map(|u| &u[cut..]).collect()
}

/// The order-deciding config as fingerprint text.
fn config_text(cfg: &StreamConfig) -> String {
    format!(
        "{}|{}|{}|{:?}|{:?}|{}|{}|{}",
        cfg.seed,
        cfg.rank,
        cfg.world_size,
        cfg.mode,
        cfg.remainder,
        cfg.shuffle_shards,
        cfg.shuffle_buffer,
        cfg.equalize_samples
    )
}

fn fingerprint_of<'a>(
    cfg: &StreamConfig,
    shards: impl Iterator<Item = (&'a str, Option<u64>)>,
) -> u64 {
    let mut s = config_text(cfg);
    for (name, n) in shards {
        s.push_str(&format!("\n{name}|{n:?}"));
    }
    crate::seed::hash_str(0, &s)
}

/// A hash of what a shard list holds, as every rank of a job must see it: the shards'
/// names (relative to the directory they share, so identical copies at other paths
/// or an http mirror agree, as for resuming), in order, with their sample counts.
pub fn list_fingerprint(list: &ShardList) -> u64 {
    let mut s = String::new();
    for (name, n) in shard_names(list)
        .into_iter()
        .zip(list.shards().iter().map(|s| s.nsamples))
    {
        s.push_str(&format!("{name}|{n:?}\n"));
    }
    crate::seed::hash_str(0, &s)
}

/// The fingerprint of a list and config, over [`shard_names`].
fn fingerprint(list: &ShardList, cfg: &StreamConfig) -> u64 {
    let names = shard_names(list);
    fingerprint_of(
        cfg,
        names
            .into_iter()
            .zip(list.shards().iter().map(|s| s.nsamples)),
    )
}

/// The fingerprint of states saved before [`fingerprint`] used shard names: over whole
/// URLs (still accepted, so such checkpoints resume where their data still is).
fn legacy_fingerprint(list: &ShardList, cfg: &StreamConfig) -> u64 {
    fingerprint_of(
        cfg,
        list.shards().iter().map(|s| (s.url.as_str(), s.nsamples)),
    )
}

impl Stream {
    /// A stream over `list` read through `opener`, at the start of epoch 0.
    pub fn new(list: ShardList, cfg: StreamConfig, opener: Arc<dyn Opener>) -> Result<Self> {
        cfg.validate_for(&list)?;
        let plan = epoch_plan(&list, &cfg, 0);
        let buffer = ShuffleBuffer::new(cfg.shuffle_buffer, cfg.sample_rng(0));
        let mut s = Stream {
            fingerprint: fingerprint(&list, &cfg),
            list,
            opener,
            epoch: 0,
            plan,
            next_shard: 0,
            current: None,
            input_done: false,
            buffer,
            pending: Vec::new(),
            done: 0,
            excluded: None,
            phantom_below: 0,
            phantom: None,
            read: 0,
            samples: 0,
            events: 0,
            skip: 0,
            progress: Arc::default(),
            finished: false,
            errors: Vec::new(),
            cfg,
        };
        s.start_epoch(0, None);
        s.finished = s.past_last_epoch();
        Ok(s)
    }

    /// Resolves `spec` ([`ShardList::resolve`]) and opens shards with
    /// [`DefaultOpener`] (pipes as `opts.allow_pipe` says).
    pub fn open(spec: &str, opts: &SourceOptions, cfg: StreamConfig) -> Result<Self> {
        opts.http.validate()?;
        let list = ShardList::resolve(spec, opts)?;
        Stream::new(list, cfg, Arc::new(DefaultOpener::from_options(opts)))
    }

    /// The shard list.
    pub fn shard_list(&self) -> &ShardList {
        &self.list
    }

    /// The longest the reader may spend in one shard's open or read retrying
    /// ([`Opener::retry_budget`], the largest over the shards): zero for local files.
    pub fn retry_budget(&self) -> std::time::Duration {
        self.list
            .shards()
            .iter()
            .map(|s| self.opener.retry_budget(&s.url))
            .max()
            .unwrap_or_default()
    }

    /// The config.
    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// This rank's plan for the current epoch.
    pub fn plan(&self) -> &EpochPlan {
        &self.plan
    }

    /// The position to save.
    pub fn state(&self) -> StreamState {
        StreamState {
            version: STATE_VERSION,
            epoch: self.epoch,
            samples: self.samples,
            events: self.events,
            fingerprint: self.fingerprint,
            done: self.done as u64,
            excluded: self.excluded.clone(),
        }
    }

    /// Continues from `state` (saved by a stream with the same list and config); the
    /// replay happens lazily on the following calls to `next`.
    pub fn restore(&mut self, state: &StreamState) -> Result<()> {
        if state.version != STATE_VERSION {
            return Err(Error::Config(format!(
                "stream state version {} (expected {STATE_VERSION})",
                state.version
            )));
        }
        if state.fingerprint != self.fingerprint
            && state.fingerprint != legacy_fingerprint(&self.list, &self.cfg)
        {
            return Err(Error::Config(format!(
                "stream state was saved with another shard list (names, order or sample \
                 counts; another directory alone is fine), seed, rank, world size, mode or \
                 shuffle setting than this one ({} shards from {}); resume with the \
                 shards and settings of the saved run, or start a new run",
                self.list.shards().len(),
                self.list.shards().first().map_or("", |s| s.url.as_str()),
            )));
        }
        self.start_epoch(state.epoch, state.excluded.clone());
        self.skip = state.events;
        // The shards the saved stream had read through yielded all their samples before
        // the saved position, so the replay drops them whatever they hold: when their
        // sample counts are known and the epoch had no shard error so far (each then
        // yielded its count), stand-ins of that many empty samples take their place, and
        // only the shards after them are read again. The shuffle buffer's draws depend
        // on the number of samples alone, so the replay ends in the same state.
        let known = |p: &usize| self.list.shards()[*p].nsamples.is_some();
        let done = (state.done as usize).min(self.plan.shards.len());
        if state.events == state.samples && self.plan.shards[..done].iter().all(known) {
            self.phantom_below = done;
        }
        self.finished = self.past_last_epoch();
        Ok(())
    }

    /// Moves to the start of epoch `epoch`, whatever position (or saved state) this
    /// stream had: the samples that follow are those a fresh stream yields once it has
    /// passed its first `epoch` epochs. For a run that cannot resume exactly (a
    /// checkpoint of another world size, whose per-rank positions do not apply).
    pub fn seek_epoch(&mut self, epoch: u64) {
        self.start_epoch(epoch, None);
        self.finished = self.past_last_epoch();
    }

    /// Goes on from the positions `saved` of the ranks of a run of another world size
    /// (one state per saved rank, in rank order): a job resumed on fewer or more GPUs,
    /// an elastic rendezvous back with another number of nodes. The per-rank positions
    /// do not fit this run's split of the shards, so the stream takes up the earliest
    /// epoch a saved rank was in, leaves out the shards every saved rank had read
    /// through (with all their samples yielded: [`StreamState::done`]; a rank already
    /// in a later epoch had read through all of its shards) and splits the rest of the
    /// epoch's permutation over this run's ranks, by the usual rules
    /// ([`epoch_plan_excluding`]). Every rank of the new run computes the same split.
    /// Nothing is skipped: the samples a saved rank had yielded from shards it had not
    /// read through are read again (see the module docs: of the order of `B ln B` for a
    /// shuffle buffer of `B`). When fewer shards than ranks are left, the next epoch starts
    /// instead (those few are the epoch's remainder). [`Mode::Resampled`] has nothing to
    /// leave out: the epoch starts afresh. Refuses states saved with another shard list
    /// or order-deciding settings.
    pub fn rejoin(&mut self, saved: &[StreamState]) -> Result<Rejoin> {
        let w = saved.len();
        let Some(epoch) = saved.iter().map(|s| s.epoch).min() else {
            return Err(Error::Config("rejoin: no saved rank positions".into()));
        };
        let counts: Option<Vec<u64>> = self.list.shards().iter().map(|s| s.nsamples).collect();
        let n = self.list.len();
        // The exclusions the saved epoch already had (a second change of world size
        // within one epoch): the same for every rank that was in it.
        let prior: Vec<usize> = saved
            .iter()
            .find(|s| s.epoch == epoch)
            .and_then(|s| s.excluded.as_deref())
            .unwrap_or(&[])
            .to_vec();
        let mut gone = vec![false; n];
        for &i in prior.iter().filter(|&&i| i < n) {
            gone[i] = true;
        }
        let mut reread = Some(0u64);
        for (r, s) in saved.iter().enumerate() {
            let old = StreamConfig {
                rank: r,
                world_size: w,
                ..self.cfg.clone()
            };
            if s.version != STATE_VERSION
                || (s.fingerprint != fingerprint(&self.list, &old)
                    && s.fingerprint != legacy_fingerprint(&self.list, &old))
            {
                return Err(Error::Config(format!(
                    "the saved position of rank {r} of {w} was written with another shard \
                     list (names, order or sample counts), seed, mode or shuffle setting \
                     than this run's ({n} shards from {}); resume with the shards and \
                     settings of the saved run, or start a new run",
                    self.list.shards().first().map_or("", |s| s.url.as_str()),
                )));
            }
            if self.cfg.mode == Mode::Resampled {
                continue;
            }
            let plan = plan::epoch_plan_excluding(&self.list, &old, epoch, &prior).shards;
            let (finished, yielded) = if s.epoch > epoch {
                (plan.as_slice(), 0)
            } else {
                (&plan[..(s.done as usize).min(plan.len())], s.samples)
            };
            for &i in finished {
                gone[i] = true;
            }
            let later = if s.epoch > epoch { s.samples } else { 0 };
            reread = match (reread, &counts) {
                (Some(acc), Some(c)) => {
                    let in_done: u64 = finished.iter().map(|&i| c[i]).sum();
                    Some(acc + yielded.saturating_sub(in_done) + later)
                }
                _ => None,
            };
        }
        let excluded: Vec<usize> = (0..n).filter(|&i| gone[i]).collect();
        let left = n - excluded.len();
        let mut out = Rejoin {
            epoch,
            saved_world: w,
            shards_done: excluded.len(),
            shards_left: left,
            reread,
            next_epoch: false,
            remainder_left_out: match (self.cfg.mode, self.cfg.remainder) {
                (Mode::Epoch, Remainder::Drop) => left % self.cfg.world_size.max(1),
                _ => 0,
            },
        };
        if self.cfg.mode == Mode::Resampled {
            out.reread = None;
            self.seek_epoch(epoch);
        } else if excluded.is_empty() {
            self.seek_epoch(epoch);
        } else if left < self.cfg.world_size {
            out.epoch = epoch + 1;
            out.next_epoch = true;
            out.remainder_left_out = 0;
            self.seek_epoch(epoch + 1);
        } else {
            self.start_epoch(epoch, Some(excluded.into()));
            self.finished = self.past_last_epoch();
        }
        Ok(out)
    }

    /// The next sample, collecting shard errors (see [`Stream::take_errors`]) and
    /// passing over epoch ends.
    pub fn next_sample(&mut self) -> Option<StreamSample> {
        loop {
            match self.next()? {
                Event::Sample(s) => return Some(s),
                Event::ShardError { url, error } => self.errors.push((url, error)),
                Event::EpochEnd { .. } => {}
            }
        }
    }

    /// Shard errors collected by [`Stream::next_sample`] since the last call.
    pub fn take_errors(&mut self) -> Vec<(String, Error)> {
        std::mem::take(&mut self.errors)
    }

    fn past_last_epoch(&self) -> bool {
        self.cfg.epochs.is_some_and(|n| self.epoch >= n)
    }

    /// Moves to the start of `epoch`, leaving out the shards `excluded`.
    fn start_epoch(&mut self, epoch: u64, excluded: Option<Arc<[usize]>>) {
        self.epoch = epoch;
        self.plan = plan::epoch_plan_excluding(
            &self.list,
            &self.cfg,
            epoch,
            excluded.as_deref().unwrap_or(&[]),
        );
        self.excluded = excluded;
        self.pending.clear();
        self.pending.resize(self.plan.shards.len(), 0);
        self.done = 0;
        self.phantom_below = 0;
        self.phantom = None;
        self.next_shard = 0;
        self.current = None;
        self.input_done = false;
        self.buffer.reset(self.cfg.sample_rng(epoch));
        self.read = 0;
        self.samples = 0;
        self.events = 0;
        self.skip = 0;
    }

    /// A counter of the stream's reading (samples read, stand-ins counted, shards
    /// opened), shared with another thread: it moves while the stream works without
    /// yielding anything yet (filling the shuffle buffer, replaying the epoch up to a
    /// restored position), so a watchdog can tell that from a stall.
    pub fn progress(&self) -> Arc<std::sync::atomic::AtomicU64> {
        Arc::clone(&self.progress)
    }

    fn pull(&mut self) -> Pull {
        self.progress
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            if self.plan.sample_limit.is_some_and(|l| self.read >= l) {
                self.current = None;
                self.phantom = None;
                return Pull::Exhausted;
            }
            if let Some((index, n)) = self.phantom {
                if index < n {
                    self.phantom = Some((index + 1, n));
                    self.read += 1;
                    let stand_in = RawSample {
                        key: String::new(),
                        members: Vec::new(),
                        shard: String::new(),
                        index_in_shard: index,
                    };
                    return Pull::Sample(self.next_shard - 1, stand_in);
                }
                self.phantom = None;
                continue;
            }
            if let Some(cur) = self.current.as_mut() {
                match cur.next() {
                    Some(Ok(s)) => {
                        self.read += 1;
                        return Pull::Sample(self.next_shard - 1, s);
                    }
                    Some(Err(e)) => {
                        let url = s_url(cur);
                        self.current = None;
                        return Pull::Error(url, e);
                    }
                    None => {
                        self.current = None;
                        continue;
                    }
                }
            }
            let Some(&i) = self.plan.shards.get(self.next_shard) else {
                return Pull::Exhausted;
            };
            self.next_shard += 1;
            if self.next_shard <= self.phantom_below
                && let Some(n) = self.list.shards()[i].nsamples
            {
                self.phantom = Some((0, n));
                continue;
            }
            let url = self.list.shards()[i].url.clone();
            match self.opener.open(&url) {
                Ok(r) => {
                    let n = self.list.shards()[i].nsamples;
                    self.current = Some(ShardSamples::new(&url, r).expecting(n));
                }
                Err(e) => return Pull::Error(url, e),
            }
        }
    }

    /// Moves `done` past the plan positions at the front that are read through with
    /// every sample yielded.
    fn advance_done(&mut self) {
        let over = self.next_shard - usize::from(self.current.is_some() || self.phantom.is_some());
        while self.done < over && self.pending[self.done] == 0 {
            self.done += 1;
        }
    }

    fn emit(&mut self, (pos, sample): (usize, RawSample)) -> Event {
        self.pending[pos] -= 1;
        self.advance_done();
        let number = self.samples;
        self.samples += 1;
        Event::Sample(StreamSample {
            epoch: self.epoch,
            number,
            sample,
        })
    }

    /// The next event of the epoch, or `None` at its end (skipping not applied).
    fn step(&mut self) -> Option<Event> {
        while !self.input_done {
            match self.pull() {
                Pull::Sample(pos, s) => {
                    self.pending[pos] += 1;
                    if let Some(out) = self.buffer.push((pos, s)) {
                        return Some(self.emit(out));
                    }
                }
                Pull::Error(url, error) => {
                    self.advance_done();
                    return Some(Event::ShardError { url, error });
                }
                Pull::Exhausted => {
                    self.input_done = true;
                    self.advance_done();
                }
            }
        }
        let out = self.buffer.drain()?;
        Some(self.emit(out))
    }
}

fn s_url(s: &ShardSamples) -> String {
    s.url().to_owned()
}

impl Iterator for Stream {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if self.finished {
                return None;
            }
            match self.step() {
                Some(ev) => {
                    self.events += 1;
                    if self.skip > 0 {
                        self.skip -= 1;
                        continue;
                    }
                    return Some(ev);
                }
                None => {
                    let (epoch, samples) = (self.epoch, self.samples);
                    // What is left of a rejoined epoch may be nothing for this rank
                    // (equalised to an empty shard); that is no sign of a dead source.
                    let rejoined = self.excluded.is_some();
                    self.start_epoch(epoch + 1, None);
                    self.finished = (samples == 0 && !rejoined) || self.past_last_epoch();
                    return Some(Event::EpochEnd { epoch, samples });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(urls: &[&str]) -> ShardList {
        ShardList::from_urls(urls.iter().map(|u| u.to_string()).collect(), false).unwrap()
    }

    #[test]
    fn shard_names_drop_the_shared_directory() {
        let l = list(&["/a/in1k/train-000.tar", "/a/in1k/train-001.tar"]);
        assert_eq!(shard_names(&l), ["train-000.tar", "train-001.tar"]);
        // Different directories keep what tells them apart.
        let l = list(&["/d/x/000.tar", "/d/y/000.tar"]);
        assert_eq!(shard_names(&l), ["x/000.tar", "y/000.tar"]);
        // A prefix shared inside a file name stays.
        let l = list(&["/d/train-10.tar", "/d/train-11.tar"]);
        assert_eq!(shard_names(&l), ["train-10.tar", "train-11.tar"]);
        assert_eq!(shard_names(&list(&["/d/one.tar"])), ["one.tar"]);
        assert_eq!(shard_names(&list(&["a.tar", "b.tar"])), ["a.tar", "b.tar"]);
        // Paths that first differ inside a multi-byte character (ö, ü: C3 B6, C3 BC).
        let l = list(&["/data/größe/a.tar", "/data/grüße/a.tar"]);
        assert_eq!(shard_names(&l), ["größe/a.tar", "grüße/a.tar"]);
        let l = list(&["/d/猫.tar", "/d/狗.tar"]);
        assert_eq!(shard_names(&l), ["猫.tar", "狗.tar"]);
        // Presigned URLs signed again: the same names.
        let l = list(&["https://s/b/t-0.tar?sig=a/1", "https://s/b/t-1.tar?sig=b#x"]);
        assert_eq!(shard_names(&l), ["t-0.tar", "t-1.tar"]);
        // The same shards over an http mirror: the same fingerprint.
        let cfg = StreamConfig::default();
        let local = list(&["/data/in1k/t-0.tar", "/data/in1k/t-1.tar"]);
        let mirror = list(&["https://h/x/in1k/t-0.tar", "https://h/x/in1k/t-1.tar"]);
        assert_eq!(fingerprint(&local, &cfg), fingerprint(&mirror, &cfg));
        let swapped = list(&["/data/in1k/t-1.tar", "/data/in1k/t-0.tar"]);
        assert_ne!(fingerprint(&local, &cfg), fingerprint(&swapped, &cfg));
        // What the ranks of a job compare: names and counts, not where the copy is.
        assert_eq!(list_fingerprint(&local), list_fingerprint(&mirror));
        assert_ne!(list_fingerprint(&local), list_fingerprint(&swapped));
        let counted = |n: u64| {
            ShardList::from_specs(
                ["/d/a.tar", "/d/b.tar"]
                    .iter()
                    .map(|u| ShardSpec {
                        url: u.to_string(),
                        nsamples: Some(n),
                    })
                    .collect(),
            )
        };
        assert_eq!(list_fingerprint(&counted(5)), list_fingerprint(&counted(5)));
        assert_ne!(list_fingerprint(&counted(5)), list_fingerprint(&counted(6)));
    }

    /// A state saved before shard names (whole URLs) still resumes at the same place.
    #[test]
    fn legacy_states_over_whole_urls_restore() {
        let l = list(&["/old/a.tar", "/old/b.tar"]);
        let cfg = StreamConfig::default();
        let mut s = Stream::new(l.clone(), cfg.clone(), Arc::new(FileOpener)).unwrap();
        let mut state = s.state();
        state.fingerprint = legacy_fingerprint(&l, &cfg);
        assert_ne!(state.fingerprint, fingerprint(&l, &cfg));
        s.restore(&state).unwrap();
        state.fingerprint ^= 1;
        let e = s.restore(&state).unwrap_err().to_string();
        assert!(
            e.contains("another shard list") && e.contains("/old/a.tar"),
            "{e}"
        );
    }
}
