//! Our paged attention CUDA kernel (`kernels/paged_attention.cu`) as a candle op: every token of
//! a step (decode tokens and prefill chunks alike) attends to K/V where they lie in the paged
//! cache, through its sequence's block table, in one launch, instead of gathering them into a
//! contiguous copy first. Checked against the gather path when a GPU worker boots
//! (`self_check`); any mismatch or failure turns it off and the gather path serves.

use std::sync::atomic::{AtomicBool, Ordering};

use super::config::NetConfig;

static ENABLED: AtomicBool = AtomicBool::new(cfg!(feature = "cuda"));

/// Whether attention for this model and device goes through the kernel.
pub fn applies(config: &NetConfig, device: &candle_core::Device) -> bool {
    let group = config.num_heads / config.num_kv_heads;
    enabled() && device.is_cuda() && matches!(config.head_dim, 64 | 128) && (1..=8).contains(&group)
}

/// Whether the kernel is on (it may still not apply to a model's head shape).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// `KINDLING_PAGED_KERNEL=off` turns the kernel off: attention gathers K/V (to compare against).
pub fn honour_env() {
    if std::env::var("KINDLING_PAGED_KERNEL").is_ok_and(|v| v == "off") && ENABLED.swap(false, Ordering::Relaxed) {
        tracing::info!("paged attention kernel off (KINDLING_PAGED_KERNEL=off); attention gathers K/V");
    }
}

pub fn disable(reason: &str) {
    if ENABLED.swap(false, Ordering::Relaxed) {
        tracing::warn!(reason, "paged attention kernel disabled; attention gathers K/V instead");
    }
}

#[cfg(feature = "cuda")]
pub use cuda::{PagedAttention, self_check};

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, sys,
    };
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, bail};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));

    /// `q.apply_op3_no_bwd(k_cache, v_cache, &PagedAttention { .. })` -> `[rows, heads, head_dim]`.
    pub struct PagedAttention {
        /// u32 on the device (`attention::KernelMeta`): `[rows, 3]` (first visible key, keys,
        /// table index), then the block tables, `table_width` entries each.
        pub meta: Tensor,
        pub table_width: usize,
        pub scale: f32,
        /// How many parts each sequence's keys are split into; `None` chooses (`parts`).
        pub parts: Option<usize>,
    }

    /// Fewest keys worth a part of their own.
    const KEYS_PER_PART: usize = 64;

    /// Splits each row's keys so that about two waves of blocks fill the GPU when a step has few
    /// rows (one decode token of an 8-KV-head model is 8 blocks otherwise), with no part shorter
    /// than `KEYS_PER_PART` keys of the widest block table; a step with enough (row, KV head)
    /// pairs is not split. Rows and table width are counted as a graph counts them (its bucket,
    /// a power-of-two width), so a batch splits alike whether its step is replayed from a graph
    /// or launched op by op, and a captured graph's split fits every later replay.
    fn parts(dev: &CudaDevice, rows: usize, kv_heads: usize, table_width: usize) -> usize {
        static SMS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let sms = *SMS.get_or_init(|| {
            let sm_count = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
            dev.cuda_stream().context().attribute(sm_count).map_or(132, |n| n.max(1) as usize)
        });
        let most_keys = crate::graphs::table_bucket(table_width) * crate::kv_cache::BLOCK_SIZE;
        let rows = crate::graphs::bucket(rows);
        (2 * sms).div_ceil(rows * kv_heads).min(most_keys.div_ceil(KEYS_PER_PART)).clamp(1, 32)
    }

    impl CustomOp3 for PagedAttention {
        fn name(&self) -> &'static str {
            "paged-attention"
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
            bail!("the paged attention kernel runs on CUDA only")
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
            let (rows, heads, hd) = lq.shape().dims3()?;
            let (kv_heads, slots, _) = lk.shape().dims3()?;
            let meta_len = self.meta.dims1()?;
            if meta_len < rows * 3 || (meta_len - rows * 3) % self.table_width.max(1) != 0 {
                bail!(
                    "paged attention: {meta_len} meta values do not fit {rows} rows of tables {} wide",
                    self.table_width
                )
            }
            let group = heads / kv_heads;
            let dev = q.device().clone();
            let (meta_storage, meta_layout) = self.meta.storage_and_layout();
            let meta = match &*meta_storage {
                Storage::Cuda(s) => s.as_cuda_slice::<u32>()?.slice(meta_layout.start_offset()..),
                _ => bail!("paged attention: meta must be on the GPU"),
            };
            let contiguous = |l: &Layout| match l.contiguous_offsets() {
                Some(o) => Ok(o),
                None => bail!("paged attention: inputs must be contiguous"),
            };
            let (oq, ok, ov) = (contiguous(lq)?, contiguous(lk)?, contiguous(lv)?);
            let parts = self.parts.unwrap_or_else(|| parts(&dev, rows, kv_heads, self.table_width)).max(1);
            let shape =
                Launch { rows, heads, kv_heads, hd, slots, table_width: self.table_width, parts, scale: self.scale };
            let dpl = hd / 32;
            let slice = match (&q.slice, &k.slice, &v.slice) {
                (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
                    let kernel = format!("paged_attention_bf16_g{group}_d{dpl}");
                    let (q, k, v) = (q.slice(oq.0..oq.1), k.slice(ok.0..ok.1), v.slice(ov.0..ov.1));
                    CudaStorageSlice::BF16(launch(
                        &dev,
                        (&kernel, "paged_attention_combine_bf16"),
                        [q, k, v],
                        &meta,
                        &shape,
                    )?)
                }
                (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
                    let kernel = format!("paged_attention_f32_g{group}_d{dpl}");
                    let (q, k, v) = (q.slice(oq.0..oq.1), k.slice(ok.0..ok.1), v.slice(ov.0..ov.1));
                    CudaStorageSlice::F32(launch(
                        &dev,
                        (&kernel, "paged_attention_combine_f32"),
                        [q, k, v],
                        &meta,
                        &shape,
                    )?)
                }
                _ => bail!("paged attention: q, k and v must all be bf16 or all f32"),
            };
            Ok((CudaStorage { slice, device: dev }, Shape::from((rows, heads, hd))))
        }
    }

    /// The launch's dimensions.
    struct Launch {
        rows: usize,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        slots: usize,
        table_width: usize,
        parts: usize,
        scale: f32,
    }

    /// Launches one instantiation of the kernel on q, k and v (and, when the keys are split, the
    /// kernel that merges the parts); returns the output `[rows, heads, hd]`.
    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        (kernel, combine): (&str, &str),
        [q, k, v]: [CudaView<'_, T>; 3],
        meta: &CudaView<'_, u32>,
        s: &Launch,
    ) -> Result<CudaSlice<T>> {
        let func = dev.get_or_load_custom_func(kernel, "kindling_paged_attention", PTX)?;
        let rows = s.rows * s.heads;
        // SAFETY: every element is written, by the kernel or by the merge.
        let out = unsafe { dev.alloc::<T>(rows * s.hd)? };
        // Per (row, part): (max, sum) and the weighted values; unused with one part.
        let scratch = s.parts > 1;
        // SAFETY: with several parts, every part writes its whole share before the merge reads it.
        let part_ms = unsafe { dev.alloc::<f32>(if scratch { rows * s.parts * 2 } else { 1 })? };
        let part_acc = unsafe { dev.alloc::<f32>(if scratch { rows * s.parts * s.hd } else { 1 })? };
        let (heads, kv_heads, slots, table_width) =
            (s.heads as i32, s.kv_heads as i32, s.slots as i32, s.table_width as i32);
        let mut b = func.builder();
        b.arg(&q).arg(&k).arg(&v).arg(meta).arg(&out).arg(&part_ms).arg(&part_acc);
        b.arg(&heads).arg(&kv_heads).arg(&slots).arg(&table_width).arg(&s.scale);
        let cfg = LaunchConfig {
            grid_dim: (s.rows as u32, s.kv_heads as u32, s.parts as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; the caller checked the shapes.
        unsafe { b.launch(cfg) }.w()?;
        if scratch {
            let func = dev.get_or_load_custom_func(combine, "kindling_paged_attention", PTX)?;
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
        let (kvh, group, hd, blocks) = (2usize, 4usize, 128usize, 24usize);
        let heads = kvh * group;
        let bs = crate::kv_cache::BLOCK_SIZE;
        let k = Tensor::randn(0f32, 1.0, (kvh, blocks * bs, hd), device)?.to_dtype(DType::BF16)?;
        let v = Tensor::randn(0f32, 1.0, (kvh, blocks * bs, hd), device)?.to_dtype(DType::BF16)?;
        // Decode tokens: short, single-key, windowed, and long enough for several chunks per
        // warp; then a prefill chunk whose tokens see their sequence's keys up to themselves.
        let chunk = |start, len, block_table| crate::SeqChunk { start, len, block_table, sample: true };
        let long_table = vec![23, 8, 22, 9, 21, 10, 20, 11, 19, 12, 18, 13, 17];
        let chunks = [
            (chunk(19, 1, vec![5, 0]), None),
            (chunk(0, 1, vec![3]), None),
            (chunk(59, 1, vec![7, 1, 2, 6]), Some(50)),
            (chunk(202, 1, long_table), Some(200)),
            (chunk(3, 6, vec![14, 15]), None),
        ];
        let width = chunks.iter().map(|(c, _)| c.block_table.len()).max().unwrap_or(0);
        let mut meta = crate::attention::KernelMeta::new(width);
        for (c, window) in &chunks {
            meta.push_chunk(c, *window);
        }
        let meta = meta.into_values();
        let rows = (meta.len() - chunks.len() * width) / 3;
        let meta = Tensor::from_vec(meta.clone(), meta.len(), device)?;
        let q = Tensor::randn(0f32, 1.0, (rows, heads, hd), device)?.to_dtype(DType::BF16)?;
        let scale = 1.0 / (hd as f32).sqrt();
        // Unsplit, and split into more parts than some rows have keys.
        let op = |parts| PagedAttention { meta: meta.clone(), table_width: width, scale, parts: Some(parts) };
        let ours_whole = q.apply_op3_no_bwd(&k, &v, &op(1))?;
        let ours = q.apply_op3_no_bwd(&k, &v, &op(5))?;
        let mut worst =
            (ours.to_dtype(DType::F32)? - ours_whole.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let ours = ours.to_dtype(DType::F32)?;
        let mut row = 0;
        for (c, window) in &chunks {
            for pos in c.start..c.start + c.len {
                let first = window.map_or(0, |w: usize| (pos + 1).saturating_sub(w));
                let slots: Vec<u32> =
                    (first..=pos).map(|p| c.block_table[p / bs] * bs as u32 + (p % bs) as u32).collect();
                let idx = Tensor::from_vec(slots, pos + 1 - first, device)?;
                let (ks, vs) =
                    (k.index_select(&idx, 1)?.to_dtype(DType::F32)?, v.index_select(&idx, 1)?.to_dtype(DType::F32)?);
                let qi = q.get(row)?.to_dtype(DType::F32)?.reshape((kvh, group, hd))?;
                let probs = candle_nn::ops::softmax_last_dim(&(qi.matmul(&ks.transpose(1, 2)?)? * scale as f64)?)?;
                let reference = probs.matmul(&vs)?.reshape((heads, hd))?;
                let diff = (ours.get(row)? - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
                worst = worst.max(diff);
                row += 1;
            }
        }
        Ok(worst)
    }
}
