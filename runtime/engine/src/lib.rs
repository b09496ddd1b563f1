//! Kindling's model engine: warm workers, the continuous-batching scheduler, sampling, the
//! per-model engine actor and the registry that owns residency. The network it runs is
//! `kindling-network`; the checkpoints it loads and the pool they sit in are `kindling-checkpoint`.
//!
//! Invariant: this crate knows nothing of Wasm, HTTP or tenants; it serves named models to
//! whoever holds an `EngineHandle`.

pub mod autoscaler;
#[cfg(test)]
mod batching_tests;
pub mod decode;
pub mod engine;
pub mod error;
pub mod link;
pub mod params;
pub mod ranks;
pub mod registry;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod worker;

pub use candle_core::{DType, Device};
pub use chat_template::ChatMessage;
pub use checkpoint::{Architecture, Checkpoint};
pub use checkpoint_pool::{CheckpointPool, PoolStats};
pub use engine::{EngineConfig, EngineHandle, EngineStats, GenerationStream, LoadBreakdown, ModelInfo, StreamItem};
pub use error::EngineError;
/// The network (with its paged KV layout) and the checkpoints live in crates of their own; these
/// keep their engine paths.
pub use kindling_checkpoint::{chat_template, checkpoint, checkpoint_pool, direct_io, gguf, tiny_model};
pub use kindling_network::{self as network, kv_cache};
pub use params::SamplingParams;
pub use registry::{Acquired, ColdStart, ModelEntry, ModelRegistry};
pub use sequence::{Finish, FinishReason, GenerationTiming, Usage};
pub use worker::Worker;
