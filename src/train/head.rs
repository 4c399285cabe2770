//! The ConMIM projection head, applied to every token of the backbone's output (student
//! and teacher alike) and discarded after pretraining.
//!
//! Linear(D, 4096, no bias) - BN - ReLU - Linear(4096, 4096, no bias) - BN - ReLU -
//! Linear(4096, 256, no bias) - BN(no affine), as the official `_build_mlp`. BatchNorm
//! statistics are taken over all `B * (1+N)` token rows (the official code flattens
//! batch and tokens, CLS included, before the head). Build it under
//! `vs.root() / "projectors"` to get the official checkpoint names: the layers are the
//! indices of the official `nn.Sequential` —
//! `projectors.0.weight`, `projectors.1.{weight,bias,running_mean,running_var}`,
//! `projectors.3.weight`, `projectors.4.*`, `projectors.6.weight`,
//! `projectors.7.{running_mean,running_var}` (ReLUs at 2 and 5 hold no weights; tch
//! keeps no `num_batches_tracked`).

use serde::{Deserialize, Serialize};
use tch::{TchError, Tensor, nn};

use super::init::linear;

type Result<T> = std::result::Result<T, TchError>;

/// The projection head's sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// Input width (the backbone's `embed_dim`).
    pub in_dim: i64,
    /// Hidden width (4096).
    pub hidden_dim: i64,
    /// Output width (256).
    pub out_dim: i64,
    /// Linear layers (3).
    pub layers: i64,
    /// BatchNorm epsilon and running-statistics momentum (PyTorch defaults).
    pub bn_eps: f64,
    pub bn_momentum: f64,
    /// Std of the truncated-normal init of the linear weights (the official model
    /// applies its `_init_weights` to the head too).
    pub init_std: f64,
}

impl HeadConfig {
    /// The spec's head on a `in_dim`-wide backbone: 3 layers, 4096 hidden, 256 out.
    pub fn conmim(in_dim: i64) -> Self {
        HeadConfig {
            in_dim,
            hidden_dim: 4096,
            out_dim: 256,
            layers: 3,
            bn_eps: 1e-5,
            bn_momentum: 0.1,
            init_std: 0.02,
        }
    }

    /// Trainable parameters (linear weights and the affine BatchNorms).
    pub fn num_params(&self) -> i64 {
        (0..self.layers)
            .map(|l| {
                let (i, o) = self.dims(l);
                i * o + if l + 1 < self.layers { 2 * o } else { 0 }
            })
            .sum()
    }

    fn dims(&self, l: i64) -> (i64, i64) {
        let i = if l == 0 { self.in_dim } else { self.hidden_dim };
        let o = if l + 1 == self.layers {
            self.out_dim
        } else {
            self.hidden_dim
        };
        (i, o)
    }
}

/// The projection head.
#[derive(Debug)]
pub struct ProjectionHead {
    cfg: HeadConfig,
    linears: Vec<nn::Linear>,
    norms: Vec<nn::BatchNorm>,
}

impl ProjectionHead {
    pub fn new(cfg: &HeadConfig, path: nn::Path) -> Result<Self> {
        if cfg.layers < 1 || cfg.in_dim <= 0 || cfg.hidden_dim <= 0 || cfg.out_dim <= 0 {
            return Err(TchError::Shape(format!(
                "projection head: bad config {cfg:?}"
            )));
        }
        let mut linears = Vec::new();
        let mut norms = Vec::new();
        for l in 0..cfg.layers {
            let (i, o) = cfg.dims(l);
            linears.push(linear(&(&path / (3 * l)), i, o, false, cfg.init_std));
            let bn_cfg = nn::BatchNormConfig {
                eps: cfg.bn_eps,
                momentum: cfg.bn_momentum,
                affine: l + 1 < cfg.layers,
                ws_init: nn::Init::Const(1.0),
                bs_init: nn::Init::Const(0.0),
                ..Default::default()
            };
            norms.push(nn::batch_norm1d(&path / (3 * l + 1), o, bn_cfg));
        }
        Ok(ProjectionHead {
            cfg: cfg.clone(),
            linears,
            norms,
        })
    }

    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// `x`: `[B, T, in_dim]` (all tokens) or `[R, in_dim]` -> same leading shape with
    /// `out_dim`. `train = true` normalises with the batch statistics of all rows (and
    /// updates the running ones) — the mode both student and teacher use in ConMIM.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_sync(x, train, None)
    }

    /// [`ProjectionHead::forward_t`] with synchronised BatchNorm (SyncBN) when `sync`
    /// is given and `train`: the batch statistics are those of the rows of every rank
    /// of the group together (a collective: every rank calls this in the same order),
    /// and the gradient flows through them, so `W` ranks with `B / W` images each
    /// normalise, and train, as one process with all `B`. Without `sync` (or in eval
    /// mode) each process normalises with its own rows, as the official code.
    pub fn forward_sync(
        &self,
        x: &Tensor,
        train: bool,
        sync: Option<&super::dist::ProcessGroup>,
    ) -> Result<Tensor> {
        let size = x.size();
        if !(2..=3).contains(&size.len()) || size[size.len() - 1] != self.cfg.in_dim {
            return Err(TchError::Shape(format!(
                "projection head: expected [B, T, {0}] or [R, {0}], got {size:?}",
                self.cfg.in_dim
            )));
        }
        let rows: i64 = size[..size.len() - 1].iter().product();
        if train && rows < 2 {
            return Err(TchError::Shape(format!(
                "projection head: batch statistics need at least 2 rows, got {size:?}"
            )));
        }
        let mut h = x.reshape([rows, self.cfg.in_dim]);
        let last = self.linears.len() - 1;
        for (l, (lin, bn)) in self.linears.iter().zip(&self.norms).enumerate() {
            let z = h.apply(lin);
            h = match sync {
                Some(pg) if train => pg.sync_batch_norm(
                    &z,
                    bn.ws.as_ref().zip(bn.bs.as_ref()),
                    Some((&bn.running_mean, &bn.running_var)),
                    self.cfg.bn_momentum,
                    self.cfg.bn_eps,
                )?,
                _ => nn::ModuleT::forward_t(bn, &z, train),
            };
            if l < last {
                h = h.relu();
            }
        }
        let mut out = size;
        *out.last_mut().unwrap() = self.cfg.out_dim;
        Ok(h.reshape(out))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tch::{Device, Kind, Tensor, nn};

    use super::*;
    use crate::train::testing::seeded;

    #[test]
    fn names_and_sizes_match_the_official_projector() {
        let _rng = seeded(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = HeadConfig::conmim(384);
        ProjectionHead::new(&cfg, vs.root() / "projectors").unwrap();
        let got: BTreeMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.size()))
            .collect();
        let want: BTreeMap<String, Vec<i64>> = [
            ("projectors.0.weight", vec![4096, 384]),
            ("projectors.1.weight", vec![4096]),
            ("projectors.1.bias", vec![4096]),
            ("projectors.1.running_mean", vec![4096]),
            ("projectors.1.running_var", vec![4096]),
            ("projectors.3.weight", vec![4096, 4096]),
            ("projectors.4.weight", vec![4096]),
            ("projectors.4.bias", vec![4096]),
            ("projectors.4.running_mean", vec![4096]),
            ("projectors.4.running_var", vec![4096]),
            ("projectors.6.weight", vec![256, 4096]),
            ("projectors.7.running_mean", vec![256]),
            ("projectors.7.running_var", vec![256]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(got, want);
        let trainable: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(trainable, cfg.num_params());
        assert_eq!(
            cfg.num_params(),
            384 * 4096 + 4096 * 4096 + 4096 * 256 + 4 * 4096
        );
    }

    #[test]
    fn batch_statistics_over_all_token_rows() {
        let _rng = seeded(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = HeadConfig {
            hidden_dim: 64,
            out_dim: 16,
            ..HeadConfig::conmim(32)
        };
        let head = ProjectionHead::new(&cfg, vs.root()).unwrap();
        // Scale the last linear up so its raw column variances dwarf the BN epsilon.
        tch::no_grad(|| {
            let _ = vs.variables()["6.weight"]
                .shallow_clone()
                .g_mul_scalar_(20.0);
        });
        let x = Tensor::randn([3, 9, 32], (Kind::Float, Device::Cpu)) * 3.0 + 1.0;
        let y = head.forward_t(&x, true).unwrap();
        assert_eq!(y.size(), [3, 9, 16]);
        // Last BN has no affine: every output column is standardised over the 27 rows.
        let rows = y.view([27, 16]);
        let mean = rows
            .mean_dim(0, false, Kind::Float)
            .abs()
            .max()
            .double_value(&[]);
        let var = rows.var_dim(0, false, false);
        assert!(mean < 1e-5, "{mean}");
        let var_err = (var - 1.0).abs().max().double_value(&[]);
        assert!(var_err < 1e-3, "{var_err}");
        // Running statistics moved; eval mode uses them instead.
        let rm = vs.variables()["7.running_mean"]
            .abs()
            .sum(Kind::Float)
            .double_value(&[]);
        assert!(rm > 0.0);
        let e = head.forward_t(&x, false).unwrap();
        assert!(!e.allclose(&y, 1e-3, 1e-3, false));
        // Flat rows give the same as [B, T, D] in train mode.
        let flat = head.forward_t(&x.view([27, 32]), true).unwrap();
        assert!(flat.allclose(&rows, 1e-5, 1e-5, false));
    }

    #[test]
    fn shape_errors() {
        let _rng = seeded(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = HeadConfig {
            hidden_dim: 8,
            out_dim: 4,
            ..HeadConfig::conmim(6)
        };
        let head = ProjectionHead::new(&cfg, vs.root()).unwrap();
        let e = head
            .forward_t(&Tensor::zeros([2, 3, 5], (Kind::Float, Device::Cpu)), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[B, T, 6]") && e.contains("[2, 3, 5]"), "{e}");
        assert!(
            head.forward_t(&Tensor::zeros([1, 6], (Kind::Float, Device::Cpu)), true)
                .is_err()
        );
    }
}
