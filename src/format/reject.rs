//! The rejected list: every input that did not make it into the index, with a reason.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One rejected input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Input path relative to the root, or `row:N` for a list row, or `shard:member`.
    pub source: String,
    /// The key the sample would have had, if one was derived.
    pub key: Option<String>,
    /// Stable machine-readable reason code (`truncated`, `duplicate_key`, ...).
    pub reason: String,
    /// Human-readable explanation.
    pub detail: String,
}

impl Reject {
    /// A reject with the given fields.
    pub fn new(
        source: impl Into<String>,
        key: Option<String>,
        reason: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Reject {
            source: source.into(),
            key,
            reason: reason.into(),
            detail: detail.into(),
        }
    }
}

/// Writes the rejected list as JSON lines, atomically.
pub fn write_rejects(path: &Path, rejects: &[Reject]) -> Result<()> {
    let mut buf = Vec::new();
    for r in rejects {
        serde_json::to_writer(&mut buf, r).map_err(|e| Error::Json {
            path: path.to_owned(),
            source: e,
        })?;
        buf.write_all(b"\n").expect("vec write");
    }
    super::atomic_write(path, &buf)
}

/// Reads a rejected list.
pub fn read_rejects(path: &Path) -> Result<Vec<Reject>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| Error::Json {
                path: path.to_owned(),
                source: e,
            })
        })
        .collect()
}
