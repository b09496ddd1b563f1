//! The `kindling:llm/llm` host capability: what a handler may load and how generation reaches
//! the engine actors. Domain errors (a model the manifest does not allow, an overloaded engine)
//! go back to the guest as `llm.error`; only host bugs (a stale resource handle) trap.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kindling_engine::{
    ChatMessage, ColdStart, EngineError, EngineHandle, Finish, FinishReason, GenerationStream, ModelRegistry,
    SamplingParams, StreamItem, Usage,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{HasData, Resource, ResourceTable};

use crate::bindings::llm;

/// A model handle given to the guest.
pub struct ModelResource {
    engine: EngineHandle,
}

/// A generation the guest pulls from. Its slots in the invocation's and the deployment's
/// generation limits are held until the guest drops it.
pub struct TokenStreamResource {
    stream: GenerationStream,
    finish: Option<Finish>,
    _slots: GenerationSlots,
}

/// Generations one invocation may have open at once (streams not yet dropped, plus a whole
/// `generate` while it runs): one request cannot queue hundreds of unread streams on a shared model.
pub const MAX_GENERATIONS_PER_INVOCATION: usize = 16;

/// A generation's place in its invocation's and its deployment's limits.
struct GenerationSlots {
    _invocation: OwnedSemaphorePermit,
    _deployment: OwnedSemaphorePermit,
}

/// A deployment's share of the models it uses: its name (the engine's scheduling group) and how
/// many generations its invocations may have in flight together.
#[derive(Clone)]
pub struct GenerationShare {
    pub group: Arc<str>,
    pub limit: usize,
    slots: Arc<Semaphore>,
}

impl GenerationShare {
    pub fn new(group: &str, limit: usize) -> Self {
        Self { group: Arc::from(group), limit, slots: Arc::new(Semaphore::new(limit)) }
    }

    /// Generations of this share in flight now.
    pub fn in_flight(&self) -> usize {
        self.limit - self.slots.available_permits()
    }
}

/// What the handler did with models during one invocation, for headers, metrics and billing.
#[derive(Debug, Default, Clone)]
pub struct LlmReport {
    pub cold_starts: Vec<(String, ColdStart)>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub generations: u32,
    /// Time from the first generation request to its first token, when one was made.
    pub first_token: Option<Duration>,
}

impl LlmReport {
    fn record(&mut self, finish: &Finish) {
        self.prompt_tokens += u64::from(finish.usage.prompt_tokens);
        self.completion_tokens += u64::from(finish.usage.completion_tokens);
        self.generations += 1;
        self.first_token.get_or_insert(finish.timing.queue + finish.timing.first_token);
    }
}

/// Per-invocation state of the capability.
pub struct LlmCtx {
    registry: Arc<ModelRegistry>,
    /// The models this deployment's manifest allows.
    allowed: Arc<BTreeSet<String>>,
    /// The deployment's cap on tokens per generation.
    max_tokens: u32,
    share: GenerationShare,
    invocation_slots: Arc<Semaphore>,
    pub report: Arc<std::sync::Mutex<LlmReport>>,
}

impl LlmCtx {
    pub fn new(
        registry: Arc<ModelRegistry>,
        allowed: Arc<BTreeSet<String>>,
        max_tokens: u32,
        share: GenerationShare,
    ) -> Self {
        let invocation_slots = Arc::new(Semaphore::new(MAX_GENERATIONS_PER_INVOCATION));
        Self { registry, allowed, max_tokens, share, invocation_slots, report: Default::default() }
    }

    /// Takes a generation slot, or says which limit is full (an `overloaded` error for the guest).
    fn slots(&self) -> Result<GenerationSlots, llm::Error> {
        let invocation = self.invocation_slots.clone().try_acquire_owned().map_err(|_| {
            llm::Error::Overloaded(format!(
                "this invocation has {MAX_GENERATIONS_PER_INVOCATION} generations open; finish or drop a stream first"
            ))
        })?;
        let deployment = self.share.slots.clone().try_acquire_owned().map_err(|_| {
            llm::Error::Overloaded(format!(
                "deployment {} has its limit of {} generations in flight (limits.max_generations)",
                self.share.group, self.share.limit
            ))
        })?;
        Ok(GenerationSlots { _invocation: invocation, _deployment: deployment })
    }

    fn params(&self, p: llm::Params) -> SamplingParams {
        SamplingParams {
            max_tokens: p.max_tokens.min(self.max_tokens),
            temperature: p.temperature,
            top_p: p.top_p,
            seed: p.seed,
            stop: p.stop,
        }
    }
}

/// The view the generated `Host` traits are implemented on (the wasmtime-wasi pattern).
pub struct LlmView<'a> {
    pub ctx: &'a mut LlmCtx,
    pub table: &'a mut ResourceTable,
}

/// Marker naming `LlmView` as the data `add_to_linker` hands to the host functions.
pub struct Llm;

impl HasData for Llm {
    type Data<'a> = LlmView<'a>;
}

fn to_wit(err: EngineError) -> llm::Error {
    match err {
        EngineError::ModelNotFound(m) => llm::Error::ModelNotFound(m),
        EngineError::InvalidParams(m) => llm::Error::InvalidParams(m),
        EngineError::PromptTooLong(m) => llm::Error::PromptTooLong(m),
        EngineError::Overloaded(m) => llm::Error::Overloaded(m),
        e @ (EngineError::Load(_) | EngineError::Runtime(_)) => llm::Error::RuntimeError(e.to_string()),
    }
}

fn finish_to_wit(finish: &Finish) -> (llm::FinishReason, llm::Usage) {
    let reason = match finish.reason {
        FinishReason::Stop => llm::FinishReason::Stop,
        FinishReason::Length => llm::FinishReason::Length,
    };
    let Usage { prompt_tokens, completion_tokens } = finish.usage;
    (reason, llm::Usage { prompt_tokens, completion_tokens })
}

/// Submits on a blocking thread: tokenizing a prompt of up to the engine's byte ceiling (hundreds
/// of kilobytes for long contexts) must not stall the async executor the other guests run on.
async fn submit(
    engine: EngineHandle,
    group: Arc<str>,
    prompt: String,
    params: kindling_engine::SamplingParams,
) -> wasmtime::Result<Result<GenerationStream, EngineError>> {
    tokio::task::spawn_blocking(move || engine.submit_for(group, prompt, params))
        .await
        .map_err(|e| wasmtime::Error::msg(format!("tokenizer task failed: {e}")))
}

impl llm::Host for LlmView<'_> {
    async fn load(&mut self, name: String) -> wasmtime::Result<Result<Resource<ModelResource>, llm::Error>> {
        if !self.ctx.allowed.contains(&name) {
            return Ok(Err(llm::Error::ModelNotAllowed(format!(
                "this deployment's manifest does not list model {name:?} (allowed: {:?})",
                self.ctx.allowed
            ))));
        }
        let acquired = match self.ctx.registry.acquire(&name).await {
            Ok(a) => a,
            Err(e) => return Ok(Err(to_wit(e))),
        };
        if let Some(cold) = acquired.cold_start {
            self.ctx.report.lock().expect("poisoned").cold_starts.push((name, cold));
        }
        Ok(Ok(self.table.push(ModelResource { engine: acquired.engine })?))
    }
}

impl llm::HostModel for LlmView<'_> {
    async fn name(&mut self, model: Resource<ModelResource>) -> wasmtime::Result<String> {
        Ok(self.table.get(&model)?.engine.info.name.clone())
    }

    async fn generate(
        &mut self,
        model: Resource<ModelResource>,
        prompt: String,
        params: llm::Params,
    ) -> wasmtime::Result<Result<llm::Completion, llm::Error>> {
        let params = self.ctx.params(params);
        let engine = self.table.get(&model)?.engine.clone();
        let _slots = match self.ctx.slots() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let generated = match submit(engine, self.ctx.share.group.clone(), prompt, params).await? {
            Ok(stream) => stream.collect().await,
            Err(e) => Err(e),
        };
        match generated {
            Ok((text, finish)) => {
                self.ctx.report.lock().expect("poisoned").record(&finish);
                let (finish_reason, usage) = finish_to_wit(&finish);
                Ok(Ok(llm::Completion { text, finish_reason, usage }))
            }
            Err(e) => Ok(Err(to_wit(e))),
        }
    }

    async fn generate_stream(
        &mut self,
        model: Resource<ModelResource>,
        prompt: String,
        params: llm::Params,
    ) -> wasmtime::Result<Result<Resource<TokenStreamResource>, llm::Error>> {
        let params = self.ctx.params(params);
        let engine = self.table.get(&model)?.engine.clone();
        let slots = match self.ctx.slots() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        match submit(engine, self.ctx.share.group.clone(), prompt, params).await? {
            Ok(stream) => Ok(Ok(self.table.push(TokenStreamResource { stream, finish: None, _slots: slots })?)),
            Err(e) => Ok(Err(to_wit(e))),
        }
    }

    async fn apply_chat_template(
        &mut self,
        model: Resource<ModelResource>,
        messages: Vec<llm::Message>,
    ) -> wasmtime::Result<Result<String, llm::Error>> {
        let messages: Vec<ChatMessage> =
            messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
        Ok(self.table.get(&model)?.engine.apply_chat_template(&messages).map_err(to_wit))
    }

    async fn drop(&mut self, model: Resource<ModelResource>) -> wasmtime::Result<()> {
        self.table.delete(model)?;
        Ok(())
    }
}

impl llm::HostTokenStream for LlmView<'_> {
    async fn next(
        &mut self,
        stream: Resource<TokenStreamResource>,
    ) -> wasmtime::Result<Result<Option<String>, llm::Error>> {
        let s = self.table.get_mut(&stream)?;
        match s.stream.next().await {
            Some(Ok(StreamItem::Text(text))) => Ok(Ok(Some(text))),
            Some(Ok(StreamItem::Done(finish))) => {
                s.finish = Some(finish);
                self.ctx.report.lock().expect("poisoned").record(&finish);
                Ok(Ok(None))
            }
            Some(Err(e)) => Ok(Err(to_wit(e))),
            None => Ok(Ok(None)),
        }
    }

    async fn finish(
        &mut self,
        stream: Resource<TokenStreamResource>,
    ) -> wasmtime::Result<Option<(llm::FinishReason, llm::Usage)>> {
        Ok(self.table.get(&stream)?.finish.as_ref().map(finish_to_wit))
    }

    async fn drop(&mut self, stream: Resource<TokenStreamResource>) -> wasmtime::Result<()> {
        self.table.delete(stream)?;
        Ok(())
    }
}

/// Adds `kindling:llm/llm` to a linker whose store data can lend an `LlmView`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    view: fn(&mut T) -> LlmView<'_>,
) -> wasmtime::Result<()> {
    llm::add_to_linker::<T, Llm>(linker, view)
}
