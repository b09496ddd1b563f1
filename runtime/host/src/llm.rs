//! The `kindling:llm/llm` host capability: what a handler may load and how generation reaches
//! the model side (a `ModelBackend`). Domain errors (a model the manifest does not allow, an
//! overloaded engine) go back to the guest as `llm.error`; only host bugs (a stale resource
//! handle) trap.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{HasData, Resource, ResourceTable};

use crate::backend::{
    ColdStart, Finished, Generation, GenerationParams, LlmFailure, LoadedModel, ModelBackend, Piece, StopReason,
    TokenUsage,
};
use crate::bindings::llm;

/// A model handle given to the guest.
pub struct ModelResource {
    model: Arc<dyn LoadedModel>,
}

/// A generation the guest pulls from. Its slots in the invocation's and the deployment's
/// generation limits are held until the guest drops it.
pub struct TokenStreamResource {
    stream: Box<dyn Generation>,
    finish: Option<Finished>,
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
    fn record(&mut self, finish: &Finished) {
        self.prompt_tokens += u64::from(finish.usage.prompt_tokens);
        self.completion_tokens += u64::from(finish.usage.completion_tokens);
        self.generations += 1;
        self.first_token.get_or_insert(finish.first_token);
    }
}

/// Per-invocation state of the capability.
pub struct LlmCtx {
    backend: Arc<dyn ModelBackend>,
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
        backend: Arc<dyn ModelBackend>,
        allowed: Arc<BTreeSet<String>>,
        max_tokens: u32,
        share: GenerationShare,
    ) -> Self {
        let invocation_slots = Arc::new(Semaphore::new(MAX_GENERATIONS_PER_INVOCATION));
        Self { backend, allowed, max_tokens, share, invocation_slots, report: Default::default() }
    }

    /// A new context with the same deployment settings, its own slots and report.
    pub fn fresh(&self) -> Self {
        Self::new(self.backend.clone(), self.allowed.clone(), self.max_tokens, self.share.clone())
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

    fn params(&self, p: llm::Params) -> GenerationParams {
        GenerationParams {
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

fn to_wit(err: LlmFailure) -> llm::Error {
    match err {
        LlmFailure::ModelNotFound(m) => llm::Error::ModelNotFound(m),
        LlmFailure::InvalidParams(m) => llm::Error::InvalidParams(m),
        LlmFailure::PromptTooLong(m) => llm::Error::PromptTooLong(m),
        LlmFailure::Overloaded(m) => llm::Error::Overloaded(m),
        LlmFailure::Runtime(m) => llm::Error::RuntimeError(m),
    }
}

fn finish_to_wit(finish: &Finished) -> (llm::FinishReason, llm::Usage) {
    let reason = match finish.reason {
        StopReason::Stop => llm::FinishReason::Stop,
        StopReason::Length => llm::FinishReason::Length,
    };
    let TokenUsage { prompt_tokens, completion_tokens } = finish.usage;
    (reason, llm::Usage { prompt_tokens, completion_tokens })
}

/// Pulls a generation to its end.
async fn collect(mut generation: Box<dyn Generation>) -> Result<(String, Finished), LlmFailure> {
    let mut text = String::new();
    loop {
        match generation.next().await {
            Some(Ok(Piece::Text(t))) => text.push_str(&t),
            Some(Ok(Piece::Done(finish))) => return Ok((text, finish)),
            Some(Err(e)) => return Err(e),
            None => return Err(LlmFailure::Runtime("the generation ended without finishing".into())),
        }
    }
}

/// Submits on a blocking thread: tokenizing a prompt of up to the engine's byte ceiling (hundreds
/// of kilobytes for long contexts) must not stall the async executor the other guests run on.
async fn submit(
    model: Arc<dyn LoadedModel>,
    group: Arc<str>,
    prompt: String,
    params: GenerationParams,
) -> wasmtime::Result<Result<Box<dyn Generation>, LlmFailure>> {
    tokio::task::spawn_blocking(move || model.submit(group, prompt, params))
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
        let loaded = match self.ctx.backend.load(&name).await {
            Ok(l) => l,
            Err(e) => return Ok(Err(to_wit(e))),
        };
        if let Some(cold) = loaded.cold_start {
            self.ctx.report.lock().expect("poisoned").cold_starts.push((name, cold));
        }
        Ok(Ok(self.table.push(ModelResource { model: loaded.model })?))
    }
}

impl llm::HostModel for LlmView<'_> {
    async fn name(&mut self, model: Resource<ModelResource>) -> wasmtime::Result<String> {
        Ok(self.table.get(&model)?.model.name().to_string())
    }

    async fn generate(
        &mut self,
        model: Resource<ModelResource>,
        prompt: String,
        params: llm::Params,
    ) -> wasmtime::Result<Result<llm::Completion, llm::Error>> {
        let params = self.ctx.params(params);
        let loaded = self.table.get(&model)?.model.clone();
        let _slots = match self.ctx.slots() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let generated = match submit(loaded, self.ctx.share.group.clone(), prompt, params).await? {
            Ok(generation) => collect(generation).await,
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
        let loaded = self.table.get(&model)?.model.clone();
        let slots = match self.ctx.slots() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        match submit(loaded, self.ctx.share.group.clone(), prompt, params).await? {
            Ok(stream) => {
                let resource = TokenStreamResource { stream, finish: None, _slots: slots };
                Ok(Ok(self.table.push(resource)?))
            }
            Err(e) => Ok(Err(to_wit(e))),
        }
    }

    async fn apply_chat_template(
        &mut self,
        model: Resource<ModelResource>,
        messages: Vec<llm::Message>,
    ) -> wasmtime::Result<Result<String, llm::Error>> {
        let messages: Vec<(String, String)> = messages.into_iter().map(|m| (m.role, m.content)).collect();
        Ok(self.table.get(&model)?.model.apply_chat_template(&messages).map_err(to_wit))
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
        // `Generation::next` answers `None` after `Done` or an error, so a finished stream stays so.
        let s = self.table.get_mut(&stream)?;
        match s.stream.next().await {
            Some(Ok(Piece::Text(text))) => Ok(Ok(Some(text))),
            Some(Ok(Piece::Done(finish))) => {
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::backend::{BoxFuture, LoadPhases, Loaded};
    use llm::{Host, HostModel, HostTokenStream};

    /// A model side that generates "a b c" and records what it was asked.
    #[derive(Default)]
    struct Fake {
        submitted: Mutex<Vec<(String, GenerationParams)>>,
        loads: Mutex<u32>,
    }

    struct FakeModel(Arc<Fake>);
    struct FakeGeneration(Vec<Piece>);

    impl ModelBackend for Arc<Fake> {
        fn load<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Loaded, LlmFailure>> {
            Box::pin(async move {
                if name == "missing" {
                    return Err(LlmFailure::ModelNotFound(name.into()));
                }
                let mut loads = self.loads.lock().unwrap();
                *loads += 1;
                let cold_start =
                    (*loads == 1).then(|| ColdStart { waited: Duration::from_millis(3), load: LoadPhases::default() });
                Ok(Loaded { model: Arc::new(FakeModel(self.clone())), cold_start })
            })
        }
    }

    impl LoadedModel for FakeModel {
        fn name(&self) -> &str {
            "fake"
        }
        fn submit(
            &self,
            group: Arc<str>,
            prompt: String,
            params: GenerationParams,
        ) -> Result<Box<dyn Generation>, LlmFailure> {
            if prompt.len() > 100 {
                return Err(LlmFailure::PromptTooLong(format!("{} bytes", prompt.len())));
            }
            self.0.submitted.lock().unwrap().push((group.to_string(), params));
            let usage = TokenUsage { prompt_tokens: 1, completion_tokens: 3 };
            let done = Finished { reason: StopReason::Length, usage, first_token: Duration::from_millis(2) };
            let pieces = ["a", " b", " c"].iter().map(|t| Piece::Text(t.to_string())).chain([Piece::Done(done)]);
            Ok(Box::new(FakeGeneration(pieces.rev().collect())))
        }
        fn apply_chat_template(&self, messages: &[(String, String)]) -> Result<String, LlmFailure> {
            Ok(messages.iter().map(|(r, c)| format!("<{r}>{c}")).collect())
        }
    }

    impl Generation for FakeGeneration {
        fn next(&mut self) -> BoxFuture<'_, Option<Result<Piece, LlmFailure>>> {
            Box::pin(async move { self.0.pop().map(Ok) })
        }
    }

    fn ctx(fake: &Arc<Fake>, share: &GenerationShare) -> LlmCtx {
        let allowed = Arc::new(["fake".to_string(), "missing".to_string()].into_iter().collect());
        LlmCtx::new(Arc::new(fake.clone()), allowed, 8, share.clone())
    }

    fn params(max_tokens: u32) -> llm::Params {
        llm::Params { max_tokens, temperature: 0.0, top_p: 1.0, seed: None, stop: Vec::new() }
    }

    #[tokio::test]
    async fn loads_only_allowed_models_and_reports_cold_starts_and_usage() {
        let fake = Arc::new(Fake::default());
        let share = GenerationShare::new("dep", 4);
        let (mut ctx, mut table) = (ctx(&fake, &share), ResourceTable::new());
        let mut view = LlmView { ctx: &mut ctx, table: &mut table };
        assert!(matches!(view.load("other".into()).await.unwrap(), Err(llm::Error::ModelNotAllowed(_))));
        assert!(matches!(view.load("missing".into()).await.unwrap(), Err(llm::Error::ModelNotFound(_))));
        assert_eq!(*fake.loads.lock().unwrap(), 0, "refused before the backend was asked");
        let model = view.load("fake".into()).await.unwrap().unwrap();
        let done = view.generate(Resource::new_borrow(model.rep()), "hi".into(), params(1000)).await.unwrap().unwrap();
        assert_eq!((done.text.as_str(), done.usage.completion_tokens), ("a b c", 3));
        assert!(matches!(done.finish_reason, llm::FinishReason::Length));
        let submitted = fake.submitted.lock().unwrap().clone();
        assert_eq!(
            (submitted[0].0.as_str(), submitted[0].1.max_tokens),
            ("dep", 8),
            "capped at the deployment's max_tokens"
        );
        let too_long = view.generate(Resource::new_borrow(model.rep()), "x".repeat(200), params(4)).await.unwrap();
        assert!(matches!(too_long, Err(llm::Error::PromptTooLong(_))));
        let chat = vec![llm::Message { role: "user".into(), content: "hi".into() }];
        let rendered = view.apply_chat_template(Resource::new_borrow(model.rep()), chat).await.unwrap().unwrap();
        assert_eq!(rendered, "<user>hi");
        let report = ctx.report.lock().unwrap().clone();
        assert_eq!((report.generations, report.completion_tokens, report.cold_starts.len()), (1, 3, 1));
        assert_eq!(share.in_flight(), 0, "a finished whole generation gives its slot back");
    }

    #[tokio::test]
    async fn open_streams_are_capped_per_invocation_and_per_deployment() {
        let fake = Arc::new(Fake::default());
        let wide = GenerationShare::new("wide", 100);
        let (mut ctx1, mut table) = (ctx(&fake, &wide), ResourceTable::new());
        let mut view = LlmView { ctx: &mut ctx1, table: &mut table };
        let model = view.load("fake".into()).await.unwrap().unwrap();
        let mut streams = Vec::new();
        for _ in 0..MAX_GENERATIONS_PER_INVOCATION {
            streams.push(
                view.generate_stream(Resource::new_borrow(model.rep()), "hi".into(), params(4)).await.unwrap().unwrap(),
            );
        }
        let refused = view.generate_stream(Resource::new_borrow(model.rep()), "hi".into(), params(4)).await.unwrap();
        assert!(matches!(refused, Err(llm::Error::Overloaded(m)) if m.contains("this invocation")));
        // Reading one to its end and dropping it frees its slot.
        let first = streams.remove(0);
        let mut text = String::new();
        while let Some(piece) = view.next(Resource::new_borrow(first.rep())).await.unwrap().unwrap() {
            text.push_str(&piece);
        }
        assert_eq!(text, "a b c");
        assert!(view.next(Resource::new_borrow(first.rep())).await.unwrap().unwrap().is_none(), "ended stays ended");
        HostTokenStream::drop(&mut view, first).await.unwrap();
        assert!(view.generate_stream(Resource::new_borrow(model.rep()), "hi".into(), params(4)).await.unwrap().is_ok());

        // A deployment's share spans its invocations.
        let narrow = GenerationShare::new("narrow", 2);
        let (mut a, mut b) = (ctx(&fake, &narrow), ctx(&fake, &narrow));
        let (mut ta, mut tb) = (ResourceTable::new(), ResourceTable::new());
        let mut va = LlmView { ctx: &mut a, table: &mut ta };
        let ma = va.load("fake".into()).await.unwrap().unwrap();
        let _s1 = va.generate_stream(Resource::new_borrow(ma.rep()), "hi".into(), params(4)).await.unwrap().unwrap();
        let _s2 = va.generate_stream(Resource::new_borrow(ma.rep()), "hi".into(), params(4)).await.unwrap().unwrap();
        let mut vb = LlmView { ctx: &mut b, table: &mut tb };
        let mb = vb.load("fake".into()).await.unwrap().unwrap();
        let refused = vb.generate_stream(Resource::new_borrow(mb.rep()), "hi".into(), params(4)).await.unwrap();
        assert!(matches!(refused, Err(llm::Error::Overloaded(m)) if m.contains("max_generations")));
        assert_eq!(narrow.in_flight(), 2);
    }
}
