//! Test helpers for the train side: deterministic values that do not depend on
//! libtorch's RNG, a micro model config, and the PyTorch reference runner.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use tch::{Device, Kind, Tensor, nn};

use super::vit::{Config, Variant};

static RNG: Mutex<()> = Mutex::new(());

/// Seeds libtorch's (process-global) RNG and holds it until the guard drops: tests run
/// in parallel threads, so every test that draws from libtorch's RNG takes this first,
/// and its random values are the same on every run.
pub fn seeded(seed: i64) -> MutexGuard<'static, ()> {
    let guard = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    guard
}

/// Whether this build can run the multi-process (Gloo) tests; says so when not.
pub fn gloo_built() -> bool {
    if !super::dist::AVAILABLE {
        eprintln!("NOTICE: built without gloo headers: distributed test skipped");
    }
    super::dist::AVAILABLE
}

/// A free TCP port on loopback (for a store or a rendezvous).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The venv's `torchrun --no-python` (env `CONMIM_VENV`, set by `tools/env.sh`).
fn torchrun_command() -> Command {
    let venv = std::env::var("CONMIM_VENV").expect("CONMIM_VENV (source tools/env.sh)");
    let mut c = Command::new(Path::new(&venv).join("bin/torchrun"));
    c.arg("--no-python");
    c
}

/// Appends this test binary running `test` alone, with its output shown.
fn this_test(c: &mut Command, test: &str) {
    c.arg(std::env::current_exe().expect("the test binary"))
        .args([test, "--exact", "--nocapture"]);
}

/// The start of a command that runs `test` of this test binary as `nproc` ranks under
/// the venv's torchrun on loopback (a free port; Gloo on the CPU): `torchrun
/// --no-python --nnodes 1 --nproc-per-node N ... <this binary> TEST --exact
/// --nocapture`. Add the test's environment, then run it.
pub fn torchrun(nproc: usize, test: &str) -> Command {
    let mut c = torchrun_command();
    c.args(["--nnodes", "1", "--nproc-per-node"])
        .arg(nproc.to_string())
        .args(["--master-addr", "127.0.0.1", "--master-port"])
        .arg(free_port().to_string());
    this_test(&mut c, test);
    c
}

/// `test` of this test binary as one plain process, not under torchrun (none of its
/// variables set): how a single-process run is launched.
pub fn one_process(test: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("the test binary"));
    c.args([test, "--exact", "--nocapture"]);
    for k in [
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
    ] {
        c.env_remove(k);
    }
    c.env_remove("MASTER_PORT")
        .env_remove("TORCHELASTIC_USE_AGENT_STORE");
    c
}

/// How the torchrun agents of a multi-node job find each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rendezvous {
    /// `--node-rank K --master-addr HOST --master-port P`: node 0's agent hosts the
    /// store (torchrun's default, static rendezvous).
    Static,
    /// `--rdzv-backend c10d --rdzv-endpoint HOST:P --rdzv-id ID`: the elastic
    /// rendezvous; the agents agree on the node ranks, and the one that becomes node 0
    /// hosts the workers' store on a port of its own.
    C10d,
}

/// One node of an `nnodes`-node torchrun job on loopback (`nnodes` as torchrun takes
/// it: `2`, or `1:2` for an elastic job of 1 to 2 nodes; every agent of the job gets
/// the same `port`; with [`Rendezvous::Static`] this one is node `node_rank`), running
/// `test` of this test binary as `nproc` local ranks: the launch line of the README's
/// multi-node recipe, with 127.0.0.1 for the head node's address.
pub fn torchrun_node(
    nnodes: &str,
    node_rank: usize,
    nproc: usize,
    rdzv: Rendezvous,
    port: u16,
    test: &str,
) -> Command {
    let mut c = torchrun_command();
    c.args(["--nnodes", nnodes])
        .args(["--nproc-per-node", &nproc.to_string()]);
    match rdzv {
        Rendezvous::Static => c.args(["--node-rank", &node_rank.to_string()]).args([
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port.to_string(),
        ]),
        Rendezvous::C10d => c
            .args(["--rdzv-backend", "c10d", "--rdzv-id", "conmim-test"])
            .args(["--rdzv-endpoint", &format!("127.0.0.1:{port}")])
            // The address the node-0 agent gives the workers for its store (else the
            // machine's FQDN).
            .args(["--local-addr", "127.0.0.1"]),
    };
    this_test(&mut c, test);
    c
}

/// A finished process's stdout and stderr, as one text (for assertions and messages).
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Sends `signal` (e.g. "TERM") to process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("running kill")
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

/// Deterministic pseudo-random f32 values in [-1, 1) (a 64-bit LCG).
pub fn lcg_values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// [`lcg_values`] as a `dims` f32 tensor on `device`.
pub fn lcg_tensor(seed: u64, dims: &[i64], device: Device) -> Tensor {
    let n: i64 = dims.iter().product();
    Tensor::from_slice(&lcg_values(seed, n as usize))
        .view(dims)
        .to_device(device)
}

/// Deterministic u8 bytes.
pub fn lcg_bytes(seed: u64, n: usize) -> Vec<u8> {
    lcg_values(seed, n)
        .into_iter()
        .map(|v| ((v + 1.0) * 127.99) as u8)
        .collect()
}

/// A model small enough for unit tests: 32 px, patch 8 (a 4 x 4 grid), 32 dim, 2
/// blocks, 4 heads; otherwise the ConMIM defaults of `variant`.
pub fn micro(variant: Variant) -> Config {
    let base = Config {
        image_size: 32,
        patch_size: 8,
        embed_dim: 32,
        depth: 2,
        num_heads: 4,
        ..Config::vit_tiny()
    };
    match variant {
        Variant::Beit => base,
        Variant::Timm => base.timm_style(),
    }
}

/// Adds `scale * lcg` to every float variable of `vs` (sorted by name, so the values do
/// not depend on creation order), making zero-initialised tables and biases non-trivial.
pub fn perturb(vs: &nn::VarStore, seed: u64, scale: impl Fn(&str) -> f64) {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    tch::no_grad(|| {
        for (i, name) in names.into_iter().enumerate() {
            let mut v = vars[name].shallow_clone();
            if !v.is_floating_point()
                || name.ends_with("running_mean")
                || name.ends_with("running_var")
            {
                continue;
            }
            let noise = lcg_tensor(seed * 1000 + i as u64, &v.size(), v.device());
            let _ = v.g_add_(&(noise * scale(name)));
        }
    });
}

/// The project's Python (env `CONMIM_PYTHON`, set by `tools/env.sh`), or `None` after
/// printing why the calling test skips its reference comparison.
pub fn python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("CONMIM_PYTHON") {
        Some(p) if Path::new(&p).exists() => Some(PathBuf::from(p)),
        _ => {
            // Straight to stderr, past the test harness's capture, so the skip shows.
            let _ = writeln!(
                std::io::stderr(),
                "NOTICE {test}: CONMIM_PYTHON unset or missing; skipping the PyTorch reference \
                 comparison (source tools/env.sh to run it)"
            );
            None
        }
    }
}

/// Runs `tools/reference/conmim_loss.py ARGS...`, panicking with its output on failure.
pub fn run_reference(python: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/reference/conmim_loss.py");
    let out = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .expect("run the reference script");
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes named tensors (made contiguous, on the CPU) to an .npz numpy can read.
pub fn write_npz(path: &Path, tensors: &[(String, Tensor)]) {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_npz(&cpu, path).expect("write npz");
}

/// Reads an .npz into a map.
pub fn read_npz(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_npz(path)
        .expect("read npz")
        .into_iter()
        .collect()
}

/// Largest absolute difference, and the largest magnitude of `want`.
pub fn max_diff(got: &Tensor, want: &Tensor) -> (f64, f64) {
    assert_eq!(got.size(), want.size(), "shape");
    let got = got.detach().to_kind(Kind::Double).to_device(Device::Cpu);
    let want = want.to_kind(Kind::Double);
    let diff = (&got - &want).abs().max().double_value(&[]);
    (diff, want.abs().max().double_value(&[]))
}
