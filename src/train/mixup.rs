//! Mixup / CutMix with label smoothing for fine-tuning, a port of timm's
//! `timm.data.Mixup` (timm 1.0.31, `timm/data/mixup.py`) in mode `'batch'` with
//! `correct_lam=True` and `cutmix_minmax=None`, on the training batch (tch tensors on
//! any device).
//!
//! timm's per-batch recipe, as ported here:
//! 1. with probability `prob`: choose CutMix with probability `switch_prob` (when both
//!    alphas are positive; otherwise the one that is), draw `lam ~ Beta(alpha, alpha)`
//!    of the chosen kind; otherwise `lam = 1` (no mixing);
//! 2. CutMix: a box of side `int(H * sqrt(1 - lam))` x `int(W * sqrt(1 - lam))` centred
//!    at a uniform pixel `(cy, cx)`, clipped to the image (`rand_bbox`), and `lam`
//!    corrected to `1 - box_area / (H * W)` (`cutmix_bbox_and_lam`); the box of every
//!    image is replaced by the same box of the image at the mirrored batch position
//!    (`x.flip(0)`);
//! 3. Mixup: `x = lam * x + (1 - lam) * x.flip(0)`;
//! 4. targets: smoothed one-hot `y` (off = `smoothing / num_classes`, on =
//!    `1 - smoothing + off`), mixed as `lam * y + (1 - lam) * y.flip(0)` (`mixup_target`).
//!
//! Randomness is Rust-side ([`SplitMix64`], Beta from two Marsaglia–Tsang Gamma draws),
//! so a run's mixing is a pure function of (seed, step): see [`MixupConfig::rng_for_step`].
//! The random draws and the deterministic part are split ([`MixupConfig::draw`] vs
//! [`params_from_draws`] / [`cutmix_bbox_and_lam`]) so the deterministic part is checked
//! against timm itself (`tools/reference/mixup_check.py`).

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::seed::SplitMix64;

/// Mixup/CutMix settings; the defaults are the ConMIM / BEiT fine-tuning values
/// (`timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0,
/// switch_prob=0.5, mode='batch', label_smoothing=0.1)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixupConfig {
    /// Mixup Beta(alpha, alpha) parameter; mixup is active when > 0.
    pub mixup_alpha: f64,
    /// CutMix Beta(alpha, alpha) parameter; CutMix is active when > 0.
    pub cutmix_alpha: f64,
    /// Probability of mixing a batch at all.
    pub prob: f64,
    /// Probability of CutMix instead of mixup when both are active.
    pub switch_prob: f64,
    /// Label smoothing of the (mixed) targets.
    pub label_smoothing: f64,
}

impl Default for MixupConfig {
    fn default() -> Self {
        MixupConfig {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.1,
        }
    }
}

/// The parameters of one batch's mixing: `lam` is the weight of the batch itself
/// (after timm's CutMix correction), `cutmix_box` the CutMix box `(y0, y1, x0, x1)`
/// (half-open, `x[:, :, y0:y1, x0:x1]`) or `None` for mixup / no mixing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MixupParams {
    pub lam: f64,
    pub cutmix_box: Option<(i64, i64, i64, i64)>,
}

impl MixupParams {
    /// No mixing (targets are still label-smoothed by [`apply`]).
    pub fn identity() -> Self {
        MixupParams {
            lam: 1.0,
            cutmix_box: None,
        }
    }
}

impl MixupConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("mixup_alpha", self.mixup_alpha),
            ("cutmix_alpha", self.cutmix_alpha),
        ] {
            ensure!(v.is_finite() && v >= 0.0, "mixup: {name} {v} must be >= 0");
        }
        for (name, v) in [("prob", self.prob), ("switch_prob", self.switch_prob)] {
            ensure!(
                (0.0..=1.0).contains(&v),
                "mixup: {name} {v} must be in [0, 1]"
            );
        }
        ensure!(
            (0.0..1.0).contains(&self.label_smoothing),
            "mixup: label_smoothing {} must be in [0, 1)",
            self.label_smoothing
        );
        if self.prob > 0.0 && self.mixup_alpha == 0.0 && self.cutmix_alpha == 0.0 {
            bail!(
                "mixup: prob {} > 0 needs mixup_alpha > 0 or cutmix_alpha > 0",
                self.prob
            );
        }
        Ok(())
    }

    /// The generator for training step `step` of a run seeded `seed` (its own stream,
    /// apart from the loader's).
    pub fn rng_for_step(seed: u64, step: u64) -> SplitMix64 {
        SplitMix64::new(seed ^ 0x6D69_7875_705F_6375, step) // "mixup_cu"
    }

    /// Draws one batch's parameters for images of `image_size` = (H, W), following
    /// timm's `_params_per_batch` then `cutmix_bbox_and_lam`.
    pub fn draw(&self, rng: &mut SplitMix64, image_size: (i64, i64)) -> MixupParams {
        let (h, w) = image_size;
        if uniform(rng) >= self.prob {
            return MixupParams::identity();
        }
        let (use_cutmix, raw_lam) = if self.mixup_alpha > 0.0 && self.cutmix_alpha > 0.0 {
            let c = uniform(rng) < self.switch_prob;
            let a = if c {
                self.cutmix_alpha
            } else {
                self.mixup_alpha
            };
            (c, beta(rng, a, a))
        } else if self.mixup_alpha > 0.0 {
            (false, beta(rng, self.mixup_alpha, self.mixup_alpha))
        } else if self.cutmix_alpha > 0.0 {
            (true, beta(rng, self.cutmix_alpha, self.cutmix_alpha))
        } else {
            return MixupParams::identity();
        };
        let (cy, cx) = if use_cutmix {
            (
                rng.below(h.max(1) as u64) as i64,
                rng.below(w.max(1) as u64) as i64,
            )
        } else {
            (0, 0)
        };
        params_from_draws(raw_lam, use_cutmix, image_size, (cy, cx))
    }
}

/// The deterministic part of timm's `_mix_batch`: from the raw Beta draw `raw_lam`,
/// the switch and the box centre `(cy, cx)` (timm's two `np.random.randint` draws).
pub fn params_from_draws(
    raw_lam: f64,
    use_cutmix: bool,
    image_size: (i64, i64),
    centre: (i64, i64),
) -> MixupParams {
    if raw_lam == 1.0 {
        return MixupParams::identity();
    }
    if use_cutmix {
        let (b, lam) = cutmix_bbox_and_lam(image_size, raw_lam, centre);
        MixupParams {
            lam,
            cutmix_box: Some(b),
        }
    } else {
        MixupParams {
            lam: raw_lam,
            cutmix_box: None,
        }
    }
}

/// timm's `rand_bbox` (margin 0) for the box centre `(cy, cx)`: `(yl, yh, xl, xh)`.
pub fn rand_bbox(image_size: (i64, i64), lam: f64, centre: (i64, i64)) -> (i64, i64, i64, i64) {
    let (h, w) = image_size;
    let (cy, cx) = centre;
    let ratio = (1.0 - lam).sqrt();
    // Python's int() truncates toward zero; the products are >= 0.
    let cut_h = (h as f64 * ratio) as i64;
    let cut_w = (w as f64 * ratio) as i64;
    let yl = (cy - cut_h.div_euclid(2)).clamp(0, h);
    let yh = (cy + (cut_h + 1).div_euclid(2)).clamp(0, h);
    let xl = (cx - cut_w.div_euclid(2)).clamp(0, w);
    let xh = (cx + (cut_w + 1).div_euclid(2)).clamp(0, w);
    (yl, yh, xl, xh)
}

/// timm's `cutmix_bbox_and_lam` with `correct_lam=True`: the box and
/// `1 - box_area / (H * W)`.
pub fn cutmix_bbox_and_lam(
    image_size: (i64, i64),
    lam: f64,
    centre: (i64, i64),
) -> ((i64, i64, i64, i64), f64) {
    let b @ (yl, yh, xl, xh) = rand_bbox(image_size, lam, centre);
    let area = (yh - yl) * (xh - xl);
    let lam = 1.0 - area as f64 / (image_size.0 * image_size.1) as f64;
    (b, lam)
}

/// timm's `mixup_target` (single-label): smoothed one-hot of `labels` `[B]` mixed with
/// its batch flip, `[B, num_classes]` f32 on `labels`' device.
pub fn mixup_target(labels: &Tensor, num_classes: i64, lam: f64, smoothing: f64) -> Tensor {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let idx = labels.to_kind(Kind::Int64).view([-1, 1]);
    let b = idx.size()[0];
    let mut y1 = Tensor::full([b, num_classes], off, (Kind::Float, labels.device()));
    let _ = y1.scatter_value_(1, &idx, on);
    let y2 = y1.flip([0]);
    &y1 * lam + &y2 * (1.0 - lam)
}

/// Mixes the batch `x` `[B, C, H, W]` (float, B even) in place with `p`, exactly as
/// timm's `_mix_batch`, and returns the soft targets `[B, num_classes]` (f32, on `x`'s
/// device) for `labels` `[B]` (int64 class indices).
pub fn apply(
    x: &mut Tensor,
    labels: &Tensor,
    p: &MixupParams,
    num_classes: i64,
    smoothing: f64,
) -> Result<Tensor> {
    let size = x.size();
    ensure!(
        size.len() == 4,
        "mixup: images must be [B, C, H, W], got {size:?}"
    );
    ensure!(
        x.is_floating_point(),
        "mixup: images must be float, got {:?}",
        x.kind()
    );
    let (b, h, w) = (size[0], size[2], size[3]);
    ensure!(
        b % 2 == 0,
        "mixup: batch size {b} must be even (as timm asserts)"
    );
    ensure!(
        labels.size() == [b],
        "mixup: labels must be [{b}], got {:?}",
        labels.size()
    );
    ensure!(
        matches!(
            labels.kind(),
            Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
        ),
        "mixup: labels must be integer class indices, got {:?}",
        labels.kind()
    );
    ensure!(num_classes > 0, "mixup: num_classes must be > 0");
    ensure!(
        p.lam.is_finite() && (0.0..=1.0).contains(&p.lam),
        "mixup: lam {} must be in [0, 1]",
        p.lam
    );
    if b > 0 {
        let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
        ensure!(
            lo >= 0 && hi < num_classes,
            "mixup: labels in [{lo}, {hi}] outside [0, {num_classes})"
        );
    }
    tch::no_grad(|| -> Result<()> {
        match p.cutmix_box {
            Some((y0, y1, x0, x1)) => {
                ensure!(
                    0 <= y0 && y0 <= y1 && y1 <= h && 0 <= x0 && x0 <= x1 && x1 <= w,
                    "mixup: CutMix box {:?} outside a {h}x{w} image",
                    p.cutmix_box
                );
                if y1 > y0 && x1 > x0 {
                    let src = x.flip([0]).narrow(2, y0, y1 - y0).narrow(3, x0, x1 - x0);
                    let mut dst = x.narrow(2, y0, y1 - y0).narrow(3, x0, x1 - x0);
                    dst.copy_(&src);
                }
            }
            None if p.lam == 1.0 => {}
            None => {
                let flipped = x.flip([0]) * (1.0 - p.lam);
                let _ = x.g_mul_scalar_(p.lam);
                let _ = x.g_add_(&flipped);
            }
        }
        Ok(())
    })?;
    let labels = labels.to_device(x.device());
    Ok(tch::no_grad(|| {
        mixup_target(&labels, num_classes, p.lam, smoothing)
    }))
}

/// timm's `SoftTargetCrossEntropy`: `mean_b sum_c -targets * log_softmax(logits)`.
pub fn soft_target_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    (-targets * logits.log_softmax(-1, None::<Kind>))
        .sum_dim_intlist([-1i64].as_slice(), false, None::<Kind>)
        .mean(None::<Kind>)
}

/// Uniform in [0, 1) (53 bits).
fn uniform(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Uniform in (0, 1].
fn uniform_open0(rng: &mut SplitMix64) -> f64 {
    ((rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal (Box–Muller).
fn normal(rng: &mut SplitMix64) -> f64 {
    let u1 = uniform_open0(rng);
    let u2 = uniform(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Gamma(shape, 1) by Marsaglia & Tsang (2000); shape < 1 via `G(a+1) * U^(1/a)`.
pub fn gamma(rng: &mut SplitMix64, shape: f64) -> f64 {
    assert!(shape > 0.0 && shape.is_finite(), "gamma: shape {shape}");
    if shape < 1.0 {
        let g = gamma(rng, shape + 1.0);
        return g * uniform_open0(rng).powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let z = normal(rng);
        let v = 1.0 + c * z;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = uniform_open0(rng);
        if u < 1.0 - 0.0331 * z * z * z * z || u.ln() < 0.5 * z * z + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// Beta(a, b) as `X / (X + Y)` with `X ~ Gamma(a)`, `Y ~ Gamma(b)`.
pub fn beta(rng: &mut SplitMix64, a: f64, b: f64) -> f64 {
    loop {
        let x = gamma(rng, a);
        let y = gamma(rng, b);
        let s = x + y;
        if s > 0.0 && s.is_finite() {
            return (x / s).clamp(0.0, 1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use tch::Device;

    use crate::train::testing::{lcg_tensor, max_diff, read_npz, write_npz};

    const NUM_CLASSES: i64 = 10;
    const SMOOTHING: f64 = 0.1;
    const HW: (i64, i64) = (16, 24);

    /// `$CONMIM_PYTHON`, or a panic saying how to get it (this comparison is required).
    fn python_or_fail(test: &str) -> PathBuf {
        match std::env::var_os("CONMIM_PYTHON") {
            Some(p) if Path::new(&p).exists() => PathBuf::from(p),
            other => panic!(
                "{test}: needs Python with torch + timm for the timm reference: CONMIM_PYTHON \
                 is {other:?} (unset or missing). Run `source tools/env.sh` (tools/setup.sh \
                 builds the venv) and rerun."
            ),
        }
    }

    /// A float the script wrote as its Python repr() string (parsed exactly).
    fn exact_f64(v: &serde_json::Value) -> f64 {
        v.as_str().expect("repr string").parse().expect("float")
    }

    /// The batch cases: (raw Beta lam, use_cutmix, cy, cx).
    fn batch_cases() -> Vec<(f64, bool, i64, i64)> {
        vec![
            (0.3, false, 0, 0),
            (0.8512345678901234, false, 0, 0),
            (1.0, false, 0, 0),  // no mixing: targets only smoothed
            (0.4, true, 5, 10),  // interior box
            (0.1, true, 0, 23),  // clipped at the top-right corner
            (0.0, true, 8, 12),  // the whole image
            (0.999, true, 3, 3), // box of side 0: lam corrected to 1
            (0.62, true, 15, 0), // clipped at the bottom-left
            (0.0123, false, 0, 0),
        ]
    }

    fn bbox_cases() -> Vec<(i64, i64, f64, i64, i64)> {
        let mut rng = SplitMix64::new(5, 5);
        let mut v = Vec::new();
        for (h, w) in [(224i64, 224i64), (16, 24), (7, 5), (1, 1), (384, 384)] {
            for lam in [0.0, 0.13, 0.25, 0.5, 0.7777, 0.999, 1.0] {
                for _ in 0..3 {
                    v.push((
                        h,
                        w,
                        lam,
                        rng.below(h as u64) as i64,
                        rng.below(w as u64) as i64,
                    ));
                }
                v.push((h, w, lam, 0, 0));
                v.push((h, w, lam, h - 1, w - 1));
            }
            for _ in 0..10 {
                let lam = beta(&mut rng, 1.0, 1.0);
                v.push((
                    h,
                    w,
                    lam,
                    rng.below(h as u64) as i64,
                    rng.below(w as u64) as i64,
                ));
            }
        }
        v
    }

    fn inputs() -> (Tensor, Tensor, Tensor) {
        let x = lcg_tensor(11, &[6, 3, HW.0, HW.1], Device::Cpu);
        let labels = Tensor::from_slice(&[3i64, 7, 0, 3, 9, 1]);
        let logits = lcg_tensor(12, &[6, NUM_CLASSES], Device::Cpu) * 3.0;
        (x, labels, logits)
    }

    #[test]
    fn issue5_mixup_cutmix_matches_timm() {
        let test = "issue5_mixup_cutmix_matches_timm";
        let py = python_or_fail(test);
        let dir = tempfile::tempdir().unwrap();
        let (x, labels, logits) = inputs();
        let input = dir.path().join("in.npz");
        write_npz(
            &input,
            &[
                ("x".into(), x.shallow_clone()),
                ("target".into(), labels.shallow_clone()),
                ("logits".into(), logits.shallow_clone()),
            ],
        );
        let cases = batch_cases();
        let bboxes = bbox_cases();
        let spec = serde_json::json!({
            "num_classes": NUM_CLASSES,
            "smoothing": SMOOTHING,
            "batch": cases.iter().map(|&(lam, c, cy, cx)| serde_json::json!(
                {"lam": lam, "use_cutmix": c, "cy": cy, "cx": cx})).collect::<Vec<_>>(),
            "bbox": bboxes.iter().map(|&(h, w, lam, cy, cx)| serde_json::json!(
                [h, w, lam, cy, cx])).collect::<Vec<_>>(),
        });
        let spec_path = dir.path().join("cases.json");
        std::fs::write(&spec_path, spec.to_string()).unwrap();
        let out = dir.path().join("out.npz");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/reference/mixup_check.py");
        let run = Command::new(&py)
            .arg(&script)
            .arg(&spec_path)
            .arg(&input)
            .arg(&out)
            .output()
            .unwrap_or_else(|e| panic!("{test}: cannot run {}: {e}", py.display()));
        assert!(
            run.status.success(),
            "{test}: {} failed (does {} have torch + timm? run tools/setup.sh):\n{}\n{}",
            script.display(),
            py.display(),
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        let result: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let want = read_npz(&out);

        // rand_bbox + lam correction: exact.
        let got_bbox = result["bbox"].as_array().unwrap();
        assert_eq!(got_bbox.len(), bboxes.len());
        for (&(h, w, lam, cy, cx), t) in bboxes.iter().zip(got_bbox) {
            let t = t.as_array().unwrap();
            let ((yl, yh, xl, xh), l2) = cutmix_bbox_and_lam((h, w), lam, (cy, cx));
            let tb: Vec<i64> = t[..4].iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(
                vec![yl, yh, xl, xh],
                tb,
                "box for h={h} w={w} lam={lam} cy={cy} cx={cx}"
            );
            assert_eq!(l2, exact_f64(&t[4]), "lam for h={h} w={w} lam={lam}");
        }

        // The whole batch mix + targets (+ SoftTargetCrossEntropy) per case, on the CPU
        // and, where present, on CUDA.
        let mut devices = vec![Device::Cpu];
        if tch::Cuda::is_available() {
            devices.push(Device::Cuda(0));
        }
        let lams = result["batch_lam"].as_array().unwrap();
        for (i, &(raw, c, cy, cx)) in cases.iter().enumerate() {
            let p = params_from_draws(raw, c, HW, (cy, cx));
            assert_eq!(p.lam, exact_f64(&lams[i]), "case {i}: lam");
            for &dev in &devices {
                // A deep copy: to_device on the same device aliases x.
                let mut xm = x.to_device(dev).copy();
                let t = apply(&mut xm, &labels.to_device(dev), &p, NUM_CLASSES, SMOOTHING).unwrap();
                assert_eq!(t.device(), dev);
                let (dx, _) = max_diff(&xm, &want[&format!("x_{i}")]);
                let (dt, _) = max_diff(&t, &want[&format!("t_{i}")]);
                assert!(dx < 1e-6, "case {i} on {dev:?}: images differ by {dx}");
                assert!(dt < 1e-6, "case {i} on {dev:?}: targets differ by {dt}");
                let loss = soft_target_cross_entropy(&logits.to_device(dev), &t).view([1]);
                let (dl, _) = max_diff(&loss, &want[&format!("loss_{i}")]);
                assert!(dl < 1e-5, "case {i} on {dev:?}: loss differs by {dl}");
            }
        }
    }

    #[test]
    fn label_mixing_rows_sum_to_one_and_smoothing_is_exact() {
        let labels = Tensor::from_slice(&[2i64, 5, 5, 0]);
        let n = 8i64;
        let (on, off) = ((1.0 - 0.1 + 0.1 / 8.0) as f32, (0.1 / 8.0) as f32);
        let t = mixup_target(&labels, n, 1.0, 0.1);
        let v: Vec<f32> = Vec::try_from(t.view([-1])).unwrap();
        for (r, &l) in [2usize, 5, 5, 0].iter().enumerate() {
            for c in 0..n as usize {
                let want = if c == l { on } else { off };
                assert_eq!(v[r * n as usize + c], want, "row {r} col {c}");
            }
        }
        for lam in [0.0, 0.25, 0.5, 0.731, 1.0] {
            for smoothing in [0.0, 0.1, 0.3] {
                let t = mixup_target(&labels, n, lam, smoothing);
                let sums: Vec<f32> =
                    Vec::try_from(t.sum_dim_intlist([1i64].as_slice(), false, None::<Kind>))
                        .unwrap();
                for s in sums {
                    assert!(
                        (s - 1.0).abs() < 1e-6,
                        "row sum {s} (lam {lam}, smoothing {smoothing})"
                    );
                }
                let off = smoothing / n as f64;
                let on = 1.0 - smoothing + off;
                // Row 0 (label 2) mixes with row 3 (label 0).
                let r0: Vec<f32> = Vec::try_from(t.get(0)).unwrap();
                assert!((r0[2] as f64 - (lam * on + (1.0 - lam) * off)).abs() < 1e-7);
                assert!((r0[0] as f64 - (lam * off + (1.0 - lam) * on)).abs() < 1e-7);
                assert!((r0[7] as f64 - off).abs() < 1e-7);
                // Rows 1 and 2 have the same label: mixing leaves the smoothed one-hot.
                let r1: Vec<f32> = Vec::try_from(t.get(1)).unwrap();
                assert!((r1[5] as f64 - on).abs() < 1e-7);
            }
        }
        // Through apply: the images are untouched by the identity params.
        let mut x = Tensor::ones([4, 1, 2, 2], (Kind::Float, Device::Cpu));
        let t = apply(&mut x, &labels, &MixupParams::identity(), n, 0.1).unwrap();
        assert_eq!(t.size(), [4, n]);
        assert_eq!(x.sum(Kind::Float).double_value(&[]), 16.0);
    }

    #[test]
    fn draws_have_timm_distribution_and_are_seeded() {
        let cfg = MixupConfig::default();
        cfg.validate().unwrap();
        let mut rng = MixupConfig::rng_for_step(42, 0);
        let n = 40_000;
        let (mut ncut, mut mix_lams, mut cut_lams) = (0usize, Vec::new(), Vec::new());
        for _ in 0..n {
            let p = cfg.draw(&mut rng, (224, 224));
            assert!((0.0..=1.0).contains(&p.lam));
            match p.cutmix_box {
                Some((y0, y1, x0, x1)) => {
                    ncut += 1;
                    assert!(0 <= y0 && y0 <= y1 && y1 <= 224 && 0 <= x0 && x0 <= x1 && x1 <= 224);
                    let area = ((y1 - y0) * (x1 - x0)) as f64;
                    assert_eq!(p.lam, 1.0 - area / (224.0 * 224.0));
                    cut_lams.push(p.lam);
                }
                None => mix_lams.push(p.lam),
            }
        }
        let frac = ncut as f64 / n as f64;
        assert!((frac - 0.5).abs() < 0.015, "cutmix fraction {frac}");
        let stats = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
            (m, var)
        };
        // Beta(0.8, 0.8): mean 0.5, variance 0.64 / (2.56 * 2.6) = 0.09615.
        let (m, var) = stats(&mix_lams);
        assert!((m - 0.5).abs() < 0.01, "mixup lam mean {m}");
        assert!(
            (var - 0.64 / (2.56 * 2.6)).abs() < 0.004,
            "mixup lam variance {var}"
        );
        // CutMix after correction: clipping only shrinks the box, so the mean is > 0.5.
        let (m, _) = stats(&cut_lams);
        assert!(m > 0.5 && m < 0.75, "cutmix lam mean {m}");

        // Beta and Gamma themselves.
        let mut rng = SplitMix64::new(1, 2);
        for (a, b) in [(0.8, 0.8), (1.0, 1.0), (0.3, 2.0), (2.5, 0.7)] {
            let v: Vec<f64> = (0..40_000).map(|_| beta(&mut rng, a, b)).collect();
            let (m, var) = stats(&v);
            let (wm, wv) = (a / (a + b), a * b / ((a + b) * (a + b) * (a + b + 1.0)));
            assert!((m - wm).abs() < 0.01, "Beta({a},{b}) mean {m} vs {wm}");
            assert!(
                (var - wv).abs() < 0.1 * wv + 0.002,
                "Beta({a},{b}) var {var} vs {wv}"
            );
        }
        for k in [0.2, 0.8, 1.0, 3.7] {
            let v: Vec<f64> = (0..40_000).map(|_| gamma(&mut rng, k)).collect();
            let (m, var) = stats(&v);
            assert!((m - k).abs() < 0.03 * k.max(1.0), "Gamma({k}) mean {m}");
            assert!((var - k).abs() < 0.1 * k.max(1.0), "Gamma({k}) var {var}");
        }

        // Seeded: (seed, step) decides everything.
        let draw = |seed, step| {
            let mut r = MixupConfig::rng_for_step(seed, step);
            (0..20)
                .map(|_| cfg.draw(&mut r, (224, 224)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 3), draw(7, 3));
        assert_ne!(draw(7, 3), draw(7, 4));
        assert_ne!(draw(7, 3), draw(8, 3));

        // prob 0: never mixes; one alpha only: always that kind.
        let off = MixupConfig {
            prob: 0.0,
            ..cfg.clone()
        };
        let mut r = SplitMix64::new(3, 3);
        assert!((0..100).all(|_| off.draw(&mut r, (8, 8)) == MixupParams::identity()));
        let cut_only = MixupConfig {
            mixup_alpha: 0.0,
            ..cfg.clone()
        };
        assert!((0..100).all(|_| cut_only.draw(&mut r, (8, 8)).cutmix_box.is_some()));
        let mix_only = MixupConfig {
            cutmix_alpha: 0.0,
            ..cfg.clone()
        };
        assert!((0..100).all(|_| mix_only.draw(&mut r, (8, 8)).cutmix_box.is_none()));
    }

    #[test]
    fn config_defaults_and_validation() {
        let c: MixupConfig = toml::from_str("").unwrap();
        assert_eq!(c, MixupConfig::default());
        assert_eq!(
            (
                c.mixup_alpha,
                c.cutmix_alpha,
                c.prob,
                c.switch_prob,
                c.label_smoothing
            ),
            (0.8, 1.0, 1.0, 0.5, 0.1)
        );
        c.validate().unwrap();
        assert!(toml::from_str::<MixupConfig>("mixup_alfa = 1.0").is_err());
        for bad in [
            MixupConfig {
                prob: 1.5,
                ..c.clone()
            },
            MixupConfig {
                switch_prob: -0.1,
                ..c.clone()
            },
            MixupConfig {
                label_smoothing: 1.0,
                ..c.clone()
            },
            MixupConfig {
                mixup_alpha: -1.0,
                ..c.clone()
            },
            MixupConfig {
                mixup_alpha: 0.0,
                cutmix_alpha: 0.0,
                ..c.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        MixupConfig {
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            prob: 0.0,
            ..c
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn apply_rejects_bad_inputs_and_soft_ce_matches_hard_ce() {
        let labels = Tensor::from_slice(&[1i64, 2]);
        let p = MixupParams {
            lam: 0.5,
            cutmix_box: None,
        };
        let mut odd = Tensor::zeros([3, 1, 2, 2], (Kind::Float, Device::Cpu));
        assert!(apply(&mut odd, &Tensor::from_slice(&[0i64, 1, 2]), &p, 3, 0.1).is_err());
        let mut x = Tensor::zeros([2, 1, 2, 2], (Kind::Float, Device::Cpu));
        assert!(apply(&mut x, &Tensor::from_slice(&[0i64, 5]), &p, 3, 0.1).is_err());
        let bad_box = MixupParams {
            lam: 0.5,
            cutmix_box: Some((0, 3, 0, 1)),
        };
        assert!(apply(&mut x, &labels, &bad_box, 3, 0.1).is_err());
        assert!(apply(&mut x, &labels, &p, 3, 0.1).is_ok());

        let logits = lcg_tensor(3, &[4, 7], Device::Cpu) * 2.0;
        let y = Tensor::from_slice(&[0i64, 6, 3, 3]);
        let hard = logits.cross_entropy_for_logits(&y).double_value(&[]);
        let soft =
            soft_target_cross_entropy(&logits, &mixup_target(&y, 7, 1.0, 0.0)).double_value(&[]);
        assert!((hard - soft).abs() < 1e-6, "{hard} vs {soft}");
    }
}
