//! Fine-tuning a ConMIM-pretrained ViT for ImageNet-1K classification (issue 5).
//!
//! What fine-tuning will be (spec, "Fine-tuning", after the paper's Table 12 and the
//! official `run_class_finetuning.py`):
//!
//! * start from the MOMENTUM (teacher) encoder of a pretraining checkpoint, drop the
//!   projection head and the `mask_token`, copy the shared relative position bias table
//!   `rel_pos_bias.relative_position_bias_table` into every
//!   `blocks.{i}.attn.relative_position_bias_table`;
//! * classify from mean-pooled patch tokens + LayerNorm (`fc_norm`) + a linear `head`
//!   whose initial weights and bias are scaled by 0.001;
//! * AdamW (betas 0.9, 0.999) with layer-wise learning-rate decay, weight decay 0.05 not
//!   on 1-D parameters / biases / `cls_token` / `pos_embed`, linear warmup then cosine
//!   to `min_lr`, per step;
//! * drop path, label smoothing 0.1, RandAugment `rand-m9-mstd0.5-inc1`, random erasing
//!   0.25, mixup 0.8 / cutmix 1.0 (switch prob 0.5), colour jitter 0.4; evaluation on a
//!   bicubic resize to 256 and a centre crop of 224 (top-1 / top-5).
//!
//! What exists so far:
//!
//! * [`config`]: [`FinetuneConfig`] with the per-size presets and `validate()`.
//! * [`layer_decay`]: the official layer id of each parameter name, the per-layer lr
//!   scale `decay^(depth + 1 - layer_id)` and the `(layer, decay/no_decay)` parameter
//!   groups ([`layer_decay::param_groups`]).
//!
//! TODO (not built yet; [`crate::train::vit`] does not support these, and this module
//! does not change it):
//!
//! * per-block relative position bias tables (`blocks.{i}.attn.relative_position_bias_table`):
//!   `vit.rs` has only ONE table shared by all blocks (`rel_pos_bias.*`), as in
//!   pretraining. Until a per-block option exists, a shared table would be put in the
//!   TOP layer by [`layer_decay::layer_id`] (the official rule for `rel_pos_bias.*`);
//!   the per-block tables go to their block's layer.
//! * mean pooling + `fc_norm`: `vit.rs` classifies the CLS token after `norm`
//!   (`global_pool='token'`); the official fine-tuning model replaces `norm` by
//!   `fc_norm` over the mean of the patch tokens.
//! * the head's 0.001 init scale, the teacher-weights loading (table copy, head/mask
//!   token drop), the mixup/cutmix and RandAugment data path, the training loop and
//!   evaluation.

pub mod config;
pub mod layer_decay;

pub use config::FinetuneConfig;
pub use layer_decay::{ParamGroup, layer_id, lr_scale, param_groups};
