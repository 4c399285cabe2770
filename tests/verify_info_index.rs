//! `verify`, `info` and `index` (existing shards) end to end on tiny datasets.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use conmim::format::index::{IndexRow, read_index, write_index};
use conmim::format::manifest::Manifest;
use conmim::format::reject::{read_rejects, write_rejects};
use conmim::format::tar::{ShardWriter, scan_shard};
use conmim::format::{index_name, manifest_name, read_json, rejected_name};
use conmim::inspect::info::info;
use conmim::inspect::verify::{VerifyOptions, VerifyReport, verify};
use conmim::shard::existing::{IndexOptions, expand_braces, index_existing};
use conmim::shard::source::Validation;
use conmim::shard::source::imagenet::{Imagenet, Split};
use conmim::shard::{ShardConfig, Summary};
use conmim::testkit::{ImagenetDemo, JpegSpec, write_imagenet_demo};

const CLASSES: usize = 3;
const PER_CLASS: usize = 8;

/// A tiny ImageNet sharded into `tmp/out` (shards of 5 samples).
fn build(tmp: &Path) -> (PathBuf, Summary) {
    let root = tmp.join("imagenet");
    write_imagenet_demo(
        &root,
        &ImagenetDemo {
            classes: CLASSES,
            train_per_class: PER_CLASS,
            val_per_class: 1,
            seed: 3,
            min_side: 32,
            max_side: 64,
        },
    )
    .expect("demo imagenet");
    let out = tmp.join("out");
    let mut cfg = ShardConfig::new(&out, "train");
    cfg.max_shard_count = 5;
    cfg.max_reject_frac = 1.0;
    cfg.threads = 2;
    let src = Imagenet::new(&root, Split::Train, None, None, false).expect("source");
    let summary = conmim::shard::run(&src, &cfg).expect("shard run");
    (out, summary)
}

fn check(dir: &Path, split: &str, decode: bool) -> VerifyReport {
    let opts = VerifyOptions {
        decode,
        threads: 2,
        progress: false,
    };
    verify(dir, split, &opts).expect("verify runs")
}

fn manifest(dir: &Path, split: &str) -> Manifest {
    read_json(&dir.join(manifest_name(split))).unwrap()
}

fn rows(dir: &Path, split: &str) -> Vec<IndexRow> {
    read_index(&dir.join(index_name(split))).unwrap()
}

#[test]
fn clean_dataset_verifies_with_and_without_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, summary) = build(tmp.path());
    assert_eq!(summary.samples, (CLASSES * PER_CLASS) as u64);
    assert_eq!(summary.shards, 5);
    for decode in [false, true] {
        let r = check(&out, "train", decode);
        assert!(r.ok(), "{r}");
        assert_eq!(r.shards, 5);
        assert_eq!(r.samples, summary.samples);
        assert_eq!(r.indexed, summary.samples);
        assert_eq!(r.bytes, summary.bytes);
        assert!(r.to_string().contains("OK"), "{r}");
    }
}

#[test]
fn flipped_byte_names_shard_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _) = build(tmp.path());
    let m = manifest(&out, "train");
    let row = rows(&out, "train")
        .into_iter()
        .find(|r| r.shard == 1)
        .unwrap();
    let url = &m.shardlist[1].url;
    let path = out.join(url);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(row.offset + 512 + 10) as usize] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let r = check(&out, "train", false);
    assert!(!r.ok());
    assert!(r.problems.iter().all(|p| &p.shard == url), "{r}");
    assert!(
        r.problems
            .iter()
            .any(|p| p.key.is_none() && p.message.contains("md5")),
        "{r}"
    );
    assert!(
        r.problems
            .iter()
            .any(|p| p.key.as_deref() == Some(row.key.as_str()) && p.message.contains("sha256")),
        "{r}"
    );
    let text = r.to_string();
    assert!(text.contains(url) && text.contains(&row.key), "{text}");
}

#[test]
fn broken_tar_header_still_checks_the_rest_of_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _) = build(tmp.path());
    let m = manifest(&out, "train");
    let mut in_shard: Vec<IndexRow> = rows(&out, "train")
        .into_iter()
        .filter(|r| r.shard == 0)
        .collect();
    in_shard.sort_by_key(|r| r.offset);
    assert_eq!(in_shard.len(), 5);
    let broken = &in_shard[2];
    let path = out.join(&m.shardlist[0].url);
    let mut bytes = std::fs::read(&path).unwrap();
    // The mode field of the sample's first header: the header checksum no longer holds.
    bytes[(broken.offset + 100) as usize] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let r = check(&out, "train", false);
    assert!(
        r.problems
            .iter()
            .any(|p| p.key.is_none() && p.message.contains("unreadable tar")),
        "{r}"
    );
    let keyed: Vec<&str> = r.problems.iter().filter_map(|p| p.key.as_deref()).collect();
    assert_eq!(keyed, [broken.key.as_str()], "{r}");
    // Samples before and after the broken header were checked.
    assert_eq!(r.samples, 24 - 1, "{r}");
}

#[test]
fn truncated_and_missing_shards_are_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _) = build(tmp.path());
    let m = manifest(&out, "train");
    let truncated = &m.shardlist[2].url;
    let missing = &m.shardlist[3].url;
    let p = out.join(truncated);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 2 + 100)
        .unwrap();
    std::fs::remove_file(out.join(missing)).unwrap();

    let r = check(&out, "train", true);
    assert!(!r.ok());
    let about = |url: &str| -> Vec<&conmim::inspect::verify::Problem> {
        r.problems.iter().filter(|p| p.shard == url).collect()
    };
    assert!(!about(truncated).is_empty(), "{r}");
    assert!(
        about(truncated).iter().any(|p| p.message.contains("size")),
        "{r}"
    );
    // Rows past the new end are named.
    let last = rows(&out, "train")
        .into_iter()
        .filter(|r| &m.shardlist[r.shard as usize].url == truncated)
        .max_by_key(|r| r.offset)
        .unwrap();
    assert!(
        about(truncated)
            .iter()
            .any(|p| p.key.as_deref() == Some(last.key.as_str())),
        "{r}"
    );
    assert!(
        about(missing).iter().any(|p| p.message.contains("missing")),
        "{r}"
    );
    // The untouched shards are fine.
    for s in [0, 1, 4] {
        assert!(about(&m.shardlist[s].url).is_empty(), "{r}");
    }
}

#[test]
fn index_edits_are_problems() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _) = build(tmp.path());
    let index = out.join(index_name("train"));
    let original = rows(&out, "train");

    // A wrong label.
    let mut edited = original.clone();
    edited[7].label = Some(edited[7].label.unwrap() + 1);
    write_index(&index, &edited).unwrap();
    let r = check(&out, "train", false);
    assert_eq!(r.problems.len(), 1, "{r}");
    assert_eq!(r.problems[0].key.as_deref(), Some(original[7].key.as_str()));
    assert!(r.problems[0].message.contains("label"), "{r}");

    // Wrong dimensions, a row pointing outside the shard list, a dropped row.
    let mut edited = original.clone();
    edited[2].width += 1;
    edited[5].shard = 99;
    edited.remove(10);
    write_index(&index, &edited).unwrap();
    let r = check(&out, "train", false);
    let msgs: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    let has = |key: &str, what: &str| {
        r.problems
            .iter()
            .any(|p| p.key.as_deref() == Some(key) && p.message.contains(what))
    };
    assert!(has(&original[2].key, "index says"), "{msgs:#?}");
    assert!(has(&original[5].key, "shard 99"), "{msgs:#?}");
    assert!(has(&original[10].key, "neither in the index"), "{msgs:#?}");
    assert!(
        r.problems.iter().any(|p| p.message.contains("num_samples")),
        "{msgs:#?}"
    );
}

/// Issue 2: `verify` streams an index written in shard order a shard at a time; one
/// in another order (hand-edited, or from another tool) is still checked in full.
#[test]
fn issue2_index_out_of_shard_order_still_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, summary) = build(tmp.path());
    let mut edited = rows(&out, "train");
    assert!(manifest(&out, "train").shardlist.len() > 1);
    edited.reverse();
    write_index(&out.join(index_name("train")), &edited).unwrap();
    let r = check(&out, "train", false);
    assert!(r.ok(), "{r}");
    assert_eq!(r.samples, summary.samples);
    assert_eq!(r.indexed, summary.samples);

    // And a wrong row is still found in that order.
    edited[3].length += 1;
    write_index(&out.join(index_name("train")), &edited).unwrap();
    let r = check(&out, "train", false);
    assert_eq!(r.problems.len(), 1, "{r}");
    assert_eq!(r.problems[0].key.as_deref(), Some(edited[3].key.as_str()));
}

#[test]
fn info_reports_what_was_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, summary) = build(tmp.path());
    let rows = rows(&out, "train");
    let m = manifest(&out, "train");
    let i = info(&out, "train").unwrap();
    assert_eq!(i.samples, summary.samples);
    assert_eq!(i.shards, summary.shards);
    assert_eq!(i.total_bytes, summary.bytes);
    assert_eq!(i.rejected, summary.rejected);
    assert_eq!(i.kind, "imagenet");
    assert_eq!(i.formats.values().sum::<u64>(), i.samples);
    let classes = i.classes.as_ref().expect("class histogram");
    assert_eq!(classes.table_classes, CLASSES as u64);
    assert_eq!(
        classes.histogram.iter().map(|c| c.count).sum::<u64>(),
        summary.samples
    );
    let mut expected: BTreeMap<i64, u64> = BTreeMap::new();
    for r in &rows {
        *expected.entry(r.label.unwrap()).or_default() += 1;
    }
    let wnids = m.conmim.wnids.clone().unwrap();
    for c in &classes.histogram {
        assert_eq!(Some(&c.count), expected.get(&c.label));
        assert_eq!(c.name.as_deref(), Some(wnids[c.label as usize].as_str()));
    }
    let w = i.width.as_ref().unwrap();
    assert_eq!(w.min, rows.iter().map(|r| r.width).min().unwrap() as f64);
    assert_eq!(w.max, rows.iter().map(|r| r.width).max().unwrap() as f64);
    let b = i.image_bytes_dist.as_ref().unwrap();
    let mean = rows.iter().map(|r| r.image_bytes).sum::<u64>() as f64 / rows.len() as f64;
    assert!((b.mean - mean).abs() < 1e-6);
    assert!(i.aspect.is_some() && i.coco.is_none());
    assert_eq!(i.captions, 0);

    let json = serde_json::to_value(&i).unwrap();
    assert_eq!(json["samples"], summary.samples);
    assert_eq!(
        json["classes"]["histogram"].as_array().unwrap().len(),
        CLASSES
    );
    let text = i.to_string();
    assert!(
        text.contains("samples") && text.contains(&wnids[0]),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------
// Existing shards

fn jpeg(w: u32, h: u32, seed: u64) -> Vec<u8> {
    conmim::testkit::jpeg(&JpegSpec {
        width: w,
        height: h,
        seed,
        ..Default::default()
    })
}

fn i2d_sample(key: &str, seed: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        ("jpg".into(), jpeg(40 + seed as u32, 36, seed)),
        ("txt".into(), format!("a photo number {seed}").into_bytes()),
        (
            "json".into(),
            format!("{{\"key\": \"{key}\"}}").into_bytes(),
        ),
    ]
}

/// img2dataset-style shards: 00000.tar, 00001.tar, and a garbage 00002.tar.
fn write_img2dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = ShardWriter::create(&dir.join("00000.tar")).unwrap();
    for i in 0..4u64 {
        let key = format!("{i:09}");
        w.append(&key, &i2d_sample(&key, i)).unwrap();
    }
    // No image member.
    w.append(
        "000000004",
        &[
            ("txt".into(), b"lost image".to_vec()),
            ("json".into(), b"{}".to_vec()),
        ],
    )
    .unwrap();
    // Truncated jpeg.
    let mut bad = i2d_sample("000000005", 5);
    let half = bad[0].1.len() / 2;
    bad[0].1.truncate(half);
    w.append("000000005", &bad).unwrap();
    w.finish().unwrap();

    let mut w = ShardWriter::create(&dir.join("00001.tar")).unwrap();
    w.append("000000006", &i2d_sample("000000006", 6)).unwrap();
    // A key with a dotted directory, and a label.
    let mut s = i2d_sample("x", 7);
    s.push(("cls".into(), b"2".to_vec()));
    w.append("sub.dir/000000007", &s).unwrap();
    // Same key as a sample of 00000.tar.
    w.append("000000001", &i2d_sample("000000001", 8)).unwrap();
    w.finish().unwrap();

    std::fs::write(dir.join("00002.tar"), vec![b'A'; 2048]).unwrap();
    std::fs::write(dir.join("notes.txt"), b"not a shard").unwrap();
}

fn all_scanned(path: &Path) -> Vec<conmim::format::tar::ScannedSample> {
    let mut v = Vec::new();
    scan_shard(
        path,
        |s| {
            v.push(s);
            Ok(())
        },
        |i| panic!("{i:?}"),
    )
    .unwrap();
    v
}

#[test]
fn index_existing_img2dataset_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    write_img2dataset(&dir);
    let opts = IndexOptions {
        threads: 2,
        ..Default::default()
    };
    let s = index_existing(&dir, &dir, &opts).unwrap();
    assert_eq!(s.shards, 2);
    assert_eq!(s.samples, 6);
    assert!(s.warnings.iter().any(|w| w.contains("00002.tar")), "{s}");

    let m = manifest(&dir, "train");
    assert_eq!(m.conmim.dataset, "index");
    let urls: Vec<&str> = m.shardlist.iter().map(|e| e.url.as_str()).collect();
    assert_eq!(urls, ["00000.tar", "00001.tar"]);
    // nsamples counts what the tars hold (wids addresses samples by tar position).
    assert_eq!(m.shardlist[0].nsamples, 6);
    assert_eq!(m.shardlist[1].nsamples, 3);
    assert_eq!(m.conmim.num_samples, 6);

    let rows = rows(&dir, "train");
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "000000000",
            "000000001",
            "000000002",
            "000000003",
            "000000006",
            "sub.dir/000000007"
        ]
    );
    for (shard, url) in urls.iter().enumerate() {
        let scanned = all_scanned(&dir.join(url));
        for r in rows.iter().filter(|r| r.shard as usize == shard) {
            let s = scanned.iter().find(|s| s.key == r.key).unwrap();
            assert_eq!((r.offset, r.length), (s.offset, s.length), "{}", r.key);
            let img = &s.member("jpg").unwrap().data;
            assert_eq!(r.image_bytes, img.len() as u64);
            assert_eq!(r.source, format!("{url}:{}", r.key));
            assert_eq!(r.format, "jpeg");
        }
    }
    let r0 = &rows[0];
    assert_eq!(r0.caption.as_deref(), Some("a photo number 0"));
    assert_eq!(r0.members, "jpg,txt,json");
    assert_eq!((r0.width, r0.height), (40, 36));
    assert_eq!(r0.label, None);
    assert_eq!(rows[5].label, Some(2));
    assert_eq!(rows[5].members, "jpg,txt,json,cls");

    let rejects = read_rejects(&dir.join(rejected_name("train"))).unwrap();
    let by_source: BTreeMap<&str, &str> = rejects
        .iter()
        .map(|r| (r.source.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        by_source.get("00000.tar:000000004"),
        Some(&"no_image_member")
    );
    let truncated = by_source
        .get("00000.tar:000000005")
        .expect("truncated rejected");
    assert!(!truncated.is_empty() && *truncated != "no_image_member");
    assert_eq!(by_source.get("00001.tar:000000001"), Some(&"duplicate_key"));
    let dup = rejects
        .iter()
        .find(|r| r.reason == "duplicate_key")
        .unwrap();
    assert!(
        dup.detail.ends_with("already indexed from 00000.tar"),
        "the detail names the shard of the first occurrence: {}",
        dup.detail
    );
    assert_eq!(by_source.get("00002.tar"), Some(&"corrupt_shard"));
    assert_eq!(rejects.len(), 4);
    assert_eq!(s.rejected, 4);
    assert_eq!(s.inputs, 10);

    // What index wrote verifies, also with a full decode.
    for decode in [false, true] {
        let r = check(&dir, "train", decode);
        assert!(r.ok(), "{r}");
        assert_eq!(r.samples, 9);
        assert_eq!(r.rejected_in_shards, 3);
    }
    // info sees the captions and the tar sample count.
    let i = info(&dir, "train").unwrap();
    assert_eq!((i.samples, i.shard_samples, i.captions), (6, 9, 6));

    // Without the rejected entry, the unindexed sample is a problem.
    let kept: Vec<_> = rejects
        .iter()
        .filter(|r| r.source != "00000.tar:000000004")
        .cloned()
        .collect();
    write_rejects(&dir.join(rejected_name("train")), &kept).unwrap();
    let r = check(&dir, "train", false);
    assert!(
        r.problems
            .iter()
            .any(|p| p.shard == "00000.tar" && p.key.as_deref() == Some("000000004")),
        "{r}"
    );

    // The manifest marks the dataset complete: indexing again is refused.
    assert!(index_existing(&dir, &dir, &opts).is_err());
}

#[test]
fn index_existing_pattern_and_other_out_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    write_img2dataset(&dir);
    // The manifest may live above the shard directory (urls lead downwards only).
    let out = tmp.path().to_owned();
    let opts = IndexOptions {
        split: "web".into(),
        pattern: Some("{00000..00001}.tar".into()),
        validation: Validation::Decode,
        threads: 1,
        ..Default::default()
    };
    let s = index_existing(&dir, &out, &opts).unwrap();
    assert_eq!((s.shards, s.samples, s.rejected), (2, 6, 3));
    assert!(s.warnings.iter().all(|w| !w.contains("00002.tar")));
    assert!(s.warnings.iter().any(|w| w.contains("sub.dir/000000007")));
    let m = manifest(&out, "web");
    let urls: Vec<&str> = m.shardlist.iter().map(|e| e.url.as_str()).collect();
    assert_eq!(urls, ["shards/00000.tar", "shards/00001.tar"]);
    assert!(!dir.join(manifest_name("web")).exists());
    let r = check(&out, "web", false);
    assert!(r.ok(), "{r}");

    // Same rows (up to the url in `source`) as indexing all *.tar in place.
    index_existing(
        &dir,
        &dir,
        &IndexOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let a = rows(&out, "web");
    let b = rows(&dir, "train");
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (&x.key, x.shard, x.offset, x.length, &x.sha256),
            (&y.key, y.shard, y.offset, y.length, &y.sha256)
        );
        assert_eq!(x.source, format!("shards/{}", y.source));
    }

    // A manifest beside the shard directory would need `..` in its urls: refused.
    let sibling = tmp.path().join("index");
    let err = index_existing(&dir, &sibling, &IndexOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--out"), "{err}");
    assert!(!sibling.join(manifest_name("train")).exists());

    // A pattern naming shards that do not exist is an error.
    let bad = IndexOptions {
        split: "nope".into(),
        pattern: Some("{00000..00005}.tar".into()),
        ..Default::default()
    };
    let err = index_existing(&dir, &out, &bad).unwrap_err().to_string();
    assert!(err.contains("00003.tar"), "{err}");
}

/// Manifest urls are UTF-8 text: a shard whose path below `--out` is not valid UTF-8
/// is an error naming it (before, its url was mangled with U+FFFD and the shard
/// could not be opened by that name).
#[test]
fn issue2_index_refuses_shard_paths_that_are_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    write_img2dataset(&dir);
    std::fs::remove_file(dir.join("00002.tar")).unwrap();
    let bad = dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9.tar"));
    std::fs::copy(dir.join("00001.tar"), &bad).unwrap();
    let err = index_existing(&dir, &dir, &IndexOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("caf\u{FFFD}.tar"), "{err}");
    assert!(err.contains("UTF-8") && err.contains("rename"), "{err}");
    assert!(!dir.join(manifest_name("train")).exists());
    // Left out with --pattern, the other shards index; a shard the pattern names twice
    // (`./00000.tar` is `00000.tar`) is indexed once.
    let opts = IndexOptions {
        pattern: Some("{00000,./00000,00001}.tar".into()),
        ..Default::default()
    };
    assert_eq!(index_existing(&dir, &dir, &opts).unwrap().shards, 2);

    // A folder on the way from --out to the shards.
    let top = tmp.path().join("top");
    let odd = top.join(std::ffi::OsStr::from_bytes(b"d\xff"));
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::copy(dir.join("00000.tar"), odd.join("00000.tar")).unwrap();
    let err = index_existing(&odd, &top, &IndexOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("d\u{FFFD}") && err.contains("UTF-8"), "{err}");
    assert!(!top.join(manifest_name("train")).exists());
}

#[test]
fn brace_patterns_expand() {
    let v = expand_braces("{000000..000146}.tar").unwrap();
    assert_eq!(v.len(), 147);
    assert_eq!(
        (v[0].as_str(), v[146].as_str()),
        ("000000.tar", "000146.tar")
    );
    assert_eq!(
        expand_braces("{train,val}-{0..1}.tar").unwrap(),
        ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]
    );
    assert_eq!(expand_braces("a{b,c{1..2}}").unwrap(), ["ab", "ac1", "ac2"]);
    assert!(expand_braces("{00..01").is_err());
}

// ---------------------------------------------------------------------------------
// The Python readers (tests/python/check_dataset.py)

/// Runs tests/python/check_dataset.py; whether it passed, and what it printed.
fn python_check_output(dir: &Path, split: &str) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_dataset.py");
    let out = std::process::Command::new(common::python())
        .arg(&script)
        .arg(dir)
        .arg(split)
        .output()
        .expect("running python");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn python_reads_the_imagenet_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _) = build(tmp.path());
    common::python_check(&out, "train");
}

/// A shard of members that belong to no sample, GNU headers, a key with a directory,
/// a key that comes back later in the shard, two image members, a non-integer `cls`.
fn write_odd_shard(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    let mut b = tar::Builder::new(file);
    let mut add = |name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_mtime(0);
        if let Some(target) = link {
            h.set_link_name(target).unwrap();
        }
        b.append_data(&mut h, name, data).unwrap();
    };
    use tar::EntryType::{Directory, Regular, Symlink};
    add("extra", Directory, b"", None);
    add("extra/000000010.jpg", Regular, &jpeg(50, 30, 10), None);
    add("extra/000000010.txt", Regular, b"in a folder", None);
    add("extra/link.jpg", Symlink, b"", Some("000000010.jpg"));
    add("000000011.jpg", Regular, &jpeg(44, 30, 11), None);
    add("README", Regular, b"no extension", None);
    add("000000011.cls", Regular, b"cat", None);
    add("000000012.JPEG", Regular, &jpeg(46, 30, 12), None);
    add("000000012.jpg", Regular, &jpeg(47, 31, 13), None);
    add("000000012.cls", Regular, b" 7\n", None);
    // Key 000000011 again, later: another tar sample (no image: rejected).
    add("000000011.txt", Regular, b"orphan caption", None);
    b.finish().unwrap();
}

#[test]
fn python_reads_an_index_dataset_with_rejected_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    write_img2dataset(&dir);
    write_odd_shard(&dir.join("00003.tar"));
    let opts = IndexOptions {
        threads: 2,
        ..Default::default()
    };
    let s = index_existing(&dir, &dir, &opts).unwrap();
    assert_eq!(s.shards, 3, "{s}");
    assert_eq!(s.samples, 6 + 3, "{s}");

    let m = manifest(&dir, "train");
    assert_eq!(m.conmim.dataset, "index");
    let ns: Vec<u64> = m.shardlist.iter().map(|e| e.nsamples).collect();
    assert_eq!(ns, [6, 3, 4]);
    assert_eq!(m.conmim.num_samples, 9);
    let keys: Vec<String> = rows(&dir, "train")
        .into_iter()
        .filter(|r| r.shard == 2)
        .map(|r| r.key)
        .collect();
    assert_eq!(keys, ["extra/000000010", "000000011", "000000012"]);
    let rejects = read_rejects(&dir.join(rejected_name("train"))).unwrap();
    let has = |source: &str, reason: &str| {
        rejects
            .iter()
            .any(|r| r.source == source && r.reason == reason)
    };
    assert!(has("00000.tar:000000004", "no_image_member"), "{rejects:?}");
    assert!(has("00001.tar:000000001", "duplicate_key"), "{rejects:?}");
    assert!(has("00002.tar", "corrupt_shard"), "{rejects:?}");
    assert!(has("00003.tar:extra/link.jpg", "bad_member"), "{rejects:?}");
    assert!(has("00003.tar:README", "bad_member"), "{rejects:?}");
    assert!(has("00003.tar:000000011", "no_image_member"), "{rejects:?}");
    let r = check(&dir, "train", true);
    assert!(r.ok(), "{r}");

    // webdataset yields every tar sample: the index rows plus the rejected ones.
    common::python_check(&dir, "train");

    // A rejected list and the manifest counts that go with it.
    let original = manifest(&dir, "train");
    let write_list = |list: &[conmim::format::reject::Reject], dataset: &str| {
        write_rejects(&dir.join(rejected_name("train")), list).unwrap();
        let mut m = original.clone();
        m.conmim.dataset = dataset.into();
        m.conmim.num_rejected = list.len() as u64;
        m.conmim.num_inputs = m.conmim.num_samples + list.len() as u64;
        m.conmim.rejected_by_reason.clear();
        for r in list {
            *m.conmim
                .rejected_by_reason
                .entry(r.reason.clone())
                .or_default() += 1;
        }
        conmim::format::atomic_write_json(&dir.join(manifest_name("train")), &m).unwrap();
    };
    let without = |source: &str| {
        let kept: Vec<_> = rejects
            .iter()
            .filter(|r| r.source != source)
            .cloned()
            .collect();
        assert_eq!(kept.len() + 1, rejects.len());
        write_list(&kept, "index");
        python_check_output(&dir, "train")
    };
    // Each unindexed tar sample needs its record in the rejected list...
    let (ok, text) = without("00000.tar:000000004");
    assert!(!ok && text.contains("000000004"), "{text}");
    let (ok, text) = without("00003.tar:000000011");
    assert!(!ok && text.contains("000000011"), "{text}");
    // ... members of no sample need theirs...
    let (ok, text) = without("00003.tar:README");
    assert!(!ok && text.contains("README"), "{text}");
    // ... and a record naming a sample the tar does not hold is wrong too.
    let mut extra = rejects.clone();
    extra.push(conmim::format::reject::Reject::new(
        "00001.tar:000000099",
        Some("000000099".to_owned()),
        "no_image_member",
        "not there",
    ));
    write_list(&extra, "index");
    let (ok, text) = python_check_output(&dir, "train");
    assert!(!ok && text.contains("000000099"), "{text}");

    // Back as written, it passes; none of this is accepted from other datasets.
    write_list(&rejects, "index");
    common::python_check(&dir, "train");
    write_list(&rejects, "files");
    let (ok, text) = python_check_output(&dir, "train");
    assert!(!ok && text.contains("nsamples"), "{text}");
}
