//! The engine actor: one thread owns one loaded model and serves generation jobs from a bounded
//! queue, streaming text back on a per-request channel. No lock is held across a generation, and
//! a handle is all a caller needs; when the last handle is dropped the thread exits and the
//! model's memory is freed (scale to zero).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::chat_template::{ChatMessage, ChatTemplate};
use candle_nn::VarBuilder;

use crate::checkpoint::Architecture;
use crate::checkpoint_pool::PooledCheckpoint;
use crate::error::{EngineError, Result};
use crate::generate::{Finish, Flow, generate};
use crate::model::{LoadedModel, compute_dtype};
use crate::params::SamplingParams;

/// How many jobs may wait for one engine before new ones are refused as overloaded.
pub const DEFAULT_QUEUE_DEPTH: usize = 64;

/// What the rest of the host may know about a loaded model.
#[derive(Debug)]
pub struct ModelInfo {
    pub name: String,
    pub arch: Architecture,
    pub weight_bytes: u64,
    pub max_positions: usize,
    pub load: LoadBreakdown,
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
    /// Tokenizer, chat template and building the network.
    pub init: Duration,
}

/// One item of a generation's output stream.
#[derive(Debug)]
pub enum StreamItem {
    Text(String),
    Done(Finish),
}

struct Job {
    prompt: String,
    params: SamplingParams,
    enqueued: Instant,
    events: mpsc::UnboundedSender<Result<StreamItem>>,
}

/// The receiving end of one generation. Dropping it cancels the generation at the next token.
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

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    pub info: Arc<ModelInfo>,
    chat_template: Arc<Option<ChatTemplate>>,
    last_used: Arc<AtomicU64>,
    epoch: Instant,
}

impl EngineHandle {
    /// Queues a generation; fails fast with `Overloaded` when the engine's queue is full.
    pub fn submit(&self, prompt: String, params: SamplingParams) -> Result<GenerationStream> {
        params.validate()?;
        self.touch();
        let (events, rx) = mpsc::unbounded_channel();
        let job = Job { prompt, params, enqueued: Instant::now(), events };
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::Overloaded(format!(
                "model {} has {} requests queued",
                self.info.name,
                self.jobs.max_capacity()
            )),
            mpsc::error::TrySendError::Closed(_) => {
                EngineError::Runtime(format!("engine for {} has stopped", self.info.name))
            }
        })?;
        Ok(GenerationStream { rx, finished: false })
    }

    pub async fn generate(&self, prompt: String, params: SamplingParams) -> Result<(String, Finish)> {
        self.submit(prompt, params)?.collect().await
    }

    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        match self.chat_template.as_ref() {
            Some(t) => t.render(messages),
            None => Err(EngineError::InvalidParams(format!("model {} has no chat template", self.info.name))),
        }
    }

    /// Requests queued or running right now.
    pub fn queued(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
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
    queue_depth: usize,
) -> Result<EngineHandle> {
    let ckpt = &pooled.ckpt;
    let started = Instant::now();
    let dtype = compute_dtype(device);
    let tensors = pooled.load_tensors(device, dtype)?;
    let h2d = started.elapsed();

    let started = Instant::now();
    let model = LoadedModel::from_var_builder(ckpt, VarBuilder::from_tensors(tensors, dtype, device), device)?;
    let load = LoadBreakdown {
        pool_hit,
        admit: if pool_hit { Duration::ZERO } else { pooled.admit_time },
        h2d,
        init: started.elapsed(),
    };
    let info = ModelInfo {
        name: name.to_string(),
        arch: ckpt.arch,
        weight_bytes: ckpt.weight_bytes,
        max_positions: model.max_positions,
        load,
    };
    let (tokenizer, chat_template) = (pooled.tokenizer.clone(), pooled.chat_template.clone());
    spawn_engine(info, model, tokenizer, ckpt.eos_token_ids.clone(), chat_template, queue_depth)
}

/// Starts the actor thread around an already-built model.
pub fn spawn_engine(
    info: ModelInfo,
    mut model: LoadedModel,
    tokenizer: Arc<Tokenizer>,
    eos: BTreeSet<u32>,
    chat_template: Arc<Option<ChatTemplate>>,
    queue_depth: usize,
) -> Result<EngineHandle> {
    let (jobs, mut rx) = mpsc::channel::<Job>(queue_depth.max(1));
    let thread_name = format!("engine-{}", info.name);
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            while let Some(job) = rx.blocking_recv() {
                if job.events.is_closed() {
                    continue; // the caller gave up while queued
                }
                let queued = job.enqueued.elapsed();
                let events = job.events.clone();
                let result = generate(&mut model, &tokenizer, &eos, &job.prompt, &job.params, |text| {
                    match events.send(Ok(StreamItem::Text(text))) {
                        Ok(()) => Flow::Continue,
                        Err(_) => Flow::Stop,
                    }
                });
                let _ = job.events.send(result.map(|mut finish| {
                    finish.timing.queue = queued;
                    StreamItem::Done(finish)
                }));
            }
        })
        .map_err(|e| EngineError::Load(format!("cannot start engine thread: {e}")))?;
    let epoch = Instant::now();
    Ok(EngineHandle { jobs, info: Arc::new(info), chat_template, last_used: Arc::new(AtomicU64::new(0)), epoch })
}
