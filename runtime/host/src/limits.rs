//! Per-deployment resource limits enforced on every invocation.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct HandlerLimits {
    /// Wall-clock budget for the whole invocation, guest code and host calls alike.
    pub timeout: Duration,
    /// Cap on each linear memory of the instance.
    pub memory_bytes: usize,
    /// Cap on each table of the instance.
    pub table_elements: usize,
    /// Cap on tokens per generation, whatever the guest asks for.
    pub max_tokens: u32,
}

impl Default for HandlerLimits {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(30), memory_bytes: 256 << 20, table_elements: 100_000, max_tokens: 1024 }
    }
}
