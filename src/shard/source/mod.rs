//! Inputs: each dataset layout is a [`Source`] that enumerates items in a
//! deterministic order and turns one planned item into a sample.

pub mod ade20k;
pub mod coco;
pub mod files;
pub mod imagenet;

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::format::index::IndexRow;
use crate::format::manifest::{Category, Class};
use crate::format::reject::Reject;
use crate::image::{self, ImageInfo, ImageLimits};

/// One planned input. Sources fill everything but `duplicate_of`, which the planner
/// sets when an earlier item (in enumeration order) already has the same key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Position in the source's enumeration order.
    pub ordinal: u64,
    /// WebDataset key (already sanitised).
    pub key: String,
    /// Where it comes from: a path relative to the root, or `row:N`.
    pub source: String,
    /// Class index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<i64>,
    /// Caption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// Source-specific data (list-row columns, annotation paths, COCO annotations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
    /// The source of the earlier item with the same key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
    /// `duplicate_of` is a *later* input of the key, which keeps it because this one
    /// did not load when the planner tried it: writing loads this one anyway and reports
    /// its own failure, or `duplicate_key` should it load after all (a transient
    /// failure), so a key is never stored twice.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate_if_loads: bool,
}

impl Item {
    /// An item with no label, caption or extra data.
    pub fn new(ordinal: u64, key: String, source: String) -> Self {
        Item {
            ordinal,
            key,
            source,
            label: None,
            caption: None,
            extra: None,
            duplicate_of: None,
            duplicate_if_loads: false,
        }
    }

    /// A reject for this item.
    pub fn reject(&self, reason: &str, detail: impl Into<String>) -> Reject {
        Reject::new(&self.source, Some(self.key.clone()), reason, detail)
    }
}

/// What enumeration yields: an item to plan, or an input rejected on sight.
#[derive(Debug, Clone)]
pub enum Entry {
    /// An input to load.
    Item(Item),
    /// An input that cannot become a sample (unreadable directory, bad list row, ...).
    Reject(Reject),
}

/// A loaded, validated sample ready to be written.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Members `(extension, bytes)` in the order they are stored.
    pub members: Vec<(String, Vec<u8>)>,
    /// Its index row; `shard`, `offset` and `length` are filled in by the writer.
    pub row: IndexRow,
}

/// How thoroughly images are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Validation {
    /// Magic bytes, header dimensions, limits and a truncation check (fast).
    #[default]
    Header,
    /// Everything above plus a full decode of every image.
    Decode,
}

/// Re-encoding of large originals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reencode {
    /// Longest side after re-encoding; smaller images are stored untouched.
    pub max_side: u32,
    /// JPEG quality, 1..=100.
    pub quality: u8,
}

/// Everything a source needs to load an item.
#[derive(Debug, Clone)]
pub struct LoadContext {
    /// How images are checked.
    pub validation: Validation,
    /// Size limits.
    pub limits: ImageLimits,
    /// Optional re-encoding.
    pub reencode: Option<Reencode>,
    /// Whether symlinks may point outside the input root.
    pub follow_symlinks: bool,
}

/// Dataset-level metadata a source contributes to the manifest.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    /// Class table.
    pub classes: Option<Vec<Class>>,
    /// ImageNet WNIDs.
    pub wnids: Option<Vec<String>>,
    /// COCO categories.
    pub categories: Option<Vec<Category>>,
    /// Things worth telling the user (e.g. classes without samples).
    pub warnings: Vec<String>,
}

/// A dataset layout.
pub trait Source: Sync {
    /// Builder name recorded in the manifest (`imagenet`, `files`, ...).
    fn kind(&self) -> &'static str;
    /// Parameters identifying the input (recorded in the manifest, part of the resume
    /// fingerprint).
    fn params(&self) -> serde_json::Value;
    /// Rough, deterministic number of items, used to size the planner's buckets.
    fn size_hint(&self) -> Result<u64>;
    /// Calls `emit` for every input in a deterministic order. Errors abort the run
    /// (e.g. a missing root); bad individual inputs are emitted as rejects.
    fn enumerate(&self, emit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()>;
    /// Reads and validates one item.
    fn load(&self, item: &Item, ctx: &LoadContext) -> std::result::Result<Sample, Reject>;
    /// Manifest metadata (classes, categories, warnings); called after enumeration.
    fn metadata(&self) -> Metadata;
}

/// Resolves `rel` under `root`, refusing absolute paths, `..` components and (unless
/// `follow_symlinks`) anything whose real path leaves the real root.
pub fn resolve_under(
    root: &Path,
    rel: &str,
    follow_symlinks: bool,
) -> std::result::Result<PathBuf, (String, String)> {
    let p = Path::new(rel);
    if rel.is_empty()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err((
            "unsafe_path".into(),
            format!("path `{rel}` is absolute or leaves the root"),
        ));
    }
    let joined = root.join(p);
    if follow_symlinks {
        return Ok(joined);
    }
    let real_root = real_root(root)?;
    match joined.canonicalize() {
        Ok(real) if real.starts_with(&real_root) => Ok(joined),
        Ok(real) => Err((
            "unsafe_path".into(),
            format!(
                "`{rel}` resolves to {} outside the root (pass --follow-symlinks to allow)",
                real.display()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(not_found(rel, &joined)),
        Err(e) => Err(("unreadable".into(), format!("{}: {e}", joined.display()))),
    }
}

/// Reason and detail for input `rel` (at `path`) that does not exist. A walk gives a file
/// name that is not valid UTF-8 with U+FFFD in its place ([`sorted_dir`]), and that name
/// is then not found: such an input is `bad_name`, not `missing_file`.
pub fn not_found(rel: &str, path: &Path) -> (String, String) {
    if rel.contains(char::REPLACEMENT_CHARACTER) {
        (
            "bad_name".into(),
            format!(
                "{}: the file name is not valid UTF-8 (shown with U+FFFD); keys and index \
                 paths are UTF-8 text, so rename the file",
                path.display()
            ),
        )
    } else {
        (
            "missing_file".into(),
            format!("{}: not found", path.display()),
        )
    }
}

thread_local! {
    /// The last root canonicalised on this thread (one source = one root, so this
    /// saves a path walk per input).
    static REAL_ROOT: std::cell::RefCell<Option<(PathBuf, PathBuf)>> =
        const { std::cell::RefCell::new(None) };
}

fn real_root(root: &Path) -> std::result::Result<PathBuf, (String, String)> {
    REAL_ROOT.with(|cell| {
        if let Some((given, real)) = &*cell.borrow()
            && given == root
        {
            return Ok(real.clone());
        }
        let real = root.canonicalize().map_err(|e| {
            (
                "unreadable".to_string(),
                format!("root {}: {e}", root.display()),
            )
        })?;
        *cell.borrow_mut() = Some((root.to_owned(), real.clone()));
        Ok(real)
    })
}

/// An image read and checked according to the context.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    /// Bytes to store (original, or re-encoded).
    pub bytes: Vec<u8>,
    /// Format and size of the stored bytes.
    pub info: ImageInfo,
    /// Whether the bytes were re-encoded.
    pub reencoded: bool,
}

/// Checks image bytes: probe or full decode, then optional re-encoding.
pub fn check_image(
    bytes: Vec<u8>,
    ctx: &LoadContext,
) -> std::result::Result<LoadedImage, image::ImageProblem> {
    let info = match ctx.validation {
        Validation::Header => image::probe(&bytes, &ctx.limits)?,
        Validation::Decode => image::decode_check(&bytes, &ctx.limits)?,
    };
    if let Some(re) = ctx.reencode
        && let Some((new, new_info)) =
            image::reencode(&bytes, &ctx.limits, re.max_side, re.quality)?
    {
        // What is stored must meet the limits too (`verify` checks it against them).
        if new_info.width < ctx.limits.min_side || new_info.height < ctx.limits.min_side {
            return Err(image::ImageProblem::TooSmallReencoded {
                from_width: info.width,
                from_height: info.height,
                width: new_info.width,
                height: new_info.height,
            });
        }
        let info = new_info;
        return Ok(LoadedImage {
            bytes: new,
            info,
            reencoded: true,
        });
    }
    Ok(LoadedImage {
        bytes,
        info,
        reencoded: false,
    })
}

/// Reads `item.source` under `root` and checks it as an image; problems become
/// rejects naming the file.
pub fn load_image_file(
    root: &Path,
    item: &Item,
    ctx: &LoadContext,
) -> std::result::Result<LoadedImage, Reject> {
    load_image_at(root, &item.source, item, ctx)
}

/// Like [`load_image_file`] for an arbitrary relative path `rel`.
pub fn load_image_at(
    root: &Path,
    rel: &str,
    item: &Item,
    ctx: &LoadContext,
) -> std::result::Result<LoadedImage, Reject> {
    let path = resolve_under(root, rel, ctx.follow_symlinks)
        .map_err(|(reason, detail)| Reject::new(rel, Some(item.key.clone()), reason, detail))?;
    // Larger than a tar member the readers accept (`verify`, `index`, the loader): refused
    // before it is read whole into memory.
    if let Ok(m) = std::fs::metadata(&path)
        && m.len() > crate::stream::MAX_MEMBER_BYTES
    {
        return Err(Reject::new(
            rel,
            Some(item.key.clone()),
            "too_large",
            format!(
                "{}: {} bytes, more than the {} a shard member may hold",
                path.display(),
                m.len(),
                crate::stream::MAX_MEMBER_BYTES
            ),
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| {
        let (reason, detail) = if e.kind() == std::io::ErrorKind::NotFound {
            not_found(rel, &path)
        } else {
            ("unreadable".into(), format!("{}: {e}", path.display()))
        };
        Reject::new(rel, Some(item.key.clone()), reason, detail)
    })?;
    check_image(bytes, ctx).map_err(|p| {
        Reject::new(
            rel,
            Some(item.key.clone()),
            p.code(),
            format!("{}: {p}", path.display()),
        )
    })
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The index row of an image sample (position fields left at zero).
pub fn image_row(item: &Item, img: &LoadedImage, members: &[(String, Vec<u8>)]) -> IndexRow {
    IndexRow {
        key: item.key.clone(),
        label: item.label,
        width: img.info.width,
        height: img.info.height,
        format: img.info.format.name().to_owned(),
        image_bytes: img.bytes.len() as u64,
        sha256: sha256_hex(&img.bytes),
        source: item.source.clone(),
        members: members
            .iter()
            .map(|(e, _)| e.as_str())
            .collect::<Vec<_>>()
            .join(","),
        caption: item.caption.clone(),
        reencoded: img.reencoded,
        ..Default::default()
    }
}

/// Sorted names of the entries of `dir` (for deterministic walks). A name that is not
/// valid UTF-8 comes out lossy, with U+FFFD: opening it fails, and [`not_found`] turns
/// that into a `bad_name` reject.
pub fn sorted_dir(dir: &Path) -> std::io::Result<Vec<(String, std::fs::FileType)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        out.push((e.file_name().to_string_lossy().into_owned(), e.file_type()?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--max-side` must not store what `--min-side` refuses: a 400x40 panorama fits a
    /// maximum side of 100 as 100x10, below a minimum side of 32, so it is rejected as
    /// too small (once re-encoded), and stored when it stays within the limits.
    #[test]
    fn reencoding_below_the_minimum_side_is_too_small() {
        let bytes = crate::testkit::jpeg(&crate::testkit::JpegSpec::rgb(400, 40, 1));
        let ctx = |min_side: u32| LoadContext {
            validation: Validation::Header,
            limits: ImageLimits {
                min_side,
                ..ImageLimits::default()
            },
            reencode: Some(Reencode {
                max_side: 100,
                quality: 90,
            }),
            follow_symlinks: false,
        };
        let e = check_image(bytes.clone(), &ctx(32)).unwrap_err();
        assert_eq!(e.code(), "too_small");
        assert!(
            e.to_string().contains("400x40") && e.to_string().contains("100x10"),
            "{e}"
        );
        let ok = check_image(bytes, &ctx(8)).unwrap();
        assert!(ok.reencoded);
        assert_eq!((ok.info.width, ok.info.height), (100, 10));
    }

    /// A file larger than a shard member may be (4 GiB) is refused before it is read
    /// (a sparse file: nothing is written or read).
    #[test]
    fn an_input_over_the_member_limit_is_too_large() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("huge.jpg")).unwrap();
        f.set_len(crate::stream::MAX_MEMBER_BYTES + 1).unwrap();
        let item = Item {
            ordinal: 0,
            key: "huge".into(),
            source: "huge.jpg".into(),
            label: None,
            caption: None,
            extra: None,
            duplicate_of: None,
            duplicate_if_loads: false,
        };
        let ctx = LoadContext {
            validation: Validation::Header,
            limits: ImageLimits::default(),
            reencode: None,
            follow_symlinks: false,
        };
        let r = load_image_file(dir.path(), &item, &ctx).err().unwrap();
        assert_eq!(r.reason, "too_large");
        assert!(r.detail.contains("4294967297 bytes"), "{}", r.detail);
    }

    #[test]
    fn resolve_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a.jpg"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        assert!(resolve_under(&root, "a.jpg", false).is_ok());
        assert_eq!(
            resolve_under(&root, "../secret", false).unwrap_err().0,
            "unsafe_path"
        );
        assert_eq!(
            resolve_under(&root, "/etc/passwd", false).unwrap_err().0,
            "unsafe_path"
        );
        assert_eq!(
            resolve_under(&root, "nope.jpg", false).unwrap_err().0,
            "missing_file"
        );
        #[cfg(unix)]
        {
            assert_eq!(
                resolve_under(&root, "link", false).unwrap_err().0,
                "unsafe_path"
            );
            assert!(resolve_under(&root, "link", true).is_ok());
        }
    }
}
