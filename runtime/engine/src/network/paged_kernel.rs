//! Our paged decode-attention CUDA kernel (`kernels/paged_decode.cu`) as a candle op: decode
//! tokens attend to K/V where they lie in the paged cache, through their block tables, instead of
//! gathering them into a contiguous copy first. Checked against the gather path when a GPU worker
//! boots (`self_check`); any mismatch or failure turns it off and the gather path serves.

use std::sync::atomic::{AtomicBool, Ordering};

use super::config::NetConfig;

static ENABLED: AtomicBool = AtomicBool::new(cfg!(feature = "cuda"));

/// Whether decode attention for this model and device goes through the kernel.
pub fn applies(config: &NetConfig, device: &candle_core::Device) -> bool {
    let group = config.num_heads / config.num_kv_heads;
    ENABLED.load(Ordering::Relaxed)
        && device.is_cuda()
        && matches!(config.head_dim, 64 | 128)
        && (1..=8).contains(&group)
}

pub fn disable(reason: &str) {
    if ENABLED.swap(false, Ordering::Relaxed) {
        tracing::warn!(reason, "paged decode kernel disabled; decode attention gathers K/V instead");
    }
}

#[cfg(feature = "cuda")]
pub use cuda::{PagedDecode, self_check};

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, bail};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_decode.ptx"));

    /// `q.apply_op3_no_bwd(k_cache, v_cache, &PagedDecode { .. })` -> `[seqs, heads, head_dim]`.
    pub struct PagedDecode {
        /// `[seqs, 2 + max blocks]` u32 on the device: first visible key, keys, block table.
        pub meta: Tensor,
        pub scale: f32,
    }

    impl CustomOp3 for PagedDecode {
        fn name(&self) -> &'static str {
            "paged-decode"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("the paged decode kernel runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            lq: &Layout,
            k: &CudaStorage,
            lk: &Layout,
            v: &CudaStorage,
            lv: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (seqs, heads, hd) = lq.shape().dims3()?;
            let (kv_heads, slots, _) = lk.shape().dims3()?;
            let (_, meta_stride) = self.meta.dims2()?;
            let group = heads / kv_heads;
            let dev = q.device().clone();
            let (meta_storage, meta_layout) = self.meta.storage_and_layout();
            let meta = match &*meta_storage {
                Storage::Cuda(s) => s.as_cuda_slice::<u32>()?.slice(meta_layout.start_offset()..),
                _ => bail!("paged decode: meta must be on the GPU"),
            };
            let contiguous = |l: &Layout| match l.contiguous_offsets() {
                Some(o) => Ok(o),
                None => bail!("paged decode: inputs must be contiguous"),
            };
            let (oq, ok, ov) = (contiguous(lq)?, contiguous(lk)?, contiguous(lv)?);
            let cfg = LaunchConfig {
                grid_dim: (seqs as u32, kv_heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let args = (heads as i32, kv_heads as i32, slots as i32, meta_stride as i32, self.scale);
            let (n, dpl) = (seqs * heads * hd, hd / 32);
            let slice = match (&q.slice, &k.slice, &v.slice) {
                (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
                    let kernel = format!("paged_decode_bf16_g{group}_d{dpl}");
                    let (q, k, v) = (q.slice(oq.0..oq.1), k.slice(ok.0..ok.1), v.slice(ov.0..ov.1));
                    CudaStorageSlice::BF16(launch(&dev, &kernel, [q, k, v], &meta, n, cfg, args)?)
                }
                (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
                    let kernel = format!("paged_decode_f32_g{group}_d{dpl}");
                    let (q, k, v) = (q.slice(oq.0..oq.1), k.slice(ok.0..ok.1), v.slice(ov.0..ov.1));
                    CudaStorageSlice::F32(launch(&dev, &kernel, [q, k, v], &meta, n, cfg, args)?)
                }
                _ => bail!("paged decode: q, k and v must all be bf16 or all f32"),
            };
            Ok((CudaStorage { slice, device: dev }, Shape::from((seqs, heads, hd))))
        }
    }

    /// Launches one instantiation of the kernel on q, k and v; returns the output `[seqs, heads, hd]`.
    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        kernel: &str,
        [q, k, v]: [CudaView<'_, T>; 3],
        meta: &CudaView<'_, u32>,
        elems: usize,
        cfg: LaunchConfig,
        (heads, kv_heads, slots, meta_stride, scale): (i32, i32, i32, i32, f32),
    ) -> Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(kernel, "kindling_paged_decode", PTX)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(elems)? };
        let mut b = func.builder();
        b.arg(&q).arg(&k).arg(&v).arg(meta).arg(&out);
        b.arg(&heads).arg(&kv_heads).arg(&slots).arg(&meta_stride).arg(&scale);
        // SAFETY: the arguments match the kernel's signature; the caller checked the shapes.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }

    /// Runs the kernel and a plain reference (gather, softmax, weighted sum) on random data with
    /// ragged contexts, scattered blocks and a window; returns the largest absolute difference.
    pub fn self_check(device: &Device) -> Result<f32> {
        let (kvh, group, hd, blocks) = (2usize, 4usize, 128usize, 8usize);
        let heads = kvh * group;
        let bs = crate::kv_cache::BLOCK_SIZE;
        let k = Tensor::randn(0f32, 1.0, (kvh, blocks * bs, hd), device)?.to_dtype(DType::BF16)?;
        let v = Tensor::randn(0f32, 1.0, (kvh, blocks * bs, hd), device)?.to_dtype(DType::BF16)?;
        // (first visible key, keys, block table)
        let seqs: [(u32, u32, Vec<u32>); 3] = [(0, 20, vec![5, 0]), (0, 1, vec![3]), (10, 50, vec![7, 1, 2, 6])];
        let stride = 2 + 4;
        let mut meta = Vec::new();
        for (first, keys, table) in &seqs {
            meta.extend([*first, *keys]);
            meta.extend(table.iter().copied().chain(std::iter::repeat(0)).take(4));
        }
        let meta = Tensor::from_vec(meta, (seqs.len(), stride), device)?;
        let q = Tensor::randn(0f32, 1.0, (seqs.len(), heads, hd), device)?.to_dtype(DType::BF16)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let ours = q.apply_op3_no_bwd(&k, &v, &PagedDecode { meta, scale })?.to_dtype(DType::F32)?;
        let mut worst = 0f32;
        for (i, (first, keys, table)) in seqs.iter().enumerate() {
            let slots: Vec<u32> =
                (*first..first + keys).map(|p| table[p as usize / bs] * bs as u32 + p % bs as u32).collect();
            let idx = Tensor::from_vec(slots, *keys as usize, device)?;
            let (ks, vs) =
                (k.index_select(&idx, 1)?.to_dtype(DType::F32)?, v.index_select(&idx, 1)?.to_dtype(DType::F32)?);
            let qi = q.get(i)?.to_dtype(DType::F32)?.reshape((kvh, group, hd))?;
            let probs = candle_nn::ops::softmax_last_dim(&(qi.matmul(&ks.transpose(1, 2)?)? * scale as f64)?)?;
            let reference = probs.matmul(&vs)?.reshape((heads, hd))?;
            let diff = (ours.get(i)? - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            worst = worst.max(diff);
        }
        Ok(worst)
    }
}
