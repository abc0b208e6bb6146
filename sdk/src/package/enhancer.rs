//! The prompt enhancer's part of a package: the `enhancer` section of a Z-Image package that
//! carries a decoder, and the standalone enhancer package format.

use std::path::Path;

use serde::Deserialize;

use super::files::{check_package_files, FileEntry};
pub use super::format::ENHANCER_FORMAT_NAME;
use super::format::{read_manifest_json, FORMAT_VERSION};
use super::graph::GraphEntry;
use super::precision::Precision;
use crate::error::{Error, Result};

/// What the prompt enhancer needs to drive `text_decoder` (written by
/// `export-scripts/export_enhancer.py`; see `docs/enhancer.md`).
#[derive(Debug, Clone, Deserialize)]
pub struct EnhancerInfo {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Longest context (prompt + generated tokens) the position encoding was trained for.
    pub max_positions: usize,
    /// Generation ends at any of these (`<|im_end|>` first).
    pub eos_token_ids: Vec<u32>,
    /// `<think>` and `</think>`.
    pub think_token_ids: [u32; 2],
    /// Chat template with `{system}` and `{prompt}`, ending with the generation prompt.
    pub prompt_template: String,
    /// Appended to the template when thinking is off (Qwen3: an empty think block).
    pub thinking_off_suffix: String,
}

impl EnhancerInfo {
    /// Checks the values alone (the decoder's interface is checked by the enhancer, which
    /// knows its input and output names).
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if self.num_layers == 0
            || self.num_kv_heads == 0
            || self.head_dim == 0
            || self.vocab_size == 0
            || self.max_positions == 0
        {
            return Err("enhancer: num_layers, num_kv_heads, head_dim, vocab_size and max_positions must be > 0".into());
        }
        // Far above any Qwen3 (36 layers, 8 KV heads of 128, 151936 tokens, 40960 positions), low
        // enough that the names and caches sized by them stay small: 10^12 layers aborted the
        // load building their input names.
        for (name, value, max) in [
            ("hidden_size", self.hidden_size, 1 << 16),
            ("num_layers", self.num_layers, 1024),
            ("num_kv_heads", self.num_kv_heads, 1024),
            ("head_dim", self.head_dim, 4096),
            ("vocab_size", self.vocab_size, 1 << 24),
            ("max_positions", self.max_positions, 1 << 21),
        ] {
            if value > max {
                return Err(format!("enhancer.{name} {value} is beyond any supported model (at most {max})"));
            }
        }
        if self.eos_token_ids.is_empty()
            || self.eos_token_ids.iter().chain(&self.think_token_ids).any(|&t| t as usize >= self.vocab_size)
        {
            return Err(
                "enhancer: eos_token_ids must be non-empty and, like think_token_ids, inside the vocabulary".into()
            );
        }
        let system_at = self.prompt_template.find("{system}");
        let prompt_at = self.prompt_template.find("{prompt}");
        if !matches!((system_at, prompt_at), (Some(s), Some(p)) if s < p) {
            return Err("enhancer.prompt_template needs {system} followed by {prompt}".into());
        }
        Ok(())
    }
}

/// A standalone prompt-enhancer package (`format: zimage-enhancer-package`): a decoder exported
/// from any Hugging Face Qwen3 checkpoint, with its tokenizer.
#[derive(Debug, Clone, Deserialize)]
pub struct EnhancerManifest {
    pub format: String,
    pub format_version: u32,
    pub precision: Precision,
    #[serde(default)]
    pub source: serde_json::Value,
    pub tokenizer: FileEntry,
    pub graphs: EnhancerGraphs,
    pub enhancer: EnhancerInfo,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EnhancerGraphs {
    pub text_decoder: GraphEntry,
}

impl EnhancerManifest {
    /// Reads and checks `dir/manifest.json` of a standalone enhancer package and its files.
    pub fn load(dir: &Path, verify_all: bool) -> Result<EnhancerManifest> {
        let path = dir.join("manifest.json");
        let text = read_manifest_json(dir, "not a zimage enhancer package")?;
        let head: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::package(&path, format!("invalid JSON: {e}")))?;
        if head.get("format").and_then(|v| v.as_str()) != Some(ENHANCER_FORMAT_NAME) {
            return Err(Error::package(&path, format!("format is not \"{ENHANCER_FORMAT_NAME}\"")));
        }
        if head.get("format_version").and_then(|v| v.as_u64()) != Some(FORMAT_VERSION as u64) {
            return Err(Error::package(&path, format!("format_version is not {FORMAT_VERSION}")));
        }
        let manifest: EnhancerManifest =
            serde_json::from_value(head).map_err(|e| Error::package(&path, format!("manifest.json: {e}")))?;
        manifest.enhancer.check().map_err(|m| Error::package(&path, m))?;
        let files = std::iter::once(manifest.tokenizer.clone()).chain(manifest.graphs.text_decoder.files());
        check_package_files(dir, files, verify_all)?;
        Ok(manifest)
    }
}
