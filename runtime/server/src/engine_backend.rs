//! The engine as the host sees it: `kindling-host`'s narrow `ModelBackend` over the model
//! registry, so the Wasm host needs neither candle nor any engine type.

use std::sync::Arc;

use kindling_engine::{
    ChatMessage, EngineError, EngineHandle, FinishReason, GenerationStream, ModelRegistry, SamplingParams, StreamItem,
};
use kindling_host::backend::{
    BoxFuture, ColdStart, Finished, Generation, GenerationParams, LlmFailure, LoadPhases, Loaded, LoadedModel,
    ModelBackend, Piece, StopReason, TokenUsage,
};

pub struct EngineBackend(pub Arc<ModelRegistry>);

struct EngineModel(EngineHandle);

struct EngineGeneration(GenerationStream);

fn failure(e: EngineError) -> LlmFailure {
    match e {
        EngineError::ModelNotFound(m) => LlmFailure::ModelNotFound(m),
        EngineError::InvalidParams(m) => LlmFailure::InvalidParams(m),
        EngineError::PromptTooLong(m) => LlmFailure::PromptTooLong(m),
        EngineError::Overloaded(m) => LlmFailure::Overloaded(m),
        e @ (EngineError::Load(_) | EngineError::Runtime(_)) => LlmFailure::Runtime(e.to_string()),
    }
}

impl ModelBackend for EngineBackend {
    fn load<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Loaded, LlmFailure>> {
        Box::pin(async move {
            let acquired = self.0.acquire(name).await.map_err(failure)?;
            let cold_start = acquired.cold_start.map(|c| ColdStart {
                waited: c.waited,
                load: LoadPhases {
                    pool_hit: c.load.pool_hit,
                    woke: c.load.woke,
                    admit: c.load.admit,
                    h2d: c.load.h2d,
                    init: c.load.init,
                },
            });
            Ok(Loaded { model: Arc::new(EngineModel(acquired.engine)), cold_start })
        })
    }
}

impl LoadedModel for EngineModel {
    fn name(&self) -> &str {
        &self.0.info.name
    }

    fn submit(
        &self,
        group: Arc<str>,
        prompt: String,
        params: GenerationParams,
    ) -> Result<Box<dyn Generation>, LlmFailure> {
        let GenerationParams { max_tokens, temperature, top_p, seed, stop } = params;
        let params = SamplingParams { max_tokens, temperature, top_p, seed, stop };
        let stream = self.0.submit_for(group, prompt, params).map_err(failure)?;
        Ok(Box::new(EngineGeneration(stream)))
    }

    fn apply_chat_template(&self, messages: &[(String, String)]) -> Result<String, LlmFailure> {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|(role, content)| ChatMessage { role: role.clone(), content: content.clone() })
            .collect();
        self.0.apply_chat_template(&messages).map_err(failure)
    }
}

impl Generation for EngineGeneration {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Piece, LlmFailure>>> {
        Box::pin(async move {
            let item = self.0.next().await?;
            Some(match item {
                Ok(StreamItem::Text(t)) => Ok(Piece::Text(t)),
                Ok(StreamItem::Done(f)) => Ok(Piece::Done(Finished {
                    reason: match f.reason {
                        FinishReason::Stop => StopReason::Stop,
                        FinishReason::Length => StopReason::Length,
                    },
                    usage: TokenUsage {
                        prompt_tokens: f.usage.prompt_tokens,
                        completion_tokens: f.usage.completion_tokens,
                    },
                    first_token: f.timing.queue + f.timing.first_token,
                })),
                Err(e) => Err(failure(e)),
            })
        })
    }
}
