//! Warm workers: a device made ready at boot so no request pays for it. On CUDA that means the
//! context and stream, a device memory arena (the stream-ordered pool grown once and never
//! trimmed) and every kernel the networks use already loaded, by running a tiny model of each
//! supported architecture through one forward pass.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::checkpoint_pool::HostPinner;
use crate::engine::EngineConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvStorage;
use crate::network::{Batch, Network, SeqChunk};
use crate::tiny_model::TinySpec;

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
            for arch in crate::Architecture::ALL {
                let (network, kv) = tiny_network(&self.device, &TinySpec::new(arch), &dir.join(arch.name()), 64, 1)?;
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

/// A tiny model of `spec` written to `dir`, loaded through a checkpoint pool onto `device` as
/// an engine would load it, with a KV cache of `kv_blocks` blocks.
fn tiny_network(
    device: &Device,
    spec: &TinySpec,
    dir: &Path,
    context: usize,
    kv_blocks: usize,
) -> Result<(Network, KvStorage)> {
    crate::tiny_model::make_tiny_model(dir, spec)?;
    let pool = crate::CheckpointPool::new(u64::MAX, None);
    let (pooled, _) = pool.checkout(crate::Checkpoint::open(dir)?, &|_| {})?;
    let config = pooled.ckpt.config.clone();
    let dtype = crate::engine::compute_dtype(device);
    let how = EngineConfig::default().weights_for(device);
    let network = Network::new(config.clone(), pooled.load_tensors(device, dtype)?, context, how, device)?;
    let kv = KvStorage::new(config.num_layers, config.num_kv_heads, config.head_dim, kv_blocks, dtype, device)?;
    Ok((network, kv))
}

/// What the boot graph check runs (`graphs::self_check`): a tiny Qwen3-shaped network with
/// 64-wide heads (so the paged kernel and graphs apply on a GPU), its KV cache after a prefill
/// of three ragged sequences, and their next decode step.
#[cfg(any(feature = "cuda", test))]
fn graph_check_step(device: &Device) -> Result<(Network, KvStorage, Batch)> {
    let dir = crate::tiny_model::scratch_dir("graph-check");
    let mut spec = TinySpec::new(crate::Architecture::Qwen3);
    spec.head_dim = 64;
    let made = tiny_network(device, &spec, &dir, 128, 8);
    let _ = std::fs::remove_dir_all(&dir);
    let (network, kv) = made?;
    let seqs = [(5usize, vec![0u32]), (17, vec![2, 1]), (2, vec![3])];
    let chunk = |start, len, table: &Vec<u32>| SeqChunk { start, len, block_table: table.clone(), sample: true };
    let prefill = Batch {
        tokens: seqs.iter().flat_map(|(len, _)| (1..=*len as u32).map(|t| t % 50 + 1)).collect(),
        chunks: seqs.iter().map(|(len, table)| chunk(0, *len, table)).collect(),
    };
    network.forward(&prefill, &kv)?;
    let decode =
        Batch { tokens: vec![7, 8, 9], chunks: seqs.iter().map(|(len, table)| chunk(*len, 1, table)).collect() };
    Ok((network, kv, decode))
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
    use crate::checkpoint_pool::{HostPinner, HostRange};
    use crate::error::{EngineError, Result};
    use kindling_checkpoint::CheckpointError;

    /// How many CUDA devices the driver sees.
    pub fn cuda_device_count() -> Result<usize> {
        let count = CudaContext::device_count().map_err(EngineError::load)?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Logs a boot self-check that found at most `tolerance` of difference; else turns the
    /// checked path off through `disable`, with why.
    fn keep_if_checked<E: std::fmt::Display>(
        what: &str,
        check: std::result::Result<f32, E>,
        tolerance: f32,
        disable: fn(&str),
    ) {
        match check {
            Ok(diff) if diff < tolerance => tracing::info!(max_diff = diff, "{what} checked"),
            Ok(diff) => disable(&format!("self-check differs by {diff}")),
            Err(e) => disable(&format!("self-check failed: {e}")),
        }
    }

    fn check(what: &str, r: sys::CUresult) -> Result<()> {
        if r == sys::CUresult::CUDA_SUCCESS { Ok(()) } else { Err(EngineError::Load(format!("{what} failed: {r:?}"))) }
    }

    /// Registers checkpoint pages with the driver (for the device to read), so copies from them
    /// are DMA at full PCIe speed instead of going through a pageable staging buffer.
    struct CudaPinner {
        ctx: Arc<CudaContext>,
    }

    fn page_span(range: HostRange) -> (*mut std::ffi::c_void, usize) {
        (range.start as *mut std::ffi::c_void, range.len.next_multiple_of(4096))
    }

    impl HostPinner for CudaPinner {
        fn pin(&self, range: HostRange) -> std::result::Result<(), CheckpointError> {
            self.ctx.bind_to_thread().map_err(CheckpointError::load)?;
            let (ptr, len) = page_span(range);
            let flags = sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_PORTABLE;
            // SAFETY: ptr/len cover a live mapping that outlives the registration (unpin runs
            // before the map is dropped).
            match unsafe { sys::cuMemHostRegister_v2(ptr, len, flags) } {
                sys::CUresult::CUDA_SUCCESS => Ok(()),
                r => Err(CheckpointError::Load(format!("cuMemHostRegister failed: {r:?}"))),
            }
        }

        fn unpin(&self, range: HostRange) {
            if self.ctx.bind_to_thread().is_ok() {
                // SAFETY: the same pointer `pin` registered.
                let _ = unsafe { sys::cuMemHostUnregister(page_span(range).0) };
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
            // cudarc's per-buffer events (two made per allocation, waited on and recorded around
            // each launch) cost host time per op and cannot be captured into a CUDA graph, so
            // they are off. Each host thread queues its work on its own stream (candle's device
            // uses CUDA's per-thread default stream), so nothing then orders one thread's use of
            // a buffer after another's: device memory passes between threads only where the
            // thread that queued work on it has waited for that work (`engine::settle`).
            // SAFETY: the loads, the engines' starts and the engines' ends wait so; a thread's
            // own work on its own stream is in order.
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
            let pinner = Arc::new(CudaPinner { ctx });
            let mut worker = Worker {
                device,
                label: format!("cuda:{ordinal}"),
                memory_budget: (total as u64).saturating_sub(4 << 30),
                boot_time: Default::default(),
                pinner: Some(pinner.clone()),
                link: Default::default(),
            };
            crate::network::fused::honour_env();
            crate::network::graphs::honour_env();
            use crate::network::{fused, graphs, host_copy, paged_kernel, skinny};
            if fused::applies(&worker.device) {
                keep_if_checked("fused layer kernels", fused::self_check(&worker.device), 0.02, fused::disable);
            }
            worker.warm_up()?;
            // Copies from memory pinned in cells, the way the checkpoint pool pins its pages.
            let pin = |bytes: &[u8]| pinner.pin(HostRange::of(bytes)).map_err(|e| e.to_string());
            match host_copy::self_check(&worker.device, &pin, &|bytes| pinner.unpin(HostRange::of(bytes))) {
                Ok(0) => tracing::info!("cell-wise host copies checked"),
                Ok(wrong) => host_copy::disable(&format!("self-check: {wrong} elements wrong")),
                Err(e) => host_copy::disable(&format!("self-check failed: {e}")),
            }
            skinny::honour_env();
            if skinny::enabled() {
                keep_if_checked("skinny matmul kernel", skinny::self_check(&worker.device), 0.02, skinny::disable);
            }
            paged_kernel::honour_env();
            if paged_kernel::enabled() {
                let check = paged_kernel::self_check(&worker.device);
                keep_if_checked("paged attention kernel", check, 0.02, paged_kernel::disable);
            }
            // Graphs ride on both kernels above; with either off they do not apply anyway.
            if fused::applies(&worker.device) && paged_kernel::enabled() {
                let check = super::graph_check_step(&worker.device)
                    .and_then(|(network, kv, step)| Ok(graphs::self_check(&network, &kv, &step)?));
                keep_if_checked("decode graphs", check, 0.01, graphs::disable);
            }
            // After the graph check, which captures: profiling turns graphs off.
            crate::network::phases::honour_env();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_checks_step_gives_the_same_logits_run_twice() {
        // What the GPU graph check relies on: running its decode step again rewrites the same
        // K/V, so a graph replay after the launch sees the cache the launch saw.
        let device = Device::Cpu;
        let (network, kv, decode) = graph_check_step(&device).unwrap();
        assert_eq!(network.config.head_dim, 64, "wide enough for the paged kernel");
        let run = || network.forward(&decode, &kv).unwrap().to_vec2::<f32>().unwrap();
        let (first, second) = (run(), run());
        assert_eq!(first.len(), 3);
        assert_eq!(first, second);
    }
}
