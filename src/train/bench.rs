//! Training throughput (`conmim-bench train`, feature `train`): img/s of the ConMIM
//! step for a preset, on synthetic device-side input (the model's speed alone) or on
//! the real loader (with the fraction of step time spent waiting for data). The
//! PyTorch eager reference of the same step is `tools/bench/torch_train.py`.
//!
//! With the loader, batch k+1 is fetched and uploaded while step k runs on the GPU
//! (the `between` hook of [`Trainer::train_step_device`]); "waiting for data" is the
//! time blocked on the loader there.

use std::time::Instant;

use anyhow::{Result, bail};
use serde::Serialize;
use tch::Device;

use super::input::DeviceBatch;
use super::pretrain_config::PretrainConfig;
use super::trainer::Trainer;
use crate::stream::SourceOptions;

/// What to measure.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    /// `tiny`, `small`, `base` or `large`.
    pub preset: String,
    /// Use the timm-style backbone (absolute position embedding) instead of BEiT-style.
    pub timm_style: bool,
    pub batch: usize,
    /// Measured steps (after `warmup`).
    pub steps: u64,
    pub warmup: u64,
    pub device: Device,
    /// bf16 autocast (CUDA only).
    pub amp: bool,
    /// Real data (dataset dir / shards); `None`: synthetic batches made on the device.
    pub data: Option<String>,
    pub split: String,
    /// Loader threads (0: all cores but two).
    pub threads: usize,
    pub image_size: Option<i64>,
    /// After timing, profile 3 more steps (synthetic input) and write libtorch's
    /// Chrome trace here (summarise with tools/bench/trace_summary.py).
    pub profile: Option<std::path::PathBuf>,
}

/// One measurement (the JSON `conmim-bench train --json` prints).
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchReport {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub model: String,
    pub variant: String,
    pub input: String,
    pub batch: usize,
    pub steps: u64,
    pub warmup: u64,
    pub img_per_s: f64,
    pub step_ms: f64,
    /// Fraction of the measured time blocked on the loader (0 with synthetic input).
    pub data_wait_frac: f64,
    /// Seconds per step spent uploading (pinned copy, queuing the H2D transfer).
    pub upload_ms: f64,
    pub peak_mem_bytes: Option<u64>,
    pub loss_first: f64,
    pub loss_last: f64,
    pub amp: bool,
    pub device: String,
    pub threads: usize,
}

/// Runs the benchmark.
pub fn bench_train(o: &TrainBenchOptions) -> Result<TrainBenchReport> {
    if o.steps == 0 || o.batch == 0 {
        bail!("--steps and --batch must be positive");
    }
    if o.profile.is_some() && o.data.is_some() {
        bail!(
            "--profile traces steps on synthetic input: run it without --data (the loader \
             does not change what the step's kernels do)"
        );
    }
    let mut cfg = PretrainConfig::preset(&o.preset)?;
    if o.timm_style {
        cfg.model = cfg.model.timm_style();
    }
    if let Some(s) = o.image_size {
        cfg.model = cfg.model.with_image_size(s);
    }
    cfg.batch_size = o.batch;
    cfg.total_steps = o.steps + o.warmup;
    cfg.data_threads = o.threads;
    cfg.validate()?;
    let n = cfg.model.num_patches() as usize;
    let masked = ((n as f64) * cfg.mask_ratio) as usize;
    let size = cfg.model.image_size as usize;
    let mut t = Trainer::new(cfg.clone(), o.device)?;
    t.amp = o.amp && o.device.is_cuda();

    let sync = || {
        if let Device::Cuda(i) = o.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let total = o.steps + o.warmup;
    let (mut losses, mut wait, mut upload) = (Vec::new(), 0.0f64, 0.0f64);
    let mut t0 = Instant::now();
    match &o.data {
        None => {
            let batches: Vec<DeviceBatch> = (0..4)
                .map(|_| DeviceBatch::synthetic(o.batch, size, n, masked, o.device))
                .collect::<std::result::Result<_, _>>()?;
            for i in 0..total {
                if i == o.warmup {
                    sync();
                    t0 = Instant::now();
                }
                let s = t.train_step_device(&batches[i as usize % batches.len()], || Ok(()))?;
                losses.push(s.loss);
            }
            if let Some(path) = &o.profile {
                sync();
                let secs = t0.elapsed();
                super::cuda::profiler_start(o.device.is_cuda())?;
                for batch in batches.iter().take(3) {
                    t.train_step_device(batch, || Ok(()))?;
                }
                sync();
                super::cuda::profiler_stop(path)?;
                t0 = Instant::now() - secs;
            }
        }
        Some(data) => {
            let opts = SourceOptions {
                split: o.split.clone(),
                allow_pipe: false,
                ..SourceOptions::default()
            };
            let mut loader = t.open_loader(data, &opts, None)?;
            let mut step = 0u64;
            let mut fetch = |wait: &mut f64, upload: &mut f64| -> Result<DeviceBatch> {
                let (d, w, u) = DeviceBatch::next_from(&mut loader, o.device, step)?;
                step += 1;
                *wait += w;
                *upload += u;
                Ok(d)
            };
            let mut next = Some(fetch(&mut wait, &mut upload)?);
            for i in 0..total {
                if i == o.warmup {
                    sync();
                    t0 = Instant::now();
                    (wait, upload) = (0.0, 0.0);
                }
                let cur = next.take().expect("prefetched");
                let last = i + 1 == total;
                let s = t.train_step_device(&cur, || {
                    if !last {
                        next = Some(fetch(&mut wait, &mut upload)?);
                    }
                    Ok(())
                })?;
                losses.push(s.loss);
            }
        }
    }
    sync();
    let secs = t0.elapsed().as_secs_f64();
    let imgs = (o.steps as usize * o.batch) as f64;
    Ok(TrainBenchReport {
        implementation: "conmim".into(),
        model: o.preset.clone(),
        variant: if o.timm_style { "timm" } else { "beit" }.into(),
        input: if o.data.is_some() {
            "loader"
        } else {
            "synthetic"
        }
        .into(),
        batch: o.batch,
        steps: o.steps,
        warmup: o.warmup,
        img_per_s: imgs / secs,
        step_ms: 1e3 * secs / o.steps as f64,
        data_wait_frac: wait / secs,
        upload_ms: 1e3 * upload / o.steps as f64,
        peak_mem_bytes: super::cuda::memory_stats(o.device).map(|m| m.peak_allocated),
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
        amp: t.amp,
        device: match o.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        },
        threads: if o.data.is_some() {
            cfg.loader_config().threads
        } else {
            0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testing::seeded;
    use crate::train::train_data::dataset;

    fn opts(data: Option<String>) -> TrainBenchOptions {
        TrainBenchOptions {
            preset: "tiny".into(),
            timm_style: false,
            batch: 4,
            steps: 2,
            warmup: 1,
            device: Device::Cpu,
            amp: true,
            data,
            split: "train".into(),
            threads: 2,
            image_size: Some(32),
            profile: None,
        }
    }

    #[test]
    fn bench_train_synthetic_and_loader_on_cpu() {
        let _rng = seeded(5);
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace.json");
        let r = bench_train(&TrainBenchOptions {
            profile: Some(trace.clone()),
            ..opts(None)
        })
        .unwrap();
        let text = std::fs::read_to_string(&trace).unwrap();
        assert!(
            text.contains("traceEvents") && text.contains("aten::"),
            "a Chrome trace"
        );
        assert_eq!((r.input.as_str(), r.batch, r.steps), ("synthetic", 4, 2));
        assert!(r.img_per_s > 0.0 && r.loss_first.is_finite() && r.loss_last.is_finite());
        assert!(!r.amp, "no autocast on the CPU");
        dataset(dir.path(), &[8, 8]);
        let mut o = opts(Some(dir.path().to_str().unwrap().into()));
        o.timm_style = true;
        let r = bench_train(&o).unwrap();
        assert_eq!((r.input.as_str(), r.variant.as_str()), ("loader", "timm"));
        // A trace is taken on synthetic input only; with --data it is refused, not
        // silently skipped.
        o.profile = Some(trace.clone());
        let err = bench_train(&o).unwrap_err().to_string();
        assert!(err.contains("--profile") && err.contains("--data"), "{err}");
        assert!((0.0..=1.0).contains(&r.data_wait_frac), "{r:?}");
    }
}
