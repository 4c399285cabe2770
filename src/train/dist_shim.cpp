// conmim's c10d shim: libtorch's own distributed backends (TCPStore, ProcessGroupGloo,
// ProcessGroupNCCL when built with it) behind a handful of C functions, so the Rust
// trainer runs data-parallel on the same engine as torch.distributed, launched by
// torchrun. Compiled by build.rs (feature `train`) with -DUSE_C10D_GLOO against the
// pip torch headers plus Debian's libgloo-dev (pip torch ships no gloo headers).
// Every function catches C++ exceptions and returns non-zero with the message in `err`.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef CONMIM_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "shim_util.h"

namespace {
struct Group {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::Backend> backend;
    std::chrono::milliseconds timeout;
    // The backend wrapped as torch.distributed wraps it (what c10d::Reducer takes).
    c10::intrusive_ptr<c10d::ProcessGroup> pg;
};

c10::intrusive_ptr<c10d::ProcessGroup> wrap(const c10::intrusive_ptr<c10d::Store>& store,
                                            int rank, int world,
                                            const c10::intrusive_ptr<c10d::Backend>& backend,
                                            c10d::ProcessGroup::BackendType type) {
    // As torch.distributed's _new_process_group_helper: one ProcessGroup, the backend as
    // its default and registered for the devices it serves (gloo: CPU and CUDA tensors).
    auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, rank, world);
    pg->setDefaultBackend(type);
    if (type == c10d::ProcessGroup::BackendType::GLOO) {
        pg->setBackend(c10::DeviceType::CPU, type, backend);
    }
    pg->setBackend(c10::DeviceType::CUDA, type, backend);
    return pg;
}

void wait(const c10::intrusive_ptr<c10d::Work>& work, const Group& g) {
    work->wait(g.timeout);
}
}  // namespace

extern "C" {

// Joins (or hosts) the TCPStore at host:port and creates the process group.
// `host_store`: this process runs the store server (rank 0 without torchrun's agent
// store); otherwise it connects as a client. `backend`: "gloo" or "nccl".
int conmim_pg_new(const char* backend, const char* host, int port, int rank, int world,
                  int host_store, double timeout_s, void** out, char* err, size_t err_len) {
    CONMIM_TRY
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000.0));
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = host_store != 0;
    so.numWorkers = std::nullopt;
    so.waitWorkers = false;
    so.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    auto store = c10::make_intrusive<c10d::PrefixStore>("conmim/default_pg", tcp);
    auto g = new Group{store, {}, timeout, {}};
    const std::string b(backend);
    if (b == "gloo") {
        auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
        g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
        g->pg = wrap(store, rank, world, g->backend, c10d::ProcessGroup::BackendType::GLOO);
    } else if (b == "nccl") {
#ifdef CONMIM_NCCL
        auto opts = c10d::ProcessGroupNCCL::Options::create();
        opts->timeout = timeout;
        g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
        g->pg = wrap(store, rank, world, g->backend, c10d::ProcessGroup::BackendType::NCCL);
#else
        delete g;
        throw std::runtime_error("this build has no NCCL backend (built without NCCL headers)");
#endif
    } else {
        delete g;
        throw std::runtime_error("unknown backend " + b + " (gloo or nccl)");
    }
    *out = g;
    CONMIM_CATCH
}

void conmim_pg_free(void* pg) { delete static_cast<Group*>(pg); }

// Sums `t` over all ranks, in place.
int conmim_pg_allreduce_sum(void* pg, const at::Tensor* t, char* err, size_t err_len) {
    CONMIM_TRY
    auto& g = *static_cast<Group*>(pg);
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = g.timeout;
    wait(g.backend->allreduce(ts, o), g);
    CONMIM_CATCH
}

// Copies `t` of rank `root` to every rank, in place.
int conmim_pg_broadcast(void* pg, const at::Tensor* t, int root, char* err, size_t err_len) {
    CONMIM_TRY
    auto& g = *static_cast<Group*>(pg);
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g.timeout;
    wait(g.backend->broadcast(ts, o), g);
    CONMIM_CATCH
}

// Waits until every rank gets here.
int conmim_pg_barrier(void* pg, char* err, size_t err_len) {
    CONMIM_TRY
    auto& g = *static_cast<Group*>(pg);
    c10d::BarrierOptions o;
    o.timeout = g.timeout;
    wait(g.backend->barrier(o), g);
    CONMIM_CATCH
}

// PyTorch DDP's gradient reducer (c10d::Reducer, the C++ half of
// torch.nn.parallel.DistributedDataParallel) over `n` parameters: gradients go into
// buckets of about `bucket_mb` MiB (the first one `first_bucket_mb`, as DDP's defaults
// 1 and 25), assigned in reverse parameter order as DDP does, and each bucket is
// all-reduced asynchronously as soon as its gradients are ready, during the backward
// pass; at its end the averaged (sum / world) gradients are copied back into `.grad`.
int conmim_reducer_new(void* pg, const at::Tensor* const* params, size_t n, double bucket_mb,
                       double first_bucket_mb, int find_unused, void** out, char* err,
                       size_t err_len) {
    CONMIM_TRY
    auto& g = *static_cast<Group*>(pg);
    if (!g.pg) throw std::runtime_error("the process group has no ProcessGroup wrapper");
    std::vector<at::Tensor> ps;
    ps.reserve(n);
    for (size_t i = 0; i < n; ++i) ps.push_back(*params[i]);
    const auto cap = static_cast<int64_t>(bucket_mb * 1024.0 * 1024.0);
    const auto first = static_cast<int64_t>(first_bucket_mb * 1024.0 * 1024.0);
    std::vector<bool> sparse(n, false);
    auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(
        ps, {static_cast<size_t>(first), static_cast<size_t>(cap)}, sparse);
    std::reverse(buckets.begin(), buckets.end());
    std::vector<int64_t> caps(limits.rbegin(), limits.rend());
    auto r = new c10d::Reducer(ps, buckets, g.pg, sparse, cap, find_unused != 0,
                               /*gradient_as_bucket_view=*/false, {}, first,
                               /*skip_all_reduce_unused_params=*/false,
                               /*use_python_reducer=*/false, caps);
    *out = r;
    CONMIM_CATCH
}

// Arms the reducer for the next backward pass (DDP's forward does this): rebuilds the
// buckets in gradient-ready order after the first iteration (a collective), then
// prepare_for_backward (with find_unused, `outputs` are searched for unused parameters).
int conmim_reducer_prepare(void* r, const at::Tensor* const* outputs, size_t n, char* err,
                           size_t err_len) {
    CONMIM_TRY
    auto& red = *static_cast<c10d::Reducer*>(r);
    red.rebuild_buckets();
    std::vector<at::Tensor> outs;
    for (size_t i = 0; i < n; ++i) outs.push_back(*outputs[i]);
    red.prepare_for_backward(outs);
    CONMIM_CATCH
}

int conmim_reducer_free(void* r, char* err, size_t err_len) {
    CONMIM_TRY
    delete static_cast<c10d::Reducer*>(r);
    CONMIM_CATCH
}

}  // extern "C"
