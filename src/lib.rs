//! # conmim — the data path for ConMIM pretraining
//!
//! The journey of one image, and the module that owns each stage:
//!
//! ```text
//! source files ──(shard::source::Source)──> shard::run ──> {split}-NNNNNN.tar
//!                                                           {split}.index.parquet
//!                                                           {split}.manifest.json
//!                                                           {split}.rejected.jsonl
//! ```
//!
//! * [`format`](mod@format) says what a dataset *is* on disk: key and member naming, the tar writer
//!   that records every member's byte offset, the Parquet index schema, the manifest (in
//!   the `wids` shard-index form) and the rejected list. `schemas/` holds the written
//!   contract and tests check produced files against it.
//! * [`image`] checks pixels without drawing random numbers: format sniffing by magic
//!   bytes, header-only probing with size limits (no allocation for absurd headers),
//!   full decode validation and optional re-encoding of large originals.
//! * [`shard`] builds datasets. A [`shard::source::Source`] enumerates inputs
//!   (ImageNet folders, list files, ADE20K, COCO) in a deterministic order; the planner
//!   spills them into hash buckets (bounded memory, duplicate keys found per bucket)
//!   and replays them in one seeded global order; rayon workers load and validate
//!   samples; one assigner places them (shard, offset) in that order and rolls shards
//!   over by size/count, while shard writers write several shards at once (md5 as they
//!   go), each recorded in a work record before it is renamed into place, so `--resume`
//!   continues after the last complete shard. Every input ends in exactly one place:
//!   the index or the rejected list.
//! * [`inspect`] reads datasets back: `verify` (every byte against index and manifest)
//!   and `info` (counts and distributions).
//! * [`seed`] is the one deterministic random source (SplitMix64, written here so the
//!   same seed gives the same dataset whatever the dependency versions).
//!
//!
//! The streaming loader reads datasets back for training:
//!
//! ```text
//! stream::ShardList (dir | brace pattern | list | http(s) | pipe: when allowed)
//!   ──> stream::Stream (per-epoch seeded shard order, rank split, shuffle buffer,
//!       numbered samples, resumable state)   [1 reader thread]
//!   ──> loader workers: decode ──> shared crop/flip ──> weak + strong view ──> mask
//!       (params from (seed, epoch, sample))   [N threads, reusable slots]
//!   ──> collator: results in sequence order into pooled batch buffers ──> Batch
//! ```
//!
//! * [`stream`] knows nothing about pixels: shard lists, epoch plans, a streaming tar
//!   reader that survives truncated shards, the shuffle buffer and resume state.
//! * [`augment`] draws every random parameter of a sample from `(seed, epoch, sample)`
//!   (torchvision's RandomResizedCrop sampler, ColorJitter, grayscale, blur, solarize)
//!   and applies the photometric ops in place.
//! * [`mask`] generates patch masks (random, random 32-px cells, BEiT block-wise).
//! * [`loader`] runs the threads: bounded crossbeam channels, reordering by sequence
//!   number (so output does not depend on the thread count), error policy, stall and
//!   panic detection, resumable [`loader::LoaderState`].
//!
//! The model and the trainer (feature `train`, on libtorch through `tch`) build on top;
//! the data side never needs libtorch.

pub mod augment;
pub mod error;
pub mod format;
pub mod image;
pub mod inspect;
pub mod loader;
pub mod mask;
pub mod preview;
pub mod seed;
pub mod shard;
pub mod stream;
pub mod testkit;
#[cfg(feature = "train")]
pub mod train;

pub use error::{Error, Result};
