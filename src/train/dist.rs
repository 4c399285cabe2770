//! Data-parallel plumbing on libtorch's own c10d (through `src/train/dist_shim.cpp`):
//! the environment torchrun sets ([`DistEnv`]), the store it expects (a client of the
//! elastic agent's TCPStore when `TORCHELASTIC_USE_AGENT_STORE` is set, else rank 0
//! hosts one at `MASTER_ADDR:MASTER_PORT`), and a [`ProcessGroup`] (Gloo on CPUs,
//! NCCL on GPUs) with the collectives the trainer needs: all-reduce, broadcast,
//! barrier. Every collective waits at most the group's timeout, so a dead or hung
//! rank makes the others fail with an error instead of hanging.
//!
//! The trainer joins a group with [`super::trainer::Trainer::join`] (rank 0's weights
//! broadcast, metrics averaged) and averages gradients with [`GradReducer`]: libtorch's
//! `c10d::Reducer`, DDP's bucketed all-reduce overlapped with the backward pass.

use std::ffi::{CString, c_char, c_int, c_void};
use std::time::Duration;

use tch::{Device, TchError, Tensor};

type Result<T> = std::result::Result<T, TchError>;

#[cfg(not(conmim_no_gloo))]
unsafe extern "C" {
    fn conmim_pg_new(
        backend: *const c_char,
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        host_store: c_int,
        timeout_s: f64,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_pg_free(pg: *mut c_void);
    fn conmim_pg_allreduce_sum(
        pg: *mut c_void,
        t: *const torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_pg_broadcast(
        pg: *mut c_void,
        t: *const torch_sys::C_tensor,
        root: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_pg_barrier(pg: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn conmim_sync_batch_norm(
        pg: *mut c_void,
        x: *const torch_sys::C_tensor,
        weight: *const torch_sys::C_tensor,
        bias: *const torch_sys::C_tensor,
        running_mean: *const torch_sys::C_tensor,
        running_var: *const torch_sys::C_tensor,
        momentum: f64,
        eps: f64,
        out: *mut *mut torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_reducer_new(
        pg: *mut c_void,
        params: *const *const torch_sys::C_tensor,
        n: usize,
        bucket_mb: f64,
        first_bucket_mb: f64,
        find_unused: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_reducer_prepare(
        r: *mut c_void,
        outputs: *const *const torch_sys::C_tensor,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn conmim_reducer_free(r: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
}

/// Stand-ins when the build had no gloo headers (see build.rs): every call errors.
#[cfg(conmim_no_gloo)]
mod no_gloo {
    use super::*;
    const MSG: &[u8] = b"this build has no c10d shim (gloo headers were missing at build time: \
        install libgloo-dev, e.g. with tools/setup.sh, and rebuild)\0";
    unsafe fn fail(err: *mut c_char, err_len: usize) -> c_int {
        let n = MSG.len().min(err_len);
        // SAFETY: `err` has `err_len` bytes; the copy ends with a NUL when it fits.
        unsafe {
            std::ptr::copy_nonoverlapping(MSG.as_ptr() as *const c_char, err, n);
            *err.add(n - 1) = 0;
        }
        1
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn conmim_pg_new(
        _: *const c_char,
        _: *const c_char,
        _: c_int,
        _: c_int,
        _: c_int,
        _: c_int,
        _: f64,
        _: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int {
        unsafe { fail(err, err_len) }
    }
    pub unsafe fn conmim_pg_free(_: *mut c_void) {}
    pub unsafe fn conmim_pg_allreduce_sum(
        _: *mut c_void,
        _: *const torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int {
        unsafe { fail(err, err_len) }
    }
    pub unsafe fn conmim_pg_broadcast(
        _: *mut c_void,
        _: *const torch_sys::C_tensor,
        _: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int {
        unsafe { fail(err, err_len) }
    }
    pub unsafe fn conmim_pg_barrier(_: *mut c_void, err: *mut c_char, err_len: usize) -> c_int {
        unsafe { fail(err, err_len) }
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn conmim_sync_batch_norm(
        _: *mut c_void,
        _: *const torch_sys::C_tensor,
        _: *const torch_sys::C_tensor,
        _: *const torch_sys::C_tensor,
        _: *const torch_sys::C_tensor,
        _: *const torch_sys::C_tensor,
        _: f64,
        _: f64,
        _: *mut *mut torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int {
        unsafe { fail(err, err_len) }
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn conmim_reducer_new(
        _: *mut c_void,
        _: *const *const torch_sys::C_tensor,
        _: usize,
        _: f64,
        _: f64,
        _: c_int,
        _: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int {
        unsafe { fail(err, err_len) }
    }
    pub unsafe fn conmim_reducer_prepare(
        _: *mut c_void,
        _: *const *const torch_sys::C_tensor,
        _: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int {
        unsafe { fail(err, err_len) }
    }
    pub unsafe fn conmim_reducer_free(_: *mut c_void, _: *mut c_char, _: usize) -> c_int {
        0
    }
}
#[cfg(conmim_no_gloo)]
use no_gloo::*;

/// Whether this build has the c10d shim (it needs gloo headers at build time).
pub const AVAILABLE: bool = cfg!(not(conmim_no_gloo));

/// One shim call (errors come back prefixed "c10d").
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    super::cuda::call(&format!("c10d {what}"), f)
}

/// Where this process sits in a distributed run, as torchrun describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's elastic agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE=True`):
    /// every rank, rank 0 included, connects as a client.
    pub agent_store: bool,
    /// Launched by torchrun (its agent sets `TORCHELASTIC_RUN_ID`), as opposed to a
    /// `WORLD_SIZE` that happens to be in the environment.
    pub torchrun: bool,
}

impl DistEnv {
    /// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and
    /// TORCHELASTIC_USE_AGENT_STORE. `Ok(None)` when WORLD_SIZE is unset (a plain
    /// single-process run); an error naming the variable when one is malformed.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable source (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |k: &str, v: &str| -> Result<usize> {
            v.trim()
                .parse()
                .map_err(|_| TchError::Torch(format!("{k}={v:?} is not a non-negative integer")))
        };
        let world_size = num("WORLD_SIZE", &world)?;
        let rank = num("RANK", &get("RANK").unwrap_or_else(|| "0".into()))?;
        let local_rank = num(
            "LOCAL_RANK",
            &get("LOCAL_RANK").unwrap_or_else(|| "0".into()),
        )?;
        if world_size == 0 || rank >= world_size {
            return Err(TchError::Torch(format!(
                "RANK={rank} with WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE"
            )));
        }
        let master_port = match get("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse()
                .map_err(|_| TchError::Torch(format!("MASTER_PORT={p:?} is not a port number")))?,
            None => 29500,
        };
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1"),
            torchrun: get("TORCHELASTIC_RUN_ID").is_some(),
        }))
    }

    /// Whether this process trains through a process group: with more than one rank,
    /// and under torchrun with a single one too (the same distributed path as on many
    /// GPUs, e.g. to measure its cost). A lone `WORLD_SIZE=1` outside torchrun is a
    /// plain single-process run.
    pub fn wants_group(&self) -> bool {
        self.world_size > 1 || self.torchrun
    }

    /// Whether this process hosts the store server.
    pub fn hosts_store(&self) -> bool {
        self.rank == 0 && !self.agent_store
    }

    /// The device of this rank: its GPU ([`Self::gpu_index`]) when CUDA is there, else
    /// the CPU.
    pub fn device(&self) -> Device {
        if tch::Cuda::is_available() {
            Device::Cuda(self.gpu_index(tch::Cuda::device_count() as usize))
        } else {
            Device::Cpu
        }
    }

    /// This rank's GPU among the `visible` ones: `LOCAL_RANK`, or 0 where the launcher
    /// shows each process only its own GPU (one visible device: `srun
    /// --gpus-per-task=1`, or a per-rank `CUDA_VISIBLE_DEVICES`).
    pub fn gpu_index(&self, visible: usize) -> usize {
        if visible == 1 { 0 } else { self.local_rank }
    }
}

/// The c10d backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors.
    Gloo,
    /// CUDA tensors.
    Nccl,
}

impl Backend {
    /// NCCL for CUDA devices, Gloo otherwise (torch.distributed's default pairing).
    pub fn for_device(device: Device) -> Self {
        if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// Which attempt this is when torchrun restarted the workers (`--max-restarts`, a node
/// lost or joining an elastic job), from its variables (`get`): "torchrun restart 1 of
/// at most 3 (this node's count)", or `None` for a first attempt or outside torchrun.
/// Each node's agent counts its own restarts.
pub fn restart_note(get: impl Fn(&str) -> Option<String>) -> Option<String> {
    let count: u64 = get("TORCHELASTIC_RESTART_COUNT")?.trim().parse().ok()?;
    if count == 0 {
        return None;
    }
    Some(
        match get("TORCHELASTIC_MAX_RESTARTS").and_then(|m| m.trim().parse::<u64>().ok()) {
            Some(max) => format!("torchrun restart {count} of at most {max} (this node's count)"),
            None => format!("torchrun restart {count} (this node's count)"),
        },
    )
}

/// What to check after libtorch's message `msg` of a failed group init (the usual
/// multi-node mistakes), if it is one of those.
fn init_hint(backend: Backend, msg: &str, gloo_ifname: Option<&str>) -> Option<String> {
    if msg.contains("Unable to find address for") {
        let var = gloo_ifname.map_or(String::new(), |v| format!("GLOO_SOCKET_IFNAME={v}: "));
        return Some(format!(
            "{var}no network interface of that name with an address on this machine: name \
             one that `ip addr` lists (the one the nodes reach each other on), or unset it"
        ));
    }
    if backend == Backend::Gloo && msg.contains("connectFullMesh") {
        return Some(
            "The ranks reached the store but not each other: on several machines, set \
             GLOO_SOCKET_IFNAME on every node to the network interface they reach each other \
             on (otherwise Gloo takes the address this machine's hostname resolves to, and \
             loopback when that fails)"
                .into(),
        );
    }
    if msg.contains("connect to") && (msg.contains("timed out") || msg.contains("refused")) {
        return Some(
            "The store did not answer: check that node 0 is up, that MASTER_ADDR (or the \
             --rdzv-endpoint) is an address of node 0 that this node reaches, and that no \
             firewall blocks the port"
                .into(),
        );
    }
    None
}

/// A c10d process group (and the store it was made with).
pub struct ProcessGroup {
    ptr: *mut c_void,
    pub rank: usize,
    pub world_size: usize,
    pub backend: Backend,
    /// Where host tensors go for a collective: NCCL takes CUDA tensors only, so a CPU
    /// tensor (a metric, a count, a loader position) is copied to this rank's GPU and
    /// back ([`ProcessGroup::on_device`]); the CPU for Gloo.
    staging: Device,
}

// SAFETY: the c10d objects behind the handle are thread-safe to use from one thread at a
// time, and the handle is only used through &self / &mut self of its owner.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Connects to (or hosts) the store and creates the group; every collective waits
    /// at most `timeout`.
    pub fn new(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<Self> {
        let b = CString::new(backend.name()).expect("no NUL");
        let host = CString::new(env.master_addr.as_str())
            .map_err(|_| TchError::Torch("MASTER_ADDR contains NUL".into()))?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: C strings alive for the call; the shim stores a new handle in `ptr`.
        call("init", |e, n| unsafe {
            conmim_pg_new(
                b.as_ptr(),
                host.as_ptr(),
                env.master_port as c_int,
                env.rank as c_int,
                env.world_size as c_int,
                env.hosts_store() as c_int,
                timeout.as_secs_f64(),
                &mut ptr,
                e,
                n,
            )
        })
        .map_err(|e| {
            let e = match e {
                TchError::Torch(m) => m,
                other => other.to_string(),
            };
            let hint = init_hint(
                backend,
                &e,
                std::env::var("GLOO_SOCKET_IFNAME").ok().as_deref(),
            )
            .map_or(String::new(), |h| format!(". {h}"));
            TchError::Torch(format!(
                "{e} (rank {} of {}, store {}:{}){hint}",
                env.rank, env.world_size, env.master_addr, env.master_port
            ))
        })?;
        Ok(ProcessGroup {
            ptr,
            rank: env.rank,
            world_size: env.world_size,
            backend,
            staging: match backend {
                // The rank's GPU (GPU 0 where each process sees only its own); the
                // runs set it again with `on_device`.
                Backend::Nccl => Device::Cuda(env.gpu_index(tch::Cuda::device_count() as usize)),
                Backend::Gloo => Device::Cpu,
            },
        })
    }

    /// One line for the log: ranks, backend and how the global batch splits.
    pub fn describe(&self, global_batch: usize) -> String {
        let restart =
            restart_note(|k| std::env::var(k).ok()).map_or(String::new(), |n| format!("; {n}"));
        format!(
            "data parallel over {} rank{} ({}), global batch {global_batch} = {} per \
             rank{restart}",
            self.world_size,
            if self.world_size == 1 { "" } else { "s" },
            self.backend.name(),
            global_batch / self.world_size.max(1)
        )
    }

    /// The GPU this rank trains on (NCCL; default `cuda:LOCAL_RANK`), where host
    /// tensors are staged for collectives. No effect with Gloo.
    pub fn on_device(mut self, device: Device) -> Self {
        if self.backend == Backend::Nccl && device.is_cuda() {
            self.staging = device;
        }
        self
    }

    /// Where `t` has to be for this group's collectives, when not where it is: a host
    /// tensor under NCCL goes to the rank's GPU.
    fn staging_for(&self, t: &Tensor) -> Option<Device> {
        (self.backend == Backend::Nccl && t.device() == Device::Cpu).then_some(self.staging)
    }

    /// Runs collective `f` on `t` in place, through a device copy when `t` is a host
    /// tensor and the backend takes device tensors only.
    fn in_place(&self, t: &Tensor, f: impl FnOnce(&Tensor) -> Result<()>) -> Result<()> {
        match self.staging_for(t) {
            None => f(t),
            Some(d) => {
                let staged = t.f_to_device(d)?;
                f(&staged)?;
                let mut host = t.shallow_clone();
                tch::no_grad(|| host.f_copy_(&staged))?;
                Ok(())
            }
        }
    }

    /// Sums `t` over the ranks, in place (a host tensor is fine with either backend).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        self.in_place(t, |t| {
            // SAFETY: live handles.
            call("all_reduce", |e, n| unsafe {
                conmim_pg_allreduce_sum(self.ptr, t.as_ptr(), e, n)
            })
        })
    }

    /// Averages `t` over the ranks, in place.
    pub fn all_reduce_mean(&self, t: &mut Tensor) -> Result<()> {
        self.all_reduce_sum(t)?;
        let _ = t.f_div_scalar_(self.world_size as f64)?;
        Ok(())
    }

    /// Copies rank `root`'s `t` to every rank, in place (a host tensor is fine with
    /// either backend).
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        self.in_place(t, |t| {
            // SAFETY: live handles.
            call("broadcast", |e, n| unsafe {
                conmim_pg_broadcast(self.ptr, t.as_ptr(), root as c_int, e, n)
            })
        })
    }

    /// Waits until every rank gets here (or the timeout passes: an error).
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: live handle.
        call("barrier", |e, n| unsafe {
            conmim_pg_barrier(self.ptr, e, n)
        })
    }

    /// BatchNorm of `x` (`[rows, channels]`) with the mean and (biased) variance of the
    /// rows of every rank together (SyncBN, as `torch.nn.SyncBatchNorm`), and a backward
    /// pass through those global statistics. `affine`: the weight and bias (none: no
    /// affine part). With `running = Some((mean, var))` they are updated as BatchNorm's,
    /// with `momentum` and the unbiased variance over all rows. The output has `x`'s
    /// dtype. A collective in the forward pass and again in the backward pass (one
    /// all-reduce each): every rank must make the same calls in the same order. The
    /// group must outlive the graph built here.
    pub fn sync_batch_norm(
        &self,
        x: &Tensor,
        affine: Option<(&Tensor, &Tensor)>,
        running: Option<(&Tensor, &Tensor)>,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        let ptrs = |p: Option<(&Tensor, &Tensor)>| {
            p.map_or((std::ptr::null(), std::ptr::null()), |(a, b)| {
                (a.as_ptr(), b.as_ptr())
            })
        };
        let ((w, b), (rm, rv)) = (ptrs(affine), ptrs(running));
        let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
        // SAFETY: live handles (or null); on success the shim stores a new tensor
        // handle, which `Tensor::from_ptr` takes ownership of.
        call("sync_batch_norm", |e, n| unsafe {
            conmim_sync_batch_norm(
                self.ptr,
                x.as_ptr(),
                w,
                b,
                rm,
                rv,
                momentum,
                eps,
                &mut out,
                e,
                n,
            )
        })?;
        Ok(unsafe { Tensor::from_ptr(out) })
    }
}

impl ProcessGroup {
    /// Checks that `params` hold the same values on every rank as on rank 0 (within
    /// float noise; compared through their sum and absolute sum in f64): data-parallel
    /// training keeps the replicas identical, so a difference means the gradient
    /// averaging is broken. A collective.
    pub fn check_replicas_agree(&self, params: &[&Tensor], what: &str) -> Result<()> {
        let own = tch::no_grad(|| -> Result<Tensor> {
            let (mut sum, mut abs) = (0f64, 0f64);
            for p in params {
                let p = p.f_to_kind(tch::Kind::Double)?;
                sum += p.f_sum(tch::Kind::Double)?.double_value(&[]);
                abs += p.f_abs()?.f_sum(tch::Kind::Double)?.double_value(&[]);
            }
            Ok(Tensor::from_slice(&[sum, abs]))
        })?;
        let root = own.copy();
        self.broadcast(&root, 0)?;
        let (a, b) = (Vec::<f64>::try_from(&own)?, Vec::<f64>::try_from(&root)?);
        let tol = 1e-6 * b[1].abs().max(1.0);
        if (a[0] - b[0]).abs() > tol || (a[1] - b[1]).abs() > tol {
            return Err(TchError::Torch(format!(
                "rank {}'s {what} differ from rank 0's (sum {} vs {}, |sum| {} vs {}): the \
                 replicas diverged, so gradient averaging is broken",
                self.rank, a[0], b[0], a[1], b[1]
            )));
        }
        Ok(())
    }
}

impl ProcessGroup {
    /// Every rank's `own` row (each rank passes the same length), in rank order: each
    /// rank fills its row of a zeroed `[world, n]` buffer and the rows are summed, so
    /// the values arrive exactly. A collective.
    pub fn gather_i64(&self, own: &[i64]) -> Result<Vec<Vec<i64>>> {
        let n = own.len();
        let mut rows = vec![0i64; self.world_size * n];
        rows[self.rank * n..(self.rank + 1) * n].copy_from_slice(own);
        let t = Tensor::from_slice(&rows);
        self.all_reduce_sum(&t)?;
        let all = Vec::<i64>::try_from(&t)?;
        Ok(all.chunks(n.max(1)).map(<[i64]>::to_vec).collect())
    }

    /// Every rank's loader position, in rank order (a collective: all ranks call it at
    /// the same step, before rank 0 saves a checkpoint).
    pub fn gather_loader_states(
        &self,
        own: &crate::loader::LoaderState,
    ) -> Result<Vec<crate::loader::LoaderState>> {
        let s = own;
        let mine = [
            s.stream.version as i64,
            s.stream.epoch as i64,
            s.stream.samples as i64,
            s.stream.events as i64,
            s.stream.fingerprint as i64,
            s.next_batch as i64,
            s.settings as i64,
            s.stream.done as i64,
            s.stream.excluded.as_ref().map_or(-1, |e| e.len() as i64),
        ];
        let rows = self.gather_i64(&mine)?;
        // The shards an epoch resumed across world sizes leaves out: the same list on
        // every rank still in that epoch (none on a rank already past it), sent once by
        // the first rank that has it.
        let excluded: Option<std::sync::Arc<[usize]>> = match rows.iter().position(|r| r[8] >= 0) {
            None => None,
            Some(root) => {
                let len = rows[root][8] as usize;
                let list: Vec<i64> = if root == self.rank {
                    s.stream
                        .excluded
                        .as_deref()
                        .unwrap_or(&[])
                        .iter()
                        .map(|&i| i as i64)
                        .collect()
                } else {
                    vec![0; len]
                };
                let t = Tensor::from_slice(&list);
                if len > 0 {
                    self.broadcast(&t, root)?;
                }
                let got = Vec::<i64>::try_from(&t)?;
                Some(got.into_iter().map(|i| i as usize).collect())
            }
        };
        Ok(rows
            .into_iter()
            .map(|r| crate::loader::LoaderState {
                stream: crate::stream::StreamState {
                    version: r[0] as u32,
                    epoch: r[1] as u64,
                    samples: r[2] as u64,
                    events: r[3] as u64,
                    fingerprint: r[4] as u64,
                    done: r[7] as u64,
                    excluded: if r[8] >= 0 { excluded.clone() } else { None },
                },
                next_batch: r[5] as u64,
                settings: r[6] as u64,
            })
            .collect())
    }
}

/// "rank 3", "ranks 0-7", "ranks 0-3, 8, 12-15" (`ranks` ascending).
pub fn rank_ranges(ranks: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ranks.len() {
        let mut j = i;
        while j + 1 < ranks.len() && ranks[j + 1] == ranks[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            ranks[i].to_string()
        } else {
            format!("{}-{}", ranks[i], ranks[j])
        });
        i = j + 1;
    }
    let plural = if ranks.len() == 1 { "rank" } else { "ranks" };
    format!("{plural} {}", parts.join(", "))
}

/// Where a rank's training loader resumes (see [`resume_at`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeAt {
    /// At the start of the data (nothing saved).
    Start,
    /// Exactly where the saved run was: this rank's own saved position.
    Exact(crate::loader::LoaderState),
    /// The checkpoint is from a run of another world size: the saved ranks' positions
    /// (in rank order), which do not apply to this run's split of the shards one by
    /// one. Every rank goes on with the shards of the saved epoch that no saved rank
    /// had read through, split anew ([`crate::stream::Stream::rejoin`]).
    OtherWorld(Vec<crate::loader::LoaderState>),
}

/// Where rank `rank` of `world` resumes: its own entry of a multi-rank checkpoint
/// (`per_rank`, one state per rank) or the single-process one (`single`), exactly,
/// when the world size is the one saved; else [`ResumeAt::OtherWorld`] (a job resumed
/// on fewer or more GPUs, or an elastic rendezvous that came back with another number
/// of nodes).
pub fn resume_at(
    per_rank: &[crate::loader::LoaderState],
    single: Option<crate::loader::LoaderState>,
    rank: usize,
    world: usize,
) -> ResumeAt {
    let saved: Vec<_> = if per_rank.is_empty() {
        single.into_iter().collect()
    } else {
        per_rank.to_vec()
    };
    if saved.is_empty() {
        ResumeAt::Start
    } else if saved.len() == world {
        ResumeAt::Exact(saved[rank].clone())
    } else {
        ResumeAt::OtherWorld(saved)
    }
}

/// Opens the training loader over `data` with `cfg` (this rank's) where `at` says;
/// with [`ResumeAt::OtherWorld`], also what became of the saved positions (for the
/// log: [`crate::stream::Rejoin::describe`]).
pub fn open_loader_at(
    data: &str,
    opts: &crate::stream::SourceOptions,
    cfg: crate::loader::LoaderConfig,
    at: &ResumeAt,
) -> anyhow::Result<(crate::loader::Loader, Option<crate::stream::Rejoin>)> {
    use crate::loader::Loader;
    use crate::stream::Stream;
    use anyhow::Context;
    let open =
        || Stream::open(data, opts, cfg.stream.clone()).with_context(|| format!("opening {data}"));
    Ok(match at {
        ResumeAt::Start => (
            Loader::open(data, opts, cfg).with_context(|| format!("opening {data}"))?,
            None,
        ),
        ResumeAt::Exact(s) => (
            Loader::with_state(open()?, cfg, s).context("resuming the loader")?,
            None,
        ),
        ResumeAt::OtherWorld(saved) => {
            let mut stream = open()?;
            let states: Vec<_> = saved.iter().map(|s| s.stream.clone()).collect();
            let rejoin = stream
                .rejoin(&states)
                .context("resuming the data of a run of another world size")?;
            // Only the rest of a begun epoch may be short of one batch; a whole epoch
            // (the next one, or a saved epoch none of whose shards was read through) that
            // is smaller than a batch stays an error.
            let loader = if rejoin.next_epoch || rejoin.shards_done == 0 {
                Loader::new(stream, cfg)
            } else {
                Loader::rejoined(stream, cfg)
            };
            (
                loader.with_context(|| format!("opening {data}"))?,
                Some(rejoin),
            )
        }
    })
}

/// Where a rank writes its logs (config, metrics, TensorBoard events, summary): rank 0
/// into the run directory `out`, every other rank into a scratch directory of its own
/// under the system temp dir, removed again when this guard drops (so multi-rank runs
/// leave nothing behind; only rank 0's logs are the run's).
#[derive(Debug)]
pub struct LogDir {
    path: std::path::PathBuf,
    scratch: bool,
}

impl LogDir {
    /// The log directory of `rank` (`tag` names the command in the scratch name).
    pub fn for_rank(out: &std::path::Path, rank: usize, tag: &str) -> std::io::Result<Self> {
        if rank == 0 {
            return Ok(LogDir {
                path: out.to_path_buf(),
                scratch: false,
            });
        }
        let path =
            std::env::temp_dir().join(format!("conmim-{tag}-rank{rank}-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(LogDir {
            path,
            scratch: true,
        })
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if self.scratch {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// DDP's default bucket sizes (MiB): the first bucket small, so that communication
/// starts early in the backward pass, the others large.
pub const BUCKET_MB: f64 = 25.0;
pub const FIRST_BUCKET_MB: f64 = 1.0;

/// Gradient averaging overlapped with the backward pass: libtorch's `c10d::Reducer`,
/// the engine under PyTorch's `DistributedDataParallel`. The parameters' gradients are
/// packed into buckets of about [`BUCKET_MB`] (reverse parameter order, then the order
/// in which the first backward produced them); each bucket is all-reduced
/// asynchronously as soon as all its gradients exist, while backward goes on, and when
/// the backward pass ends every `.grad` holds the mean over the ranks.
///
/// Use: [`GradReducer::prepare`] right before each `backward()` whose gradients are to
/// be averaged (a backward without it is local). Every rank must run the same
/// parameters in the same order, and every parameter must get a gradient in every
/// armed backward (DDP's `find_unused_parameters=False` contract; the reducer reports
/// the parameters that did not).
pub struct GradReducer {
    ptr: *mut c_void,
}

// SAFETY: as for ProcessGroup: used from one thread at a time through its owner.
unsafe impl Send for GradReducer {}

impl std::fmt::Debug for GradReducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GradReducer")
    }
}

impl GradReducer {
    /// A reducer over `params` (trainable leaf tensors, all on one device) for `pg`.
    pub fn new(pg: &ProcessGroup, params: &[&Tensor]) -> Result<Self> {
        if params.is_empty() {
            return Err(TchError::Torch(
                "c10d reducer: no parameter to reduce".into(),
            ));
        }
        let ptrs: Vec<*const torch_sys::C_tensor> = params.iter().map(|t| t.as_ptr()).collect();
        let mut ptr = std::ptr::null_mut();
        // SAFETY: live tensors and handle for the call; the shim copies the tensor handles.
        call("reducer", |e, n| unsafe {
            conmim_reducer_new(
                pg.ptr,
                ptrs.as_ptr(),
                ptrs.len(),
                BUCKET_MB,
                FIRST_BUCKET_MB,
                0,
                &mut ptr,
                e,
                n,
            )
        })?;
        Ok(GradReducer { ptr })
    }

    /// Arms the reducer for the next backward pass (rebuilding the buckets in
    /// gradient-ready order once, after the first one: a collective on every rank).
    pub fn prepare(&mut self) -> Result<()> {
        // SAFETY: live handle; no outputs (every parameter is used).
        call("reducer prepare", |e, n| unsafe {
            conmim_reducer_prepare(self.ptr, std::ptr::null(), 0, e, n)
        })
    }
}

impl Drop for GradReducer {
    fn drop(&mut self) {
        let mut err = [0 as c_char; 512];
        // SAFETY: the handle came from conmim_reducer_new and is freed once.
        if unsafe { conmim_reducer_free(self.ptr, err.as_mut_ptr(), err.len()) } != 0 {
            // SAFETY: the shim wrote a NUL-terminated message.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
            eprintln!(
                "conmim: freeing the c10d reducer: {}",
                msg.to_string_lossy()
            );
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from conmim_pg_new and is freed once.
        unsafe { conmim_pg_free(self.ptr) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::testing::free_port;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    fn at(epoch: u64, samples: u64) -> crate::loader::LoaderState {
        crate::loader::LoaderState {
            stream: crate::stream::StreamState {
                version: crate::stream::STATE_VERSION,
                epoch,
                samples,
                events: samples,
                fingerprint: 7,
                done: 1,
                excluded: None,
            },
            next_batch: samples / 2,
            settings: 9,
        }
    }

    /// Issue 6: where each rank's loader resumes. The same world size: its own saved
    /// position, exactly; another one: every saved rank's position, for the stream to
    /// work out what is left of the epoch (`Stream::rejoin`, tested in tests/stream.rs).
    #[test]
    fn issue6_resume_at_follows_the_world_size() {
        assert_eq!(resume_at(&[], None, 0, 1), ResumeAt::Start);
        assert_eq!(resume_at(&[], None, 1, 4), ResumeAt::Start);
        assert_eq!(
            resume_at(&[], Some(at(2, 5)), 0, 1),
            ResumeAt::Exact(at(2, 5))
        );
        let two = [at(3, 4), at(3, 6)];
        assert_eq!(resume_at(&two, None, 1, 2), ResumeAt::Exact(at(3, 6)));
        // A torchrun checkpoint's per-rank positions win over its rank-0 copy.
        assert_eq!(
            resume_at(&two[..1], Some(at(0, 1)), 0, 1),
            ResumeAt::Exact(at(3, 4))
        );
        assert_eq!(
            resume_at(&two, None, 0, 1),
            ResumeAt::OtherWorld(two.to_vec())
        );
        let apart = [at(4, 2), at(3, 6), at(3, 1)];
        for rank in 0..4 {
            assert_eq!(
                resume_at(&apart, None, rank, 4),
                ResumeAt::OtherWorld(apart.to_vec())
            );
        }
        assert_eq!(
            resume_at(&[], Some(at(1, 8)), 1, 2),
            ResumeAt::OtherWorld(vec![at(1, 8)])
        );
    }

    #[test]
    fn other_ranks_log_to_a_scratch_dir_that_is_removed() {
        let out = tempfile::tempdir().unwrap();
        let main = LogDir::for_rank(out.path(), 0, "test").unwrap();
        assert_eq!(main.path(), out.path());
        drop(main);
        assert!(out.path().is_dir(), "rank 0's run directory must stay");
        let other = LogDir::for_rank(out.path(), 1, "test").unwrap();
        let scratch = other.path().to_path_buf();
        assert_ne!(scratch, out.path());
        std::fs::write(scratch.join("metrics.jsonl"), "{}\n").unwrap();
        drop(other);
        assert!(!scratch.exists(), "{} left behind", scratch.display());
    }

    #[test]
    fn env_parsing() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(DistEnv::from_vars(vars(&[])).unwrap(), None);
        let e = DistEnv::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.master_port),
            (3, 4, 1, 29400)
        );
        assert!(e.agent_store && !e.hosts_store());
        assert!(e.wants_group() && !e.torchrun);
        // World size 1: the distributed path under torchrun only (issue 6: NCCL with
        // world size 1 through torchrun), not for a stray WORLD_SIZE=1.
        let lone = DistEnv::from_vars(vars(&[("WORLD_SIZE", "1")]))
            .unwrap()
            .unwrap();
        assert!(!lone.wants_group());
        let one = DistEnv::from_vars(vars(&[("WORLD_SIZE", "1"), ("TORCHELASTIC_RUN_ID", "x")]))
            .unwrap()
            .unwrap();
        assert!(one.torchrun && one.wants_group());
        let bad = DistEnv::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "2")]));
        assert!(bad.unwrap_err().to_string().contains("RANK=2"));
        let bad = DistEnv::from_vars(vars(&[("WORLD_SIZE", "two")]));
        assert!(bad.unwrap_err().to_string().contains("WORLD_SIZE"));
    }

    /// Issue 6: a restarted attempt says so in rank 0's first line.
    #[test]
    fn issue6_restart_note_names_the_attempt() {
        let note = |vars: &[(&str, &str)]| {
            restart_note(|k| {
                vars.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        assert_eq!(note(&[]), None);
        assert_eq!(note(&[("TORCHELASTIC_RESTART_COUNT", "0")]), None);
        assert_eq!(
            note(&[
                ("TORCHELASTIC_RESTART_COUNT", "2"),
                ("TORCHELASTIC_MAX_RESTARTS", "3")
            ])
            .unwrap(),
            "torchrun restart 2 of at most 3 (this node's count)"
        );
        assert_eq!(
            note(&[("TORCHELASTIC_RESTART_COUNT", "1")]).unwrap(),
            "torchrun restart 1 (this node's count)"
        );
        assert_eq!(note(&[("TORCHELASTIC_RESTART_COUNT", "x")]), None);
    }

    /// Issue 6 (multi-node): a group that cannot form says what to check, for the
    /// usual mistakes of a first multi-node launch (libtorch's own messages).
    #[test]
    fn issue6_failed_init_says_what_to_check() {
        let gloo = |m: &str| init_hint(Backend::Gloo, m, None).unwrap_or_default();
        let ifname = init_hint(
            Backend::Gloo,
            "[enforce fail at gloo/transport/tcp/device.cc:84] ifa != nullptr. Unable to find \
             address for: eth9",
            Some("eth9"),
        )
        .unwrap();
        assert!(ifname.starts_with("GLOO_SOCKET_IFNAME=eth9: ") && ifname.contains("ip addr"));
        assert!(
            gloo("Gloo connectFullMesh failed with [..] Connection refused")
                .contains("set GLOO_SOCKET_IFNAME on every node")
        );
        assert!(
            init_hint(Backend::Nccl, "Gloo connectFullMesh failed", None).is_none(),
            "not a Gloo group"
        );
        let store = "The client socket has timed out after 30000ms while trying to connect to \
                     (10.0.0.1, 29500).";
        assert!(gloo(store).contains("check that node 0 is up"));
        assert!(init_hint(Backend::Nccl, store, None).is_some());
        assert!(init_hint(Backend::Gloo, "RANK=2 with WORLD_SIZE=2", None).is_none());
    }

    /// Issue 6 (multi-node): GLOO_SOCKET_IFNAME, torch.distributed's way to pick the
    /// network interface, is honoured (libtorch's own default options read it), and a
    /// wrong one fails at once, naming the variable.
    #[test]
    fn issue6_gloo_socket_ifname_is_honoured() {
        if !AVAILABLE {
            return;
        }
        let one = |ifname: &str| {
            let o = Command::new(std::env::current_exe().unwrap())
                .args(child_args())
                .env("CONMIM_DIST_CHILD", "1")
                .env("GLOO_SOCKET_IFNAME", ifname)
                .env("WORLD_SIZE", "1")
                .env("RANK", "0")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", free_port().to_string())
                .env_remove("TORCHELASTIC_USE_AGENT_STORE")
                .output()
                .unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        let out = one("lo");
        assert!(out.contains("DIST_OK rank 0 of 1"), "{out}");
        let out = one("conmim-noif0");
        assert!(
            out.contains("Unable to find address for: conmim-noif0")
                && out.contains("GLOO_SOCKET_IFNAME=conmim-noif0: no network interface"),
            "{out}"
        );
    }

    /// The body each rank runs (a no-op unless launched by the tests below).
    #[test]
    fn dist_child() {
        if std::env::var_os("CONMIM_DIST_CHILD").is_none() {
            return;
        }
        let env = DistEnv::from_env().unwrap().expect("WORLD_SIZE set");
        let pg = ProcessGroup::new(&env, Backend::Gloo, Duration::from_secs(30)).unwrap();
        let t = Tensor::from_slice(&[env.rank as f32 + 1.0, 10.0]);
        pg.all_reduce_sum(&t).unwrap();
        let got: Vec<f32> = Vec::try_from(&t).unwrap();
        let w = env.world_size as f32;
        assert_eq!(got, [w * (w + 1.0) / 2.0, 10.0 * w]);
        let b = Tensor::from_slice(&[env.rank as f32 * 7.0 + 1.0]);
        pg.broadcast(&b, 0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [1.0]);
        pg.barrier().unwrap();
        println!("DIST_OK rank {} of {}", env.rank, env.world_size);
    }

    /// A data-parallel training child: 3 steps of a micro model on its rank's synthetic
    /// half-batch, then prints a fingerprint of its student and teacher weights.
    /// `CONMIM_DP_SAME=1`: every rank gets the same half (seed 100), else seed 100+rank.
    #[test]
    fn dp_child() {
        if std::env::var_os("CONMIM_DP_CHILD").is_none() {
            return;
        }
        let env = DistEnv::from_env().unwrap().expect("WORLD_SIZE set");
        let same = std::env::var_os("CONMIM_DP_SAME").is_some();
        // The config holds the global batch (2 ranks x 2): the lr scales with it.
        let mut t = dp_trainer(4);
        t.cfg.sync_bn = std::env::var_os("CONMIM_DP_SYNC").is_some();
        let pg = ProcessGroup::new(&env, Backend::Gloo, Duration::from_secs(60)).unwrap();
        t.join(pg).unwrap();
        let b = dp_half(if same { 100 } else { 100 + env.rank as i64 });
        let mut stats = Vec::new();
        for _ in 0..3 {
            let s = t.train_step_device(&b, || Ok(())).unwrap();
            stats.push(format!("{:.9e},{:.9e}", s.loss, s.grad_norm));
        }
        // The checkpointed image count is the run's, not this rank's (3 steps x 2 x 2).
        assert_eq!(t.samples, 12);
        println!("DP rank {} {}", env.rank, fingerprint(&t));
        println!("DPSTATS rank {} {}", env.rank, stats.join(","));
    }

    fn dp_trainer(batch: usize) -> crate::train::trainer::Trainer {
        let mut cfg = crate::train::train_data::micro_config(batch, 10);
        cfg.model.drop_path_rate = 0.0;
        cfg.lr = 1e-2 * 2048.0 / 4.0;
        cfg.warmup_steps = Some(1);
        crate::train::trainer::Trainer::new(cfg, Device::Cpu).unwrap()
    }

    /// A synthetic half-batch of 2 images (micro model: 32 px, 16 patches).
    fn dp_half(seed: i64) -> crate::train::input::DeviceBatch {
        tch::manual_seed(seed);
        crate::train::input::DeviceBatch::synthetic(2, 32, 16, 12, Device::Cpu).unwrap()
    }

    fn fingerprint(t: &crate::train::trainer::Trainer) -> String {
        let sum = |vs: &tch::nn::VarStore| -> Vec<f64> {
            // BatchNorm running statistics are per rank (unbiased with the per-rank
            // count) and unused in training (batch statistics): left out. So is the
            // backbone's final LayerNorm bias: it shifts every row the head's first
            // BatchNorm sees by the same vector, which that BatchNorm subtracts again,
            // so its true gradient is 0, and AdamW (g / (sqrt(v) + eps)) turns the
            // float noise left in it into lr-sized steps of random sign.
            let mut v: Vec<(String, Tensor)> = vs
                .variables()
                .into_iter()
                .filter(|(n, _)| {
                    !n.contains("running_") && !n.contains("num_batches") && n != "norm.bias"
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v.iter()
                .map(|(_, x)| {
                    x.to_kind(tch::Kind::Double)
                        .abs()
                        .sum(tch::Kind::Double)
                        .double_value(&[])
                })
                .collect()
        };
        let s: Vec<String> = sum(&t.student.vs)
            .into_iter()
            .chain(sum(&t.teacher.vs))
            .map(|x| format!("{x:.9e}"))
            .collect();
        s.join(",")
    }

    /// Runs two `dp_child` ranks; per rank: (weight fingerprint, [loss, grad norm] per step).
    fn run_ranks(extra: &[(&str, &str)]) -> Vec<(Vec<f64>, Vec<f64>)> {
        let mut env = vec![("CONMIM_DP_CHILD", "1")];
        env.extend_from_slice(extra);
        let outs = two_ranks("train::dist::tests::dp_child", &env);
        let field = |out: &str, tag: &str| -> Vec<f64> {
            // The harness may print its "test ... " prefix on the same line.
            let line = out
                .lines()
                .find_map(|l| l.split_once(tag).map(|(_, rest)| rest.trim().to_owned()))
                .unwrap_or_else(|| panic!("no `{tag}` line:\n{out}"));
            let first = line.split_whitespace().next().unwrap_or("");
            first.split(',').map(|x| x.parse().unwrap()).collect()
        };
        outs.iter()
            .enumerate()
            .map(|(r, out)| {
                (
                    field(out, &format!("DP rank {r} ")),
                    field(out, &format!("DPSTATS rank {r} ")),
                )
            })
            .collect()
    }

    /// Issue 6: 2 ranks with per-rank batch B/2 train like 1 rank with batch B. With the
    /// same half on both ranks, 1 rank on [half; half] sees the same BatchNorm
    /// statistics, so the weights must agree (this catches a sum instead of a mean, a
    /// missing broadcast, a teacher that drifts); with different halves the ranks must
    /// still hold identical weights (this catches a missing all-reduce).
    #[test]
    fn issue6_two_ranks_train_like_one() {
        if unavailable() {
            return;
        }
        let _rng = crate::train::testing::seeded(1);
        let ranks = run_ranks(&[("CONMIM_DP_SAME", "1")]);
        let (want_w, want) = one_rank_on([100, 100]);
        // Loss and (averaged) gradient norm per step agree with the single process, and
        // so do the weights after the 3 steps (per variable, the sum of absolute values;
        // see `fingerprint` for the one left out).
        for (r, (weights, got)) in ranks.iter().enumerate() {
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1e-3),
                    "rank {r}, step {}, {}: {g} vs single-process {w}",
                    i / 2,
                    ["loss", "grad norm"][i % 2]
                );
            }
            // Measured 1.1e-5.
            let dw = worst(weights, &want_w);
            assert!(dw <= 1e-4, "rank {r}: weights {dw:e} from one process's");
        }
        assert_eq!(ranks[0], ranks[1], "ranks diverged");
        let differ = run_ranks(&[]);
        assert_eq!(
            differ[0].0, differ[1].0,
            "ranks diverged: gradients not all-reduced"
        );
        assert_ne!(
            differ[0].0, ranks[0].0,
            "the two set-ups should train differently"
        );
    }

    /// The single-process reference of 2 ranks on halves `seeds`: 3 steps on their
    /// concatenation; [loss, grad norm] per step.
    fn one_rank_on(seeds: [i64; 2]) -> (Vec<f64>, Vec<f64>) {
        let mut t = dp_trainer(4);
        let (a, b) = (dp_half(seeds[0]), dp_half(seeds[1]));
        let cat = |x: &Tensor, y: &Tensor| Tensor::cat(&[x, y], 0);
        let full = crate::train::input::DeviceBatch {
            weak: cat(&a.weak, &b.weak),
            strong: cat(&a.strong, &b.strong),
            mask: cat(&a.mask, &b.mask),
            state: None,
        };
        let mut want = Vec::new();
        for _ in 0..3 {
            let s = t.train_step_device(&full, || Ok(())).unwrap();
            want.extend([s.loss, s.grad_norm]);
        }
        let weights = fingerprint(&t)
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect();
        (weights, want)
    }

    /// The largest relative difference of `got` from `want`.
    fn worst(got: &[f64], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1e-3))
            .fold(0.0, f64::max)
    }

    /// SyncBN on a group of one is BatchNorm: the head's output, the gradients of its
    /// input and of every weight, and the running statistics agree.
    #[test]
    fn sync_batch_norm_on_one_rank_is_batch_norm() {
        if unavailable() {
            return;
        }
        let (device, pg) = one_rank_group();
        let _rng = crate::train::testing::seeded(5);
        let cfg = crate::train::head::HeadConfig {
            hidden_dim: 16,
            out_dim: 6,
            ..crate::train::head::HeadConfig::conmim(8)
        };
        let nets: Vec<_> = (0..2)
            .map(|_| {
                let vs = tch::nn::VarStore::new(device);
                let head = crate::train::head::ProjectionHead::new(&cfg, vs.root() / "p").unwrap();
                (vs, head)
            })
            .collect();
        tch::no_grad(|| {
            // BatchNorm's affine weights off their (1, 0) init, then the same in both.
            for (name, mut t) in nets[0].0.variables() {
                if t.dim() == 1 && !name.contains("running_") {
                    t.copy_(&Tensor::randn_like(&t));
                }
            }
            // One constant channel into the first BatchNorm (a zero row of the first
            // Linear): its variance is 0, which must stay finite (BatchNorm's output
            // there is its bias, its running variance decays towards 0).
            let mut first: Vec<(String, Tensor)> = nets[0]
                .0
                .variables()
                .into_iter()
                .filter(|(n, t)| t.dim() == 2 && n.ends_with("weight"))
                .collect();
            first.sort_by(|a, b| a.0.cmp(&b.0));
            let _ = first[0].1.get(0).fill_(0.0);
            let src = nets[0].0.variables();
            for (name, mut t) in nets[1].0.variables() {
                t.copy_(&src[&name]);
            }
        });
        let x = Tensor::randn([3, 5, 8], (tch::Kind::Float, device));
        let w = Tensor::randn([3, 5, 6], (tch::Kind::Float, device));
        let mut outs = Vec::new();
        for (i, (vs, head)) in nets.iter().enumerate() {
            let xi = x.copy().set_requires_grad(true);
            let y = if i == 0 {
                head.forward_t(&xi, true).unwrap()
            } else {
                head.forward_sync(&xi, true, Some(&pg)).unwrap()
            };
            (&y * &w).sum(tch::Kind::Float).backward();
            let mut named: Vec<(String, Tensor)> = vs
                .variables()
                .into_iter()
                .map(|(n, t)| {
                    let g = t.grad();
                    (
                        n,
                        if g.defined() {
                            Tensor::cat(&[t.flatten(0, -1), g.flatten(0, -1)], 0)
                        } else {
                            t.flatten(0, -1)
                        },
                    )
                })
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            named.push(("output".into(), y.detach().flatten(0, -1)));
            named.push(("input grad".into(), xi.grad().flatten(0, -1)));
            outs.push(named);
        }
        assert_eq!(outs[0].len(), outs[1].len());
        for ((name, a), (_, b)) in outs[0].iter().zip(&outs[1]) {
            let d = (a - b).abs().max().double_value(&[]);
            let scale = a.abs().max().double_value(&[]).max(1e-3);
            assert!(d <= 1e-5 * scale, "{name}: differs by {d} (scale {scale})");
        }
        // Eval mode normalises with the running statistics, synchronised or not.
        let (a, b) = (&nets[0].1, &nets[1].1);
        let ya = a.forward_t(&x, false).unwrap();
        let yb = b.forward_sync(&x, false, Some(&pg)).unwrap();
        assert!(ya.allclose(&yb, 1e-5, 1e-6, false));
    }

    /// SyncBN takes a bf16 input with fp32 weights, as BatchNorm does under autocast:
    /// output in bf16, gradients of the input (bf16), weight and bias (fp32) as
    /// BatchNorm's, within bf16's precision.
    #[test]
    fn sync_batch_norm_takes_bf16_like_batch_norm() {
        if unavailable() {
            return;
        }
        let (device, pg) = one_rank_group();
        let _rng = crate::train::testing::seeded(6);
        let opts = (tch::Kind::Float, device);
        let x = (Tensor::randn([40, 6], opts) * 3.0 + 1.0).to_kind(tch::Kind::BFloat16);
        let (w, b) = (Tensor::randn([6], opts), Tensor::randn([6], opts));
        let dy = Tensor::randn([40, 6], opts);
        let run = |sync: bool| -> Vec<Tensor> {
            let xi = x.copy().set_requires_grad(true);
            let (wi, bi) = (
                w.copy().set_requires_grad(true),
                b.copy().set_requires_grad(true),
            );
            let (rm, rv) = (Tensor::zeros([6], opts), Tensor::ones([6], opts));
            let y = if sync {
                pg.sync_batch_norm(&xi, Some((&wi, &bi)), Some((&rm, &rv)), 0.1, 1e-5)
                    .unwrap()
            } else {
                Tensor::batch_norm(
                    &xi,
                    Some(&wi),
                    Some(&bi),
                    Some(&rm),
                    Some(&rv),
                    true,
                    0.1,
                    1e-5,
                    false,
                )
            };
            assert_eq!(y.kind(), tch::Kind::BFloat16);
            (y.to_kind(tch::Kind::Float) * &dy)
                .sum(tch::Kind::Float)
                .backward();
            assert_eq!(xi.grad().kind(), tch::Kind::BFloat16);
            [y.detach(), xi.grad(), wi.grad(), bi.grad(), rm, rv]
                .iter()
                .map(|t| t.to_kind(tch::Kind::Float))
                .collect()
        };
        let (want, got) = (run(false), run(true));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = (g - w).abs().max().double_value(&[]);
            let scale = w.abs().max().double_value(&[]).max(1e-3);
            let what = [
                "output",
                "input grad",
                "weight grad",
                "bias grad",
                "running mean",
                "running var",
            ][i];
            // The input gradient is rounded to bf16 from fp32 here, in bf16 steps there;
            // the rest must agree to float precision (bf16 statistics would be ~2e-3 off).
            let tol = if i == 1 { 1e-2 } else { 1e-4 };
            assert!(d <= tol * scale, "{what}: differs by {d} (scale {scale})");
        }
    }

    /// A group of one on the GPU when there is one (NCCL; the GPU machine runs these
    /// tests from a release test binary, see tools/bench/gpu_next.sh), else on the CPU
    /// (Gloo).
    fn one_rank_group() -> (Device, ProcessGroup) {
        let device = Device::cuda_if_available();
        eprintln!("SyncBN check on {device:?}");
        let pg = ProcessGroup::new(
            &one_rank_env(),
            Backend::for_device(device),
            Duration::from_secs(30),
        )
        .unwrap();
        (device, pg)
    }

    fn one_rank_env() -> DistEnv {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: free_port(),
            agent_store: false,
            torchrun: false,
        }
    }

    /// A rank's GPU is its LOCAL_RANK, but the only one where each process sees one GPU.
    #[test]
    fn issue6_rank_gpu_is_local_rank_or_the_only_visible_one() {
        let e = DistEnv {
            local_rank: 3,
            ..one_rank_env()
        };
        assert_eq!(e.gpu_index(8), 3);
        assert_eq!(e.gpu_index(1), 0);
        assert_eq!(one_rank_env().gpu_index(2), 0);
    }

    /// Issue 6 with SyncBN (`sync_bn`): 2 ranks on *different* halves A and B train like
    /// 1 rank on [A; B], BatchNorm heads included (loss and gradient norm per step, and
    /// the weights after 3 steps); with per-rank statistics (the default, as the official
    /// code) they cannot, and the checks below see it.
    #[test]
    fn issue6_sync_bn_two_ranks_on_different_halves_train_like_one() {
        if unavailable() {
            return;
        }
        let _rng = crate::train::testing::seeded(1);
        let (want_w, want) = one_rank_on([100, 101]);
        let synced = run_ranks(&[("CONMIM_DP_SYNC", "1")]);
        // Step 0 (the same weights on both sides) checks SyncBN's forward and backward
        // pass; later steps drift by float noise, which AdamW's first steps (updates of
        // about lr * sign(g)) amplify, hence the looser bound on them.
        for (r, (_, got)) in synced.iter().enumerate() {
            let (first, all) = (worst(&got[..2], &want[..2]), worst(got, &want));
            assert!(
                first <= 1e-5 && all <= 1e-3,
                "rank {r} with SyncBN: [loss, grad norm] per step {got:?}, one process \
                 {want:?} (relative difference {first:e} at step 0, {all:e} in all)"
            );
        }
        assert_eq!(synced[0], synced[1], "ranks diverged");
        // And the weights after the 3 steps (student and teacher; per variable, the sum
        // of absolute values): measured 1.7e-4 apart at most.
        let dw = worst(&synced[0].0, &want_w);
        assert!(
            dw <= 1e-3,
            "weights after 3 steps with SyncBN differ from one process's by {dw:e}"
        );
        let per_rank = run_ranks(&[]);
        let d = worst(&per_rank[0].1[..2], &want[..2]);
        assert!(
            d > 1e-3,
            "per-rank BatchNorm should not match one process on [A; B] at step 0 \
             (difference {d:e}): {:?} vs {want:?}",
            per_rank[0].1
        );
        let dw = worst(&per_rank[0].0, &want_w);
        assert!(dw > 1e-2, "per-rank BatchNorm: weights only {dw:e} apart");
    }

    /// Rank 1 dies right after joining; rank 0's next collective must fail with an
    /// error (not hang). Runs only as a child of `issue6_a_dead_rank_fails_the_others`.
    #[test]
    fn die_child() {
        if std::env::var_os("CONMIM_DIE_CHILD").is_none() {
            return;
        }
        let env = DistEnv::from_env().unwrap().expect("WORLD_SIZE set");
        let pg = ProcessGroup::new(&env, Backend::Gloo, Duration::from_secs(10)).unwrap();
        pg.barrier().unwrap();
        if env.rank == 1 {
            std::process::exit(3);
        }
        let t0 = Instant::now();
        let t = Tensor::from_slice(&[1.0f32]);
        let mut result = Ok(());
        for _ in 0..50 {
            result = pg.all_reduce_sum(&t);
            if result.is_err() {
                break;
            }
        }
        let e = result.expect_err("all-reduce with a dead peer must fail");
        println!("DIED_OK after {:.1} s: {e}", t0.elapsed().as_secs_f64());
    }

    /// Issue 6: a rank that dies makes the others fail with a clear error within the
    /// timeout instead of hanging.
    #[test]
    fn issue6_a_dead_rank_fails_the_others() {
        if unavailable() {
            return;
        }
        let t0 = Instant::now();
        let outs = two_ranks(
            "train::dist::tests::die_child",
            &[("CONMIM_DIE_CHILD", "1")],
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "took {:?}",
            t0.elapsed()
        );
        assert!(outs[0].contains("DIED_OK"), "rank 0:\n{}", outs[0]);
        assert!(
            outs[0].contains("c10d all_reduce"),
            "the error names the collective:\n{}",
            outs[0]
        );
    }

    /// Rank 1 joins, then hangs (sleeps, alive, never entering the collective); rank 0's
    /// all-reduce must fail once the group's timeout (2 s here) passes. Runs only as a
    /// child of `issue6_a_hung_rank_times_out_the_others`.
    #[test]
    fn hang_child() {
        if std::env::var_os("CONMIM_HANG_CHILD").is_none() {
            return;
        }
        let env = DistEnv::from_env().unwrap().expect("WORLD_SIZE set");
        let pg = ProcessGroup::new(&env, Backend::Gloo, Duration::from_secs(2)).unwrap();
        pg.barrier().unwrap();
        if env.rank == 1 {
            std::thread::sleep(Duration::from_secs(8));
            return;
        }
        let t0 = Instant::now();
        let e = pg
            .all_reduce_sum(&Tensor::from_slice(&[1.0f32]))
            .expect_err("all-reduce with a hung peer must time out");
        println!("HUNG_OK after {:.1} s: {e}", t0.elapsed().as_secs_f64());
    }

    /// Issue 6: a rank that hangs (alive, but never reaching the collective) makes the
    /// others fail with an error after the configured timeout, not wait forever.
    #[test]
    fn issue6_a_hung_rank_times_out_the_others() {
        if unavailable() {
            return;
        }
        let outs = two_ranks(
            "train::dist::tests::hang_child",
            &[("CONMIM_HANG_CHILD", "1")],
        );
        let line = outs[0]
            .lines()
            .find(|l| l.contains("HUNG_OK"))
            .unwrap_or_else(|| panic!("rank 0:\n{}", outs[0]));
        let secs: f64 = line[line.find("HUNG_OK").unwrap()..]
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            (1.5..7.0).contains(&secs),
            "timed out after {secs} s, set 2 s: {line}"
        );
    }

    /// Rank 0 is past an epoch resumed across world sizes, rank 1 still in it (so only
    /// rank 1 holds its left-out shards); every rank gathers both positions. Runs only
    /// as a child of `issue6_loader_positions_gather_with_their_left_out_shards`.
    #[test]
    fn gather_child() {
        if std::env::var_os("CONMIM_GATHER_CHILD").is_none() {
            return;
        }
        let env = DistEnv::from_env().unwrap().expect("WORLD_SIZE set");
        let pg = ProcessGroup::new(&env, Backend::Gloo, Duration::from_secs(20)).unwrap();
        let mut own = at(3 + (env.rank == 0) as u64, 10 + env.rank as u64);
        own.stream.done = 4 + env.rank as u64;
        if env.rank == 1 {
            own.stream.excluded = Some(vec![2usize, 5, 11].into());
        }
        let all = pg.gather_loader_states(&own).unwrap();
        let mut want = [at(4, 10), at(3, 11)];
        want[0].stream.done = 4;
        want[1].stream.done = 5;
        want[1].stream.excluded = Some(vec![2usize, 5, 11].into());
        assert_eq!(all, want);
        println!("GATHER_OK rank {}", env.rank);
    }

    /// Issue 6: the loader positions a checkpoint of a multi-rank run holds carry what
    /// `Stream::rejoin` needs: each rank's read-through shard count, and the shards an
    /// epoch resumed across world sizes leaves out (held by the ranks still in it).
    #[test]
    fn issue6_loader_positions_gather_with_their_left_out_shards() {
        if unavailable() {
            return;
        }
        let outs = two_ranks(
            "train::dist::tests::gather_child",
            &[("CONMIM_GATHER_CHILD", "1")],
        );
        for (r, o) in outs.iter().enumerate() {
            assert!(o.contains(&format!("GATHER_OK rank {r}")), "rank {r}:\n{o}");
        }
    }

    /// Runs test `child` of this test binary as ranks 0 and 1 on loopback (rank 0 hosts
    /// the store; no torchrun) with `env` added; returns each rank's stdout + stderr.
    fn two_ranks(child: &str, env: &[(&str, &str)]) -> Vec<String> {
        let exe = std::env::current_exe().unwrap();
        let port = free_port().to_string();
        let children: Vec<_> = (0..2)
            .map(|r| {
                let mut c = Command::new(&exe);
                c.args([child, "--exact", "--nocapture", "--test-threads=1"])
                    .envs(env.iter().copied())
                    .env("WORLD_SIZE", "2")
                    .env("RANK", r.to_string())
                    .env("LOCAL_RANK", r.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", &port)
                    .env_remove("TORCHELASTIC_USE_AGENT_STORE")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                c.spawn().unwrap()
            })
            .collect();
        wait_all(children)
    }

    /// The NCCL backend on a machine without CUDA (CI, this VM) is a clear error that
    /// names the backend, never a crash or a hang: the shim's ProcessGroupNCCL (built
    /// when the CUDA and NCCL headers are there) refuses without a GPU, and a build
    /// without NCCL says so. With CUDA, world size 1 must simply work, host tensors too.
    #[test]
    fn nccl_world_one_works_with_cuda_and_is_a_clear_error_without() {
        let env = DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: free_port(),
            agent_store: false,
            torchrun: false,
        };
        let r = ProcessGroup::new(&env, Backend::Nccl, Duration::from_secs(10));
        if let Err(e) = &r
            && e.to_string().contains("no NCCL backend")
        {
            return; // built without the CUDA/NCCL headers: said plainly, nothing to run
        }
        if tch::Cuda::is_available() {
            let pg = r.unwrap().on_device(Device::Cuda(0));
            let t = Tensor::from_slice(&[2.0f32]).to_device(Device::Cuda(0));
            pg.all_reduce_sum(&t).unwrap();
            let got = Vec::<f32>::try_from(&t.to_device(Device::Cpu)).unwrap();
            assert_eq!(got, [2.0]);
            // Host tensors (the trainer's metrics, loader positions, evaluation counts,
            // the replica check) go through the GPU: NCCL alone would refuse them.
            let mut m = Tensor::from_slice(&[1.5f64, 3.0]);
            pg.all_reduce_mean(&mut m).unwrap();
            assert_eq!(Vec::<f64>::try_from(&m).unwrap(), [1.5, 3.0]);
            assert_eq!(m.device(), Device::Cpu);
            let b = Tensor::from_slice(&[7i64, -3]);
            pg.broadcast(&b, 0).unwrap();
            assert_eq!(Vec::<i64>::try_from(&b).unwrap(), [7, -3]);
            let w = Tensor::from_slice(&[0.25f32, -1.0]).to_device(Device::Cuda(0));
            pg.check_replicas_agree(&[&w], "weights").unwrap();
            return;
        }
        let msg = r.err().expect("NCCL without a GPU must fail").to_string();
        let low = msg.to_lowercase();
        assert!(
            low.contains("nccl") && (low.contains("gpu") || low.contains("cuda")),
            "{msg}"
        );
        assert!(
            !msg.contains("frame #"),
            "no C++ backtrace in the message: {msg}"
        );
        assert_eq!(msg.matches("Internal torch error").count(), 1, "{msg}");
    }

    fn child_args() -> [&'static str; 4] {
        [
            "train::dist::tests::dist_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ]
    }

    fn wait_all(children: Vec<std::process::Child>) -> Vec<String> {
        let t0 = Instant::now();
        children
            .into_iter()
            .map(|mut c| {
                loop {
                    if c.try_wait().unwrap().is_some() {
                        break;
                    }
                    if t0.elapsed() > Duration::from_secs(120) {
                        let _ = c.kill();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let o = c.wait_with_output().unwrap();
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .collect()
    }

    fn unavailable() -> bool {
        if !AVAILABLE {
            eprintln!(
                "NOTICE: built without gloo headers (libgloo-dev): distributed tests skipped"
            );
        }
        !AVAILABLE
    }

    /// Two processes on loopback, rank 0 hosting the store (no torchrun).
    #[test]
    fn gloo_collectives_across_two_processes() {
        if unavailable() {
            return;
        }
        let outs = two_ranks(
            "train::dist::tests::dist_child",
            &[("CONMIM_DIST_CHILD", "1")],
        );
        for (r, out) in outs.iter().enumerate() {
            assert!(
                out.contains(&format!("DIST_OK rank {r} of 2")),
                "rank {r}:\n{out}"
            );
        }
    }

    /// The same, launched the way users launch: torchrun from the pip torch install
    /// (its elastic agent hosts the store).
    #[test]
    fn gloo_collectives_under_torchrun() {
        if unavailable() {
            return;
        }
        let Ok(venv) = std::env::var("CONMIM_VENV") else {
            panic!("CONMIM_VENV is unset: source tools/env.sh (torchrun comes from its torch)");
        };
        let torchrun = std::path::Path::new(&venv).join("bin/torchrun");
        assert!(torchrun.exists(), "{} not found", torchrun.display());
        let exe = std::env::current_exe().unwrap();
        let port = free_port().to_string();
        let child = Command::new(&torchrun)
            .args(["--no-python", "--nnodes", "1", "--nproc-per-node", "2"])
            .args(["--master-addr", "127.0.0.1", "--master-port", &port])
            .arg(&exe)
            .args(child_args())
            .env("CONMIM_DIST_CHILD", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_all(vec![child]).remove(0);
        for r in 0..2 {
            assert!(
                out.contains(&format!("DIST_OK rank {r} of 2")),
                "rank {r}:\n{out}"
            );
        }
    }
}
