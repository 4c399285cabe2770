//! What tch does not expose, reached through a small C++ shim (`src/train/shim.cpp`,
//! compiled by `build.rs` against the same libtorch headers): bf16 autocast on CUDA,
//! TF32, CUDA allocator statistics.

use std::ffi::{CStr, c_char, c_int};

use tch::{Device, TchError};

unsafe extern "C" {
    fn conmim_autocast_cuda_bf16_enter(
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_autocast_cuda_exit(
        prev_enabled: c_int,
        prev_dtype: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_set_tf32(enabled: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn conmim_cuda_set_device(index: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn conmim_cuda_memory_stats(
        device: c_int,
        out: *mut u64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_cuda_reset_peak(device: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn conmim_fused_adamw(
        param: *const torch_sys::C_tensor,
        grad: *const torch_sys::C_tensor,
        exp_avg: *const torch_sys::C_tensor,
        exp_avg_sq: *const torch_sys::C_tensor,
        step: *const torch_sys::C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_clear_grads(
        tensors: *const *const torch_sys::C_tensor,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_profiler_start(cuda: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn conmim_profiler_stop(path: *const c_char, err: *mut c_char, err_len: usize) -> c_int;
    fn conmim_upload_async(
        host: *const torch_sys::C_tensor,
        device: c_int,
        out: *mut *mut torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Runs one shim call with an error buffer; a non-zero return becomes `TchError::Torch`.
pub(super) fn call(
    what: &str,
    f: impl FnOnce(*mut c_char, usize) -> c_int,
) -> Result<(), TchError> {
    let mut buf = [0 as c_char; 2048];
    if f(buf.as_mut_ptr(), buf.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates within the buffer on error.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    Err(TchError::Torch(format!("{what}: {msg}")))
}

/// CUDA caching-allocator statistics of one device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryStats {
    /// Bytes held by live tensors now.
    pub allocated: u64,
    /// The most bytes held by live tensors since the start (or the last reset).
    pub peak_allocated: u64,
    /// Bytes reserved by the caching allocator (allocated + cached).
    pub reserved: u64,
}

/// Allocator statistics of `device`; `None` on the CPU (or when CUDA cannot say).
pub fn memory_stats(device: Device) -> Option<MemoryStats> {
    let Device::Cuda(i) = device else {
        return None;
    };
    let mut out = [0u64; 3];
    // SAFETY: `out` has the 3 slots the shim writes.
    call("memory stats", |e, n| unsafe {
        conmim_cuda_memory_stats(i as c_int, out.as_mut_ptr(), e, n)
    })
    .ok()?;
    Some(MemoryStats {
        allocated: out[0],
        peak_allocated: out[1],
        reserved: out[2],
    })
}

/// Resets the peak of [`memory_stats`] on `device` (no-op on the CPU).
pub fn reset_peak_memory(device: Device) -> Result<(), TchError> {
    match device {
        // SAFETY: plain call, errors come back through the buffer.
        Device::Cuda(i) => call("reset peak", |e, n| unsafe {
            conmim_cuda_reset_peak(i as c_int, e, n)
        }),
        _ => Ok(()),
    }
}

/// Makes `device` the process's current CUDA device (`torch.cuda.set_device`), so that
/// what is not given a device (pinned host memory, default streams) lands on it and not
/// on GPU 0: each torchrun rank trains on its own GPU and leaves the others alone. A
/// no-op for the CPU.
pub fn set_current_device(device: Device) -> Result<(), TchError> {
    let Device::Cuda(i) = device else {
        return Ok(());
    };
    // SAFETY: plain call, errors come back through the buffer.
    call("set the current CUDA device", |e, n| unsafe {
        conmim_cuda_set_device(i as c_int, e, n)
    })
}

/// TF32 for fp32 matmuls and cuDNN convolutions (`torch.set_float32_matmul_precision
/// ("high")` + `cudnn.allow_tf32`); process-wide.
pub fn set_tf32(enabled: bool) -> Result<(), TchError> {
    // SAFETY: plain call, errors come back through the buffer.
    call("set tf32", |e, n| unsafe {
        conmim_set_tf32(enabled as c_int, e, n)
    })
}

/// Copies the CPU tensor `host` to `device`. On CUDA: through pinned memory,
/// non-blocking on a side stream, so the copy overlaps the compute already queued on the
/// current stream; later work on the current stream waits for it. On the CPU: a plain
/// (synchronous) copy. The caller may free `host` as soon as this returns.
pub fn upload(host: &tch::Tensor, device: Device) -> Result<tch::Tensor, TchError> {
    let Device::Cuda(i) = device else {
        let mut out = host.f_empty_like()?.f_to_device(device)?;
        out.f_copy_(host)?;
        return Ok(out);
    };
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    // SAFETY: `host` is a live tensor handle; on success the shim stores a new handle,
    // which `Tensor::from_ptr` takes ownership of.
    call("upload", |e, n| unsafe {
        conmim_upload_async(host.as_ptr(), i as c_int, &mut out, e, n)
    })?;
    Ok(unsafe { tch::Tensor::from_ptr(out) })
}

/// Hyper-parameters of one [`fused_adamw`] call.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// PyTorch's fused AdamW kernel (`_fused_adamw_`, as `AdamW(fused=True)`) over one
/// parameter tensor, in place: decoupled weight decay, moments, bias-corrected update.
/// `step` is a 1-element f32 tensor on the parameter's device holding the step count
/// after this step's increment.
pub fn fused_adamw(
    param: &tch::Tensor,
    grad: &tch::Tensor,
    exp_avg: &tch::Tensor,
    exp_avg_sq: &tch::Tensor,
    step: &tch::Tensor,
    h: AdamWStep,
) -> Result<(), TchError> {
    // SAFETY: live tensor handles; the kernel updates their storage in place.
    call("fused adamw", |e, n| unsafe {
        conmim_fused_adamw(
            param.as_ptr(),
            grad.as_ptr(),
            exp_avg.as_ptr(),
            exp_avg_sq.as_ptr(),
            step.as_ptr(),
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            e,
            n,
        )
    })
}

/// Drops the gradients of `tensors` (`grad = None`, as PyTorch's `zero_grad()` does by
/// default): the next backward writes fresh gradients instead of zero-filling and
/// accumulating (two kernel launches per parameter saved).
pub fn clear_grads(tensors: &[tch::Tensor]) -> Result<(), TchError> {
    let ptrs: Vec<*const torch_sys::C_tensor> = tensors.iter().map(|t| t.as_ptr()).collect();
    // SAFETY: `ptrs` holds live tensor handles for the duration of the call.
    call("clear grads", |e, n| unsafe {
        conmim_clear_grads(ptrs.as_ptr(), ptrs.len(), e, n)
    })
}

/// Starts libtorch's Kineto profiler (CPU ops; CUDA kernels too when `cuda`).
pub fn profiler_start(cuda: bool) -> Result<(), TchError> {
    // SAFETY: plain call, errors come back through the buffer.
    call("profiler start", |e, n| unsafe {
        conmim_profiler_start(cuda as c_int, e, n)
    })
}

/// Stops the profiler and writes a Chrome trace (torch.profiler's format) to `path`.
pub fn profiler_stop(path: &std::path::Path) -> Result<(), TchError> {
    let c = std::ffi::CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| TchError::Torch("profiler: path contains NUL".into()))?;
    // SAFETY: `c` is a NUL-terminated string alive for the call.
    call("profiler stop", |e, n| unsafe {
        conmim_profiler_stop(c.as_ptr(), e, n)
    })
}

/// Runs `f` under CUDA bf16 autocast when `enabled` (as `torch.autocast("cuda",
/// dtype=torch.bfloat16)`), otherwise just runs it. Autocast is thread-local state:
/// it covers what `f` runs on this thread. Restores the previous state afterwards,
/// also when `f` panics.
pub fn autocast_bf16<T>(enabled: bool, f: impl FnOnce() -> T) -> Result<T, TchError> {
    if !enabled {
        return Ok(f());
    }
    struct Guard(c_int, c_int);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: restores what enter saved; an error here can only be reported.
            if let Err(e) = call("autocast exit", |e, n| unsafe {
                conmim_autocast_cuda_exit(self.0, self.1, e, n)
            }) {
                eprintln!("conmim: {e}");
            }
        }
    }
    let (mut en, mut dt) = (0, 0);
    // SAFETY: the shim writes the two ints it is given.
    call("autocast enter", |e, n| unsafe {
        conmim_autocast_cuda_bf16_enter(&mut en, &mut dt, e, n)
    })?;
    let _guard = Guard(en, dt);
    Ok(f())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn shim_links_and_reports_cpu_state() {
        assert_eq!(memory_stats(Device::Cpu), None);
        reset_peak_memory(Device::Cpu).unwrap();
        set_tf32(true).unwrap();
        set_tf32(false).unwrap();
        // Autocast on CUDA leaves CPU math alone; nesting restores the state.
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        let y = autocast_bf16(true, || autocast_bf16(true, || a.matmul(&a)).unwrap()).unwrap();
        assert_eq!(y.kind(), Kind::Float);
        assert_eq!(y.sum(Kind::Float).double_value(&[]), 64.0);
    }

    #[test]
    fn autocast_bf16_casts_cuda_matmuls() {
        if !tch::Cuda::is_available() {
            eprintln!("NOTICE: no CUDA device; the bf16 autocast check runs on GPU machines");
            return;
        }
        let d = Device::Cuda(0);
        let a = Tensor::ones([8, 8], (Kind::Float, d));
        let y = autocast_bf16(true, || a.matmul(&a)).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
        let z = a.matmul(&a);
        assert_eq!(
            z.kind(),
            Kind::Float,
            "autocast is off again after the closure"
        );
        let m = memory_stats(d).unwrap();
        assert!(m.peak_allocated >= m.allocated && m.allocated > 0);
    }
}
