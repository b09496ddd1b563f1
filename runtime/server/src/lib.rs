//! Kindling's HTTP front door: invocation routing, the admin API, deployments and their store.
//!
//! Invariant: this crate never touches wasmtime or candle types directly; it drives handlers
//! through `kindling-host` and models through `kindling-engine`'s registry.

pub mod admin;
pub mod app;
pub mod body;
pub mod engine_backend;
pub mod error_code;
pub mod http_util;
pub mod invoke;
pub mod manifest;
pub mod metrics;
pub mod server;
pub mod store;
pub mod tenant;

pub use app::{App, ServerConfig};
pub use manifest::Manifest;
pub use server::serve;
