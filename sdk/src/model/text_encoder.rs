//! Prompt → token ids (Qwen3 tokenizer and chat template) → caption features
//! (`hidden_states[-2]` of the text encoder, real tokens only).

use std::path::Path;
use std::sync::Arc;

use ndarray::{Array2, Axis};
use ort::value::TensorRef;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::limits::check_prompt_bytes;
use crate::package::TextEncoderInfo;
use crate::runtime::graph::Graph;
use crate::runtime::run_context::RunContext;

const INPUT_IDS: &str = "input_ids";
const ATTENTION_MASK: &str = "attention_mask";
const HIDDEN_STATES: &str = "hidden_states";
/// The graph's interface: token ids and their mask in, `hidden_states[-2]` out.
pub(crate) const INPUTS: &[(&str, &str)] = &[(INPUT_IDS, "int64"), (ATTENTION_MASK, "int64")];
pub(crate) const OUTPUTS: &[(&str, &str)] = &[(HIDDEN_STATES, "float32")];

/// Token ids of one prompt after the chat template and truncation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    pub ids: Vec<u32>,
    /// Number of tokens before truncation; larger than `ids.len()` when the prompt was cut.
    pub full_length: usize,
}

impl TokenizedPrompt {
    pub fn truncated(&self) -> bool {
        self.full_length > self.ids.len()
    }
}

/// Caption features of one prompt, reusable across generations (encode once, generate many).
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    pub tokens: TokenizedPrompt,
    /// `[tokens, caption_feature_width]`.
    pub features: Arc<Array2<f32>>,
}

pub(crate) struct TextEncoder {
    /// Shared with a prompt enhancer attached to the pipeline (the same file).
    tokenizer: Arc<Tokenizer>,
    info: TextEncoderInfo,
}

impl TextEncoder {
    pub fn new(tokenizer_path: &Path, info: TextEncoderInfo) -> Result<Self> {
        let tokenizer = crate::package::tokenizer_file::read(tokenizer_path)?;
        Ok(TextEncoder { tokenizer: Arc::new(tokenizer), info })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn default_max_sequence_length(&self) -> usize {
        self.info.max_sequence_length
    }

    /// Applies the chat template, tokenizes, and keeps the first `max_sequence_length` ids
    /// (template tokens included), as diffusers does.
    pub fn tokenize(&self, prompt: &str, max_sequence_length: usize) -> Result<TokenizedPrompt> {
        check_prompt_bytes("the prompt", prompt).map_err(Error::invalid)?;
        let (before, after) = self.info.prompt_template.split_once("{prompt}").expect("checked at load");
        let text = format!("{before}{prompt}{after}");
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::invalid(format!("the prompt cannot be tokenized: {e}")))?;
        let ids = encoding.get_ids();
        let keep = ids.len().min(max_sequence_length);
        Ok(TokenizedPrompt { ids: ids[..keep].to_vec(), full_length: ids.len() })
    }

    /// Tokenizes `text` as it is (no chat template: the editing pipeline's prompt segments
    /// carry their own markup) and keeps the first `max_sequence_length` ids. The caller bounds
    /// `text`: the editing pipeline checks the instruction against `MAX_PROMPT_BYTES`, as
    /// [`TextEncoder::tokenize`] checks a prompt without its template, and the markup around it
    /// is the package's (at most `MAX_SEGMENT_MARKUP_BYTES` a piece, checked at load).
    pub fn tokenize_text(&self, text: &str, max_sequence_length: usize) -> Result<TokenizedPrompt> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::invalid(format!("the prompt cannot be tokenized: {e}")))?;
        let ids = encoding.get_ids();
        let keep = ids.len().min(max_sequence_length);
        Ok(TokenizedPrompt { ids: ids[..keep].to_vec(), full_length: ids.len() })
    }

    /// Runs the text encoder on the real tokens only (no padding: with causal attention and
    /// right padding the features of real tokens are the same).
    pub fn encode(&self, graph: &Graph, tokens: TokenizedPrompt, context: &RunContext) -> Result<PromptEmbedding> {
        let n = tokens.ids.len();
        if n == 0 {
            return Err(Error::invalid("max_sequence_length leaves no tokens"));
        }
        let ids = Array2::from_shape_vec((1, n), tokens.ids.iter().map(|&i| i as i64).collect()).expect("shape");
        let mask = Array2::<i64>::ones((1, n));
        let err = |e: ort::Error| Error::ort("text_encoder", e);
        let inputs = vec![
            (INPUT_IDS.into(), TensorRef::from_array_view(&ids).map_err(err)?.into()),
            (ATTENTION_MASK.into(), TensorRef::from_array_view(&mask).map_err(err)?.into()),
        ];
        let hidden = graph.run(inputs, &[HIDDEN_STATES], context, false)?.remove(0);
        let shape = hidden.shape().to_vec();
        if shape.len() != 3 || shape[0] != 1 || shape[1] != n || shape[2] != self.info.hidden_size {
            return Err(graph.failed(format!("unexpected output shape {shape:?}")));
        }
        let features = hidden.index_axis_move(Axis(0), 0).into_dimensionality::<ndarray::Ix2>().expect("checked rank");
        if features.iter().any(|v| !v.is_finite()) {
            return Err(graph.failed("non-finite caption features"));
        }
        Ok(PromptEmbedding { tokens, features: Arc::new(features) })
    }
}
