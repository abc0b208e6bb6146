//! What an enhancement is asked for and what it gives back: options, streamed tokens, the
//! result and its timings.

use std::time::Duration;

use super::sampling::Sampling;
use crate::error::{Error, Result};

/// The largest `max_new_tokens` accepted.
pub const MAX_NEW_TOKENS: usize = 32_768;

/// The default [`EnhanceOptions::max_context_tokens`]. Prompt-enhancer inputs are a system
/// prompt and a caption (hundreds to a few thousand tokens), and the decoder's key/value cache
/// grows with every token: Qwen3-4B keeps 288 KiB per token (36 layers x 8 heads x 128 x 2 x
/// float32), so 8192 tokens are 2.3 GiB, held twice while a step replaces it, where the model's
/// own 40960 positions would be 11.3 GiB. A long prompt is refused instead of taking the memory.
pub const DEFAULT_MAX_CONTEXT_TOKENS: usize = 8192;

/// The largest `max_context_tokens` accepted (a package's `max_positions` is bounded by the same).
pub const MAX_CONTEXT_TOKENS: usize = 1 << 21;

/// Our instructions to the model (also read by `export-scripts/make_enhancer_fixtures.py`).
pub fn default_system_prompt() -> &'static str {
    include_str!("system_prompt.txt").trim_end()
}

/// How to enhance. `Default`: our system prompt, thinking off, greedy, at most 512 new tokens,
/// at most [`DEFAULT_MAX_CONTEXT_TOKENS`] tokens of context.
/// New fields may be added: start from `Default` and set the fields that differ.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EnhanceOptions {
    /// `None` uses [`default_system_prompt`].
    pub system_prompt: Option<String>,
    /// Let the model reason in a `<think>` block first (better on riddles, slower; the block
    /// counts against `max_new_tokens`).
    pub thinking: bool,
    /// 1..=[`MAX_NEW_TOKENS`]; generation also stops when the context is full
    /// (`max_context_tokens`, or the model's positions if fewer).
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Most tokens the decoder holds, the templated prompt and the answer together:
    /// 1..=[`MAX_CONTEXT_TOKENS`], [`DEFAULT_MAX_CONTEXT_TOKENS`] by default. It bounds the
    /// key/value cache's memory; a prompt that fills it is refused (`InvalidRequest`), and
    /// generation stops with [`FinishReason::Length`] when the answer fills it. The model's own
    /// limit (`EnhancerInfo::max_positions`) applies when it is smaller.
    pub max_context_tokens: usize,
}

impl Default for EnhanceOptions {
    fn default() -> Self {
        EnhanceOptions {
            system_prompt: None,
            thinking: false,
            max_new_tokens: 512,
            sampling: Sampling::Greedy,
            max_context_tokens: DEFAULT_MAX_CONTEXT_TOKENS,
        }
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
        if self.max_context_tokens == 0 || self.max_context_tokens > MAX_CONTEXT_TOKENS {
            return Err(Error::invalid(format!(
                "max_context_tokens must be 1..={MAX_CONTEXT_TOKENS} (got {})",
                self.max_context_tokens
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
    /// `max_new_tokens` was reached, or the context (`max_context_tokens` or the model's
    /// positions) was full.
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
    /// Decoding speed after the prompt; `None` when there was no decode step (one token, from
    /// the prompt's call), where there is no speed to report.
    pub fn tokens_per_second(&self) -> Option<f64> {
        if self.decode_steps == 0 || self.decode.is_zero() {
            None
        } else {
            Some(self.decode_steps as f64 / self.decode.as_secs_f64())
        }
    }
}
