//! One worker's ConMIM view pipeline (decode -> crop + resize -> strong ops), per stage,
//! for each JPEG decoding strategy, on one thread, from memory (no I/O, no threads, no
//! batching): where a loader thread's time goes, and what each decoding choice buys.
//!
//! `cargo bench --bench views` (knobs: `BENCH_DATA`, a dataset directory of tar shards,
//! default `/tmp/bench-data` as `conmim-bench make-data` writes it; without one, the same
//! mix of ImageNet-like JPEGs is generated in memory; `BENCH_IMAGES`, default 1000;
//! `BENCH_ROUNDS`, default 3 passes over the images per strategy, best pass reported;
//! `BENCH_ONLY`, run only the strategies whose name contains it, e.g. `default` under
//! `perf record`). Under `cargo test --all-targets` (no `--bench` argument) it is a
//! smoke run on 8 generated images, so the benchmark cannot rot.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use conmim::augment::views::{DecodePath, DecodeStrategy, ViewMaker};
use conmim::image::ImageLimits;
use conmim::image::turbo::{ALL_SCALES, FAST_SCALES};
use conmim::testkit::{JpegSpec, derive_seed, jpeg};

/// ImageNet's common sizes (as `conmim-bench make-data`).
const SIZES: &[(u32, u32)] = &[(500, 375), (375, 500), (500, 333), (333, 500), (640, 480)];

/// `n` ImageNet-like JPEGs (sizes above, quality 75-96), made in memory.
fn generated(n: usize) -> Vec<Vec<u8>> {
    (0..n as u64)
        .map(|i| {
            let r = derive_seed(0, i);
            let (w, h) = SIZES[(r % SIZES.len() as u64) as usize];
            jpeg(&JpegSpec {
                quality: 75 + ((r >> 16) % 22) as u8,
                ..JpegSpec::rgb(w, h, r)
            })
        })
        .collect()
}

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// The `.jpg` members of the tar shards in `dir`, up to `limit`.
fn load_jpegs(dir: &Path, limit: usize) -> Vec<Vec<u8>> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .collect();
    shards.sort();
    let mut out = Vec::new();
    for s in shards {
        let mut ar = tar::Archive::new(std::fs::File::open(&s).unwrap());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let is_jpg = e.path().unwrap().extension().is_some_and(|x| x == "jpg");
            if is_jpg {
                let mut b = Vec::new();
                e.read_to_end(&mut b).unwrap();
                out.push(b);
                if out.len() == limit {
                    return out;
                }
            }
        }
    }
    out
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let images: usize = env_or("BENCH_IMAGES", if smoke { 8 } else { 1000 });
    let rounds: usize = env_or("BENCH_ROUNDS", if smoke { 1 } else { 3 });
    let dir = PathBuf::from(env_or("BENCH_DATA", "/tmp/bench-data".to_string()));
    let (jpegs, from) = if !smoke && dir.is_dir() {
        (load_jpegs(&dir, images), format!("from {}", dir.display()))
    } else {
        (generated(images), "generated in memory".to_string())
    };
    assert!(!jpegs.is_empty(), "{from}: no .jpg members found");
    let mb = jpegs.iter().map(Vec::len).sum::<usize>() as f64 / 1e6;
    println!(
        "{} JPEGs ({mb:.1} MB) {from}, {rounds} rounds, best round per strategy",
        jpegs.len(),
    );
    let limits = ImageLimits::default();
    let size = 224u32;
    let n = (size * size * 3) as usize;
    let (mut weak, mut strong) = (vec![0u8; n], vec![0u8; n]);
    let strategies: [(&str, DecodeStrategy); 5] = [
        ("zune full", DecodeStrategy::Full),
        (
            "turbo full",
            DecodeStrategy::Turbo {
                scales: &[],
                crop: false,
            },
        ),
        (
            "turbo region",
            DecodeStrategy::Turbo {
                scales: &[],
                crop: true,
            },
        ),
        (
            "turbo region + 1/2,1/4,1/8 (default)",
            DecodeStrategy::Turbo {
                scales: FAST_SCALES,
                crop: true,
            },
        ),
        (
            "turbo region + all n/8",
            DecodeStrategy::Turbo {
                scales: ALL_SCALES,
                crop: true,
            },
        ),
    ];
    println!(
        "{:<38} {:>8} {:>8} {:>8} {:>8} {:>8}  decode paths",
        "strategy", "img/s", "decode", "resize", "strong", "total"
    );
    let only: String = env_or("BENCH_ONLY", String::new());
    for (name, strategy) in strategies {
        if !name.contains(only.as_str()) {
            continue;
        }
        let mut vm = ViewMaker::with_strategy(strategy);
        let mut best: Option<(f64, [f64; 3])> = None;
        let mut paths = std::collections::BTreeMap::<String, usize>::new();
        for round in 0..rounds {
            vm.take_times();
            let t = Instant::now();
            for (i, b) in jpegs.iter().enumerate() {
                vm.conmim_pair(
                    b,
                    &limits,
                    7,
                    round as u64,
                    i as u64,
                    size,
                    &mut weak,
                    &mut strong,
                )
                .unwrap();
                if round == 0 {
                    let p = match vm.last_path() {
                        DecodePath::Turbo { num, cropped } => {
                            format!("{num}/8{}", if cropped { " region" } else { "" })
                        }
                        other => format!("{other:?}"),
                    };
                    *paths.entry(p).or_default() += 1;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            let st = vm.take_times();
            let per = |d: std::time::Duration| d.as_secs_f64() * 1e3 / jpegs.len() as f64;
            let stages = [per(st.decode), per(st.resize), per(st.strong)];
            if best.is_none_or(|(s, _)| secs < s) {
                best = Some((secs, stages));
            }
        }
        let (secs, [d, r, s]) = best.unwrap();
        let paths: Vec<String> = paths.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!(
            "{name:<38} {:>8.0} {d:>8.3} {r:>8.3} {s:>8.3} {:>8.3}  {}",
            jpegs.len() as f64 / secs,
            secs * 1e3 / jpegs.len() as f64,
            paths.join(", ")
        );
    }
    println!("(stage columns: CPU ms per image)");
}
