//! What a dataset is on disk. See `schemas/README.md` for the written contract.
//!
//! * `{split}-NNNNNN.tar` — POSIX tar shards in WebDataset naming ([`tar`]);
//! * `{split}.index.parquet` — one row per sample ([`index`]);
//! * `{split}.manifest.json` — `wids` shard list plus dataset metadata ([`manifest`]);
//! * `{split}.rejected.jsonl` — every input that did not make it in ([`reject`]).

pub mod index;
pub mod manifest;
pub mod reject;
pub mod tar;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Version of the on-disk format written into every manifest.
pub const SCHEMA_VERSION: u32 = 1;
/// Longest key we write: keeps every member name inside the 100-byte ustar name field.
pub const MAX_KEY_LEN: usize = 80;

/// File name of shard `n` of `split`.
pub fn shard_name(split: &str, n: usize) -> String {
    format!("{split}-{n:06}.tar")
}
/// File name of the index of `split`.
pub fn index_name(split: &str) -> String {
    format!("{split}.index.parquet")
}
/// File name of the manifest of `split`.
pub fn manifest_name(split: &str) -> String {
    format!("{split}.manifest.json")
}
/// File name of the rejected list of `split`.
pub fn rejected_name(split: &str) -> String {
    format!("{split}.rejected.jsonl")
}

/// Turns an arbitrary name into a WebDataset key: only `[A-Za-z0-9_-]` survive
/// (anything else, dots and slashes included, becomes `_`); keys longer than
/// [`MAX_KEY_LEN`] keep a prefix plus a hash of the whole name so they stay unique.
pub fn sanitize_key(raw: &str) -> String {
    let mut key: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if key.is_empty() {
        key.push('_');
    }
    if key.len() > MAX_KEY_LEN {
        let h = crate::seed::hash_str(0, raw);
        key.truncate(MAX_KEY_LEN - 17);
        key.push('_');
        key.push_str(&format!("{h:016x}"));
    }
    key
}

/// Splits a tar member name into WebDataset (key, extension): the key is everything up
/// to the first dot of the basename, the extension the rest, lowercased.
pub fn split_member_name(name: &str) -> Option<(&str, String)> {
    let base_start = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    let dot = name[base_start..].find('.')? + base_start;
    let (key, ext) = (&name[..dot], &name[dot + 1..]);
    if key.is_empty() || ext.is_empty() {
        return None;
    }
    Some((key, ext.to_ascii_lowercase()))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory,
/// fsync, rename, then an fsync of the directory. A reader sees the old file or the new
/// one, never a torn one, and after a power cut the new one is there once this returned.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    sync_parent_dir(path);
    Ok(())
}

/// fsyncs the directory holding `path`, which makes a rename into it durable (POSIX).
/// Best effort: some file systems refuse to sync a directory, and the rename itself
/// has happened either way.
pub fn sync_parent_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// The temporary name used while `path` is being written.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes `value` as pretty JSON (trailing newline) atomically.
pub fn atomic_write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Json {
        path: path.to_owned(),
        source: e,
    })?;
    bytes.push(b'\n');
    atomic_write(path, &bytes)
}

/// Reads and parses a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: path.to_owned(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_no_dots_or_slashes() {
        assert_eq!(sanitize_key("n01440764_10026"), "n01440764_10026");
        assert_eq!(sanitize_key("a.b/c d"), "a_b_c_d");
        assert_eq!(sanitize_key(""), "_");
        let long = "x".repeat(300);
        let k = sanitize_key(&long);
        assert_eq!(k.len(), MAX_KEY_LEN);
        assert_ne!(k, sanitize_key(&"x".repeat(301)));
    }

    #[test]
    fn member_names_split_at_first_dot_of_basename() {
        assert_eq!(split_member_name("k1.jpg"), Some(("k1", "jpg".into())));
        assert_eq!(
            split_member_name("k1.seg.PNG"),
            Some(("k1", "seg.png".into()))
        );
        assert_eq!(
            split_member_name("d.x/k1.cls"),
            Some(("d.x/k1", "cls".into()))
        );
        assert_eq!(split_member_name("noext"), None);
    }
}
