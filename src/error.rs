//! One error type for the library. Variants are structured so that a caller (or a
//! user reading the message) learns *which* file, shard or sample is at fault and what
//! to do about it.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on `path` failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The input (list file, annotation file, directory layout) is malformed.
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    /// A shard does not match its index or manifest.
    #[error("shard {shard}: sample {key}: {message}")]
    CorruptSample {
        shard: String,
        key: String,
        message: String,
    },
    /// A shard is malformed as a whole (tar structure, size, checksum).
    #[error("shard {shard}: {message}")]
    CorruptShard { shard: String, message: String },
    /// Parquet / Arrow failure while reading or writing an index.
    #[error("{path}: index: {message}")]
    Index { path: PathBuf, message: String },
    /// JSON (manifest, annotations, work records) failed to parse or serialise.
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// An earlier run left state that does not match this run's parameters.
    #[error("{path}: {message}")]
    Resume { path: PathBuf, message: String },
    /// Too many inputs were rejected.
    #[error(
        "{rejected} of {total} inputs rejected ({frac:.4} > --max-reject-frac {limit}); see {list}"
    )]
    TooManyRejects {
        rejected: u64,
        total: u64,
        frac: f64,
        limit: f64,
        list: PathBuf,
    },
    /// A whole (not `--part`) run found nothing to shard: nothing was written.
    #[error(
        "no inputs found for {dataset}: is the root or list right? (nothing written; a \
         `--part` run may be empty)"
    )]
    NoInputs { dataset: String },
    /// The loader skipped more corrupt samples than its error policy allows.
    #[error(
        "{errors} samples failed (more than --max-errors {limit}); the last: shard {shard}: sample {key}: {message}"
    )]
    TooManyErrors {
        errors: u64,
        limit: u64,
        shard: String,
        key: String,
        message: String,
    },
    /// With `drop_last`, a whole epoch gave fewer good samples than one batch: every
    /// epoch would be dropped and the stream would never yield (it ends instead).
    #[error(
        "epoch {epoch} gave {samples} good samples, fewer than one batch of {batch}: with \
         drop_last no batch can ever be made (lower the batch size, check the data, or \
         check how shards split across ranks)"
    )]
    EpochSmallerThanBatch {
        epoch: u64,
        samples: usize,
        batch: usize,
    },
    /// No sample finished for `seconds` seconds (a stalled source or a hung worker).
    #[error("loader stalled: nothing finished for {seconds:.0} s while waiting for {waiting_for}")]
    Stalled { seconds: f64, waiting_for: String },
    /// A loader thread panicked; the stream ends.
    #[error("loader thread {thread} panicked: {message}")]
    ThreadPanicked { thread: String, message: String },
}

impl Error {
    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// Shorthand for [`Error::Input`].
    pub fn input(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Input {
            path: path.into(),
            message: message.into(),
        }
    }
}
