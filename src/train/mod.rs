//! The GPU side (feature `train`): libtorch through `tch`.
//!
//! * [`vit`]: the ViT backbone (BEiT-style as the official ConMIM pretraining code, or
//!   timm-style), parameters named as timm names them.
//! * [`head`]: the ConMIM projection head (3 layers, 4096 hidden, 256 out, BatchNorm).
//! * [`loss`]: L2 normalisation and the ConMIM intra-image patch-level InfoNCE.
//! * [`input`]: the loader's u8 NHWC views and masks -> normalised f32 NCHW / Bool
//!   tensors on the training device.
//! * [`init`]: the official code's truncated-normal initialisation.
//! * [`pos_resize`]: position terms resampled to another patch grid (fine-tuning at
//!   another resolution).
//!
//! The trainer (optimiser, schedules, momentum teacher, checkpoints) builds on these.

use serde::Serialize;

pub mod head;
pub mod init;
pub mod input;
pub mod loss;
pub mod mixup;
pub mod vit;

pub mod bench;
pub mod checkpoint;
pub mod cuda;
pub mod dist;
pub mod export;
pub mod finetune;
pub mod optim;
pub mod pos_resize;
pub mod pretrain_config;
pub mod run;
pub mod schedule;
pub mod signals;
pub mod teacher;
pub mod tensorboard;
#[cfg(test)]
mod train_data;
pub mod trainer;

#[cfg(test)]
mod pretrain_tests;
#[cfg(test)]
pub(crate) mod testing;

/// What libtorch sees on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Runtime {
    /// Whether CUDA is usable.
    pub cuda: bool,
    /// Number of CUDA devices.
    pub cuda_devices: usize,
    /// Whether cuDNN is usable.
    pub cudnn: bool,
}

/// Probes libtorch's view of the machine.
pub fn runtime() -> Runtime {
    Runtime {
        cuda: tch::Cuda::is_available(),
        cuda_devices: tch::Cuda::device_count() as usize,
        cudnn: tch::Cuda::cudnn_is_available(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn libtorch_computes() {
        let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        assert_eq!(t.sum(tch::Kind::Float).double_value(&[]), 6.0);
        let r = super::runtime();
        assert!(r.cuda || r.cuda_devices == 0);
    }
}
