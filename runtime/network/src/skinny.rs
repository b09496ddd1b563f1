//! Matmuls of a few rows on a GPU (`kernels/skinny_matmul.cu`): a decode step of one to four
//! sequences multiplies each weight with that many rows, so the matmul only streams the weight
//! and its speed is the rate at which the weight arrives. cuBLAS reached 1.1-1.9x the time of a
//! plain copy of the weight there (the o projection worst); this kernel walks each weight row with
//! one warp. `self_check` compares it with candle's matmul when a GPU worker boots; any mismatch
//! or failure turns it off, as `KINDLING_SKINNY_MATMUL=0` does.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(cfg!(feature = "cuda"));

/// The most rows the kernel takes; steps with more go to cuBLAS.
pub const MAX_ROWS: usize = 4;

/// Whether `x @ w.T` goes through the kernel: bf16 on a GPU, 2-D `x` of at most `MAX_ROWS` rows,
/// both contiguous with 16-byte aligned rows.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(8) && t.is_contiguous();
    enabled()
        && x.device().is_cuda()
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && x.rank() == 2
        && w.rank() == 2
        && (1..=MAX_ROWS).contains(&x.dims()[0])
        && x.dims()[1] == w.dims()[1]
        && x.dims()[1].is_multiple_of(8)
        && aligned(x)
        && aligned(w)
}

/// Whether the kernel is on (it may still not apply to a matmul's shapes).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub fn disable(reason: &str) {
    if ENABLED.swap(false, Ordering::Relaxed) {
        tracing::warn!(reason, "skinny matmul kernel disabled; cuBLAS takes every matmul");
    }
}

/// `KINDLING_SKINNY_MATMUL=0` turns the kernel off (to compare against cuBLAS).
pub fn honour_env() {
    if std::env::var("KINDLING_SKINNY_MATMUL").is_ok_and(|v| v == "0") {
        disable("KINDLING_SKINNY_MATMUL=0");
    }
}

#[cfg(feature = "cuda")]
pub use cuda::{matmul_t, self_check};

/// Never called: `applies` is false without CUDA.
#[cfg(not(feature = "cuda"))]
pub fn matmul_t(_: &Tensor, _: &Tensor) -> candle_core::Result<Tensor> {
    candle_core::bail!("the skinny matmul kernel runs on CUDA only")
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, bail};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/skinny_matmul.ptx"));
    /// Warps (output features) per block, as in the kernel.
    const WARPS: usize = 8;

    struct SkinnyMatmul;

    impl CustomOp2 for SkinnyMatmul {
        fn name(&self) -> &'static str {
            "skinny-matmul"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the skinny matmul kernel runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout, w: &CudaStorage, lw: &Layout) -> Result<(CudaStorage, Shape)> {
            let ((m, k), (n, kw)) = (lx.shape().dims2()?, lw.shape().dims2()?);
            if k != kw || !(1..=super::MAX_ROWS).contains(&m) || k % 8 != 0 {
                bail!("skinny matmul: x {:?} and w {:?} do not fit", lx.shape(), lw.shape());
            }
            let (Some((xs, xe)), Some((ws, we))) = (lx.contiguous_offsets(), lw.contiguous_offsets()) else {
                bail!("skinny matmul: inputs must be contiguous")
            };
            let (CudaStorageSlice::BF16(xd), CudaStorageSlice::BF16(wd)) = (&x.slice, &w.slice) else {
                bail!("skinny matmul: x and w must be bf16")
            };
            let dev = x.device().clone();
            let func =
                dev.get_or_load_custom_func(&format!("skinny_matmul_bf16_m{m}"), "kindling_skinny_matmul", PTX)?;
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<half::bf16>(m * n)? };
            let (xv, wv) = (xd.slice(xs..xe), wd.slice(ws..we));
            let (n_i, k_i) = (n as i32, k as i32);
            let mut b = func.builder();
            b.arg(&xv).arg(&wv).arg(&out).arg(&n_i).arg(&k_i);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(WARPS) as u32, 1, 1),
                block_dim: (32 * WARPS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match the kernel's signature; shapes and alignment were checked.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((m, n))))
        }
    }

    /// `x @ w.T` through the kernel (the caller checked `applies`).
    pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        x.apply_op2_no_bwd(w, &SkinnyMatmul)
    }

    /// The kernel against candle's matmul on random bf16 data, for 1 to 4 rows, a row length
    /// with a remainder past the unrolled loop and a partial last block; returns the largest
    /// `|a - b| / (1 + |b|)`.
    pub fn self_check(device: &Device) -> Result<f32> {
        let (k, n) = (4096 + 8 * 40, 8 * 9 + 5);
        let rand = |shape: (usize, usize)| Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(DType::BF16);
        let w = (rand((n, k))? * 0.02)?;
        let mut worst = 0f32;
        for m in 1..=super::MAX_ROWS {
            let x = rand((m, k))?;
            let ours = matmul_t(&x, &w)?.to_dtype(DType::F32)?;
            let theirs = x.to_dtype(DType::F32)?.matmul(&w.to_dtype(DType::F32)?.t()?)?;
            let diff = ((ours - &theirs)?.abs()? / (theirs.abs()? + 1.0)?)?.flatten_all()?.max(0)?;
            worst = worst.max(diff.to_scalar::<f32>()?);
        }
        Ok(worst)
    }
}
