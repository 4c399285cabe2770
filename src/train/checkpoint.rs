//! Checkpoints of a pretraining run, one directory per save:
//!
//! ```text
//! RUN/checkpoints/step-00001000/
//!     model.safetensors      student.* and teacher.* (backbone + projectors.* head,
//!                            BN running statistics included), fp32 on the CPU
//!     optimizer.safetensors  exp_avg.{decay,no_decay}, exp_avg_sq.{decay,no_decay}
//!                            (flat, in the layout recorded in state.json)
//!     state.json             step, samples, config, schedules, loader state, layout
//! ```
//!
//! Atomic: everything is written into a hidden temporary directory, fsynced, then
//! renamed into place, so a run killed at any moment leaves either the complete new
//! checkpoint or none of it, and never touches an existing one. Only the last `keep`
//! complete checkpoints are kept. [`latest`] finds the newest complete one
//! (`--resume auto`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor, nn};

use super::pretrain_config::PretrainConfig;
use super::schedule::{CosineSchedule, MomentumSchedule};
use super::trainer::Trainer;
use crate::loader::LoaderState;

/// Version of the checkpoint layout.
pub const FORMAT: u32 = 1;
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: u32,
    /// Optimiser steps taken (the next step's index).
    pub step: u64,
    pub samples: u64,
    pub config: PretrainConfig,
    pub lr_schedule: CosineSchedule,
    pub momentum_schedule: MomentumSchedule,
    pub loader_state: Option<LoaderState>,
    /// Data parallelism: every rank's loader position (index = rank); empty for a
    /// single-process run. A multi-rank run resumes with the same WORLD_SIZE.
    #[serde(default)]
    pub rank_loader_states: Vec<LoaderState>,
    /// Parameter names of the optimiser groups, in flat-buffer order.
    pub optimizer_layout: Vec<Vec<String>>,
}

/// Where the checkpoints of run directory `run` live.
pub fn dir_of(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Complete checkpoints under `root` (a `checkpoints` directory), oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", root.display())),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(num) = name.strip_prefix("step-") else {
            continue;
        };
        let Ok(step) = num.parse::<u64>() else {
            continue;
        };
        let p = entry.path();
        if p.join(STATE_FILE).is_file() {
            out.push((step, p));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.pop().map(|(_, p)| p))
}

fn cpu_named(prefix: &str, vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| {
            (
                format!("{prefix}.{k}"),
                t.detach().to_device(Device::Cpu).contiguous(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn fsync_dir(p: &Path) {
    if let Ok(f) = fs::File::open(p) {
        let _ = f.sync_all();
    }
}

fn fsync_file(p: &Path) -> Result<()> {
    fs::File::open(p)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", p.display()))
}

/// Saves `trainer` under `root` (a `checkpoints` directory) as `step-{step}` and keeps
/// only the newest `keep` (at least 1). Returns the checkpoint's path.
pub fn save(root: &Path, trainer: &Trainer, keep: usize) -> Result<PathBuf> {
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let step = trainer.step();
    let final_dir = root.join(step_name(step));
    let tmp = root.join(format!(".tmp-{}-{}", step_name(step), std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let write = || -> Result<()> {
        let mut model = cpu_named("student", &trainer.student.vs);
        model.extend(cpu_named("teacher", &trainer.teacher.vs));
        Tensor::write_safetensors(&model, tmp.join(MODEL_FILE))?;
        write_optimizer(&trainer.opt, &tmp.join(OPTIMIZER_FILE))?;
        let state = CheckpointState {
            format: FORMAT,
            step,
            samples: trainer.samples,
            config: trainer.cfg.clone(),
            lr_schedule: trainer.lr,
            momentum_schedule: trainer.momentum,
            loader_state: trainer.loader_state,
            rank_loader_states: trainer.rank_loader_states.clone(),
            optimizer_layout: trainer.opt.layout(),
        };
        fs::write(tmp.join(STATE_FILE), serde_json::to_vec_pretty(&state)?)?;
        for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            fsync_file(&tmp.join(f))?;
        }
        fsync_dir(&tmp);
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint {}", tmp.display())));
    }
    if final_dir.exists() {
        // The same step saved again: move the old one aside first (a crash between the
        // two renames leaves the new one complete and the old one in `.old-*`).
        let old = root.join(format!(".old-{}-{}", step_name(step), std::process::id()));
        fs::rename(&final_dir, &old)?;
        fs::rename(&tmp, &final_dir)?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(&tmp, &final_dir)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
    }
    fsync_dir(root);
    let all = list(root)?;
    let keep = keep.max(1);
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            fs::remove_dir_all(p).with_context(|| format!("removing old {}", p.display()))?;
        }
    }
    Ok(final_dir)
}

/// Writes the AdamW moments of `opt` to `file` (safetensors, on the CPU).
pub fn write_optimizer(opt: &crate::train::optim::AdamW, file: &Path) -> Result<()> {
    let t: Vec<(String, Tensor)> = opt
        .state_tensors()
        .into_iter()
        .map(|(k, t)| (k, t.to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&t, file).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// Reads what [`write_optimizer`] wrote, onto `device` (for `AdamW::load_state`).
pub fn read_optimizer(file: &Path, device: Device) -> Result<Vec<(String, Tensor)>> {
    Ok(Tensor::read_safetensors(file)
        .with_context(|| format!("reading {}", file.display()))?
        .into_iter()
        .map(|(k, t)| (k, t.to_device(device)))
        .collect())
}

/// Reads a checkpoint's `state.json`.
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let p = dir.join(STATE_FILE);
    let bytes = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    let s: CheckpointState =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))?;
    if s.format != FORMAT {
        bail!(
            "{}: checkpoint format {} (this build reads {FORMAT})",
            p.display(),
            s.format
        );
    }
    Ok(s)
}

fn load_vs(
    vs: &nn::VarStore,
    prefix: &str,
    tensors: &std::collections::HashMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
    let vars = vs.variables();
    let want = tensors
        .keys()
        .filter(|k| k.starts_with(&format!("{prefix}.")))
        .count();
    if want != vars.len() {
        bail!(
            "{}: {want} `{prefix}.*` tensors, this model has {} (a checkpoint of another model?)",
            file.display(),
            vars.len()
        );
    }
    tch::no_grad(|| -> Result<()> {
        for (name, mut v) in vars {
            let key = format!("{prefix}.{name}");
            let Some(src) = tensors.get(&key) else {
                bail!(
                    "{}: `{key}` missing (a checkpoint of another model?)",
                    file.display()
                );
            };
            if src.size() != v.size() || src.kind() != v.kind() {
                bail!(
                    "{}: `{key}` is {:?} {:?}, this model needs {:?} {:?} (a checkpoint of another model?)",
                    file.display(),
                    src.kind(),
                    src.size(),
                    v.kind(),
                    v.size()
                );
            }
            v.f_copy_(src)?;
        }
        Ok(())
    })
}

impl Trainer {
    /// Rebuilds a trainer from checkpoint `dir` on `device`, with the checkpoint's own
    /// config.
    pub fn from_checkpoint(dir: &Path, device: Device) -> Result<Trainer> {
        let state = read_state(dir)?;
        let mut t = Trainer::new(state.config.clone(), device)?;
        t.load_checkpoint(dir)?;
        Ok(t)
    }

    /// Loads weights, optimiser state, step and loader state from checkpoint `dir`.
    /// The checkpoint must be of this model (same architecture and head); nothing is
    /// changed when it is not.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let state = read_state(dir)?;
        if state.config.model != self.cfg.model || state.config.head != self.cfg.head {
            bail!(
                "{}: the checkpoint is of another model (preset `{}`, {}-dim x {} blocks at {} px; \
                 this run: preset `{}`, {}-dim x {} blocks at {} px)",
                dir.display(),
                state.config.preset,
                state.config.model.embed_dim,
                state.config.model.depth,
                state.config.model.image_size,
                self.cfg.preset,
                self.cfg.model.embed_dim,
                self.cfg.model.depth,
                self.cfg.model.image_size
            );
        }
        if state.optimizer_layout != self.opt.layout() {
            bail!(
                "{}: the optimiser layout differs from this model's",
                dir.display()
            );
        }
        let model_file = dir.join(MODEL_FILE);
        let tensors: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(&model_file)
                .with_context(|| format!("reading {}", model_file.display()))?
                .into_iter()
                .collect();
        let opt_file = dir.join(OPTIMIZER_FILE);
        let opt_tensors = read_optimizer(&opt_file, self.device)?;
        load_vs(&self.student.vs, "student", &tensors, &model_file)?;
        load_vs(&self.teacher.vs, "teacher", &tensors, &model_file)?;
        self.opt.load_state(&opt_tensors, state.step)?;
        self.loader_state = state.loader_state;
        self.rank_loader_states = state.rank_loader_states.clone();
        self.samples = state.samples;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::SourceOptions;
    use crate::train::testing::seeded;
    use crate::train::train_data::{dataset, micro_config};

    fn run(t: &mut Trainer, data: &Path, steps: usize) -> Vec<f64> {
        let loader = t
            .open_loader(
                data.to_str().unwrap(),
                &SourceOptions::default(),
                t.loader_state.as_ref(),
            )
            .unwrap();
        let mut out = Vec::new();
        for b in loader.take(steps) {
            out.push(t.train_step(&b.unwrap()).unwrap().loss);
        }
        assert_eq!(out.len(), steps);
        out
    }

    fn cfg() -> PretrainConfig {
        let mut c = micro_config(4, 12);
        c.model.drop_path_rate = 0.2; // exercise the per-step RNG
        c.lr = 2e-3 * 2048.0 / 4.0;
        c.warmup_steps = Some(2);
        c
    }

    #[test]
    fn resumed_run_continues_bit_for_bit() {
        let _rng = seeded(7);
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        dataset(&data, &[5, 6]); // 11 samples: epochs end mid-run (batch 4, drop_last)
        let (n, m) = (5usize, 4usize);
        let mut full = Trainer::new(cfg(), Device::Cpu).unwrap();
        let want = run(&mut full, &data, n + m);

        let root = dir.path().join("run/checkpoints");
        let mut first = Trainer::new(cfg(), Device::Cpu).unwrap();
        let mut got = run(&mut first, &data, n);
        let ck = save(&root, &first, 2).unwrap();
        drop(first);
        // A fresh process would start with another RNG state.
        tch::manual_seed(12345);
        let mut resumed =
            Trainer::from_checkpoint(&latest(&root).unwrap().unwrap(), Device::Cpu).unwrap();
        assert_eq!(resumed.step(), n as u64);
        got.extend(run(&mut resumed, &data, m));
        assert_eq!(got, want, "losses of N + resume + M vs N + M steps");
        // The weights agree too.
        let a = full.student.vs.variables();
        for (k, v) in resumed.student.vs.variables() {
            assert!(v.equal(&a[&k]), "{k} differs");
        }
        let ta = full.teacher.vs.variables();
        for (k, v) in resumed.teacher.vs.variables() {
            assert!(v.equal(&ta[&k]), "teacher {k} differs");
        }
        assert!(ck.ends_with(format!("step-{n:08}")));
    }

    #[test]
    fn keeps_the_last_n_and_rejects_other_models() {
        let _rng = seeded(8);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        let mut t = Trainer::new(cfg(), Device::Cpu).unwrap();
        for s in 0..4u64 {
            t.opt.step = s; // only the name matters here
            save(&root, &t, 2).unwrap();
        }
        let steps: Vec<u64> = list(&root).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![2, 3]);
        // No temporary directories left behind.
        let hidden = fs::read_dir(&root)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count();
        assert_eq!(hidden, 0);
        // An incomplete directory (no state.json) is not a checkpoint.
        fs::create_dir(root.join("step-00000009")).unwrap();
        assert!(latest(&root).unwrap().unwrap().ends_with("step-00000003"));

        // Another model: a clear error, and the trainer is unchanged.
        let mut other_cfg = cfg();
        other_cfg.model.embed_dim = 64;
        other_cfg.head.in_dim = 64;
        let mut other = Trainer::new(other_cfg, Device::Cpu).unwrap();
        let before = other.opt.groups[0].params.flat.copy();
        let e = other
            .load_checkpoint(&root.join("step-00000003"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another model"), "{e}");
        assert!(other.opt.groups[0].params.flat.equal(&before));
    }
}
