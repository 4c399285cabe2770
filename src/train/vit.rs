//! The ViT backbone: the BEiT-style encoder of the official ConMIM pretraining code,
//! and a timm-style variant with absolute position embeddings (easier to export).
//!
//! Modules follow candle's shape (`new(cfg, path)` + `forward`) on `tch`, and every
//! parameter carries its timm / official-checkpoint name, so a [`tch::nn::VarStore`]
//! holding a model saves to (and loads from) a state dict keyed like timm's:
//!
//! | here (`Variant::Beit`)                       | timm `beit.Beit` / official ConMIM      |
//! |----------------------------------------------|-----------------------------------------|
//! | `cls_token` `[1,1,D]`                        | same                                    |
//! | `mask_token` `[1,1,D]`                       | official only (dropped for fine-tuning) |
//! | `patch_embed.proj.{weight,bias}`             | same                                    |
//! | `rel_pos_bias.relative_position_bias_table`  | same (shared table, `use_shared_rel_pos_bias=True`) |
//! | `rel_pos_bias.relative_position_index` (i64, not trained) | official: persistent buffer; timm: non-persistent (skip it when loading into timm) |
//! | `blocks.{i}.norm1.{weight,bias}`             | same                                    |
//! | `blocks.{i}.attn.qkv.weight` (no bias)       | same                                    |
//! | `blocks.{i}.attn.q_bias`, `blocks.{i}.attn.v_bias` | same (timm's `k_bias` is a zero buffer; here the zero k part is made on the fly) |
//! | `blocks.{i}.attn.proj.{weight,bias}`         | same                                    |
//! | `blocks.{i}.gamma_1`, `blocks.{i}.gamma_2`   | same (layer scale)                      |
//! | `blocks.{i}.norm2.{weight,bias}`             | same                                    |
//! | `blocks.{i}.mlp.fc1.{weight,bias}`, `mlp.fc2.*` | same                                 |
//! | `norm.{weight,bias}`                         | same (`global_pool='token'`)            |
//! | `fc_norm.{weight,bias}` (no `norm`), [`GlobalPool::Mean`] | same (`global_pool='avg'`) |
//! | `head.{weight,bias}` (when `num_classes > 0`)| same                                    |
//! | [`RelPosBias::PerBlock`]: `blocks.{i}.attn.relative_position_bias_table` + `blocks.{i}.attn.relative_position_index` (i64 buffer), no `rel_pos_bias.*` | timm `use_shared_rel_pos_bias=False` (index non-persistent there: skip it) |
//!
//! timm's own `beit_*_patch16_224` models use one table PER BLOCK
//! (`blocks.{i}.attn.relative_position_bias_table` + `relative_position_index`); the
//! ConMIM/BEiT pretraining code shares one table across blocks ([`RelPosBias::Shared`],
//! the default). Fine-tuning uses [`RelPosBias::PerBlock`] and starts every block's
//! table from the pretrained shared one ([`expand_shared_rel_pos_bias`] on a state
//! dict, or [`VisionTransformer::load_shared_rel_pos_bias`] on a built model), as the
//! spec's fine-tuning recipe prescribes. [`Config::finetune`] turns a pretraining
//! config into the official fine-tuning model: per-block tables, mean pooling of the
//! patch tokens + `fc_norm` ([`GlobalPool::Mean`]), no `mask_token`, a head whose init
//! is scaled by `head_init_scale` (0.001); it loads strictly into timm's
//! `beit_base_patch16_224(global_pool='avg', use_rel_pos_bias=True,
//! use_shared_rel_pos_bias=False, ..)` (resp. `vit_*(global_pool='avg')`) once the
//! `relative_position_index` buffers are left out.
//!
//! `Variant::Timm` is timm's `VisionTransformer` exactly (`vit_*_patch16_224`):
//! `cls_token`, `pos_embed` `[1,1+N,D]`, `patch_embed.proj.*`, `blocks.{i}.norm1.*`,
//! `blocks.{i}.attn.qkv.{weight,bias}`, `blocks.{i}.attn.proj.*`, `blocks.{i}.norm2.*`,
//! `blocks.{i}.mlp.fc{1,2}.*`, `norm.*`, `head.*`, plus `mask_token` for pretraining
//! and, when layer scale is on, timm's `blocks.{i}.ls1.gamma` / `ls2.gamma`.
//!
//! Attention runs through `scaled_dot_product_attention` (fused kernels on CUDA), with
//! the relative position bias passed as a float additive `attn_mask`.

use serde::{Deserialize, Serialize};
use tch::{Kind, TchError, Tensor, nn};

use super::init::{linear, timm_trunc_normal_, trunc_normal_, trunc_normal_var};

type Result<T> = std::result::Result<T, TchError>;

fn shape_err(msg: String) -> TchError {
    TchError::Shape(msg)
}

/// Which ViT flavour to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    /// The official ConMIM pretraining backbone (BEiT-style): q and v biases with no k
    /// bias, layer scale, ONE relative position bias table shared by all blocks, no
    /// absolute position embedding.
    Beit,
    /// timm's `VisionTransformer`: learned absolute position embedding, full qkv bias,
    /// no relative position bias.
    Timm,
}

/// The layout of the BEiT variant's relative position bias (the timm variant has none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelPosBias {
    /// ONE table shared by all blocks, `rel_pos_bias.relative_position_bias_table` +
    /// `rel_pos_bias.relative_position_index` (ConMIM/BEiT pretraining; timm's
    /// `use_shared_rel_pos_bias=True`). The default: configs written before this option
    /// existed read back as this.
    #[default]
    Shared,
    /// One table per block, `blocks.{i}.attn.relative_position_bias_table` +
    /// `blocks.{i}.attn.relative_position_index` (BEiT/ConMIM fine-tuning; timm's
    /// `use_rel_pos_bias=True, use_shared_rel_pos_bias=False`, whose index is a
    /// non-persistent buffer: skip `*.relative_position_index` when loading into timm).
    /// Initialise from a pretrained shared table with [`expand_shared_rel_pos_bias`].
    PerBlock,
}

/// How [`VisionTransformer::forward_head`] pools the tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GlobalPool {
    /// The CLS token after the final `norm` (timm `global_pool='token'`; pretraining and
    /// the default, also for configs written before this option existed).
    #[default]
    Token,
    /// The mean of the PATCH tokens (CLS excluded), then `fc_norm` (a LayerNorm), then
    /// `head`; there is no final `norm` (timm `global_pool='avg'`, whose `norm` is an
    /// `Identity`: BEiT/ConMIM fine-tuning).
    Mean,
}

fn one() -> f64 {
    1.0
}

/// The backbone's hyper-parameters. Presets: [`Config::vit_tiny`], [`Config::vit_small`],
/// [`Config::vit_base`], [`Config::vit_large`] (all patch 16 at 224, BEiT-style with the
/// ConMIM pretraining defaults); [`Config::timm_style`] turns one into the timm variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub variant: Variant,
    /// Side of the square input images, in pixels.
    pub image_size: i64,
    /// Side of the square patches; must divide `image_size`.
    pub patch_size: i64,
    pub in_chans: i64,
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    /// MLP hidden width = `embed_dim * mlp_ratio`.
    pub mlp_ratio: f64,
    /// Attention input biases: q and v only (Beit) or q, k and v (Timm).
    pub qkv_bias: bool,
    /// Layer scale (gamma) initial value; `None` disables layer scale.
    pub layer_scale_init: Option<f64>,
    /// LayerNorm epsilon.
    pub norm_eps: f64,
    /// Stochastic depth: block `i` drops its residual branches with probability
    /// `drop_path_rate * i / (depth - 1)` in training mode.
    pub drop_path_rate: f64,
    /// Whether the model has a learned `mask_token` (needed by the ConMIM student).
    pub use_mask_token: bool,
    /// Classifier classes on the CLS token; 0 = no `head`.
    pub num_classes: i64,
    /// Std of the truncated-normal initialisation.
    pub init_std: f64,
    /// BEiT variant: shared or per-block relative position bias table. Must stay
    /// [`RelPosBias::Shared`] (the default, ignored) for the timm variant.
    #[serde(default)]
    pub rel_pos_bias: RelPosBias,
    /// Classifier pooling: CLS token after `norm` (default) or patch-token mean + `fc_norm`.
    #[serde(default)]
    pub global_pool: GlobalPool,
    /// `head.weight` and `head.bias` are multiplied by this after their init (official
    /// BEiT/ConMIM fine-tuning: 0.001; timm's `head_init_scale`). Default 1.0.
    #[serde(default = "one")]
    pub head_init_scale: f64,
}

impl Config {
    fn conmim(embed_dim: i64, depth: i64, num_heads: i64) -> Self {
        Config {
            variant: Variant::Beit,
            image_size: 224,
            patch_size: 16,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            layer_scale_init: Some(0.1),
            norm_eps: 1e-6,
            drop_path_rate: 0.0,
            use_mask_token: true,
            num_classes: 0,
            init_std: 0.02,
            rel_pos_bias: RelPosBias::Shared,
            global_pool: GlobalPool::Token,
            head_init_scale: 1.0,
        }
    }

    /// ViT-Ti/16 (192 dim, 12 layers, 3 heads): not in the paper; for tests and smoke
    /// runs. Layer scale 0.1, no drop path.
    pub fn vit_tiny() -> Self {
        Self::conmim(192, 12, 3)
    }

    /// ViT-S/16 (384, 12, 6): layer scale 0.1, drop path 0.1 (paper Table 11).
    pub fn vit_small() -> Self {
        Config {
            drop_path_rate: 0.1,
            ..Self::conmim(384, 12, 6)
        }
    }

    /// ViT-B/16 (768, 12, 12): layer scale 0.1, no drop path.
    pub fn vit_base() -> Self {
        Self::conmim(768, 12, 12)
    }

    /// ViT-L/16 (1024, 24, 16): layer scale 1e-5, no drop path.
    pub fn vit_large() -> Self {
        Config {
            layer_scale_init: Some(1e-5),
            ..Self::conmim(1024, 24, 16)
        }
    }

    /// The timm-style variant of this size: absolute position embedding, qkv bias, no
    /// relative position bias and no layer scale (timm's `vit_*` defaults).
    pub fn timm_style(self) -> Self {
        Config {
            variant: Variant::Timm,
            layer_scale_init: None,
            ..self
        }
    }

    pub fn with_image_size(self, image_size: i64) -> Self {
        Config { image_size, ..self }
    }

    pub fn with_patch_size(self, patch_size: i64) -> Self {
        Config { patch_size, ..self }
    }

    pub fn with_drop_path(self, drop_path_rate: f64) -> Self {
        Config {
            drop_path_rate,
            ..self
        }
    }

    pub fn with_num_classes(self, num_classes: i64) -> Self {
        Config {
            num_classes,
            ..self
        }
    }

    pub fn with_mask_token(self, use_mask_token: bool) -> Self {
        Config {
            use_mask_token,
            ..self
        }
    }

    /// The BEiT/ConMIM fine-tuning model of this (pretraining) backbone: per-block
    /// relative position bias, mean pooling + `fc_norm`, no `mask_token`, a
    /// `num_classes` head whose init is scaled by `head_init_scale` (0.001 officially).
    /// Drop path and the rest unchanged. For the timm variant the relative position bias
    /// stays as it is (none).
    pub fn finetune(self, num_classes: i64, head_init_scale: f64) -> Self {
        let rel_pos_bias = match self.variant {
            Variant::Beit => RelPosBias::PerBlock,
            Variant::Timm => self.rel_pos_bias,
        };
        Config {
            rel_pos_bias,
            global_pool: GlobalPool::Mean,
            use_mask_token: false,
            num_classes,
            head_init_scale,
            ..self
        }
    }

    pub fn with_rel_pos_bias(self, rel_pos_bias: RelPosBias) -> Self {
        Config {
            rel_pos_bias,
            ..self
        }
    }

    pub fn with_global_pool(self, global_pool: GlobalPool) -> Self {
        Config {
            global_pool,
            ..self
        }
    }

    pub fn with_head_init_scale(self, head_init_scale: f64) -> Self {
        Config {
            head_init_scale,
            ..self
        }
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Patch tokens per image (`N`; 196 at 224/16).
    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }

    /// Tokens per image including CLS (`1 + N`).
    pub fn num_tokens(&self) -> i64 {
        self.num_patches() + 1
    }

    pub fn head_dim(&self) -> i64 {
        self.embed_dim / self.num_heads
    }

    pub fn mlp_hidden(&self) -> i64 {
        (self.embed_dim as f64 * self.mlp_ratio) as i64
    }

    /// Rows of the relative position bias table: `(2g-1)^2` patch offsets plus
    /// cls->token, token->cls and cls->cls.
    pub fn num_relative_distance(&self) -> i64 {
        let g = self.grid();
        (2 * g - 1) * (2 * g - 1) + 3
    }

    /// Drop-path probability of block `i` (torch.linspace(0, rate, depth)).
    pub fn drop_path_of(&self, i: i64) -> f64 {
        if self.depth <= 1 {
            0.0
        } else {
            self.drop_path_rate * i as f64 / (self.depth - 1) as f64
        }
    }

    /// Trainable parameters of the model this config builds (the `mask_token` and the
    /// `head` included when configured; the relative position index is a buffer).
    pub fn num_params(&self) -> i64 {
        let d = self.embed_dim;
        let h = self.mlp_hidden();
        let mut n = d * self.in_chans * self.patch_size * self.patch_size + d; // patch_embed
        n += d; // cls_token
        if self.use_mask_token {
            n += d;
        }
        match (self.variant, self.rel_pos_bias) {
            (Variant::Beit, RelPosBias::Shared) => {
                n += self.num_relative_distance() * self.num_heads
            }
            (Variant::Beit, RelPosBias::PerBlock) => {
                n += self.depth * self.num_relative_distance() * self.num_heads
            }
            (Variant::Timm, _) => n += self.num_tokens() * d,
        }
        let qkv_bias = match (self.qkv_bias, self.variant) {
            (false, _) => 0,
            (true, Variant::Beit) => 2 * d,
            (true, Variant::Timm) => 3 * d,
        };
        let block = 2 * d // norm1
            + 3 * d * d + qkv_bias
            + d * d + d // proj
            + 2 * d // norm2
            + d * h + h + h * d + d // mlp
            + if self.layer_scale_init.is_some() { 2 * d } else { 0 };
        n += self.depth * block;
        n += 2 * d; // norm (Token) or fc_norm (Mean)
        if self.num_classes > 0 {
            n += d * self.num_classes + self.num_classes;
        }
        n
    }

    /// Checks that the numbers fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(shape_err(format!("vit config: {m}")));
        if self.patch_size <= 0 || self.image_size <= 0 || self.image_size % self.patch_size != 0 {
            return bad(format!(
                "image_size {} must be a positive multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.num_heads <= 0 || self.embed_dim <= 0 || self.embed_dim % self.num_heads != 0 {
            return bad(format!(
                "embed_dim {} must be a positive multiple of num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if self.depth < 0 || self.in_chans <= 0 || self.num_classes < 0 || self.mlp_hidden() <= 0 {
            return bad(format!(
                "depth {}, in_chans {}, num_classes {}, mlp_ratio {} out of range",
                self.depth, self.in_chans, self.num_classes, self.mlp_ratio
            ));
        }
        if self.variant == Variant::Timm && self.rel_pos_bias != RelPosBias::Shared {
            return bad(format!(
                "rel_pos_bias {:?} with the timm variant (it has no relative position bias; \
                 leave the default)",
                self.rel_pos_bias
            ));
        }
        if !self.head_init_scale.is_finite() {
            return bad(format!(
                "head_init_scale {} not finite",
                self.head_init_scale
            ));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return bad(format!(
                "drop_path_rate {} not in [0, 1)",
                self.drop_path_rate
            ));
        }
        Ok(())
    }
}

/// Stochastic depth (timm's `drop_path`, scale by keep): in training mode zeroes the
/// whole residual branch of each sample with probability `p` and scales survivors by
/// `1 / (1 - p)`; the identity otherwise.
pub fn drop_path(x: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return x.shallow_clone();
    }
    let keep = 1.0 - p;
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.size()[0];
    // Scale the [B, 1, ..] mask, not x: one full-size multiply (as timm does).
    let mask = Tensor::empty(shape.as_slice(), (x.kind(), x.device())).bernoulli_float_(keep);
    x * (mask / keep)
}

/// `patch_embed`: a `p x p` convolution with stride `p`, `[B,C,H,W] -> [B,N,D]`.
#[derive(Debug)]
pub struct PatchEmbed {
    proj: nn::Conv2D,
    in_chans: i64,
    image_size: i64,
}

impl PatchEmbed {
    pub fn new(cfg: &Config, path: nn::Path) -> Self {
        let conv_cfg = nn::ConvConfig {
            stride: cfg.patch_size,
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        let mut proj = nn::conv2d(
            &path / "proj",
            cfg.in_chans,
            cfg.embed_dim,
            cfg.patch_size,
            conv_cfg,
        );
        trunc_normal_(&mut proj.ws, cfg.init_std);
        PatchEmbed {
            proj,
            in_chans: cfg.in_chans,
            image_size: cfg.image_size,
        }
    }

    /// `x`: `[B, C, S, S]` float -> `[B, N, D]`, patches in row-major order.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 4
            || size[1] != self.in_chans
            || size[2] != self.image_size
            || size[3] != self.image_size
        {
            return Err(shape_err(format!(
                "patch_embed: expected [B, {}, {}, {}] images, got {size:?}",
                self.in_chans, self.image_size, self.image_size
            )));
        }
        Ok(x.apply(&self.proj).flatten(2, 3).transpose(1, 2))
    }
}

/// Pair-wise relative position index of BEiT for a `g x g` grid with a CLS token:
/// `[1+g*g, 1+g*g]`, values in `0..(2g-1)^2 + 3` (the last three: cls->token,
/// token->cls, cls->cls).
pub fn relative_position_index(grid: i64) -> Vec<i64> {
    let n = grid * grid;
    let t = (n + 1) as usize;
    let nrd = (2 * grid - 1) * (2 * grid - 1) + 3;
    let mut idx = vec![0i64; t * t];
    for i in 0..n {
        let (hi, wi) = (i / grid, i % grid);
        for j in 0..n {
            let (hj, wj) = (j / grid, j % grid);
            let rh = hi - hj + grid - 1;
            let rw = wi - wj + grid - 1;
            idx[(i as usize + 1) * t + j as usize + 1] = rh * (2 * grid - 1) + rw;
        }
    }
    for j in 0..t {
        idx[j] = nrd - 3; // cls -> token (row 0)
        idx[j * t] = nrd - 2; // token -> cls (column 0)
    }
    idx[0] = nrd - 1; // cls -> cls
    idx
}

/// A relative position bias table and its index (zero init): `rel_pos_bias.*`, shared
/// by all blocks ([`RelPosBias::Shared`]), or one per block under `blocks.{i}.attn.*`
/// ([`RelPosBias::PerBlock`]).
#[derive(Debug)]
pub struct RelativePositionBias {
    table: Tensor,
    index: Tensor,
    tokens: i64,
    heads: i64,
}

impl RelativePositionBias {
    pub fn new(cfg: &Config, path: nn::Path) -> Self {
        let table = path.zeros(
            "relative_position_bias_table",
            &[cfg.num_relative_distance(), cfg.num_heads],
        );
        let index =
            Tensor::from_slice(&relative_position_index(cfg.grid())).to_device(path.device());
        // A buffer, not a parameter: saved with the weights (as the official code does)
        // but never trained.
        let index = path.add("relative_position_index", index, false);
        RelativePositionBias {
            table,
            index,
            tokens: cfg.num_tokens(),
            heads: cfg.num_heads,
        }
    }

    /// The bias `[H, 1+N, 1+N]` to add to the attention logits, contiguous: fused
    /// attention kernels take a mask only with a unit last-dimension stride (a
    /// permuted view sends SDPA to the slow math path, measured 0.64x on an H100).
    pub fn forward(&self) -> Tensor {
        self.table
            .index_select(0, &self.index)
            .view([self.tokens, self.tokens, self.heads])
            .permute([2, 0, 1])
            .contiguous()
    }
}

/// The per-block entries of a SHARED relative position bias (fine-tuning init, as the
/// official BEiT/ConMIM code and the spec prescribe): given the shared
/// `rel_pos_bias.relative_position_bias_table` `[(2g-1)^2+3, H]` of a `cfg`-sized
/// backbone (and, optionally, its `rel_pos_bias.relative_position_index`, checked to be
/// BEiT's), returns `blocks.{i}.attn.relative_position_bias_table` (a copy of the table
/// for each of the `cfg.depth` blocks) and `blocks.{i}.attn.relative_position_index`
/// (BEiT's index), the variables of a [`RelPosBias::PerBlock`] model. A pure tensor map:
/// the caller drops the two `rel_pos_bias.*` entries from its state dict and inserts
/// these (`export.rs`'s timm export does the same table expansion inline, and drops the
/// index, which timm rebuilds). See also [`VisionTransformer::load_shared_rel_pos_bias`].
pub fn expand_shared_rel_pos_bias(
    cfg: &Config,
    table: &Tensor,
    index: Option<&Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let want = [cfg.num_relative_distance(), cfg.num_heads];
    if table.size() != want {
        return Err(shape_err(format!(
            "expand_shared_rel_pos_bias: table must be {want:?} for a {0}x{0} grid and {1} \
             heads, got {2:?}",
            cfg.grid(),
            cfg.num_heads,
            table.size()
        )));
    }
    let beit = Tensor::from_slice(&relative_position_index(cfg.grid()));
    if let Some(index) = index {
        let got = index
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Int64)
            .view(-1);
        if got.size() != beit.size() || !got.equal(&beit) {
            return Err(shape_err(format!(
                "expand_shared_rel_pos_bias: the index is not BEiT's for a {0}x{0} grid",
                cfg.grid()
            )));
        }
    }
    let beit = beit.to_device(table.device());
    let mut out = Vec::with_capacity(2 * cfg.depth as usize);
    for i in 0..cfg.depth {
        out.push((
            format!("blocks.{i}.attn.relative_position_bias_table"),
            table.detach().copy(),
        ));
        out.push((
            format!("blocks.{i}.attn.relative_position_index"),
            beit.copy(),
        ));
    }
    Ok(out)
}

/// Multi-head self-attention (`attn`).
#[derive(Debug)]
pub struct Attention {
    qkv_weight: Tensor,
    /// Timm: `qkv.bias`.
    qkv_bias: Option<Tensor>,
    /// Beit: `q_bias`, `v_bias` (k bias fixed at zero).
    qv_bias: Option<(Tensor, Tensor)>,
    /// [`RelPosBias::PerBlock`]: this block's own table and index.
    rel_pos_bias: Option<RelativePositionBias>,
    proj: nn::Linear,
    heads: i64,
    dim: i64,
}

impl Attention {
    /// `layer_id` (1-based) rescales `proj.weight` by `1/sqrt(2 * layer_id)` as the
    /// official init does.
    pub fn new(cfg: &Config, path: nn::Path, layer_id: i64) -> Self {
        let d = cfg.embed_dim;
        let qkv_path = &path / "qkv";
        let qkv_weight = trunc_normal_var(&qkv_path, "weight", &[3 * d, d], cfg.init_std);
        let (qkv_bias, qv_bias) = match (cfg.qkv_bias, cfg.variant) {
            (false, _) => (None, None),
            (true, Variant::Timm) => (Some(qkv_path.zeros("bias", &[3 * d])), None),
            (true, Variant::Beit) => (
                None,
                Some((path.zeros("q_bias", &[d]), path.zeros("v_bias", &[d]))),
            ),
        };
        let rel_pos_bias = (cfg.variant == Variant::Beit
            && cfg.rel_pos_bias == RelPosBias::PerBlock)
            .then(|| RelativePositionBias::new(cfg, path.clone()));
        let mut proj = linear(&(&path / "proj"), d, d, true, cfg.init_std);
        rescale_(&mut proj.ws, layer_id);
        Attention {
            qkv_weight,
            qkv_bias,
            qv_bias,
            rel_pos_bias,
            proj,
            heads: cfg.num_heads,
            dim: d,
        }
    }

    /// `x`: `[B, T, D]`; `bias`: additive `[1 or B, H, T, T]` (the shared relative
    /// position bias) -> `[B, T, D]`. With a per-block table its bias is added too (to
    /// `bias` when both are there, as timm's `Attention` does).
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let own = self.rel_pos_bias.as_ref().map(|r| r.forward().unsqueeze(0));
        let bias = match (own, bias) {
            (Some(own), Some(shared)) => Some(own + shared),
            (Some(own), None) => Some(own),
            (None, shared) => shared.map(|b| b.shallow_clone()),
        };
        let bias = bias.as_ref();
        let (b, t, d) = x.size3()?;
        if d != self.dim {
            return Err(shape_err(format!(
                "attn: expected [B, T, {}], got {:?}",
                self.dim,
                x.size()
            )));
        }
        let qkv_bias = match (&self.qkv_bias, &self.qv_bias) {
            (Some(bias), _) => Some(bias.shallow_clone()),
            (None, Some((q, v))) => Some(Tensor::cat(&[q, &v.zeros_like(), v], 0)),
            (None, None) => None,
        };
        let hd = d / self.heads;
        let qkv = x
            .f_linear(&self.qkv_weight, qkv_bias.as_ref())?
            .reshape([b, t, 3, self.heads, hd])
            .permute([2, 0, 3, 1, 4]);
        // `unbind`, not three `select`s: its backward is one stack, where selects would
        // each zero-fill and copy into a qkv-sized gradient (measured on an H100).
        let mut parts = qkv.unbind(0).into_iter();
        let (Some(q), Some(k), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(shape_err("attn: qkv did not split in three".into()));
        };
        let mask = bias.map(|m| m.to_kind(q.kind()));
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            0.0,
            false,
            None,
            false,
        )?;
        Ok(out.transpose(1, 2).reshape([b, t, d]).apply(&self.proj))
    }
}

fn rescale_(w: &mut Tensor, layer_id: i64) {
    tch::no_grad(|| {
        let _ = w.g_div_scalar_((2.0 * layer_id as f64).sqrt());
    });
}

/// The MLP (`mlp.fc1` -> exact GELU -> `mlp.fc2`).
#[derive(Debug)]
pub struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Mlp {
    pub fn new(cfg: &Config, path: nn::Path, layer_id: i64) -> Self {
        let (d, h) = (cfg.embed_dim, cfg.mlp_hidden());
        let fc1 = linear(&(&path / "fc1"), d, h, true, cfg.init_std);
        let mut fc2 = linear(&(&path / "fc2"), h, d, true, cfg.init_std);
        rescale_(&mut fc2.ws, layer_id);
        Mlp { fc1, fc2 }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.fc1).gelu("none").apply(&self.fc2)
    }
}

/// One pre-norm transformer block with optional layer scale and drop path.
#[derive(Debug)]
pub struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    norm2: nn::LayerNorm,
    mlp: Mlp,
    gammas: Option<(Tensor, Tensor)>,
    drop_path: f64,
}

fn layer_norm(cfg: &Config, path: nn::Path) -> nn::LayerNorm {
    let ln_cfg = nn::LayerNormConfig {
        eps: cfg.norm_eps,
        ..Default::default()
    };
    nn::layer_norm(path, vec![cfg.embed_dim], ln_cfg)
}

impl Block {
    /// Block `index` (0-based) of the stack.
    pub fn new(cfg: &Config, path: nn::Path, index: i64) -> Self {
        let d = cfg.embed_dim;
        let gammas = cfg.layer_scale_init.map(|init| {
            let init = nn::Init::Const(init);
            match cfg.variant {
                Variant::Beit => (
                    path.var("gamma_1", &[d], init),
                    path.var("gamma_2", &[d], init),
                ),
                Variant::Timm => (
                    (&path / "ls1").var("gamma", &[d], init),
                    (&path / "ls2").var("gamma", &[d], init),
                ),
            }
        });
        Block {
            norm1: layer_norm(cfg, &path / "norm1"),
            attn: Attention::new(cfg, &path / "attn", index + 1),
            norm2: layer_norm(cfg, &path / "norm2"),
            mlp: Mlp::new(cfg, &path / "mlp", index + 1),
            gammas,
            drop_path: cfg.drop_path_of(index),
        }
    }

    /// `x`: `[B, T, D]` -> `[B, T, D]`.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let y = self.attn.forward(&x.apply(&self.norm1), bias)?;
        let y = match &self.gammas {
            Some((g1, _)) => y * g1,
            None => y,
        };
        let x = x + drop_path(&y, self.drop_path, train);
        let y = self.mlp.forward(&x.apply(&self.norm2));
        let y = match &self.gammas {
            Some((_, g2)) => y * g2,
            None => y,
        };
        Ok(x + drop_path(&y, self.drop_path, train))
    }
}

/// The whole backbone.
#[derive(Debug)]
pub struct VisionTransformer {
    cfg: Config,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    mask_token: Option<Tensor>,
    pos_embed: Option<Tensor>,
    rel_pos_bias: Option<RelativePositionBias>,
    blocks: Vec<Block>,
    /// [`GlobalPool::Token`]: the final LayerNorm of every token.
    norm: Option<nn::LayerNorm>,
    /// [`GlobalPool::Mean`]: the LayerNorm of the pooled patch tokens.
    fc_norm: Option<nn::LayerNorm>,
    head: Option<nn::Linear>,
}

impl VisionTransformer {
    /// Builds the model's variables under `path` (normally `vs.root()`, which gives the
    /// timm names of the module docs) and initialises them like the official code:
    /// truncated normal (cut at one std) for linear/conv weights, `cls_token`,
    /// `mask_token` and `pos_embed`; zero biases, zero relative position table, unit
    /// LayerNorms, layer scale at its init value, `attn.proj` / `mlp.fc2` weights of
    /// block `i` divided by `sqrt(2 (i+1))`. Seed with `tch::manual_seed` first for a
    /// reproducible init.
    pub fn new(cfg: &Config, path: nn::Path) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.embed_dim;
        let patch_embed = PatchEmbed::new(cfg, &path / "patch_embed");
        let cls_token = trunc_normal_var(&path, "cls_token", &[1, 1, d], cfg.init_std);
        let mask_token = cfg
            .use_mask_token
            .then(|| trunc_normal_var(&path, "mask_token", &[1, 1, d], cfg.init_std));
        let (pos_embed, rel_pos_bias) = match cfg.variant {
            Variant::Timm => (
                Some(trunc_normal_var(
                    &path,
                    "pos_embed",
                    &[1, cfg.num_tokens(), d],
                    cfg.init_std,
                )),
                None,
            ),
            Variant::Beit => (
                None,
                (cfg.rel_pos_bias == RelPosBias::Shared)
                    .then(|| RelativePositionBias::new(cfg, &path / "rel_pos_bias")),
            ),
        };
        let blocks_path = &path / "blocks";
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, &blocks_path / i, i))
            .collect();
        let (norm, fc_norm) = match cfg.global_pool {
            GlobalPool::Token => (Some(layer_norm(cfg, &path / "norm")), None),
            GlobalPool::Mean => (None, Some(layer_norm(cfg, &path / "fc_norm"))),
        };
        let head = (cfg.num_classes > 0).then(|| {
            // The official fine-tuning model draws its head with timm's trunc_normal_
            // (cut at +-2 absolute, a plain normal), not the pretraining code's +-1 std.
            let head_path = &path / "head";
            let mut head = nn::Linear {
                ws: head_path.zeros("weight", &[cfg.num_classes, d]),
                bs: Some(head_path.zeros("bias", &[cfg.num_classes])),
            };
            timm_trunc_normal_(&mut head.ws, cfg.init_std);
            if cfg.head_init_scale != 1.0 {
                tch::no_grad(|| {
                    let _ = head.ws.g_mul_scalar_(cfg.head_init_scale);
                    if let Some(bs) = head.bs.as_mut() {
                        let _ = bs.g_mul_scalar_(cfg.head_init_scale);
                    }
                });
            }
            head
        });
        Ok(VisionTransformer {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            mask_token,
            pos_embed,
            rel_pos_bias,
            blocks,
            norm,
            fc_norm,
            head,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The mean of the patch tokens of [`Self::forward_features`]' output `[B, 1+N, D]`,
    /// through `fc_norm` when the model pools that way ([`GlobalPool::Mean`]; the
    /// tokens then had no final `norm`): `[B, D]`, the frozen-feature representation of
    /// k-NN and linear probing.
    pub fn mean_patch_features(&self, features: &Tensor) -> Tensor {
        let mean = features.narrow(1, 1, self.cfg.num_patches()).mean_dim(
            [1i64].as_slice(),
            false,
            None::<Kind>,
        );
        match &self.fc_norm {
            Some(fc_norm) => mean.apply(fc_norm),
            None => mean,
        }
    }

    /// Copies a shared relative position bias table (`rel_pos_bias.relative_position_bias_table`
    /// of a pretrained [`RelPosBias::Shared`] backbone of the same size) into every
    /// block's own table of this [`RelPosBias::PerBlock`] model (fine-tuning init).
    pub fn load_shared_rel_pos_bias(&self, table: &Tensor) -> Result<()> {
        if self.cfg.variant != Variant::Beit || self.cfg.rel_pos_bias != RelPosBias::PerBlock {
            return Err(shape_err(format!(
                "load_shared_rel_pos_bias: the model has no per-block tables ({:?}, {:?})",
                self.cfg.variant, self.cfg.rel_pos_bias
            )));
        }
        let want = [self.cfg.num_relative_distance(), self.cfg.num_heads];
        if table.size() != want {
            return Err(shape_err(format!(
                "load_shared_rel_pos_bias: table must be {want:?}, got {:?}",
                table.size()
            )));
        }
        tch::no_grad(|| {
            for block in &self.blocks {
                if let Some(r) = &block.attn.rel_pos_bias {
                    let mut own = r.table.shallow_clone();
                    own.f_copy_(table)?;
                }
            }
            Ok(())
        })
    }

    fn check_mask(&self, mask: &Tensor, batch: i64) -> Result<()> {
        let n = self.cfg.num_patches();
        if mask.size() != [batch, n] || mask.kind() != Kind::Bool {
            return Err(shape_err(format!(
                "vit: mask must be a Bool [B, N] = [{batch}, {n}] tensor (true = masked), got {:?} {:?}",
                mask.kind(),
                mask.size()
            )));
        }
        Ok(())
    }

    /// The token sequence entering the first block, `[B, 1+N, D]`: patch embeddings,
    /// masked ones replaced by `mask_token` (before CLS and position terms, as the
    /// spec says: `x*(1-w) + mask_token*w`, computed as a select so unmasked tokens are
    /// bit-identical), CLS prepended, `pos_embed` added (timm variant).
    pub fn embed(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let size = x.size();
        let want = [
            size.first().copied().unwrap_or(-1),
            self.cfg.in_chans,
            self.cfg.image_size,
            self.cfg.image_size,
        ];
        if size.len() != 4 || size[1..] != want[1..] || !x.is_floating_point() {
            return Err(shape_err(format!(
                "vit: expected normalised float images [B, {}, {}, {}], got {:?} {size:?}",
                want[1],
                want[2],
                want[3],
                x.kind()
            )));
        }
        let b = size[0];
        // The residual stream in the parameters' dtype (f32): under bf16 autocast the
        // patch embedding comes out bf16, and PyTorch's type promotion (cat with the f32
        // CLS token, + pos_embed) makes timm's stream f32 too; the blocks' matmuls still
        // run in bf16.
        let mut tokens = self.patch_embed.forward(x)?;
        if tokens.kind() != self.cls_token.kind() {
            tokens = tokens.to_kind(self.cls_token.kind());
        }
        if let Some(mask) = mask {
            self.check_mask(mask, b)?;
            let Some(mask_token) = &self.mask_token else {
                return Err(shape_err(
                    "vit: a mask was given but the model has no mask_token \
                     (Config::use_mask_token)"
                        .into(),
                ));
            };
            tokens = mask_token
                .to_kind(tokens.kind())
                .where_self(&mask.unsqueeze(-1), &tokens);
        }
        let cls = self
            .cls_token
            .to_kind(tokens.kind())
            .expand([b, 1, self.cfg.embed_dim], true);
        let mut tokens = Tensor::cat(&[cls, tokens], 1);
        if let Some(pos) = &self.pos_embed {
            tokens += pos;
        }
        Ok(tokens)
    }

    /// `x`: normalised float images `[B, 3, S, S]`; `mask`: optional Bool `[B, N]`
    /// (true = masked: that patch's embedding is replaced by the mask token — the
    /// student's view; the teacher passes `None`). Returns all tokens after the final
    /// LayerNorm `norm`, `[B, 1+N, D]` (CLS first); with [`GlobalPool::Mean`] there is
    /// no `norm` (timm's `Identity`) and the tokens come straight from the last block.
    /// `train` turns drop path on.
    pub fn forward_features(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let mut tokens = self.embed(x, mask)?;
        let bias = self.rel_pos_bias.as_ref().map(|r| r.forward().unsqueeze(0));
        for block in &self.blocks {
            tokens = block.forward(&tokens, bias.as_ref(), train)?;
        }
        Ok(match &self.norm {
            Some(norm) => tokens.apply(norm),
            None => tokens,
        })
    }

    /// `forward_features`' output pooled — the CLS token ([`GlobalPool::Token`]) or
    /// `fc_norm` of the mean of the patch tokens ([`GlobalPool::Mean`]) — through
    /// `head`: `[B, num_classes]`, or the pooled `[B, D]` when the model has no head.
    pub fn forward_head(&self, features: &Tensor) -> Result<Tensor> {
        let size = features.size();
        if size.len() != 3 || size[1] != self.cfg.num_tokens() || size[2] != self.cfg.embed_dim {
            return Err(shape_err(format!(
                "vit head: expected features [B, {}, {}], got {size:?}",
                self.cfg.num_tokens(),
                self.cfg.embed_dim
            )));
        }
        let pooled = match &self.fc_norm {
            None => features.select(1, 0),
            Some(fc_norm) => features
                .narrow(1, 1, self.cfg.num_patches())
                .mean_dim([1i64].as_slice(), false, None::<Kind>)
                .apply(fc_norm),
        };
        Ok(match &self.head {
            Some(head) => pooled.apply(head),
            None => pooled,
        })
    }

    /// `forward_head(forward_features(x, mask, train))`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.forward_head(&self.forward_features(x, mask, train)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tch::{Device, IndexOp, Kind, Tensor, nn};

    use super::*;
    use crate::train::testing::{micro, seeded};

    fn count(vs: &nn::VarStore) -> i64 {
        vs.trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    fn images(b: i64, s: i64) -> Tensor {
        Tensor::randn([b, 3, s, s], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn known_parameter_counts() {
        // timm 1.0.31: vit_{tiny,small,base,large}_patch16_224 with the 1000-class head.
        let timm = |c: Config| c.timm_style().with_num_classes(1000).with_mask_token(false);
        assert_eq!(timm(Config::vit_tiny()).num_params(), 5_717_416);
        assert_eq!(timm(Config::vit_small()).num_params(), 22_050_664);
        assert_eq!(timm(Config::vit_base()).num_params(), 86_567_656);
        assert_eq!(timm(Config::vit_large()).num_params(), 304_326_632);
        // Without head (num_classes=0).
        let bare = |c: Config| c.timm_style().with_mask_token(false);
        assert_eq!(bare(Config::vit_small()).num_params(), 21_665_664);
        assert_eq!(bare(Config::vit_base()).num_params(), 85_798_656);
        assert_eq!(bare(Config::vit_large()).num_params(), 303_301_632);
        // BEiT-style ConMIM backbones: timm's Beit(use_shared_rel_pos_bias=True,
        // use_abs_pos_emb=False, init_values, global_pool='token', num_classes=0) counts
        // 21,599,016 / 85,665,360 / 303,136,192, plus the mask token (D).
        assert_eq!(Config::vit_small().num_params(), 21_599_016 + 384);
        assert_eq!(Config::vit_base().num_params(), 85_665_360 + 768);
        assert_eq!(Config::vit_large().num_params(), 303_136_192 + 1024);
        assert_eq!(Config::vit_tiny().num_params(), 5_491_092 + 192);
    }

    #[test]
    fn built_models_have_the_counted_parameters() {
        let _rng = seeded(7);
        // Build the real thing for S and B (L is 1.2 GB of f32: counted above only).
        for cfg in [
            Config::vit_small(),
            Config::vit_small()
                .timm_style()
                .with_num_classes(1000)
                .with_mask_token(false),
            Config::vit_base(),
            micro(Variant::Beit).with_num_classes(7),
            micro(Variant::Timm),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            VisionTransformer::new(&cfg, vs.root()).unwrap();
            assert_eq!(count(&vs), cfg.num_params(), "{cfg:?}");
        }
    }

    #[test]
    fn weight_names_match_timm() {
        let _rng = seeded(8);
        let one_block = |c: Config| Config { depth: 1, ..c };
        let names = |cfg: &Config| {
            let vs = nn::VarStore::new(Device::Cpu);
            VisionTransformer::new(cfg, vs.root()).unwrap();
            let shapes: BTreeSet<(String, Vec<i64>)> = vs
                .variables()
                .into_iter()
                .map(|(k, v)| (k, v.size()))
                .collect();
            shapes
        };
        let set = |v: &[(&str, &[i64])]| -> BTreeSet<(String, Vec<i64>)> {
            v.iter().map(|(k, s)| (k.to_string(), s.to_vec())).collect()
        };
        // timm Beit (shared rel pos bias) state_dict + mask_token + the index buffer.
        let beit = names(&one_block(Config::vit_small()));
        let want = set(&[
            ("cls_token", &[1, 1, 384]),
            ("mask_token", &[1, 1, 384]),
            ("patch_embed.proj.weight", &[384, 3, 16, 16]),
            ("patch_embed.proj.bias", &[384]),
            ("rel_pos_bias.relative_position_bias_table", &[732, 6]),
            ("rel_pos_bias.relative_position_index", &[197 * 197]),
            ("blocks.0.gamma_1", &[384]),
            ("blocks.0.gamma_2", &[384]),
            ("blocks.0.norm1.weight", &[384]),
            ("blocks.0.norm1.bias", &[384]),
            ("blocks.0.attn.q_bias", &[384]),
            ("blocks.0.attn.v_bias", &[384]),
            ("blocks.0.attn.qkv.weight", &[1152, 384]),
            ("blocks.0.attn.proj.weight", &[384, 384]),
            ("blocks.0.attn.proj.bias", &[384]),
            ("blocks.0.norm2.weight", &[384]),
            ("blocks.0.norm2.bias", &[384]),
            ("blocks.0.mlp.fc1.weight", &[1536, 384]),
            ("blocks.0.mlp.fc1.bias", &[1536]),
            ("blocks.0.mlp.fc2.weight", &[384, 1536]),
            ("blocks.0.mlp.fc2.bias", &[384]),
            ("norm.weight", &[384]),
            ("norm.bias", &[384]),
        ]);
        assert_eq!(beit, want);
        // timm vit_small_patch16_224's state_dict, exactly.
        let timm = names(
            &one_block(Config::vit_small())
                .timm_style()
                .with_num_classes(1000)
                .with_mask_token(false),
        );
        let want = set(&[
            ("cls_token", &[1, 1, 384]),
            ("pos_embed", &[1, 197, 384]),
            ("patch_embed.proj.weight", &[384, 3, 16, 16]),
            ("patch_embed.proj.bias", &[384]),
            ("blocks.0.norm1.weight", &[384]),
            ("blocks.0.norm1.bias", &[384]),
            ("blocks.0.attn.qkv.weight", &[1152, 384]),
            ("blocks.0.attn.qkv.bias", &[1152]),
            ("blocks.0.attn.proj.weight", &[384, 384]),
            ("blocks.0.attn.proj.bias", &[384]),
            ("blocks.0.norm2.weight", &[384]),
            ("blocks.0.norm2.bias", &[384]),
            ("blocks.0.mlp.fc1.weight", &[1536, 384]),
            ("blocks.0.mlp.fc1.bias", &[1536]),
            ("blocks.0.mlp.fc2.weight", &[384, 1536]),
            ("blocks.0.mlp.fc2.bias", &[384]),
            ("norm.weight", &[384]),
            ("norm.bias", &[384]),
            ("head.weight", &[1000, 384]),
            ("head.bias", &[1000]),
        ]);
        assert_eq!(timm, want);
        // Layer scale in the timm variant uses timm's names.
        let ls = names(&Config {
            layer_scale_init: Some(0.1),
            ..one_block(micro(Variant::Timm))
        });
        assert!(ls.iter().any(|(k, _)| k == "blocks.0.ls1.gamma"));
        assert!(ls.iter().any(|(k, _)| k == "blocks.0.ls2.gamma"));
    }

    #[test]
    fn init_follows_the_official_code() {
        let _rng = seeded(3);
        let vs = nn::VarStore::new(Device::Cpu);
        VisionTransformer::new(&Config::vit_small(), vs.root()).unwrap();
        let v = vs.variables();
        let max = |k: &str| v[k].abs().max().double_value(&[]);
        assert_eq!(max("rel_pos_bias.relative_position_bias_table"), 0.0);
        assert_eq!(max("blocks.3.attn.q_bias"), 0.0);
        assert!(max("blocks.0.attn.qkv.weight") <= 0.02);
        assert!(max("blocks.0.attn.qkv.weight") > 0.019);
        // Block 3 (layer_id 4): proj weights divided by sqrt(8).
        let p = max("blocks.3.attn.proj.weight");
        assert!(
            p <= 0.02 / 8f64.sqrt() + 1e-9 && p > 0.019 / 8f64.sqrt(),
            "{p}"
        );
        assert_eq!(
            v["blocks.5.gamma_1"].min().double_value(&[]),
            0.1_f32 as f64
        );
        assert_eq!(v["norm.weight"].min().double_value(&[]), 1.0);
        let large = Config {
            depth: 1,
            ..Config::vit_large()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        VisionTransformer::new(&large, vs.root()).unwrap();
        let g = vs.variables()["blocks.0.gamma_2"].max().double_value(&[]);
        assert!((g - 1e-5).abs() < 1e-12);
    }

    #[test]
    fn tiny_forward_shapes() {
        let _rng = seeded(0);
        for cfg in [
            Config::vit_tiny().with_num_classes(10),
            Config::vit_tiny().timm_style().with_num_classes(10),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let vit = VisionTransformer::new(&cfg, vs.root()).unwrap();
            let x = images(2, 224);
            let mask = Tensor::rand([2, 196], (Kind::Float, Device::Cpu)).lt(0.75);
            let f = tch::no_grad(|| vit.forward_features(&x, Some(&mask), false)).unwrap();
            assert_eq!(f.size(), [2, 197, 192]);
            let logits = vit.forward_head(&f).unwrap();
            assert_eq!(logits.size(), [2, 10]);
            assert!(bool::try_from(f.isfinite().all()).unwrap());
        }
    }

    #[test]
    fn generic_in_image_and_patch_size() {
        let _rng = seeded(9);
        let cfg = Config::vit_tiny().with_image_size(96).with_patch_size(32);
        assert_eq!(
            (cfg.grid(), cfg.num_patches(), cfg.num_relative_distance()),
            (3, 9, 28)
        );
        let vs = nn::VarStore::new(Device::Cpu);
        let vit = VisionTransformer::new(&Config { depth: 2, ..cfg }, vs.root()).unwrap();
        let f = vit.forward_features(&images(1, 96), None, true).unwrap();
        assert_eq!(f.size(), [1, 10, 192]);
    }

    #[test]
    fn shape_errors_are_clear() {
        let _rng = seeded(10);
        let vs = nn::VarStore::new(Device::Cpu);
        let vit = VisionTransformer::new(&micro(Variant::Beit), vs.root()).unwrap();
        let err = |r: Result<Tensor>| r.unwrap_err().to_string();
        let e = err(vit.forward_features(&images(2, 64), None, false));
        assert!(
            e.contains("[B, 3, 32, 32]") && e.contains("[2, 3, 64, 64]"),
            "{e}"
        );
        let e = err(vit.forward_features(
            &Tensor::zeros([2, 3, 32], (Kind::Float, Device::Cpu)),
            None,
            false,
        ));
        assert!(e.contains("[B, 3, 32, 32]"), "{e}");
        let u8s = Tensor::zeros([2, 3, 32, 32], (Kind::Uint8, Device::Cpu));
        assert!(err(vit.forward_features(&u8s, None, false)).contains("float"));
        let bad_mask = Tensor::zeros([2, 15], (Kind::Bool, Device::Cpu));
        let e = err(vit.forward_features(&images(2, 32), Some(&bad_mask), false));
        assert!(e.contains("[2, 16]") && e.contains("[2, 15]"), "{e}");
        let u8_mask = Tensor::zeros([2, 16], (Kind::Uint8, Device::Cpu));
        assert!(err(vit.forward_features(&images(2, 32), Some(&u8_mask), false)).contains("Bool"));
        let e = err(vit.forward_head(&Tensor::zeros([2, 16, 32], (Kind::Float, Device::Cpu))));
        assert!(e.contains("[B, 17, 32]"), "{e}");
        let vs = nn::VarStore::new(Device::Cpu);
        let no_token = micro(Variant::Beit).with_mask_token(false);
        let vit = VisionTransformer::new(&no_token, vs.root()).unwrap();
        let mask = Tensor::zeros([2, 16], (Kind::Bool, Device::Cpu));
        assert!(
            err(vit.forward_features(&images(2, 32), Some(&mask), false)).contains("mask_token")
        );
        let bad = Config {
            embed_dim: 30,
            ..micro(Variant::Beit)
        };
        let vs = nn::VarStore::new(Device::Cpu);
        assert!(VisionTransformer::new(&bad, vs.root()).is_err());
    }

    #[test]
    fn mask_token_replaces_masked_patches() {
        let _rng = seeded(5);
        for variant in [Variant::Beit, Variant::Timm] {
            let vs = nn::VarStore::new(Device::Cpu);
            let vit = VisionTransformer::new(&micro(variant), vs.root()).unwrap();
            let x = images(2, 32);
            let mut mask_v = vec![false; 32];
            for i in [0usize, 5, 6, 15, 16 + 3, 16 + 9] {
                mask_v[i] = true;
            }
            let mask = Tensor::from_slice(&mask_v).view([2, 16]);
            let plain = vit.embed(&x, None).unwrap();
            let masked = vit.embed(&x, Some(&mask)).unwrap();
            let token = vs.variables()["mask_token"].view([32]);
            let pos = match variant {
                Variant::Timm => vs.variables()["pos_embed"].view([17, 32]),
                Variant::Beit => Tensor::zeros([17, 32], (Kind::Float, Device::Cpu)),
            };
            for (i, &m) in mask_v.iter().enumerate() {
                let (b, n) = (i as i64 / 16, i as i64 % 16);
                let got = masked.i((b, n + 1));
                if m {
                    let want = &token + pos.i(n + 1);
                    assert!(got.allclose(&want, 0.0, 0.0, false), "{variant:?} {i}");
                } else {
                    assert!(got.equal(&plain.i((b, n + 1))), "{variant:?} {i}");
                }
            }
            assert!(masked.i((.., 0)).equal(&plain.i((.., 0))));

            // End to end: the pixels under a masked patch cannot matter, the ones under an
            // unmasked patch do.
            let f0 = vit.forward_features(&x, Some(&mask), false).unwrap();
            let x_masked_patch = x.copy();
            let _ = x_masked_patch.i((0, .., 8..16, 8..16)).fill_(7.0); // patch 5 of image 0
            let f1 = vit
                .forward_features(&x_masked_patch, Some(&mask), false)
                .unwrap();
            assert!(f0.equal(&f1), "{variant:?}: masked pixels leaked");
            let x_open_patch = x.copy();
            let _ = x_open_patch.i((0, .., 0..8, 8..16)).fill_(7.0); // patch 1, unmasked
            let f2 = vit
                .forward_features(&x_open_patch, Some(&mask), false)
                .unwrap();
            assert!(!f0.allclose(&f2, 1e-4, 1e-4, false));

            // The mask token gets a gradient only when something is masked.
            let token = vs.variables()["mask_token"].shallow_clone();
            f0.sum(Kind::Float).backward();
            assert!(token.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
            vs.trainable_variables().iter().for_each(|t| {
                let _ = t.grad().zero_();
            });
            let none = Tensor::zeros([2, 16], (Kind::Bool, Device::Cpu));
            let f3 = vit.forward_features(&x, Some(&none), false).unwrap();
            f3.sum(Kind::Float).backward();
            assert_eq!(token.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
            let f4 = vit.forward_features(&x, None, false).unwrap();
            assert!(f3.equal(&f4));
        }
    }

    #[test]
    fn relative_position_index_matches_beit() {
        // g = 2: tokens cls, (0,0), (0,1), (1,0), (1,1); table rows 9 + 3.
        let idx = relative_position_index(2);
        #[rustfmt::skip]
        let want = vec![
            11, 9, 9, 9, 9,
            10, 4, 3, 1, 0,
            10, 5, 4, 2, 1,
            10, 7, 6, 4, 3,
            10, 8, 7, 5, 4,
        ];
        assert_eq!(idx, want);
        let idx = relative_position_index(14);
        assert_eq!(idx.len(), 197 * 197);
        assert_eq!(*idx.iter().max().unwrap(), 731);
        assert_eq!(idx[1 + 197], 13 * 27 + 13); // a patch to itself: the centre offset
    }

    #[test]
    fn relative_position_bias_is_used_and_trained() {
        let _rng = seeded(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let vit = VisionTransformer::new(&micro(Variant::Beit), vs.root()).unwrap();
        let x = images(2, 32);
        let f0 = vit.forward_features(&x, None, false).unwrap();
        let table = vs.variables()["rel_pos_bias.relative_position_bias_table"].shallow_clone();
        f0.square().sum(Kind::Float).backward();
        assert!(table.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        tch::no_grad(|| {
            let _ = table.i((3, 1)).fill_(2.0);
        });
        let f1 = vit.forward_features(&x, None, false).unwrap();
        assert!(!f0.allclose(&f1, 1e-5, 1e-5, false));
    }

    #[test]
    fn attention_matches_explicit_softmax() {
        // SDPA with the additive bias == softmax(q k^T * scale + bias) v, as in BEiT.
        let _rng = seeded(4);
        let cfg = micro(Variant::Beit);
        let vs = nn::VarStore::new(Device::Cpu);
        let attn = Attention::new(&cfg, vs.root() / "attn", 1);
        tch::no_grad(|| {
            for t in vs.trainable_variables() {
                let _ = t.shallow_clone().normal_(0.0, 0.2);
            }
        });
        let x = Tensor::randn([2, 17, 32], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([1, 4, 17, 17], (Kind::Float, Device::Cpu));
        let got = attn.forward(&x, Some(&bias)).unwrap();
        let v = vs.variables();
        let qkv_b = Tensor::cat(
            &[
                &v["attn.q_bias"],
                &v["attn.q_bias"].zeros_like(),
                &v["attn.v_bias"],
            ],
            0,
        );
        let qkv = x
            .linear(&v["attn.qkv.weight"], Some(&qkv_b))
            .reshape([2, 17, 3, 4, 8])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, vv) = (qkv.get(0) * (8f64).powf(-0.5), qkv.get(1), qkv.get(2));
        let a = (q.matmul(&k.transpose(-2, -1)) + &bias).softmax(-1, Kind::Float);
        let want = a
            .matmul(&vv)
            .transpose(1, 2)
            .reshape([2, 17, 32])
            .linear(&v["attn.proj.weight"], Some(&v["attn.proj.bias"]));
        assert!(got.allclose(&want, 1e-5, 1e-5, false));
    }

    #[test]
    fn drop_path_only_in_training() {
        let _rng = seeded(6);
        let cfg = micro(Variant::Beit).with_drop_path(0.5);
        assert_eq!(cfg.drop_path_of(0), 0.0);
        assert_eq!(cfg.drop_path_of(1), 0.5);
        let vs = nn::VarStore::new(Device::Cpu);
        let vit = VisionTransformer::new(&cfg, vs.root()).unwrap();
        let x = images(8, 32);
        let e0 = vit.forward_features(&x, None, false).unwrap();
        let e1 = vit.forward_features(&x, None, false).unwrap();
        assert!(e0.equal(&e1));
        let t0 = vit.forward_features(&x, None, true).unwrap();
        assert!(!t0.allclose(&e0, 1e-6, 1e-6, false));
        // drop_path itself: per-sample all-or-nothing, survivors scaled by 1/keep.
        let ones = Tensor::ones([1000, 3, 4], (Kind::Float, Device::Cpu));
        let d = drop_path(&ones, 0.25, true);
        let per_sample = d.sum_dim_intlist([1, 2].as_slice(), false, Kind::Float);
        let kept = per_sample.gt(0.0).sum(Kind::Float).double_value(&[]);
        assert!((kept / 1000.0 - 0.75).abs() < 0.06, "{kept}");
        let full = 12.0 / 0.75;
        let zero_or_full = per_sample
            .eq(0.0)
            .logical_or(&(per_sample - full).abs().lt(1e-4));
        assert!(bool::try_from(zero_or_full.all()).unwrap());
        assert!(drop_path(&ones, 0.25, false).equal(&ones));
    }

    // ---- issue 5: fine-tuning backbone options -------------------------------------

    /// Builds timm `model` with `kwargs` (a Python dict literal), loads `weights` strictly,
    /// runs `x` in eval mode and returns (`forward_features`, `forward_head`).
    fn timm_forward(
        python: &std::path::Path,
        model: &str,
        kwargs: &str,
        weights: &[(String, Tensor)],
        x: &Tensor,
    ) -> (Tensor, Tensor) {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("weights.safetensors");
        let inp = dir.path().join("x.safetensors");
        let out = dir.path().join("out.safetensors");
        let cpu: Vec<(String, Tensor)> = weights
            .iter()
            .map(|(k, v)| (k.clone(), v.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        Tensor::write_safetensors(&cpu, &w).unwrap();
        Tensor::write_safetensors(&[("x", x)], &inp).unwrap();
        let script = format!(
            "import sys, torch, timm, safetensors.torch as st\n\
             m = timm.create_model({model:?}, **{kwargs})\n\
             m.load_state_dict(st.load_file(sys.argv[1]), strict=True)\n\
             m.eval()\n\
             x = st.load_file(sys.argv[2])['x']\n\
             with torch.no_grad():\n    f = m.forward_features(x)\n    y = m.forward_head(f)\n\
             st.save_file({{'features': f.contiguous(), 'logits': y.contiguous()}}, sys.argv[3])\n"
        );
        let res = std::process::Command::new(python)
            .arg("-c")
            .arg(&script)
            .args([&w, &inp, &out])
            .output()
            .expect("run python");
        assert!(
            res.status.success(),
            "timm {model} failed:\n{script}\n{}\n{}",
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
        let got: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
            .unwrap()
            .into_iter()
            .collect();
        (
            got["features"].shallow_clone(),
            got["logits"].shallow_clone(),
        )
    }

    /// Our model's variables as timm's strict state dict: the (i64) relative position
    /// indices dropped, since timm keeps them as non-persistent buffers.
    fn timm_weights(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut w: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(k, _)| !k.ends_with("relative_position_index"))
            .collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        w
    }

    fn check_against_timm(label: &str, cfg: &Config, model: &str, kwargs: &str, seed: u64) {
        let _rng = seeded(seed as i64);
        let Some(python) = crate::train::testing::python(label) else {
            return;
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let vit = VisionTransformer::new(cfg, vs.root()).unwrap();
        // Zero tables / biases and the 0.001-scaled head made non-trivial.
        crate::train::testing::perturb(&vs, seed, |_| 0.05);
        let x = crate::train::testing::lcg_tensor(
            seed + 1,
            &[3, 3, cfg.image_size, cfg.image_size],
            Device::Cpu,
        );
        let (want_f, want_y) = timm_forward(&python, model, kwargs, &timm_weights(&vs), &x);
        let (f, y) = tch::no_grad(|| {
            let f = vit.forward_features(&x, None, false).unwrap();
            let y = vit.forward_head(&f).unwrap();
            (f, y)
        });
        assert_eq!(y.size(), [3, cfg.num_classes]);
        let (df, sf) = crate::train::testing::max_diff(&f, &want_f);
        let (dy, sy) = crate::train::testing::max_diff(&y, &want_y);
        assert!(
            df < 1e-4,
            "{label}: features differ from timm by {df} (max {sf})"
        );
        assert!(
            dy < 1e-4,
            "{label}: logits differ from timm by {dy} (max {sy})"
        );
        assert!(sy > 1e-3, "{label}: logits too small to compare ({sy})");
    }

    #[test]
    fn issue5_finetune_backbone_matches_timm_beit() {
        let cfg = micro(Variant::Beit).finetune(10, 0.001);
        assert_eq!(
            (cfg.rel_pos_bias, cfg.global_pool, cfg.use_mask_token),
            (RelPosBias::PerBlock, GlobalPool::Mean, false)
        );
        let kwargs = "dict(pretrained=False, num_classes=10, global_pool='avg', img_size=32, \
                      patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=4, \
                      mlp_ratio=4.0, qkv_bias=True, init_values=0.1, use_abs_pos_emb=False, \
                      use_rel_pos_bias=True, use_shared_rel_pos_bias=False)";
        check_against_timm(
            "issue5_finetune_backbone_matches_timm_beit",
            &cfg,
            "beit_base_patch16_224",
            kwargs,
            51,
        );
    }

    #[test]
    fn issue5_finetune_backbone_matches_timm_vit() {
        let cfg = micro(Variant::Timm).finetune(10, 0.001);
        let kwargs = "dict(pretrained=False, num_classes=10, global_pool='avg', img_size=32, \
                      patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=4, \
                      mlp_ratio=4.0, qkv_bias=True, init_values=None)";
        check_against_timm(
            "issue5_finetune_backbone_matches_timm_vit",
            &cfg,
            "vit_base_patch16_224",
            kwargs,
            52,
        );
    }

    #[test]
    fn finetune_names_and_counts() {
        let _rng = seeded(53);
        let cfg = micro(Variant::Beit).finetune(10, 0.001);
        let vs = nn::VarStore::new(Device::Cpu);
        VisionTransformer::new(&cfg, vs.root()).unwrap();
        assert_eq!(count(&vs), cfg.num_params());
        // Shared model + one table per extra block, same count otherwise (fc_norm = norm).
        let shared = micro(Variant::Beit)
            .with_mask_token(false)
            .with_num_classes(10);
        assert_eq!(
            cfg.num_params(),
            shared.num_params() + cfg.num_relative_distance() * cfg.num_heads
        );
        let v = vs.variables();
        for i in 0..2 {
            assert_eq!(
                v[&format!("blocks.{i}.attn.relative_position_bias_table")].size(),
                [cfg.num_relative_distance(), 4]
            );
            let idx = &v[&format!("blocks.{i}.attn.relative_position_index")];
            assert!(idx.equal(&Tensor::from_slice(&relative_position_index(4))));
            assert!(
                !vs.trainable_variables()
                    .iter()
                    .any(|t| t.kind() == Kind::Int64)
            );
        }
        assert_eq!(v["fc_norm.weight"].size(), [32]);
        assert_eq!(v["fc_norm.bias"].size(), [32]);
        assert_eq!(v["head.weight"].size(), [10, 32]);
        for gone in ["norm.weight", "norm.bias", "mask_token"] {
            assert!(!v.contains_key(gone), "{gone}");
        }
        assert!(!v.keys().any(|k| k.starts_with("rel_pos_bias")));
        // Timm variant: fc_norm, no norm, no relative position bias.
        let timm = micro(Variant::Timm).finetune(10, 0.001);
        let vs = nn::VarStore::new(Device::Cpu);
        VisionTransformer::new(&timm, vs.root()).unwrap();
        assert_eq!(count(&vs), timm.num_params());
        let v = vs.variables();
        assert!(v.contains_key("fc_norm.weight") && !v.contains_key("norm.weight"));
        assert!(!v.keys().any(|k| k.contains("relative_position")));
        // The timm variant refuses a per-block table.
        let bad = micro(Variant::Timm).with_rel_pos_bias(RelPosBias::PerBlock);
        let vs = nn::VarStore::new(Device::Cpu);
        let e = VisionTransformer::new(&bad, vs.root())
            .unwrap_err()
            .to_string();
        assert!(e.contains("rel_pos_bias"), "{e}");
    }

    #[test]
    fn mean_pool_uses_patch_tokens_and_fc_norm() {
        let _rng = seeded(54);
        let cfg = micro(Variant::Beit).finetune(0, 1.0);
        let vs = nn::VarStore::new(Device::Cpu);
        let vit = VisionTransformer::new(&cfg, vs.root()).unwrap();
        crate::train::testing::perturb(&vs, 54, |_| 0.1);
        let f = Tensor::randn([2, 17, 32], (Kind::Float, Device::Cpu));
        let got = vit.forward_head(&f).unwrap();
        let v = vs.variables();
        let want = f
            .i((.., 1..))
            .mean_dim([1i64].as_slice(), false, None::<Kind>)
            .layer_norm(
                [32i64].as_slice(),
                Some(&v["fc_norm.weight"]),
                Some(&v["fc_norm.bias"]),
                1e-6,
                false,
            );
        assert!(got.allclose(&want, 1e-6, 1e-6, false));
        // The CLS token does not matter.
        let f2 = f.copy();
        let _ = f2.i((.., 0)).fill_(5.0);
        assert!(vit.forward_head(&f2).unwrap().equal(&got));
        // k-NN / linear-probe features are what the head reads; without fc_norm the
        // plain mean.
        assert!(vit.mean_patch_features(&f).equal(&got));
        let token = VisionTransformer::new(&micro(Variant::Beit), vs.root() / "token").unwrap();
        let mean = f
            .i((.., 1..))
            .mean_dim([1i64].as_slice(), false, None::<Kind>);
        assert!(token.mean_patch_features(&f).equal(&mean));
    }

    #[test]
    fn head_init_scale_scales_the_init() {
        let build = |scale: f64| {
            let _rng = seeded(55);
            let cfg = micro(Variant::Beit)
                .with_num_classes(10)
                .with_head_init_scale(scale);
            let vs = nn::VarStore::new(Device::Cpu);
            VisionTransformer::new(&cfg, vs.root()).unwrap();
            vs.variables()
        };
        let (one, small) = (build(1.0), build(0.001));
        let w1 = &one["head.weight"];
        let w = &small["head.weight"];
        // timm's trunc_normal_(std=0.02) as the official fine-tuning head: a plain
        // normal, not cut at one std like the pretraining weights.
        assert!(w1.abs().max().double_value(&[]) > 0.03);
        let std = w1.std(true).double_value(&[]);
        assert!((0.016..0.024).contains(&std), "std {std}");
        assert!(w.allclose(&(w1 * 0.001), 1e-12, 0.0, false));
        assert_eq!(small["head.bias"].abs().max().double_value(&[]), 0.0);
        // Nothing else changes.
        for (k, t) in &one {
            if !k.starts_with("head.") {
                assert!(t.equal(&small[k]), "{k}");
            }
        }
        // The default keeps today's behaviour.
        assert_eq!(Config::vit_base().head_init_scale, 1.0);
    }

    #[test]
    fn expand_shared_rel_pos_bias_gives_the_same_model() {
        let _rng = seeded(56);
        let shared_cfg = micro(Variant::Beit).with_mask_token(false);
        let per_cfg = shared_cfg.clone().with_rel_pos_bias(RelPosBias::PerBlock);
        let vs = nn::VarStore::new(Device::Cpu);
        let shared = VisionTransformer::new(&shared_cfg, vs.root()).unwrap();
        crate::train::testing::perturb(&vs, 56, |_| 0.2);
        let mut state = vs.variables();
        let table = state
            .remove("rel_pos_bias.relative_position_bias_table")
            .unwrap();
        let index = state
            .remove("rel_pos_bias.relative_position_index")
            .unwrap();
        let expanded = expand_shared_rel_pos_bias(&shared_cfg, &table, Some(&index)).unwrap();
        assert_eq!(expanded.len(), 4);
        state.extend(expanded);

        let vs2 = nn::VarStore::new(Device::Cpu);
        let per = VisionTransformer::new(&per_cfg, vs2.root()).unwrap();
        let mut names: Vec<String> = vs2.variables().into_keys().collect();
        names.sort();
        let mut have: Vec<String> = state.keys().cloned().collect();
        have.sort();
        assert_eq!(
            names, have,
            "the expanded state dict is exactly the per-block model's"
        );
        tch::no_grad(|| {
            for (k, mut t) in vs2.variables() {
                t.copy_(&state[&k]);
            }
        });
        let x = images(2, 32);
        let (a, b) = tch::no_grad(|| {
            (
                shared.forward_features(&x, None, false).unwrap(),
                per.forward_features(&x, None, false).unwrap(),
            )
        });
        assert!(a.allclose(&b, 1e-6, 1e-6, false));

        // load_shared_rel_pos_bias does the same on a built model.
        let vs3 = nn::VarStore::new(Device::Cpu);
        let per3 = VisionTransformer::new(&per_cfg, vs3.root()).unwrap();
        tch::no_grad(|| {
            for (k, mut t) in vs3.variables() {
                if !k.contains("relative_position") {
                    t.copy_(&state[&k]);
                }
            }
        });
        per3.load_shared_rel_pos_bias(&table).unwrap();
        let c = tch::no_grad(|| per3.forward_features(&x, None, false).unwrap());
        assert!(a.allclose(&c, 1e-6, 1e-6, false));
        // The blocks' tables are separate parameters: each gets its own gradient.
        let t0 = vs3.variables()["blocks.0.attn.relative_position_bias_table"].shallow_clone();
        let t1 = vs3.variables()["blocks.1.attn.relative_position_bias_table"].shallow_clone();
        per3.forward_features(&x, None, false)
            .unwrap()
            .square()
            .sum(Kind::Float)
            .backward();
        assert!(!t0.grad().allclose(&t1.grad(), 1e-6, 1e-6, false));

        // Errors.
        let bad = Tensor::zeros([5, 4], (Kind::Float, Device::Cpu));
        assert!(expand_shared_rel_pos_bias(&shared_cfg, &bad, None).is_err());
        let bad_index = index.zeros_like();
        assert!(expand_shared_rel_pos_bias(&shared_cfg, &table, Some(&bad_index)).is_err());
        assert!(shared.load_shared_rel_pos_bias(&table).is_err());
        assert!(per3.load_shared_rel_pos_bias(&bad).is_err());
    }

    #[test]
    fn configs_without_the_new_fields_read_as_before() {
        for cfg in [Config::vit_small(), Config::vit_base().timm_style()] {
            let mut json = serde_json::to_value(&cfg).unwrap();
            let obj = json.as_object_mut().unwrap();
            for k in ["rel_pos_bias", "global_pool", "head_init_scale"] {
                assert!(obj.remove(k).is_some(), "{k}");
            }
            let back: Config = serde_json::from_value(json).unwrap();
            assert_eq!(back, cfg);
        }
        let pre = Config::vit_small();
        assert_eq!(
            (pre.rel_pos_bias, pre.global_pool, pre.head_init_scale),
            (RelPosBias::Shared, GlobalPool::Token, 1.0)
        );
    }
}
