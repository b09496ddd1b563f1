//! Turning a growing list of token ids into text pieces that are safe to send: whole UTF-8
//! characters only, and nothing that might turn out to be the start of a stop string.

use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};

/// Incremental detokenizer (the prefix/read offset scheme HF's servers use): decoding a window
/// of recent tokens keeps byte-level BPE pieces that split a character from leaking U+FFFD.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self { ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds one token; returns the new text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(EngineError::runtime);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }
}

impl IncrementalDecoder {
    /// Whatever the last tokens decode to once no more will come, even an incomplete character
    /// (as U+FFFD, the way a full decode of the sequence shows it).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(EngineError::runtime);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

/// Holds back text that could be the beginning of a stop string.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What to send after feeding a piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Send this text (may be empty) and keep going.
    Continue(String),
    /// A stop string matched: send this text, then finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, held: String::new() }
    }

    pub fn feed(&mut self, text: &str) -> StopOutcome {
        self.held.push_str(text);
        let first_match = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first_match {
            let out = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome::Stopped(out);
        }
        // Only a suffix of `held` can still grow into a stop string: keep the longest such suffix.
        let keep = self.stops.iter().map(|s| longest_suffix_prefix(&self.held, s)).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// The held-back text, when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on char boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.is_char_boundary(n) && text[start..] == stop[..n]
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.feed(p) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_caught_and_not_emitted() {
        assert_eq!(run(&["END"], &["hello E", "N", "D world"]), ("hello ".into(), true));
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        assert_eq!(run(&["END"], &["a E", "N", "x"]), ("a ENx".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn multibyte_text_is_not_split() {
        assert_eq!(run(&["é!"], &["café", " ok"]), ("café ok".into(), false));
    }
}
