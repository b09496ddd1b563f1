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
    enabled() && device.is_cuda() && matches!(config.head_dim, 64 | 128) && (1..=8).contains(&group)
}

/// Whether the kernel is on (it may still not apply to a model's head shape).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Lanes of a warp per key: 32 (the default), or 16 with `KINDLING_PAGED_LANES=16`, a variant
/// whose dot products take fewer shuffles, kept beside the default until a benchmark picks one.
/// Read once; the boot self-check checks whichever is chosen.
pub fn lanes_per_key() -> usize {
    static LANES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LANES.get_or_init(|| match std::env::var("KINDLING_PAGED_LANES").as_deref() {
        Ok("16") => {
            tracing::info!("paged decode attention: 16 lanes per key (KINDLING_PAGED_LANES=16)");
            16
        }
        _ => 32,
    })
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
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, sys,
    };
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, bail};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_decode.ptx"));

    /// `q.apply_op3_no_bwd(k_cache, v_cache, &PagedDecode { .. })` -> `[seqs, heads, head_dim]`.
    pub struct PagedDecode {
        /// `[seqs, 2 + max blocks]` u32 on the device: first visible key, keys, block table.
        pub meta: Tensor,
        pub scale: f32,
        /// How many parts each sequence's keys are split into; `None` chooses (`parts`).
        pub parts: Option<usize>,
    }

    /// Fewest keys worth a part of their own.
    const KEYS_PER_PART: usize = 64;

    /// Splits each sequence's keys so that about two waves of blocks fill the GPU when a step has
    /// few sequences (one sequence of an 8-KV-head model is 8 blocks otherwise), with no part
    /// shorter than `KEYS_PER_PART` keys of the widest block table; a step with enough (sequence,
    /// KV head) pairs is not split. Sequences and table width are counted as a graph counts them
    /// (its bucket, a power-of-two width), so a batch splits alike whether its step is replayed
    /// from a graph or launched op by op, and a captured graph's split fits every later replay.
    fn parts(dev: &CudaDevice, seqs: usize, kv_heads: usize, meta_stride: usize) -> usize {
        static SMS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let sms = *SMS.get_or_init(|| {
            let sm_count = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
            dev.cuda_stream().context().attribute(sm_count).map_or(132, |n| n.max(1) as usize)
        });
        let most_keys = crate::graphs::table_bucket(meta_stride.saturating_sub(2)) * crate::kv_cache::BLOCK_SIZE;
        let seqs = crate::graphs::bucket(seqs);
        (2 * sms).div_ceil(seqs * kv_heads).min(most_keys.div_ceil(KEYS_PER_PART)).clamp(1, 32)
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
            let parts = self.parts.unwrap_or_else(|| parts(&dev, seqs, kv_heads, meta_stride)).max(1);
            let shape = Launch { seqs, heads, kv_heads, hd, slots, meta_stride, parts, scale: self.scale };
            let dpl = hd / 32;
            let variant = if super::lanes_per_key() == 16 { "l16_" } else { "" };
            let slice = match (&q.slice, &k.slice, &v.slice) {
                (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
                    let kernel = format!("paged_decode_{variant}bf16_g{group}_d{dpl}");
                    let (q, k, v) = (q.slice(oq.0..oq.1), k.slice(ok.0..ok.1), v.slice(ov.0..ov.1));
                    CudaStorageSlice::BF16(launch(
                        &dev,
                        (&kernel, "paged_decode_combine_bf16"),
                        [q, k, v],
                        &meta,
                        &shape,
                    )?)
                }
                (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
                    let kernel = format!("paged_decode_{variant}f32_g{group}_d{dpl}");
                    let (q, k, v) = (q.slice(oq.0..oq.1), k.slice(ok.0..ok.1), v.slice(ov.0..ov.1));
                    CudaStorageSlice::F32(launch(
                        &dev,
                        (&kernel, "paged_decode_combine_f32"),
                        [q, k, v],
                        &meta,
                        &shape,
                    )?)
                }
                _ => bail!("paged decode: q, k and v must all be bf16 or all f32"),
            };
            Ok((CudaStorage { slice, device: dev }, Shape::from((seqs, heads, hd))))
        }
    }

    /// The launch's dimensions.
    struct Launch {
        seqs: usize,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        slots: usize,
        meta_stride: usize,
        parts: usize,
        scale: f32,
    }

    /// Launches one instantiation of the kernel on q, k and v (and, when the keys are split, the
    /// kernel that merges the parts); returns the output `[seqs, heads, hd]`.
    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        (kernel, combine): (&str, &str),
        [q, k, v]: [CudaView<'_, T>; 3],
        meta: &CudaView<'_, u32>,
        s: &Launch,
    ) -> Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(kernel, "kindling_paged_decode", PTX)?;
        let rows = s.seqs * s.heads;
        // SAFETY: every element is written, by the kernel or by the merge.
        let out = unsafe { dev.alloc::<T>(rows * s.hd)? };
        // Per (row, part): (max, sum) and the weighted values; unused with one part.
        let scratch = s.parts > 1;
        // SAFETY: with several parts, every part writes its whole share before the merge reads it.
        let part_ms = unsafe { dev.alloc::<f32>(if scratch { rows * s.parts * 2 } else { 1 })? };
        let part_acc = unsafe { dev.alloc::<f32>(if scratch { rows * s.parts * s.hd } else { 1 })? };
        let (heads, kv_heads, slots, meta_stride) =
            (s.heads as i32, s.kv_heads as i32, s.slots as i32, s.meta_stride as i32);
        let mut b = func.builder();
        b.arg(&q).arg(&k).arg(&v).arg(meta).arg(&out).arg(&part_ms).arg(&part_acc);
        b.arg(&heads).arg(&kv_heads).arg(&slots).arg(&meta_stride).arg(&s.scale);
        let cfg = LaunchConfig {
            grid_dim: (s.seqs as u32, s.kv_heads as u32, s.parts as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; the caller checked the shapes.
        unsafe { b.launch(cfg) }.w()?;
        if scratch {
            let func = dev.get_or_load_custom_func(combine, "kindling_paged_decode", PTX)?;
            let (parts, hd) = (s.parts as i32, s.hd as i32);
            let mut b = func.builder();
            b.arg(&part_ms).arg(&part_acc).arg(&out).arg(&parts).arg(&hd);
            let cfg =
                LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (s.hd as u32, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: as above; one thread per dimension of each row.
            unsafe { b.launch(cfg) }.w()?;
        }
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
        // Unsplit, and split into more parts than some sequences have keys.
        let ours_whole = q.apply_op3_no_bwd(&k, &v, &PagedDecode { meta: meta.clone(), scale, parts: Some(1) })?;
        let ours = q.apply_op3_no_bwd(&k, &v, &PagedDecode { meta, scale, parts: Some(5) })?;
        let mut worst =
            (ours.to_dtype(DType::F32)? - ours_whole.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let ours = ours.to_dtype(DType::F32)?;
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
