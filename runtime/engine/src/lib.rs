//! Kindling's model engine: checkpoints, networks, sampling and the per-model engine actor.
//!
//! Invariant: this crate knows nothing of Wasm, HTTP or tenants; it serves named models to
//! whoever holds an `EngineHandle`.

pub mod autoscaler;
pub mod chat_template;
pub mod checkpoint;
pub mod checkpoint_pool;
pub mod decode;
pub mod engine;
pub mod error;
pub mod generate;
pub mod model;
pub mod params;
pub mod registry;
pub mod tiny_model;
pub mod worker;

pub use candle_core::Device;
pub use chat_template::ChatMessage;
pub use checkpoint::{Architecture, Checkpoint};
pub use checkpoint_pool::{CheckpointPool, PoolStats};
pub use engine::{EngineHandle, GenerationStream, LoadBreakdown, ModelInfo, StreamItem};
pub use error::EngineError;
pub use generate::{Finish, FinishReason, GenerationTiming, Usage};
pub use params::SamplingParams;
pub use registry::{Acquired, ColdStart, ModelEntry, ModelRegistry};
pub use worker::Worker;
