//! What can go wrong opening, reading or loading a checkpoint, or rendering its chat template.
//! The engine maps these onto its own error with the same meaning.

use std::fmt;

use kindling_network::NetworkError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The checkpoint could not be opened or loaded (a missing or corrupt file, shapes that do
    /// not match the config...).
    #[error("model failed to load: {0}")]
    Load(String),
    /// A request the checkpoint's chat template refuses (roles out of order...).
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
}

impl CheckpointError {
    pub fn load(err: impl fmt::Display) -> Self {
        Self::Load(err.to_string())
    }
}

/// Building a network is part of loading a checkpoint.
impl From<NetworkError> for CheckpointError {
    fn from(err: NetworkError) -> Self {
        match err {
            NetworkError::Load(e) | NetworkError::Runtime(e) => Self::Load(e),
        }
    }
}

pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
