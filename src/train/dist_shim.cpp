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
#include <torch/csrc/autograd/custom_function.h>
#ifdef CONMIM_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "shim_util.h"

namespace {
struct Group {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::Backend> backend;
    std::chrono::milliseconds timeout;
    // The backend wrapped as torch.distributed wraps it (what c10d::Reducer takes).
    c10::intrusive_ptr<c10d::ProcessGroup> pg;
    // NCCL: collectives run on the GPU, ordered with the current stream; waiting on the
    // CPU is left to whoever reads the result (see `wait`).
    bool on_gpu = false;
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

// Gloo: blocks until the collective is done, at most the group's timeout. NCCL: makes
// the current CUDA stream wait for it and returns at once, as torch.distributed's
// default `work.wait()` (a timeout here would make WorkNCCL block the CPU in 1 ms
// sleeps, stalling the queue of kernels behind it, e.g. inside SyncBN's forward); a
// collective that hangs past the group's timeout is caught by ProcessGroupNCCL's
// watchdog (Options::timeout), which aborts the process with a message naming it.
void wait(const c10::intrusive_ptr<c10d::Work>& work, const Group& g) {
    if (g.on_gpu) {
        work->wait();
    } else {
        work->wait(g.timeout);
    }
}

// Sums `t` over the group's ranks, in place, waiting at most the group's timeout.
void allreduce_sum(const Group& g, const at::Tensor& t) {
    std::vector<at::Tensor> ts{t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = g.timeout;
    wait(g.backend->allreduce(ts, o), g);
}

// The mean and biased variance (fp64, [C]) of the rows of `x` ([R, C]) of every rank
// together, and their count (a 0-dim fp64 tensor, on the device: no host sync). This
// rank's statistics come from one training-mode BatchNorm (libtorch's own kernel, on
// every device; eps 0, so that var = invstd^-2 as computed); one all-reduce gathers
// them (each rank fills its row of a [world, 2C+1] buffer of zeros), and they combine
// as in Chan et al.: the global mean, and the variance as the mean of the ranks'
// variances plus that of their means' deviations from it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> global_stats(const Group& g,
                                                            const at::Tensor& x) {
    const int64_t c = x.size(1);
    // An fp32 affine identity makes the statistics fp32 for a bf16 x (as under autocast;
    // without weights the CPU kernel would return them in bf16).
    const auto fopts = x.options().dtype(at::kFloat);
    auto local = at::native_batch_norm(x, at::ones({c}, fopts), at::zeros({c}, fopts), {}, {},
                                       /*training=*/true, 0.0, 0.0);
    const auto& mean_r = std::get<1>(local);
    const auto& invstd_r = std::get<2>(local);
    auto all = at::zeros({g.backend->getSize(), 2 * c + 1}, mean_r.options().dtype(at::kDouble));
    auto row = all[g.backend->getRank()];
    row.narrow(0, 0, c).copy_(mean_r);
    // invstd is 0 for a constant channel (libtorch's InvStd with var = eps = 0): var 0.
    const auto inv = invstd_r.to(at::kDouble);
    row.narrow(0, c, c).copy_(at::where(inv == 0, at::zeros_like(inv), inv.pow(-2)));
    row.narrow(0, 2 * c, 1).fill_(static_cast<double>(x.size(0)));
    allreduce_sum(g, all);
    const auto n = all.narrow(1, 2 * c, 1);  // [world, 1]
    const auto count = n.sum();
    const auto means = all.narrow(1, 0, c);
    const auto mean = (means * n).sum(0) / count;
    const auto var = ((all.narrow(1, c, c) + (means - mean).square()) * n).sum(0) / count;
    return {mean, var, count};
}

// SyncBN's differentiable part (as torch.nn.SyncBatchNorm): an eval-mode BatchNorm of
// `x` with the global statistics (affine included), whose backward pass also goes
// through those statistics. Backward: an eval-mode BatchNorm backward (dy * w * invstd,
// and this rank's sums of dy and dy * xhat), one all-reduce of those sums, and the
// correction for the statistics' dependence on x:
//   dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)),
// the means over all rows of all ranks. Each rank's dy comes from its own loss, so dx is
// the gradient of the sum of the ranks' losses (DDP's average then makes it that of
// their mean); the weight and bias gradients are this rank's own sums, which DDP
// averages like any other gradient.
struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
    static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                              const at::Tensor& weight, const at::Tensor& bias,
                              const at::Tensor& mean, const at::Tensor& var,
                              const at::Tensor& count, int64_t group, double eps) {
        ctx->save_for_backward({x, weight, mean, var, count});
        ctx->saved_data["group"] = group;
        ctx->saved_data["eps"] = eps;
        return std::get<0>(
            at::native_batch_norm(x, weight, bias, mean, var, /*training=*/false, 0.0, eps));
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const auto &x = saved[0], &weight = saved[1], &mean = saved[2], &var = saved[3],
                   &count = saved[4];
        const auto& g = *reinterpret_cast<const Group*>(ctx->saved_data["group"].toInt());
        const double eps = ctx->saved_data["eps"].toDouble();
        const int64_t c = x.size(1);
        auto local = at::native_batch_norm_backward(grads[0], x, weight, mean, var, {}, {},
                                                    /*train=*/false, eps, {true, true, true});
        const auto& dx_eval = std::get<0>(local);  // dy * w * invstd
        const auto& dw = std::get<1>(local);       // this rank's sum of dy * xhat
        const auto& db = std::get<2>(local);       // this rank's sum of dy
        auto sums = at::cat({db, dw}).to(at::kDouble);
        allreduce_sum(g, sums);
        const auto invstd = (var.to(at::kDouble) + eps).rsqrt();
        const auto k = weight.to(at::kDouble) * invstd;
        // dx = dx_eval + x * b + a, per channel: b = -k * invstd * mean(dy * xhat),
        // a = -k * mean(dy) - b * mean.
        const auto b = -k * invstd * sums.narrow(0, c, c) / count;
        const auto a = -k * sums.narrow(0, 0, c) / count - b * mean.to(at::kDouble);
        auto dx = at::addcmul(a.to(at::kFloat), x, b.to(at::kFloat));
        dx.add_(dx_eval);
        return {dx.to(x.scalar_type()),
                ctx->needs_input_grad(1) ? dw : at::Tensor(),
                ctx->needs_input_grad(2) ? db : at::Tensor(),
                at::Tensor(),
                at::Tensor(),
                at::Tensor(),
                at::Tensor(),
                at::Tensor()};
    }
};
// A name for this attempt of the job that every rank agrees on and no earlier attempt
// used. torchrun's agent store outlives the workers: after a restart
// (`--max-restarts`, a node rejoining) it still holds the keys the dead attempt's
// groups wrote, and a new rank that read, say, a dead rank 0's Gloo address instead of
// the new one's would fail ("connectFullMesh ... Connection refused"; an NCCL unique id
// likewise). torch.distributed's fixed key names have that race; so does a restart
// count, which each agent keeps for itself. So rank 0 draws a random token and hands it
// to each rank in answer to that rank's own fresh random nonce, which no earlier
// attempt can have answered; each rank acknowledges under the token, and rank 0 waits
// for every acknowledgement. Stale hellos get answers nobody reads (a few bytes each).
std::string attempt_token(c10d::Store& store, int rank, int world,
                          std::chrono::milliseconds timeout) {
    std::random_device rd;
    auto draw = [&rd] {
        const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
        char buf[17];
        snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
        return std::string(buf);
    };
    const std::string hello = "conmim/attempt/hello/", welcome = "conmim/attempt/welcome/",
                      ack = "conmim/attempt/ack/";
    if (world == 1) return draw();
    if (rank != 0) {
        const auto nonce = draw();
        store.set(hello + std::to_string(rank), nonce);
        const auto token = store.get_to_str(welcome + nonce);  // waits, at most the timeout
        store.deleteKey(welcome + nonce);
        store.set(ack + token + "/" + std::to_string(rank), std::string("1"));
        return token;
    }
    const auto token = draw();
    std::vector<std::string> answered(world);
    std::vector<int> pending;
    for (int r = 1; r < world; ++r) pending.push_back(r);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!pending.empty()) {
        std::vector<int> still;
        for (const int r : pending) {
            const auto h = hello + std::to_string(r);
            if (store.check({h})) {
                const auto nonce = store.get_to_str(h);
                if (nonce != answered[r]) {
                    store.set(welcome + nonce, token);
                    answered[r] = nonce;
                }
            }
            const auto a = ack + token + "/" + std::to_string(r);
            if (store.check({a})) {
                store.deleteKey(a);
            } else {
                still.push_back(r);
            }
        }
        pending.swap(still);
        if (pending.empty()) break;
        if (std::chrono::steady_clock::now() > deadline) {
            std::string ranks;
            for (size_t i = 0; i < pending.size() && i < 8; ++i)
                ranks += (i ? ", " : "") + std::to_string(pending[i]);
            if (pending.size() > 8) ranks += ", ...";
            throw std::runtime_error("timed out after " + std::to_string(timeout.count()) +
                                     " ms waiting for rank(s) " + ranks +
                                     " to join the process group");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return token;
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
    // Each group of this process gets its own key space in the store, as
    // torch.distributed names its groups: a later group (e.g. `conmim eval` after a
    // fine-tuning run in one process) must not read the rendezvous keys of an earlier
    // one. Every rank creates its groups in the same order, so the names agree.
    // And each attempt of the job its own, so no rank reads what a dead attempt wrote.
    static std::atomic<int> groups{0};
    const auto attempt = attempt_token(*tcp, rank, world, timeout);
    auto store = c10::make_intrusive<c10d::PrefixStore>(
        "conmim/pg/" + attempt + "/" + std::to_string(groups.fetch_add(1)), tcp);
    // Owned here until it is handed out: a backend whose constructor throws (NCCL
    // without a GPU, Gloo on a wrong interface) must not leak the group and, on rank 0,
    // the store server with its port.
    auto g = std::unique_ptr<Group>(new Group{store, {}, timeout, {}});
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
        g->on_gpu = true;
#else
        throw std::runtime_error("this build has no NCCL backend (built without NCCL headers)");
#endif
    } else {
        throw std::runtime_error("unknown backend " + b + " (gloo or nccl)");
    }
    *out = g.release();
    CONMIM_CATCH
}

// Shuts the group down, as torch.distributed.destroy_process_group does, then frees it.
// ProcessGroupNCCL's destructor would shut itself down anyway, but warns on every exit
// that destroy_process_group was not called; Gloo's shutdown does nothing.
void conmim_pg_free(void* pg) {
    auto g = std::unique_ptr<Group>(static_cast<Group*>(pg));
    if (g->pg) {
        try {
            g->pg->shutdown();
        } catch (...) {
            // Freeing must not throw across the C boundary; the destructor retries.
        }
    }
}

// Sums `t` over all ranks, in place.
int conmim_pg_allreduce_sum(void* pg, const at::Tensor* t, char* err, size_t err_len) {
    CONMIM_TRY
    allreduce_sum(*static_cast<Group*>(pg), *t);
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

// BatchNorm of `x` ([R, C], R may differ per rank) with the statistics of the rows of
// every rank together (SyncBN; see global_stats and SyncBatchNorm): two all-reduces per
// call (one forward, one backward), every rank must make the same calls in the same
// order. `weight` / `bias` may be null (no affine part). When `running_mean` is not
// null, the running statistics are updated as BatchNorm's (momentum; unbiased variance
// over all rows). `*out` gets the output, in x's dtype.
int conmim_sync_batch_norm(void* pg, const at::Tensor* x, const at::Tensor* weight,
                           const at::Tensor* bias, const at::Tensor* running_mean,
                           const at::Tensor* running_var, double momentum, double eps,
                           at::Tensor** out, char* err, size_t err_len) {
    CONMIM_TRY
    auto& g = *static_cast<Group*>(pg);
    if (x->dim() != 2) throw std::runtime_error("sync_batch_norm: expected [rows, channels]");
    const int64_t c = x->size(1);
    at::Tensor mean, var, count;
    {
        at::NoGradGuard no_grad;
        std::tie(mean, var, count) = global_stats(g, x->detach());
        if (running_mean != nullptr && running_var != nullptr) {
            running_mean->mul_(1.0 - momentum)
                .add_(mean.to(running_mean->scalar_type()), momentum);
            running_var->mul_(1.0 - momentum)
                .add_((var * count / (count - 1.0)).to(running_var->scalar_type()), momentum);
        }
    }
    const auto fopts = x->options().dtype(at::kFloat);
    const auto w = weight != nullptr ? *weight : at::ones({c}, fopts);
    const auto b = bias != nullptr ? *bias : at::zeros({c}, fopts);
    const auto group = static_cast<int64_t>(reinterpret_cast<intptr_t>(&g));
    *out = new at::Tensor(SyncBatchNorm::apply(*x, w, b, mean.to(at::kFloat),
                                               var.to(at::kFloat), count, group, eps));
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
    (void)limits;
    std::reverse(buckets.begin(), buckets.end());
    // The last argument is the list of limits for *rebuilding* the buckets after the
    // first iteration (DDP's `bucket_cap_mb_list`); empty, as DDP passes it by default,
    // the rebuild uses `first` for the first bucket ready and `cap` for the others.
    auto r = new c10d::Reducer(ps, buckets, g.pg, sparse, cap, find_unused != 0,
                               /*gradient_as_bucket_view=*/false, {}, first,
                               /*skip_all_reduce_unused_params=*/false,
                               /*use_python_reducer=*/false,
                               /*bucket_bytes_cap_list=*/{});
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
