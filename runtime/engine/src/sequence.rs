//! One generation's output side: turning sampled tokens into text pieces that are safe to send,
//! and deciding when it ends (end-of-sequence token, stop string, token budget).

use std::collections::BTreeSet;
use std::time::Duration;

use tokenizers::Tokenizer;

use crate::decode::{IncrementalDecoder, StopMatcher, StopOutcome};
use crate::error::Result;

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
    /// From submission until the sequence first ran in a step.
    pub queue: Duration,
    /// From its first step to its first sampled token (prefill, possibly over several steps).
    pub first_token: Duration,
    /// From its first step to its end.
    pub total: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Finish {
    pub reason: FinishReason,
    pub usage: Usage,
    pub timing: GenerationTiming,
}

/// What one sampled token did to the output.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Send this text (may be empty) and keep generating.
    Continue(String),
    /// Send this text (may be empty), then the generation is over.
    Finished(String, FinishReason),
}

pub struct SequenceOutput {
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// Completion tokens allowed (the request's max-tokens, cut to what the context leaves).
    budget: usize,
    pub usage: Usage,
}

impl SequenceOutput {
    pub fn new(prompt_tokens: usize, budget: usize, stops: Vec<String>) -> Self {
        Self {
            decoder: IncrementalDecoder::new(),
            stops: StopMatcher::new(stops),
            budget,
            usage: Usage { prompt_tokens: prompt_tokens as u32, completion_tokens: 0 },
        }
    }

    /// Takes the next sampled token.
    pub fn accept(&mut self, token: u32, tokenizer: &Tokenizer, eos: &BTreeSet<u32>) -> Result<Accepted> {
        if eos.contains(&token) {
            return self.finish(tokenizer, FinishReason::Stop);
        }
        self.usage.completion_tokens += 1;
        let piece = self.decoder.push(tokenizer, token)?;
        match self.stops.feed(&piece) {
            StopOutcome::Stopped(text) => Ok(Accepted::Finished(text, FinishReason::Stop)),
            StopOutcome::Continue(text) if self.usage.completion_tokens as usize >= self.budget => {
                match self.finish(tokenizer, FinishReason::Length)? {
                    Accepted::Finished(tail, reason) => Ok(Accepted::Finished(text + &tail, reason)),
                    Accepted::Continue(_) => unreachable!("finish always finishes"),
                }
            }
            StopOutcome::Continue(text) => Ok(Accepted::Continue(text)),
        }
    }

    /// Ends the text: the bytes of an unfinished character, then whatever the stop matcher held
    /// back (a stop string may still complete in that tail).
    fn finish(&mut self, tokenizer: &Tokenizer, reason: FinishReason) -> Result<Accepted> {
        let tail = self.decoder.finish(tokenizer)?;
        Ok(match self.stops.feed(&tail) {
            StopOutcome::Stopped(text) => Accepted::Finished(text, FinishReason::Stop),
            StopOutcome::Continue(mut text) => {
                text.push_str(&self.stops.flush());
                Accepted::Finished(text, reason)
            }
        })
    }
}
