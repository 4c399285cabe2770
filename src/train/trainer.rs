//! The ConMIM pretraining step: student (ViT + projection head) on the masked weak
//! view, momentum teacher (same architecture, stop-gradient) on the full strong view,
//! intra-image patch InfoNCE, AdamW with warmup + cosine lr and gradient clipping, EMA
//! teacher update after every optimiser step.
//!
//! Determinism: the init draws from libtorch's RNG seeded with `cfg.seed`; every step
//! reseeds it with `(seed, rank, step)` before the forward pass (drop path), so a run
//! resumed from a checkpoint continues bit for bit (on the CPU).
//!
//! Precision: on CUDA the forward passes run under bf16 autocast (as
//! `torch.autocast("cuda", dtype=torch.bfloat16)`, through the C++ shim in
//! [`super::cuda`]) with TF32 matmuls; the loss, the gradients' reduction, AdamW and
//! the EMA stay fp32 tensors (the parameters are fp32 masters; the loss's similarity
//! matmul, outside autocast, runs in TF32 like every fp32 matmul of the process). On
//! the CPU: fp32 everywhere.
//!
//! Device syncs: one per step, after the backward pass is queued: loss, masked count,
//! gradient norm and accuracy come back together, and only then is the update applied
//! (a non-finite loss or gradient norm abandons the step with weights and moments
//! untouched). The caller's `between` hook runs just before that sync, while the GPU
//! works: the training loop uploads the next batch there ([`DeviceBatch::upload`]).
//!
//! The teacher runs in training mode, as in the official code (a copy of the student
//! never switched to eval): its head normalises with batch statistics, as the spec
//! says, and its backbone drops paths at the student's rate (`teacher_drop_path`,
//! default on; the draws come after the seeding above, so resume stays exact).

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tch::{Device, Kind, Tensor, nn};

use super::head::ProjectionHead;
use super::input::{DeviceBatch, IMAGENET_MEAN, IMAGENET_STD, normalize_nhwc};
use super::loss::conmim_loss;
use super::optim::{AdamW, trainable_named};
use super::pretrain_config::PretrainConfig;
use super::schedule::{CosineSchedule, MomentumSchedule};
use super::teacher::EmaTeacher;
use super::vit::VisionTransformer;
use crate::loader::{Batch, Loader, LoaderState};
use crate::stream::SourceOptions;

/// Name prefix of the projection head inside each VarStore (the official names).
pub const HEAD_PREFIX: &str = "projectors";

/// What one step reports.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepStats {
    /// The step index (0-based) this was.
    pub step: u64,
    pub loss: f64,
    /// Fraction of masked positions whose nearest teacher patch is their own.
    pub accuracy: f64,
    pub lr: f64,
    pub momentum: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub batch: usize,
    /// Some rank voted to stop after this step ([`Trainer::stop_vote`]); every rank
    /// sees the same answer at the same step.
    pub stop: bool,
}

/// One network (backbone + head) and its variables.
pub struct Net {
    pub vs: nn::VarStore,
    pub vit: VisionTransformer,
    pub head: ProjectionHead,
}

impl Net {
    fn new(cfg: &PretrainConfig, device: Device) -> Result<Self> {
        let vs = nn::VarStore::new(device);
        let vit = VisionTransformer::new(&cfg.model, vs.root())?;
        let head = ProjectionHead::new(&cfg.head, vs.root() / HEAD_PREFIX)?;
        Ok(Net { vs, vit, head })
    }
}

/// Student, teacher, optimiser and schedules.
pub struct Trainer {
    pub cfg: PretrainConfig,
    pub device: Device,
    pub student: Net,
    pub teacher: Net,
    pub opt: AdamW,
    pub ema: EmaTeacher,
    pub lr: CosineSchedule,
    pub momentum: MomentumSchedule,
    /// The loader position after the last batch trained on (for checkpoints).
    pub loader_state: Option<LoaderState>,
    /// Samples trained on so far, by all ranks together.
    pub samples: u64,
    /// bf16 autocast of the forward passes (on by default on CUDA, off on the CPU).
    pub amp: bool,
    /// Data parallelism ([`Trainer::join`]): gradients and logged metrics are averaged
    /// over its ranks.
    pub dist: Option<super::dist::ProcessGroup>,
    /// With `dist`: DDP's reducer over the student's parameters (gradient all-reduce in
    /// buckets, overlapped with the backward pass).
    pub reducer: Option<super::dist::GradReducer>,
    /// Every rank's loader position at the last [`Trainer::gather_loader_states`] (saved
    /// in checkpoints of multi-rank runs).
    pub rank_loader_states: Vec<LoaderState>,
    /// This rank asks the run to stop after the next step (a signal arrived, see
    /// [`super::signals`]); the vote travels with the step's metric all-reduce, so all
    /// ranks learn it at the same step ([`StepStats::stop`]).
    pub stop_vote: bool,
    /// Polled for the same vote just before each step's sync (e.g.
    /// [`super::signals::stop_requested`]), so a signal that arrives during a step
    /// stops the run after that step.
    pub stop_poll: Option<fn() -> bool>,
}

fn seed_for(seed: u64, step: u64) -> i64 {
    let mix = crate::seed::SplitMix64::new(seed, step).next_u64();
    (mix >> 1) as i64
}

impl Trainer {
    /// A fresh run: student initialised from `cfg.seed`, teacher = copy of the student.
    pub fn new(cfg: PretrainConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        tch::manual_seed(seed_for(cfg.seed, u64::MAX));
        let student = Net::new(&cfg, device).context("building the student")?;
        let mut teacher = Net::new(&cfg, device).context("building the teacher")?;
        let opt = AdamW::new(cfg.optim, trainable_named(&student.vs))?;
        let mut ema = EmaTeacher::new(&mut teacher.vs, &opt)?;
        ema.copy_from(&opt)?;
        // Buffers too (BN running statistics, the relative position index).
        tch::no_grad(|| -> Result<()> {
            let sv = student.vs.variables();
            for (name, mut t) in teacher.vs.variables() {
                t.f_copy_(&sv[&name])?;
            }
            Ok(())
        })?;
        let amp = device.is_cuda();
        if amp {
            super::cuda::set_tf32(true)?;
        }
        Ok(Trainer {
            stop_vote: false,
            stop_poll: None,
            dist: None,
            reducer: None,
            rank_loader_states: Vec::new(),
            amp,
            lr: cfg.lr_schedule(),
            momentum: cfg.momentum_schedule(),
            cfg,
            device,
            student,
            teacher,
            opt,
            ema,
            loader_state: None,
            samples: 0,
        })
    }

    /// Joins a data-parallel group: every rank takes rank 0's weights, buffers and
    /// optimiser moments (so all start, or resume, from the same state), and from now on
    /// each step averages the gradients over the ranks before the update (every rank then
    /// applies the same update, and the EMA teacher stays identical across ranks) and
    /// averages the logged loss and accuracy. Each rank trains on its own per-rank batch;
    /// the projection heads' BatchNorm uses per-rank batch statistics, as the official
    /// code, unless `cfg.sync_bn` (statistics over all ranks' rows). Drop-path draws
    /// differ per rank.
    pub fn join(&mut self, pg: super::dist::ProcessGroup) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for net in [&self.student, &self.teacher] {
                let mut vars: Vec<(String, Tensor)> = net.vs.variables().into_iter().collect();
                vars.sort_by(|a, b| a.0.cmp(&b.0));
                for (name, t) in vars {
                    pg.broadcast(&t, 0)
                        .with_context(|| format!("broadcasting {name} from rank 0"))?;
                }
            }
            for g in &self.opt.groups {
                pg.broadcast(&g.exp_avg, 0)?;
                pg.broadcast(&g.exp_avg_sq, 0)?;
            }
            Ok(())
        })?;
        self.reducer = Some(
            super::dist::GradReducer::new(&pg, &self.opt.vars())
                .context("setting up DDP's reducer")?,
        );
        self.dist = Some(pg);
        Ok(())
    }

    /// Collects every rank's loader position into `rank_loader_states` (a collective:
    /// all ranks call it at the same step, before rank 0 saves a checkpoint). No-op
    /// without data parallelism.
    pub fn gather_loader_states(&mut self) -> Result<()> {
        let Some(pg) = &self.dist else {
            return Ok(());
        };
        let Some(s) = &self.loader_state else {
            bail!("rank {}: no loader position to save yet", pg.rank);
        };
        self.rank_loader_states = pg
            .gather_loader_states(s)
            .context("gathering loader positions")?;
        Ok(())
    }

    /// Where this rank's loader resumes ([`super::dist::resume_at`]): exactly, from its
    /// own saved position, when the checkpoint's world size is this run's; else at the
    /// start of the earliest saved epoch, with this run's split of the shards. Forgets
    /// the saved per-rank positions: a later checkpoint of this run stores those
    /// gathered then, or none in a single process (a single process resumed from a
    /// torchrun checkpoint saved them again unchanged, and its next resume took the
    /// stale one).
    pub fn resume_at(&mut self) -> super::dist::ResumeAt {
        let at = super::dist::resume_at(
            &self.rank_loader_states,
            self.loader_state.clone(),
            self.rank(),
            self.world_size(),
        );
        self.rank_loader_states.clear();
        at
    }

    /// The number of ranks (1 without data parallelism).
    pub fn world_size(&self) -> usize {
        self.dist.as_ref().map_or(1, |d| d.world_size)
    }

    /// This process's rank (0 without data parallelism).
    pub fn rank(&self) -> usize {
        self.dist.as_ref().map_or(0, |d| d.rank)
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.opt.step
    }

    /// Opens the training loader for this run on `data`, at `state` when resuming.
    pub fn open_loader(
        &self,
        data: &str,
        opts: &SourceOptions,
        state: Option<&LoaderState>,
    ) -> Result<Loader> {
        let at = state.map_or(super::dist::ResumeAt::Start, |s| {
            super::dist::ResumeAt::Exact(s.clone())
        });
        Ok(self.open_loader_at(data, opts, &at)?.0)
    }

    /// Opens the training loader for this run on `data` where `at` says (and what
    /// became of a checkpoint of another world size, for the log).
    pub fn open_loader_at(
        &self,
        data: &str,
        opts: &SourceOptions,
        at: &super::dist::ResumeAt,
    ) -> Result<(Loader, Option<crate::stream::Rejoin>)> {
        let mut cfg = self.cfg.loader_config();
        if let Some(pg) = &self.dist {
            // Per-rank batch; shards split by RANK / WORLD_SIZE (the stream's epoch rules).
            cfg.batch_size /= pg.world_size;
            cfg = cfg
                .with_env_distribution()
                .context("splitting the data by rank")?;
        }
        super::dist::open_loader_at(data, opts, cfg, at)
    }

    /// One training step on `batch` (uploads it, then [`Trainer::train_step_device`]).
    /// A non-finite loss or gradient norm is an error and leaves the weights, moments and
    /// step untouched.
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepStats> {
        let x = DeviceBatch::upload(batch, self.device).context("uploading the batch")?;
        self.train_step_device(&x, || Ok(()))
    }

    /// One training step on a batch already on the device. `between` runs after the
    /// forward and backward passes are queued and before the step's one device sync
    /// (the loop uploads the next batch there, overlapping the GPU's work). A
    /// non-finite loss or gradient norm is an error and leaves the weights, moments and
    /// step untouched.
    pub fn train_step_device(
        &mut self,
        x: &DeviceBatch,
        between: impl FnOnce() -> Result<()>,
    ) -> Result<StepStats> {
        let step = self.opt.step;
        let b = x.len();
        let size = x.image_size();
        if size as i64 != self.cfg.model.image_size {
            bail!(
                "batch views are {size} px, the model takes {} px",
                self.cfg.model.image_size
            );
        }
        let n = self.cfg.model.num_patches();
        if x.mask_len() as i64 != n {
            bail!("batch masks have {} patches, the model {n}", x.mask_len());
        }
        let lr = self.lr.at(step);
        let momentum = self.momentum.at(step);
        // Per-rank draws (drop path); rank 0 = the single-process sequence.
        let rank_seed = crate::seed::rank_seed(self.cfg.seed, self.rank());
        tch::manual_seed(seed_for(rank_seed, step));
        let xw = normalize_nhwc(&x.weak, IMAGENET_MEAN, IMAGENET_STD)?;
        let xs = normalize_nhwc(&x.strong, IMAGENET_MEAN, IMAGENET_STD)?;
        let mask = &x.mask;
        // SyncBN: the heads' BatchNorm statistics over every rank's rows.
        let sync = self.dist.as_ref().filter(|_| self.cfg.sync_bn);
        let (proj, target) = super::cuda::autocast_bf16(self.amp, || -> Result<_> {
            let target = tch::no_grad(|| -> Result<Tensor> {
                let f = self
                    .teacher
                    .vit
                    .forward_features(&xs, None, self.cfg.teacher_drop_path)?;
                Ok(self
                    .teacher
                    .head
                    .forward_sync(&f, true, sync)?
                    .narrow(1, 1, n))
            })?;
            let f = self.student.vit.forward_features(&xw, Some(mask), true)?;
            let proj = self
                .student
                .head
                .forward_sync(&f, true, sync)?
                .narrow(1, 1, n);
            Ok((proj, target))
        })??;
        // The loss in fp32 (a no-op cast on the CPU).
        let (proj, target) = (proj.to_kind(Kind::Float), target.to_kind(Kind::Float));
        let out = conmim_loss(&proj, &target, mask, self.cfg.temperature)?;
        if let Some(r) = &mut self.reducer {
            r.prepare().context("arming the gradient all-reduce")?;
        }
        // With a reducer, the gradients come out of backward averaged over the ranks.
        out.loss.f_backward().context("the backward pass")?;
        let grads = self.opt.gradients()?;
        between()?;
        // The step's one device sync.
        let parts: Vec<Tensor> = [&out.loss.detach(), &out.masked, &grads.norm, &out.accuracy]
            .iter()
            .map(|t| t.to_kind(Kind::Double).reshape([1]))
            .collect();
        // Read now, after the backward pass is queued: a signal during this step
        // stops after it.
        let stop = self.stop_vote || self.stop_poll.is_some_and(|f| f());
        let vote = Tensor::from_slice(&[if stop { 1.0f64 } else { 0.0 }]);
        let mut all = Tensor::cat(&[Tensor::cat(&parts, 0).to_device(Device::Cpu), vote], 0);
        if let Some(pg) = &self.dist {
            // Mean loss / masked / accuracy over ranks (the norm is already global); a
            // stop vote anywhere makes the mean positive everywhere.
            pg.all_reduce_mean(&mut all).context("averaging metrics")?;
        }
        let got = Vec::<f64>::try_from(&all)?;
        let (loss, masked, grad_norm, accuracy) = (got[0], got[1], got[2], got[3]);
        let stop = got[4] > 0.0;
        if let Some(why) = super::optim::unusable_step(loss, grad_norm, step) {
            self.opt.zero_grad();
            bail!(why);
        }
        if masked == 0.0 {
            self.opt.zero_grad();
            bail!("step {step}: the batch has no masked patch (mask plumbing bug)");
        }
        self.opt.apply(grads, lr, self.cfg.clip_grad)?;
        self.ema.update(&self.opt, momentum)?;
        if let Some(state) = &x.state {
            self.loader_state = Some(state.clone());
        }
        self.samples += (b * self.world_size()) as u64;
        Ok(StepStats {
            step,
            loss,
            accuracy,
            lr,
            momentum,
            grad_norm,
            batch: b,
            stop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testing::seeded;
    use crate::train::train_data::{dataset, micro_config};

    #[test]
    fn loss_falls_on_a_tiny_dataset() {
        let _rng = seeded(3);
        let dir = tempfile::tempdir().unwrap();
        dataset(dir.path(), &[8, 8]);
        let mut cfg = micro_config(8, 40);
        cfg.lr = 3e-3 * 2048.0 / 8.0;
        cfg.warmup_steps = Some(3);
        let mut t = Trainer::new(cfg, Device::Cpu).unwrap();
        let loader = t
            .open_loader(
                dir.path().to_str().unwrap(),
                &SourceOptions::default(),
                None,
            )
            .unwrap();
        let mut losses = Vec::new();
        for batch in loader.take(40) {
            let s = t.train_step(&batch.unwrap()).unwrap();
            assert!(s.grad_norm.is_finite() && s.lr >= 0.0);
            losses.push(s.loss);
        }
        assert_eq!(t.step(), 40);
        let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = losses[35..].iter().sum::<f64>() / 5.0;
        println!("losses {losses:?}");
        assert!(last < first - 0.1, "loss did not fall: {first} -> {last}");
    }

    /// The teacher drops paths like the student (the official teacher stays in training
    /// mode) unless `teacher_drop_path` is off; with a drop path rate of 0 the switch
    /// changes nothing.
    #[test]
    fn teacher_drops_paths_unless_told_not_to() {
        let _rng = seeded(4);
        let batch = {
            tch::manual_seed(11);
            DeviceBatch::synthetic(4, 32, 16, 12, Device::Cpu).unwrap()
        };
        // The teacher's output of one step, as its (pre-update) target: the loss.
        let loss = |rate: f64, teacher_dp: bool| {
            let mut cfg = crate::train::train_data::micro_config(4, 10);
            cfg.model.drop_path_rate = rate;
            cfg.teacher_drop_path = teacher_dp;
            let mut t = Trainer::new(cfg, Device::Cpu).unwrap();
            t.train_step_device(&batch, || Ok(())).unwrap().loss
        };
        assert_eq!(loss(0.0, true), loss(0.0, false));
        assert_eq!(loss(0.5, true), loss(0.5, true), "seeded: the same draws");
        assert_ne!(loss(0.5, true), loss(0.5, false));
        assert!(
            PretrainConfig::preset("small").unwrap().teacher_drop_path,
            "the default"
        );
    }
}
