//! The engine actor: one thread owns one loaded model, its paged KV cache and its scheduler, and
//! runs steps of continuous batching: each step feeds every running sequence through the network
//! at once, samples for all of them with one host sync and streams each its text on its own
//! channel. Callers hold cheap handles; no lock is held across a generation. A caller that drops
//! its stream cancels its sequence at the next step. When the last handle is dropped the thread
//! exits and the model's memory is freed (scale to zero).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::checkpoint_pool::PooledCheckpoint;
use crate::error::{EngineError, Result};
use crate::kv_cache::{BLOCK_SIZE, KvStorage, blocks_for};
use crate::network::graphs::{self, DecodeGraphs};
use crate::network::{Architecture, Batch, NetConfig, Network, SeqChunk, WeightHandling};
use crate::params::SamplingParams;
use crate::sampling::Sampler;
use crate::scheduler::{Scheduled, Scheduler, SchedulerConfig};
use crate::sequence::{Accepted, Finish, GenerationTiming, SequenceOutput};

/// How an engine batches and how much memory its KV cache may take.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoding together in one step.
    pub max_running: usize,
    /// Sequences admitted but not yet running; beyond this `submit` answers `Overloaded`.
    pub max_waiting: usize,
    /// Tokens per step: decode tokens plus prefill chunks (bounds a step's latency and the size
    /// of the attention scores for long prompts).
    pub max_step_tokens: usize,
    /// Bytes of KV cache; the engine takes less when its context and `max_running` need less.
    pub kv_cache_bytes: u64,
    /// Caps the context below the model's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Compute dtype; `None` picks f32 on CPU and bf16 on accelerators.
    pub dtype: Option<DType>,
    /// Dequantize quantized (GGUF) weights at load; `None` does on CPU, keeps them quantized on
    /// accelerators (see `WeightHandling`).
    pub dequantize: Option<bool>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_running: 256,
            max_waiting: 256,
            max_step_tokens: 1024,
            kv_cache_bytes: 256 << 20,
            max_context: None,
            dtype: None,
            dequantize: None,
        }
    }
}

/// The compute dtype for a device: f32 on CPU (fast kernels there), bf16 on accelerators.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cpu() { DType::F32 } else { DType::BF16 }
}

/// How an engine's KV memory is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPlan {
    pub blocks: usize,
    /// Tokens one sequence may hold (prompt + completion).
    pub context: usize,
    pub bytes: u64,
}

impl EngineConfig {
    pub fn dtype_for(&self, device: &Device) -> DType {
        self.dtype.unwrap_or_else(|| compute_dtype(device))
    }

    pub fn weights_for(&self, device: &Device) -> WeightHandling {
        WeightHandling { dtype: self.dtype_for(device), dequantize: self.dequantize.unwrap_or(device.is_cpu()) }
    }

    /// Sizes the KV cache: no more blocks than `max_running` full-context sequences use, no more
    /// bytes than the budget, and a context no longer than the cache can hold.
    pub fn kv_plan(&self, net: &NetConfig, dtype: DType) -> KvPlan {
        let wanted = net.max_position_embeddings.min(self.max_context.unwrap_or(usize::MAX)).max(1);
        let block_bytes = (BLOCK_SIZE * net.kv_bytes_per_token(dtype.size_in_bytes())) as u64;
        let affordable = (self.kv_cache_bytes / block_bytes).max(1) as usize;
        let blocks = affordable.min(self.max_running.max(1).saturating_mul(blocks_for(wanted)));
        KvPlan { blocks, context: wanted.min(blocks * BLOCK_SIZE), bytes: blocks as u64 * block_bytes }
    }
}

/// What the rest of the host may know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub arch: Architecture,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    /// Tokens one sequence may hold (prompt + completion).
    pub context: usize,
    pub load: LoadBreakdown,
    /// Devices its weights are split over (tensor parallelism); 1: whole on one.
    pub ranks: usize,
}

impl ModelInfo {
    /// A model loaded from `pooled` with a KV cache of `kv_cache_bytes`.
    pub fn of(name: &str, pooled: &PooledCheckpoint, kv_cache_bytes: u64, context: usize, load: LoadBreakdown) -> Self {
        let ckpt = &pooled.ckpt;
        let (weight_bytes, ranks) = (ckpt.weight_bytes, 1);
        Self { name: name.to_string(), arch: ckpt.arch, weight_bytes, kv_cache_bytes, context, load, ranks }
    }
}

/// Where the time of one engine start went.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadBreakdown {
    /// The checkpoint was already resident in the pool.
    pub pool_hit: bool,
    /// Pool admission on a miss: mmap, page-in, pinning.
    pub admit: Duration,
    /// Weights from pool pages into device tensors.
    pub h2d: Duration,
    /// Building the network (fusing projections, RoPE tables) and the KV cache.
    pub init: Duration,
    /// Woken from sleep: the weights were still on the device; only the KV cache and the engine
    /// thread were made (`pool_hit` is then true and `h2d` zero).
    pub woke: bool,
}

/// Live counters of one engine, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    /// Steps whose forward pass was one CUDA graph launch.
    pub graph_steps: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Sum (microseconds) and count of per-sequence time per output token after the first.
    pub tpot_us_sum: AtomicU64,
    pub tpot_count: AtomicU64,
    /// Where steps' time goes (microseconds, summed): scheduling and building the batch on the
    /// host; the forward pass as the host sees it (on a GPU: launching it); waiting for the
    /// sampled tokens (on a GPU: the device finishing); and handing tokens to their streams.
    pub step_schedule_us: AtomicU64,
    pub step_forward_us: AtomicU64,
    pub step_sample_us: AtomicU64,
    pub step_deliver_us: AtomicU64,
}

/// One item of a generation's output stream.
#[derive(Debug)]
pub enum StreamItem {
    Text(String),
    Done(Finish),
}

/// Counts a sequence as in flight from `submit` until the engine drops it, wherever that is.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Job {
    /// The caller the sequence is for (a deployment); the scheduler shares batches across groups.
    group: Arc<str>,
    prompt: Vec<u32>,
    params: SamplingParams,
    /// Completion tokens allowed.
    budget: usize,
    submitted: Instant,
    events: mpsc::UnboundedSender<Result<StreamItem>>,
    _in_flight: InFlight,
}

/// The receiving end of one generation. Dropping it cancels the generation at the next step.
pub struct GenerationStream {
    rx: mpsc::UnboundedReceiver<Result<StreamItem>>,
    finished: bool,
}

impl GenerationStream {
    /// The next text piece or the final `Done`; `None` after `Done` or an error.
    pub async fn next(&mut self) -> Option<Result<StreamItem>> {
        if self.finished {
            return None;
        }
        let item = self
            .rx
            .recv()
            .await
            .unwrap_or_else(|| Err(EngineError::Runtime("engine stopped before finishing the generation".into())));
        if !matches!(item, Ok(StreamItem::Text(_))) {
            self.finished = true;
        }
        Some(item)
    }

    /// Collects the whole completion.
    pub async fn collect(mut self) -> Result<(String, Finish)> {
        let mut text = String::new();
        while let Some(item) = self.next().await {
            match item? {
                StreamItem::Text(t) => text.push_str(&t),
                StreamItem::Done(finish) => return Ok((text, finish)),
            }
        }
        unreachable!("next yields Done or an error before None")
    }
}

/// A cheap, cloneable handle to a running engine. While any clone is alive (outside the
/// registry's own) the engine counts as in use and is never evicted.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::UnboundedSender<Job>,
    pub info: Arc<ModelInfo>,
    pub stats: Arc<EngineStats>,
    tokenizer: Arc<Tokenizer>,
    chat_template: Arc<Option<ChatTemplate>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    last_used: Arc<AtomicU64>,
    epoch: Instant,
    /// Alive while the engine thread runs (and holds the model's memory).
    alive: Weak<()>,
    /// Where the weights go when the thread ends; taken by whoever puts the engine to sleep.
    dormant: Arc<std::sync::Mutex<Option<DormantReceiver>>>,
}

/// A prompt longer than this many bytes per token of context cannot fit, whatever it tokenizes
/// to; refusing it before tokenizing keeps a huge prompt from costing tokenizer time and memory.
const MAX_PROMPT_BYTES_PER_TOKEN: usize = 64;

impl EngineHandle {
    /// Tokenizes (on the caller's thread) and queues a generation. Fails at once with
    /// `PromptTooLong`, `InvalidParams` or `Overloaded`, before the engine sees it.
    pub fn submit(&self, prompt: String, params: SamplingParams) -> Result<GenerationStream> {
        self.submit_for(Arc::from(""), prompt, params)
    }

    /// Submits on behalf of `group` (e.g. a deployment): when sequences wait for room in the batch,
    /// groups take turns.
    pub fn submit_for(&self, group: Arc<str>, prompt: String, params: SamplingParams) -> Result<GenerationStream> {
        params.validate()?;
        self.touch();
        let context = self.info.context;
        if prompt.len() > context.saturating_mul(MAX_PROMPT_BYTES_PER_TOKEN) {
            return Err(EngineError::PromptTooLong(format!(
                "prompt has {} bytes; the model's context is {context} tokens",
                prompt.len()
            )));
        }
        let ids = self.tokenizer.encode(prompt, true).map_err(EngineError::runtime)?.get_ids().to_vec();
        if ids.is_empty() {
            return Err(EngineError::InvalidParams("prompt is empty".into()));
        }
        if ids.len() >= context {
            return Err(EngineError::PromptTooLong(format!(
                "prompt has {} tokens; the model's context is {context} tokens",
                ids.len()
            )));
        }
        let in_flight = InFlight(self.in_flight.clone());
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            return Err(EngineError::Overloaded(format!(
                "model {} has {} generations running or queued",
                self.info.name, self.max_in_flight
            )));
        }
        let budget = (params.max_tokens as usize).min(context - ids.len());
        let (events, rx) = mpsc::unbounded_channel();
        let job = Job { group, prompt: ids, params, budget, submitted: Instant::now(), events, _in_flight: in_flight };
        self.jobs.send(job).map_err(|_| EngineError::Runtime(format!("engine for {} has stopped", self.info.name)))?;
        Ok(GenerationStream { rx, finished: false })
    }

    pub async fn generate(&self, prompt: String, params: SamplingParams) -> Result<(String, Finish)> {
        self.submit(prompt, params)?.collect().await
    }

    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        match self.chat_template.as_ref() {
            Some(t) => Ok(t.render(messages)?),
            None => Err(EngineError::InvalidParams(format!("model {} has no chat template", self.info.name))),
        }
    }

    /// Generations submitted and not yet finished or cancelled.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether the engine thread is still running.
    pub fn is_alive(&self) -> bool {
        !self.jobs.is_closed()
    }

    /// Alive while the engine thread runs, even after every handle is gone.
    pub fn alive_token(&self) -> Weak<()> {
        self.alive.clone()
    }

    /// In use: generations in flight, or a handle held beyond the one its owner (the registry)
    /// keeps, e.g. by an invocation that loaded the model and may generate next.
    pub fn is_busy(&self) -> bool {
        self.in_flight() > 0 || Arc::strong_count(&self.info) > 1
    }

    /// Claims the engine's weights for when its thread ends (once every handle is dropped and
    /// nothing runs): the caller then holds them asleep, on the device. `None` if already claimed.
    pub fn take_dormant(&self) -> Option<DormantReceiver> {
        self.dormant.lock().expect("poisoned").take()
    }

    /// Time since the last request was submitted.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_used.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    fn touch(&self) {
        self.last_used.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Builds an engine from a pooled checkpoint on `device` and starts its thread. Blocking.
pub fn start_engine(
    name: &str,
    pooled: &PooledCheckpoint,
    pool_hit: bool,
    device: &Device,
    config: &EngineConfig,
) -> Result<EngineHandle> {
    let ckpt = &pooled.ckpt;
    let dtype = config.dtype_for(device);
    let kv = config.kv_plan(&ckpt.config, dtype);
    let started = Instant::now();
    let tensors = pooled.load_tensors(device, dtype)?;
    let h2d = started.elapsed();
    let started = Instant::now();
    let (network, storage) = {
        // Whatever fails here is freed inside the gate too.
        let _gate = graphs::shared();
        let c = &ckpt.config;
        Network::new(c.clone(), tensors, kv.context, config.weights_for(device), device).and_then(|network| {
            let storage = KvStorage::new(c.num_layers, c.num_kv_heads, c.head_dim, kv.blocks, dtype, device)?;
            Ok((network, storage))
        })?
    };
    let load = LoadBreakdown {
        pool_hit,
        admit: if pool_hit { Duration::ZERO } else { pooled.admit_time() },
        h2d,
        init: started.elapsed(),
        woke: false,
    };
    let info = ModelInfo::of(name, pooled, storage.bytes(), kv.context, load);
    spawn_engine(info, EngineParts::of(pooled, network, storage, None)?, config)
}

/// Everything the actor thread owns.
pub struct EngineParts {
    pub network: Network,
    pub storage: KvStorage,
    pub tokenizer: Arc<Tokenizer>,
    pub eos: BTreeSet<u32>,
    pub chat_template: Arc<Option<ChatTemplate>>,
    /// A tensor-parallel engine's other ranks (`network` and `storage` are then rank 0's).
    pub ranks: Option<crate::ranks::Ranks>,
}

impl EngineParts {
    /// An engine's parts around a network (rank 0's, with `ranks`) loaded from `pooled`.
    pub fn of(
        pooled: &PooledCheckpoint,
        network: Network,
        storage: KvStorage,
        ranks: Option<crate::ranks::Ranks>,
    ) -> Result<Self> {
        Ok(Self {
            network,
            storage,
            tokenizer: pooled.tokenizer()?,
            eos: pooled.ckpt.eos_token_ids.clone(),
            chat_template: pooled.chat_template()?,
            ranks,
        })
    }
}

/// What a sleeping engine keeps: its weights on the device (the network) and what it needs to
/// serve again. Waking makes a fresh KV cache and thread around them: no copy at all.
pub struct Dormant {
    info: ModelInfo,
    network: Network,
    tokenizer: Arc<Tokenizer>,
    eos: BTreeSet<u32>,
    chat_template: Arc<Option<ChatTemplate>>,
}

/// Where an engine's weights go when its thread ends: to whoever took the receiver from its
/// handle (a sleeping slot), or, if nobody did, nowhere (they are freed).
type DormantSender = std::sync::mpsc::SyncSender<Dormant>;
pub type DormantReceiver = std::sync::mpsc::Receiver<Dormant>;

/// Starts an engine again around a sleeping one's weights: a new KV cache and thread. Blocking.
pub fn wake_engine(dormant: Dormant, device: &Device, config: &EngineConfig) -> Result<EngineHandle> {
    let started = Instant::now();
    let c = &dormant.network.config;
    let dtype = config.dtype_for(device);
    let kv = config.kv_plan(c, dtype);
    let gate = graphs::shared();
    let storage = match KvStorage::new(c.num_layers, c.num_kv_heads, c.head_dim, kv.blocks, dtype, device) {
        Ok(storage) => storage,
        Err(e) => {
            drop(dormant); // its weights are freed inside the gate too
            return Err(e.into());
        }
    };
    drop(gate);
    let load = LoadBreakdown { pool_hit: true, woke: true, init: started.elapsed(), ..Default::default() };
    let info = ModelInfo { kv_cache_bytes: storage.bytes(), load, ..dormant.info };
    let parts = EngineParts {
        network: dormant.network,
        storage,
        tokenizer: dormant.tokenizer,
        eos: dormant.eos,
        chat_template: dormant.chat_template,
        ranks: None,
    };
    spawn_engine(info, parts, config)
}

/// Waits for the GPU work this thread has queued. candle queues each host thread's CUDA work on
/// that thread's own stream (CUDA's per-thread default stream), and a warm worker turns off
/// cudarc's events that would otherwise order one stream's use of a buffer after another's, so
/// device memory that passes from one thread to another must have its work finished first: the
/// pool's loads end so, and so do an engine's start (before its thread takes the parts) and its
/// end (before its weights go to a sleeping slot or are freed). No-op on a CPU.
pub fn settle(device: &Device) -> Result<()> {
    device.synchronize().map_err(EngineError::runtime)
}

/// Starts the actor thread around an already-built network.
pub fn spawn_engine(info: ModelInfo, parts: EngineParts, config: &EngineConfig) -> Result<EngineHandle> {
    let (jobs, rx) = mpsc::unbounded_channel::<Job>();
    let (dormant_tx, dormant_rx) = std::sync::mpsc::sync_channel(1);
    let stats = Arc::new(EngineStats::default());
    let (tokenizer, chat_template) = (parts.tokenizer.clone(), parts.chat_template.clone());
    let scheduler = SchedulerConfig {
        max_running: config.max_running.max(1),
        max_step_tokens: config.max_step_tokens.max(config.max_running.max(1)),
    };
    let blocks = parts.storage.blocks;
    let alive = Arc::new(());
    let alive_token = Arc::downgrade(&alive);
    // A tensor-parallel step is several devices' work; it is launched op by op. Nor does a split
    // engine sleep: it hands no dormant weights over (`take_dormant` gives nothing).
    let split = parts.ranks.is_some();
    let graphs = if split { None } else { DecodeGraphs::new(&parts.network, config.max_running) };
    // The parts were made on this thread, and the engine thread must see them finished: see
    // `settle`.
    settle(&parts.network.device)?;
    let actor = Actor {
        graphs,
        parts,
        info: info.clone(),
        dormant: dormant_tx,
        stats: stats.clone(),
        sched: Scheduler::new(scheduler, blocks),
        next_id: 0,
        _alive: alive,
    };
    std::thread::Builder::new()
        .name(format!("engine-{}", info.name))
        .spawn(move || actor.run(rx))
        .map_err(|e| EngineError::Load(format!("cannot start engine thread: {e}")))?;
    Ok(EngineHandle {
        jobs,
        info: Arc::new(info),
        stats,
        tokenizer,
        chat_template,
        in_flight: Arc::new(AtomicUsize::new(0)),
        max_in_flight: config.max_running.max(1) + config.max_waiting,
        last_used: Arc::new(AtomicU64::new(0)),
        epoch: Instant::now(),
        alive: alive_token,
        dormant: Arc::new(std::sync::Mutex::new((!split).then_some(dormant_rx))),
    })
}

/// The engine's per-sequence state beside the scheduler's token bookkeeping.
struct Running {
    job: Job,
    sampler: Sampler,
    output: SequenceOutput,
    first_step: Option<Instant>,
    first_token: Option<Duration>,
}

struct Actor {
    /// Dropped before `parts`: the graphs write into its KV cache.
    graphs: Option<DecodeGraphs>,
    parts: EngineParts,
    info: ModelInfo,
    dormant: DormantSender,
    stats: Arc<EngineStats>,
    sched: Scheduler<Running>,
    next_id: u64,
    _alive: Arc<()>,
}

impl Actor {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        loop {
            if self.sched.is_idle() {
                match rx.blocking_recv() {
                    Some(job) => self.admit(job),
                    None => return self.retire(),
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.admit(job);
            }
            // A caller that went away cancels its sequence; its blocks are free for this step.
            self.sched.remove_where(|r| r.job.events.is_closed());
            self.step();
            self.publish();
            if self.parts.ranks.as_ref().is_some_and(crate::ranks::Ranks::is_broken) {
                // The group's collective is aborted: nothing more can run. Callers are told, and
                // the next request for the model loads it afresh.
                let error = EngineError::Runtime("a rank of this tensor-parallel engine failed".into());
                for entry in self.sched.remove_where(|_| true) {
                    let _ = entry.payload.job.events.send(Err(error.clone()));
                }
                return self.retire();
            }
        }
    }

    /// Every handle is gone and nothing runs: the KV cache is freed here, and the weights go to
    /// a sleeping slot if one waits for them (else they are freed too).
    fn retire(self) {
        let Actor { graphs, parts, info, dormant, .. } = self;
        let EngineParts { network, storage, tokenizer, eos, chat_template, ranks } = parts;
        // A split engine does not sleep: its other ranks end here, freeing their parts.
        let split = ranks.is_some();
        drop(ranks);
        // Whoever takes the weights next (a waking engine, or the thread that frees them) must
        // find this thread's work on them done.
        if let Err(e) = settle(&network.device) {
            tracing::warn!(engine = %info.name, "waiting for the engine's last GPU work failed: {e}");
        }
        let _gate = graphs::shared();
        #[allow(clippy::drop_non_drop, reason = "without CUDA there are no graphs to drop")]
        drop(graphs);
        drop(storage);
        if !split {
            let _ = dormant.try_send(Dormant { info, network, tokenizer, eos, chat_template });
        }
    }

    fn admit(&mut self, mut job: Job) {
        if job.events.is_closed() {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let prompt = std::mem::take(&mut job.prompt);
        let output = SequenceOutput::new(prompt.len(), job.budget, job.params.stop.clone());
        let running = Running { sampler: Sampler::new(&job.params), output, first_step: None, first_token: None, job };
        self.sched.add_in(running.job.group.clone(), id, prompt, running);
    }

    fn step(&mut self) {
        let started = Instant::now();
        let mut plan = self.sched.schedule();
        if plan.is_empty() {
            return;
        }
        // Decode tokens first: the network attends to all of them in one padded pass.
        plan.sort_by_key(|s| s.len > 1);
        let now = Instant::now();
        let mut batch = Batch::default();
        for s in &plan {
            let e = self.sched.get_mut(s.id).expect("scheduled sequences exist");
            e.payload.first_step.get_or_insert(now);
            batch.tokens.extend_from_slice(&e.tokens[s.start..s.start + s.len]);
            batch.chunks.push(SeqChunk { start: s.start, len: s.len, block_table: e.blocks.clone(), sample: s.sample });
        }
        let add = |counter: &AtomicU64, since: Instant| {
            counter.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
            Instant::now()
        };
        let stats = self.stats.clone();
        let forwarding = add(&stats.step_schedule_us, started);
        let logits = self.forward(&batch);
        let sampling = add(&stats.step_forward_us, forwarding);
        let tokens = {
            let _gate = graphs::shared();
            logits.and_then(|l| self.sample_all(&plan, &l))
        };
        let delivering = add(&stats.step_sample_us, sampling);
        let tokens = match tokens {
            Ok(tokens) => tokens,
            Err(e) => {
                tracing::error!(error = %e, "engine step failed; failing its sequences");
                for s in &plan {
                    self.fail(s.id, e.clone());
                }
                return;
            }
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let mut tokens = tokens.into_iter();
        for s in &plan {
            self.sched.advance(s.id, s.len);
            if s.sample {
                let token = tokens.next().expect("one token per sampled chunk");
                self.accept(s.id, token);
            }
        }
        add(&stats.step_deliver_us, delivering);
    }

    /// The step's logits: replayed from a CUDA graph when one serves the batch, else launched
    /// op by op.
    fn forward(&mut self, batch: &Batch) -> Result<Tensor> {
        let EngineParts { network, storage, ranks, .. } = &mut self.parts;
        if let Some(ranks) = ranks {
            return ranks.forward(batch, network, storage);
        }
        if let Some(graphed) = self.graphs.as_mut().and_then(|g| g.forward(network, batch, storage)) {
            self.stats.graph_steps.fetch_add(1, Ordering::Relaxed);
            return graphed.map_err(EngineError::runtime);
        }
        let _gate = graphs::shared();
        Ok(network.forward(batch, storage)?)
    }

    /// The next token of every sampled sequence of the step, in plan order, with one host sync.
    /// When every one is greedy on an accelerator, the argmax runs there and only the ids cross
    /// (not `[sequences, vocab]` logits); on CPU the host argmax keeps numpy's tie-breaking.
    fn sample_all(&mut self, plan: &[Scheduled], logits: &Tensor) -> Result<Vec<u32>> {
        let sampled: Vec<u64> = plan.iter().filter(|s| s.sample).map(|s| s.id).collect();
        let sampler = |sched: &Scheduler<Running>, id: u64| sched.get(id).map(|e| e.payload.sampler.is_greedy());
        let greedy = sampled.iter().all(|id| sampler(&self.sched, *id) == Some(true));
        if greedy && !logits.device().is_cpu() {
            return logits.argmax(1).and_then(|t| t.to_vec1::<u32>()).map_err(EngineError::runtime);
        }
        let rows: Vec<Vec<f32>> = logits.to_vec2::<f32>().map_err(EngineError::runtime)?;
        let mut tokens = Vec::with_capacity(rows.len());
        for (id, row) in sampled.iter().zip(&rows) {
            let entry = self.sched.get_mut(*id).expect("sampled sequences exist");
            tokens.push(entry.payload.sampler.sample(row));
        }
        Ok(tokens)
    }

    /// Ends a sequence with an error: its blocks are freed and its caller is told.
    fn fail(&mut self, id: u64, error: EngineError) {
        if let Some(entry) = self.sched.remove(id) {
            let _ = entry.payload.job.events.send(Err(error));
        }
    }

    /// Takes one sequence's next token and sends what it adds to the text.
    fn accept(&mut self, id: u64, token: u32) {
        let EngineParts { tokenizer, eos, .. } = &self.parts;
        let entry = self.sched.get_mut(id).expect("sampled sequences exist");
        let run = &mut entry.payload;
        if run.first_token.is_none() {
            run.first_token = run.first_step.map(|t| t.elapsed());
        }
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let (text, finished) = match run.output.accept(token, tokenizer, eos) {
            Ok(Accepted::Continue(text)) => (text, None),
            Ok(Accepted::Finished(text, reason)) => (text, Some(reason)),
            Err(e) => return self.fail(id, e),
        };
        if !text.is_empty() && run.job.events.send(Ok(StreamItem::Text(text))).is_err() {
            self.sched.remove(id); // the caller went away
            return;
        }
        match finished {
            None => entry.tokens.push(token),
            Some(reason) => {
                let Running { job, output, first_step, first_token, .. } =
                    self.sched.remove(id).expect("exists").payload;
                let Job { events, submitted, _in_flight, .. } = job;
                // Counted as finished before the caller hears so: it may go idle at once.
                drop(_in_flight);
                let first_step = first_step.expect("it ran");
                let timing = GenerationTiming {
                    queue: first_step.duration_since(submitted),
                    first_token: first_token.unwrap_or_default(),
                    total: first_step.elapsed(),
                };
                let completion = output.usage.completion_tokens;
                if completion > 1 {
                    let tpot = (timing.total - timing.first_token) / (completion - 1);
                    self.stats.tpot_us_sum.fetch_add(tpot.as_micros() as u64, Ordering::Relaxed);
                    self.stats.tpot_count.fetch_add(1, Ordering::Relaxed);
                }
                let finish = Finish { reason, usage: output.usage, timing };
                let _ = events.send(Ok(StreamItem::Done(finish)));
            }
        }
    }

    fn publish(&self) {
        let s = &self.stats;
        s.running.store(self.sched.running(), Ordering::Relaxed);
        s.waiting.store(self.sched.waiting(), Ordering::Relaxed);
        s.kv_blocks_total.store(self.sched.blocks().total(), Ordering::Relaxed);
        s.kv_blocks_used.store(self.sched.blocks().used(), Ordering::Relaxed);
        s.preemptions.store(self.sched.preemptions(), Ordering::Relaxed);
    }
}
