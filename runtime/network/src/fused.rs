//! Fused CUDA kernels (`kernels/fused.cu`) for the glue between a layer's matmuls. A decode step
//! on a GPU is bound by kernel launches, not memory: unfused, splitting q/k/v, the q/k norms,
//! RoPE (with its f32 round trips), the head-major transposes and the two cache writes are about
//! fifteen launches per layer. Fused they are three: q/k/v + bias + norms + RoPE + cache write,
//! residual add + RMSNorm, and silu(gate) * up. Each kernel rounds where the unfused ops round;
//! `self_check` compares them with the unfused ops on random data when a GPU worker boots, and
//! any mismatch or failure turns them off (as `KINDLING_FUSED_KERNELS=0` does).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(cfg!(feature = "cuda"));

/// Whether this device's steps use the fused kernels.
pub fn applies(device: &Device) -> bool {
    ENABLED.load(Ordering::Relaxed) && device.is_cuda()
}

pub fn disable(reason: &str) {
    if ENABLED.swap(false, Ordering::Relaxed) {
        tracing::warn!(reason, "fused layer kernels disabled; the unfused ops serve");
    }
}

/// `KINDLING_FUSED_KERNELS=0` turns the kernels off (to compare against the unfused path).
pub fn honour_env() {
    if std::env::var("KINDLING_FUSED_KERNELS").is_ok_and(|v| v == "0") {
        disable("KINDLING_FUSED_KERNELS=0");
    }
}

/// What the q/k/v kernel needs besides the projection's output and the caches.
pub struct QkvArgs {
    pub heads: usize,
    /// q/k/v biases concatenated `[q_dim + 2 kv_dim]`.
    pub bias: Option<Tensor>,
    /// Per-head RMSNorm weights `[head_dim]` for q and k.
    pub norms: Option<(Tensor, Tensor)>,
    /// f32 RoPE tables `[context, head_dim / 2]`, indexed by `positions`.
    pub rope: Option<(Tensor, Tensor)>,
    pub interleaved: bool,
    /// `[tokens]` u32.
    pub positions: Tensor,
    /// `[tokens]` u32 cache slot of each token.
    pub slots: Tensor,
    pub eps: f32,
}

#[cfg(feature = "cuda")]
pub use cuda::{add_rms_norm, qkv_rope_cache, self_check, silu_mul};

#[cfg(not(feature = "cuda"))]
mod cpu_stubs {
    use candle_core::{Result, Tensor, bail};

    // Never called: `applies` is false without CUDA.
    pub fn qkv_rope_cache(_: &Tensor, _: &Tensor, _: &Tensor, _: &super::QkvArgs) -> Result<Tensor> {
        bail!("fused kernels run on CUDA only")
    }
    pub fn add_rms_norm(_: &Tensor, _: &Tensor, _: &Tensor, _: f32) -> Result<(Tensor, Tensor)> {
        bail!("fused kernels run on CUDA only")
    }
    pub fn silu_mul(_: &Tensor) -> Result<Tensor> {
        bail!("fused kernels run on CUDA only")
    }
}
#[cfg(not(feature = "cuda"))]
pub use cpu_stubs::{add_rms_norm, qkv_rope_cache, silu_mul};

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, CudaStorageSlice, WrapErr};
    use candle_core::{
        CpuStorage, CustomOp1, CustomOp3, D, DType, Device, Layout, Result, Shape, Storage, Tensor, bail,
    };

    use super::QkvArgs;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    const MODULE: &str = "kindling_fused";

    fn suffix(dtype: DType) -> Result<&'static str> {
        match dtype {
            DType::BF16 => Ok("bf16"),
            DType::F32 => Ok("f32"),
            other => bail!("fused kernels take bf16 or f32, not {other:?}"),
        }
    }

    /// A contiguous CUDA tensor's elements from its start.
    fn view<'a, T: CudaDType>(storage: &'a Storage, layout: &Layout) -> Result<CudaView<'a, T>> {
        match storage {
            Storage::Cuda(s) => cuda_view(s, layout),
            _ => bail!("fused kernels need GPU tensors"),
        }
    }

    fn cuda_view<'a, T: CudaDType>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
        let Some((start, end)) = layout.contiguous_offsets() else { bail!("fused kernels need contiguous inputs") };
        Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
    }

    fn cpu_unsupported<T>() -> Result<T> {
        bail!("fused kernels run on CUDA only")
    }

    struct QkvRopeCache<'a>(&'a QkvArgs);

    impl QkvRopeCache<'_> {
        fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
            &self,
            qkv: (&CudaStorage, &Layout),
            k: (&CudaStorage, &Layout),
            v: (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let a = self.0;
            let (n, row) = qkv.1.shape().dims2()?;
            let (kv_heads, cache_slots, hd) = k.1.shape().dims3()?;
            if row != (a.heads + 2 * kv_heads) * hd || v.1.shape() != k.1.shape() {
                bail!("qkv_rope_cache: qkv rows of {row} do not fit {} heads and caches {:?}", a.heads, k.1.shape());
            }
            let dev = qkv.0.device().clone();
            fn guard(t: &Tensor) -> (candle_core::StorageRef<'_>, &Layout) {
                t.storage_and_layout()
            }
            let (pos_s, pos_l) = guard(&a.positions);
            let (slot_s, slot_l) = guard(&a.slots);
            let bias = a.bias.as_ref().map(guard);
            let norms = a.norms.as_ref().map(|(q, k)| (guard(q), guard(k)));
            let rope = a.rope.as_ref().map(|(c, s)| (guard(c), guard(s)));
            let positions = view::<u32>(&pos_s, pos_l)?;
            let slots = view::<u32>(&slot_s, slot_l)?;
            let qkv_v = cuda_view::<T>(qkv.0, qkv.1)?;
            let (k_v, v_v) = (cuda_view::<T>(k.0, k.1)?, cuda_view::<T>(v.0, v.1)?);
            let bias_v = bias.as_ref().map(|(s, l)| view::<T>(s, l)).transpose()?;
            let norm_v = match &norms {
                Some(((qs, ql), (ks, kl))) => Some((view::<T>(qs, ql)?, view::<T>(ks, kl)?)),
                None => None,
            };
            let rope_v = match &rope {
                Some(((cs, cl), (ss, sl))) => Some((view::<f32>(cs, cl)?, view::<f32>(ss, sl)?)),
                None => None,
            };
            let flags = i32::from(bias.is_some())
                | (i32::from(norms.is_some()) << 1)
                | (i32::from(rope.is_some()) << 2)
                | (i32::from(a.interleaved) << 3);
            let kernel = format!("qkv_rope_cache_{}", suffix(T::DTYPE)?);
            let func = dev.get_or_load_custom_func(&kernel, MODULE, PTX)?;
            // SAFETY: the kernel writes every element of q_out.
            let q_out = unsafe { dev.alloc::<T>(n * a.heads * hd)? };
            let (heads, kvh, hd_i, slots_i) = (a.heads as i32, kv_heads as i32, hd as i32, cache_slots as i32);
            let mut b = func.builder();
            // Absent inputs get a stand-in pointer (q/k/v itself); the flags keep the kernel off them.
            b.arg(&qkv_v);
            match &bias_v {
                Some(bias) => b.arg(bias),
                None => b.arg(&qkv_v),
            };
            match &norm_v {
                Some((qn, kn)) => b.arg(qn).arg(kn),
                None => b.arg(&qkv_v).arg(&qkv_v),
            };
            match &rope_v {
                Some((cos, sin)) => b.arg(cos).arg(sin),
                None => b.arg(&qkv_v).arg(&qkv_v),
            };
            b.arg(&positions).arg(&slots);
            // The caches are written in place: they belong to the engine thread that runs this
            // step, on its one stream, so nothing reads them concurrently.
            b.arg(&q_out).arg(&k_v).arg(&v_v);
            b.arg(&heads).arg(&kvh).arg(&hd_i).arg(&slots_i).arg(&flags).arg(&a.eps);
            let threads = (hd / 2).div_ceil(32).max(1) as u32 * 32;
            let cfg = LaunchConfig {
                grid_dim: (n as u32, (a.heads + 2 * kv_heads) as u32, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel's signature; shapes were checked above.
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(q_out, dev))
        }
    }

    impl CustomOp3 for QkvRopeCache<'_> {
        fn name(&self) -> &'static str {
            "qkv-rope-cache"
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
            cpu_unsupported()
        }

        fn cuda_fwd(
            &self,
            qkv: &CudaStorage,
            lq: &Layout,
            k: &CudaStorage,
            lk: &Layout,
            v: &CudaStorage,
            lv: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let storage = match &qkv.slice {
                CudaStorageSlice::BF16(_) => self.run::<half::bf16>((qkv, lq), (k, lk), (v, lv))?,
                CudaStorageSlice::F32(_) => self.run::<f32>((qkv, lq), (k, lk), (v, lv))?,
                _ => bail!("qkv_rope_cache takes bf16 or f32"),
            };
            let (n, _) = lq.shape().dims2()?;
            let (_, _, hd) = lk.shape().dims3()?;
            Ok((storage, Shape::from((n, self.0.heads, hd))))
        }
    }

    /// Splits the fused q/k/v projection output `[tokens, q_dim + 2 kv_dim]`, applies bias,
    /// q/k norms and RoPE, writes k and v into the caches at `args.slots`, returns q
    /// `[tokens, heads, head_dim]`.
    pub fn qkv_rope_cache(qkv: &Tensor, k_cache: &Tensor, v_cache: &Tensor, args: &QkvArgs) -> Result<Tensor> {
        qkv.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &QkvRopeCache(args))
    }

    struct AddRmsNorm {
        eps: f32,
    }

    impl AddRmsNorm {
        fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
            &self,
            x: (&CudaStorage, &Layout),
            d: (&CudaStorage, &Layout),
            w: (&CudaStorage, &Layout),
        ) -> Result<CudaStorage> {
            let (rows, hidden) = x.1.shape().dims2()?;
            if d.1.shape() != x.1.shape() || w.1.shape().dims() != [hidden] {
                bail!("add_rms_norm: shapes {:?} {:?} {:?}", x.1.shape(), d.1.shape(), w.1.shape());
            }
            let dev = x.0.device().clone();
            let (xv, dv, wv) = (cuda_view::<T>(x.0, x.1)?, cuda_view::<T>(d.0, d.1)?, cuda_view::<T>(w.0, w.1)?);
            let func = dev.get_or_load_custom_func(&format!("add_rms_norm_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
            // SAFETY: the kernel writes both halves of out.
            let out = unsafe { dev.alloc::<T>(2 * rows * hidden)? };
            let (r, h) = (rows as i32, hidden as i32);
            let mut b = func.builder();
            b.arg(&xv).arg(&dv).arg(&wv).arg(&out).arg(&r).arg(&h).arg(&self.eps);
            // Enough threads that each holds at most NORM_PER_THREAD (8) elements of a row.
            let threads = hidden.div_ceil(8).next_multiple_of(32).clamp(32, 1024) as u32;
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: arguments match the kernel's signature; shapes were checked above.
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
    }

    impl CustomOp3 for AddRmsNorm {
        fn name(&self) -> &'static str {
            "add-rms-norm"
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
            cpu_unsupported()
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            lx: &Layout,
            d: &CudaStorage,
            ld: &Layout,
            w: &CudaStorage,
            lw: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let storage = match &x.slice {
                CudaStorageSlice::BF16(_) => self.run::<half::bf16>((x, lx), (d, ld), (w, lw))?,
                CudaStorageSlice::F32(_) => self.run::<f32>((x, lx), (d, ld), (w, lw))?,
                _ => bail!("add_rms_norm takes bf16 or f32"),
            };
            let (rows, hidden) = lx.shape().dims2()?;
            Ok((storage, Shape::from((2, rows, hidden))))
        }
    }

    /// `x + delta` and RMSNorm of it, in one launch: returns (sum, normalised).
    pub fn add_rms_norm(x: &Tensor, delta: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let both = x.contiguous()?.apply_op3_no_bwd(&delta.contiguous()?, weight, &AddRmsNorm { eps })?;
        Ok((both.get(0)?, both.get(1)?))
    }

    struct SiluMul;

    impl SiluMul {
        fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> Result<CudaStorage> {
            let (n, two_i) = l.shape().dims2()?;
            let inter = two_i / 2;
            let dev = s.device().clone();
            let input = cuda_view::<T>(s, l)?;
            let func = dev.get_or_load_custom_func(&format!("silu_mul_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<T>(n * inter)? };
            let (n_i, inter_i) = (n as i32, inter as i32);
            let mut b = func.builder();
            b.arg(&input).arg(&out).arg(&n_i).arg(&inter_i);
            let cfg = LaunchConfig::for_num_elems((n * inter) as u32);
            // SAFETY: arguments match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
    }

    impl CustomOp1 for SiluMul {
        fn name(&self) -> &'static str {
            "silu-mul"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported()
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let storage = match &s.slice {
                CudaStorageSlice::BF16(_) => self.run::<half::bf16>(s, l)?,
                CudaStorageSlice::F32(_) => self.run::<f32>(s, l)?,
                _ => bail!("silu_mul takes bf16 or f32"),
            };
            let (n, two_i) = l.shape().dims2()?;
            Ok((storage, Shape::from((n, two_i / 2))))
        }
    }

    /// `silu(gate) * up` of the fused gate/up output `[tokens, 2 intermediate]`.
    pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
        gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul)
    }

    /// Largest `|a - b| / (1 + |b|)`: a bf16 rounding step apart is about 0.008.
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        ((a - &b)?.abs()? / (b.abs()? + 1.0)?)?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Runs each kernel and the unfused ops it replaces on random bf16 data (bias, q/k norms,
    /// both RoPE layouts, scattered cache slots); returns the largest relative difference.
    pub fn self_check(device: &Device) -> Result<f32> {
        use crate::rope;
        let (n, heads, kvh, hd, slots_total) = (5usize, 8usize, 2usize, 128usize, 64usize);
        let bf = DType::BF16;
        let rand = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(bf);
        let qkv = rand(&[n, (heads + 2 * kvh) * hd])?;
        let bias = rand(&[(heads + 2 * kvh) * hd])?;
        let (qn, kn) = (rand(&[hd])?.affine(0.1, 1.0)?, rand(&[hd])?.affine(0.1, 1.0)?);
        let angles = (Tensor::arange(0f32, 40.0, device)?.unsqueeze(1)?.broadcast_mul(&Tensor::rand(
            0f32,
            1.0,
            (1, hd / 2),
            device,
        )?))?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let positions = Tensor::new(&[3u32, 0, 39, 17, 8], device)?;
        let write = [40u32, 2, 63, 17, 9];
        let slots = Tensor::new(&write, device)?;
        let mut worst = 0f32;
        for (interleaved, with_extras) in [(false, true), (true, false), (false, false)] {
            let (kc, vc) = (
                Tensor::zeros((kvh, slots_total, hd), bf, device)?,
                Tensor::zeros((kvh, slots_total, hd), bf, device)?,
            );
            let args = QkvArgs {
                heads,
                bias: with_extras.then(|| bias.clone()),
                norms: with_extras.then(|| (qn.clone(), kn.clone())),
                rope: Some((cos.clone(), sin.clone())),
                interleaved,
                positions: positions.clone(),
                slots: slots.clone(),
                eps: 1e-6,
            };
            let q = qkv_rope_cache(&qkv, &kc, &vc, &args)?;
            // The unfused ops, as network::forward runs them.
            let x = if with_extras { qkv.broadcast_add(&bias)? } else { qkv.clone() };
            let uq = x.narrow(1, 0, heads * hd)?.reshape((n, heads, hd))?;
            let uk = x.narrow(1, heads * hd, kvh * hd)?.reshape((n, kvh, hd))?;
            let uv = x.narrow(1, (heads + kvh) * hd, kvh * hd)?.reshape((n, kvh, hd))?;
            let (uq, uk) = if with_extras {
                (
                    candle_nn::ops::rms_norm(&uq.contiguous()?, &qn, 1e-6)?,
                    candle_nn::ops::rms_norm(&uk.contiguous()?, &kn, 1e-6)?,
                )
            } else {
                (uq, uk)
            };
            let (c, s) = (cos.index_select(&positions, 0)?, sin.index_select(&positions, 0)?);
            let uq = rope::apply(&uq.contiguous()?, &c, &s, interleaved)?;
            let uk = rope::apply(&uk.contiguous()?, &c, &s, interleaved)?;
            worst = worst.max(max_diff(&q, &uq)?);
            let idx = Tensor::new(&write, device)?;
            worst = worst.max(max_diff(&kc.index_select(&idx, 1)?, &uk.transpose(0, 1)?)?);
            worst = worst.max(max_diff(&vc.index_select(&idx, 1)?, &uv.transpose(0, 1)?)?);
        }
        // Rows held in registers (a full and a ragged last pass) and rows too wide for them.
        for hidden in [512, 1000, 9000] {
            let (x, d, w) = (rand(&[n, hidden])?, rand(&[n, hidden])?, rand(&[hidden])?);
            let (sum, normed) = add_rms_norm(&x, &d, &w, 1e-5)?;
            let usum = (&x + &d)?;
            worst = worst.max(max_diff(&sum, &usum)?);
            worst = worst.max(max_diff(&normed, &candle_nn::ops::rms_norm(&usum, &w, 1e-5)?)?);
        }
        let gate_up = rand(&[n, 2 * 384])?;
        let fused = silu_mul(&gate_up)?;
        let unfused =
            (candle_nn::ops::silu(&gate_up.narrow(D::Minus1, 0, 384)?)? * gate_up.narrow(D::Minus1, 384, 384)?)?;
        worst = worst.max(max_diff(&fused, &unfused)?);
        Ok(worst)
    }
}
