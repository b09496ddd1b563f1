//! With the `cuda` feature, compiles kernels/paged_decode.cu to PTX with nvcc (loaded at run time
//! through candle's custom-module cache). Without it, nothing: CPU builds need no CUDA toolkit.

fn main() {
    println!("cargo::rerun-if-changed=kernels/paged_decode.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("paged_decode.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let status = std::process::Command::new("nvcc")
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "kernels/paged_decode.cu", "-o"])
        .arg(&out)
        .status()
        .expect("nvcc must be on PATH for a CUDA build (scripts/build-cuda.sh puts it there)");
    assert!(status.success(), "nvcc failed on kernels/paged_decode.cu");
}
