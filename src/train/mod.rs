//! The GPU side (feature `train`): libtorch through `tch`. This issue only wires the
//! runtime in; the model, loss and trainer arrive with the pretraining issue.

use serde::Serialize;

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
