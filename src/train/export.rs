//! `conmim export RUN --format timm`: a pretraining run's backbone as a safetensors
//! state dict that timm loads STRICTLY (`load_state_dict(..., strict=True)`), for
//! fine-tuning elsewhere.
//!
//! The weights are the TEACHER's backbone by default (the momentum encoder, which is
//! what the official ConMIM fine-tuning starts from); [`Weights::Student`] takes the
//! student's instead. They come from the newest complete checkpoint of the run
//! directory (`RUN/checkpoints/step-*`), or from the checkpoint directory given.
//!
//! Name mapping (the backbone's names already are timm's, see [`super::vit`]):
//!
//! * BEiT-style variant -> timm `beit.Beit` (`beit_base_patch16_224` /
//!   `beit_large_patch16_224` with the run's sizes as kwargs; timm has no small or tiny
//!   BEiT entry point, the kwargs build any size): timm keeps one relative position
//!   bias table PER BLOCK, so the shared `rel_pos_bias.relative_position_bias_table` is
//!   copied into every `blocks.{i}.attn.relative_position_bias_table` (what the
//!   official BEiT/ConMIM fine-tuning does with a shared table);
//!   `rel_pos_bias.relative_position_index` is dropped (timm rebuilds the same index as
//!   a non-persistent buffer; checked equal to BEiT's formula before dropping).
//! * timm-style variant -> timm `VisionTransformer` (`vit_{tiny,small,base,large}_patch16_224`),
//!   names unchanged.
//! * Both: `mask_token` (pretraining only), the ConMIM projection head `projectors.*`
//!   (BatchNorm statistics included) and a classifier `head.*`, if any, are dropped;
//!   the model is built with `num_classes=0, global_pool='token'`, so timm's
//!   `forward_features` ends in the same final `norm` as this crate's.
//!
//! A FINE-TUNING run or checkpoint (`conmim finetune`) exports its whole classifier
//! instead: its best checkpoint (`checkpoints/best`, else `last`), or the checkpoint
//! directory given, with `head.*` kept and `num_classes` / `global_pool` as trained
//! (`avg`: mean-pooled patch tokens + `fc_norm`, no final `norm`; timm builds the same),
//! so that timm's `model(x)` gives the same logits.
//!
//! The file carries, in its safetensors `__metadata__`, the timm model name, its
//! kwargs (JSON), the exact Python line that builds the model and loads the file, the
//! source checkpoint and step, and what was dropped / expanded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tch::{Kind, Tensor};

use super::checkpoint;
use super::vit::{Config, GlobalPool, Variant, relative_position_index};

/// Which network's backbone to export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Weights {
    /// The momentum teacher (what the official fine-tuning uses).
    #[default]
    Teacher,
    /// The student.
    Student,
}

impl Weights {
    /// The key prefix of this network in a checkpoint's `model.safetensors`.
    pub fn prefix(self) -> &'static str {
        match self {
            Weights::Teacher => "teacher",
            Weights::Student => "student",
        }
    }
}

/// Options of [`export_timm`].
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    pub weights: Weights,
}

/// What [`export_timm`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    /// The checkpoint directory read.
    pub checkpoint: PathBuf,
    pub step: u64,
    /// Which network of a pretraining checkpoint; `None` for a fine-tuned classifier.
    pub weights: Option<Weights>,
    pub variant: Variant,
    pub out: PathBuf,
    /// Tensors in the file.
    pub tensors: usize,
    /// Their elements (all f32).
    pub numel: i64,
    pub bytes: u64,
    /// The timm entry point to build the model with.
    pub timm_model: String,
    /// Its keyword arguments, as Python source (`name=value`, in order).
    pub timm_kwargs: Vec<(String, String)>,
    /// One Python line that builds the timm model (`model`) and loads the file strictly.
    pub python: String,
    /// Checkpoint tensors not written, each with why (`name (n tensors): reason`).
    pub dropped: Vec<String>,
    /// Tensors written several times under timm's names.
    pub expanded: Vec<String>,
    /// A fine-tuned classifier (`None`: a pretraining backbone): its classes, epoch and
    /// top-1, in words.
    pub classifier: Option<String>,
}

/// The newest complete checkpoint of run directory `path`, or `path` itself when it is
/// a checkpoint directory.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(checkpoint::STATE_FILE).is_file() {
        return Ok(path.to_owned());
    }
    if !path.is_dir() {
        bail!("{}: no such run or checkpoint directory", path.display());
    }
    let root = checkpoint::dir_of(path);
    checkpoint::latest(&root)?.with_context(|| {
        format!(
            "{}: neither a checkpoint directory (no {}) nor a run directory with a complete \
             checkpoint under {}",
            path.display(),
            checkpoint::STATE_FILE,
            root.display()
        )
    })
}

/// A timm model to build: entry point and keyword arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct TimmTarget {
    pub model: &'static str,
    /// `(name, Python literal)`, in order.
    pub kwargs: Vec<(String, String)>,
}

fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.to_owned()
}

fn py_float(x: f64) -> String {
    // Rust's Debug float ("4.0", "0.1", "1e-5") is a valid Python float literal.
    format!("{x:?}")
}

/// A Python string literal for `s` (a JSON string is one).
fn py_str(s: &str) -> String {
    serde_json::to_string(s).expect("string to JSON")
}

/// The timm model (and kwargs) that `cfg`'s network loads into strictly: a backbone
/// (`num_classes` 0) or a classifier with its pooling.
pub fn timm_target(cfg: &Config) -> Result<TimmTarget> {
    cfg.validate()?;
    if cfg.norm_eps != 1e-6 {
        bail!(
            "timm export: LayerNorm eps {} (timm's ViT and BEiT use 1e-6; outputs would differ)",
            cfg.norm_eps
        );
    }
    if cfg.layer_scale_init == Some(0.0) {
        bail!("timm export: layer scale init 0 (timm builds no layer scale for init_values=0)");
    }
    let size = (cfg.embed_dim, cfg.depth, cfg.num_heads);
    let model = match cfg.variant {
        Variant::Beit if size == (1024, 24, 16) => "beit_large_patch16_224",
        // timm has no tiny/small BEiT: the base entry point with the sizes as kwargs.
        Variant::Beit => "beit_base_patch16_224",
        Variant::Timm => match size {
            (192, 12, 3) => "vit_tiny_patch16_224",
            (384, 12, 6) => "vit_small_patch16_224",
            (1024, 24, 16) => "vit_large_patch16_224",
            _ => "vit_base_patch16_224",
        },
    };
    let mut kwargs: Vec<(String, String)> = vec![
        ("pretrained".into(), py_bool(false)),
        ("num_classes".into(), cfg.num_classes.to_string()),
        (
            "global_pool".into(),
            py_str(match cfg.global_pool {
                GlobalPool::Token => "token",
                GlobalPool::Mean => "avg",
            }),
        ),
        ("img_size".into(), cfg.image_size.to_string()),
        ("patch_size".into(), cfg.patch_size.to_string()),
        ("in_chans".into(), cfg.in_chans.to_string()),
        ("embed_dim".into(), cfg.embed_dim.to_string()),
        ("depth".into(), cfg.depth.to_string()),
        ("num_heads".into(), cfg.num_heads.to_string()),
        ("mlp_ratio".into(), py_float(cfg.mlp_ratio)),
        ("qkv_bias".into(), py_bool(cfg.qkv_bias)),
        (
            "init_values".into(),
            cfg.layer_scale_init.map_or("None".into(), py_float),
        ),
    ];
    if cfg.variant == Variant::Beit {
        kwargs.extend([
            ("use_abs_pos_emb".into(), py_bool(false)),
            ("use_rel_pos_bias".into(), py_bool(true)),
            ("use_shared_rel_pos_bias".into(), py_bool(false)),
        ]);
    }
    Ok(TimmTarget { model, kwargs })
}

/// The Python line that builds `target` as `model` and loads `file` into it strictly.
pub fn python_line(target: &TimmTarget, file: &Path) -> String {
    let args: Vec<String> = target
        .kwargs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        "import timm, safetensors.torch; model = timm.create_model({}, {}); \
         model.load_state_dict(safetensors.torch.load_file({}), strict=True)",
        py_str(target.model),
        args.join(", "),
        py_str(&file.to_string_lossy())
    )
}

/// A backbone under timm's names.
#[derive(Debug)]
pub struct TimmStateDict {
    /// The tensors, sorted by name.
    pub tensors: Vec<(String, Tensor)>,
    /// Checkpoint tensors not written, each with why.
    pub dropped: Vec<String>,
    /// Tensors written several times.
    pub expanded: Vec<String>,
}

/// The timm state dict of network `cfg` from its own variables `backbone` (names as
/// [`super::vit`] gives them, the network's prefix removed). A classifier
/// (`cfg.num_classes > 0`) keeps its `head.*`; a backbone drops any.
pub fn timm_state_dict(cfg: &Config, backbone: BTreeMap<String, Tensor>) -> Result<TimmStateDict> {
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut dropped = Vec::new();
    let mut expanded = Vec::new();
    let (mut n_proj, mut n_head) = (0usize, 0usize);
    for (name, t) in backbone {
        if name.starts_with("projectors.") {
            n_proj += 1;
        } else if name.starts_with("head.") && cfg.num_classes == 0 {
            n_head += 1;
        } else if name == "mask_token" {
            dropped.push("mask_token (1 tensor): pretraining only".to_owned());
        } else if name == "rel_pos_bias.relative_position_index" {
            let want = Tensor::from_slice(&relative_position_index(cfg.grid()));
            if !t.view(-1).to_kind(Kind::Int64).equal(&want) {
                bail!("{name}: not BEiT's index for a {0}x{0} grid", cfg.grid());
            }
            dropped.push(format!(
                "{name} (1 tensor): timm rebuilds the same index as a non-persistent buffer"
            ));
        } else if let Some(block) = name
            .strip_prefix("blocks.")
            .and_then(|r| r.strip_suffix(".attn.relative_position_index"))
        {
            // A per-block bias (`model.rel_pos_bias = "PerBlock"`): the tables keep
            // their names; timm rebuilds each index as a non-persistent buffer.
            let want = Tensor::from_slice(&relative_position_index(cfg.grid()));
            if !t.view(-1).to_kind(Kind::Int64).equal(&want) {
                bail!("{name}: not BEiT's index for a {0}x{0} grid", cfg.grid());
            }
            if block == "0" {
                dropped.push(format!(
                    "blocks.*.attn.relative_position_index ({} tensors): timm rebuilds the \
                     same index as a non-persistent buffer",
                    cfg.depth
                ));
            }
        } else if name == "rel_pos_bias.relative_position_bias_table" {
            if cfg.variant != Variant::Beit {
                bail!("{name} in a timm-style backbone");
            }
            for i in 0..cfg.depth {
                out.insert(
                    format!("blocks.{i}.attn.relative_position_bias_table"),
                    t.shallow_clone(),
                );
            }
            expanded.push(format!(
                "{name} -> blocks.{{0..{}}}.attn.relative_position_bias_table (the shared table \
                 copied into each of the {} blocks)",
                cfg.depth - 1,
                cfg.depth
            ));
        } else {
            out.insert(name, t);
        }
    }
    if n_proj > 0 {
        dropped.push(format!(
            "projectors.* ({n_proj} tensors): the ConMIM projection head"
        ));
    }
    if n_head > 0 {
        dropped.push(format!(
            "head.* ({n_head} tensors): classifier (exported with num_classes=0)"
        ));
    }
    let last = cfg.depth - 1;
    let mut needed = vec![
        "cls_token".to_owned(),
        "patch_embed.proj.weight".to_owned(),
        match cfg.global_pool {
            GlobalPool::Token => "norm.weight",
            GlobalPool::Mean => "fc_norm.weight",
        }
        .to_owned(),
        format!("blocks.{last}.mlp.fc2.weight"),
    ];
    if cfg.num_classes > 0 {
        needed.push("head.weight".to_owned());
    }
    for need in needed {
        if !out.contains_key(&need) {
            bail!("the checkpoint has no `{need}`: not a network of this config");
        }
    }
    if cfg.variant == Variant::Beit
        && !out.contains_key("blocks.0.attn.relative_position_bias_table")
    {
        bail!("the checkpoint has no `rel_pos_bias.relative_position_bias_table`");
    }
    Ok(TimmStateDict {
        tensors: out.into_iter().collect(),
        dropped,
        expanded,
    })
}

/// Serialises f32 `tensors` (in the given order) as safetensors with `metadata`.
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in tensors {
        if t.kind() != Kind::Float {
            bail!("{name}: {:?}, only f32 is exported", t.kind());
        }
        let flat = t
            .to_device(tch::Device::Cpu)
            .contiguous()
            .view(-1)
            .shallow_clone();
        let values = Vec::<f32>::try_from(&flat).with_context(|| format!("reading {name}"))?;
        let start = data.len();
        data.reserve(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": "F32",
                "shape": t.size(),
                "data_offsets": [start, data.len()],
            }),
        );
    }
    header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + head.len() + data.len());
    bytes.extend_from_slice(&(head.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&head);
    bytes.extend_from_slice(&data);
    Ok(bytes)
}

/// The `__metadata__` of a safetensors file (empty when it has none).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        bail!("{}: safetensors header of {len} bytes", path.display());
    }
    let mut head = vec![0u8; len as usize];
    f.read_exact(&mut head)?;
    let v: serde_json::Value = serde_json::from_slice(&head)
        .with_context(|| format!("{}: safetensors header", path.display()))?;
    Ok(match v.get("__metadata__") {
        Some(m) => serde_json::from_value(m.clone())?,
        None => BTreeMap::new(),
    })
}

/// Exports the backbone of `run_or_checkpoint` (a run directory: its newest complete
/// checkpoint; or a checkpoint directory) to `out` as a timm state dict (see the
/// module docs), written atomically (temporary file + rename).
pub fn export_timm(
    run_or_checkpoint: &Path,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportSummary> {
    let Source {
        dir,
        cfg,
        step,
        weights,
        tensors: backbone,
        classifier,
    } = read_export_source(run_or_checkpoint, opts)?;
    let cfg = &cfg;
    let target = timm_target(cfg)?;
    let model_file = dir.join(checkpoint::MODEL_FILE);
    let TimmStateDict {
        tensors,
        dropped,
        expanded,
    } = timm_state_dict(cfg, backbone)
        .with_context(|| format!("mapping {} to timm names", model_file.display()))?;
    let python = python_line(&target, out);
    let kwargs_json: serde_json::Map<String, serde_json::Value> = target
        .kwargs
        .iter()
        .filter(|(k, _)| k != "pretrained")
        .map(|(k, v)| {
            // The Python literals as JSON values (None -> null, True -> true).
            let j = match v.as_str() {
                "None" => serde_json::Value::Null,
                "True" => true.into(),
                "False" => false.into(),
                s => serde_json::from_str(s).unwrap_or_else(|_| s.into()),
            };
            (k.clone(), j)
        })
        .collect();
    let metadata: BTreeMap<String, String> = [
        ("format", "pt".to_owned()),
        ("conmim_export", "timm".to_owned()),
        ("timm_model", target.model.to_owned()),
        ("timm_kwargs", serde_json::to_string(&kwargs_json)?),
        ("python", python.clone()),
        ("source_checkpoint", dir.display().to_string()),
        ("step", step.to_string()),
        ("weights", weights.clone()),
        ("dropped", serde_json::to_string(&dropped)?),
        ("expanded", serde_json::to_string(&expanded)?),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let bytes = safetensors_bytes(&tensors, &metadata)?;
    crate::format::atomic_write(out, &bytes)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(ExportSummary {
        checkpoint: dir,
        step,
        weights: classifier.is_none().then_some(opts.weights),
        variant: cfg.variant,
        out: out.to_owned(),
        tensors: tensors.len(),
        numel: tensors.iter().map(|(_, t)| t.numel() as i64).sum(),
        bytes: bytes.len() as u64,
        timm_model: target.model.to_owned(),
        timm_kwargs: target.kwargs,
        python,
        dropped,
        expanded,
        classifier,
    })
}

/// What [`export_timm`] reads.
struct Source {
    dir: PathBuf,
    cfg: Config,
    step: u64,
    /// `teacher` / `student` (a pretraining checkpoint) or `finetuned`.
    weights: String,
    /// The network's variables under its own names.
    tensors: BTreeMap<String, Tensor>,
    classifier: Option<String>,
}

fn read_export_source(path: &Path, opts: &ExportOptions) -> Result<Source> {
    if let Some(dir) = super::finetune::model::checkpoint_dir(path) {
        if opts.weights == Weights::Student {
            bail!(
                "{}: a fine-tuning checkpoint holds one network; --weights student applies to \
                 pretraining checkpoints",
                dir.display()
            );
        }
        let state = super::finetune::model::read_state(&dir)?;
        let model_file = dir.join(checkpoint::MODEL_FILE);
        let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&model_file)
            .with_context(|| format!("reading {}", model_file.display()))?
            .into_iter()
            .collect();
        let top1 = state
            .acc1
            .map_or("not evaluated".to_owned(), |a| format!("top-1 {a:.2} %"));
        return Ok(Source {
            classifier: Some(format!(
                "{} classes, epoch {}, {top1}",
                state.net.num_classes, state.epoch
            )),
            dir,
            cfg: state.net,
            step: state.step,
            weights: "finetuned".to_owned(),
            tensors,
        });
    }
    let dir = resolve_checkpoint(path)?;
    let state = checkpoint::read_state(&dir)?;
    let model_file = dir.join(checkpoint::MODEL_FILE);
    let prefix = format!("{}.", opts.weights.prefix());
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&model_file)
        .with_context(|| format!("reading {}", model_file.display()))?
        .into_iter()
        .filter_map(|(k, t)| k.strip_prefix(&prefix).map(|k| (k.to_owned(), t)))
        .collect();
    if tensors.is_empty() {
        bail!(
            "{}: no `{prefix}*` tensors (not a conmim pretraining checkpoint?)",
            model_file.display()
        );
    }
    Ok(Source {
        dir,
        cfg: state.config.model,
        step: state.step,
        weights: opts.weights.prefix().to_owned(),
        tensors,
        classifier: None,
    })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use tch::Device;

    use super::*;
    use crate::train::testing::{lcg_tensor, max_diff, micro, perturb, seeded};
    use crate::train::train_data::micro_config;
    use crate::train::trainer::Trainer;

    /// The project's Python; a missing one FAILS the test (CI installs it).
    fn python() -> PathBuf {
        let p = match std::env::var_os("CONMIM_PYTHON") {
            Some(p) => PathBuf::from(p),
            None => {
                let home = std::env::var("HOME").unwrap_or_default();
                let venv = std::env::var("CONMIM_VENV")
                    .unwrap_or_else(|_| format!("{home}/.cache/conmim/venv-torch2.11.0"));
                PathBuf::from(venv).join("bin/python")
            }
        };
        assert!(
            p.exists(),
            "{} not found: the timm export check needs Python with torch and timm \
             (run tools/setup.sh, then `source tools/env.sh`)",
            p.display()
        );
        p
    }

    /// Runs `tools/reference/timm_check.py` on `export` with input `x` (files in `dir`)
    /// and returns what it wrote: `features`, and `logits` for a classifier.
    fn timm_check(label: &str, export: &Path, x: &Tensor, dir: &Path) -> BTreeMap<String, Tensor> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/reference/timm_check.py");
        let input = dir.join("input.safetensors");
        Tensor::write_safetensors(&[("x", x)], &input).unwrap();
        let result = dir.join("result.safetensors");
        let res = Command::new(python())
            .arg(&script)
            .args([export, &input, &result])
            .output()
            .expect("run tools/reference/timm_check.py");
        assert!(
            res.status.success(),
            "{label}: {} failed (is timm installed? run tools/setup.sh):\n{}\n{}",
            script.display(),
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
        Tensor::read_safetensors(&result)
            .unwrap()
            .into_iter()
            .collect()
    }

    /// A trainer of `model` whose teacher and student differ and whose zero-initialised
    /// tables / biases are not zero, checkpointed under `run`.
    fn checkpointed(model: Config, run: &Path) -> Trainer {
        let mut cfg = micro_config(2, 4);
        cfg.head.in_dim = model.embed_dim;
        cfg.model = model;
        let t = Trainer::new(cfg, Device::Cpu).unwrap();
        perturb(&t.teacher.vs, 3, |_| 0.05);
        perturb(&t.student.vs, 4, |_| 0.05);
        checkpoint::save(&checkpoint::dir_of(run), &t, 1).unwrap();
        t
    }

    fn variants() -> Vec<(&'static str, Config)> {
        vec![
            ("beit", micro(Variant::Beit)),
            (
                "beit+per-block-bias",
                Config {
                    rel_pos_bias: crate::train::vit::RelPosBias::PerBlock,
                    ..micro(Variant::Beit)
                },
            ),
            ("timm", micro(Variant::Timm)),
            (
                "timm+layer-scale",
                Config {
                    layer_scale_init: Some(0.1),
                    ..micro(Variant::Timm)
                },
            ),
        ]
    }

    #[test]
    fn export_loads_strictly_in_timm_and_matches() {
        let _rng = seeded(11);
        for (label, model) in variants() {
            let dir = tempfile::tempdir().unwrap();
            let run = dir.path().join("run");
            let t = checkpointed(model.clone(), &run);
            let out = dir.path().join("backbone.safetensors");
            let s = export_timm(&run, &out, &ExportOptions::default()).unwrap();
            assert_eq!(s.weights, Some(Weights::Teacher));

            let x = lcg_tensor(21, &[2, 3, model.image_size, model.image_size], Device::Cpu);
            let got = timm_check(label, &out, &x, dir.path());
            let got = &got["features"];
            let (want, student) = tch::no_grad(|| {
                (
                    t.teacher.vit.forward_features(&x, None, false).unwrap(),
                    t.student.vit.forward_features(&x, None, false).unwrap(),
                )
            });
            let (diff, scale) = max_diff(got, &want);
            assert!(
                diff < 1e-4,
                "{label}: timm forward_features differs from the teacher's by {diff} (max {scale})"
            );
            // The teacher's weights, not the student's.
            let (from_student, _) = max_diff(got, &student);
            assert!(from_student > 1e-3, "{label}: {from_student}");
        }
    }

    #[test]
    fn export_maps_names_and_records_how_to_load() {
        let _rng = seeded(12);
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let t = checkpointed(micro(Variant::Beit), &run);
        let out = dir.path().join("b.safetensors");
        // A checkpoint directory works as well as the run directory.
        let ck = checkpoint::latest(&checkpoint::dir_of(&run))
            .unwrap()
            .unwrap();
        let s = export_timm(&ck, &out, &ExportOptions::default()).unwrap();
        assert_eq!(s.checkpoint, ck);
        assert!(!crate::format::tmp_path(&out).exists());
        let got: BTreeMap<String, Tensor> = Tensor::read_safetensors(&out)
            .unwrap()
            .into_iter()
            .collect();
        let v = t.teacher.vs.variables();
        let table = &v["rel_pos_bias.relative_position_bias_table"];
        for i in 0..2 {
            assert!(got[&format!("blocks.{i}.attn.relative_position_bias_table")].equal(table));
        }
        assert!(got["blocks.1.attn.q_bias"].equal(&v["blocks.1.attn.q_bias"]));
        for k in got.keys() {
            assert!(
                !k.starts_with("projectors") && !k.starts_with("rel_pos_bias") && k != "mask_token",
                "{k}"
            );
        }
        // cls + patch_embed (2) + 16 per block (the table included) + norm (2).
        assert_eq!(got.len(), 1 + 2 + 2 * 16 + 2);
        assert_eq!(s.tensors, got.len());
        assert_eq!(s.expanded.len(), 1);
        let dropped = s.dropped.join("; ");
        for d in ["mask_token", "projectors.*", "relative_position_index"] {
            assert!(dropped.contains(d), "{dropped}");
        }
        let meta = read_metadata(&out).unwrap();
        assert_eq!(meta["timm_model"], "beit_base_patch16_224");
        assert_eq!(meta["python"], s.python);
        assert_eq!(meta["step"], "0");
        let kwargs: serde_json::Value = serde_json::from_str(&meta["timm_kwargs"]).unwrap();
        assert_eq!(kwargs["embed_dim"], 32);
        assert_eq!(kwargs["global_pool"], "token");
        assert_eq!(kwargs["use_shared_rel_pos_bias"], false);
        assert_eq!(kwargs["init_values"], 0.1);
        assert!(
            s.python.contains("timm.create_model(\"beit_base_patch16_224\", pretrained=False, num_classes=0, global_pool=\"token\", img_size=32, patch_size=8,"),
            "{}",
            s.python
        );
        assert!(s.python.ends_with("strict=True)"), "{}", s.python);

        // The student on request.
        let s = export_timm(
            &run,
            &out,
            &ExportOptions {
                weights: Weights::Student,
            },
        )
        .unwrap();
        assert_eq!(s.weights, Some(Weights::Student));
        let got: BTreeMap<String, Tensor> = Tensor::read_safetensors(&out)
            .unwrap()
            .into_iter()
            .collect();
        assert!(got["norm.weight"].equal(&t.student.vs.variables()["norm.weight"]));
    }

    /// A fine-tuned classifier of each variant and pooling, saved as a fine-tuning run's
    /// `checkpoints/best`, exports with its head, loads strictly in timm and gives the
    /// same logits.
    #[test]
    fn finetuned_classifier_exports_to_timm_with_the_same_logits() {
        use crate::train::finetune::config::FinetuneConfig;
        use crate::train::finetune::model::{self, Classifier, FINETUNE_KIND, FinetuneState};
        let _rng = seeded(13);
        let cases = [
            ("beit", micro(Variant::Beit).finetune(5, 0.001), "avg"),
            ("timm", micro(Variant::Timm).finetune(5, 0.001), "avg"),
            (
                "beit+cls-token",
                micro(Variant::Beit)
                    .finetune(5, 0.001)
                    .with_global_pool(GlobalPool::Token),
                "token",
            ),
        ];
        for (label, cfg, pool) in cases {
            let net = Classifier::new(&cfg, Device::Cpu).unwrap();
            perturb(&net.vs, 5, |_| 0.05);
            let dir = tempfile::tempdir().unwrap();
            let run = dir.path().join("ft");
            let state = FinetuneState {
                kind: FINETUNE_KIND.into(),
                config: FinetuneConfig::preset("small").unwrap(),
                net: cfg.clone(),
                epoch: 3,
                step: 30,
                acc1: Some(41.5),
                acc5: Some(90.0),
                resume: None,
            };
            model::save(&run.join("checkpoints/best"), &net, &state, None).unwrap();
            let out = dir.path().join("classifier.safetensors");
            let s = export_timm(&run, &out, &ExportOptions::default()).unwrap();
            assert_eq!(
                s.classifier.as_deref(),
                Some("5 classes, epoch 3, top-1 41.50 %")
            );
            assert_eq!((s.step, s.weights), (30, None));
            assert!(s.checkpoint.ends_with("checkpoints/best"));
            let meta = read_metadata(&out).unwrap();
            assert_eq!(meta["weights"], "finetuned");
            let kwargs: serde_json::Value = serde_json::from_str(&meta["timm_kwargs"]).unwrap();
            assert_eq!(
                (
                    kwargs["num_classes"].as_i64(),
                    kwargs["global_pool"].as_str()
                ),
                (Some(5), Some(pool))
            );

            let x = lcg_tensor(22, &[2, 3, cfg.image_size, cfg.image_size], Device::Cpu);
            let got = timm_check(label, &out, &x, dir.path());
            let want = tch::no_grad(|| net.logits(&x, false, false)).unwrap();
            let (diff, scale) = max_diff(&got["logits"], &want);
            assert!(
                diff < 1e-4 && scale > 1e-3,
                "{label}: timm's logits differ from the classifier's by {diff} (max {scale})"
            );

            // One network only: --weights student is refused.
            let e = export_timm(
                &run,
                &out,
                &ExportOptions {
                    weights: Weights::Student,
                },
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("holds one network"), "{e}");
        }
    }

    #[test]
    fn timm_targets_of_the_presets() {
        let name = |c: Config| timm_target(&c).unwrap().model;
        assert_eq!(name(Config::vit_small()), "beit_base_patch16_224");
        assert_eq!(name(Config::vit_large()), "beit_large_patch16_224");
        assert_eq!(
            name(Config::vit_tiny().timm_style()),
            "vit_tiny_patch16_224"
        );
        assert_eq!(
            name(Config::vit_small().timm_style()),
            "vit_small_patch16_224"
        );
        assert_eq!(
            name(Config::vit_base().timm_style()),
            "vit_base_patch16_224"
        );
        assert_eq!(
            name(Config::vit_large().timm_style()),
            "vit_large_patch16_224"
        );
        let k = timm_target(&Config::vit_large()).unwrap().kwargs;
        assert!(k.contains(&("init_values".into(), "1e-5".into())), "{k:?}");
        let k = timm_target(&Config::vit_small().timm_style())
            .unwrap()
            .kwargs;
        assert!(k.contains(&("init_values".into(), "None".into())), "{k:?}");
        assert!(!k.iter().any(|(n, _)| n == "use_rel_pos_bias"));
        let bad = Config {
            norm_eps: 1e-5,
            ..Config::vit_small()
        };
        assert!(timm_target(&bad).unwrap_err().to_string().contains("eps"));
    }

    #[test]
    fn export_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.safetensors");
        let e = export_timm(dir.path(), &out, &ExportOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("complete checkpoint"), "{e}");
        let e = export_timm(&dir.path().join("nope"), &out, &ExportOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such run"), "{e}");
        assert!(!out.exists());
    }
}
