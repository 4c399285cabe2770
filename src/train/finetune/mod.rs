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
//!   groups ([`layer_decay::param_groups`]); per-block relative position bias tables go
//!   to their block's layer, `fc_norm` and `head` to the top.
//! * The backbone options ([`crate::train::vit::Config::finetune`]): per-block relative
//!   position bias, mean pooling + `fc_norm`, the head init scale;
//!   [`crate::train::vit::expand_shared_rel_pos_bias`] copies the pretrained shared table
//!   into every block. Parity with timm's `beit_*` / `vit_*` (`global_pool='avg'`) is
//!   tested.
//! * The data side: [`crate::augment::randaug`] (RandAugment `rand-m9-mstd0.5-inc1` and
//!   random erasing, exact against timm) and [`crate::train::mixup`] (Mixup/CutMix with
//!   label smoothing and the soft-target loss, against timm).
//!
//! * [`model`]: the classifier, its initialisation from a pretraining checkpoint's
//!   teacher (or student, or a timm-named safetensors file) with the mapping logged
//!   (loaded / new / ignored / expanded) and checked, and its checkpoints.
//! * [`run`]: `conmim finetune` (the loop: layer-decay AdamW groups, warmup + cosine,
//!   mixup/cutmix + label smoothing on the batch, RandAugment + random erasing in the
//!   loader's `classify_train` task, evaluation each epoch, best/last checkpoints and
//!   resume, metrics + TensorBoard, torchrun), `conmim eval` (top-1/top-5 exactly once
//!   over a dataset), `conmim linear` (linear probe) and partial fine-tuning.
//! * [`knn`]: `conmim knn` (DINO's weighted k-NN on frozen features; also the
//!   pretraining monitor), in one process or shared by the ranks of a torchrun job.

pub mod config;
pub mod knn;
pub mod layer_decay;
pub mod model;
pub mod run;

pub use config::FinetuneConfig;
pub use layer_decay::{ParamGroup, layer_id, lr_scale, param_groups};
