//! The `conmim-bench` command line: the `loader --json` contract (one JSON object on
//! stdout with at least `img_per_s`, `threads`, `batch`, `images`) on data made by
//! `conmim-bench make-data`, and its errors.

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_conmim-bench"))
}

#[test]
fn issue3_loader_json_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = bench()
        .args(["make-data", "--images", "24", "--per-shard", "8", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(data.join("train.manifest.json").is_file());

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
}
