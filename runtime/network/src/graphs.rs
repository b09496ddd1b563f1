//! CUDA graphs for decode steps. A decode step is a few hundred small kernels; launching them one
//! by one costs the host ~12 µs each, which bounds small models (0.6B: ~3.6 ms of launching per
//! token). A graph captured once per (batch bucket, block-table width) replays the whole forward
//! pass with one launch.
//!
//! A graph reads its inputs from fixed device buffers that each step overwrites before the launch,
//! and writes its logits into a fixed output. A batch is padded up to its bucket with copies of its
//! first sequence: the same token, position, slot and block table, so a padding row writes the
//! very bytes its original writes; only the real rows' logits are read.
//!
//! Capturing needs the device's stream to itself. Every engine on a GPU queues work on candle's
//! one stream for that GPU, so whatever queues work or frees device memory outside a capture
//! (engine steps, loads, KV caches, a sleeping engine's weights) holds [`shared`], and a capture
//! holds [`exclusive`]. A free that slips past the gate (a thread's exit freeing candle's cached
//! kernel parameters) fails the capture it lands in, which then runs eagerly and retries later.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::Batch;
use super::attention::KernelMeta;

static GATE: RwLock<()> = RwLock::new(());
static ENABLED: AtomicBool = AtomicBool::new(cfg!(feature = "cuda"));

/// Held while queuing work on a GPU's stream (not capturing). Never taken twice on one thread.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    GATE.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Held while capturing a graph: nothing else queues work on any GPU stream meanwhile.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn exclusive() -> RwLockWriteGuard<'static, ()> {
    GATE.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `KINDLING_CUDA_GRAPHS=0` turns graphs off (every step launches its kernels one by one).
pub fn honour_env() {
    if std::env::var("KINDLING_CUDA_GRAPHS").is_ok_and(|v| v == "0") {
        ENABLED.store(false, Ordering::Relaxed);
        tracing::info!("CUDA graphs for decode steps are off (KINDLING_CUDA_GRAPHS=0)");
    }
}

/// The graph batch size that serves `seqs` decode tokens: 1, 2, 4, 8, then multiples of 8.
pub fn bucket(seqs: usize) -> usize {
    match seqs {
        0..=2 => seqs.max(1),
        3..=4 => 4,
        _ => seqs.div_ceil(8) * 8,
    }
}

/// The block-table entries a graph makes room for, for tables of up to `blocks` entries: a power
/// of two of at least 16 (before the context's cap, which `table_width` applies).
pub fn table_bucket(blocks: usize) -> usize {
    blocks.max(16).next_power_of_two()
}

/// Width of the kernel's block tables for tables of up to `blocks` entries: `table_bucket(blocks)`,
/// at most `max_blocks`.
pub fn table_width(blocks: usize, max_blocks: usize) -> usize {
    table_bucket(blocks).min(max_blocks.max(blocks))
}

/// A decode step's inputs, padded to a graph's shape, as they go into its fixed buffers.
#[derive(Debug, PartialEq)]
pub struct GraphInputs {
    /// Real sequences: rows `0..seqs` of the logits are theirs.
    pub seqs: usize,
    pub bucket: usize,
    pub width: usize,
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub slots: Vec<u32>,
    /// The paged kernel's `KernelMeta`: `[bucket, 3]` rows, then `[bucket, width]` tables.
    pub meta: Vec<u32>,
}

impl GraphInputs {
    /// `None` unless every chunk is one sampled decode token and the batch fits `max_seqs` and
    /// `max_blocks`. `window` is the model's attention window, if it has one.
    pub fn pack(batch: &Batch, window: Option<usize>, max_seqs: usize, max_blocks: usize) -> Option<Self> {
        let chunks = &batch.chunks;
        let seqs = chunks.len();
        let decode_only = chunks.iter().all(|c| c.len == 1 && c.sample) && batch.tokens.len() == seqs;
        let longest = chunks.iter().map(|c| c.block_table.len()).max()?;
        let (bucket, width) = (bucket(seqs), table_width(longest, max_blocks));
        if !decode_only || bucket > max_seqs || longest > max_blocks {
            return None;
        }
        let padded = || (0..bucket).map(|i| if i < seqs { i } else { 0 });
        let mut meta = KernelMeta::new(width);
        for i in padded() {
            meta.push_chunk(&chunks[i], window);
        }
        Some(GraphInputs {
            seqs,
            bucket,
            width,
            tokens: padded().map(|i| batch.tokens[i]).collect(),
            positions: padded().map(|i| chunks[i].start as u32).collect(),
            slots: padded().map(|i| slot_of(&chunks[i])).collect(),
            meta: meta.into_values(),
        })
    }
}

/// The cache slot a decode chunk's token is written to.
fn slot_of(chunk: &super::SeqChunk) -> u32 {
    crate::kv_cache::slots(&chunk.block_table, chunk.start..chunk.start + 1).next().expect("one position")
}

#[cfg(feature = "cuda")]
pub use cuda::{DecodeGraphs, self_check};

pub fn disable(reason: &str) {
    if ENABLED.swap(false, Ordering::Relaxed) {
        tracing::warn!(reason, "CUDA graphs for decode steps disabled; every step launches op by op");
    }
}

/// Without CUDA there are no graphs: `new` is always `None`.
#[cfg(not(feature = "cuda"))]
pub struct DecodeGraphs(std::convert::Infallible);

#[cfg(not(feature = "cuda"))]
impl DecodeGraphs {
    pub fn new(_: &super::Network, _: usize) -> Option<Self> {
        None
    }

    pub fn forward(
        &mut self,
        _: &super::Network,
        _: &Batch,
        _: &crate::kv_cache::KvStorage,
    ) -> Option<candle_core::Result<candle_core::Tensor>> {
        match self.0 {}
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream, DevicePtr, result, sys};
    use candle_core::{DType, Storage, Tensor, bail};

    use super::{ENABLED, GraphInputs, bucket, exclusive, shared};
    use crate::attention::StepPlan;
    use crate::kv_cache::{BLOCK_SIZE, KvStorage};
    use crate::{Batch, Network, fused, paged_kernel};

    /// Graphs one engine has captured, with the fixed buffers they read and write. Owned by the
    /// engine's actor; dropped before its KV cache (the graphs write into it).
    pub struct DecodeGraphs {
        stream: Arc<CudaStream>,
        max_seqs: usize,
        max_blocks: usize,
        tokens: Tensor,
        positions: Tensor,
        slots: Tensor,
        /// `[max_seqs * (2 + max_blocks)]`, viewed as `[bucket, width]` by each graph.
        meta: Tensor,
        /// `0..max_seqs`: every decode row is sampled.
        rows: Tensor,
        /// `[max_seqs, vocab]` f32: where every graph leaves its logits.
        logits: Tensor,
        graphs: HashMap<(usize, usize), OwnedGraph>,
        failures: usize,
    }

    /// A captured graph, owned by one engine.
    struct OwnedGraph(CudaGraph);

    // SAFETY: CUDA graphs are not internally synchronized, so their calls must be serialized;
    // an `OwnedGraph` has one owner (an engine's `DecodeGraphs`, used by one thread at a time),
    // and moving it to the engine's thread serializes everything.
    unsafe impl Send for OwnedGraph {}

    /// The boot self-check: runs `decode` (a decode step of sequences already prefilled into
    /// `kv`) twice, launched over the fixed buffers (and captured), then replayed from the
    /// graph. Returns the largest difference of the two steps' logits, relative to the largest
    /// logit; an error if no graph was captured. The same step twice writes the same K and V
    /// again, so both runs see the same cache.
    pub fn self_check(network: &Network, kv: &KvStorage, decode: &Batch) -> crate::error::Result<f32> {
        use crate::error::NetworkError;
        let mut graphs = DecodeGraphs::new(network, decode.chunks.len())
            .ok_or_else(|| NetworkError::Load("graphs do not apply to the check's network".into()))?;
        let mut step = || -> crate::error::Result<Vec<Vec<f32>>> {
            let logits = graphs
                .forward(network, decode, kv)
                .ok_or_else(|| NetworkError::Load("no graph for a decode step".into()))?;
            logits.and_then(|l| l.to_dtype(DType::F32)?.to_vec2::<f32>()).map_err(NetworkError::runtime)
        };
        let (launched, replayed) = (step()?, step()?);
        if graphs.captured() != 1 {
            return Err(NetworkError::Load("the check's step was not captured".into()));
        }
        let largest = launched.iter().flatten().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
        let pairs = launched.iter().flatten().zip(replayed.iter().flatten());
        let worst = pairs.map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        Ok(if worst.is_nan() { f32::INFINITY } else { worst / largest })
    }

    /// Captures that fail this many times turn graphs off for the engine.
    const MAX_FAILURES: usize = 3;
    /// Graphs kept per engine; steps of further shapes launch eagerly.
    const MAX_GRAPHS: usize = 96;
    /// The largest batch a graph serves. Graphs pay off where launching bounds the step, with
    /// few sequences; by 64 the device does (measured: no gain at 64 streams), and the fixed
    /// logits buffer grows with it (64 rows of a 152k vocabulary in f32: 39 MB per engine).
    const MAX_GRAPH_SEQS: usize = 64;

    impl DecodeGraphs {
        /// Graphs for `network`'s decode steps of up to `max_running` sequences, or `None` where
        /// they do not apply (graphs off, no fused kernels or paged attention kernel for it).
        pub fn new(network: &Network, max_running: usize) -> Option<Self> {
            let device = &network.device;
            if !ENABLED.load(Ordering::Relaxed)
                || !fused::applies(device)
                || !paged_kernel::applies(&network.config, device)
            {
                return None;
            }
            let stream = device.as_cuda_device().ok()?.cuda_stream();
            let max_seqs = bucket(max_running.clamp(1, MAX_GRAPH_SEQS));
            let max_blocks = network.context.div_ceil(BLOCK_SIZE);
            let made = (|| -> candle_core::Result<Self> {
                let _gate = shared();
                let u32s = |n: usize| Tensor::zeros(n, DType::U32, device);
                Ok(Self {
                    stream,
                    max_seqs,
                    max_blocks,
                    tokens: u32s(max_seqs)?,
                    positions: u32s(max_seqs)?,
                    slots: u32s(max_seqs)?,
                    meta: u32s(max_seqs * (3 + max_blocks))?,
                    rows: Tensor::arange(0u32, max_seqs as u32, device)?,
                    logits: Tensor::zeros((max_seqs, network.config.vocab_size), DType::F32, device)?,
                    graphs: HashMap::new(),
                    failures: 0,
                })
            })();
            made.inspect_err(|e| tracing::warn!(error = %e, "no CUDA graphs for this engine")).ok()
        }

        /// Runs a decode-only step through its graph (capturing it first if this shape is new):
        /// the real rows' logits `[seqs, vocab]`, valid until the next step. `None` when the step
        /// is not one a graph serves; the caller runs it eagerly.
        pub fn forward(
            &mut self,
            network: &Network,
            batch: &Batch,
            kv: &KvStorage,
        ) -> Option<candle_core::Result<Tensor>> {
            if self.failures >= MAX_FAILURES {
                return None;
            }
            let inputs = GraphInputs::pack(batch, network.config.sliding_window, self.max_seqs, self.max_blocks)?;
            let key = (inputs.bucket, inputs.width);
            if let Some(graph) = self.graphs.get(&key) {
                let _gate = shared();
                return Some(self.replay(graph, &inputs));
            }
            if self.graphs.len() >= MAX_GRAPHS {
                return None;
            }
            let _gate = exclusive();
            Some(self.run_and_capture(network, &inputs, kv))
        }

        /// How many graphs this engine has captured.
        pub fn captured(&self) -> usize {
            self.graphs.len()
        }

        fn replay(&self, graph: &OwnedGraph, inputs: &GraphInputs) -> candle_core::Result<Tensor> {
            self.write_inputs(inputs)?;
            graph.0.launch().w()?;
            self.logits.narrow(0, 0, inputs.seqs)
        }

        /// Runs the step eagerly over the fixed buffers (the real rows of its logits are this
        /// step's), then captures the same launches as a graph for the next steps of this shape.
        fn run_and_capture(
            &mut self,
            network: &Network,
            inputs: &GraphInputs,
            kv: &KvStorage,
        ) -> candle_core::Result<Tensor> {
            self.write_inputs(inputs)?;
            let (tokens, plan) = self.views(inputs)?;
            // Ops on strided tensors upload their shapes and strides from host memory, which a
            // graph cannot replay (it would copy from wherever that memory was). With candle's
            // cache on, the eager run uploads each once into device memory that stays, and the
            // capture reuses those (a miss fails the capture rather than recording the copy).
            let cuda = network.device.as_cuda_device()?;
            let _cache = cuda.enable_cuda_graph_htod_cache();
            let eager = network.forward_planned(&tokens, &plan, kv)?;
            let started = std::time::Instant::now();
            self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
            let captured =
                network.forward_planned(&tokens, &plan, kv).and_then(|out| self.logits.slice_set(&out, 0, 0));
            // Capture always ends, whatever happened inside it, so the stream is usable again.
            let ended =
                self.stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
            match (captured, ended) {
                (Ok(()), Ok(Some(graph))) => {
                    tracing::debug!(
                        bucket = inputs.bucket,
                        width = inputs.width,
                        capture_ms = started.elapsed().as_secs_f64() * 1e3,
                        "captured a decode graph"
                    );
                    self.graphs.insert((inputs.bucket, inputs.width), OwnedGraph(graph));
                }
                (captured, ended) => {
                    self.failures += 1;
                    let error = match (captured, ended) {
                        (Err(e), _) => e.to_string(),
                        (_, Err(e)) => e.to_string(),
                        _ => "capture produced no graph".to_string(),
                    };
                    tracing::warn!(%error, failures = self.failures, "decode graph capture failed; this step ran eagerly");
                }
            }
            eager.narrow(0, 0, inputs.seqs)
        }

        /// The token ids and step plan over the fixed buffers, shaped for `inputs`' graph.
        fn views(&self, inputs: &GraphInputs) -> candle_core::Result<(Tensor, StepPlan)> {
            let b = inputs.bucket;
            let meta = self.meta.narrow(0, 0, b * (3 + inputs.width))?;
            let plan = StepPlan::decode_in_place(
                self.positions.narrow(0, 0, b)?,
                self.slots.narrow(0, 0, b)?,
                self.rows.narrow(0, 0, b)?,
                meta,
                inputs.width,
            )?;
            Ok((self.tokens.narrow(0, 0, b)?, plan))
        }

        fn write_inputs(&self, inputs: &GraphInputs) -> candle_core::Result<()> {
            self.write(&self.tokens, &inputs.tokens)?;
            self.write(&self.positions, &inputs.positions)?;
            self.write(&self.slots, &inputs.slots)?;
            self.write(&self.meta, &inputs.meta)
        }

        /// Copies `values` to the start of the fixed buffer `dst`, in stream order.
        fn write(&self, dst: &Tensor, values: &[u32]) -> candle_core::Result<()> {
            if values.len() > dst.elem_count() {
                bail!("graph input of {} values over a buffer of {}", values.len(), dst.elem_count());
            }
            let (storage, layout) = dst.storage_and_layout();
            let Storage::Cuda(cuda) = &*storage else { bail!("graph buffers live on the GPU") };
            let (base, _sync) = cuda.as_cuda_slice::<u32>()?.device_ptr(&self.stream);
            let at = base + (layout.start_offset() * std::mem::size_of::<u32>()) as u64;
            // SAFETY: `at` starts a live u32 buffer with room for `values` (checked above); the
            // copy is queued on the stream the graphs that read it run on. From pageable memory
            // it is staged before this returns, so `values` may go away after.
            unsafe { result::memcpy_htod_async(at, values, self.stream.cu_stream()) }.w()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeqChunk;
    use crate::kv_cache::BLOCK_SIZE;

    #[test]
    fn buckets_cover_every_size_with_little_padding() {
        let buckets: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 250].map(bucket).into();
        assert_eq!(buckets, [1, 2, 4, 4, 8, 8, 16, 16, 24, 64, 256]);
        for n in 1..=256 {
            assert!(bucket(n) >= n && bucket(n) - n < 8, "{n} -> {}", bucket(n));
        }
    }

    #[test]
    fn table_width_grows_in_powers_of_two_up_to_the_context() {
        assert_eq!(table_width(1, 512), 16);
        assert_eq!(table_width(17, 512), 32);
        assert_eq!(table_width(300, 512), 512);
        assert_eq!(table_width(40, 40), 40);
    }

    fn chunk(start: usize, table: Vec<u32>) -> SeqChunk {
        SeqChunk { start, len: 1, block_table: table, sample: true }
    }

    #[test]
    fn padding_repeats_the_first_sequence_exactly() {
        let batch =
            Batch { tokens: vec![7, 8, 9], chunks: vec![chunk(20, vec![4, 2]), chunk(0, vec![5]), chunk(3, vec![1])] };
        let inputs = GraphInputs::pack(&batch, None, 8, 64).expect("a decode step");
        assert_eq!((inputs.seqs, inputs.bucket, inputs.width), (3, 4, 16));
        assert_eq!(inputs.tokens, [7, 8, 9, 7]);
        assert_eq!(inputs.positions, [20, 0, 3, 20]);
        let b = BLOCK_SIZE as u32;
        assert_eq!(inputs.slots, [2 * b + 4, 5 * b, b + 3, 2 * b + 4]);
        let (rows, tables) = inputs.meta.split_at(4 * 3);
        assert_eq!(
            rows,
            [0, 21, 0, 0, 1, 1, 0, 4, 2, 0, 21, 3],
            "the padding row is the first row, with its own table"
        );
        assert_eq!(tables.len(), 4 * 16);
        assert_eq!((&tables[..3], &tables[16..18], &tables[32..34]), (&[4, 2, 0][..], &[5, 0][..], &[1, 0][..]));
        assert_eq!(tables[..16], tables[3 * 16..]);
    }

    #[test]
    fn only_decode_steps_that_fit_get_a_graph() {
        let decode = Batch { tokens: vec![1; 9], chunks: (0..9).map(|_| chunk(0, vec![0])).collect() };
        assert!(GraphInputs::pack(&decode, None, 16, 64).is_some());
        assert!(GraphInputs::pack(&decode, None, 8, 64).is_none(), "bucket 16 is over the largest graph");
        let prefill = Batch {
            tokens: vec![1, 2],
            chunks: vec![SeqChunk { start: 0, len: 2, block_table: vec![0], sample: true }],
        };
        assert!(GraphInputs::pack(&prefill, None, 16, 64).is_none());
        let unsampled = Batch { tokens: vec![1], chunks: vec![SeqChunk { sample: false, ..chunk(0, vec![0]) }] };
        assert!(GraphInputs::pack(&unsampled, None, 16, 64).is_none());
        let long = Batch { tokens: vec![1], chunks: vec![chunk(0, vec![0; 65])] };
        assert!(GraphInputs::pack(&long, None, 16, 64).is_none(), "a table past the context");
        assert!(GraphInputs::pack(&Batch::default(), None, 16, 64).is_none());
    }
}
