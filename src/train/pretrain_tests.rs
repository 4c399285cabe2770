//! Cross-module tests of the pretraining groundwork: backbone + head + loss against the
//! PyTorch reference (`tools/reference/conmim_loss.py`, float64, run with
//! `$CONMIM_PYTHON` at test time; skipped with a notice when it is unset), and a few SGD
//! steps of a micro model.

use std::collections::HashMap;

use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

use super::head::{HeadConfig, ProjectionHead};
use super::input::{mask_from_u8, normalize_u8_nhwc};
use super::loss::{TEMPERATURE, conmim_loss};
use super::testing::{
    lcg_bytes, lcg_tensor, max_diff, micro, perturb, python, read_npz, run_reference, seeded,
    write_npz,
};
use super::vit::{Config, Variant, VisionTransformer};

const TOL: f64 = 1e-4;

fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let (diff, scale) = max_diff(got, want);
    println!("{name}: max |rust - python| = {diff:.2e} (max |python| {scale:.2e})");
    assert!(
        diff <= tol * scale.max(1.0),
        "{name}: {diff:e} > {tol:e} x {scale:e}"
    );
}

/// Student and teacher: backbone + head, each in its own VarStore (as the trainer will
/// hold them), with deterministic non-trivial weights.
struct Pair {
    cfg: Config,
    head_cfg: HeadConfig,
    student_vs: nn::VarStore,
    student: (VisionTransformer, ProjectionHead),
    teacher_vs: nn::VarStore,
    teacher: (VisionTransformer, ProjectionHead),
}

fn build(
    cfg: &Config,
    head_cfg: &HeadConfig,
    vs: &nn::VarStore,
) -> (VisionTransformer, ProjectionHead) {
    (
        VisionTransformer::new(cfg, vs.root()).unwrap(),
        ProjectionHead::new(head_cfg, vs.root() / "projectors").unwrap(),
    )
}

/// Call with the RNG held (`seeded`).
fn pair(variant: Variant) -> Pair {
    let cfg = micro(variant);
    let head_cfg = HeadConfig {
        hidden_dim: 64,
        out_dim: 24,
        ..HeadConfig::conmim(cfg.embed_dim)
    };
    let student_vs = nn::VarStore::new(Device::Cpu);
    let student = build(&cfg, &head_cfg, &student_vs);
    let mut teacher_vs = nn::VarStore::new(Device::Cpu);
    let teacher = build(&cfg, &head_cfg, &teacher_vs);
    let scale = |name: &str| {
        if name.ends_with("relative_position_bias_table") {
            1.0
        } else {
            0.1
        }
    };
    perturb(&student_vs, 1, scale);
    teacher_vs.copy(&student_vs).unwrap();
    // The teacher is an EMA of the student: close, not equal.
    perturb(&teacher_vs, 2, |n| scale(n) * 0.2);
    Pair {
        cfg,
        head_cfg,
        student_vs,
        student,
        teacher_vs,
        teacher,
    }
}

/// Per-image different numbers of masked patches (16 per image): 12, 1, 7.
fn mask_bytes() -> Vec<u8> {
    let mut m = vec![0u8; 48];
    for i in [0, 1, 2, 3, 5, 6, 7, 9, 10, 12, 14, 15] {
        m[i] = 1;
    }
    m[16 + 8] = 1;
    for i in [0, 3, 4, 8, 11, 13, 15] {
        m[32 + i] = 1;
    }
    m
}

/// Where the files exchanged with Python go: a temporary directory, or
/// `$CONMIM_REFERENCE_DIR/<name>` when that is set, to keep them for rerunning the
/// script by hand (`$CONMIM_PYTHON tools/reference/conmim_loss.py model DIR/in.npz
/// DIR/out.npz --config DIR/cfg.json`, or `timm-check DIR/in.npz --config DIR/cfg.json`
/// where timm is installed).
enum WorkDir {
    Temp(tempfile::TempDir),
    Kept(std::path::PathBuf),
}

impl WorkDir {
    fn path(&self) -> &std::path::Path {
        match self {
            WorkDir::Temp(t) => t.path(),
            WorkDir::Kept(p) => p,
        }
    }
}

fn work_dir(name: &str) -> WorkDir {
    match std::env::var_os("CONMIM_REFERENCE_DIR") {
        Some(root) => {
            let p = std::path::Path::new(&root).join(name);
            std::fs::create_dir_all(&p).unwrap();
            WorkDir::Kept(p)
        }
        None => WorkDir::Temp(tempfile::tempdir().unwrap()),
    }
}

#[test]
fn loss_matches_python_reference() {
    let Some(py) = python("loss_matches_python_reference") else {
        return;
    };
    let dir = work_dir("loss");
    let (b, n, c) = (3, 16, 24);
    let student = lcg_tensor(21, &[b, n, c], Device::Cpu);
    let teacher = &student * 0.3 + lcg_tensor(22, &[b, n, c], Device::Cpu) * 0.5;
    let mask = mask_from_u8(&mask_bytes(), 3, 16, Device::Cpu).unwrap();
    let out = conmim_loss(&student, &teacher, &mask, TEMPERATURE).unwrap();
    let inputs = dir.path().join("in.npz");
    write_npz(
        &inputs,
        &[
            ("student".into(), student),
            ("teacher".into(), teacher),
            ("mask".into(), mask.to_kind(Kind::Uint8)),
        ],
    );
    let result = dir.path().join("out.npz");
    run_reference(
        &py,
        &["loss", inputs.to_str().unwrap(), result.to_str().unwrap()],
    );
    let want = read_npz(&result);
    assert_close("loss", &out.loss.reshape([1]), &want["loss"], TOL);
    assert_close(
        "loss (formula)",
        &out.loss.reshape([1]),
        &want["loss_formula"],
        TOL,
    );
    assert_close(
        "accuracy",
        &out.accuracy.reshape([1]),
        &want["accuracy"],
        1e-6,
    );
}

fn reference_run(variant: Variant) {
    let name = format!("model_head_loss_and_grads_match_python_reference ({variant:?})");
    let Some(py) = python(&name) else {
        return;
    };
    let _rng = seeded(11);
    let p = pair(variant);
    let (b, s) = (3usize, p.cfg.image_size as usize);
    let weak = lcg_bytes(31, b * s * s * 3);
    // The strong view: the same pixels, photometrically disturbed.
    let strong: Vec<u8> = weak
        .iter()
        .zip(lcg_bytes(32, weak.len()))
        .map(|(&w, n)| w.saturating_add(n / 4))
        .collect();
    let mask_u8 = mask_bytes();

    // Rust.
    let xw = normalize_u8_nhwc(&weak, b, s, Device::Cpu).unwrap();
    let xs = normalize_u8_nhwc(&strong, b, s, Device::Cpu).unwrap();
    let mask = mask_from_u8(&mask_u8, b, 16, Device::Cpu).unwrap();
    let (tf, tp) = tch::no_grad(|| {
        let f = p.teacher.0.forward_features(&xs, None, false).unwrap();
        let proj = p.teacher.1.forward_t(&f, true).unwrap();
        (f, proj)
    });
    let sf = p
        .student
        .0
        .forward_features(&xw, Some(&mask), false)
        .unwrap();
    let sp = p.student.1.forward_t(&sf, true).unwrap();
    let n = p.cfg.num_patches();
    let out = conmim_loss(&sp.narrow(1, 1, n), &tp.narrow(1, 1, n), &mask, TEMPERATURE).unwrap();
    out.loss.backward();

    // Python.
    let dir = work_dir(&format!("{variant:?}"));
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (prefix, vs) in [("student", &p.student_vs), ("teacher", &p.teacher_vs)] {
        for (k, v) in vs.variables() {
            tensors.push((format!("{prefix}.{k}"), v));
        }
    }
    let u8s = |v: &[u8]| Tensor::from_slice(v).view([b as i64, s as i64, s as i64, 3]);
    tensors.push(("weak".into(), u8s(&weak)));
    tensors.push(("strong".into(), u8s(&strong)));
    tensors.push((
        "mask".into(),
        Tensor::from_slice(&mask_u8).view([b as i64, 16]),
    ));
    let inputs = dir.path().join("in.npz");
    write_npz(&inputs, &tensors);
    let cfg_json = serde_json::json!({
        "variant": format!("{:?}", p.cfg.variant),
        "image_size": p.cfg.image_size,
        "patch_size": p.cfg.patch_size,
        "embed_dim": p.cfg.embed_dim,
        "depth": p.cfg.depth,
        "num_heads": p.cfg.num_heads,
        "mlp_ratio": p.cfg.mlp_ratio,
        "norm_eps": p.cfg.norm_eps,
        "layer_scale": p.cfg.layer_scale_init.is_some(),
        "qkv_bias": p.cfg.qkv_bias,
        "head_layers": p.head_cfg.layers,
        "bn_eps": p.head_cfg.bn_eps,
        "temperature": TEMPERATURE,
    });
    let cfg_path = dir.path().join("cfg.json");
    std::fs::write(&cfg_path, cfg_json.to_string()).unwrap();
    let result = dir.path().join("out.npz");
    run_reference(
        &py,
        &[
            "model",
            inputs.to_str().unwrap(),
            result.to_str().unwrap(),
            "--config",
            cfg_path.to_str().unwrap(),
        ],
    );
    let want: HashMap<String, Tensor> = read_npz(&result);

    assert_close("weak_normalized", &xw, &want["weak_normalized"], 1e-6);
    assert_close("strong_normalized", &xs, &want["strong_normalized"], 1e-6);
    assert_close("teacher_features", &tf, &want["teacher_features"], TOL);
    assert_close("student_features", &sf, &want["student_features"], TOL);
    assert_close("teacher_proj", &tp, &want["teacher_proj"], TOL);
    assert_close("student_proj", &sp, &want["student_proj"], TOL);
    assert_close("loss", &out.loss.reshape([1]), &want["loss"], TOL);
    assert_close(
        "accuracy",
        &out.accuracy.reshape([1]),
        &want["accuracy"],
        1e-6,
    );
    let mut checked = 0;
    for (k, v) in p.student_vs.variables() {
        if !v.requires_grad() {
            continue;
        }
        let g = &want[&format!("grad.{k}")];
        assert_close(&format!("grad {k}"), &v.grad(), g, TOL);
        checked += 1;
    }
    assert_eq!(checked, p.student_vs.trainable_variables().len());
    // The teacher took no gradient.
    assert!(
        p.teacher_vs
            .trainable_variables()
            .iter()
            .all(|t| !t.grad().defined())
    );
}

#[test]
fn model_head_loss_and_grads_match_python_reference_beit() {
    reference_run(Variant::Beit);
}

#[test]
fn model_head_loss_and_grads_match_python_reference_timm() {
    reference_run(Variant::Timm);
}

#[test]
fn sgd_steps_decrease_the_loss() {
    let _rng = seeded(11);
    let p = pair(Variant::Beit);
    let (b, s) = (4usize, p.cfg.image_size as usize);
    let weak = lcg_bytes(41, b * s * s * 3);
    let strong: Vec<u8> = weak.iter().map(|&w| w.saturating_add(20)).collect();
    let xw = normalize_u8_nhwc(&weak, b, s, Device::Cpu).unwrap();
    let xs = normalize_u8_nhwc(&strong, b, s, Device::Cpu).unwrap();
    let mask = lcg_tensor(42, &[b as i64, 16], Device::Cpu).gt(-0.5); // ~75 % masked
    let n = p.cfg.num_patches();
    let target = tch::no_grad(|| {
        let f = p.teacher.0.forward_features(&xs, None, false).unwrap();
        p.teacher.1.forward_t(&f, true).unwrap().narrow(1, 1, n)
    });
    let mut opt = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&p.student_vs, 0.05)
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..6 {
        let f = p
            .student
            .0
            .forward_features(&xw, Some(&mask), true)
            .unwrap();
        let proj = p.student.1.forward_t(&f, true).unwrap();
        let out = conmim_loss(&proj.narrow(1, 1, n), &target, &mask, TEMPERATURE).unwrap();
        opt.backward_step(&out.loss);
        losses.push(out.loss.double_value(&[]));
    }
    println!("losses: {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(
        losses[5] < losses[0] - 0.05,
        "loss did not decrease: {losses:?}"
    );
}
