//! Warm workers: a device made ready at boot so no request pays for it. On CUDA that means the
//! context and stream, a device memory arena (the stream-ordered pool grown once and never
//! trimmed) and every kernel the networks use already loaded, by running a tiny model of each
//! supported architecture through one forward pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::checkpoint_pool::HostPinner;
use crate::engine::EngineConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvStorage;
use crate::network::{Batch, Network, SeqChunk};

pub struct Worker {
    pub device: Device,
    /// "cpu" or "cuda:N".
    pub label: String,
    /// Bytes of weights the engines on this worker may hold at once.
    pub memory_budget: u64,
    /// How long making this worker ready took (paid once, at boot).
    pub boot_time: Duration,
    pinner: Option<Arc<dyn HostPinner>>,
    /// The host-to-device link loads copy weights over, one at a time, smallest first.
    pub link: crate::link::Link,
}

impl Worker {
    pub fn cpu(memory_budget: u64) -> Self {
        Self { memory_budget, ..Self::unwarmed(Device::Cpu) }
    }

    /// A worker around a device that was just created: no warm-up, no arena, no pinning. What a
    /// process that starts from nothing has (the benchmark's baseline).
    pub fn unwarmed(device: Device) -> Self {
        let label = if device.is_cpu() { "cpu".to_string() } else { format!("{:?}", device.location()) };
        Self {
            device,
            label,
            memory_budget: u64::MAX,
            boot_time: Duration::ZERO,
            pinner: None,
            link: Default::default(),
        }
    }

    /// Pins host pages for DMA from this worker's device, when it has one.
    pub fn pinner(&self) -> Option<Arc<dyn HostPinner>> {
        self.pinner.clone()
    }

    /// Runs a tiny model of each architecture through a prefill and a decode step, so every
    /// kernel is loaded (and, on CUDA, JIT-compiled from PTX) before the first real request.
    pub fn warm_up(&self) -> Result<()> {
        let dir = crate::tiny_model::scratch_dir("warmup");
        let result = (|| {
            let pool = crate::CheckpointPool::new(u64::MAX, None);
            for arch in crate::Architecture::ALL {
                let model_dir = dir.join(arch.name());
                crate::tiny_model::make_tiny_model(&model_dir, &crate::tiny_model::TinySpec::new(arch))?;
                let (pooled, _) = pool.checkout(crate::Checkpoint::open(&model_dir)?, &|_| {})?;
                let config = pooled.ckpt.config.clone();
                let dtype = crate::engine::compute_dtype(&self.device);
                let network = Network::new(
                    config.clone(),
                    pooled.load_tensors(&self.device, dtype)?,
                    64,
                    EngineConfig::default().weights_for(&self.device),
                    &self.device,
                )?;
                let kv =
                    KvStorage::new(config.num_layers, config.num_kv_heads, config.head_dim, 1, dtype, &self.device)?;
                let chunk = |start, len| SeqChunk { start, len, block_table: vec![0], sample: true };
                let prefill = Batch { tokens: vec![1, 2, 3, 4], chunks: vec![chunk(0, 4)] };
                network.forward(&prefill, &kv)?;
                let decode = Batch { tokens: vec![5], chunks: vec![chunk(4, 1)] };
                let logits = network.forward(&decode, &kv)?;
                logits.argmax(1).and_then(|t| t.to_vec1::<u32>()).map_err(EngineError::runtime)?;
            }
            Ok(())
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

#[cfg(feature = "cuda")]
pub use cuda::cuda_device_count;

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;
    use std::time::Instant;

    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::{CudaContext, sys};

    use super::Worker;
    use crate::checkpoint_pool::HostPinner;
    use crate::error::{EngineError, Result};

    /// How many CUDA devices the driver sees.
    pub fn cuda_device_count() -> Result<usize> {
        let count = CudaContext::device_count().map_err(EngineError::load)?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    fn check(what: &str, r: sys::CUresult) -> Result<()> {
        if r == sys::CUresult::CUDA_SUCCESS { Ok(()) } else { Err(EngineError::Load(format!("{what} failed: {r:?}"))) }
    }

    /// Registers mmapped checkpoint pages with the driver (read-only), so copies from them are
    /// DMA at full PCIe speed instead of going through a pageable staging buffer.
    struct CudaPinner {
        ctx: Arc<CudaContext>,
    }

    fn page_span(bytes: &[u8]) -> (*mut std::ffi::c_void, usize) {
        (bytes.as_ptr() as *mut std::ffi::c_void, bytes.len().next_multiple_of(4096))
    }

    impl HostPinner for CudaPinner {
        fn pin(&self, bytes: &[u8]) -> Result<()> {
            self.ctx.bind_to_thread().map_err(EngineError::load)?;
            let (ptr, len) = page_span(bytes);
            let flags = sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_PORTABLE;
            // SAFETY: ptr/len cover a live mapping that outlives the registration (unpin runs
            // before the map is dropped).
            check("cuMemHostRegister", unsafe { sys::cuMemHostRegister_v2(ptr, len, flags) })
        }

        fn unpin(&self, bytes: &[u8]) {
            if self.ctx.bind_to_thread().is_ok() {
                // SAFETY: the same pointer `pin` registered.
                let _ = unsafe { sys::cuMemHostUnregister(page_span(bytes).0) };
            }
        }
    }

    impl Worker {
        /// Makes GPU `ordinal` ready: context, stream, cuBLAS handle, an arena of `arena_fraction`
        /// of free memory reserved in the stream-ordered pool, and kernels warmed.
        pub fn cuda(ordinal: usize, arena_fraction: f64) -> Result<Self> {
            let started = Instant::now();
            let device = Device::new_cuda(ordinal).map_err(EngineError::load)?;
            let cuda = device.as_cuda_device().map_err(EngineError::load)?;
            let stream = cuda.cuda_stream();
            let ctx = stream.context().clone();
            // Every engine on this GPU queues its work on this one stream, in order, so cudarc's
            // per-buffer events (two made per allocation, waited on and recorded around each
            // launch) guard nothing here; they cost host time per op and cannot be captured
            // into a CUDA graph.
            // SAFETY: nothing in this process queues GPU work on any other stream.
            unsafe { ctx.disable_event_tracking() };
            ctx.bind_to_thread().map_err(EngineError::load)?;
            let (free, total) = ctx.mem_get_info().map_err(EngineError::load)?;

            // Keep freed memory in the pool (threshold = max) and grow it once now: later engine
            // loads allocate from reserved memory instead of calling into the driver's allocator.
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            check("cuDeviceGetDefaultMemPool", unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) })?;
            let mut threshold = u64::MAX;
            check("cuMemPoolSetAttribute", unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                )
            })?;
            let arena = ((free as f64) * arena_fraction.clamp(0.0, 0.95)) as usize;
            if arena > 0 {
                // SAFETY: uninitialised device memory, freed again at once; only reserves it.
                let reserve = unsafe { stream.alloc::<u8>(arena) }.map_err(EngineError::load)?;
                drop(reserve);
                stream.synchronize().map_err(EngineError::load)?;
            }
            let mut worker = Worker {
                device,
                label: format!("cuda:{ordinal}"),
                memory_budget: (total as u64).saturating_sub(4 << 30),
                boot_time: Default::default(),
                pinner: Some(Arc::new(CudaPinner { ctx })),
                link: Default::default(),
            };
            crate::network::fused::honour_env();
            crate::network::graphs::honour_env();
            if crate::network::fused::applies(&worker.device) {
                match crate::network::fused::self_check(&worker.device) {
                    Ok(diff) if diff < 0.02 => tracing::info!(max_rel_diff = diff, "fused layer kernels checked"),
                    Ok(diff) => crate::network::fused::disable(&format!("self-check differs by {diff}")),
                    Err(e) => crate::network::fused::disable(&format!("self-check failed: {e}")),
                }
            }
            worker.warm_up()?;
            match crate::network::paged_kernel::self_check(&worker.device) {
                Ok(diff) if diff < 0.02 => tracing::info!(max_abs_diff = diff, "paged decode kernel checked"),
                Ok(diff) => crate::network::paged_kernel::disable(&format!("self-check differs by {diff}")),
                Err(e) => crate::network::paged_kernel::disable(&format!("self-check failed: {e}")),
            }
            // Graphs ride on both kernels above; with either off they do not apply anyway.
            if crate::network::fused::applies(&worker.device) && crate::network::paged_kernel::enabled() {
                match crate::network::graphs::self_check(&worker.device) {
                    Ok(diff) if diff < 0.01 => tracing::info!(max_rel_diff = diff, "decode graphs checked"),
                    Ok(diff) => crate::network::graphs::disable(&format!("self-check differs by {diff}")),
                    Err(e) => crate::network::graphs::disable(&format!("self-check failed: {e}")),
                }
            }
            worker.boot_time = started.elapsed();
            tracing::info!(
                worker = %worker.label,
                boot_ms = worker.boot_time.as_millis() as u64,
                arena_bytes = arena,
                total_bytes = total,
                "warm GPU worker ready"
            );
            Ok(worker)
        }
    }
}

/// A CPU worker with its kernels warmed, timed like a GPU one.
pub fn warm_cpu(memory_budget: u64) -> Result<Worker> {
    let started = Instant::now();
    let mut worker = Worker::cpu(memory_budget);
    worker.warm_up()?;
    worker.boot_time = started.elapsed();
    Ok(worker)
}
