// conmim's c10d shim: libtorch's own distributed backends (TCPStore, ProcessGroupGloo,
// ProcessGroupNCCL when built with it) behind a handful of C functions, so the Rust
// trainer runs data-parallel on the same engine as torch.distributed, launched by
// torchrun. Compiled by build.rs (feature `train`) with -DUSE_C10D_GLOO against the
// pip torch headers plus Debian's libgloo-dev (pip torch ships no gloo headers).
// Every function catches C++ exceptions and returns non-zero with the message in `err`.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef CONMIM_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <string>
#include <vector>

#include "shim_util.h"

namespace {
struct Group {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::Backend> backend;
    std::chrono::milliseconds timeout;
};

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
    auto g = new Group{store, {}, timeout};
    const std::string b(backend);
    if (b == "gloo") {
        auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
        g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    } else if (b == "nccl") {
#ifdef CONMIM_NCCL
        auto opts = c10d::ProcessGroupNCCL::Options::create();
        opts->timeout = timeout;
        g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
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

}  // extern "C"
