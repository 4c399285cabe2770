//! Small harness shared by the integration tests: tiny datasets in temp dirs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use conmim::shard::source::imagenet::{Imagenet, Split};
use conmim::shard::{ShardConfig, Summary};
use conmim::testkit::{ImagenetDemo, write_imagenet_demo};

/// A tiny synthetic ImageNet under `root`.
pub fn tiny_imagenet(root: &Path, classes: usize, per_class: usize) {
    write_imagenet_demo(
        root,
        &ImagenetDemo {
            classes,
            train_per_class: per_class,
            val_per_class: 2,
            seed: 1,
            min_side: 24,
            max_side: 64,
        },
    )
    .expect("demo imagenet");
}

/// A config writing small shards, tolerant of rejects.
pub fn small_config(out: &Path, split: &str) -> ShardConfig {
    let mut c = ShardConfig::new(out, split);
    c.max_shard_count = 7;
    c.max_reject_frac = 1.0;
    c.threads = 2;
    c
}

/// Shards the `split` of the ImageNet folder at `root`.
pub fn shard_imagenet(root: &Path, cfg: &ShardConfig) -> Summary {
    let split = if cfg.split == "val" {
        Split::Val
    } else {
        Split::Train
    };
    let src = Imagenet::new(root, split, None, None, cfg.follow_symlinks).expect("imagenet source");
    conmim::shard::run(&src, cfg).expect("shard run")
}

/// All files of a directory (not recursing into hidden work dirs), name -> bytes.
pub fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            out.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    out
}

/// Asserts two dataset directories hold byte-identical files.
pub fn assert_same_files(a: &Path, b: &Path) {
    let (fa, fb) = (dir_files(a), dir_files(b));
    assert_eq!(
        fa.keys().collect::<Vec<_>>(),
        fb.keys().collect::<Vec<_>>(),
        "different file sets"
    );
    for (name, bytes) in &fa {
        assert!(
            bytes == &fb[name],
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// The Python with webdataset/pyarrow/pandas installed by tools/setup.sh.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CONMIM_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let venv = std::env::var("CONMIM_VENV")
        .unwrap_or_else(|_| format!("{home}/.cache/conmim/venv-torch2.11.0"));
    let p = PathBuf::from(venv).join("bin/python");
    assert!(
        p.exists(),
        "{} not found: run tools/setup.sh (or set CONMIM_PYTHON) before the tests",
        p.display()
    );
    p
}

/// Runs tests/python/check_dataset.py on a dataset and asserts it passes.
pub fn python_check(dir: &Path, split: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_dataset.py");
    let out = std::process::Command::new(python())
        .arg(&script)
        .arg(dir)
        .arg(split)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
