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
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            // Each line parses alone, so serde's own position always says line 1.
            serde_json::from_str(l).map_err(|e| Error::Json {
                path: path.to_owned(),
                source: serde::de::Error::custom(format!("line {}: {e}", i + 1)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broken line of a rejected list is named by its own line number (each line
    /// parses alone, so serde's position said "line 1" for every one).
    #[test]
    fn a_bad_line_is_named_by_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.rejected.jsonl");
        let good = r#"{"source":"a.jpg","reason":"decode_error","detail":"x"}"#;
        std::fs::write(&path, format!("{good}\n{good}\n{{\"source\":\n")).unwrap();
        let err = read_rejects(&path).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        std::fs::write(&path, format!("{good}\n")).unwrap();
        assert_eq!(read_rejects(&path).unwrap().len(), 1);
    }
}
