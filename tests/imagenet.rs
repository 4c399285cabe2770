//! Issue 2: `conmim-shard imagenet` end to end.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use common::*;
use conmim::format::index::read_index;
use conmim::format::manifest::Manifest;
use conmim::format::reject::read_rejects;
use conmim::format::{self, tar::scan_shard};
use conmim::testkit::add_nasty_imagenet_files;

fn manifest(dir: &Path, split: &str) -> Manifest {
    format::read_json(&dir.join(format::manifest_name(split))).unwrap()
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_conmim-shard"))
}

/// Every file under train/ is either a sample or a reject, with the expected reason.
#[test]
fn issue2_every_input_accounted_for_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    tiny_imagenet(&root, 3, 6);
    let nasty = add_nasty_imagenet_files(&root).unwrap();
    let out = tmp.path().join("out");
    let s = shard_imagenet(&root, &small_config(&out, "train"));

    let rows = read_index(&out.join("train.index.parquet")).unwrap();
    let rejects = read_rejects(&out.join("train.rejected.jsonl")).unwrap();
    let mut on_disk = BTreeSet::new();
    for class in std::fs::read_dir(root.join("train")).unwrap() {
        let class = class.unwrap();
        for f in std::fs::read_dir(class.path()).unwrap() {
            let f = f.unwrap();
            on_disk.insert(format!(
                "train/{}/{}",
                class.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            ));
        }
    }
    let indexed: BTreeSet<String> = rows.iter().map(|r| r.source.clone()).collect();
    let rejected: BTreeSet<String> = rejects.iter().map(|r| r.source.clone()).collect();
    assert!(indexed.is_disjoint(&rejected));
    let all: BTreeSet<String> = indexed.union(&rejected).cloned().collect();
    assert_eq!(all, on_disk, "some input neither indexed nor rejected");
    assert_eq!(s.inputs as usize, on_disk.len());
    assert_eq!(s.samples as usize, rows.len());

    let reason: BTreeMap<&str, &str> = rejects
        .iter()
        .map(|r| (r.source.as_str(), r.reason.as_str()))
        .collect();
    for (rel, expected) in &nasty {
        if *expected == "ok" {
            assert!(indexed.contains(rel), "{rel} should have been kept");
        } else {
            assert_eq!(reason.get(rel.as_str()), Some(expected), "{rel}");
        }
    }
    // A PNG named .JPEG is stored under its real extension.
    let png_rows: Vec<_> = rows.iter().filter(|r| r.format == "png").collect();
    assert!(!png_rows.is_empty());
    assert!(png_rows.iter().all(|r| r.members == "png,cls"));

    // Class index = sorted WNIDs; labels agree with folders.
    let m = manifest(&out, "train");
    let wnids = m.conmim.wnids.clone().unwrap();
    let mut sorted = wnids.clone();
    sorted.sort();
    assert_eq!(wnids, sorted);
    for r in &rows {
        let wnid = r.source.split('/').nth(1).unwrap();
        assert_eq!(wnids[r.label.unwrap() as usize], wnid, "{}", r.source);
    }
    assert_eq!(m.conmim.num_rejected as usize, rejects.len());
    assert_eq!(
        m.shardlist.iter().map(|e| e.nsamples).sum::<u64>() as usize,
        rows.len()
    );
}

/// Shards hold what the index says, and the order is shuffled (not class-sorted).
#[test]
fn issue2_shards_match_index_and_order_is_shuffled() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    tiny_imagenet(&root, 4, 10);
    let out = tmp.path().join("out");
    shard_imagenet(&root, &small_config(&out, "train"));
    let rows = read_index(&out.join("train.index.parquet")).unwrap();
    let m = manifest(&out, "train");
    assert!(m.shardlist.len() >= 5, "max_shard_count 7 must roll over");
    let mut i = 0;
    for (n, e) in m.shardlist.iter().enumerate() {
        assert_eq!(e.url, format!("train-{n:06}.tar"));
        scan_shard(
            &out.join(&e.url),
            |s| {
                let r = &rows[i];
                assert_eq!(
                    (r.shard as usize, &r.key, r.offset, r.length),
                    (n, &s.key, s.offset, s.length)
                );
                assert_eq!(
                    s.member("cls").unwrap().data,
                    r.label.unwrap().to_string().as_bytes()
                );
                i += 1;
                Ok(())
            },
            |issue| panic!("{issue:?}"),
        )
        .unwrap();
    }
    assert_eq!(i, rows.len());
    let changes = rows.windows(2).filter(|w| w[0].label != w[1].label).count();
    assert!(
        changes > rows.len() / 2,
        "labels still grouped by class: {changes} changes"
    );
}

/// Same inputs + seed give byte-identical outputs whatever the thread count; another
/// seed gives another order.
#[test]
fn issue2_deterministic_across_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    tiny_imagenet(&root, 3, 12);
    add_nasty_imagenet_files(&root).unwrap();
    let mut outs = Vec::new();
    for threads in [1, 2, 5] {
        let out = tmp.path().join(format!("out{threads}"));
        let mut cfg = small_config(&out, "train");
        cfg.threads = threads;
        shard_imagenet(&root, &cfg);
        outs.push(out);
    }
    assert_same_files(&outs[0], &outs[1]);
    assert_same_files(&outs[0], &outs[2]);
    let other = tmp.path().join("seed9");
    let mut cfg = small_config(&other, "train");
    cfg.seed = 9;
    shard_imagenet(&root, &cfg);
    let a: Vec<_> = read_index(&outs[0].join("train.index.parquet"))
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    let b: Vec<_> = read_index(&other.join("train.index.parquet"))
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_ne!(a, b);
}

/// Killed mid-shard, a rerun with --resume keeps complete shards and ends identical to
/// an uninterrupted run.
#[test]
fn issue2_resume_after_crash_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    tiny_imagenet(&root, 3, 15);
    add_nasty_imagenet_files(&root).unwrap();
    let args = |out: &Path| {
        let mut c = bin();
        c.args([
            "imagenet",
            "--split",
            "train",
            "--max-shard-count",
            "6",
            "--max-reject-frac",
            "1",
            "--quiet",
            "--threads",
            "2",
        ])
        .arg("--root")
        .arg(&root)
        .arg("--out")
        .arg(out);
        c
    };
    let reference = tmp.path().join("ref");
    assert!(args(&reference).status().unwrap().success());

    let out = tmp.path().join("crashed");
    let st = args(&out)
        .env("CONMIM_SHARD_ABORT_AT", "20")
        .status()
        .unwrap();
    assert!(!st.success(), "the fault hook must abort the run");
    assert!(!out.join("train.manifest.json").exists());
    let done: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tar"))
        .collect();
    assert!(
        !done.is_empty(),
        "some shards should be complete before the crash"
    );
    let before: BTreeMap<String, std::time::SystemTime> = done
        .iter()
        .map(|n| {
            (
                n.clone(),
                std::fs::metadata(out.join(n)).unwrap().modified().unwrap(),
            )
        })
        .collect();

    // Without --resume the leftover work is not silently overwritten.
    assert!(!args(&out).status().unwrap().success());
    // With different parameters it is refused too.
    assert!(
        !args(&out)
            .args(["--resume", "--seed", "5"])
            .status()
            .unwrap()
            .success()
    );

    // A crash between a shard's record and its rename leaves a sealed `.partial`:
    // resume must publish it, not rewrite it.
    let sealed = before.keys().next().unwrap().clone();
    std::fs::rename(out.join(&sealed), out.join(format!("{sealed}.partial"))).unwrap();

    std::thread::sleep(std::time::Duration::from_millis(20));
    let st = args(&out).arg("--resume").output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    for (n, t) in &before {
        assert_eq!(
            &std::fs::metadata(out.join(n)).unwrap().modified().unwrap(),
            t,
            "{n} was rewritten"
        );
    }
    assert_same_files(&reference, &out);
    assert!(!out.join(".train.work").exists());

    // Killed after publishing the manifest, before removing the work directory: a
    // resume finds the dataset complete and removes what was left.
    std::fs::create_dir_all(out.join(".train.work/left")).unwrap();
    let st = args(&out).arg("--resume").output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(
        !out.join(".train.work").exists(),
        "the leftover work directory stays"
    );
    assert_same_files(&reference, &out);
}

/// The three val layouts give the same labels.
#[test]
fn issue2_val_layouts_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    tiny_imagenet(&root, 3, 2);
    let labels_of = |out: &Path| -> BTreeMap<String, i64> {
        read_index(&out.join("val.index.parquet"))
            .unwrap()
            .into_iter()
            .map(|r| (r.key, r.label.unwrap()))
            .collect()
    };
    // Flat + LOC_val_solution.csv (auto-detected).
    let out_csv = tmp.path().join("csv");
    shard_imagenet(&root, &small_config(&out_csv, "val"));
    let csv = labels_of(&out_csv);
    assert_eq!(csv.len(), 6);
    // Flat + plain `filename label` list.
    let out_list = tmp.path().join("list");
    let src = conmim::shard::source::imagenet::Imagenet::new(
        &root,
        conmim::shard::source::imagenet::Split::Val,
        Some(root.join("val_labels.txt")),
        None,
        false,
    )
    .unwrap();
    conmim::shard::run(&src, &small_config(&out_list, "val")).unwrap();
    assert_eq!(labels_of(&out_list), csv);
    // Class folders.
    let wnids: Vec<String> = manifest(&out_csv, "val").conmim.wnids.unwrap();
    let folders = tmp.path().join("folders");
    std::fs::create_dir_all(folders.join("val")).unwrap();
    std::os::unix::fs::symlink(root.join("train"), folders.join("train")).unwrap();
    for r in read_index(&out_csv.join("val.index.parquet")).unwrap() {
        let d = folders.join("val").join(&wnids[r.label.unwrap() as usize]);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(
            root.join(&r.source),
            d.join(r.source.trim_start_matches("val/")),
        )
        .unwrap();
    }
    let out_f = tmp.path().join("f");
    let mut cfg = small_config(&out_f, "val");
    cfg.follow_symlinks = true;
    shard_imagenet(&folders, &cfg);
    assert_eq!(labels_of(&out_f), csv);
}

/// Symlinks out of the root are refused unless asked for; a reject rate over the limit
/// exits non-zero.
#[test]
fn issue2_symlink_escape_and_reject_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    tiny_imagenet(&root, 2, 3);
    let secret = tmp.path().join("secret.JPEG");
    std::fs::copy(
        root.join("train")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
        &secret,
    )
    .unwrap();
    let class = root
        .join("train")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::os::unix::fs::symlink(&secret, class.join("link.JPEG")).unwrap();
    let out = tmp.path().join("out");
    shard_imagenet(&root, &small_config(&out, "train"));
    let rejects = read_rejects(&out.join("train.rejected.jsonl")).unwrap();
    assert!(
        rejects
            .iter()
            .any(|r| r.source.ends_with("link.JPEG") && r.reason == "unsafe_path")
    );

    let out2 = tmp.path().join("out2");
    let mut cfg = small_config(&out2, "train");
    cfg.follow_symlinks = true;
    let s = shard_imagenet(&root, &cfg);
    assert_eq!(s.rejected, 0);

    // 1 reject of 7 inputs > 0.1 => exit status non-zero, outputs still written.
    let out3 = tmp.path().join("out3");
    let st = bin()
        .args([
            "imagenet",
            "--split",
            "train",
            "--quiet",
            "--max-reject-frac",
            "0.1",
        ])
        .arg("--root")
        .arg(&root)
        .arg("--out")
        .arg(&out3)
        .output()
        .unwrap();
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("rejected"));
    assert!(out3.join("train.rejected.jsonl").exists());
}

/// Python's webdataset reads every shard; pyarrow and pandas read the index; files
/// validate against schemas/.
#[test]
fn issue2_python_webdataset_and_pyarrow_read_the_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    tiny_imagenet(&root, 3, 6);
    add_nasty_imagenet_files(&root).unwrap();
    let out = tmp.path().join("out");
    shard_imagenet(&root, &small_config(&out, "train"));
    shard_imagenet(&root, &small_config(&out, "val"));
    python_check(&out, "train");
    python_check(&out, "val");
}

/// The same file name in two class folders: the first (in folder order) is kept, the
/// other is rejected as a duplicate key naming the first.
#[test]
fn issue2_duplicate_keys_are_rejected_not_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    tiny_imagenet(&root, 2, 3);
    let mut classes: Vec<_> = std::fs::read_dir(root.join("train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    classes.sort();
    let first = classes[0]
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let name = first.file_name().unwrap().to_owned();
    std::fs::copy(&first, classes[1].join(&name)).unwrap();
    let out = tmp.path().join("out");
    let s = shard_imagenet(&root, &small_config(&out, "train"));
    let rejects = read_rejects(&out.join("train.rejected.jsonl")).unwrap();
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0].reason, "duplicate_key");
    assert!(
        rejects[0]
            .source
            .contains(&*classes[1].file_name().unwrap().to_string_lossy())
    );
    assert!(
        rejects[0]
            .detail
            .contains(&*classes[0].file_name().unwrap().to_string_lossy())
    );
    assert_eq!(s.samples, 6);
}

/// A file whose name is not valid UTF-8 cannot have a UTF-8 key or source: it is
/// rejected as `bad_name`, with a detail that says to rename it (it used to show up as
/// `missing_file`, for a file that is there).
#[cfg(unix)]
#[test]
fn issue2_non_utf8_file_name_is_a_bad_name_reject() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    tiny_imagenet(&root, 2, 3);
    let class = std::fs::read_dir(root.join("train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let good = class.read_dir().unwrap().next().unwrap().unwrap().path();
    let bad = class.join(std::ffi::OsStr::from_bytes(b"caf\xe9.JPEG"));
    std::fs::copy(&good, &bad).unwrap();
    let out = tmp.path().join("out");
    let s = shard_imagenet(&root, &small_config(&out, "train"));
    assert_eq!(s.samples, 6);
    let rejects = read_rejects(&out.join("train.rejected.jsonl")).unwrap();
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(rejects[0].reason, "bad_name");
    assert!(
        rejects[0].source.ends_with("caf\u{FFFD}.JPEG"),
        "{rejects:?}"
    );
    assert!(rejects[0].detail.contains("rename"), "{rejects:?}");
    // A root whose own path is not UTF-8 works too (its name goes into the manifest's
    // params lossily, as the rejects' sources do).
    let odd = tmp.path().join(std::ffi::OsStr::from_bytes(b"in\xff"));
    std::fs::rename(&root, &odd).unwrap();
    let s = shard_imagenet(&odd, &small_config(&tmp.path().join("out2"), "train"));
    assert_eq!((s.samples, s.rejected), (6, 1));
}

/// `--max-side N --quality Q`: large originals become JPEGs with max side N; small ones
/// keep their original bytes.
#[test]
fn issue2_reencode_large_originals_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    tiny_imagenet(&root, 2, 6);
    add_nasty_imagenet_files(&root).unwrap();
    let out = tmp.path().join("out");
    let mut cfg = small_config(&out, "train");
    cfg.reencode = Some(conmim::shard::source::Reencode {
        max_side: 40,
        quality: 80,
    });
    shard_imagenet(&root, &cfg);
    let rows = read_index(&out.join("train.index.parquet")).unwrap();
    let mut bytes_by_key = BTreeMap::new();
    for e in &manifest(&out, "train").shardlist {
        scan_shard(
            &out.join(&e.url),
            |s| {
                let m = s.members.iter().find(|m| m.ext != "cls").unwrap();
                bytes_by_key.insert(s.key.clone(), m.data.clone());
                Ok(())
            },
            |_| {},
        )
        .unwrap();
    }
    let (mut big, mut small) = (0, 0);
    for r in &rows {
        let stored = &bytes_by_key[&r.key];
        let original = std::fs::read(root.join(&r.source)).unwrap();
        let info = conmim::image::probe(&original, &Default::default()).unwrap();
        if info.width.max(info.height) > 40 {
            big += 1;
            assert!(r.reencoded, "{}", r.source);
            assert_eq!(r.format, "jpeg");
            assert_eq!(r.width.max(r.height), 40, "{}", r.source);
            let got = conmim::image::decode_check(stored, &Default::default()).unwrap();
            assert_eq!((got.width, got.height), (r.width, r.height));
        } else {
            small += 1;
            assert!(!r.reencoded);
            assert_eq!(stored, &original, "{} must be stored untouched", r.source);
        }
    }
    assert!(
        big > 0 && small > 0,
        "test data must have both ({big} big, {small} small)"
    );
}

/// The README's main job: `conmim-shard demo` builds, shards, verifies and summarises,
/// and can be rerun on its own output folder.
#[test]
fn issue2_demo_runs_and_reruns() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    for _ in 0..2 {
        let o = bin()
            .args(["demo", "--classes", "2", "--per-class", "4", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.contains("result    OK"), "{stdout}");
    }
    assert!(out.join("dataset/train.manifest.json").exists());
    // Someone else's folder is not deleted.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(other.join("dataset")).unwrap();
    let o = bin().args(["demo", "--out"]).arg(&other).output().unwrap();
    assert!(!o.status.success());
    assert!(other.join("dataset").exists());
}
