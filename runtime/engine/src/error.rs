//! The errors a caller of the engine can act on. Each maps 1:1 onto the WIT `llm.error` variant.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("model not found: {0}")]
    ModelNotFound(String),
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    #[error("prompt too long: {0}")]
    PromptTooLong(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The checkpoint could not be loaded (corrupt file, shapes that do not match the config...).
    #[error("model failed to load: {0}")]
    Load(String),
    /// Generation failed after the model loaded.
    #[error("generation failed: {0}")]
    Runtime(String),
}

impl EngineError {
    pub fn load(err: impl fmt::Display) -> Self {
        Self::Load(err.to_string())
    }

    pub fn runtime(err: impl fmt::Display) -> Self {
        Self::Runtime(err.to_string())
    }
}

impl From<kindling_network::NetworkError> for EngineError {
    fn from(err: kindling_network::NetworkError) -> Self {
        match err {
            kindling_network::NetworkError::Load(e) => Self::Load(e),
            kindling_network::NetworkError::Runtime(e) => Self::Runtime(e),
        }
    }
}

impl From<kindling_checkpoint::CheckpointError> for EngineError {
    fn from(err: kindling_checkpoint::CheckpointError) -> Self {
        match err {
            kindling_checkpoint::CheckpointError::Load(e) => Self::Load(e),
            kindling_checkpoint::CheckpointError::InvalidParams(e) => Self::InvalidParams(e),
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
