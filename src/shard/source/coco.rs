//! COCO instances (detection / instance segmentation), e.g. COCO 2017.
//!
//! ```text
//! root/train2017/000000000009.jpg
//! root/annotations/instances_train2017.json
//! ```
//!
//! A sample is the image (`jpg`, or the extension of its real format) plus `json`, the
//! image's record with all its annotations:
//!
//! ```json
//! {"image_id": 9, "file_name": "000000000009.jpg", "width": 640, "height": 480,
//!  "has_annotations": true,
//!  "annotations": [{"id": 1, "category_id": 55, "bbox": [x, y, w, h], "area": 1.0,
//!                   "iscrowd": 0, "segmentation": [[x1, y1, ...]] or {"counts", "size"}}]}
//! ```
//!
//! (keys in the member are written in sorted order). Images without annotations are
//! kept (`has_annotations: false`). Files in the image folder that the JSON does not
//! list are rejected (`not_in_annotations`); listed images missing on disk become
//! `missing_file`; images whose header size differs from the JSON's are
//! `size_mismatch`. Annotations naming unknown images or categories cannot become
//! samples: they are left out and counted in the manifest warnings.
//!
//! Memory: the annotation file is parsed into typed records, and each annotation is
//! turned into its compact JSON text as soon as it is read (the train file is ~450 MB;
//! a generic JSON tree of it would take several GB). Images are never re-encoded here
//! (boxes and polygons are in original pixel coordinates), so a [`super::Reencode`] in
//! the load context is ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    Entry, Item, LoadContext, Metadata, Sample, Source, image_row, load_image_file, sorted_dir,
};
use crate::error::{Error, Result};
use crate::format::manifest::Category;
use crate::format::reject::Reject;
use crate::format::sanitize_key;

/// One `images[]` entry.
#[derive(Debug, Clone, Deserialize)]
struct CocoImage {
    id: i64,
    file_name: String,
    width: u32,
    height: u32,
}

/// One `annotations[]` entry as it is in the file.
#[derive(Deserialize)]
struct RawAnnotation {
    id: i64,
    image_id: i64,
    category_id: i64,
    bbox: [f64; 4],
    #[serde(default)]
    area: f64,
    #[serde(default)]
    iscrowd: u8,
    /// Polygons (`[[x, y, ...], ...]`) or RLE (`{"counts", "size"}`); absent (or null)
    /// in detection-only exports: then no polygons, `[]`, as the schema wants.
    #[serde(default = "empty_polygons", deserialize_with = "segmentation_or_empty")]
    segmentation: serde_json::Value,
}

fn empty_polygons() -> serde_json::Value {
    serde_json::Value::Array(Vec::new())
}

/// A missing segmentation is `[]` (the field's `default`); a null one too.
fn segmentation_or_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<serde_json::Value, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(if v.is_null() { empty_polygons() } else { v })
}

/// What the per-image member holds for one annotation (field order = output order
/// before the map is sorted).
#[derive(Serialize)]
struct AnnotationOut<'a> {
    id: i64,
    category_id: i64,
    bbox: &'a [f64; 4],
    area: f64,
    iscrowd: u8,
    segmentation: &'a serde_json::Value,
}

/// An annotation kept in memory: ids plus its member JSON as compact text.
#[derive(Deserialize)]
#[serde(try_from = "RawAnnotation")]
struct Annotation {
    id: i64,
    image_id: i64,
    category_id: i64,
    json: Box<str>,
}

impl TryFrom<RawAnnotation> for Annotation {
    type Error = String;
    fn try_from(a: RawAnnotation) -> std::result::Result<Self, String> {
        let out = AnnotationOut {
            id: a.id,
            category_id: a.category_id,
            bbox: &a.bbox,
            area: a.area,
            iscrowd: a.iscrowd,
            segmentation: &a.segmentation,
        };
        let json = serde_json::to_string(&out)
            .map_err(|e| format!("annotation {}: {e}", a.id))?
            .into_boxed_str();
        Ok(Annotation {
            id: a.id,
            image_id: a.image_id,
            category_id: a.category_id,
            json,
        })
    }
}

/// One `categories[]` entry.
#[derive(Debug, Clone, Deserialize)]
struct CocoCategory {
    id: i64,
    name: String,
    #[serde(default)]
    supercategory: String,
}

/// The parts of an instances file we use (`info`, `licenses`, ... are skipped).
#[derive(Deserialize)]
struct InstancesFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<Annotation>,
    #[serde(default)]
    categories: Vec<CocoCategory>,
}

/// The COCO source.
pub struct Coco {
    root: PathBuf,
    split: String,
    annotations_path: PathBuf,
    follow_symlinks: bool,
    /// Images sorted by file name (the enumeration order).
    images: Vec<CocoImage>,
    /// Kept annotations sorted by (image id, annotation id).
    annotations: Vec<Annotation>,
    /// Annotations in the file, before anything was left out.
    num_annotations_in_file: u64,
    categories: Vec<Category>,
    /// Ids of images listed more than once (all but the first occurrence are rejected).
    duplicate_image_ids: BTreeSet<i64>,
    warnings: Vec<String>,
}

impl std::fmt::Debug for Coco {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coco")
            .field("root", &self.root)
            .field("split", &self.split)
            .field("annotations_path", &self.annotations_path)
            .field("images", &self.images.len())
            .field("annotations", &self.annotations.len())
            .field("categories", &self.categories.len())
            .finish()
    }
}

/// `train`/`val`/`test` map to the 2017 folders; anything else is taken as is.
fn split_dir(split: &str) -> String {
    match split {
        "train" => "train2017".into(),
        "val" => "val2017".into(),
        "test" => "test2017".into(),
        s => s.to_owned(),
    }
}

/// `p` without empty and `.` components (`./a//b.jpg` -> `a/b.jpg`).
fn lexical_normal(p: &str) -> String {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// The key of a COCO file name: the name without its last extension, sanitised
/// (`000000000009.jpg` -> `000000000009`).
fn key_of(file_name: &str) -> String {
    let base_start = file_name.rfind('/').map_or(0, |i| i + 1);
    let stem = match file_name[base_start..].rfind('.') {
        Some(i) if i > 0 => &file_name[..base_start + i],
        _ => file_name,
    };
    sanitize_key(stem)
}

/// Relative paths (with `/`) of every non-directory entry under `dir`, sorted.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> std::io::Result<()> {
    for (name, ty) in sorted_dir(dir)? {
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        if ty.is_dir() {
            walk(&dir.join(&name), &rel, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

impl Coco {
    /// Opens `root` (holding `{split}/` and `annotations/`). `split` is a folder name
    /// such as `train2017`; `train`, `val` and `test` mean the 2017 folders.
    /// `annotations` defaults to `root/annotations/instances_{split}.json`.
    pub fn new(
        root: &Path,
        split: &str,
        annotations: Option<PathBuf>,
        follow_symlinks: bool,
    ) -> Result<Self> {
        let split = split_dir(split);
        if split.is_empty() || split == "." || split == ".." || split.contains(['/', '\\']) {
            return Err(Error::Config(format!(
                "COCO split `{split}` must be a folder name under --root (e.g. train2017)"
            )));
        }
        let img_dir = root.join(&split);
        if !img_dir.is_dir() {
            return Err(Error::input(
                root,
                format!(
                    "no `{split}/` image folder here; --root must point at the folder holding \
                     {split}/ and annotations/"
                ),
            ));
        }
        let annotations_path = annotations.unwrap_or_else(|| {
            root.join("annotations")
                .join(format!("instances_{split}.json"))
        });
        let file = std::fs::File::open(&annotations_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::input(
                    &annotations_path,
                    "annotation file not found (pass --annotations FILE for another name)",
                )
            } else {
                Error::io(&annotations_path, e)
            }
        })?;
        let parsed: InstancesFile =
            serde_json::from_reader(BufReader::with_capacity(1 << 20, file)).map_err(|e| {
                Error::Json {
                    path: annotations_path.clone(),
                    source: e,
                }
            })?;
        Ok(Self::from_parsed(
            root,
            split,
            annotations_path,
            follow_symlinks,
            parsed,
        ))
    }

    fn from_parsed(
        root: &Path,
        split: String,
        annotations_path: PathBuf,
        follow_symlinks: bool,
        parsed: InstancesFile,
    ) -> Self {
        let InstancesFile {
            mut images,
            mut annotations,
            categories: cats,
        } = parsed;
        let mut warnings = Vec::new();

        // Categories sorted by id; a repeated id keeps its first entry.
        let mut by_id: BTreeMap<i64, Category> = BTreeMap::new();
        let mut dup_cats = 0u64;
        for c in cats {
            if by_id.contains_key(&c.id) {
                dup_cats += 1;
                continue;
            }
            by_id.insert(
                c.id,
                Category {
                    id: c.id,
                    name: c.name,
                    supercategory: c.supercategory,
                },
            );
        }
        if dup_cats > 0 {
            warnings.push(format!(
                "{dup_cats} categories repeat an earlier category id; the first entry was kept"
            ));
        }

        // Images in file-name order; ties (same name listed twice) by id.
        images.sort_by(|a, b| a.file_name.cmp(&b.file_name).then(a.id.cmp(&b.id)));
        let mut seen_ids = BTreeSet::new();
        let mut duplicate_image_ids = BTreeSet::new();
        for im in &images {
            if !seen_ids.insert(im.id) {
                duplicate_image_ids.insert(im.id);
            }
        }

        // Annotations: drop those no sample can carry, group by image.
        let num_annotations_in_file = annotations.len() as u64;
        let before = annotations.len();
        annotations.retain(|a| seen_ids.contains(&a.image_id));
        let unknown_image = before - annotations.len();
        let before = annotations.len();
        annotations.retain(|a| by_id.contains_key(&a.category_id));
        let unknown_cat = before - annotations.len();
        annotations.sort_by_key(|a| (a.image_id, a.id));
        annotations.shrink_to_fit();
        let dup_ann = annotations
            .windows(2)
            .filter(|w| (w[0].image_id, w[0].id) == (w[1].image_id, w[1].id))
            .count();
        if unknown_image > 0 {
            warnings.push(format!(
                "{unknown_image} annotations refer to image ids not in `images`; left out"
            ));
        }
        if unknown_cat > 0 {
            warnings.push(format!(
                "{unknown_cat} annotations refer to category ids not in `categories`; left out"
            ));
        }
        if dup_ann > 0 {
            warnings.push(format!(
                "{dup_ann} annotations repeat an annotation id of the same image (kept)"
            ));
        }

        Coco {
            root: root.to_owned(),
            split,
            annotations_path,
            follow_symlinks,
            images,
            annotations,
            num_annotations_in_file,
            categories: by_id.into_values().collect(),
            duplicate_image_ids,
            warnings,
        }
    }

    /// The kept annotations of image `id`, in annotation-id order.
    fn annotations_of(&self, id: i64) -> &[Annotation] {
        let lo = self.annotations.partition_point(|a| a.image_id < id);
        let hi = self.annotations.partition_point(|a| a.image_id <= id);
        &self.annotations[lo..hi]
    }

    /// The per-image record (the `json` member).
    fn image_record(&self, im: &CocoImage) -> serde_json::Value {
        let anns = self.annotations_of(im.id);
        let mut text =
            String::with_capacity(2 + anns.iter().map(|a| a.json.len() + 1).sum::<usize>());
        text.push('[');
        for (i, a) in anns.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&a.json);
        }
        text.push(']');
        let list: serde_json::Value =
            serde_json::from_str(&text).expect("annotation JSON written by serde_json parses");
        serde_json::json!({
            "image_id": im.id,
            "file_name": im.file_name,
            "width": im.width,
            "height": im.height,
            "has_annotations": !anns.is_empty(),
            "annotations": list,
        })
    }
}

impl Source for Coco {
    fn kind(&self) -> &'static str {
        "coco"
    }

    fn params(&self) -> serde_json::Value {
        serde_json::json!({
            "root": self.root.display().to_string(),
            "split": self.split,
            "annotations": self.annotations_path.display().to_string(),
            "num_images": self.images.len(),
            "num_annotations": self.num_annotations_in_file,
            "num_categories": self.categories.len(),
        })
    }

    fn size_hint(&self) -> Result<u64> {
        Ok(self.images.len() as u64)
    }

    fn enumerate(&self, emit: &mut dyn FnMut(Entry) -> Result<()>) -> Result<()> {
        let split = &self.split;
        let mut listed: BTreeSet<String> = BTreeSet::new();
        let mut emitted_ids = BTreeSet::new();
        let mut ordinal = 0u64;
        for im in &self.images {
            // `./x.jpg` and `a//x.jpg` name the walked `x.jpg` / `a/x.jpg`: compare (and
            // store) the lexically normal form, so a listed file is not also reported
            // as unlisted (`..` stays, and is refused when the file is opened).
            let name = lexical_normal(&im.file_name);
            let rel = format!("{split}/{name}");
            let key = key_of(&name);
            listed.insert(name);
            if self.duplicate_image_ids.contains(&im.id) && !emitted_ids.insert(im.id) {
                emit(Entry::Reject(Reject::new(
                    rel,
                    Some(key),
                    "duplicate_image_id",
                    format!(
                        "image id {} is listed more than once in {}",
                        im.id,
                        self.annotations_path.display()
                    ),
                )))?;
                continue;
            }
            let mut item = Item::new(ordinal, key, rel);
            item.extra = Some(self.image_record(im));
            ordinal += 1;
            emit(Entry::Item(item))?;
        }

        let dir = self.root.join(split);
        let mut files = Vec::new();
        walk(&dir, "", &mut files).map_err(|e| Error::io(&dir, e))?;
        for f in files {
            if listed.contains(&f) {
                continue;
            }
            emit(Entry::Reject(Reject::new(
                format!("{split}/{f}"),
                Some(key_of(&f)),
                "not_in_annotations",
                format!("not listed in {}", self.annotations_path.display()),
            )))?;
        }
        Ok(())
    }

    fn load(&self, item: &Item, ctx: &LoadContext) -> std::result::Result<Sample, Reject> {
        let record = item
            .extra
            .as_ref()
            .ok_or_else(|| item.reject("bad_annotation", "item carries no image record"))?;
        let field = |k: &str| record.get(k).and_then(|v| v.as_u64());
        let (Some(width), Some(height)) = (field("width"), field("height")) else {
            return Err(item.reject("bad_annotation", "image record lacks width/height"));
        };
        let image_id = record.get("image_id").and_then(|v| v.as_i64());
        let num_annotations = record
            .get("annotations")
            .and_then(|v| v.as_array())
            .map_or(0, |a| a.len());

        debug_assert_eq!(ctx.follow_symlinks, self.follow_symlinks);
        // Never re-encode: boxes and polygons are in original pixel coordinates.
        let plain = LoadContext {
            reencode: None,
            ..ctx.clone()
        };
        let img = load_image_file(&self.root, item, &plain)?;
        if (img.info.width as u64, img.info.height as u64) != (width, height) {
            return Err(item.reject(
                "size_mismatch",
                format!(
                    "image is {}x{} but {} says {width}x{height}",
                    img.info.width,
                    img.info.height,
                    self.annotations_path.display()
                ),
            ));
        }
        let json = serde_json::to_vec(record)
            .map_err(|e| item.reject("bad_annotation", format!("image record: {e}")))?;

        let mut members = vec![
            (img.info.format.ext().to_owned(), Vec::new()),
            ("json".to_owned(), Vec::new()),
        ];
        let mut row = image_row(item, &img, &members);
        row.label = None;
        row.image_id = image_id;
        row.num_annotations = Some(num_annotations as u32);
        row.has_annotations = Some(num_annotations > 0);
        members[0].1 = img.bytes;
        members[1].1 = json;
        Ok(Sample { members, row })
    }

    fn metadata(&self) -> Metadata {
        Metadata {
            classes: None,
            wnids: None,
            categories: Some(self.categories.clone()),
            warnings: self.warnings.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn listed_names_compare_in_lexical_normal_form() {
        use super::lexical_normal;
        assert_eq!(lexical_normal("./x.jpg"), "x.jpg");
        assert_eq!(lexical_normal("a//./b.jpg"), "a/b.jpg");
        assert_eq!(lexical_normal("a/b.jpg"), "a/b.jpg");
        assert_eq!(
            lexical_normal("../x.jpg"),
            "../x.jpg",
            "`..` is refused on opening"
        );
    }

    use super::*;

    fn parse(text: &str) -> Result<Coco> {
        let parsed: InstancesFile = serde_json::from_str(text).map_err(|e| Error::Json {
            path: "x.json".into(),
            source: e,
        })?;
        Ok(Coco::from_parsed(
            Path::new("/nonexistent"),
            "val2017".into(),
            "x.json".into(),
            false,
            parsed,
        ))
    }

    #[test]
    fn groups_sorts_and_counts() {
        let c = parse(
            r#"{"info": {"year": 2017}, "licenses": [],
            "images": [
              {"id": 2, "file_name": "b.jpg", "width": 4, "height": 3, "license": 1},
              {"id": 1, "file_name": "a.jpg", "width": 4, "height": 3}],
            "annotations": [
              {"id": 11, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1], "area": 1.5,
               "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]},
              {"id": 10, "image_id": 1, "category_id": 5, "bbox": [0, 0, 2, 2], "area": 4,
               "iscrowd": 1, "segmentation": {"counts": [0, 4], "size": [3, 4]}},
              {"id": 12, "image_id": 99, "category_id": 5, "bbox": [0, 0, 1, 1], "area": 1,
               "iscrowd": 0, "segmentation": []},
              {"id": 13, "image_id": 2, "category_id": 77, "bbox": [0, 0, 1, 1], "area": 1,
               "iscrowd": 0, "segmentation": []}],
            "categories": [{"id": 7, "name": "dog", "supercategory": "animal"},
                           {"id": 5, "name": "cat", "supercategory": "animal"}]}"#,
        )
        .unwrap();
        assert_eq!(c.images[0].file_name, "a.jpg");
        let ids: Vec<i64> = c.annotations_of(1).iter().map(|a| a.id).collect();
        assert_eq!(ids, vec![10, 11]);
        assert!(c.annotations_of(2).is_empty());
        let m = c.metadata();
        let cats = m.categories.unwrap();
        assert_eq!(cats.iter().map(|c| c.id).collect::<Vec<_>>(), vec![5, 7]);
        assert_eq!(m.warnings.len(), 2, "{:?}", m.warnings);
        assert!(m.warnings[0].starts_with("1 annotations refer to image ids"));
        assert!(m.warnings[1].starts_with("1 annotations refer to category ids"));

        let rec = c.image_record(&c.images[0]);
        assert_eq!(rec["has_annotations"], true);
        assert_eq!(rec["annotations"][0]["id"], 10);
        assert_eq!(rec["annotations"][0]["segmentation"]["counts"][1], 4);
        assert_eq!(rec["annotations"][1]["bbox"][3], 1.0);
        assert_eq!(rec["annotations"][1]["area"], 1.5);
        let rec = c.image_record(&c.images[1]);
        assert_eq!(rec["has_annotations"], false);
        assert_eq!(rec["annotations"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn malformed_json_names_file_and_position() {
        let e = parse("{\"images\": [{\"id\": 1, \"file_name\": 3}]}").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("x.json: "), "{msg}");
        assert!(msg.contains("line 1 column"), "{msg}");
        let e = parse(
            "{\"images\": [], \"annotations\": [{\"id\": 1, \"image_id\": 1, \
             \"category_id\": 1, \"bbox\": [1, 2]}]}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("column"), "{e}");
    }

    #[test]
    fn split_names_map_to_2017() {
        assert_eq!(split_dir("train"), "train2017");
        assert_eq!(split_dir("val"), "val2017");
        assert_eq!(split_dir("val2014"), "val2014");
        assert_eq!(key_of("000000000009.jpg"), "000000000009");
        assert_eq!(key_of("sub/a.b.jpg"), "sub_a_b");
        assert_eq!(key_of("x.y/noext"), "x_y_noext");
    }
}
