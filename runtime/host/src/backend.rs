//! What the host needs from the model side, and nothing more: load a model by name, submit a
//! prompt, pull its pieces. The engine implements it (an adapter in `kindling-server`); tests use
//! a fake, so this crate builds and is tested without candle or any weights.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A domain error from the model side; it goes back to the guest as `llm.error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmFailure {
    ModelNotFound(String),
    InvalidParams(String),
    PromptTooLong(String),
    Overloaded(String),
    /// Loading or generating failed.
    Runtime(String),
}

/// Sampling parameters as the host passes them on (already capped by the deployment).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// End of sequence or a stop string.
    Stop,
    /// The token budget ran out.
    Length,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    pub reason: StopReason,
    pub usage: TokenUsage,
    /// From submission to the first token (queueing included).
    pub first_token: Duration,
}

/// One item of a generation: a text piece, or the end.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Done(Finished),
}

/// Where a cold start's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadPhases {
    pub pool_hit: bool,
    /// Woken from sleep: the weights were still on the device.
    pub woke: bool,
    pub admit: Duration,
    pub h2d: Duration,
    pub init: Duration,
}

impl LoadPhases {
    /// Where the weights came from: "resident" (still on the device, asleep), "hit" (the
    /// checkpoint pool) or "miss" (disk).
    pub fn source(&self) -> &'static str {
        if self.woke {
            "resident"
        } else if self.pool_hit {
            "hit"
        } else {
            "miss"
        }
    }
}

/// A load that had to start the model: how long the caller waited and the load's phases.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ColdStart {
    pub waited: Duration,
    pub load: LoadPhases,
}

/// A model ready to generate, and the cold start it took when there was one.
pub struct Loaded {
    pub model: Arc<dyn LoadedModel>,
    pub cold_start: Option<ColdStart>,
}

/// The models a host may load.
pub trait ModelBackend: Send + Sync {
    /// The model called `name`, started when it has no engine. Waiting here is fine; holding a
    /// lock across a generation is not (generations run elsewhere and are pulled piece by piece).
    fn load<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Loaded, LlmFailure>>;
}

/// A loaded model. Held by a guest's resource: while held, the model counts as in use.
pub trait LoadedModel: Send + Sync {
    fn name(&self) -> &str;
    /// Queues a generation on behalf of `group` (the deployment). May block (tokenizing): the
    /// host calls it off the async executor.
    fn submit(
        &self,
        group: Arc<str>,
        prompt: String,
        params: GenerationParams,
    ) -> Result<Box<dyn Generation>, LlmFailure>;
    /// Renders `(role, content)` messages with the model's chat template.
    fn apply_chat_template(&self, messages: &[(String, String)]) -> Result<String, LlmFailure>;
}

/// A queued generation. Dropping it cancels the generation.
pub trait Generation: Send {
    /// The next piece; `None` after `Done` or an error.
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Piece, LlmFailure>>>;
}
