//! The fine-tuning classifier: a [`VisionTransformer`] with a head, its initialisation
//! from pretrained weights (with a logged mapping) and its checkpoints.
//!
//! Initialisation sources ([`load_pretrained`]):
//!
//! * a pretraining run directory (its newest complete checkpoint) or checkpoint
//!   directory: the TEACHER's backbone by default ([`Weights::Student`] on request);
//! * a fine-tuning run (its best checkpoint) or checkpoint: the classifier, head
//!   included when its shape fits (another label set: the head starts new);
//! * a `.safetensors` state dict under timm's names (what `conmim export` writes, or
//!   another backbone of the same architecture).
//!
//! Mapping: the shared `rel_pos_bias.relative_position_bias_table` is copied into every
//! `blocks.{i}.attn.relative_position_bias_table`; the projection head `projectors.*`,
//! `mask_token`, a classifier `head.*` this model has none of or one of another shape,
//! the final `norm.*` when the classifier pools with `fc_norm`, and
//! `relative_position_index` buffers (rebuilt) are ignored; `head.*` and `fc_norm.*`
//! start new unless the source has them in this model's shapes (a fine-tuned source). A source pretrained at another resolution (same patch
//! size) has its position terms resampled to this model's patch grid
//! ([`crate::train::pos_resize`]: `pos_embed` bicubically, relative position bias
//! tables by BEiT's interpolation), e.g. 224-px pretraining fine-tuned at 384 px.
//! Anything else that is missing, left over or of another shape is an error (a
//! checkpoint of another architecture), and nothing is changed.
//!
//! Checkpoints of a fine-tuning run (`OUT/checkpoints/{last,best}/`): `model.safetensors`
//! (the classifier's variables, timm names, f32 on the CPU) and `state.json`
//! ([`FinetuneState`]). Written into a temporary directory, fsynced, then renamed into
//! place ([`checkpoint::publish`]); what a killed save leaves is repaired by
//! [`checkpoint::recover`] when the next run starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use super::config::FinetuneConfig;
use crate::train::checkpoint;
use crate::train::export::{Weights, resolve_checkpoint};
use crate::train::input::{IMAGENET_MEAN, IMAGENET_STD, normalize_nhwc};
use crate::train::vit::{Config, GlobalPool, RelPosBias, VisionTransformer};

/// `state.json` of a fine-tuning checkpoint.
pub const FINETUNE_KIND: &str = "conmim-finetune";

/// A classifier and its variables.
#[derive(Debug)]
pub struct Classifier {
    pub vs: nn::VarStore,
    pub vit: VisionTransformer,
    pub cfg: Config,
}

impl Classifier {
    /// A freshly initialised classifier (seed with `tch::manual_seed` first).
    pub fn new(cfg: &Config, device: Device) -> Result<Self> {
        if cfg.num_classes <= 0 {
            bail!("a classifier needs num_classes > 0");
        }
        let vs = nn::VarStore::new(device);
        let vit = VisionTransformer::new(cfg, vs.root()).context("building the classifier")?;
        Ok(Classifier {
            vs,
            vit,
            cfg: cfg.clone(),
        })
    }

    /// Logits `[B, classes]` (f32) of u8 NHWC images `[B, S, S, 3]`, normalised with
    /// the ImageNet mean / std; bf16 autocast when `amp`.
    pub fn logits_u8(&self, images: &Tensor, train: bool, amp: bool) -> Result<Tensor> {
        let x = normalize_nhwc(images, IMAGENET_MEAN, IMAGENET_STD)?;
        self.logits(&x, train, amp)
    }

    /// Logits of normalised float images `[B, 3, S, S]`.
    pub fn logits(&self, x: &Tensor, train: bool, amp: bool) -> Result<Tensor> {
        let out = crate::train::cuda::autocast_bf16(amp, || self.vit.forward(x, None, train))??;
        Ok(out.to_kind(Kind::Float))
    }

    /// The variables as f32 CPU tensors, sorted by name.
    pub fn cpu_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// What [`load_pretrained`] did, for the log and `OUT/init.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InitReport {
    pub source: PathBuf,
    /// `teacher` / `student` for a pretraining checkpoint, `finetuned` for a fine-tuning
    /// one, `file` for safetensors.
    pub weights: String,
    /// Variables copied from the source.
    pub loaded: Vec<String>,
    /// Variables that keep their fresh initialisation (head, fc_norm, rebuilt buffers).
    pub new: Vec<String>,
    /// Source tensors not used, each with why.
    pub ignored: Vec<String>,
    /// Source tensors copied into several variables.
    pub expanded: Vec<String>,
    /// Source position terms resampled to this model's patch grid.
    pub resized: Vec<String>,
}

/// Reads the tensors of `source` (see the module docs), the source's own network config
/// when it is a pretraining or fine-tuning checkpoint, and which weights they are
/// (`teacher`, `student`, `finetuned`, `file`).
pub fn read_source(
    source: &Path,
    weights: Weights,
) -> Result<(BTreeMap<String, Tensor>, Option<Config>, String)> {
    if let Some(dir) = checkpoint_dir(source) {
        // A fine-tuned classifier (e.g. 224 px -> 384 px, or another label set).
        if weights == Weights::Student {
            bail!(
                "{}: a fine-tuning checkpoint holds one network; --init-weights student \
                 applies to pretraining checkpoints",
                dir.display()
            );
        }
        let state = read_state(&dir)?;
        let file = dir.join(checkpoint::MODEL_FILE);
        let t = Tensor::read_safetensors(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        return Ok((
            t.into_iter().collect(),
            Some(state.net),
            "finetuned".to_owned(),
        ));
    }
    if source.is_file() {
        if weights == Weights::Student {
            bail!(
                "{}: a .safetensors file holds one network; student weights (--init-weights / \
                 --weights student) apply to pretraining checkpoints",
                source.display()
            );
        }
        let t = Tensor::read_safetensors(source).with_context(|| {
            format!(
                "reading {} (expected a .safetensors state dict)",
                source.display()
            )
        })?;
        return Ok((t.into_iter().collect(), None, "file".to_owned()));
    }
    let dir = resolve_checkpoint(source)?;
    let state = checkpoint::read_state(&dir)
        .with_context(|| format!("{}: not a conmim pretraining checkpoint", dir.display()))?;
    let model_file = dir.join(checkpoint::MODEL_FILE);
    let prefix = format!("{}.", weights.prefix());
    let t: BTreeMap<String, Tensor> = Tensor::read_safetensors(&model_file)
        .with_context(|| format!("reading {}", model_file.display()))?
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix(&prefix).map(|k| (k.to_owned(), t)))
        .collect();
    if t.is_empty() {
        bail!("{}: no `{prefix}*` tensors", model_file.display());
    }
    Ok((t, Some(state.config.model), weights.prefix().to_owned()))
}

/// Whether two backbones have the same architecture (what the weights' shapes and
/// meaning depend on), up to the image size: position terms are resampled to another
/// patch grid.
fn same_architecture(a: &Config, b: &Config) -> bool {
    a.variant == b.variant
        && a.patch_size == b.patch_size
        && a.in_chans == b.in_chans
        && a.embed_dim == b.embed_dim
        && a.depth == b.depth
        && a.num_heads == b.num_heads
        && a.mlp_ratio == b.mlp_ratio
        && a.qkv_bias == b.qkv_bias
        && a.layer_scale_init.is_some() == b.layer_scale_init.is_some()
}

fn describe(c: &Config) -> String {
    format!(
        "{:?} {}-dim x {} blocks, {} heads, patch {} at {} px",
        c.variant, c.embed_dim, c.depth, c.num_heads, c.patch_size, c.image_size
    )
}

/// Initialises `net` from `source` (see the module docs). Errors leave `net` unchanged.
pub fn load_pretrained(net: &Classifier, source: &Path, weights: Weights) -> Result<InitReport> {
    let (src, src_cfg, what) = read_source(source, weights)?;
    if let Some(sc) = &src_cfg
        && !same_architecture(sc, &net.cfg)
    {
        bail!(
            "{}: the checkpoint is of another architecture ({}); this run builds {} \
             (pick the matching --preset, or --set model.* to match)",
            source.display(),
            describe(sc),
            describe(&net.cfg)
        );
    }
    let mut report =
        map_into(net, src).with_context(|| format!("initialising from {}", source.display()))?;
    report.source = source.to_owned();
    report.weights = what;
    Ok(report)
}

/// Resamples the source's `pos_embed` and relative position bias tables whose patch grid
/// (read off their shapes) is not `grid`. A tensor whose shape names no grid is left for
/// the shape check to refuse.
fn resize_position_terms(
    src: &mut BTreeMap<String, Tensor>,
    grid: i64,
    r: &mut InitReport,
) -> Result<()> {
    use crate::train::pos_resize as pr;
    for (name, t) in src.iter_mut() {
        let size = t.size();
        let (from, how) = if name == "pos_embed" && size.len() == 3 {
            (pr::pos_embed_grid(size[1]), "bicubic")
        } else if name.ends_with("relative_position_bias_table") && size.len() == 2 {
            (
                pr::rel_pos_table_grid(size[0]),
                "BEiT's geometric-progression interpolation",
            )
        } else {
            continue;
        };
        let Some(from) = from.filter(|&g| g != grid) else {
            continue;
        };
        *t = if how == "bicubic" {
            pr::resample_pos_embed(t, grid)
        } else {
            pr::resize_rel_pos_bias_table(t, grid)
        }
        .with_context(|| format!("resampling `{name}` to a {grid}x{grid} patch grid"))?;
        r.resized.push(format!(
            "{name}: {from}x{from} -> {grid}x{grid} patches ({how})"
        ));
    }
    Ok(())
}

/// The mapping of [`load_pretrained`] from named tensors.
pub fn map_into(net: &Classifier, mut src: BTreeMap<String, Tensor>) -> Result<InitReport> {
    let cfg = &net.cfg;
    let mut r = InitReport::default();
    resize_position_terms(&mut src, cfg.grid(), &mut r)?;
    const SHARED: &str = "rel_pos_bias.relative_position_bias_table";
    if cfg.rel_pos_bias == RelPosBias::PerBlock
        && let Some(t) = src.remove(SHARED)
    {
        for i in 0..cfg.depth {
            src.entry(format!("blocks.{i}.attn.relative_position_bias_table"))
                .or_insert_with(|| t.shallow_clone());
        }
        r.expanded.push(format!(
            "{SHARED} -> blocks.{{0..{}}}.attn.relative_position_bias_table",
            cfg.depth - 1
        ));
    }
    // The features a source classifier was trained on: mean-pooled patch tokens after
    // `fc_norm`, or the CLS token after `norm`. Its head only fits a classifier that
    // pools the same way.
    let src_pool = if src.contains_key("fc_norm.weight") {
        GlobalPool::Mean
    } else {
        GlobalPool::Token
    };
    let pooled = |p: GlobalPool| match p {
        GlobalPool::Mean => "the mean of the patch tokens after fc_norm",
        GlobalPool::Token => "the CLS token after norm",
    };
    let mut vars: Vec<(String, Tensor)> = net.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut copies: Vec<(Tensor, Tensor)> = Vec::new();
    for (name, var) in &vars {
        if name.ends_with("relative_position_index") {
            src.remove(name);
            r.new.push(format!("{name} (buffer, rebuilt)"));
            continue;
        }
        match src.remove(name) {
            Some(_) if name.starts_with("head.") && src_pool != cfg.global_pool => {
                r.ignored.push(format!(
                    "{name}: the source's classifier reads {}, this one {}",
                    pooled(src_pool),
                    pooled(cfg.global_pool)
                ));
                r.new.push(name.clone());
            }
            Some(t) if name.starts_with("head.") && t.size() != var.size() => {
                // A classifier of another label set: this one's head starts new.
                r.ignored.push(format!(
                    "{name}: the source's classifier is {:?}, this one {:?}",
                    t.size(),
                    var.size()
                ));
                r.new.push(name.clone());
            }
            Some(t) => {
                if t.size() != var.size() {
                    bail!(
                        "`{name}` is {:?} in the source, this model needs {:?} (a checkpoint \
                         of another architecture?)",
                        t.size(),
                        var.size()
                    );
                }
                copies.push((var.shallow_clone(), t));
                r.loaded.push(name.clone());
            }
            None if name.starts_with("head.")
                || name.starts_with("fc_norm.")
                || (name.starts_with("norm.") && src_pool == GlobalPool::Mean) =>
            {
                r.new.push(name.clone())
            }
            None => bail!(
                "`{name}` is missing from the source (a checkpoint of another architecture, \
                 or not a backbone?)"
            ),
        }
    }
    let (mut n_proj, mut n_head) = (0, 0);
    for k in src.keys() {
        if k.starts_with("projectors.") {
            n_proj += 1;
        } else if k.starts_with("head.") {
            n_head += 1;
        } else if k == "mask_token" {
            r.ignored.push("mask_token: pretraining only".into());
        } else if k.ends_with("relative_position_index") {
            r.ignored.push(format!("{k}: rebuilt"));
        } else if k.starts_with("norm.") && cfg.global_pool == GlobalPool::Mean {
            r.ignored.push(format!(
                "{k}: the classifier pools with a new fc_norm (no final norm)"
            ));
        } else if k.starts_with("fc_norm.") && cfg.global_pool == GlobalPool::Token {
            r.ignored.push(format!(
                "{k}: the classifier reads the CLS token after a new norm"
            ));
        } else {
            bail!("`{k}` in the source has no place in this model (another architecture?)");
        }
    }
    if n_proj > 0 {
        r.ignored.push(format!(
            "projectors.* ({n_proj} tensors): the ConMIM projection head"
        ));
    }
    if n_head > 0 {
        r.ignored.push(format!(
            "head.* ({n_head} tensors): the source's classifier"
        ));
    }
    tch::no_grad(|| -> Result<()> {
        for (mut v, t) in copies {
            v.f_copy_(&t)?;
        }
        Ok(())
    })?;
    Ok(r)
}

/// `state.json` of a fine-tuning checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneState {
    /// Always [`FINETUNE_KIND`].
    pub kind: String,
    pub config: FinetuneConfig,
    /// The network built from `config` ([`FinetuneConfig::net_config`]).
    pub net: Config,
    /// Epochs completed.
    pub epoch: u32,
    pub step: u64,
    pub acc1: Option<f64>,
    pub acc5: Option<f64>,
    /// What `--resume` needs besides the weights (in `checkpoints/last`, whose
    /// `optimizer.safetensors` holds the AdamW moments); `None` in `checkpoints/best`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<ResumeState>,
}

/// The run's position at the end of an epoch, for `conmim finetune --resume`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResumeState {
    /// Samples trained on so far (all ranks).
    pub samples: u64,
    pub final_loss: Option<f64>,
    pub last: Option<super::run::EvalResult>,
    pub best: Option<super::run::EvalResult>,
    pub best_epoch: Option<u32>,
    /// Every rank's loader position after its last batch of the epoch (one entry for a
    /// single process).
    pub loader_states: Vec<crate::loader::LoaderState>,
    /// The optimiser's groups and their variables ([`crate::train::optim::AdamW::layout`]).
    pub optimizer_layout: Vec<Vec<String>>,
}

/// Writes `net` and `state` as checkpoint `dir` (replacing it atomically), and the
/// optimiser's moments when `opt` is given (a resumable checkpoint).
pub fn save(
    dir: &Path,
    net: &Classifier,
    state: &FinetuneState,
    opt: Option<&crate::train::optim::AdamW>,
) -> Result<()> {
    let tmp = checkpoint::begin(dir)?;
    let write = || -> Result<()> {
        Tensor::write_safetensors(&net.cpu_tensors(), tmp.join(checkpoint::MODEL_FILE))
            .with_context(|| format!("writing {}", tmp.display()))?;
        checkpoint::crash_point("written", dir);
        if let Some(opt) = opt {
            checkpoint::write_optimizer(opt, &tmp.join(checkpoint::OPTIMIZER_FILE))?;
        }
        crate::format::atomic_write_json(&tmp.join(checkpoint::STATE_FILE), state)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint {}", dir.display())));
    }
    checkpoint::publish(&tmp, dir)
}

/// The fine-tuning checkpoint `path` names, if it names one: `path` itself, or a
/// fine-tuning run's `checkpoints/best`, else `checkpoints/last` (the first whose
/// `state.json` has kind [`FINETUNE_KIND`]). `None` for anything else (a pretraining run
/// or checkpoint, a missing path).
pub fn checkpoint_dir(path: &Path) -> Option<PathBuf> {
    [
        path.to_owned(),
        path.join("checkpoints/best"),
        path.join("checkpoints/last"),
    ]
    .into_iter()
    .find(|d| {
        std::fs::read(d.join(checkpoint::STATE_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v.get("kind").and_then(|k| k.as_str()) == Some(FINETUNE_KIND))
    })
}

/// Reads a fine-tuning checkpoint (the directory, or a run directory: its `best`, else
/// `last`) into a classifier on `device`, strictly.
pub fn load(path: &Path, device: Device) -> Result<(Classifier, FinetuneState, PathBuf)> {
    let dir = [
        path.to_owned(),
        path.join("checkpoints/best"),
        path.join("checkpoints/last"),
    ]
    .into_iter()
    .find(|d| d.join(checkpoint::STATE_FILE).is_file())
    .with_context(|| {
        format!(
            "{}: no fine-tuning checkpoint (state.json) there or under checkpoints/best|last",
            path.display()
        )
    })?;
    let state = read_state(&dir)?;
    let net = Classifier::new(&state.net, device)?;
    load_weights(&net, &dir)?;
    Ok((net, state, dir))
}

/// Reads and checks the `state.json` of fine-tuning checkpoint `dir`.
pub fn read_state(dir: &Path) -> Result<FinetuneState> {
    let sp = dir.join(checkpoint::STATE_FILE);
    let text = std::fs::read(&sp).with_context(|| format!("reading {}", sp.display()))?;
    let state: FinetuneState = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{}: not a fine-tuning checkpoint (a pretraining checkpoint? fine-tune it first, \
             or use `conmim knn`)",
            sp.display()
        )
    })?;
    if state.kind != FINETUNE_KIND {
        bail!(
            "{}: kind `{}`, expected `{FINETUNE_KIND}`",
            sp.display(),
            state.kind
        );
    }
    Ok(state)
}

/// Copies the weights of checkpoint `dir` into `net` (in place: variables that live in
/// an optimiser's flat buffers stay there). Every tensor must match by name and shape.
pub fn load_weights(net: &Classifier, dir: &Path) -> Result<()> {
    let file = dir.join(checkpoint::MODEL_FILE);
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&file)
        .with_context(|| format!("reading {}", file.display()))?
        .into_iter()
        .collect();
    let vars = net.vs.variables();
    if vars.len() != tensors.len() {
        bail!(
            "{}: {} tensors, the model of its state.json has {}",
            file.display(),
            tensors.len(),
            vars.len()
        );
    }
    tch::no_grad(|| -> Result<()> {
        for (name, mut v) in vars {
            let t = tensors
                .get(&name)
                .with_context(|| format!("{}: `{name}` missing", file.display()))?;
            if t.size() != v.size() {
                bail!(
                    "{}: `{name}` has shape {:?}, expected {:?}",
                    file.display(),
                    t.size(),
                    v.size()
                );
            }
            v.f_copy_(t)?;
        }
        Ok(())
    })
}
