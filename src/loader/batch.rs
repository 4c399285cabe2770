//! Batches and the pool of reusable buffers behind them.

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::stream::StreamState;

/// Where a loader is, for resuming: saved after a batch, it makes a new loader start
/// with the batch that follows (see [`Loader::with_state`](super::Loader::with_state)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// The stream's position just after the last sample of the batch.
    pub stream: StreamState,
    /// Index within the epoch of the next batch.
    pub next_batch: u64,
    /// [`LoaderConfig::settings_fingerprint`](super::LoaderConfig::settings_fingerprint)
    /// of the loader that saved it (0: unknown, from a state saved before it existed).
    #[serde(default)]
    pub settings: u64,
}

/// The buffers of one batch; recycled through the pool.
#[derive(Debug)]
pub(crate) struct BatchBuf {
    pub(crate) len: usize,
    pub(crate) weak: Vec<u8>,
    pub(crate) strong: Vec<u8>,
    pub(crate) mask: Vec<u8>,
    pub(crate) labels: Vec<i64>,
    pub(crate) numbers: Vec<u64>,
    /// `batch_size` strings whose capacity is reused; only `..len` are valid.
    pub(crate) keys: Vec<String>,
}

impl BatchBuf {
    pub(crate) fn new(batch: usize, view_bytes: usize, strong: bool, mask_len: usize) -> Self {
        BatchBuf {
            len: 0,
            weak: vec![0; batch * view_bytes],
            strong: if strong {
                vec![0; batch * view_bytes]
            } else {
                Vec::new()
            },
            mask: vec![0; batch * mask_len],
            labels: vec![0; batch],
            numbers: vec![0; batch],
            keys: (0..batch).map(|_| String::with_capacity(64)).collect(),
        }
    }
}

/// A batch of samples, in stream order. Views are `len x size x size x 3` u8, row-major
/// RGB (NHWC; normalisation and the layout change belong on the GPU). Dropping the
/// batch returns its buffers to the loader's pool.
#[derive(Debug)]
pub struct Batch {
    pub(crate) buf: Option<BatchBuf>,
    pub(crate) pool: Sender<BatchBuf>,
    pub(crate) epoch: u64,
    pub(crate) index: u64,
    pub(crate) state: LoaderState,
    pub(crate) image_size: u32,
    pub(crate) view_bytes: usize,
    pub(crate) mask_len: usize,
}

impl Batch {
    fn buf(&self) -> &BatchBuf {
        self.buf.as_ref().expect("batch buffers present until drop")
    }

    /// Samples in the batch (`batch_size`, or fewer for an epoch's last batch).
    pub fn len(&self) -> usize {
        self.buf().len
    }

    /// Whether the batch has no samples (never true for a yielded batch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The epoch the samples belong to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Index of the batch within its epoch (0, 1, ...).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The state to save to resume after this batch.
    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }

    /// Side of the square views.
    pub fn image_size(&self) -> u32 {
        self.image_size
    }

    /// The weak (student) views, or the only view of the classification tasks.
    pub fn weak(&self) -> &[u8] {
        &self.buf().weak[..self.len() * self.view_bytes]
    }

    /// The strong (teacher) views (empty unless the task is ConMIM).
    pub fn strong(&self) -> &[u8] {
        let b = self.buf();
        &b.strong[..(b.len * self.view_bytes).min(b.strong.len())]
    }

    /// Patch masks, `len x mask_len()` (1 = masked), row-major patches.
    pub fn mask(&self) -> &[u8] {
        &self.buf().mask[..self.len() * self.mask_len]
    }

    /// Mask entries per sample (0 unless the task is ConMIM).
    pub fn mask_len(&self) -> usize {
        self.mask_len
    }

    /// Labels (`-1` where a sample has none).
    pub fn labels(&self) -> &[i64] {
        &self.buf().labels[..self.len()]
    }

    /// Sample numbers within the epoch (the stream's `number`).
    pub fn numbers(&self) -> &[u64] {
        &self.buf().numbers[..self.len()]
    }

    /// Sample keys.
    pub fn keys(&self) -> &[String] {
        &self.buf().keys[..self.len()]
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            // The loader may be gone, or the pool full (buffers grown for a consumer
            // that held every batch): then the buffers are simply freed. Never blocks.
            let _ = self.pool.try_send(buf);
        }
    }
}
