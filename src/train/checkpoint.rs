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
//! renamed into place ([`publish`]), so a run killed at any moment leaves either the
//! complete new checkpoint or none of it, and never touches an existing one. Only the
//! last `keep` complete checkpoints are kept (an old one is renamed away before it is
//! deleted, so a half-deleted one never passes for a checkpoint). [`latest`] finds the
//! newest complete one (`--resume auto`).
//!
//! What a killed writer leaves behind, hidden entries `.{tmp,old,del}-NAME-PID` (a
//! checkpoint being written, replaced or removed), is repaired by [`recover`] when the
//! next run starts: a checkpoint caught between the two renames of a replacement is put
//! back, the rest deleted, so a restart never resumes from less than it could and a
//! preempted job does not leak a checkpoint's worth of disk per crash. One run writes a
//! run directory at a time.

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
    /// Images trained on, by all ranks together.
    pub samples: u64,
    pub config: PretrainConfig,
    pub lr_schedule: CosineSchedule,
    pub momentum_schedule: MomentumSchedule,
    pub loader_state: Option<LoaderState>,
    /// Data parallelism: every rank's loader position (index = rank); empty for a
    /// single-process run. A run with the same WORLD_SIZE resumes each rank exactly;
    /// another world size goes on with the shards of the epoch the saved ranks had not
    /// read through ([`super::dist::resume_at`], [`crate::stream::Stream::rejoin`]).
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

/// What names checkpoint `dir` across processes: its step and a hash of its state
/// file (which holds the step, the samples seen and every rank's loader position, so
/// two different checkpoints of one step differ too); `None` for no checkpoint or an
/// unreadable one.
fn identity(dir: Option<&Path>) -> Option<(u64, u64)> {
    let bytes = fs::read(dir?.join(STATE_FILE)).ok()?;
    #[derive(Deserialize)]
    struct Step {
        step: u64,
    }
    let step = serde_json::from_slice::<Step>(&bytes).ok()?.step;
    Some((step, xxhash_rust::xxh3::xxh3_64(&bytes)))
}

/// Makes sure every rank of a job resumes from what rank 0 resumes from (a collective:
/// every rank calls it once it has chosen `resume_from`, the checkpoint it found in the
/// run directory `out`, or none). Each rank reads the checkpoint itself (weights,
/// optimiser, its own loader position), so a rank on a node that does not see rank 0's
/// run directory (`--out` on a node-local disk), or sees another copy of it, would
/// start from another step and the ranks' collectives would no longer match: that is
/// an error on every rank, naming what each group of ranks sees and what to do.
pub fn agree_across_ranks(
    pg: &super::dist::ProcessGroup,
    out: &Path,
    resume_from: Option<&Path>,
) -> Result<()> {
    let own = match identity(resume_from) {
        // 0 in the first column: nothing to resume from.
        Some((step, hash)) => [1, step as i64, hash as i64],
        None if resume_from.is_some() => [2, 0, 0],
        None => [0, 0, 0],
    };
    let all = pg
        .gather_i64(&own)
        .context("comparing the ranks' checkpoints to resume from")?;
    if let Some(seen) = disagreement(&all) {
        bail!(
            "the ranks of this job do not see the same checkpoint to resume from in {}: \
             {seen}. Every rank reads rank 0's run directory: put --out on a filesystem \
             that every node shares (or give every node an identical copy), then restart \
             the job",
            dir_of(out).display(),
        );
    }
    Ok(())
}

/// What each group of ranks sees, when not all see the same ([`agree_across_ranks`]'s
/// rows, in rank order): "step 6 on ranks 0-3; no checkpoint on ranks 4-7".
fn disagreement(all: &[Vec<i64>]) -> Option<String> {
    if all.iter().all(|r| *r == all[0]) {
        return None;
    }
    // Ranks grouped by what they see, in order of their lowest rank.
    let mut groups: Vec<(&Vec<i64>, Vec<usize>)> = Vec::new();
    for (rank, row) in all.iter().enumerate() {
        match groups.iter_mut().find(|(r, _)| *r == row) {
            Some((_, ranks)) => ranks.push(rank),
            None => groups.push((row, vec![rank])),
        }
    }
    let copies_of = |step: i64| {
        groups
            .iter()
            .filter(|(r, _)| r[0] == 1 && r[1] == step)
            .count()
    };
    let seen: Vec<String> = groups
        .iter()
        .map(|(row, ranks)| {
            let what = match row[0] {
                0 => "no checkpoint".to_string(),
                1 if copies_of(row[1]) > 1 => format!("a different copy of step {}", row[1]),
                1 => format!("step {}", row[1]),
                _ => "an unreadable checkpoint".to_string(),
            };
            format!("{what} on {}", super::dist::rank_ranges(ranks))
        })
        .collect();
    Some(seen.join("; "))
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
    let step = trainer.step();
    let final_dir = root.join(step_name(step));
    let tmp = begin(&final_dir)?;
    let write = || -> Result<()> {
        let mut model = cpu_named("student", &trainer.student.vs);
        model.extend(cpu_named("teacher", &trainer.teacher.vs));
        Tensor::write_safetensors(&model, tmp.join(MODEL_FILE))?;
        crash_point("written", &final_dir);
        write_optimizer(&trainer.opt, &tmp.join(OPTIMIZER_FILE))?;
        let state = CheckpointState {
            format: FORMAT,
            step,
            samples: trainer.samples,
            config: trainer.cfg.clone(),
            lr_schedule: trainer.lr,
            momentum_schedule: trainer.momentum,
            loader_state: trainer.loader_state.clone(),
            rank_loader_states: trainer.rank_loader_states.clone(),
            optimizer_layout: trainer.opt.layout(),
        };
        fs::write(tmp.join(STATE_FILE), serde_json::to_vec_pretty(&state)?)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint {}", tmp.display())));
    }
    publish(&tmp, &final_dir)?;
    // Keep this one and the `keep - 1` before it. Checkpoints of later steps (a run
    // resumed from an older checkpoint next to them; `conmim pretrain` refuses that)
    // are not this run's to prune, and never this one.
    let older: Vec<(u64, PathBuf)> = list(root)?.into_iter().filter(|(s, _)| *s < step).collect();
    let keep_older = keep.max(1) - 1;
    if older.len() > keep_older {
        for (_, p) in &older[..older.len() - keep_older] {
            remove(p)?;
        }
    }
    Ok(final_dir)
}

/// The three kinds of hidden scratch entry a checkpoint writer makes next to its
/// checkpoints, `.{kind}-{checkpoint name}-{pid}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scratch {
    /// A checkpoint being written.
    Tmp,
    /// A published checkpoint moved aside while its replacement is renamed in.
    Old,
    /// A checkpoint being removed.
    Del,
}

impl Scratch {
    fn tag(self) -> &'static str {
        match self {
            Scratch::Tmp => "tmp",
            Scratch::Old => "old",
            Scratch::Del => "del",
        }
    }

    /// `(kind, checkpoint name)` of a scratch entry's file name; `None` for anything
    /// else.
    fn parse(file_name: &str) -> Option<(Scratch, &str)> {
        let rest = file_name.strip_prefix('.')?;
        let (tag, rest) = rest.split_once('-')?;
        let kind = [Scratch::Tmp, Scratch::Old, Scratch::Del]
            .into_iter()
            .find(|k| k.tag() == tag)?;
        let (name, pid) = rest.rsplit_once('-')?;
        let digits = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
        (digits && !name.is_empty()).then_some((kind, name))
    }
}

/// This process's scratch entry of `kind` for checkpoint `name` under `root`.
fn scratch(root: &Path, kind: Scratch, name: &str) -> PathBuf {
    root.join(format!(".{}-{name}-{}", kind.tag(), std::process::id()))
}

/// The checkpoint name (last path component) of `dir`, and its parent.
fn split_dir(dir: &Path) -> Result<(&Path, String)> {
    let parent = dir
        .parent()
        .with_context(|| format!("checkpoint path {} has no parent", dir.display()))?;
    let name = dir
        .file_name()
        .with_context(|| format!("checkpoint path {} has no name", dir.display()))?;
    Ok((parent, name.to_string_lossy().into_owned()))
}

/// Starts writing checkpoint `dir`: creates its parent and returns this process's
/// empty scratch directory next to it, to be filled and then [`publish`]ed.
pub fn begin(dir: &Path) -> Result<PathBuf> {
    let (parent, name) = split_dir(dir)?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = scratch(parent, Scratch::Tmp, &name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok(tmp)
}

/// Publishes the complete directory `tmp` as checkpoint `dir` (same parent): fsyncs
/// its files, then renames it into place. An existing `dir` is moved aside first and
/// deleted after; a crash between those two renames leaves no `dir` and the previous
/// one as `.old-*`, which [`recover`] puts back.
pub fn publish(tmp: &Path, dir: &Path) -> Result<()> {
    let (parent, name) = split_dir(dir)?;
    for entry in fs::read_dir(tmp).with_context(|| format!("listing {}", tmp.display()))? {
        let p = entry?.path();
        if p.is_file() {
            fsync_file(&p)?;
        }
    }
    fsync_dir(tmp);
    if dir.exists() {
        let old = scratch(parent, Scratch::Old, &name);
        fs::rename(dir, &old)
            .with_context(|| format!("moving {} aside to replace it", dir.display()))?;
        crash_point("swapped", dir);
        fs::rename(tmp, dir).with_context(|| format!("renaming {} into place", tmp.display()))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(tmp, dir).with_context(|| format!("renaming {} into place", tmp.display()))?;
    }
    fsync_dir(parent);
    Ok(())
}

/// Deletes checkpoint `dir`, renaming it away first so that a crash part-way through
/// never leaves a half-deleted directory under a checkpoint's name.
pub fn remove(dir: &Path) -> Result<()> {
    let (parent, name) = split_dir(dir)?;
    let del = scratch(parent, Scratch::Del, &name);
    fs::rename(dir, &del).with_context(|| format!("removing old {}", dir.display()))?;
    fs::remove_dir_all(&del).with_context(|| format!("removing old {}", dir.display()))
}

/// What [`recover`] found and did, by file name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Checkpoints put back: a replacement was interrupted between its two renames.
    pub restored: Vec<String>,
    /// Scratch entries deleted: unfinished writes, superseded or half-removed
    /// checkpoints.
    pub removed: Vec<String>,
}

impl Recovered {
    pub fn is_empty(&self) -> bool {
        self.restored.is_empty() && self.removed.is_empty()
    }
}

/// Repairs what checkpoint writers killed mid-save left under `root` (a checkpoints
/// directory; missing is fine): a checkpoint moved aside for a replacement that never
/// arrived (`.old-NAME-PID` with no `NAME`) is renamed back to `NAME`; every other
/// scratch entry (an unfinished `.tmp-*`, a superseded `.old-*`, a half-removed
/// `.del-*`) is deleted. Call it before looking for the checkpoint to resume from, and
/// before the first save. Idempotent, and safe when several ranks of a job run it at
/// once on a shared directory (an entry another process already handled is skipped);
/// it assumes no other run is writing checkpoints under `root` meanwhile.
pub fn recover(root: &Path) -> Result<Recovered> {
    let mut out = Recovered::default();
    let mut entries: Vec<(Scratch, String, String)> = match fs::read_dir(root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let file = e.file_name().to_str()?.to_owned();
                let (kind, name) = Scratch::parse(&file)?;
                Some((kind, name.to_owned(), file))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", root.display())),
    };
    entries.sort_by(|a, b| a.2.cmp(&b.2));
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    for (kind, name, file) in entries {
        let path = root.join(&file);
        let target = root.join(&name);
        if kind == Scratch::Old && !target.exists() && path.join(STATE_FILE).is_file() {
            match fs::rename(&path, &target) {
                Ok(()) => {
                    out.restored.push(name);
                    continue;
                }
                Err(e) if gone(&e) => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("restoring {} as {}", path.display(), target.display())
                    });
                }
            }
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => out.removed.push(file),
            Err(e) if gone(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    if !out.is_empty() {
        fsync_dir(root);
    }
    Ok(out)
}

/// Test builds only: exits the process at once (status 3, no cleanup: the files are
/// left as a `kill -9` would leave them) at point `point` of writing checkpoint `dir`
/// when `CONMIM_TEST_CRASH_AT` is `point@name` (e.g. `written@step-00000004`,
/// `swapped@last`). A no-op in every other build.
#[inline]
pub(crate) fn crash_point(point: &str, dir: &Path) {
    #[cfg(test)]
    if let (Ok(want), Some(name)) = (std::env::var("CONMIM_TEST_CRASH_AT"), dir.file_name())
        && want == format!("{point}@{}", name.to_string_lossy())
    {
        std::process::exit(3);
    }
    #[cfg(not(test))]
    let _ = (point, dir);
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

    /// Issue 6: what each group of ranks sees to resume from, when the ranks disagree
    /// (a node-local --out, a stale copy), in a message that fits a big job.
    #[test]
    fn issue6_ranks_that_see_other_checkpoints_are_named_by_group() {
        let step = |s: i64, h: i64| vec![1, s, h];
        let none = || vec![0, 0, 0];
        assert_eq!(disagreement(&[step(6, 9), step(6, 9)]), None);
        assert_eq!(disagreement(&[none(), none()]), None);
        assert_eq!(
            disagreement(&[step(6, 9), none()]).unwrap(),
            "step 6 on rank 0; no checkpoint on rank 1"
        );
        let mut rows = vec![step(6, 9); 4];
        rows.extend(vec![none(); 4]);
        rows.push(step(6, 9));
        rows.extend(vec![step(6, 5); 2]);
        rows.push(step(4, 1));
        rows.push(vec![2, 0, 0]);
        assert_eq!(
            disagreement(&rows).unwrap(),
            "a different copy of step 6 on ranks 0-3, 8; no checkpoint on ranks 4-7; \
             a different copy of step 6 on ranks 9-10; step 4 on rank 11; \
             an unreadable checkpoint on rank 12"
        );
    }

    #[test]
    fn identity_names_a_checkpoint_by_step_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for (d, text) in [
            (&a, r#"{"step": 6, "samples": 24}"#),
            (&b, r#"{"step": 6, "samples": 25}"#),
        ] {
            fs::create_dir(d).unwrap();
            fs::write(d.join(STATE_FILE), text).unwrap();
        }
        let (ia, ib) = (identity(Some(&a)).unwrap(), identity(Some(&b)).unwrap());
        assert_eq!((ia.0, ib.0), (6, 6));
        assert_ne!(ia.1, ib.1, "two checkpoints of one step differ");
        assert_eq!(identity(Some(&a)), Some(ia));
        assert_eq!(identity(Some(&dir.path().join("missing"))), None);
        assert_eq!(identity(None), None);
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

    /// A fake complete checkpoint directory named `name` under `root`, holding `tag`.
    fn fake(root: &Path, name: &str, tag: &str) -> PathBuf {
        let d = root.join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(STATE_FILE), tag).unwrap();
        fs::write(d.join(MODEL_FILE), tag).unwrap();
        d
    }

    fn names(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn scratch_names_parse() {
        assert_eq!(
            Scratch::parse(".tmp-step-00000004-123"),
            Some((Scratch::Tmp, "step-00000004"))
        );
        assert_eq!(Scratch::parse(".old-last-7"), Some((Scratch::Old, "last")));
        assert_eq!(
            Scratch::parse(".del-step-1-99"),
            Some((Scratch::Del, "step-1"))
        );
        for other in [
            "step-00000004",
            ".tmp-last",
            ".tmp-last-",
            ".tmp--12",
            ".tmp-last-12a",
            ".write-test-12",
            ".other-last-12",
        ] {
            assert_eq!(Scratch::parse(other), None, "{other}");
        }
    }

    /// Issue 4 (killed at any moment): what a killed writer leaves is repaired at the
    /// next start. A checkpoint caught between the two renames of its replacement comes
    /// back, whatever else is half-written or half-removed goes, and complete
    /// checkpoints and foreign files are left alone.
    #[test]
    fn issue4_recover_repairs_what_a_killed_save_left() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        assert!(
            recover(&root).unwrap().is_empty(),
            "a missing directory is fine"
        );
        fake(&root, "step-00000002", "2");
        fake(&root, "step-00000004", "4");
        // Killed while writing step 6 (no state.json yet).
        fs::create_dir_all(root.join(".tmp-step-00000006-4242")).unwrap();
        fs::write(root.join(".tmp-step-00000006-4242").join(MODEL_FILE), "x").unwrap();
        // Killed between the renames that replace `last`: no `last`, the published one
        // aside, the new one in tmp.
        fake(&root, ".old-last-77", "old last");
        fake(&root, ".tmp-last-77", "new last");
        // Killed after the replacement of `best`, before deleting the old one.
        fake(&root, "best", "new best");
        fake(&root, ".old-best-78", "old best");
        // Killed while removing step 0.
        fs::create_dir_all(root.join(".del-step-00000000-79")).unwrap();
        fs::write(root.join("notes.txt"), "mine").unwrap();

        let r = recover(&root).unwrap();
        assert_eq!(r.restored, ["last"]);
        assert_eq!(r.removed.len(), 4, "{r:?}");
        assert_eq!(
            names(&root),
            [
                "best",
                "last",
                "notes.txt",
                "step-00000002",
                "step-00000004"
            ]
        );
        assert_eq!(
            fs::read_to_string(root.join("last").join(STATE_FILE)).unwrap(),
            "old last"
        );
        assert_eq!(
            fs::read_to_string(root.join("best").join(STATE_FILE)).unwrap(),
            "new best"
        );
        assert!(latest(&root).unwrap().unwrap().ends_with("step-00000004"));
        assert!(recover(&root).unwrap().is_empty(), "idempotent");
    }

    /// The body of `issue4_a_replacement_killed_between_its_renames_is_put_back`'s child
    /// (no-op otherwise): replaces `DIR/last` with a new checkpoint.
    #[test]
    fn publish_child() {
        let Some(root) = std::env::var_os("CONMIM_PUBLISH_CHILD_DIR") else {
            return;
        };
        let last = PathBuf::from(root).join("last");
        let tmp = begin(&last).unwrap();
        fs::write(tmp.join(STATE_FILE), "new").unwrap();
        publish(&tmp, &last).unwrap();
    }

    /// Issue 4: a process that dies between the two renames of a replacement (its
    /// checkpoint moved aside, the new one not yet in place) leaves no checkpoint under
    /// the name; the next start puts the previous one back.
    #[test]
    fn issue4_a_replacement_killed_between_its_renames_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake(root, "last", "old");
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["train::checkpoint::tests::publish_child", "--exact"])
            .env("CONMIM_PUBLISH_CHILD_DIR", root)
            .env("CONMIM_TEST_CRASH_AT", "swapped@last")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(3), "{o:?}");
        let left = names(root);
        assert!(
            left.len() == 2
                && left[0].starts_with(".old-last-")
                && left[1].starts_with(".tmp-last-"),
            "{left:?}"
        );
        let r = recover(root).unwrap();
        assert_eq!((r.restored.len(), r.removed.len()), (1, 1), "{r:?}");
        assert_eq!(names(root), ["last"]);
        assert_eq!(
            fs::read_to_string(root.join("last").join(STATE_FILE)).unwrap(),
            "old"
        );
    }

    /// `publish` replaces an existing checkpoint and `remove` deletes one, leaving no
    /// scratch entry behind.
    #[test]
    fn publish_replaces_and_remove_deletes_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let last = fake(root, "last", "1");
        let tmp = begin(&last).unwrap();
        fs::write(tmp.join(STATE_FILE), "2").unwrap();
        publish(&tmp, &last).unwrap();
        assert_eq!(fs::read_to_string(last.join(STATE_FILE)).unwrap(), "2");
        assert_eq!(names(root), ["last"]);
        remove(&last).unwrap();
        assert!(names(root).is_empty());
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
