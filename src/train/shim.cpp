// conmim's C++ shim: the few libtorch calls that tch does not expose. Compiled by
// build.rs (feature `train`) against the headers of the libtorch torch-sys links.
// Every function catches C++ exceptions and reports them as a non-zero return with the
// message copied into `err` (NUL-terminated, truncated to `err_len`).

#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cstdint>
#include <string>

#include "shim_util.h"

extern "C" {

// Enters bf16 autocast on CUDA: saves the previous enabled flag and dtype in `prev_*`.
int conmim_autocast_cuda_bf16_enter(int* prev_enabled, int* prev_dtype, char* err, size_t err_len) {
    CONMIM_TRY
    *prev_enabled = at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(at::kCUDA));
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
    at::autocast::increment_nesting();
    CONMIM_CATCH
}

// Leaves autocast: restores what `..._enter` saved; clears the cast cache at the outermost
// exit (as torch.autocast's __exit__ does).
int conmim_autocast_cuda_exit(int prev_enabled, int prev_dtype, char* err, size_t err_len) {
    CONMIM_TRY
    if (at::autocast::decrement_nesting() == 0) {
        at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(at::kCUDA, prev_enabled != 0);
    at::autocast::set_autocast_dtype(at::kCUDA, static_cast<at::ScalarType>(prev_dtype));
    CONMIM_CATCH
}

// TF32 for fp32 matmuls (torch.set_float32_matmul_precision("high")) and cuDNN convs.
int conmim_set_tf32(int enabled, char* err, size_t err_len) {
    CONMIM_TRY
    at::globalContext().setFloat32MatmulPrecision(enabled ? "high" : "highest");
    at::globalContext().setAllowTF32CuDNN(enabled != 0);
    CONMIM_CATCH
}

// Makes CUDA device `index` the current one (torch.cuda.set_device): where pinned host
// memory, default streams and anything else not given a device land.
int conmim_cuda_set_device(int index, char* err, size_t err_len) {
    CONMIM_TRY
    at::accelerator::setDeviceIndex(static_cast<c10::DeviceIndex>(index));
    CONMIM_CATCH
}

// CUDA caching-allocator statistics of `device`: out[0] allocated now, out[1] peak
// allocated, out[2] reserved (all pools, bytes).
int conmim_cuda_memory_stats(int device, uint64_t* out, char* err, size_t err_len) {
    CONMIM_TRY
    auto stats = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const size_t all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = static_cast<uint64_t>(stats.allocated_bytes[all].current);
    out[1] = static_cast<uint64_t>(stats.allocated_bytes[all].peak);
    out[2] = static_cast<uint64_t>(stats.reserved_bytes[all].current);
    CONMIM_CATCH
}

// Resets the peak statistics of `device`.
int conmim_cuda_reset_peak(int device, char* err, size_t err_len) {
    CONMIM_TRY
    at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    CONMIM_CATCH
}

// Copies the CPU tensor `host` to CUDA device `device` on a side stream, overlapping the
// compute queued on the current stream: pins it first (unless already pinned), copies
// non-blocking on a pool stream, and makes the current stream wait for the copy before
// anything queued later. The result is marked as used by the current stream (so the
// caching allocator does not hand its memory out early). `*out` receives a new
// heap-allocated tensor handle (owned by the caller, as tch's `Tensor`).
int conmim_upload_async(const at::Tensor* host, int device, at::Tensor** out, char* err,
                        size_t err_len) {
    CONMIM_TRY
    const c10::Device dev(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    at::Tensor pinned = host->is_pinned() ? *host : host->pin_memory();
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    const c10::Stream current = impl.getStream(dev);
    const c10::Stream side = impl.getStreamFromGlobalPool(dev, false);
    at::Tensor result;
    {
        c10::StreamGuard guard(side);
        result = pinned.to(dev, /*non_blocking=*/true);
    }
    c10::Event copied(c10::DeviceType::CUDA);
    copied.record(side);
    copied.block(current);
    at::getDeviceAllocator(c10::DeviceType::CUDA)
        ->recordStream(result.storage().data_ptr(), current);
    *out = new at::Tensor(std::move(result));
    CONMIM_CATCH
}

// One fused AdamW update (PyTorch's `_fused_adamw_`, what `AdamW(fused=True)` runs) of
// `param` from `grad`, with moments `exp_avg`/`exp_avg_sq` and the step count in the
// 1-element f32 tensor `step` (already incremented, as torch.optim does).
int conmim_fused_adamw(const at::Tensor* param, const at::Tensor* grad, const at::Tensor* exp_avg,
                       const at::Tensor* exp_avg_sq, const at::Tensor* step, double lr,
                       double beta1, double beta2, double weight_decay, double eps, char* err,
                       size_t err_len) {
    CONMIM_TRY
    std::vector<at::Tensor> p{*param}, g{*grad}, m{*exp_avg}, v{*exp_avg_sq}, s{*step};
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    CONMIM_CATCH
}

// Drops the gradients of `n` tensors (`param.grad = None`, what PyTorch's
// `zero_grad(set_to_none=True)` does): the next backward writes fresh gradients instead
// of zero-filling and then accumulating into the old ones (two kernels per parameter).
int conmim_clear_grads(const at::Tensor* const* tensors, size_t n, char* err, size_t err_len) {
    CONMIM_TRY
    for (size_t i = 0; i < n; ++i) {
        at::Tensor t = *tensors[i];
        t.mutable_grad().reset();
    }
    CONMIM_CATCH
}

// Starts libtorch's (Kineto) profiler: CPU ops, plus CUDA kernels when `cuda`.
int conmim_profiler_start(int cuda, char* err, size_t err_len) {
    CONMIM_TRY
    using namespace torch::profiler::impl;
    std::set<ActivityType> acts{ActivityType::CPU};
    if (cuda) acts.insert(ActivityType::CUDA);
    ProfilerConfig cfg(ProfilerState::KINETO);
    torch::autograd::profiler::prepareProfiler(cfg, acts);
    torch::autograd::profiler::enableProfiler(cfg, acts);
    CONMIM_CATCH
}

// Stops the profiler and writes its Chrome trace (the format of torch.profiler's
// export_chrome_trace) to `path`.
int conmim_profiler_stop(const char* path, char* err, size_t err_len) {
    CONMIM_TRY
    auto result = torch::autograd::profiler::disableProfiler();
    if (result) result->save(path);
    CONMIM_CATCH
}

}  // extern "C"
