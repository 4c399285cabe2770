//! Weight initialisation shared by the backbone and the projection head, as the
//! official ConMIM code does it.

use tch::{Tensor, nn};

/// `erf(1 / sqrt(2))`: the probability mass of a standard normal within one standard
/// deviation of its mean.
const ERF_ONE_OVER_SQRT2: f64 = 0.682_689_492_137_085_9;

/// Fills `t` with a normal(0, `std`) truncated to `[-std, std]`, in place.
///
/// This is what the official ConMIM/BEiT pretraining code calls for every "truncated
/// normal std 0.02" (its `trunc_normal_` wrapper passes `a=-std, b=std`, i.e. the cut is
/// at ONE standard deviation, so the realised std is about 0.54 x `std`). Sampled by
/// inverse CDF on libtorch's RNG (seed with `tch::manual_seed`), like timm's
/// `trunc_normal_`.
pub fn trunc_normal_(t: &mut Tensor, std: f64) {
    tch::no_grad(|| {
        let _ = t.uniform_(-ERF_ONE_OVER_SQRT2, ERF_ONE_OVER_SQRT2);
        let _ = t.erfinv_();
        let _ = t.g_mul_scalar_(std * std::f64::consts::SQRT_2);
        let _ = t.clamp_(-std, std);
    });
}

/// Fills `t` with a normal(0, `std`) truncated to `[-2, 2]` (absolute), in place: timm's
/// `trunc_normal_(t, std=std)` with its default bounds, which the official fine-tuning
/// model (`modeling_finetune.py`) imports for its classifier head. At `std` 0.02 the cut
/// lies 100 standard deviations out, so this is a plain normal(0, `std`).
pub fn timm_trunc_normal_(t: &mut Tensor, std: f64) {
    tch::no_grad(|| {
        let _ = t.normal_(0.0, std);
        let _ = t.clamp_(-2.0, 2.0);
    });
}

/// A trainable variable `name` under `path`, truncated-normal initialised (see
/// [`trunc_normal_`]).
pub fn trunc_normal_var(path: &nn::Path, name: &str, dims: &[i64], std: f64) -> Tensor {
    let mut t = path.zeros(name, dims);
    trunc_normal_(&mut t, std);
    t
}

/// A linear layer under `path` (`weight` `[out, in]`, optional `bias` `[out]`): weight
/// truncated normal `std`, bias zero — the official `_init_weights` for `nn.Linear`.
pub fn linear(path: &nn::Path, in_dim: i64, out_dim: i64, bias: bool, std: f64) -> nn::Linear {
    let ws = trunc_normal_var(path, "weight", &[out_dim, in_dim], std);
    let bs = bias.then(|| path.zeros("bias", &[out_dim]));
    nn::Linear { ws, bs }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    #[test]
    fn trunc_normal_is_cut_at_one_std() {
        let _rng = crate::train::testing::seeded(1);
        let mut t = Tensor::zeros([200_000], (Kind::Float, Device::Cpu));
        super::trunc_normal_(&mut t, 0.02);
        let max = t.abs().max().double_value(&[]);
        assert!(max <= 0.02 + 1e-9, "max {max}");
        assert!(max > 0.0199, "max {max}");
        let mean = t.mean(Kind::Float).double_value(&[]);
        assert!(mean.abs() < 2e-4, "mean {mean}");
        // Std of a standard normal truncated to [-1, 1]: 0.5380.
        let std = t.std(true).double_value(&[]);
        assert!((std / 0.02 - 0.538).abs() < 0.01, "std {std}");
    }

    #[test]
    fn timm_trunc_normal_is_a_plain_normal_at_small_std() {
        let _rng = crate::train::testing::seeded(2);
        let mut t = Tensor::zeros([200_000], (Kind::Float, Device::Cpu));
        super::timm_trunc_normal_(&mut t, 0.02);
        let std = t.std(true).double_value(&[]);
        assert!((std / 0.02 - 1.0).abs() < 0.01, "std {std}");
        let max = t.abs().max().double_value(&[]);
        assert!(max > 0.08, "max {max}"); // beyond 4 sigma in 200,000 draws
        let mut wide = Tensor::zeros([10_000], (Kind::Float, Device::Cpu));
        super::timm_trunc_normal_(&mut wide, 10.0);
        assert!(wide.abs().max().double_value(&[]) <= 2.0);
    }
}
