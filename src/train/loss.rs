//! The ConMIM loss: intra-image, inter-patch InfoNCE over the masked positions.
//!
//! For image `b` and every masked position `j`, with `q` the student's and `k` the
//! teacher's L2-normalised projections of the PATCH tokens (CLS excluded):
//!
//! ```text
//! l_bj = -log( exp(<q_j, k_j> / t) / sum_{i=1..N} exp(<q_j, k_i> / t) )
//! ```
//!
//! The negatives are all the other patches of the SAME image, masked or not; `t` = 0.1.
//! The loss is the mean of `l_bj` over all masked tokens of the batch (the official
//! `CrossEntropyLoss` on `logits[bool_masked_pos]` with target = own position).
//! It is computed here as `logsumexp(row) - diagonal` weighted by the mask, which is the
//! same number without the boolean gather (no device-to-host sync on CUDA).

use tch::{Kind, TchError, Tensor};

type Result<T> = std::result::Result<T, TchError>;

/// The paper's temperature.
pub const TEMPERATURE: f64 = 0.1;

/// `x / max(||x||_2, 1e-12)` along the last dimension (PyTorch's `F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
    x / norm.clamp_min(1e-12)
}

/// The loss and a cheap diagnostic.
#[derive(Debug)]
pub struct LossOutput {
    /// Scalar f32 loss (with the student's graph attached).
    pub loss: Tensor,
    /// Scalar f32, no grad: fraction of masked positions whose most similar teacher
    /// patch is their own position (top-1 of the InfoNCE rows).
    pub accuracy: Tensor,
    /// Scalar f32, no grad: number of masked positions in the batch.
    pub masked: Tensor,
}

/// ConMIM's loss from the projection head's outputs for the PATCH tokens (drop CLS
/// first: `x.narrow(1, 1, N)`): `student` `[B, N, C]` (masked view, with grad),
/// `teacher` `[B, N, C]` (full view; detached here: stop-grad), `mask` Bool `[B, N]`
/// (true = masked). Both are L2-normalised here (in f32, whatever their kind).
/// A batch with nothing masked gives loss 0 (the mean over an empty set is taken as
/// 0 rather than NaN); the trainer should treat that as a bug in the mask plumbing.
pub fn conmim_loss(
    student: &Tensor,
    teacher: &Tensor,
    mask: &Tensor,
    temperature: f64,
) -> Result<LossOutput> {
    let s = student.size();
    if s.len() != 3 || teacher.size() != s {
        return Err(TchError::Shape(format!(
            "conmim loss: student and teacher must both be [B, N, C] patch-token projections, \
             got {s:?} and {:?}",
            teacher.size()
        )));
    }
    if mask.size() != s[..2] || mask.kind() != Kind::Bool {
        return Err(TchError::Shape(format!(
            "conmim loss: mask must be Bool [B, N] = {:?}, got {:?} {:?} (drop the CLS token \
             from the features: x.narrow(1, 1, N))",
            &s[..2],
            mask.kind(),
            mask.size()
        )));
    }
    if temperature <= 0.0 {
        return Err(TchError::Shape(format!(
            "conmim loss: temperature {temperature} must be > 0"
        )));
    }
    let q = l2_normalize(&student.to_kind(Kind::Float));
    let k = l2_normalize(&teacher.detach().to_kind(Kind::Float));
    let logits = q.matmul(&k.transpose(1, 2)) / temperature; // [B, N(query), N(key)]
    let per_token = logits.logsumexp([-1i64].as_slice(), false) - logits.diagonal(0, 1, 2);
    let w = mask.to_kind(Kind::Float);
    let masked = w.sum(Kind::Float);
    let denom = masked.clamp_min(1.0);
    let loss = (per_token * &w).sum(Kind::Float) / &denom;
    let accuracy = tch::no_grad(|| {
        let n = s[1];
        let own = Tensor::arange(n, (Kind::Int64, logits.device()));
        let hit = logits
            .argmax(-1, false)
            .eq_tensor(&own)
            .to_kind(Kind::Float);
        (hit * &w).sum(Kind::Float) / &denom
    });
    Ok(LossOutput {
        loss,
        accuracy,
        masked: masked.detach(),
    })
}

#[cfg(test)]
mod tests {
    use tch::{Device, IndexOp, Kind, Tensor};

    use super::*;
    use crate::train::testing::{lcg_tensor, lcg_values};

    /// The spec's formula, spelled out with loops over images and masked positions.
    fn naive(student: &Tensor, teacher: &Tensor, mask: &Tensor, t: f64) -> f64 {
        let (b, n, _) = student.size3().unwrap();
        let q = l2_normalize(&student.to_kind(Kind::Double));
        let k = l2_normalize(&teacher.to_kind(Kind::Double));
        let (mut total, mut count) = (0.0, 0);
        for bi in 0..b {
            for j in 0..n {
                if !bool::try_from(mask.i((bi, j))).unwrap() {
                    continue;
                }
                let qj = q.i((bi, j));
                let sims: Vec<f64> = (0..n)
                    .map(|i| qj.dot(&k.i((bi, i))).double_value(&[]) / t)
                    .collect();
                let denom: f64 = sims.iter().map(|s| s.exp()).sum();
                total += -(sims[j as usize].exp() / denom).ln();
                count += 1;
            }
        }
        total / count as f64
    }

    fn mask_of(b: i64, n: i64, seed: u64) -> Tensor {
        lcg_tensor(seed, &[b, n], Device::Cpu).gt(0.2)
    }

    #[test]
    fn matches_the_formula() {
        let (b, n, c) = (3, 12, 8);
        let s = lcg_tensor(1, &[b, n, c], Device::Cpu) * 2.0;
        let t = lcg_tensor(2, &[b, n, c], Device::Cpu);
        let mask = mask_of(b, n, 3);
        let _ = mask.i((2, 0)).fill_(1); // make sure every image has something masked
        let got = conmim_loss(&s, &t, &mask, TEMPERATURE).unwrap();
        let want = naive(&s, &t, &mask, TEMPERATURE);
        let l = got.loss.double_value(&[]);
        assert!((l - want).abs() < 1e-5, "{l} vs {want}");
        let m = mask.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]);
        assert_eq!(got.masked.double_value(&[]), m);
        // Other temperature, still the formula.
        let got = conmim_loss(&s, &t, &mask, 0.07)
            .unwrap()
            .loss
            .double_value(&[]);
        assert!((got - naive(&s, &t, &mask, 0.07)).abs() < 1e-5);
    }

    #[test]
    fn only_masked_queries_count_but_all_patches_are_keys() {
        let (b, n, c) = (2, 9, 6);
        let s = lcg_tensor(4, &[b, n, c], Device::Cpu);
        let t = lcg_tensor(5, &[b, n, c], Device::Cpu);
        let mask = mask_of(b, n, 6);
        let base = conmim_loss(&s, &t, &mask, TEMPERATURE).unwrap().loss;
        // Changing the STUDENT at an unmasked position changes nothing.
        let (ub, uj) = (0..b * n)
            .map(|i| (i / n, i % n))
            .find(|&(bi, j)| !bool::try_from(mask.i((bi, j))).unwrap())
            .unwrap();
        let s2 = s.copy();
        let _ = s2.i((ub, uj)).fill_(3.0);
        let l2 = conmim_loss(&s2, &t, &mask, TEMPERATURE).unwrap().loss;
        assert!(l2.equal(&base));
        // Changing the TEACHER at that unmasked position changes the loss (a negative).
        let t2 = t.copy();
        let _ = t2.i((ub, uj)).fill_(3.0);
        let l3 = conmim_loss(&s, &t2, &mask, TEMPERATURE).unwrap().loss;
        assert!((l3 - &base).abs().double_value(&[]) > 1e-6);
        // Other images are no negatives: changing image 1 leaves image 0's loss alone.
        let only0 = mask.copy();
        let _ = only0.i(1).fill_(0);
        let a = conmim_loss(&s, &t, &only0, TEMPERATURE).unwrap().loss;
        let t3 = t.copy();
        let _ = t3.i(1).fill_(0.5);
        let b2 = conmim_loss(&s, &t3, &only0, TEMPERATURE).unwrap().loss;
        assert!(a.equal(&b2));
    }

    #[test]
    fn extremes() {
        let (b, n) = (2, 5);
        // All features equal: uniform softmax, loss = ln N.
        let same = Tensor::ones([b, n, 4], (Kind::Float, Device::Cpu));
        let all = Tensor::ones([b, n], (Kind::Bool, Device::Cpu));
        let out = conmim_loss(&same, &same, &all, TEMPERATURE).unwrap();
        assert!((out.loss.double_value(&[]) - (n as f64).ln()).abs() < 1e-5);
        // Orthogonal, aligned features: loss = -log(e^10 / (e^10 + (N-1))), accuracy 1.
        let eye = Tensor::eye(n, (Kind::Float, Device::Cpu)).expand([b, n, n], true);
        let out = conmim_loss(&eye, &eye, &all, TEMPERATURE).unwrap();
        let want = -(10f64.exp() / (10f64.exp() + (n - 1) as f64)).ln();
        assert!((out.loss.double_value(&[]) - want).abs() < 1e-5);
        assert_eq!(out.accuracy.double_value(&[]), 1.0);
        // Nothing masked: 0, not NaN.
        let none = Tensor::zeros([b, n], (Kind::Bool, Device::Cpu));
        let out = conmim_loss(&eye, &eye, &none, TEMPERATURE).unwrap();
        assert_eq!(out.loss.double_value(&[]), 0.0);
    }

    #[test]
    fn gradient_reaches_the_student_only() {
        let s = lcg_tensor(7, &[2, 6, 4], Device::Cpu).set_requires_grad(true);
        let t = lcg_tensor(8, &[2, 6, 4], Device::Cpu).set_requires_grad(true);
        let out = conmim_loss(&s, &t, &mask_of(2, 6, 9), TEMPERATURE).unwrap();
        out.loss.backward();
        assert!(s.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(!t.grad().defined());
        assert!(!out.accuracy.requires_grad());
    }

    #[test]
    fn shape_errors() {
        let x = Tensor::zeros([2, 5, 4], (Kind::Float, Device::Cpu));
        let m = Tensor::zeros([2, 5], (Kind::Bool, Device::Cpu));
        let with_cls = Tensor::zeros([2, 6, 4], (Kind::Float, Device::Cpu));
        assert!(
            conmim_loss(&with_cls, &with_cls, &m, 0.1)
                .unwrap_err()
                .to_string()
                .contains("narrow")
        );
        assert!(conmim_loss(&x, &with_cls, &m, 0.1).is_err());
        assert!(conmim_loss(&x, &x, &m.to_kind(Kind::Uint8), 0.1).is_err());
        assert!(conmim_loss(&x, &x, &m, 0.0).is_err());
    }

    #[test]
    fn lcg_is_stable() {
        let v = lcg_values(42, 4);
        assert_eq!(v, lcg_values(42, 4));
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        assert_ne!(v, lcg_values(43, 4));
    }
}
