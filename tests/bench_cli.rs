//! The `conmim-bench` command line: the `loader --json` contract (one JSON object on
//! stdout with at least `img_per_s`, `threads`, `batch`, `images`) on data made by
//! `conmim-bench make-data`, its errors, and `compare` running the PyTorch peer script
//! (`tools/bench/torch_loader.py`, with the venv's torch / torchvision / webdataset).

mod common;

use std::path::Path;
use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_conmim-bench"))
}

fn make_data(data: &Path) {
    let out = bench()
        .args(["make-data", "--images", "24", "--per-shard", "8", "--out"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(data.join("train.manifest.json").is_file());
}

#[test]
fn issue3_loader_json_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);

    let out = bench()
        .args(["loader", "--data"])
        .arg(&data)
        .args([
            "--split",
            "train",
            "--threads",
            "2",
            "--batch",
            "4",
            "--seconds",
            "0.5",
        ])
        .args(["--decode-seconds", "0.2", "--size", "64", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    // Exactly one JSON object on stdout (progress goes to stderr).
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    assert!(v["img_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["threads"], 2);
    assert_eq!(v["batch"], 4);
    let images = v["images"].as_u64().unwrap();
    assert!(images > 0 && images.is_multiple_of(4), "{v}");
    assert_eq!(v["sample_errors"], 0);
    // Default warm-up: max(2, 2 x threads), as the PyTorch peer's.
    assert_eq!(v["warmup_batches"], 4, "{v}");
    assert!(v["cpu_ms_per_image"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v["decode_baseline_img_per_s"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    for stage in [
        "read",
        "decode",
        "crop_resize",
        "strong_aug",
        "mask",
        "collate",
    ] {
        assert!(v["stage_ms_per_image"][stage].is_number(), "{stage}: {v}");
    }
}

#[test]
fn issue3_loader_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let out = bench()
        .args(["loader", "--data"])
        .arg(&missing)
        .args(["--seconds", "0.2", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope"), "{stderr}");
    assert!(out.stdout.is_empty(), "no JSON on failure");

    let out = bench()
        .args(["loader", "--data", "x", "--http-timeout", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--http-timeout"), "{stderr}");

    // Infinite windows are refused up front (a panic and a hang before).
    for flag in ["--seconds", "--decode-seconds"] {
        let out = bench()
            .args(["loader", "--data"])
            .arg(&missing)
            .args([flag, "inf"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(flag) && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// `compare` runs both loaders on the same shards with the same view size and prints
/// the per-core ratio; it refuses settings the peer does not implement.
#[test]
fn issue3_compare_runs_the_pytorch_peer_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench/torch_loader.py");
    let run = |extra: &[&str]| {
        bench()
            .arg("compare")
            .arg("--python")
            .arg(common::python())
            .arg("--peer")
            .arg(&peer)
            .arg("--data")
            .arg(&data)
            .args([
                "--threads",
                "1",
                "--batch",
                "4",
                "--seconds",
                "1",
                "--size",
                "64",
            ])
            .args(["--decode-seconds", "0", "--shuffle-buffer", "16"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--json", "--warmup-batches", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"));
    assert_eq!(v["conmim"]["image_size"], 64, "{v}");
    assert_eq!(
        v["pytorch"]["size"], 64,
        "the peer must make the same views: {v}"
    );
    assert!(v["pytorch"]["img_per_s"].as_f64().unwrap() > 0.0, "{v}");
    // Both sides warm up alike.
    assert_eq!(v["conmim"]["warmup_batches"], 3, "{v}");
    assert_eq!(v["pytorch"]["warmup_batches"], 3, "{v}");
    let ratio = v["per_core_ratio"].as_f64().unwrap();
    let want = (v["conmim"]["img_per_s"].as_f64().unwrap() / 1.0)
        / (v["pytorch"]["img_per_s"].as_f64().unwrap()
            / v["pytorch"]["threads"].as_f64().unwrap_or(1.0));
    assert!(
        (ratio - want).abs() < 1e-9 * want.max(1.0),
        "{ratio} vs {want}"
    );

    let out = run(&["--mask", "cell"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--mask patch"), "{stderr}");
}

/// `scaling` alternates 1 thread and `--threads` and reports each round's speed-up.
#[test]
fn issue3_scaling_reports_the_speedup_per_round() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let out = bench()
        .args(["scaling", "--data"])
        .arg(&data)
        .args([
            "--threads",
            "2",
            "--batch",
            "4",
            "--seconds",
            "0.3",
            "--size",
            "64",
        ])
        .args(["--rounds", "2", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["threads"], 2);
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{v}");
    for r in rounds {
        let s = r["img_per_s_n"].as_f64().unwrap() / r["img_per_s_1"].as_f64().unwrap();
        assert!((s - r["speedup"].as_f64().unwrap()).abs() < 1e-9, "{v}");
    }
    assert!(v["speedup_median"].as_f64().unwrap() > 0.0, "{v}");

    let out = bench()
        .args(["scaling", "--data"])
        .arg(&data)
        .args(["--threads", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("N >= 2"));
}
