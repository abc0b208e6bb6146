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

/// A prompt the transformer takes, before the text encoder.
enum CheckedPrompt<'a> {
    Embedded(&'a PromptEmbedding),
    Text(TokenizedPrompt),
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
    /// `which` names the prompt in a refusal ("prompt", "negative prompt", "enhanced prompt").
    pub(crate) fn caption_tokens(
        &self,
        prompt: &str,
        max_sequence_length: Option<usize>,
        which: &str,
    ) -> Result<TokenizedPrompt> {
        let tokens = self.tokenize(prompt, max_sequence_length)?;
        if tokens.ids.len() > self.max_tokens {
            return Err(Error::invalid(format!(
                "the {which} has {} tokens after truncation; this model takes at most {}: shorten it or lower max_sequence_length",
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
        let tokens = self.caption_tokens(prompt, max_sequence_length, "prompt")?;
        self.text.encode(&*self.graph.acquire()?, tokens, context)
    }

    /// The request's prompt, and under guidance its negative prompt (the empty prompt when it
    /// has none). Both are checked (and text tokenized) before either is encoded; the text
    /// encoder's session is acquired once, and only for text prompts.
    pub fn encode_request(
        &self,
        request: &GenerateRequest,
        with_negative: bool,
        context: &RunContext,
    ) -> Result<EncodedPrompts> {
        let t0 = Instant::now();
        let (positive, negative) = self.checked_request(request, with_negative)?;
        let tokenize_time = t0.elapsed();
        let t1 = Instant::now();
        let mut graph: Option<Arc<Graph>> = None;
        let mut encode = |prompt: CheckedPrompt<'_>| -> Result<PromptEmbedding> {
            match prompt {
                CheckedPrompt::Embedded(e) => Ok(e.clone()),
                CheckedPrompt::Text(tokens) => {
                    if graph.is_none() {
                        graph = Some(self.graph.acquire()?);
                    }
                    self.text.encode(graph.as_deref().expect("set above"), tokens, context)
                }
            }
        };
        let positive = encode(positive)?;
        let negative = negative.map(&mut encode).transpose()?;
        Ok(EncodedPrompts { positive, negative, tokenize_time, encode_time: t1.elapsed() })
    }

    /// Refuses, without encoding them, the prompts [`CaptionEncoder::encode_request`] would
    /// refuse (it tokenizes text prompts).
    pub fn check_request(&self, request: &GenerateRequest, with_negative: bool) -> Result<()> {
        self.checked_request(request, with_negative).map(|_| ())
    }

    fn checked_request<'a>(
        &self,
        request: &'a GenerateRequest,
        with_negative: bool,
    ) -> Result<(CheckedPrompt<'a>, Option<CheckedPrompt<'a>>)> {
        static EMPTY: Prompt = Prompt::Text(String::new());
        let positive = self.checked(&request.prompt, request.max_sequence_length, "prompt")?;
        let negative = if with_negative {
            let prompt = request.negative_prompt.as_ref().unwrap_or(&EMPTY);
            Some(self.checked(prompt, request.max_sequence_length, "negative prompt")?)
        } else {
            None
        };
        Ok((positive, negative))
    }

    /// An embedding checked against the transformer, or text tokenized and checked.
    fn checked<'a>(
        &self,
        prompt: &'a Prompt,
        max_sequence_length: Option<usize>,
        which: &str,
    ) -> Result<CheckedPrompt<'a>> {
        match prompt {
            Prompt::Embedded(e) => self.check_embedding(e, which).map(|()| CheckedPrompt::Embedded(e)),
            Prompt::Text(text) => self.caption_tokens(text, max_sequence_length, which).map(CheckedPrompt::Text),
        }
    }

    fn check_embedding(&self, e: &PromptEmbedding, which: &str) -> Result<()> {
        let (n, d) = e.features.dim();
        if d != self.feature_width {
            return Err(Error::invalid(format!(
                "{which} embedding has width {d}, this model needs {}",
                self.feature_width
            )));
        }
        if n == 0 || n > self.max_tokens {
            return Err(Error::invalid(format!("{which} embedding has {n} tokens; allowed 1..={}", self.max_tokens)));
        }
        if e.features.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(format!("{which} embedding holds non-finite values")));
        }
        Ok(())
    }
}
