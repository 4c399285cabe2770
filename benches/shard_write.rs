//! Shard-writing throughput, against Python `webdataset.ShardWriter` on the same files.
//!
//! `cargo bench --bench shard_write` (after `tools/setup.sh`; env `CONMIM_PYTHON` or the
//! default venv). Knobs: `BENCH_FILES` (default 2000 ImageNet-sized JPEGs),
//! `BENCH_THREADS` (copy-mode threads, default 2), `BENCH_DIR` (data cache, default
//! `target/bench-data`).
//!
//! Reports, on files already in the page cache (all runs read the same warm files):
//! 1. Python ShardWriter (copy, 1 process),
//! 2. conmim-shard copy mode (header-only validation, `BENCH_THREADS` threads),
//! 3. the decode-bound rate of all cores (decode from memory, no I/O, no writing),
//! 4. conmim-shard `--decode` on all cores.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use conmim::image::{ImageLimits, decode_check};
use conmim::shard::source::Validation;
use conmim::shard::source::imagenet::{Imagenet, Split};
use conmim::shard::{ShardConfig, run};
use rayon::prelude::*;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CONMIM_PYTHON") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    PathBuf::from(
        std::env::var("CONMIM_VENV").unwrap_or(format!("{home}/.cache/conmim/venv-torch2.11.0")),
    )
    .join("bin/python")
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for c in std::fs::read_dir(dir).unwrap() {
        for f in std::fs::read_dir(c.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

struct Row {
    name: String,
    files: usize,
    bytes: u64,
    secs: f64,
}

impl Row {
    fn fps(&self) -> f64 {
        self.files as f64 / self.secs
    }
    fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs
    }
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --all-targets` this runs as a
    // quick smoke test on a few files so the benchmark cannot rot.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n_files: usize = env_or("BENCH_FILES", if smoke { 40 } else { 2000 });
    let copy_threads: usize = env_or("BENCH_THREADS", 2);
    // Both writers roll shards at this size, so a few thousand files stand for the
    // steady state of a large dataset (many shards), as ImageNet's 140 GB would be.
    let shard_bytes: u64 = env_or("BENCH_SHARD_BYTES", 16_000_000);
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let smoke_dir = tempfile::tempdir().unwrap();
    let data = match std::env::var("BENCH_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) if smoke => smoke_dir.path().join("imagenet"),
        Err(_) => PathBuf::from(format!(
            "{}/target/bench-data/imagenet-{n_files}",
            env!("CARGO_MANIFEST_DIR")
        )),
    };
    let classes = 20usize;
    if !data.join("train").exists() {
        eprintln!(
            "generating {n_files} ImageNet-sized JPEGs in {} ...",
            data.display()
        );
        let tmp = data.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        conmim::testkit::write_imagenet_demo(
            &tmp,
            &conmim::testkit::ImagenetDemo {
                classes,
                train_per_class: n_files.div_ceil(classes),
                val_per_class: 1,
                seed: 42,
                min_side: 300,
                max_side: 500,
            },
        )
        .unwrap();
        std::fs::rename(&tmp, &data).unwrap();
    }
    let files = files_under(&data.join("train"));
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    // Warm the page cache for everyone.
    let blobs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let work = tempfile::tempdir_in(data.parent().unwrap()).unwrap();
    let mut rows = Vec::new();

    // 1. Python webdataset.ShardWriter.
    let py_out = work.path().join("py");
    std::fs::create_dir_all(&py_out).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench/wds_shardwriter.py");
    let out = Command::new(python())
        .arg(&script)
        .arg("--root")
        .arg(data.join("train"))
        .arg("--out")
        .arg(&py_out)
        .arg("--maxsize")
        .arg(shard_bytes.to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap_or("")
                .to_owned();
            let v: serde_json::Value = serde_json::from_str(&line).expect("python json line");
            rows.push(Row {
                name: "python webdataset.ShardWriter (copy)".into(),
                files: v["files"].as_u64().unwrap() as usize,
                bytes: v["bytes"].as_u64().unwrap(),
                secs: v["seconds"].as_f64().unwrap(),
            });
        }
        other => panic!("python peer did not run ({other:?}); run tools/setup.sh"),
    }

    let shard = |name: &str, threads: usize, validation: Validation| {
        let out = work.path().join(name);
        let src = Imagenet::new(&data, Split::Train, None, None, false).unwrap();
        let mut cfg = ShardConfig::new(&out, "train");
        cfg.threads = threads;
        cfg.validation = validation;
        cfg.max_shard_bytes = shard_bytes;
        let t = Instant::now();
        let s = run(&src, &cfg).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(s.samples as usize, files.len());
        Row {
            name: format!(
                "conmim-shard {} ({threads} threads)",
                if validation == Validation::Decode {
                    "--decode"
                } else {
                    "copy"
                }
            ),
            files: files.len(),
            bytes: total,
            secs,
        }
    };
    rows.push(shard("copy", copy_threads, Validation::Header));

    // 3. Decode-bound rate: decode every image from memory on all cores.
    let limits = ImageLimits::default();
    let t = Instant::now();
    blobs.par_iter().for_each(|b| {
        decode_check(b, &limits).unwrap();
    });
    rows.push(Row {
        name: format!("decode only, from memory ({all} threads)"),
        files: files.len(),
        bytes: total,
        secs: t.elapsed().as_secs_f64(),
    });
    rows.push(shard("decode", all, Validation::Decode));

    println!(
        "\n{:<46} {:>9} {:>10} {:>8}",
        "run", "files/s", "MB/s", "secs"
    );
    for r in &rows {
        println!(
            "{:<46} {:>9.0} {:>10.1} {:>8.2}",
            r.name,
            r.fps(),
            r.mbps(),
            r.secs
        );
    }
    let find = |p: &str| rows.iter().find(|r| r.name.starts_with(p));
    if let (Some(py), Some(copy)) = (find("python"), find("conmim-shard copy")) {
        println!(
            "copy mode vs Python ShardWriter: {:.1}x (target >= 3x)",
            copy.fps() / py.fps()
        );
    }
    if let (Some(dec), Some(sd)) = (find("decode only"), find("conmim-shard --decode")) {
        println!(
            "--decode vs decode-bound rate: {:.0}% (target >= 90%)",
            100.0 * sd.fps() / dec.fps()
        );
    }
    println!(
        "{} files, {:.1} MB, {} cores, shards of {:.0} MB",
        files.len(),
        total as f64 / 1e6,
        all,
        shard_bytes as f64 / 1e6
    );
}
