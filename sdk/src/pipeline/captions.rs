//! A request's prompts as caption features: text through the tokenizer and the text encoder,
//! or an embedding the caller encoded earlier, checked against what the transformer takes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::request::{GenerateRequest, Prompt};
use crate::error::{Error, Result};
use crate::model::text_encoder::{PromptEmbedding, TextEncoder, TokenizedPrompt};
use crate::package::TransformerInfo;
use crate::runtime::graph::{Graph, GraphSlot};
use crate::runtime::run_context::RunContext;

/// The text encoder of a pipeline and the transformer's limits on what it produces.
pub(crate) struct CaptionEncoder {
    pub text: TextEncoder,
    pub graph: GraphSlot,
    /// Width of a caption feature the transformer takes.
    pub feature_width: usize,
    /// Most caption tokens the transformer's position table holds.
    pub max_tokens: usize,
}

/// A request's encoded prompts, and the time spent on them.
pub(crate) struct EncodedPrompts {
    pub positive: PromptEmbedding,
    /// Present under guidance: the negative prompt, or the empty prompt.
    pub negative: Option<PromptEmbedding>,
    pub tokenize_time: Duration,
    pub encode_time: Duration,
}

impl CaptionEncoder {
    pub fn new(text: TextEncoder, graph: GraphSlot, transformer: &TransformerInfo) -> Self {
        CaptionEncoder {
            text,
            graph,
            feature_width: transformer.cap_feat_dim,
            max_tokens: transformer.max_caption_tokens,
        }
    }

    /// Token ids after the chat template and truncation to `max_sequence_length` (the
    /// package's default when `None`).
    pub fn tokenize(&self, prompt: &str, max_sequence_length: Option<usize>) -> Result<TokenizedPrompt> {
        let max = max_sequence_length.unwrap_or(self.text.default_max_sequence_length());
        if max == 0 {
            return Err(Error::invalid("max_sequence_length must be at least 1"));
        }
        self.text.tokenize(prompt, max)
    }

    /// Tokenizes for the transformer: the caption must fit the model's position table.
    fn caption_tokens(&self, prompt: &str, max_sequence_length: Option<usize>) -> Result<TokenizedPrompt> {
        let tokens = self.tokenize(prompt, max_sequence_length)?;
        if tokens.ids.len() > self.max_tokens {
            return Err(Error::invalid(format!(
                "the prompt has {} tokens after truncation; this model takes at most {}: shorten it or lower max_sequence_length",
                tokens.ids.len(),
                self.max_tokens
            )));
        }
        Ok(tokens)
    }

    /// Encodes one text prompt.
    pub fn encode(
        &self,
        prompt: &str,
        max_sequence_length: Option<usize>,
        context: &RunContext,
    ) -> Result<PromptEmbedding> {
        let tokens = self.caption_tokens(prompt, max_sequence_length)?;
        self.text.encode(&*self.graph.acquire()?, tokens, context)
    }

    /// The request's prompt, and under guidance its negative prompt (the empty prompt when it
    /// has none). The text encoder's session is acquired once, and only for text prompts.
    pub fn encode_request(
        &self,
        request: &GenerateRequest,
        with_negative: bool,
        context: &RunContext,
    ) -> Result<EncodedPrompts> {
        let mut graph: Option<Arc<Graph>> = None;
        let (mut tokenize_time, mut encode_time) = (Duration::ZERO, Duration::ZERO);
        let mut encode = |prompt: &Prompt| -> Result<PromptEmbedding> {
            match prompt {
                Prompt::Embedded(e) => {
                    self.check_embedding(e)?;
                    Ok(e.clone())
                }
                Prompt::Text(text) => {
                    let t0 = Instant::now();
                    let tokens = self.caption_tokens(text, request.max_sequence_length)?;
                    tokenize_time += t0.elapsed();
                    let t1 = Instant::now();
                    if graph.is_none() {
                        graph = Some(self.graph.acquire()?);
                    }
                    let e = self.text.encode(graph.as_deref().expect("set above"), tokens, context)?;
                    encode_time += t1.elapsed();
                    Ok(e)
                }
            }
        };
        let positive = encode(&request.prompt)?;
        let negative = if with_negative {
            let empty = Prompt::Text(String::new());
            Some(encode(request.negative_prompt.as_ref().unwrap_or(&empty))?)
        } else {
            None
        };
        Ok(EncodedPrompts { positive, negative, tokenize_time, encode_time })
    }

    fn check_embedding(&self, e: &PromptEmbedding) -> Result<()> {
        let (n, d) = e.features.dim();
        if d != self.feature_width {
            return Err(Error::invalid(format!(
                "prompt embedding has width {d}, this model needs {}",
                self.feature_width
            )));
        }
        if n == 0 || n > self.max_tokens {
            return Err(Error::invalid(format!("prompt embedding has {n} tokens; allowed 1..={}", self.max_tokens)));
        }
        if e.features.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid("prompt embedding holds non-finite values"));
        }
        Ok(())
    }
}
