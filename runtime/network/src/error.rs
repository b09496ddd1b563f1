//! What can go wrong building or running a network. The engine maps these onto its own error
//! (`Load` and `Runtime` keep their meaning there).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// A config or a set of weights the network cannot be built from.
    #[error("model failed to load: {0}")]
    Load(String),
    /// A forward pass failed.
    #[error("generation failed: {0}")]
    Runtime(String),
}

impl NetworkError {
    pub fn load(err: impl fmt::Display) -> Self {
        Self::Load(err.to_string())
    }

    pub fn runtime(err: impl fmt::Display) -> Self {
        Self::Runtime(err.to_string())
    }
}

pub type Result<T, E = NetworkError> = std::result::Result<T, E>;
