//! One generation: tokenize, prefill, sample token by token, detokenize, stop.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokenizers::Tokenizer;

use crate::decode::{IncrementalDecoder, StopMatcher, StopOutcome};
use crate::error::{EngineError, Result};
use crate::model::LoadedModel;
use crate::params::SamplingParams;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct GenerationTiming {
    /// Time spent waiting in the engine's queue before this generation started.
    pub queue: Duration,
    /// From the start of the generation to the first sampled token (tokenize + prefill + sample).
    pub first_token: Duration,
    pub total: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Finish {
    pub reason: FinishReason,
    pub usage: Usage,
    pub timing: GenerationTiming,
}

/// Whether the consumer still wants tokens; `Stop` aborts the generation early.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

fn sampler(params: &SamplingParams) -> LogitsProcessor {
    let seed = params.seed.unwrap_or_else(rand::random);
    let temperature = f64::from(params.temperature);
    let sampling = if params.temperature == 0.0 {
        Sampling::ArgMax
    } else if params.top_p < 1.0 {
        Sampling::TopP { p: f64::from(params.top_p), temperature }
    } else {
        Sampling::All { temperature }
    };
    LogitsProcessor::from_sampling(seed, sampling)
}

/// Runs one generation to completion, handing each safe-to-send text piece to `emit`.
pub fn generate(
    model: &mut LoadedModel,
    tokenizer: &Tokenizer,
    eos: &BTreeSet<u32>,
    prompt: &str,
    params: &SamplingParams,
    mut emit: impl FnMut(String) -> Flow,
) -> Result<Finish> {
    let started = Instant::now();
    params.validate()?;
    let encoding = tokenizer.encode(prompt, true).map_err(EngineError::runtime)?;
    let prompt_ids = encoding.get_ids().to_vec();
    if prompt_ids.is_empty() {
        return Err(EngineError::InvalidParams("prompt is empty".into()));
    }
    if prompt_ids.len() >= model.max_positions {
        return Err(EngineError::PromptTooLong(format!(
            "prompt has {} tokens; the model's context is {} tokens",
            prompt_ids.len(),
            model.max_positions
        )));
    }
    let budget = (params.max_tokens as usize).min(model.max_positions - prompt_ids.len());

    let mut sampler = sampler(params);
    let mut decoder = IncrementalDecoder::new();
    let mut stops = StopMatcher::new(params.stop.clone());
    let mut usage = Usage { prompt_tokens: prompt_ids.len() as u32, completion_tokens: 0 };
    let mut timing = GenerationTiming::default();

    model.begin_sequence();
    let mut logits = model.forward(&prompt_ids, 0)?;
    let mut pos = prompt_ids.len();
    // `None` while generating; the reason once the model or a stop string ended the text.
    let mut ended: Option<FinishReason> = None;
    let mut stopped_text = false;
    while ended.is_none() {
        let next = sampler.sample(&logits).map_err(EngineError::runtime)?;
        if usage.completion_tokens == 0 {
            timing.first_token = started.elapsed();
        }
        if eos.contains(&next) {
            ended = Some(FinishReason::Stop);
            break;
        }
        usage.completion_tokens += 1;
        let piece = decoder.push(tokenizer, next)?;
        let text = match stops.feed(&piece) {
            StopOutcome::Continue(t) => t,
            StopOutcome::Stopped(t) => {
                (ended, stopped_text) = (Some(FinishReason::Stop), true);
                t
            }
        };
        if !text.is_empty() && emit(text) == Flow::Stop {
            return Err(EngineError::Runtime("generation cancelled: the caller went away".into()));
        }
        if ended.is_none() && usage.completion_tokens as usize >= budget {
            ended = Some(FinishReason::Length);
        }
        if ended.is_none() {
            logits = model.forward(&[next], pos)?;
            pos += 1;
        }
    }
    let mut reason = ended.expect("loop ends with a reason");
    if !stopped_text {
        // The bytes of an unfinished character, then whatever the stop matcher held back.
        let tail = decoder.finish(tokenizer)?;
        let mut out = match stops.feed(&tail) {
            StopOutcome::Continue(t) => t,
            StopOutcome::Stopped(t) => {
                reason = FinishReason::Stop;
                t
            }
        };
        out.push_str(&stops.flush());
        if !out.is_empty() {
            emit(out);
        }
    }
    timing.total = started.elapsed();
    Ok(Finish { reason, usage, timing })
}
