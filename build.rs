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
}
