//! Kindling's checkpoints: what a model is on disk and how its bytes reach a device.
//!
//! Invariant: this crate knows nothing of scheduling, engines or serving. It opens checkpoints
//! (checked against `kindling-network`'s architecture table before anything loads), keeps their
//! bytes in the pool, and hands named tensors on a device to whoever builds the network.

pub mod chat_template;
pub mod checkpoint;
pub mod checkpoint_pool;
pub mod direct_io;
pub mod error;
pub mod gguf;
pub mod tiny_model;

pub use chat_template::ChatMessage;
pub use checkpoint::{Architecture, Checkpoint};
pub use checkpoint_pool::{CheckpointPool, HostPinner, HostRange, PoolStats};
pub use error::CheckpointError;
/// The network crate, under the name this crate's modules use for it.
use kindling_network as network;
