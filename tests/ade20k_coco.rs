//! ADE20K and COCO sources end to end: tiny layouts on disk -> `shard::run` -> index,
//! shard members, rejected list and manifest.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use conmim::format::index::{IndexRow, read_index};
use conmim::format::manifest::Manifest;
use conmim::format::reject::{Reject, read_rejects};
use conmim::format::tar::{ScannedSample, scan_shard};
use conmim::format::{index_name, manifest_name, read_json, rejected_name};
use conmim::shard::source::ade20k::{Ade20k, AdeSplit};
use conmim::shard::source::coco::Coco;
use conmim::shard::source::{Reencode, Source, Validation};
use conmim::shard::{ShardConfig, Summary, run};
use serde_json::json;

fn jpeg(w: u32, h: u32, seed: u64) -> Vec<u8> {
    conmim::testkit::jpeg(&conmim::testkit::JpegSpec::rgb(w, h, seed))
}

fn gray_png(w: u32, h: u32, seed: u64) -> Vec<u8> {
    conmim::testkit::gray_png(w, h, seed)
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Everything a run left behind.
struct Out {
    summary: Summary,
    rows: Vec<IndexRow>,
    rejects: Vec<Reject>,
    manifest: Manifest,
    /// Shard samples by key.
    samples: BTreeMap<String, ScannedSample>,
}

fn shard(source: &dyn Source, out: &Path, split: &str) -> Out {
    shard_with(source, out, split, |_| {})
}

fn shard_with(
    source: &dyn Source,
    out: &Path,
    split: &str,
    tweak: impl FnOnce(&mut ShardConfig),
) -> Out {
    let mut cfg = ShardConfig::new(out, split);
    cfg.max_reject_frac = 1.0;
    cfg.threads = 2;
    cfg.max_shard_count = 4;
    tweak(&mut cfg);
    let summary = run(source, &cfg).unwrap();
    summary.check_rejects(1.0).unwrap();
    let rows = read_index(&out.join(index_name(split))).unwrap();
    let rejects = read_rejects(&out.join(rejected_name(split))).unwrap();
    let manifest: Manifest = read_json(&out.join(manifest_name(split))).unwrap();
    let mut samples = BTreeMap::new();
    for s in &manifest.shardlist {
        scan_shard(
            &out.join(&s.url),
            |smp| {
                samples.insert(smp.key.clone(), smp);
                Ok(())
            },
            |issue| panic!("{}: {}", issue.name, issue.message),
        )
        .unwrap();
    }
    Out {
        summary,
        rows,
        rejects,
        manifest,
        samples,
    }
}

fn reasons(rejects: &[Reject]) -> BTreeMap<String, String> {
    rejects
        .iter()
        .map(|r| (r.source.clone(), r.reason.clone()))
        .collect()
}

// ---------------------------------------------------------------- ADE20K

/// 6 good pairs, 1 size mismatch, 1 image without label map, 1 label map without image.
fn ade_layout(root: &Path) {
    let img = root.join("images/training");
    let ann = root.join("annotations/training");
    for i in 1..=6u32 {
        let (w, h) = (32 + 4 * i, 48 - 2 * i);
        write(
            &img.join(format!("ADE_train_{i:08}.jpg")),
            &jpeg(w, h, i as u64),
        );
        write(
            &ann.join(format!("ADE_train_{i:08}.png")),
            &gray_png(w, h, i as u64),
        );
    }
    write(&img.join("ADE_train_00000007.jpg"), &jpeg(48, 32, 7));
    write(&ann.join("ADE_train_00000007.png"), &gray_png(40, 32, 7));
    write(&img.join("ADE_train_00000008.jpg"), &jpeg(40, 40, 8));
    write(&ann.join("ADE_train_00000009.png"), &gray_png(40, 40, 9));
}

#[test]
fn ade20k_pairs_images_and_label_maps() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ADEChallengeData2016");
    ade_layout(&root);
    let src = Ade20k::new(&root, AdeSplit::Train, false).unwrap();
    let out = shard(&src, &dir.path().join("out"), "train");

    assert_eq!(out.rows.len(), 6);
    assert_eq!(out.summary.samples, 6);
    assert_eq!(out.summary.rejected, 3);
    for row in &out.rows {
        let i: u32 = row.key.trim_start_matches("ADE_train_").parse().unwrap();
        assert!((1..=6).contains(&i), "{}", row.key);
        assert_eq!(row.source, format!("images/training/ADE_train_{i:08}.jpg"));
        assert_eq!(
            row.target.as_deref(),
            Some(format!("annotations/training/ADE_train_{i:08}.png").as_str())
        );
        assert_eq!(row.members, "jpg,seg.png");
        assert_eq!(row.format, "jpeg");
        assert_eq!((row.width, row.height), (32 + 4 * i, 48 - 2 * i));
        assert_eq!(row.label, None);
        assert_eq!(row.image_id, None);

        let smp = &out.samples[&row.key];
        assert_eq!((smp.offset, smp.length), (row.offset, row.length));
        let exts: Vec<&str> = smp.members.iter().map(|m| m.ext.as_str()).collect();
        assert_eq!(exts, ["jpg", "seg.png"]);
        let seg = std::fs::read(root.join(row.target.as_ref().unwrap())).unwrap();
        assert_eq!(
            smp.member("seg.png").unwrap().data,
            seg,
            "seg.png untouched"
        );
        let jpg = std::fs::read(root.join(&row.source)).unwrap();
        assert_eq!(smp.member("jpg").unwrap().data, jpg, "image untouched");
    }

    let got = reasons(&out.rejects);
    let want: BTreeMap<String, String> = [
        ("images/training/ADE_train_00000007.jpg", "size_mismatch"),
        (
            "images/training/ADE_train_00000008.jpg",
            "missing_annotation",
        ),
        (
            "annotations/training/ADE_train_00000009.png",
            "missing_file",
        ),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(got, want);
    let mismatch = out
        .rejects
        .iter()
        .find(|r| r.reason == "size_mismatch")
        .unwrap();
    assert!(
        mismatch.detail.contains("48x32") && mismatch.detail.contains("40x32"),
        "{}",
        mismatch.detail
    );
    assert_eq!(mismatch.key.as_deref(), Some("ADE_train_00000007"));

    let m = &out.manifest.conmim;
    assert_eq!(m.dataset, "ade20k");
    assert_eq!((m.num_samples, m.num_rejected, m.num_inputs), (6, 3, 9));
    assert_eq!(m.rejected_by_reason["size_mismatch"], 1);
    assert_eq!(m.rejected_by_reason["missing_annotation"], 1);
    assert_eq!(m.rejected_by_reason["missing_file"], 1);
    assert_eq!(m.classes, None);
    assert_eq!(m.categories, None);
    assert_eq!(m.params["source"]["split"], "training");
    assert_eq!(
        out.manifest
            .shardlist
            .iter()
            .map(|s| s.nsamples)
            .sum::<u64>(),
        6
    );
}

#[test]
fn ade20k_label_maps_must_be_8bit_class_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ade");
    let img = root.join("images/validation");
    let ann = root.join("annotations/validation");
    write(&img.join("ADE_val_00000001.jpg"), &jpeg(40, 36, 1));
    write(&ann.join("ADE_val_00000001.png"), &gray_png(40, 36, 1));
    // An RGB (colour-coded) map is not a class-index map.
    write(&img.join("ADE_val_00000002.jpg"), &jpeg(40, 36, 2));
    write(
        &ann.join("ADE_val_00000002.png"),
        &conmim::testkit::png(40, 36, 2),
    );
    // A JPEG posing as the label map.
    write(&img.join("ADE_val_00000003.jpg"), &jpeg(40, 36, 3));
    write(&ann.join("ADE_val_00000003.png"), &jpeg(40, 36, 3));
    // A PNG image: stored under its real extension.
    write(
        &img.join("ADE_val_00000004.jpg"),
        &conmim::testkit::png(40, 36, 4),
    );
    write(&ann.join("ADE_val_00000004.png"), &gray_png(40, 36, 4));

    assert!(Ade20k::new(&root, AdeSplit::Train, false).is_err());
    let src = Ade20k::new(&root, AdeSplit::Val, false).unwrap();
    // Full decode of images and label maps; --max-side must not touch ADE20K images
    // (the label maps would no longer line up).
    let out = shard_with(&src, &dir.path().join("out"), "val", |c| {
        c.validation = Validation::Decode;
        c.reencode = Some(Reencode {
            max_side: 16,
            quality: 80,
        });
    });
    let got = reasons(&out.rejects);
    assert_eq!(got.len(), 2, "{:?}", out.rejects);
    assert_eq!(
        got["annotations/validation/ADE_val_00000002.png"],
        "bad_annotation"
    );
    assert_eq!(
        got["annotations/validation/ADE_val_00000003.png"],
        "bad_annotation"
    );
    // The label map's reject names its image too: every file is accounted for.
    let r = out
        .rejects
        .iter()
        .find(|r| r.source == "annotations/validation/ADE_val_00000002.png")
        .unwrap();
    assert!(
        r.detail.contains("images/validation/ADE_val_00000002.jpg"),
        "{}",
        r.detail
    );
    let mut members: Vec<(&str, &str)> = out
        .rows
        .iter()
        .map(|r| (r.key.as_str(), r.members.as_str()))
        .collect();
    members.sort();
    assert_eq!(
        members,
        [
            ("ADE_val_00000001", "jpg,seg.png"),
            ("ADE_val_00000004", "png,seg.png")
        ]
    );
    for row in &out.rows {
        assert!(!row.reencoded);
        assert_eq!((row.width, row.height), (40, 36));
        let smp = &out.samples[&row.key];
        let img = std::fs::read(root.join(&row.source)).unwrap();
        assert_eq!(smp.members[0].data, img);
    }
}

#[test]
fn ade20k_needs_the_split_folders() {
    let dir = tempfile::tempdir().unwrap();
    let err = Ade20k::new(dir.path(), AdeSplit::Train, false).unwrap_err();
    assert!(err.to_string().contains("images/training"), "{err}");
    std::fs::create_dir_all(dir.path().join("images/training")).unwrap();
    let err = Ade20k::new(dir.path(), AdeSplit::Train, false).unwrap_err();
    assert!(err.to_string().contains("annotations/training"), "{err}");
}

// ---------------------------------------------------------------- COCO

/// JSON lists images 1 (polygons), 2 (RLE), 3 (no annotations), 5 (missing on disk),
/// 6 (wrong size in the JSON); the folder also holds `extra.jpg`, not in the JSON.
fn coco_layout(root: &Path) -> serde_json::Value {
    let img = root.join("val2017");
    write(&img.join("000000000001.jpg"), &jpeg(64, 48, 1));
    write(&img.join("000000000002.jpg"), &jpeg(48, 64, 2));
    write(&img.join("000000000003.jpg"), &jpeg(40, 40, 3));
    write(&img.join("000000000006.jpg"), &jpeg(40, 32, 6));
    write(&img.join("extra.jpg"), &jpeg(32, 32, 9));
    let poly = json!([
        [1.5, 2.0, 30.25, 2.0, 30.25, 20.0],
        [40.0, 40.0, 50.0, 40.0, 45.0, 47.0]
    ]);
    let rle = json!({"counts": [0, 10, 20, 3042], "size": [64, 48]});
    let doc = json!({
        "info": {"description": "tiny", "year": 2017},
        "licenses": [{"id": 1, "name": "x", "url": ""}],
        "images": [
            {"id": 6, "file_name": "000000000006.jpg", "width": 41, "height": 32, "license": 1},
            {"id": 2, "file_name": "000000000002.jpg", "width": 48, "height": 64},
            {"id": 5, "file_name": "000000000005.jpg", "width": 32, "height": 32},
            {"id": 1, "file_name": "000000000001.jpg", "width": 64, "height": 48,
             "coco_url": "http://example/1.jpg"},
            {"id": 3, "file_name": "000000000003.jpg", "width": 40, "height": 40}
        ],
        "annotations": [
            {"id": 102, "image_id": 1, "category_id": 18, "bbox": [40.0, 40.0, 10.0, 7.0],
             "area": 35.0, "iscrowd": 0, "segmentation": [poly[1]]},
            {"id": 101, "image_id": 1, "category_id": 1, "bbox": [1.5, 2.0, 28.75, 18.0],
             "area": 517.5, "iscrowd": 0, "segmentation": [poly[0]]},
            {"id": 201, "image_id": 2, "category_id": 1, "bbox": [0, 0, 48, 64],
             "area": 3072, "iscrowd": 1, "segmentation": rle},
            // Detection-only: no iscrowd, segmentation null.
            {"id": 202, "image_id": 2, "category_id": 18, "bbox": [1, 1, 2, 2],
             "area": 4, "segmentation": null},
            {"id": 601, "image_id": 6, "category_id": 1, "bbox": [0, 0, 4, 4],
             "area": 16, "iscrowd": 0, "segmentation": [[0, 0, 4, 0, 4, 4]]},
            {"id": 901, "image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1],
             "area": 1, "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]},
            {"id": 902, "image_id": 3, "category_id": 42, "bbox": [0, 0, 1, 1],
             "area": 1, "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]}
        ],
        "categories": [
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 1, "name": "person", "supercategory": "person"}
        ]
    });
    write(
        &root.join("annotations/instances_val2017.json"),
        serde_json::to_string(&doc).unwrap().as_bytes(),
    );
    doc
}

#[test]
fn coco_images_carry_their_annotations() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("coco");
    coco_layout(&root);
    let src = Coco::new(&root, "val", None, false).unwrap();
    let out = shard(&src, &dir.path().join("out"), "val");

    // Rows: 1, 2 and 3 (kept without annotations).
    let rows: BTreeMap<&str, &IndexRow> = out.rows.iter().map(|r| (r.key.as_str(), r)).collect();
    assert_eq!(
        rows.keys().copied().collect::<Vec<_>>(),
        ["000000000001", "000000000002", "000000000003"]
    );
    let expect = [
        ("000000000001", 1, 2, (64, 48)),
        ("000000000002", 2, 2, (48, 64)),
        ("000000000003", 3, 0, (40, 40)),
    ];
    for (key, id, n, size) in expect {
        let r = rows[key];
        assert_eq!(r.image_id, Some(id));
        assert_eq!(r.num_annotations, Some(n));
        assert_eq!(r.has_annotations, Some(n > 0));
        assert_eq!(r.label, None);
        assert_eq!(r.members, "jpg,json");
        assert_eq!(r.source, format!("val2017/{key}.jpg"));
        assert_eq!((r.width, r.height), size);
        assert_eq!(r.target, None);
        let smp = &out.samples[key];
        let jpg = std::fs::read(root.join(&r.source)).unwrap();
        assert_eq!(smp.member("jpg").unwrap().data, jpg);
    }

    let rec = |key: &str| -> serde_json::Value {
        serde_json::from_slice(&out.samples[key].member("json").unwrap().data).unwrap()
    };
    assert_eq!(
        rec("000000000001"),
        json!({
            "image_id": 1, "file_name": "000000000001.jpg", "width": 64, "height": 48,
            "has_annotations": true,
            "annotations": [
                {"id": 101, "category_id": 1, "bbox": [1.5, 2.0, 28.75, 18.0], "area": 517.5,
                 "iscrowd": 0, "segmentation": [[1.5, 2.0, 30.25, 2.0, 30.25, 20.0]]},
                {"id": 102, "category_id": 18, "bbox": [40.0, 40.0, 10.0, 7.0], "area": 35.0,
                 "iscrowd": 0, "segmentation": [[40.0, 40.0, 50.0, 40.0, 45.0, 47.0]]}
            ]
        })
    );
    assert_eq!(
        rec("000000000002"),
        json!({
            "image_id": 2, "file_name": "000000000002.jpg", "width": 48, "height": 64,
            "has_annotations": true,
            "annotations": [
                {"id": 201, "category_id": 1, "bbox": [0.0, 0.0, 48.0, 64.0], "area": 3072.0,
                 "iscrowd": 1, "segmentation": {"counts": [0, 10, 20, 3042], "size": [64, 48]}},
                {"id": 202, "category_id": 18, "bbox": [1.0, 1.0, 2.0, 2.0], "area": 4.0,
                 "iscrowd": 0, "segmentation": []}
            ]
        })
    );
    // Image 3's only annotation names an unknown category: left out, image kept.
    assert_eq!(
        rec("000000000003"),
        json!({
            "image_id": 3, "file_name": "000000000003.jpg", "width": 40, "height": 40,
            "has_annotations": false, "annotations": []
        })
    );

    // The json members (a segmentation-less annotation included) fit the schema.
    common::python_check(&dir.path().join("out"), "val");

    let got = reasons(&out.rejects);
    let want: BTreeMap<String, String> = [
        ("val2017/000000000005.jpg", "missing_file"),
        ("val2017/000000000006.jpg", "size_mismatch"),
        ("val2017/extra.jpg", "not_in_annotations"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(got, want);
    let mismatch = out
        .rejects
        .iter()
        .find(|r| r.reason == "size_mismatch")
        .unwrap();
    assert!(
        mismatch.detail.contains("40x32") && mismatch.detail.contains("41x32"),
        "{}",
        mismatch.detail
    );

    let m = &out.manifest.conmim;
    assert_eq!(m.dataset, "coco");
    assert_eq!((m.num_samples, m.num_rejected, m.num_inputs), (3, 3, 6));
    let cats = m.categories.as_ref().unwrap();
    assert_eq!(
        cats.iter()
            .map(|c| (c.id, c.name.as_str(), c.supercategory.as_str()))
            .collect::<Vec<_>>(),
        [(1, "person", "person"), (18, "dog", "animal")]
    );
    assert_eq!(m.params["source"]["split"], "val2017");
    assert_eq!(out.summary.warnings.len(), 2, "{:?}", out.summary.warnings);
    assert!(
        out.summary
            .warnings
            .iter()
            .any(|w| w.starts_with("1 annotations refer to image ids"))
    );
    assert!(
        out.summary
            .warnings
            .iter()
            .any(|w| w.starts_with("1 annotations refer to category ids"))
    );
}

#[test]
fn coco_output_does_not_depend_on_threads() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("coco");
    coco_layout(&root);
    let src = Coco::new(&root, "val2017", None, false).unwrap();
    let a = shard(&src, &dir.path().join("a"), "val");
    let mut cfg = ShardConfig::new(dir.path().join("b"), "val");
    cfg.max_reject_frac = 1.0;
    cfg.threads = 1;
    cfg.max_shard_count = 4;
    run(&src, &cfg).unwrap();
    let b = read_index(&dir.path().join("b").join(index_name("val"))).unwrap();
    assert_eq!(a.rows, b);
    for s in &a.manifest.shardlist {
        let x = std::fs::read(dir.path().join("a").join(&s.url)).unwrap();
        let y = std::fs::read(dir.path().join("b").join(&s.url)).unwrap();
        assert_eq!(x, y, "{}", s.url);
    }
}

#[test]
fn coco_annotation_file_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("coco");
    let doc = coco_layout(&root);

    // Explicit annotation path.
    let other = dir.path().join("mine.json");
    write(&other, serde_json::to_string(&doc).unwrap().as_bytes());
    let src = Coco::new(&root, "val2017", Some(other.clone()), false).unwrap();
    assert_eq!(src.size_hint().unwrap(), 5);

    // Malformed: named file and position.
    write(
        &other,
        b"{\"images\": [\n{\"id\": 1, \"file_name\": \"a.jpg\", \"width\": \"wide\"}]}",
    );
    let err = Coco::new(&root, "val2017", Some(other.clone()), false).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("mine.json"), "{msg}");
    assert!(msg.contains("line 2 column"), "{msg}");
    write(
        &other,
        b"{\"images\": [], \"annotations\": [{\"id\": 1, \"image_id\": 1,",
    );
    let msg = Coco::new(&root, "val2017", Some(other), false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("mine.json") && msg.contains("EOF"), "{msg}");

    // Missing file / folder.
    let msg = Coco::new(&root, "train", None, false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("train2017"), "{msg}");
    std::fs::create_dir_all(root.join("train2017")).unwrap();
    let msg = Coco::new(&root, "train", None, false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("instances_train2017.json"), "{msg}");
    assert!(Coco::new(&root, "../x", None, false).is_err());
}
