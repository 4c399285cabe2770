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
//! again up to the saved position (I/O and tar parsing only, no decoding) — at most
//! one epoch of one rank's data. The state refuses a different seed, rank, world
//! size, mode, buffer or shard list (changing `epochs` is allowed). Shards are known
//! by their names relative to the directory they all share, so the same shards moved
//! elsewhere (a per-job scratch copy, another mount point, an http mirror) resume.
//!
//! # Errors
//! A shard that cannot be opened or is damaged yields the samples complete before the
//! damage, then one [`Event::ShardError`] (url + error), and the stream goes on with
//! the next shard. An epoch that yields no sample at all ends the stream after its
//! [`Event::EpochEnd`], so a dataset whose every shard fails cannot spin forever.
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
    Mode, Remainder, StreamConfig, epoch_plan, parse_dist_env, shard_order, stream_id,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
}

enum Pull {
    Sample(RawSample),
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
    buffer: ShuffleBuffer<RawSample>,
    read: u64,
    samples: u64,
    events: u64,
    skip: u64,
    finished: bool,
    errors: Vec<(String, Error)>,
}

/// Each shard's name for the fingerprint: its URL less the longest prefix, ending in
/// `/`, that all URLs share (a single shard: its file name). So the same shards resume
/// from another directory or an http mirror (a per-job scratch copy, another mount
/// point), while another list, order or sample count does not.
fn shard_names(list: &ShardList) -> Vec<&str> {
    let urls: Vec<&str> = list.shards().iter().map(|s| s.url.as_str()).collect();
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
    let cut = first[..common].rfind('/').map_or(0, |i| i + 1);
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
            read: 0,
            samples: 0,
            events: 0,
            skip: 0,
            finished: false,
            errors: Vec::new(),
            cfg,
        };
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
        self.start_epoch(state.epoch);
        self.skip = state.events;
        self.finished = self.past_last_epoch();
        Ok(())
    }

    /// Moves to the start of epoch `epoch`, whatever position (or saved state) this
    /// stream had: the samples that follow are those a fresh stream yields once it has
    /// passed its first `epoch` epochs. For a run that cannot resume exactly (a
    /// checkpoint of another world size, whose per-rank positions do not apply).
    pub fn seek_epoch(&mut self, epoch: u64) {
        self.start_epoch(epoch);
        self.finished = self.past_last_epoch();
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

    fn start_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.plan = epoch_plan(&self.list, &self.cfg, epoch);
        self.next_shard = 0;
        self.current = None;
        self.input_done = false;
        self.buffer.reset(self.cfg.sample_rng(epoch));
        self.read = 0;
        self.samples = 0;
        self.events = 0;
        self.skip = 0;
    }

    fn pull(&mut self) -> Pull {
        loop {
            if self.plan.sample_limit.is_some_and(|l| self.read >= l) {
                self.current = None;
                return Pull::Exhausted;
            }
            if let Some(cur) = self.current.as_mut() {
                match cur.next() {
                    Some(Ok(s)) => {
                        self.read += 1;
                        return Pull::Sample(s);
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
            let url = self.list.shards()[i].url.clone();
            match self.opener.open(&url) {
                Ok(r) => self.current = Some(ShardSamples::new(&url, r)),
                Err(e) => return Pull::Error(url, e),
            }
        }
    }

    fn emit(&mut self, sample: RawSample) -> Event {
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
                Pull::Sample(s) => {
                    if let Some(out) = self.buffer.push(s) {
                        return Some(self.emit(out));
                    }
                }
                Pull::Error(url, error) => return Some(Event::ShardError { url, error }),
                Pull::Exhausted => self.input_done = true,
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
                    self.start_epoch(epoch + 1);
                    self.finished = samples == 0 || self.past_last_epoch();
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
        // The same shards over an http mirror: the same fingerprint.
        let cfg = StreamConfig::default();
        let local = list(&["/data/in1k/t-0.tar", "/data/in1k/t-1.tar"]);
        let mirror = list(&["https://h/x/in1k/t-0.tar", "https://h/x/in1k/t-1.tar"]);
        assert_eq!(fingerprint(&local, &cfg), fingerprint(&mirror, &cfg));
        let swapped = list(&["/data/in1k/t-1.tar", "/data/in1k/t-0.tar"]);
        assert_ne!(fingerprint(&local, &cfg), fingerprint(&swapped, &cfg));
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
