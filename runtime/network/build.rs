//! With the `cuda` feature, compiles our kernels (kernels/*.cu) to PTX with nvcc, loaded at run
//! time through candle's custom-module cache. Without it, nothing: CPU builds need no CUDA toolkit.

const KERNELS: [&str; 3] = ["paged_attention", "fused", "skinny_matmul"];

fn main() {
    for kernel in KERNELS {
        println!("cargo::rerun-if-changed=kernels/{kernel}.cu");
    }
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    for kernel in KERNELS {
        let source = format!("kernels/{kernel}.cu");
        let status = std::process::Command::new("nvcc")
            .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), &source, "-o"])
            .arg(out_dir.join(format!("{kernel}.ptx")))
            .status()
            .expect("nvcc must be on PATH for a CUDA build (scripts/build-cuda.sh puts it there)");
        assert!(status.success(), "nvcc failed on {source}");
    }
}
