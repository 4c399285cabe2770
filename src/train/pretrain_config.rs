//! The pretraining run's configuration: presets after the paper's Table 11, a JSON or
//! TOML config file of overrides (every key must exist: a typo is an error; see
//! `configs/pretrain-small.toml`), and the derived schedules and loader config.
//!
//! Learning rate: `lr` is given as in the paper, for a total batch of 2048, and scaled
//! linearly for the actual batch: `lr * batch_size / 2048` (the same for `min_lr`).
//! Warmup: `warmup_steps` when set, else `round(warmup_fraction * total_steps)` (the
//! paper's 10 warmup epochs of 300 (S) / 800 (B, L) epochs).

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::head::HeadConfig;
use super::optim::AdamWConfig;
use super::schedule::{CosineSchedule, MomentumSchedule};
use super::vit::Config;
use crate::loader::{LoaderConfig, MaskConfig, MaskKind, default_threads_per_process};
use crate::stream::StreamConfig;

/// The batch size the paper's learning rates are given for.
pub const REFERENCE_BATCH: usize = 2048;

/// Everything a pretraining run is made of (saved in every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// Preset this started from (informational).
    pub preset: String,
    pub model: Config,
    pub head: HeadConfig,
    /// Samples per step.
    pub batch_size: usize,
    /// Optimiser steps of the whole run (the schedules' length). Derived from `epochs`
    /// when that is set.
    pub total_steps: u64,
    /// The run's length in epochs of the training data, instead of `total_steps`: when
    /// set, the run fixes `total_steps = round(epochs * samples / batch_size)` from the
    /// sample count in the dataset's manifest ([`Self::resolve_epochs`]), so another
    /// batch size keeps the recipe (the lr scales, and the number of epochs and of
    /// warmup epochs stays). `--steps` clears it.
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Warmup steps; `None`: `warmup_fraction * total_steps`.
    pub warmup_steps: Option<u64>,
    pub warmup_fraction: f64,
    /// Peak learning rate for a batch of 2048 (scaled linearly to `batch_size`).
    pub lr: f64,
    /// Final learning rate for a batch of 2048 (scaled the same way).
    pub min_lr: f64,
    pub optim: AdamWConfig,
    /// Global gradient-norm clip; `None` = off.
    pub clip_grad: Option<f64>,
    /// Teacher momentum at step 0 (cosine to 1).
    pub momentum: f64,
    /// InfoNCE temperature.
    pub temperature: f64,
    /// Seed of the init, drop path and the data stream.
    pub seed: u64,
    /// Mask generator and ratio (mask patch = the model's patch).
    pub mask: MaskKind,
    pub mask_ratio: f64,
    /// Loader threads (0 = the machine's parallelism, shared among the processes
    /// torchrun runs on this node).
    pub data_threads: usize,
    /// Sample shuffle buffer.
    pub shuffle_buffer: usize,
    /// Corrupt samples tolerated (skipped, counted, named in the log and the summary)
    /// before the run stops with an error; `None` (the default) skips them all.
    #[serde(default)]
    pub max_errors: Option<u64>,
    /// Data-parallel runs: synchronised BatchNorm in the projection heads (statistics
    /// over the rows of every rank together, as `torch.nn.SyncBatchNorm`), so `W` ranks
    /// train as one process with the whole batch. Off (the default): per-rank
    /// statistics, as the official code. No effect in a single-process run.
    #[serde(default)]
    pub sync_bn: bool,
    /// The teacher's backbone runs with drop path (stochastic depth at
    /// `model.drop_path_rate`), as in the official code, whose teacher is a copy of the
    /// student kept in training mode (the spec says so of its head). `false`: the
    /// teacher runs without it. No effect when `model.drop_path_rate` is 0 (the B and L
    /// presets). Read as `false` where absent: configs (and checkpoints) written before
    /// the switch existed come from runs whose teacher ran without, so a resume of one
    /// says that this run's teacher differs.
    #[serde(default)]
    pub teacher_drop_path: bool,
}

/// [`PretrainConfig::teacher_drop_path`]'s default: the official code's behaviour.
pub const DEFAULT_TEACHER_DROP_PATH: bool = true;

/// The preset names.
pub const PRESETS: [&str; 4] = ["tiny", "small", "base", "large"];

impl PretrainConfig {
    /// `tiny` (ViT-Ti, smoke runs), `small`, `base`, `large` (paper Table 11).
    pub fn preset(name: &str) -> Result<Self> {
        let (model, lr, clip, mask, epochs) = match name {
            "tiny" => (Config::vit_tiny(), 5e-4, 3.0, MaskKind::Patch, 300.0),
            "small" => (Config::vit_small(), 5e-4, 3.0, MaskKind::Patch, 300.0),
            "base" => (Config::vit_base(), 5e-4, 3.0, MaskKind::Cell, 800.0),
            "large" => (Config::vit_large(), 7.5e-4, 1.0, MaskKind::Cell, 800.0),
            other => bail!(
                "unknown preset `{other}` (choose one of {})",
                PRESETS.join(", ")
            ),
        };
        Ok(PretrainConfig {
            preset: name.to_owned(),
            head: HeadConfig::conmim(model.embed_dim),
            model,
            batch_size: REFERENCE_BATCH,
            total_steps: 1000,
            epochs: None,
            warmup_steps: None,
            warmup_fraction: 10.0 / epochs,
            lr,
            min_lr: 1e-5,
            optim: AdamWConfig::default(),
            clip_grad: Some(clip),
            momentum: 0.996,
            temperature: super::loss::TEMPERATURE,
            seed: crate::stream::DEFAULT_SEED,
            mask,
            mask_ratio: 0.75,
            data_threads: 0,
            shuffle_buffer: crate::stream::DEFAULT_SHUFFLE_BUFFER,
            max_errors: None,
            sync_bn: false,
            teacher_drop_path: DEFAULT_TEACHER_DROP_PATH,
        })
    }

    /// Applies a JSON object of overrides (nested objects merge key by key; every key
    /// must exist in the config), then validates.
    pub fn with_overrides(self, overrides: &serde_json::Value) -> Result<Self> {
        self.with_all_overrides(&[("overrides".to_owned(), overrides.clone())])
    }

    /// Applies several labelled override objects in order (the label names the source
    /// in errors), then validates the result once.
    pub fn with_all_overrides(self, overrides: &[(String, serde_json::Value)]) -> Result<Self> {
        let mut base = serde_json::to_value(&self)?;
        for (label, o) in overrides {
            merge(&mut base, o, "").with_context(|| label.clone())?;
        }
        let cfg: PretrainConfig =
            serde_json::from_value(base).context("config overrides do not fit")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a config file of overrides: `.json` or `.toml` (by extension; the same
    /// keys and nesting as `OUT/config.json`, TOML tables for the nested objects).
    /// TOML has no null: set an optional key to "off" (e.g. `clip_grad`) in a JSON file
    /// or with `--set clip_grad=null`.
    pub fn read_overrides(path: &std::path::Path) -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let v: serde_json::Value = match ext.to_ascii_lowercase().as_str() {
            "json" => serde_json::from_str(&text)
                .with_context(|| format!("parsing config {}", path.display()))?,
            "toml" => toml::from_str(&text)
                .with_context(|| format!("parsing config {}", path.display()))?,
            _ => bail!(
                "config {}: unsupported config file type `.{ext}` (use .json or .toml)",
                path.display()
            ),
        };
        if !v.is_object() {
            bail!(
                "config {}: expected an object of overrides at the top level",
                path.display()
            );
        }
        Ok(v)
    }

    /// Reads a JSON or TOML config file of overrides over `self`.
    pub fn with_file(self, path: &std::path::Path) -> Result<Self> {
        let v = Self::read_overrides(path)?;
        self.with_all_overrides(&[(format!("config {}", path.display()), v)])
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.head.in_dim != self.model.embed_dim {
            bail!(
                "head.in_dim {} must equal model.embed_dim {}",
                self.head.in_dim,
                self.model.embed_dim
            );
        }
        if self.batch_size == 0 {
            bail!("batch_size must be positive");
        }
        if self.total_steps == 0 {
            bail!("total_steps must be positive");
        }
        if let Some(e) = self.epochs
            && !(e.is_finite() && e > 0.0)
        {
            bail!("epochs {e} must be a positive number (or null: the run is total_steps long)");
        }
        if !(0.0..=1.0).contains(&self.warmup_fraction) {
            bail!("warmup_fraction {} not in [0, 1]", self.warmup_fraction);
        }
        if !(self.lr.is_finite() && self.lr >= 0.0 && self.min_lr.is_finite() && self.min_lr >= 0.0)
        {
            bail!(
                "lr {} / min_lr {} must be finite and >= 0",
                self.lr,
                self.min_lr
            );
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            bail!("momentum {} not in [0, 1]", self.momentum);
        }
        if self.temperature <= 0.0 {
            bail!("temperature must be > 0");
        }
        if !self.model.use_mask_token {
            bail!("model.use_mask_token must be true for pretraining");
        }
        // Parameters the pretraining forward never uses: no gradient ever reaches them,
        // which under torchrun stalls the gradient all-reduce (DDP without
        // find_unused_parameters). Fine-tuning builds its own classifier.
        if self.model.num_classes != 0 {
            bail!(
                "model.num_classes must be 0 for pretraining (got {}): the classifier head \
                 is unused there; `conmim finetune` adds its own",
                self.model.num_classes
            );
        }
        if self.model.global_pool != super::vit::GlobalPool::Token {
            bail!(
                "model.global_pool must be \"token\" for pretraining: mean pooling's fc_norm \
                 is unused there (`conmim finetune` pools its own way)"
            );
        }
        Ok(())
    }

    /// With `epochs` set, fixes `total_steps` for a training set of `samples` (the
    /// manifest's count of `data`; `None` when its shards do not give one):
    /// `round(epochs * samples / batch_size)`, at least 1. Returns what it did, for the
    /// log; `None` without `epochs`.
    pub fn resolve_epochs(&mut self, samples: Option<u64>, data: &str) -> Result<Option<String>> {
        let Some(epochs) = self.epochs else {
            return Ok(None);
        };
        let Some(n) = samples.filter(|&n| n > 0) else {
            bail!(
                "epochs = {epochs} needs the number of training samples, and {data} does not \
                 give it (a dataset directory or manifest of conmim-shard does; a list of \
                 shard files does not): set the run's length in steps instead (--steps N, \
                 or total_steps = N in the config)"
            );
        };
        let steps = (epochs * n as f64 / self.batch_size as f64)
            .round()
            .max(1.0);
        if steps > u64::MAX as f64 / 2.0 {
            bail!("epochs = {epochs} of {n} samples is too many steps");
        }
        self.total_steps = steps as u64;
        Ok(Some(format!(
            "{epochs} epochs of {n} samples at batch {}: {} steps ({} of warmup)",
            self.batch_size,
            self.total_steps,
            self.warmup()
        )))
    }

    /// The peak learning rate for this batch size: `lr * batch_size / 2048`.
    pub fn scaled_lr(&self) -> f64 {
        self.lr * self.batch_size as f64 / REFERENCE_BATCH as f64
    }

    pub fn scaled_min_lr(&self) -> f64 {
        self.min_lr * self.batch_size as f64 / REFERENCE_BATCH as f64
    }

    pub fn warmup(&self) -> u64 {
        self.warmup_steps
            .unwrap_or((self.warmup_fraction * self.total_steps as f64).round() as u64)
            .min(self.total_steps)
    }

    pub fn lr_schedule(&self) -> CosineSchedule {
        CosineSchedule {
            peak: self.scaled_lr(),
            final_value: self.scaled_min_lr(),
            total_steps: self.total_steps,
            warmup_steps: self.warmup(),
            warmup_start: 0.0,
        }
    }

    pub fn momentum_schedule(&self) -> MomentumSchedule {
        MomentumSchedule {
            base: self.momentum,
            total_steps: self.total_steps,
        }
    }

    /// The loader config of this run: ConMIM views at the model's image size, masks on
    /// its patch grid, endless epochs, full batches only.
    pub fn loader_config(&self) -> LoaderConfig {
        LoaderConfig {
            stream: StreamConfig {
                seed: self.seed,
                shuffle_buffer: self.shuffle_buffer,
                epochs: None,
                ..Default::default()
            },
            threads: if self.data_threads == 0 {
                default_threads_per_process()
            } else {
                self.data_threads
            },
            batch_size: self.batch_size,
            drop_last: true,
            image_size: self.model.image_size as u32,
            mask: MaskConfig {
                kind: self.mask,
                patch_size: self.model.patch_size as u32,
                ratio: self.mask_ratio,
                ..MaskConfig::default()
            },
            max_errors: self.max_errors,
            ..Default::default()
        }
    }
}

pub(crate) fn merge(
    base: &mut serde_json::Value,
    over: &serde_json::Value,
    path: &str,
) -> Result<()> {
    use serde_json::Value;
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v, &here)?,
                    None => {
                        let known: Vec<&String> = b.keys().collect();
                        bail!("unknown config key `{here}` (known here: {known:?})")
                    }
                }
            }
            Ok(())
        }
        (slot, v) => {
            *slot = v.clone();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_follow_table_11() {
        let s = PretrainConfig::preset("small").unwrap();
        assert_eq!(s.model.embed_dim, 384);
        assert_eq!(s.model.drop_path_rate, 0.1);
        assert_eq!(s.clip_grad, Some(3.0));
        assert_eq!(s.mask, MaskKind::Patch);
        assert_eq!(
            (s.optim.beta1, s.optim.beta2, s.optim.weight_decay),
            (0.9, 0.98, 0.05)
        );
        let l = PretrainConfig::preset("large").unwrap();
        assert_eq!(l.lr, 7.5e-4);
        assert_eq!(l.clip_grad, Some(1.0));
        assert_eq!(l.model.layer_scale_init, Some(1e-5));
        assert_eq!(l.mask, MaskKind::Cell);
        let b = PretrainConfig::preset("base").unwrap();
        assert_eq!(b.model.drop_path_rate, 0.0);
        assert_eq!(b.head.hidden_dim, 4096);
        for p in PRESETS {
            PretrainConfig::preset(p).unwrap().validate().unwrap();
        }
        let e = PretrainConfig::preset("huge").unwrap_err().to_string();
        assert!(e.contains("unknown preset"), "{e}");
    }

    #[test]
    fn lr_scales_linearly_with_batch() {
        let mut c = PretrainConfig::preset("small").unwrap();
        c.batch_size = 256;
        assert!((c.scaled_lr() - 5e-4 / 8.0).abs() < 1e-18);
        c.total_steps = 3000;
        assert_eq!(c.warmup(), 100);
        assert_eq!(c.lr_schedule().at(99), c.scaled_lr());
    }

    #[test]
    fn overrides_merge_and_reject_unknown_keys() {
        let c = PretrainConfig::preset("tiny").unwrap();
        let o = serde_json::json!({"batch_size": 64, "model": {"image_size": 64}, "optim": {"eps": 1e-6}});
        let c2 = c.clone().with_overrides(&o).unwrap();
        assert_eq!(c2.batch_size, 64);
        assert_eq!(c2.model.image_size, 64);
        assert_eq!(c2.model.embed_dim, 192);
        assert_eq!(c2.optim.eps, 1e-6);
        let e = c
            .clone()
            .with_overrides(&serde_json::json!({"model": {"imagesize": 64}}))
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("unknown config key `model.imagesize`"), "{e}");
        let e = c
            .with_overrides(&serde_json::json!({"model": {"image_size": 65}}))
            .unwrap_err();
        assert!(format!("{e:#}").contains("multiple"), "{e:#}");
    }

    fn repo_file(rel: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    #[test]
    fn sample_toml_config_is_small_with_the_paper_schedule() {
        let path = repo_file("configs/pretrain-small.toml");
        let got = PretrainConfig::preset("small")
            .unwrap()
            .with_file(&path)
            .unwrap();
        let mut want = PretrainConfig::preset("small").unwrap();
        want.batch_size = 2048;
        want.epochs = Some(300.0);
        want.lr = 5e-4;
        want.min_lr = 1e-5;
        want.model.drop_path_rate = 0.1;
        want.optim.weight_decay = 0.05;
        assert_eq!(got, want);
        // The file holds only overrides (a partial config), not a whole one.
        let v = PretrainConfig::read_overrides(&path).unwrap();
        assert!(v.get("head").is_none() && v.get("seed").is_none(), "{v}");
        assert_eq!(v["epochs"], 300);
        // The paper's 300 epochs of ImageNet-1k at 2048: 187,671 steps, 10 of them warmup.
        let mut cfg = got.clone();
        let said = cfg
            .resolve_epochs(Some(1_281_167), "in1k")
            .unwrap()
            .unwrap();
        assert_eq!((cfg.total_steps, cfg.warmup()), (187_671, 6_256));
        assert!(said.contains("187671 steps"), "{said}");
        // Another batch keeps the epochs (and the warmup epochs): 8x the steps.
        let mut cfg = got.clone();
        cfg.batch_size = 256;
        cfg.resolve_epochs(Some(1_281_167), "in1k").unwrap();
        assert_eq!((cfg.total_steps, cfg.warmup()), (1_501_368, 50_046));
    }

    #[test]
    fn unused_classifier_parts_are_refused() {
        let mut c = PretrainConfig::preset("tiny").unwrap();
        c.model.num_classes = 10;
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("num_classes"));
        let mut c = PretrainConfig::preset("tiny").unwrap();
        c.model.global_pool = super::super::vit::GlobalPool::Mean;
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("global_pool"));
    }

    #[test]
    fn epochs_need_a_sample_count_and_are_checked() {
        let mut cfg = PretrainConfig::preset("small").unwrap();
        // Without epochs, total_steps stands.
        assert_eq!(cfg.resolve_epochs(None, "d").unwrap(), None);
        assert_eq!(cfg.total_steps, 1000);
        cfg.epochs = Some(2.5);
        cfg.batch_size = 64;
        let e = cfg
            .resolve_epochs(None, "/data/train-{0..9}.tar")
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("/data/train-{0..9}.tar") && e.contains("--steps"),
            "{e}"
        );
        cfg.resolve_epochs(Some(1000), "d").unwrap();
        assert_eq!(cfg.total_steps, 39); // round(2.5 * 1000 / 64) = round(39.06)
        // A tiny fraction still trains one step.
        cfg.epochs = Some(1e-9);
        cfg.resolve_epochs(Some(1000), "d").unwrap();
        assert_eq!(cfg.total_steps, 1);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            cfg.epochs = Some(bad);
            assert!(cfg.validate().is_err(), "epochs {bad}");
        }
    }

    #[test]
    fn demo_config_is_valid() {
        // tools/run-demo.sh pretrains with this file over the `tiny` preset.
        let cfg = PretrainConfig::preset("tiny")
            .unwrap()
            .with_file(&repo_file("configs/demo-tiny.toml"))
            .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.preset, "tiny");
    }

    #[test]
    fn toml_and_json_files_override_alike_and_reject_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("o.toml");
        std::fs::write(
            &toml_path,
            "batch_size = 64\nmask = \"cell\"\n[model]\nimage_size = 64\n[optim]\neps = 1e-6\n",
        )
        .unwrap();
        let json_path = dir.path().join("o.json");
        std::fs::write(
            &json_path,
            r#"{"batch_size": 64, "mask": "cell", "model": {"image_size": 64}, "optim": {"eps": 1e-6}}"#,
        )
        .unwrap();
        let tiny = PretrainConfig::preset("tiny").unwrap();
        let a = tiny.clone().with_file(&toml_path).unwrap();
        let b = tiny.clone().with_file(&json_path).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            (a.batch_size, a.model.image_size, a.optim.eps),
            (64, 64, 1e-6)
        );
        assert_eq!(a.mask, MaskKind::Cell);

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[model]\ndepht = 3\n").unwrap();
        let e = format!("{:#}", tiny.clone().with_file(&bad).unwrap_err());
        assert!(e.contains("unknown config key `model.depht`"), "{e}");
        assert!(e.contains("bad.toml"), "{e}");

        let broken = dir.path().join("broken.toml");
        std::fs::write(&broken, "batch_size = = 3\n").unwrap();
        let e = format!("{:#}", tiny.clone().with_file(&broken).unwrap_err());
        assert!(
            e.contains("parsing config") && e.contains("broken.toml"),
            "{e}"
        );

        let yaml = dir.path().join("c.yaml");
        std::fs::write(&yaml, "batch_size: 3\n").unwrap();
        let e = format!("{:#}", tiny.with_file(&yaml).unwrap_err());
        assert!(e.contains("unsupported config file type `.yaml`"), "{e}");
    }
}
