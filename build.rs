//! With feature `train`: make the binaries find libtorch at run time (rpath to the
//! torch lib dir that torch-sys built against) and keep CUDA linked in (libtorch_cuda
//! registers the CUDA backend from static initialisers, so `--as-needed` would drop it).
//! It also compiles the C++ shim `src/train/shim.cpp` (what tch does not expose: bf16
//! autocast, TF32, allocator statistics) against the headers of that same libtorch.
//! Without the feature this does nothing: the data side needs no libtorch.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_TRAIN").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=src/train/shim.cpp");
    println!("cargo:rerun-if-changed=src/train/shim_util.h");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        compile_shim(std::path::Path::new(&lib));
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}

/// Builds `src/train/shim.cpp` against `<libtorch>/include` (the lib dir's sibling), with
/// the flags torch-sys itself uses (C++17, the C++11 ABI of the pip/libtorch 2.x builds).
fn compile_shim(lib: &std::path::Path) {
    let root = lib.parent().expect("libtorch lib dir has a parent");
    let include = root.join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/train/shim.cpp")
        .compile("conmim_shim");
    compile_dist_shim(&include, root);
}

/// Builds `src/train/dist_shim.cpp` (c10d: TCPStore, ProcessGroupGloo, and
/// ProcessGroupNCCL when NCCL and CUDA headers sit next to the pip torch) against the
/// torch headers plus the system's gloo headers (Debian `libgloo-dev`).
fn compile_dist_shim(include: &std::path::Path, torch_root: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/train/dist_shim.cpp");
    println!("cargo::rustc-check-cfg=cfg(conmim_no_gloo)");
    // The gloo headers: Debian's libgloo-dev (tools/setup.sh installs it). Without them
    // the build still works, single-process only (`conmim::train::dist` then errors).
    let dirs = ["/usr/include", "/usr/local/include"];
    let found = dirs
        .iter()
        .map(|d| std::path::Path::new(d).join("gloo/config.h"))
        .find(|h| h.exists());
    // Watched (only paths that exist: a missing one would rerun this script on every
    // build), so that installing libgloo-dev later rebuilds with it: cargo reruns a
    // script that prints rerun-if lines only when one of them changed.
    match &found {
        Some(h) => println!("cargo:rerun-if-changed={}", h.display()),
        None => dirs
            .iter()
            .filter(|d| std::path::Path::new(d).is_dir())
            .for_each(|d| println!("cargo:rerun-if-changed={d}")),
    }
    if found.is_none() {
        println!(
            "cargo:warning=gloo headers not found (install libgloo-dev): building without \
             the c10d shim; distributed training is unavailable in this build"
        );
        println!("cargo:rustc-cfg=conmim_no_gloo");
        return;
    }
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .warnings(false)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .define("USE_C10D_GLOO", None)
        .file("src/train/dist_shim.cpp");
    // NCCL needs the CUDA toolkit's full headers (nvcc's `crt/`, CCCL's `nv/target`):
    // `$CUDA_HOME/include` (default /usr/local/cuda) when it has them, else the pip
    // wheels' `nvidia/cu13/include` next to torch (tools/requirements.txt installs
    // nvidia-cuda-crt and nvidia-cuda-cccl there); nccl.h comes from nvidia-nccl.
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CONMIM_NO_NCCL");
    let cuda_home = std::env::var("CUDA_HOME").unwrap_or_else(|_| "/usr/local/cuda".into());
    let site = torch_root.parent();
    let complete = |d: &std::path::Path| {
        d.join("nv/target").exists()
            && d.join("crt/host_config.h").exists()
            && d.join("cuda_runtime_api.h").exists()
    };
    let cuda_inc = std::iter::once(std::path::Path::new(&cuda_home).join("include"))
        .chain(site.map(|p| p.join("nvidia/cu13/include")))
        .find(|d| complete(d));
    let nccl_inc = site
        .map(|p| p.join("nvidia/nccl/include"))
        .filter(|p| p.join("nccl.h").exists());
    // Watched like the gloo headers (existing paths only), so that installing the CUDA
    // or NCCL header wheels after a first build rebuilds with NCCL.
    std::iter::once(std::path::Path::new(&cuda_home).join("include"))
        .chain(site.map(|p| p.join("nvidia")))
        .filter(|d| d.is_dir())
        .for_each(|d| println!("cargo:rerun-if-changed={}", d.display()));
    // ProcessGroupNCCL lives in libtorch_cuda: a CPU-only libtorch has none to link.
    let cuda_lib = torch_root.join("lib/libtorch_cuda.so").exists();
    let want = std::env::var_os("CONMIM_NO_NCCL").is_none() && cuda_lib;
    if let (true, Some(cuda_inc), Some(nccl_inc)) = (want, cuda_inc, nccl_inc) {
        b.include(&cuda_inc)
            .include(nccl_inc)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("CONMIM_NCCL", None);
    }
    b.compile("conmim_dist_shim");
}
