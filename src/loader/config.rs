//! The loader's validated, serde-serialisable configuration.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::ImageLimits;
use crate::mask::{BlockMask, MaskGenerator, MaskGrid, RandomCellMask, RandomPatchMask};
use crate::stream::StreamConfig;

/// Samples per batch (the paper's per-GPU batch for ViT-S is 256).
pub const DEFAULT_BATCH_SIZE: usize = 256;
/// Side of the square views.
pub const DEFAULT_IMAGE_SIZE: u32 = 224;
/// ViT patch side in pixels.
pub const DEFAULT_PATCH_SIZE: u32 = 16;
/// Fraction of patches masked (ConMIM: 75%).
pub const DEFAULT_MASK_RATIO: f64 = 0.75;
/// Mask cell side in patches for [`MaskKind::Cell`] (32-px cells of 16-px patches).
pub const DEFAULT_MASK_CELL: usize = 2;
/// Patches masked by [`MaskKind::Block`] (BEiT: 75 of 196).
pub const DEFAULT_BLOCK_PATCHES: usize = 75;
/// Smallest block of [`MaskKind::Block`], in patches.
pub const DEFAULT_BLOCK_MIN_PATCHES: usize = 16;
/// Smallest aspect ratio of a block (the largest is its inverse).
pub const DEFAULT_BLOCK_MIN_ASPECT: f64 = 0.3;
/// Finished batches queued for the consumer (plus one being filled).
pub const DEFAULT_PREFETCH: usize = 2;
/// Seconds without any finished sample (or reading, see the loader's docs) after which
/// the stream ends with [`Error::Stalled`]. Generous: a cold http shard or a slow disk must not trip it.
pub const DEFAULT_STALL_TIMEOUT_S: f64 = 300.0;
/// The longest stall timeout accepted (a year: "never", in practice).
pub const MAX_STALL_TIMEOUT_S: f64 = 365.0 * 86_400.0;
/// Shorter side before the centre crop in [`Task::ClassifyEval`] (for 224 crops).
pub const DEFAULT_EVAL_RESIZE: u32 = 256;
/// Extension of the label member (`.cls`, an ASCII integer).
pub const DEFAULT_LABEL_EXT: &str = "cls";
/// Image member extensions, in order of preference.
pub const IMAGE_EXTS: &[&str] = &[
    "jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "img",
];
/// Failed samples kept with their details in [`ErrorLog`](super::ErrorLog) (all are
/// counted).
pub const MAX_ERROR_RECORDS: usize = 1000;

/// What each sample becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// ConMIM pretraining: the weak (student) and strong (teacher) views of one shared
    /// crop + flip, and a patch mask.
    ConMim,
    /// Classification training: crop + flip (the weak view; no strong view, no mask),
    /// then the fine-tuning augmentations configured here: RandAugment or colour jitter,
    /// and random erasing. Mixup / CutMix act on the GPU batch, in the trainer.
    ClassifyTrain,
    /// Evaluation: resize the shorter side to `eval_resize`, centre crop `image_size`.
    ClassifyEval,
}

impl Task {
    /// Whether batches carry a strong view and a mask.
    pub fn is_conmim(self) -> bool {
        self == Task::ConMim
    }
}

/// Which mask generator [`Task::ConMim`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskKind {
    /// `ratio` of the patches, uniformly (ViT-S/16: 147 of 196).
    Patch,
    /// `ratio` of the `cell x cell`-patch cells (ViT-B/L: 37 of 49 cells, 148 patches).
    Cell,
    /// BEiT block-wise masking.
    Block,
}

/// The mask generator's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaskConfig {
    /// The generator.
    pub kind: MaskKind,
    /// Patch side in pixels (the view side must be a multiple).
    pub patch_size: u32,
    /// Masked fraction for `patch` and `cell`.
    pub ratio: f64,
    /// Cell side in patches for `cell`.
    pub cell: usize,
    /// Target masked patches for `block`.
    pub block_patches: usize,
    /// Smallest block for `block`.
    pub block_min_patches: usize,
    /// Smallest block aspect ratio for `block`.
    pub block_min_aspect: f64,
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            kind: MaskKind::Patch,
            patch_size: DEFAULT_PATCH_SIZE,
            ratio: DEFAULT_MASK_RATIO,
            cell: DEFAULT_MASK_CELL,
            block_patches: DEFAULT_BLOCK_PATCHES,
            block_min_patches: DEFAULT_BLOCK_MIN_PATCHES,
            block_min_aspect: DEFAULT_BLOCK_MIN_ASPECT,
        }
    }
}

impl MaskConfig {
    /// The ConMIM recipe for a model: `cell` for base and large, `patch` otherwise.
    pub fn for_kind(kind: MaskKind) -> Self {
        MaskConfig {
            kind,
            ..Self::default()
        }
    }

    /// Builds the generator for `image_size` x `image_size` views.
    pub fn build(&self, image_size: u32) -> Result<Arc<dyn MaskGenerator>> {
        if self.patch_size == 0 || !image_size.is_multiple_of(self.patch_size) {
            return Err(Error::Config(format!(
                "image size {image_size} is not a multiple of the patch size {}",
                self.patch_size
            )));
        }
        let grid = MaskGrid::square(image_size as usize, self.patch_size as usize)?;
        Ok(match self.kind {
            MaskKind::Patch => Arc::new(RandomPatchMask::new(grid, self.ratio)?),
            MaskKind::Cell => Arc::new(RandomCellMask::new(grid, self.cell, self.ratio)?),
            MaskKind::Block => Arc::new(BlockMask::new(
                grid,
                self.block_patches,
                self.block_min_patches,
                None,
                self.block_min_aspect,
                None,
            )?),
        })
    }
}

/// Everything the [`Loader`](super::Loader) needs besides the source. Defaults are the
/// named constants of this module; `serde(default)` fills missing fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderConfig {
    /// Order, distribution, epochs and the seed (which also seeds augmentation and
    /// masks).
    pub stream: StreamConfig,
    /// Decoding/augmenting threads (besides one reader and one collating thread).
    pub threads: usize,
    /// Samples per batch.
    pub batch_size: usize,
    /// Drop an epoch's last batch when it is not full (else it is yielded short).
    pub drop_last: bool,
    /// Side of the square views.
    pub image_size: u32,
    /// What each sample becomes.
    pub task: Task,
    /// The mask ([`Task::ConMim`] only).
    pub mask: MaskConfig,
    /// Shorter side before the centre crop ([`Task::ClassifyEval`]).
    pub eval_resize: u32,
    /// [`Task::ClassifyTrain`]: a timm RandAugment policy applied after the crop and
    /// flip (e.g. `rand-m9-mstd0.5-inc1`, the fine-tuning recipe); empty = off.
    pub rand_augment: String,
    /// [`Task::ClassifyTrain`] without `rand_augment`: timm's `ColorJitter(c, c, c)`
    /// (brightness, contrast, saturation; no hue) after the crop and flip, on every
    /// sample (0 = off). As timm's `create_transform`, it is not applied when
    /// `rand_augment` is set.
    pub color_jitter: f64,
    /// [`Task::ClassifyTrain`]: timm `RandomErasing(reprob, mode='pixel')` probability
    /// (0 = off). The erased box is filled with per-value `N(0, 1)` noise in normalised
    /// space, written as the u8 pixel that normalises to it (saturated at 0 / 255).
    pub reprob: f64,
    /// Label member extension; a missing label is `-1` (an error for the
    /// classification tasks).
    pub label_ext: String,
    /// Image size limits (larger images are corrupt samples, not allocations).
    pub limits: ImageLimits,
    /// Failed samples tolerated before the stream ends with
    /// [`Error::TooManyErrors`]; `None` = skip and count them all.
    pub max_errors: Option<u64>,
    /// Batches finished ahead of the consumer.
    pub prefetch: usize,
    /// See [`DEFAULT_STALL_TIMEOUT_S`].
    pub stall_timeout_s: f64,
    /// Fault injection for tests: a worker panics on the sample with this key.
    #[doc(hidden)]
    #[serde(skip)]
    pub fault_panic_key: Option<String>,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            stream: StreamConfig::default(),
            threads: default_threads(),
            batch_size: DEFAULT_BATCH_SIZE,
            drop_last: true,
            image_size: DEFAULT_IMAGE_SIZE,
            task: Task::ConMim,
            mask: MaskConfig::default(),
            eval_resize: DEFAULT_EVAL_RESIZE,
            rand_augment: String::new(),
            color_jitter: 0.0,
            reprob: 0.0,
            label_ext: DEFAULT_LABEL_EXT.to_owned(),
            limits: ImageLimits::default(),
            max_errors: None,
            prefetch: DEFAULT_PREFETCH,
            stall_timeout_s: DEFAULT_STALL_TIMEOUT_S,
            fault_panic_key: None,
        }
    }
}

/// The machine's available parallelism (at least 1).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Loader threads for one training process when none are configured: the available
/// parallelism shared among the processes torchrun started on this node
/// (`LOCAL_WORLD_SIZE`), so that G ranks on a node do not each start one worker per
/// core; the whole machine outside torchrun.
pub fn default_threads_per_process() -> usize {
    let local = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok());
    share_of(default_threads(), local)
}

/// `cores` shared among `local` processes (at least 1 each).
fn share_of(cores: usize, local: Option<usize>) -> usize {
    (cores / local.unwrap_or(1).max(1)).max(1)
}

impl LoaderConfig {
    /// Checks ranges and consistency (the mask is built to check it too).
    pub fn validate(&self) -> Result<()> {
        self.stream.validate()?;
        let bad = |m: String| Err(Error::Config(m));
        if self.threads == 0 || self.threads > 1024 {
            return bad(format!("threads must be in 1..=1024, got {}", self.threads));
        }
        if self.batch_size == 0 {
            return bad("batch size must be positive".into());
        }
        if self.image_size == 0 || self.image_size > 4096 {
            return bad(format!(
                "image size must be in 1..=4096, got {}",
                self.image_size
            ));
        }
        if self.task == Task::ClassifyEval && self.eval_resize < self.image_size {
            return bad(format!(
                "eval resize {} is smaller than the crop {}",
                self.eval_resize, self.image_size
            ));
        }
        if self.prefetch == 0 {
            return bad("prefetch must be at least 1".into());
        }
        if !(self.stall_timeout_s.is_finite()
            && self.stall_timeout_s > 0.0
            && self.stall_timeout_s <= MAX_STALL_TIMEOUT_S)
        {
            return bad(format!(
                "stall timeout must be positive and at most {MAX_STALL_TIMEOUT_S} s (a year), \
                 got {}",
                self.stall_timeout_s
            ));
        }
        if !self.rand_augment.is_empty() || self.reprob != 0.0 || self.color_jitter != 0.0 {
            if self.task != Task::ClassifyTrain {
                return bad(format!(
                    "rand_augment / color_jitter / reprob apply to the classify_train task \
                     only (task is {:?})",
                    self.task
                ));
            }
            if !(self.color_jitter.is_finite() && self.color_jitter >= 0.0) {
                return bad(format!("color_jitter {} must be >= 0", self.color_jitter));
            }
            if !self.rand_augment.is_empty() {
                self.rand_augment_config()?;
            }
            if !(0.0..=1.0).contains(&self.reprob) {
                return bad(format!("reprob {} not in [0, 1]", self.reprob));
            }
        }
        if self.label_ext.is_empty() {
            return bad("label extension must not be empty".into());
        }
        if self.task.is_conmim() {
            self.mask.build(self.image_size)?;
        }
        Ok(())
    }

    /// Takes rank and world size from `RANK` / `WORLD_SIZE` when set (as `torchrun`
    /// sets them); see [`StreamConfig::with_env_distribution`].
    pub fn with_env_distribution(mut self) -> Result<Self> {
        self.stream = self.stream.with_env_distribution()?;
        Ok(self)
    }

    /// The colour jitter strength the classification training views get: `color_jitter`
    /// when the task is [`Task::ClassifyTrain`], it is positive and `rand_augment` is off.
    pub fn color_jitter_applied(&self) -> Option<f64> {
        (self.task == Task::ClassifyTrain
            && self.rand_augment.is_empty()
            && self.color_jitter > 0.0)
            .then_some(self.color_jitter)
    }

    /// The parsed [`Self::rand_augment`] policy (`None` when empty).
    pub fn rand_augment_config(&self) -> Result<Option<crate::augment::randaug::RandAugConfig>> {
        if self.rand_augment.is_empty() {
            return Ok(None);
        }
        crate::augment::randaug::RandAugConfig::from_policy(&self.rand_augment)
            .map(Some)
            .map_err(Error::Config)
    }

    /// A hash of the settings that shape the batches beyond the stream's order (batch
    /// size, `drop_last`, image size, task, mask, eval resize, augmentations, label
    /// member): a [`super::LoaderState`] saved under other settings does not resume.
    pub fn settings_fingerprint(&self) -> u64 {
        let s = format!(
            "{}|{}|{}|{:?}|{:?}|{}|{}|{}|{}",
            self.batch_size,
            self.drop_last,
            self.image_size,
            self.task,
            self.mask,
            self.eval_resize,
            self.rand_augment,
            self.reprob,
            self.label_ext
        );
        // Added after the others: only when on, so that older states still match.
        let s = match self.color_jitter_applied() {
            Some(c) => format!("{s}|cj{c}"),
            None => s,
        };
        // Never 0 (the "unknown" of states saved before the field existed).
        crate::seed::hash_str(0x4c4f_4144, &s).max(1)
    }

    /// Bytes of one view of one sample.
    pub fn view_bytes(&self) -> usize {
        self.image_size as usize * self.image_size as usize * 3
    }

    /// Mask entries per sample (0 unless [`Task::ConMim`]).
    pub fn mask_len(&self) -> usize {
        if self.task.is_conmim() {
            let side = (self.image_size / self.mask.patch_size.max(1)) as usize;
            side * side
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchrun_ranks_share_the_cores() {
        assert_eq!(share_of(16, None), 16);
        assert_eq!(share_of(16, Some(1)), 16);
        assert_eq!(share_of(16, Some(8)), 2);
        assert_eq!(share_of(16, Some(6)), 2);
        assert_eq!(share_of(4, Some(8)), 1);
        assert_eq!(share_of(4, Some(0)), 4);
    }

    #[test]
    fn defaults_validate_and_round_trip() {
        let cfg = LoaderConfig::default();
        cfg.validate().unwrap();
        assert_eq!(cfg.mask_len(), 196);
        let json = serde_json::to_string(&cfg).unwrap();
        let back: LoaderConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        let partial: LoaderConfig =
            serde_json::from_str(r#"{"batch_size": 8, "task": "classify_eval"}"#).unwrap();
        assert_eq!(partial.batch_size, 8);
        assert_eq!(partial.task, Task::ClassifyEval);
        assert_eq!(partial.mask_len(), 0);
        assert!(serde_json::from_str::<LoaderConfig>(r#"{"batch": 8}"#).is_err());
    }

    #[test]
    fn validation_rejects_nonsense() {
        let with = |f: fn(&mut LoaderConfig)| {
            let mut c = LoaderConfig::default();
            f(&mut c);
            c.validate()
        };
        assert!(with(|c| c.threads = 0).is_err());
        assert!(with(|c| c.batch_size = 0).is_err());
        assert!(with(|c| c.image_size = 230).is_err()); // not a multiple of 16
        assert!(with(|c| c.mask.ratio = 1.5).is_err());
        assert!(with(|c| c.prefetch = 0).is_err());
        assert!(with(|c| c.stall_timeout_s = 0.0).is_err());
        assert!(with(|c| c.stall_timeout_s = 1e20).is_err());
        assert!(with(|c| c.stall_timeout_s = MAX_STALL_TIMEOUT_S).is_ok());
        assert!(
            with(|c| {
                c.task = Task::ClassifyEval;
                c.eval_resize = 200;
            })
            .is_err()
        );
        // Classification views need no patch grid.
        assert!(
            with(|c| {
                c.task = Task::ClassifyTrain;
                c.image_size = 230;
            })
            .is_ok()
        );
    }

    #[test]
    fn mask_presets_have_the_spec_counts() {
        let mut out = vec![0u8; 196];
        let mut rng = crate::seed::SplitMix64::new(1, 2);
        for (kind, expect) in [(MaskKind::Patch, 147), (MaskKind::Cell, 148)] {
            let g = MaskConfig::for_kind(kind).build(224).unwrap();
            assert_eq!(g.generate(&mut rng, &mut out), expect);
        }
        let g = MaskConfig::for_kind(MaskKind::Block).build(224).unwrap();
        assert!(g.generate(&mut rng, &mut out) <= 75 + 16);
    }
}
