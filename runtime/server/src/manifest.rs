//! The deployment manifest (`kindling.toml`): what a handler is called, which paths it serves,
//! which models it may use and the limits it runs under.

use std::collections::BTreeSet;
use std::time::Duration;

use kindling_host::HandlerLimits;
use serde::{Deserialize, Serialize};

/// Paths the server keeps for itself.
pub const RESERVED_PREFIXES: [&str; 3] = ["/admin", "/metrics", "/healthz"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Deployment name: 1-63 lowercase letters, digits and '-'.
    pub name: String,
    /// Path prefixes this handler serves, e.g. "/hello". Longest prefix wins across deployments.
    pub routes: Vec<String>,
    /// Registered model names the handler may `load`.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-clock budget per invocation.
    pub timeout_ms: u64,
    /// Cap on the handler's linear memory.
    pub memory_mb: u64,
    /// Invocations of this deployment running at once; more get 429.
    pub max_concurrency: u32,
    /// Cap on tokens per generation.
    pub max_tokens: u32,
    /// Largest request body accepted; larger gets 413.
    pub max_request_bytes: u64,
    /// Largest response body sent; the body is cut off past it.
    pub max_response_bytes: u64,
    /// Generations (whole or streamed) this deployment's invocations may have in flight together;
    /// more get `overloaded`, so one tenant cannot fill a shared model's queue.
    pub max_generations: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: 30_000,
            memory_mb: 256,
            max_concurrency: 32,
            max_tokens: 1024,
            max_request_bytes: 1 << 20,
            max_response_bytes: 16 << 20,
            max_generations: 64,
        }
    }
}

/// Hard ceilings an operator-independent manifest may not exceed.
pub const MAX_TIMEOUT_MS: u64 = 10 * 60 * 1000;
pub const MAX_MEMORY_MB: u64 = 4096;
pub const MAX_ROUTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid TOML for a Kindling manifest: {0}")]
    Parse(String),
    #[error("manifest: {0}")]
    Invalid(String),
}

pub fn validate_name(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ManifestError::Invalid(format!(
            "name {name:?} must be 1-63 characters of lowercase letters, digits and '-', not starting with '-'"
        )))
    }
}

fn validate_route(route: &str) -> Result<(), ManifestError> {
    let bad = |why: &str| Err(ManifestError::Invalid(format!("route {route:?} {why}")));
    if !route.starts_with('/') {
        return bad("must start with '/'");
    }
    if route.len() > 256 || route.contains(['?', '#', ' ', '*']) || route.contains("//") || route.contains("/../") {
        return bad("must be a plain path of at most 256 characters (no '?', '#', '*', spaces, '//' or '..')");
    }
    let normalized = route.trim_end_matches('/');
    if let Some(reserved) =
        RESERVED_PREFIXES.iter().find(|p| normalized == **p || normalized.starts_with(&format!("{p}/")))
    {
        return bad(&format!("is reserved by the server ({reserved})"));
    }
    Ok(())
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| ManifestError::Parse(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_name(&self.name)?;
        if self.routes.is_empty() {
            return Err(ManifestError::Invalid("routes must list at least one path".into()));
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(ManifestError::Invalid(format!("at most {MAX_ROUTES} routes")));
        }
        self.routes.iter().try_for_each(|r| validate_route(r))?;
        for model in &self.models {
            kindling_engine::registry::validate_model_name(model).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        }
        let l = &self.limits;
        let check = |ok: bool, msg: String| {
            if ok { Ok(()) } else { Err(ManifestError::Invalid(msg)) }
        };
        check((1..=MAX_TIMEOUT_MS).contains(&l.timeout_ms), format!("limits.timeout_ms must be 1..={MAX_TIMEOUT_MS}"))?;
        check((1..=MAX_MEMORY_MB).contains(&l.memory_mb), format!("limits.memory_mb must be 1..={MAX_MEMORY_MB}"))?;
        check(l.max_concurrency >= 1, "limits.max_concurrency must be at least 1".into())?;
        check(l.max_tokens >= 1, "limits.max_tokens must be at least 1".into())?;
        check(l.max_request_bytes >= 1, "limits.max_request_bytes must be at least 1".into())?;
        check(l.max_response_bytes >= 1, "limits.max_response_bytes must be at least 1".into())?;
        check(l.max_generations >= 1, "limits.max_generations must be at least 1".into())?;
        Ok(())
    }

    pub fn allowed_models(&self) -> BTreeSet<String> {
        self.models.iter().cloned().collect()
    }

    pub fn handler_limits(&self) -> HandlerLimits {
        HandlerLimits {
            timeout: Duration::from_millis(self.limits.timeout_ms),
            memory_bytes: (self.limits.memory_mb as usize) << 20,
            max_tokens: self.limits.max_tokens,
            ..HandlerLimits::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = Manifest::parse("name = \"hello\"\nroutes = [\"/hello\"]\nmodels = [\"tiny\"]\n").unwrap();
        assert_eq!(m.limits, Limits::default());
        assert_eq!(m.allowed_models().len(), 1);
    }

    #[test]
    fn rejects_bad_manifests_with_the_reason() {
        let cases = [
            ("routes = [\"/x\"]", "missing field `name`"),
            ("name = \"Hello\"\nroutes = [\"/x\"]", "lowercase"),
            ("name = \"a\"\nroutes = []", "at least one path"),
            ("name = \"a\"\nroutes = [\"x\"]", "must start with '/'"),
            ("name = \"a\"\nroutes = [\"/admin/x\"]", "reserved"),
            ("name = \"a\"\nroutes = [\"/x\"]\nmodles = []", "unknown field `modles`"),
            ("name = \"a\"\nroutes = [\"/x\"]\n[limits]\ntimeout_ms = 0", "timeout_ms"),
            ("name = \"a\"\nroutes = [\"/x\"]\nmodels = [\"../etc\"]", "model name"),
            ("this is not toml", "TOML"),
        ];
        for (text, expected) in cases {
            let err = Manifest::parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err:?} lacks {expected:?}");
        }
    }
}
