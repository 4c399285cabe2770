//! The fine-tuning run's configuration, with presets after the paper's Table 12 as the
//! spec gives it ("Fine-tuning, ImageNet-1K classification") and the official
//! `run_class_finetuning.py` defaults.
//!
//! Learning rate: `lr` is the peak learning rate for a TOTAL batch of
//! [`REFERENCE_BATCH`] = 1024 (the spec's batch; the official ViT-B command runs
//! `--batch_size 128` on 8 GPUs with `--lr 4e-3`, and the official fine-tuning script
//! does NOT rescale `lr` by the batch size). For another batch, [`FinetuneConfig::scaled_lr`]
//! scales it linearly, `lr * batch_size / 1024` (the same convention as the pretraining
//! config); at the reference batch that is the official value unchanged.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::train::optim::AdamWConfig;
use crate::train::vit::Config;

/// The total batch size the presets' learning rates are given for (spec: batch 1024).
pub const REFERENCE_BATCH: usize = 1024;
/// ImageNet-1K classes.
pub const DEFAULT_NUM_CLASSES: i64 = 1000;
/// AdamW betas (spec: (0.9, 0.999)).
pub const DEFAULT_BETAS: (f64, f64) = (0.9, 0.999);
/// AdamW epsilon (official `--opt_eps` default).
pub const DEFAULT_EPS: f64 = 1e-8;
/// Weight decay (spec: 0.05; not on 1-D parameters, biases, `cls_token`, `pos_embed`).
pub const DEFAULT_WEIGHT_DECAY: f64 = 0.05;
/// Final learning rate of the cosine schedule (spec: cosine to 1e-6).
pub const DEFAULT_MIN_LR: f64 = 1e-6;
/// Label smoothing (spec: 0.1; folded into the mixup targets when mixup is on).
pub const DEFAULT_LABEL_SMOOTHING: f64 = 0.1;
/// Mixup alpha (spec: 0.8).
pub const DEFAULT_MIXUP: f64 = 0.8;
/// CutMix alpha (spec: 1.0).
pub const DEFAULT_CUTMIX: f64 = 1.0;
/// Probability of applying mixup or cutmix to a batch (official `--mixup_prob`).
pub const DEFAULT_MIXUP_PROB: f64 = 1.0;
/// Probability of cutmix instead of mixup when both are on (official `--mixup_switch_prob`).
pub const DEFAULT_MIXUP_SWITCH_PROB: f64 = 0.5;
/// timm RandAugment policy (spec: m9 mstd0.5; official `--aa`).
pub const DEFAULT_RAND_AUGMENT: &str = "rand-m9-mstd0.5-inc1";
/// Colour jitter factor (spec: 0.4).
pub const DEFAULT_COLOR_JITTER: f64 = 0.4;
/// Random erasing probability (spec: 0.25).
pub const DEFAULT_REPROB: f64 = 0.25;
/// Scale of the classifier head's initial weight and bias (spec: 0.001).
pub const DEFAULT_HEAD_INIT_SCALE: f64 = 0.001;
/// Evaluation: bicubic resize of the shorter side to this, then a centre crop of the
/// model's image size (spec: 256 -> 224).
pub const DEFAULT_EVAL_RESIZE: i64 = 256;

/// The preset names.
pub const PRESETS: [&str; 3] = ["small", "base", "large"];

/// How the classifier pools the encoder's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean of the patch tokens, then `fc_norm` (the official fine-tuning default).
    Mean,
    /// The CLS token after `norm` (timm's `global_pool='token'`).
    Cls,
}

/// Everything a fine-tuning run is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Preset this started from (informational).
    pub preset: String,
    /// The backbone; `drop_path_rate` is the fine-tuning drop path, `num_classes` the
    /// classifier's classes, no `mask_token`.
    pub model: Config,
    pub pooling: Pooling,
    /// Scale of the head's initial weight and bias.
    pub head_init_scale: f64,
    pub epochs: u32,
    /// Linear warmup from 0, in epochs (then cosine to `min_lr`, per step).
    pub warmup_epochs: u32,
    /// Total samples per optimiser step.
    pub batch_size: usize,
    /// Peak learning rate for a total batch of [`REFERENCE_BATCH`] (scaled linearly).
    pub lr: f64,
    /// Final learning rate for a total batch of [`REFERENCE_BATCH`] (scaled the same way).
    pub min_lr: f64,
    /// Layer-wise lr decay: layer `l` of `depth + 2` gets `layer_decay^(depth + 1 - l)`.
    pub layer_decay: f64,
    pub optim: AdamWConfig,
    /// Global gradient-norm clip; `None` = off (the official default).
    pub clip_grad: Option<f64>,
    pub label_smoothing: f64,
    /// Mixup alpha; 0 = off.
    pub mixup: f64,
    /// CutMix alpha; 0 = off.
    pub cutmix: f64,
    pub mixup_prob: f64,
    pub mixup_switch_prob: f64,
    /// timm RandAugment policy string; empty = off.
    pub rand_augment: String,
    /// Colour jitter (brightness, contrast, saturation) strength; applied only when
    /// `rand_augment` is off, as timm's `create_transform` (so not by default).
    pub color_jitter: f64,
    /// Random erasing probability.
    pub reprob: f64,
    /// Evaluation resize (shorter side, bicubic) before the centre crop.
    pub eval_resize: i64,
    /// Seed of the head init, drop path, augmentation and data order.
    pub seed: u64,
    /// Loader threads (0 = the machine's parallelism).
    #[serde(default)]
    pub data_threads: usize,
    /// Partial fine-tuning: train only the last `k` blocks (and the norm / head above
    /// them); `None` = the whole network.
    #[serde(default)]
    pub train_last_blocks: Option<i64>,
    /// Sample shuffle buffer of the training stream.
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Corrupt training samples (and damaged shards) tolerated per process before the
    /// run stops with an error naming them; `None`: skip them all. Skipped ones are
    /// counted and named in the summary either way. (Evaluation skips none.)
    #[serde(default)]
    pub max_errors: Option<u64>,
}

fn default_shuffle_buffer() -> usize {
    crate::stream::DEFAULT_SHUFFLE_BUFFER
}

impl FinetuneConfig {
    /// `small`, `base`, `large`: the spec's Table 12 values.
    ///
    /// | preset | epochs | warmup | layer decay | drop path | lr (batch 1024) |
    /// |--------|--------|--------|-------------|-----------|-----------------|
    /// | small  | 200    | 5      | 0.8         | 0.1       | 4e-3 (*)        |
    /// | base   | 100    | 20     | 0.65        | 0.1       | 4e-3            |
    /// | large  | 50     | 5      | 0.75        | 0.2       | 2e-3 (*)        |
    ///
    /// (*) The spec gives only the sweep range {1e-3..5e-3}; 4e-3 for base is the
    /// official README's command. The small and large values are picks inside that range,
    /// not taken from the paper.
    pub fn preset(name: &str) -> Result<Self> {
        let (model, epochs, warmup_epochs, layer_decay, drop_path, lr) = match name {
            "small" => (Config::vit_small(), 200, 5, 0.8, 0.1, 4e-3),
            "base" => (Config::vit_base(), 100, 20, 0.65, 0.1, 4e-3),
            "large" => (Config::vit_large(), 50, 5, 0.75, 0.2, 2e-3),
            other => bail!(
                "unknown fine-tuning preset `{other}` (choose one of {})",
                PRESETS.join(", ")
            ),
        };
        Ok(FinetuneConfig {
            preset: name.to_owned(),
            model: model
                .with_drop_path(drop_path)
                .with_num_classes(DEFAULT_NUM_CLASSES)
                .with_mask_token(false),
            pooling: Pooling::Mean,
            head_init_scale: DEFAULT_HEAD_INIT_SCALE,
            epochs,
            warmup_epochs,
            batch_size: REFERENCE_BATCH,
            lr,
            min_lr: DEFAULT_MIN_LR,
            layer_decay,
            optim: AdamWConfig {
                beta1: DEFAULT_BETAS.0,
                beta2: DEFAULT_BETAS.1,
                eps: DEFAULT_EPS,
                weight_decay: DEFAULT_WEIGHT_DECAY,
            },
            clip_grad: None,
            label_smoothing: DEFAULT_LABEL_SMOOTHING,
            mixup: DEFAULT_MIXUP,
            cutmix: DEFAULT_CUTMIX,
            mixup_prob: DEFAULT_MIXUP_PROB,
            mixup_switch_prob: DEFAULT_MIXUP_SWITCH_PROB,
            rand_augment: DEFAULT_RAND_AUGMENT.to_owned(),
            color_jitter: DEFAULT_COLOR_JITTER,
            reprob: DEFAULT_REPROB,
            eval_resize: DEFAULT_EVAL_RESIZE,
            seed: crate::stream::DEFAULT_SEED,
            data_threads: 0,
            train_last_blocks: None,
            shuffle_buffer: default_shuffle_buffer(),
            max_errors: None,
        })
    }

    /// Applies labelled JSON override objects in order (every key must exist; the
    /// label names the source in errors), then validates once.
    pub fn with_all_overrides(self, overrides: &[(String, serde_json::Value)]) -> Result<Self> {
        use anyhow::Context;
        let mut base = serde_json::to_value(&self)?;
        for (label, o) in overrides {
            crate::train::pretrain_config::merge(&mut base, o, "")
                .with_context(|| label.clone())?;
        }
        let cfg: FinetuneConfig =
            serde_json::from_value(base).context("config overrides do not fit")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The network this config trains: the backbone with per-block relative position
    /// bias (BEiT variant), no mask token, `num_classes` head scaled by
    /// `head_init_scale`, pooled as `pooling` says.
    pub fn net_config(&self) -> Config {
        let c = self
            .model
            .clone()
            .finetune(self.model.num_classes, self.head_init_scale);
        match self.pooling {
            Pooling::Mean => c,
            Pooling::Cls => c.with_global_pool(crate::train::vit::GlobalPool::Token),
        }
    }

    /// Checks ranges; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let unit = |key: &str, v: f64| -> Result<()> {
            if !(0.0..=1.0).contains(&v) {
                bail!("{key} {v} not in [0, 1]");
            }
            Ok(())
        };
        let non_negative = |key: &str, v: f64| -> Result<()> {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{key} {v} must be finite and >= 0");
            }
            Ok(())
        };
        if self.model.num_classes <= 0 {
            bail!(
                "model.num_classes {} must be positive for classification",
                self.model.num_classes
            );
        }
        if self.model.use_mask_token {
            bail!("model.use_mask_token must be false for fine-tuning (the mask token is dropped)");
        }
        // Keys of the backbone config that fine-tuning sets itself (`net_config`): a value
        // there would be written to config.json and change nothing.
        let d = crate::train::vit::Config::vit_small();
        if self.model.global_pool != d.global_pool {
            bail!(
                "model.global_pool is not read by fine-tuning: set pooling = \"mean\" or \"cls\""
            );
        }
        if self.model.head_init_scale != d.head_init_scale {
            bail!("model.head_init_scale is not read by fine-tuning: set head_init_scale");
        }
        if self.model.rel_pos_bias != d.rel_pos_bias {
            bail!(
                "model.rel_pos_bias is not read by fine-tuning: a BEiT-style backbone always \
                 gets one relative position bias table per block"
            );
        }
        if !(self.layer_decay.is_finite() && self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            bail!("layer_decay {} not in (0, 1]", self.layer_decay);
        }
        non_negative("lr", self.lr)?;
        non_negative("min_lr", self.min_lr)?;
        if self.min_lr > self.lr {
            bail!("min_lr {} must not exceed lr {}", self.min_lr, self.lr);
        }
        if self.batch_size == 0 {
            bail!("batch_size must be positive");
        }
        if let Some(k) = self.train_last_blocks
            && !(0..=self.model.depth).contains(&k)
        {
            bail!(
                "train_last_blocks {k} not in 0..={} (the model's depth)",
                self.model.depth
            );
        }
        if (self.mixup > 0.0 || self.cutmix > 0.0)
            && self.mixup_prob > 0.0
            && !self.batch_size.is_multiple_of(2)
        {
            bail!(
                "batch_size {} must be even with mixup/cutmix on (timm mixes a batch with its flip)",
                self.batch_size
            );
        }
        if self.epochs == 0 {
            bail!("epochs must be positive");
        }
        if self.warmup_epochs > self.epochs {
            bail!(
                "warmup_epochs {} must not exceed epochs {}",
                self.warmup_epochs,
                self.epochs
            );
        }
        if !(self.head_init_scale.is_finite() && self.head_init_scale > 0.0) {
            bail!("head_init_scale {} must be > 0", self.head_init_scale);
        }
        let o = &self.optim;
        if !((0.0..1.0).contains(&o.beta1) && (0.0..1.0).contains(&o.beta2)) {
            bail!("optim betas ({}, {}) must be in [0, 1)", o.beta1, o.beta2);
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            bail!("optim.eps {} must be > 0", o.eps);
        }
        non_negative("optim.weight_decay", o.weight_decay)?;
        if let Some(c) = self.clip_grad
            && !(c.is_finite() && c > 0.0)
        {
            bail!("clip_grad {c} must be > 0 (or null for off)");
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bail!("label_smoothing {} not in [0, 1)", self.label_smoothing);
        }
        non_negative("mixup", self.mixup)?;
        non_negative("cutmix", self.cutmix)?;
        unit("mixup_prob", self.mixup_prob)?;
        unit("mixup_switch_prob", self.mixup_switch_prob)?;
        non_negative("color_jitter", self.color_jitter)?;
        unit("reprob", self.reprob)?;
        if !(self.rand_augment.is_empty() || self.rand_augment.starts_with("rand-")) {
            bail!(
                "rand_augment `{}` must be a timm `rand-...` policy or empty",
                self.rand_augment
            );
        }
        if self.eval_resize < self.model.image_size {
            bail!(
                "eval_resize {} must be >= model.image_size {}: set eval_resize too (the \
                 official recipe resizes to 256 at 224 px and to the image size from 384 \
                 px on; `--image-size` sets it that way unless a config or --set names one)",
                self.eval_resize,
                self.model.image_size
            );
        }
        Ok(())
    }

    /// Peak learning rate for this batch size: `lr * batch_size / 1024`.
    pub fn scaled_lr(&self) -> f64 {
        self.lr * self.batch_size as f64 / REFERENCE_BATCH as f64
    }

    /// Final learning rate for this batch size: `min_lr * batch_size / 1024`.
    pub fn scaled_min_lr(&self) -> f64 {
        self.min_lr * self.batch_size as f64 / REFERENCE_BATCH as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::vit::{GlobalPool, RelPosBias};

    #[test]
    fn presets_follow_table_12() {
        // (preset, dim, depth, epochs, warmup, layer decay, drop path, lr)
        let table = [
            ("small", 384, 12, 200, 5, 0.8, 0.1, 4e-3),
            ("base", 768, 12, 100, 20, 0.65, 0.1, 4e-3),
            ("large", 1024, 24, 50, 5, 0.75, 0.2, 2e-3),
        ];
        for (name, dim, depth, epochs, warmup, ld, dp, lr) in table {
            let c = FinetuneConfig::preset(name).unwrap();
            c.validate().unwrap();
            assert_eq!(c.preset, name);
            assert_eq!((c.model.embed_dim, c.model.depth), (dim, depth), "{name}");
            assert_eq!((c.epochs, c.warmup_epochs), (epochs, warmup), "{name}");
            assert_eq!(c.layer_decay, ld, "{name}");
            assert_eq!(c.model.drop_path_rate, dp, "{name}");
            assert_eq!(c.lr, lr, "{name}");
            assert!(
                (1e-3..=5e-3).contains(&c.lr),
                "{name}: lr outside the spec's sweep"
            );
            // Shared by all sizes.
            assert_eq!(c.batch_size, 1024);
            assert_eq!(c.scaled_lr(), c.lr);
            assert_eq!(c.min_lr, 1e-6);
            assert_eq!((c.optim.beta1, c.optim.beta2), (0.9, 0.999));
            assert_eq!(c.optim.eps, 1e-8);
            assert_eq!(c.optim.weight_decay, 0.05);
            assert_eq!(c.clip_grad, None);
            assert_eq!(c.label_smoothing, 0.1);
            assert_eq!((c.mixup, c.cutmix), (0.8, 1.0));
            assert_eq!((c.mixup_prob, c.mixup_switch_prob), (1.0, 0.5));
            assert_eq!(c.rand_augment, "rand-m9-mstd0.5-inc1");
            assert_eq!(c.color_jitter, 0.4);
            assert_eq!(c.reprob, 0.25);
            assert_eq!(c.head_init_scale, 0.001);
            assert_eq!(c.pooling, Pooling::Mean);
            assert_eq!((c.eval_resize, c.model.image_size), (256, 224));
            assert_eq!(c.model.num_classes, 1000);
            assert!(!c.model.use_mask_token);
        }
        assert!(FinetuneConfig::preset("tiny").is_err());
    }

    #[test]
    fn lr_scales_linearly_with_batch() {
        let mut c = FinetuneConfig::preset("base").unwrap();
        c.batch_size = 256;
        assert!((c.scaled_lr() - 1e-3).abs() < 1e-15);
        assert!((c.scaled_min_lr() - 2.5e-7).abs() < 1e-20);
    }

    #[test]
    fn validate_rejects_bad_values() {
        type Edit = Box<dyn Fn(&mut FinetuneConfig)>;
        let good = FinetuneConfig::preset("base").unwrap();
        let cases: Vec<(&str, Edit)> = vec![
            ("layer_decay", Box::new(|c| c.layer_decay = 0.0)),
            ("layer_decay", Box::new(|c| c.layer_decay = -0.5)),
            ("layer_decay", Box::new(|c| c.layer_decay = 1.01)),
            ("layer_decay", Box::new(|c| c.layer_decay = f64::NAN)),
            ("lr", Box::new(|c| c.lr = -1e-3)),
            ("lr", Box::new(|c| c.lr = f64::INFINITY)),
            ("min_lr", Box::new(|c| c.min_lr = -1.0)),
            ("min_lr", Box::new(|c| c.min_lr = 1.0)),
            ("batch_size", Box::new(|c| c.batch_size = 0)),
            ("epochs", Box::new(|c| c.epochs = 0)),
            ("warmup_epochs", Box::new(|c| c.warmup_epochs = 101)),
            ("betas", Box::new(|c| c.optim.beta2 = 1.0)),
            ("optim.eps", Box::new(|c| c.optim.eps = 0.0)),
            (
                "optim.weight_decay",
                Box::new(|c| c.optim.weight_decay = -0.05),
            ),
            ("clip_grad", Box::new(|c| c.clip_grad = Some(0.0))),
            ("label_smoothing", Box::new(|c| c.label_smoothing = 1.0)),
            ("mixup", Box::new(|c| c.mixup = -0.8)),
            ("mixup_switch_prob", Box::new(|c| c.mixup_switch_prob = 1.5)),
            ("reprob", Box::new(|c| c.reprob = -0.1)),
            ("rand_augment", Box::new(|c| c.rand_augment = "m9".into())),
            ("head_init_scale", Box::new(|c| c.head_init_scale = 0.0)),
            ("num_classes", Box::new(|c| c.model.num_classes = 0)),
            (
                "use_mask_token",
                Box::new(|c| c.model.use_mask_token = true),
            ),
            ("eval_resize", Box::new(|c| c.eval_resize = 200)),
            ("drop_path_rate", Box::new(|c| c.model.drop_path_rate = 1.0)),
            (
                "model.global_pool",
                Box::new(|c| c.model.global_pool = GlobalPool::Mean),
            ),
            (
                "model.head_init_scale",
                Box::new(|c| c.model.head_init_scale = 0.001),
            ),
            (
                "model.rel_pos_bias",
                Box::new(|c| c.model.rel_pos_bias = RelPosBias::PerBlock),
            ),
        ];
        for (key, f) in cases {
            let mut c = good.clone();
            f(&mut c);
            let err = c.validate().expect_err(key).to_string();
            assert!(err.contains(key), "error for {key} does not name it: {err}");
        }
        // Edges that are fine: no layer decay, lr 0, no clipping, augmentations off.
        let mut c = good.clone();
        c.layer_decay = 1.0;
        c.lr = 0.0;
        c.min_lr = 0.0;
        c.mixup = 0.0;
        c.cutmix = 0.0;
        c.rand_augment.clear();
        c.validate().unwrap();
    }

    #[test]
    fn serde_round_trip_and_unknown_keys() {
        let c = FinetuneConfig::preset("large").unwrap();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["pooling"], "mean");
        let back: FinetuneConfig = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, c);
        let mut bad = v;
        bad["layer_deacy"] = serde_json::json!(0.7);
        assert!(serde_json::from_value::<FinetuneConfig>(bad).is_err());
    }
}
