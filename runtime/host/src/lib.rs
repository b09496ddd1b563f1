//! Kindling's Wasm component host.
//!
//! Invariant: this crate owns every `bindgen!` and everything wasmtime; it knows deployments only
//! as bytes plus `HandlerLimits`, and HTTP only as the requests it hands to handlers.

pub mod backend;
pub mod bindings;
pub mod component_cache;
pub mod limits;
pub mod llm;
pub mod runtime;
pub mod state;
mod warm;

pub use limits::HandlerLimits;
pub use llm::{LlmCtx, LlmReport};
pub use runtime::{
    HandlerRuntime, Invocation, InvokeError, InvokeTiming, PrepareError, PreparedHandler, RuntimeConfig,
};
pub use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
