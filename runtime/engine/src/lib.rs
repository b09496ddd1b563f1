//! Kindling's model engine: checkpoints, networks, sampling and the per-model engine actor.
//!
//! Invariant: this crate knows nothing of Wasm, HTTP or tenants; it serves named models to
//! whoever holds an `EngineHandle`.

pub mod autoscaler;
#[cfg(test)]
mod batching_tests;
pub mod chat_template;
pub mod checkpoint;
pub mod checkpoint_pool;
pub mod decode;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod kv_cache;
pub mod link;
pub mod network;
pub mod params;
pub mod registry;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod tiny_model;
pub mod worker;

pub use candle_core::Device;
pub use chat_template::ChatMessage;
pub use checkpoint::{Architecture, Checkpoint};
pub use checkpoint_pool::{CheckpointPool, PoolStats};
pub use engine::{EngineConfig, EngineHandle, EngineStats, GenerationStream, LoadBreakdown, ModelInfo, StreamItem};
pub use error::EngineError;
pub use params::SamplingParams;
pub use registry::{Acquired, ColdStart, ModelEntry, ModelRegistry};
pub use sequence::{Finish, FinishReason, GenerationTiming, Usage};
pub use worker::Worker;
