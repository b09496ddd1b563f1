//! Sampling parameters and their validation.

use crate::error::{EngineError, Result};

/// How to sample one generation. `temperature == 0` is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { max_tokens: 64, temperature: 0.0, top_p: 1.0, seed: None, stop: Vec::new() }
    }
}

/// Upper bounds that keep one request from monopolising an engine.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_STRING_BYTES: usize = 256;

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(EngineError::InvalidParams(msg));
        if self.max_tokens == 0 {
            return bad("max-tokens must be at least 1".into());
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return bad(format!("at most {MAX_STOP_STRINGS} stop strings, got {}", self.stop.len()));
        }
        if let Some(s) = self.stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_STRING_BYTES) {
            return bad(format!("stop strings must be 1..={MAX_STOP_STRING_BYTES} bytes, got {} bytes", s.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SamplingParams::default().validate().unwrap();
    }

    #[test]
    fn rejects_out_of_range_values() {
        let cases = [
            SamplingParams { max_tokens: 0, ..Default::default() },
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.5, ..Default::default() },
            SamplingParams { stop: vec![String::new()], ..Default::default() },
            SamplingParams { stop: vec!["x".into(); 17], ..Default::default() },
        ];
        for params in cases {
            let err = params.validate().unwrap_err();
            assert!(matches!(err, EngineError::InvalidParams(_)), "{params:?} gave {err:?}");
        }
    }
}
