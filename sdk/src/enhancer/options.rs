//! What an enhancement is asked for and what it gives back: options, streamed tokens, the
//! result and its timings.

use std::time::Duration;

use super::sampling::Sampling;
use crate::error::{Error, Result};

/// The largest `max_new_tokens` accepted.
pub const MAX_NEW_TOKENS: usize = 32_768;

/// Our instructions to the model (also read by `export-scripts/make_enhancer_fixtures.py`).
pub fn default_system_prompt() -> &'static str {
    include_str!("system_prompt.txt").trim_end()
}

/// How to enhance. `Default`: our system prompt, thinking off, greedy, at most 512 new tokens.
/// New fields may be added: start from `Default` and set the fields that differ.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EnhanceOptions {
    /// `None` uses [`default_system_prompt`].
    pub system_prompt: Option<String>,
    /// Let the model reason in a `<think>` block first (better on riddles, slower; the block
    /// counts against `max_new_tokens`).
    pub thinking: bool,
    /// 1..=[`MAX_NEW_TOKENS`]; generation also stops at the model's context length.
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

impl Default for EnhanceOptions {
    fn default() -> Self {
        EnhanceOptions { system_prompt: None, thinking: false, max_new_tokens: 512, sampling: Sampling::Greedy }
    }
}

impl EnhanceOptions {
    pub fn check(&self) -> Result<()> {
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS {
            return Err(Error::invalid(format!(
                "max_new_tokens must be 1..={MAX_NEW_TOKENS} (got {})",
                self.max_new_tokens
            )));
        }
        self.sampling.check()
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer (`<|im_end|>` or another end token).
    Stop,
    /// `max_new_tokens` (or the context length) was reached.
    Length,
}

/// One generated token, passed to the streaming callback (end tokens are not passed).
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent<'a> {
    /// 0 for the first generated token.
    pub index: usize,
    pub token_id: u32,
    /// Text this token completes (empty while a multi-byte character is incomplete).
    pub text: &'a str,
    /// Inside the `<think>…</think>` block (the tags included).
    pub thinking: bool,
}

/// The result of [`PromptEnhancer::enhance`](super::PromptEnhancer::enhance).
#[derive(Debug, Clone)]
pub struct Enhancement {
    /// The rewritten prompt: the answer without any think block, trimmed. Empty when the
    /// model used the whole token budget thinking (then fall back to the original prompt).
    pub text: String,
    /// The reasoning inside `<think>…</think>`, when the model wrote one.
    pub thinking: Option<String>,
    /// All generated text (special tokens skipped, think block included).
    pub raw_text: String,
    /// Generated token ids, the end token included when there was one.
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish: FinishReason,
    /// The sampling seed used (drawn when the options had none); `None` for greedy decoding.
    pub seed: Option<u64>,
    pub timings: EnhanceTimings,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EnhanceTimings {
    /// The prompt's one decoder call (gives the first token).
    pub prefill: Duration,
    /// All later decoder calls, one per token.
    pub decode: Duration,
    pub decode_steps: usize,
    pub total: Duration,
}

impl EnhanceTimings {
    /// Decoding speed after the prompt (0 when there was no decode step).
    pub fn tokens_per_second(&self) -> f64 {
        if self.decode_steps == 0 || self.decode.is_zero() {
            0.0
        } else {
            self.decode_steps as f64 / self.decode.as_secs_f64()
        }
    }
}
