//! ADE20K scene parsing (the `ADEChallengeData2016` release, 150 classes).
//!
//! ```text
//! root/images/{training,validation}/ADE_train_00000001.jpg
//! root/annotations/{training,validation}/ADE_train_00000001.png
//! ```
//!
//! A sample is the image (`jpg`, or the extension of its real format) plus `seg.png`:
//! the label map's bytes, untouched (8-bit, 0 = ignore, 1..=150 = classes). Images and
//! label maps are paired by file stem; every file in both folders ends up in the index
//! or the rejected list:
//!
//! * image without a label map: `missing_annotation`;
//! * label map without an image: `missing_file` (source = the label map);
//! * label map that is not an 8-bit gray/palette PNG: `bad_annotation` (or the probe's
//!   reason when it is not a readable image at all, source = the label map);
//! * label map whose size differs from the image's: `size_mismatch`.
//!
//! Images are never re-encoded here (`--max-side` would break the pixel alignment with
//! the label map), so a [`super::Reencode`] in the load context is ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{
    Entry, Item, LoadContext, Metadata, Sample, Source, Validation, image_row, load_image_file,
    not_found, resolve_under, sorted_dir,
};
use crate::error::{Error, Result};
use crate::format::reject::Reject;
use crate::format::sanitize_key;
use crate::image;

/// Which split to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdeSplit {
    /// `training/`.
    Train,
    /// `validation/`.
    Val,
}

impl AdeSplit {
    /// The folder name under `images/` and `annotations/`.
    pub fn dir(self) -> &'static str {
        match self {
            AdeSplit::Train => "training",
            AdeSplit::Val => "validation",
        }
    }
}

/// The ADE20K source.
#[derive(Debug)]
pub struct Ade20k {
    root: PathBuf,
    split: AdeSplit,
    follow_symlinks: bool,
}

/// `name` without its last extension (`a.b.jpg` -> `a.b`).
fn stem(name: &str) -> &str {
    match name.rfind('.') {
        Some(i) if i > 0 => &name[..i],
        _ => name,
    }
}

/// Lowercased last extension of `name`.
fn ext(name: &str) -> String {
    match name.rfind('.') {
        Some(i) if i > 0 => name[i + 1..].to_ascii_lowercase(),
        _ => String::new(),
    }
}

impl Ade20k {
    /// Opens `root` (the `ADEChallengeData2016` folder holding `images/` and
    /// `annotations/`).
    pub fn new(root: &Path, split: AdeSplit, follow_symlinks: bool) -> Result<Self> {
        let sd = split.dir();
        let images = root.join("images").join(sd);
        if !images.is_dir() {
            return Err(Error::input(
                root,
                format!(
                    "no `images/{sd}/` folder here; --root must point at ADEChallengeData2016 \
                     (the folder holding images/ and annotations/)"
                ),
            ));
        }
        let annotations = root.join("annotations").join(sd);
        if !annotations.is_dir() {
            return Err(Error::input(
                root,
                format!("no `annotations/{sd}/` folder here: every image needs its label map"),
            ));
        }
        Ok(Ade20k {
            root: root.to_owned(),
            split,
            follow_symlinks,
        })
    }

    fn images_rel(&self) -> String {
        format!("images/{}", self.split.dir())
    }

    fn annotations_rel(&self) -> String {
        format!("annotations/{}", self.split.dir())
    }
}

/// Reads the bytes of `rel` under `root`; problems become rejects naming `rel`.
fn read_under(
    root: &Path,
    rel: &str,
    key: &str,
    follow_symlinks: bool,
) -> std::result::Result<Vec<u8>, Reject> {
    let path = resolve_under(root, rel, follow_symlinks)
        .map_err(|(reason, detail)| Reject::new(rel, Some(key.to_owned()), reason, detail))?;
    std::fs::read(&path).map_err(|e| {
        let (reason, detail) = if e.kind() == std::io::ErrorKind::NotFound {
            not_found(rel, &path)
        } else {
            ("unreadable".into(), format!("{}: {e}", path.display()))
        };
        Reject::new(rel, Some(key.to_owned()), reason, detail)
    })
}

/// Bit depth and colour type from a PNG's IHDR chunk.
fn png_depth_and_color(bytes: &[u8]) -> Option<(u8, u8)> {
    if bytes.len() >= 26 && &bytes[12..16] == b"IHDR" {
        Some((bytes[24], bytes[25]))
    } else {
        None
    }
}

impl Source for Ade20k {
    fn kind(&self) -> &'static str {
        "ade20k"
    }

    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "root": self.root.display().to_string(),
            "split": self.split.dir(),
        })
    }

    fn size_hint(&self) -> Result<u64> {
        let dir = self.root.join(self.images_rel());
        let n = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .count();
        Ok(n as u64)
    }

    fn enumerate(&self, emit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
        let img_rel = self.images_rel();
        let ann_rel = self.annotations_rel();
        let img_dir = self.root.join(&img_rel);
        let ann_dir = self.root.join(&ann_rel);
        let images = sorted_dir(&img_dir).map_err(|e| Error::io(&img_dir, e))?;
        let anns = sorted_dir(&ann_dir).map_err(|e| Error::io(&ann_dir, e))?;

        // Label maps by stem: the `.png` one first, then the rest in name order.
        let mut by_stem: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, ty) in &anns {
            if ty.is_dir() {
                emit(Entry::Reject(Reject::new(
                    format!("{ann_rel}/{name}"),
                    None,
                    "not_a_file",
                    "folder inside the annotations folder",
                )))?;
                continue;
            }
            by_stem
                .entry(stem(name).to_owned())
                .or_default()
                .push(name.clone());
        }
        for names in by_stem.values_mut() {
            names.sort_by_key(|n| (ext(n) != "png", n.clone()));
        }

        let mut used: BTreeSet<String> = BTreeSet::new();
        let mut ordinal = 0u64;
        for (name, ty) in &images {
            let rel = format!("{img_rel}/{name}");
            let key = sanitize_key(stem(name));
            if ty.is_dir() {
                emit(Entry::Reject(Reject::new(
                    rel,
                    None,
                    "not_a_file",
                    "folder inside the images folder",
                )))?;
                continue;
            }
            let s = stem(name);
            let Some(ann) = by_stem.get(s).and_then(|v| v.first()) else {
                emit(Entry::Reject(Reject::new(
                    rel,
                    Some(key),
                    "missing_annotation",
                    format!("no label map `{ann_rel}/{s}.png`"),
                )))?;
                continue;
            };
            used.insert(s.to_owned());
            let mut item = Item::new(ordinal, key, rel);
            item.extra = Some(serde_json::json!({ "annotation": format!("{ann_rel}/{ann}") }));
            ordinal += 1;
            emit(Entry::Item(item))?;
        }

        // Every label map not paired with an image is accounted for.
        for (s, names) in &by_stem {
            let paired = used.contains(s);
            for (i, name) in names.iter().enumerate() {
                let rel = format!("{ann_rel}/{name}");
                if paired && i == 0 {
                    continue;
                }
                let r = if paired {
                    Reject::new(
                        rel,
                        Some(sanitize_key(s)),
                        "ambiguous_annotation",
                        format!(
                            "`{ann_rel}/{}` is the label map used for this stem",
                            names[0]
                        ),
                    )
                } else {
                    Reject::new(
                        rel,
                        Some(sanitize_key(s)),
                        "missing_file",
                        format!("label map without an image `{img_rel}/{s}.*`"),
                    )
                };
                emit(Entry::Reject(r))?;
            }
        }
        Ok(())
    }

    fn load(&self, item: &Item, ctx: &LoadContext) -> std::result::Result<Sample, Reject> {
        let ann_rel = item
            .extra
            .as_ref()
            .and_then(|e| e.get("annotation"))
            .and_then(|a| a.as_str())
            .ok_or_else(|| item.reject("missing_annotation", "item carries no label map path"))?
            .to_owned();
        debug_assert_eq!(ctx.follow_symlinks, self.follow_symlinks);
        // Never re-encode: the label map must stay pixel-aligned with the image.
        let plain = LoadContext {
            reencode: None,
            ..ctx.clone()
        };
        // A pair is stored or rejected together; the reject names the other file too,
        // so that every file of both folders is accounted for.
        let img = load_image_file(&self.root, item, &plain).map_err(|mut r| {
            r.detail = format!(
                "{} (its label map `{ann_rel}` is left out with it)",
                r.detail
            );
            r
        })?;

        let label =
            read_under(&self.root, &ann_rel, &item.key, ctx.follow_symlinks).map_err(|mut r| {
                r.detail = format!(
                    "{} (its image `{}` is left out with it)",
                    r.detail, item.source
                );
                r
            })?;
        let ann_reject = |reason: &str, detail: String| {
            let detail = format!("{detail} (its image `{}` is left out with it)", item.source);
            Reject::new(&ann_rel, Some(item.key.clone()), reason, detail)
        };
        let checked = match ctx.validation {
            Validation::Header => image::probe(&label, &ctx.limits),
            Validation::Decode => image::decode_check(&label, &ctx.limits),
        };
        let info = checked.map_err(|p| ann_reject(p.code(), format!("label map: {p}")))?;
        if info.format.name() != "png" {
            return Err(ann_reject(
                "bad_annotation",
                format!("label map is {}, not PNG", info.format.name()),
            ));
        }
        match png_depth_and_color(&label) {
            Some((8, 0 | 3)) => {}
            Some((depth, color)) => {
                return Err(ann_reject(
                    "bad_annotation",
                    format!(
                        "label map must be an 8-bit gray or palette PNG (class indices), \
                         found bit depth {depth}, colour type {color}"
                    ),
                ));
            }
            None => return Err(ann_reject("bad_annotation", "label map has no IHDR".into())),
        }
        if (info.width, info.height) != (img.info.width, img.info.height) {
            return Err(item.reject(
                "size_mismatch",
                format!(
                    "image is {}x{} but label map `{ann_rel}` is {}x{}",
                    img.info.width, img.info.height, info.width, info.height
                ),
            ));
        }

        let mut members = vec![
            (img.info.format.ext().to_owned(), Vec::new()),
            ("seg.png".to_owned(), Vec::new()),
        ];
        let mut row = image_row(item, &img, &members);
        row.target = Some(ann_rel);
        members[0].1 = img.bytes;
        members[1].1 = label;
        Ok(Sample { members, row })
    }

    fn metadata(&self) -> Metadata {
        Metadata::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_and_exts() {
        assert_eq!(stem("ADE_train_00000001.jpg"), "ADE_train_00000001");
        assert_eq!(stem("a.b.png"), "a.b");
        assert_eq!(stem(".hidden"), ".hidden");
        assert_eq!(ext("X.PNG"), "png");
        assert_eq!(ext("noext"), "");
    }

    #[test]
    fn ihdr_fields() {
        let mut b = vec![0u8; 26];
        b[12..16].copy_from_slice(b"IHDR");
        b[24] = 8;
        b[25] = 2;
        assert_eq!(png_depth_and_color(&b), Some((8, 2)));
        assert_eq!(png_depth_and_color(&b[..20]), None);
    }
}
