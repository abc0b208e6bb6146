//! The prompt enhancer: a local Qwen3 rewrites a terse or puzzle-like request into a concrete
//! visual description before generation (Z-Image's "prompt enhancing", offline).
//!
//! The decoder graph (`text_decoder`) comes with a Z-Image package, where it reads the same
//! weights file as the text encoder, or with a standalone enhancer package exported from any
//! Hugging Face Qwen3 checkpoint (`export-scripts/export_enhancer.py`). Generation: our system
//! prompt and the user's request in Qwen3's chat template (thinking on or off), one prefill
//! call, then one decoder call per token with the KV cache, until `<|im_end|>` or the token
//! limit. A `<think>…</think>` block is returned apart and never part of [`Enhancement::text`].
//!
//! ```no_run
//! use zimage::{EnhanceOptions, LoadOptions, PromptEnhancer};
//! let enhancer = PromptEnhancer::load("models/tiny-qwen3-enhancer", &LoadOptions::default())?;
//! let result = enhancer.enhance("a cat, but make it a riddle: 2 + 2 of them", &EnhanceOptions::default(), None)?;
//! println!("{}", result.text);
//! # Ok::<(), zimage::Error>(())
//! ```

pub(crate) mod kv_decoder;
pub mod options;
pub mod sampling;
pub mod text;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::limits::check_enhancer_bytes;
use crate::load_options::LoadOptions;
use crate::package::enhancer::{EnhancerInfo, EnhancerManifest, ENHANCER_FORMAT_NAME};
use crate::package::files::resolve;
use crate::package::format::{json_field, read_manifest_json, FORMAT_NAME};
use crate::package::graph::{GraphEntry, GraphKind};
use crate::package::quantization::QuantizationInfo;
use crate::package::Manifest;
use crate::runtime::device::Device;
use crate::runtime::graph::Graph;
use crate::runtime::library::runtime;
use crate::runtime::provider::ProviderConfig;
use crate::runtime::run_context::{CancelHandle, Registry};
use crate::runtime::session::{build_session, DeclaredIo, SessionSettings};
use kv_decoder::Decoder;
pub use options::{
    default_system_prompt, EnhanceOptions, EnhanceTimings, Enhancement, FinishReason, TokenEvent,
    DEFAULT_MAX_CONTEXT_TOKENS, MAX_CONTEXT_TOKENS, MAX_NEW_TOKENS,
};
use sampling::{Sampling, TokenPicker};
use text::{split_thinking, TextStream};

/// Most prompt tokens fed to the decoder in one call. Prompts are usually a few hundred tokens
/// (one call, as before); a long one is fed in chunks, so that the decoder's attention holds
/// `heads x 512 x S` scores instead of `heads x S x S` (the same logits up to float rounding).
pub const PREFILL_CHUNK: usize = 512;

/// A loaded enhancer. `Send + Sync`; concurrent calls take turns per decoder call.
pub struct PromptEnhancer {
    tokenizer: Arc<Tokenizer>,
    info: EnhancerInfo,
    decoder: Decoder,
    registry: Arc<Registry>,
    think_tags: [String; 2],
    dir: PathBuf,
    /// The provider's error when the decoder fell back to the CPU.
    fallback_reason: Option<String>,
}

impl PromptEnhancer {
    /// Loads the enhancer of a Z-Image package that has one, or of a standalone enhancer package.
    pub fn load(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<PromptEnhancer> {
        Self::load_with_registry(dir.as_ref(), options, Arc::new(Registry::default()), None)
    }

    /// Loads with `registry` tracking its runs: the registry of a pipeline when attached to it
    /// (`Pipeline::attach_enhancer`), so that the pipeline's cancel handle stops it too, and
    /// with `tokenizer` when the caller already holds the package's `tokenizer.json` (the
    /// pipeline's text encoder: the same file, read once).
    pub(crate) fn load_with_registry(
        dir: &Path,
        options: &LoadOptions,
        registry: Arc<Registry>,
        tokenizer: Option<Arc<Tokenizer>>,
    ) -> Result<PromptEnhancer> {
        options.check()?;
        let (tokenizer_path, graph, info, quantization) = read_package(dir, options.verify_checksums)?;
        let rt = runtime(options.runtime_library.as_deref())?;
        // Float weights: mapped, not copied (in a Z-Image package the text encoder reads the
        // same file), so no prepacking. Quantized ones: prepacked, or MatMulNBits dequantizes
        // every weight on every one-token call (docs/quantization.md, "The enhancer").
        let prepack = match &quantization {
            None => false,
            Some(q) if q.text_graphs_prepack(true) => true,
            Some(_) => {
                tracing::warn!(
                    package = %dir.display(),
                    "this quantized package's enhancer has a float LM head over the shared embedding table \
                     (made before quantized LM heads): it decodes without prepacked weights, several times slower; \
                     re-quantize its float package with export-scripts/quantize_package.py"
                );
                false
            }
        };
        let settings = SessionSettings {
            shares_weights: !prepack,
            declared_io: Some(DeclaredIo::of(&graph)),
            ..options.session_settings()
        };
        let path = resolve(dir, &graph.path);
        // TensorRT would rebuild engines as the cache grows (every step has a new past length),
        // so a TensorRT device runs the decoder with CUDA instead.
        let provider = ProviderConfig::without_tensorrt(
            options.device,
            GraphKind::TextDecoder,
            &options.gpu,
            options.exact_gpu_arena(),
        );
        let built = build_session(rt, GraphKind::TextDecoder, &path, &provider, &settings)?;
        let decoder = Decoder::new(Graph::new(GraphKind::TextDecoder, built.session), built.device, info.clone());
        let mut enhancer = Self::new(dir, &tokenizer_path, tokenizer, info, decoder, registry)?;
        enhancer.fallback_reason = built.fallback_reason;
        Ok(enhancer)
    }

    /// `tokenizer`: the one read from `tokenizer_path` already, or None to read it.
    pub(crate) fn new(
        dir: &Path,
        tokenizer_path: &Path,
        tokenizer: Option<Arc<Tokenizer>>,
        info: EnhancerInfo,
        decoder: Decoder,
        registry: Arc<Registry>,
    ) -> Result<Self> {
        let tokenizer = match tokenizer {
            Some(tokenizer) => tokenizer,
            None => Arc::new(crate::package::tokenizer_file::read(tokenizer_path)?),
        };
        let tag = |id: u32| {
            tokenizer
                .id_to_token(id)
                .ok_or_else(|| Error::package(tokenizer_path, format!("think token {id} is not in the tokenizer")))
        };
        let think_tags = [tag(info.think_token_ids[0])?, tag(info.think_token_ids[1])?];
        Ok(PromptEnhancer {
            tokenizer,
            info,
            decoder,
            registry,
            think_tags,
            dir: dir.to_path_buf(),
            fallback_reason: None,
        })
    }

    pub fn package_dir(&self) -> &Path {
        &self.dir
    }

    pub fn info(&self) -> &EnhancerInfo {
        &self.info
    }

    pub fn device(&self) -> Device {
        self.decoder.device
    }

    /// Why the decoder runs on the CPU although another provider was asked for (with
    /// [`LoadOptions::allow_cpu_fallback`]): the provider's error. `None` when it runs where
    /// asked (a TensorRT device runs it with CUDA, by design, not as a fallback).
    pub fn provider_fallback(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Cancels the enhancements (and, after `Pipeline::attach_enhancer`, the generations)
    /// running at the moment it is called.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle { registry: Arc::clone(&self.registry) }
    }

    /// Most tokens an enhancement with `options` holds (prompt and answer): the options' limit
    /// or the model's positions, whichever is smaller.
    pub fn context_tokens(&self, options: &EnhanceOptions) -> usize {
        options.max_context_tokens.min(self.info.max_positions)
    }

    /// The chat-templated prompt the model is given.
    pub fn chat_text(&self, prompt: &str, options: &EnhanceOptions) -> String {
        let system = options.system_prompt.as_deref().unwrap_or(default_system_prompt());
        // Substitute {prompt} first so braces in the system prompt are never touched twice.
        let (head, tail) = self.info.prompt_template.split_once("{prompt}").expect("checked at load");
        let mut text = head.replace("{system}", system);
        text.push_str(prompt);
        text.push_str(tail);
        if !options.thinking {
            text.push_str(&self.info.thinking_off_suffix);
        }
        text
    }

    /// Token ids of [`PromptEnhancer::chat_text`].
    pub fn prompt_ids(&self, prompt: &str, options: &EnhanceOptions) -> Result<Vec<u32>> {
        let text = self.chat_text(prompt, options);
        check_enhancer_bytes("the enhancer's input (system prompt and prompt)", &text).map_err(Error::invalid)?;
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::invalid(format!("the prompt cannot be tokenized: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Refuses, without running the model, what [`PromptEnhancer::enhance`] would refuse before
    /// running it: bad options, an empty prompt, a prompt over the byte limit or one whose
    /// templated tokens fill the context. For front ends that check a request before queueing
    /// it (it tokenizes the prompt).
    pub fn check(&self, prompt: &str, options: &EnhanceOptions) -> Result<()> {
        self.checked_prompt_ids(prompt, options).map(|_| ())
    }

    /// [`PromptEnhancer::prompt_ids`] after [`PromptEnhancer::check`]'s checks.
    fn checked_prompt_ids(&self, prompt: &str, options: &EnhanceOptions) -> Result<Vec<u32>> {
        options.check()?;
        if prompt.trim().is_empty() {
            return Err(Error::invalid("the prompt to enhance is empty"));
        }
        let ids = self.prompt_ids(prompt, options)?;
        let context_tokens = self.context_tokens(options);
        if ids.len() >= context_tokens {
            return Err(Error::invalid(format!(
                "the prompt has {} tokens with the template; the enhancer's context holds {context_tokens} \
                 with the answer (max_context_tokens {}, the model's positions {})",
                ids.len(),
                options.max_context_tokens,
                self.info.max_positions
            )));
        }
        Ok(ids)
    }

    /// Rewrites `prompt`. `on_token` sees every generated token; returning `false` stops with
    /// [`Error::Cancelled`], as does the cancel handle.
    pub fn enhance(
        &self,
        prompt: &str,
        options: &EnhanceOptions,
        mut on_token: Option<&mut dyn FnMut(&TokenEvent) -> bool>,
    ) -> Result<Enhancement> {
        let start = Instant::now();
        let ids = self.checked_prompt_ids(prompt, options)?;
        let context = self.registry.begin()?;
        let max_new = options.max_new_tokens.min(self.context_tokens(options) - ids.len());
        let seed = match options.sampling {
            Sampling::Greedy => None,
            Sampling::Random(r) => Some(r.seed.unwrap_or_else(crate::random::os_seeded_u64)),
        };
        let mut picker = TokenPicker::new(options.sampling, seed.unwrap_or(0));
        let mut timings = EnhanceTimings::default();
        let mut cache = self.decoder.empty_cache()?;

        let prefill_start = Instant::now();
        let mut logits = self.decoder.prefill(&ids, &mut cache, &context, PREFILL_CHUNK)?;
        timings.prefill = prefill_start.elapsed();

        let mut generated = Vec::new();
        let mut stream = TextStream::default();
        let mut thinking = false;
        let mut finish = FinishReason::Length;
        let decode_start = Instant::now();
        for index in 0..max_new {
            let token = picker.pick(&logits);
            generated.push(token);
            if self.info.eos_token_ids.contains(&token) {
                finish = FinishReason::Stop;
                break;
            }
            if token == self.info.think_token_ids[0] {
                thinking = true;
            }
            if let Some(callback) = on_token.as_deref_mut() {
                let text = stream.push(&self.tokenizer, token);
                if !callback(&TokenEvent { index, token_id: token, text: &text, thinking }) {
                    return Err(Error::Cancelled);
                }
            }
            if token == self.info.think_token_ids[1] {
                thinking = false;
            }
            if index + 1 == max_new {
                break;
            }
            logits = self.decoder.step(&[token], &mut cache, &context)?;
            timings.decode_steps += 1;
        }
        timings.decode = decode_start.elapsed();
        let body = match finish {
            FinishReason::Stop => &generated[..generated.len() - 1],
            FinishReason::Length => &generated[..],
        };
        let raw_text = self.decode(body)?;
        let (thinking_text, text) = split_thinking(&raw_text, &self.think_tags[0], &self.think_tags[1]);
        timings.total = start.elapsed();
        Ok(Enhancement {
            text,
            thinking: thinking_text,
            raw_text,
            token_ids: generated,
            prompt_tokens: ids.len(),
            finish,
            seed,
            timings,
        })
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::inference("tokenizer", format!("decoding failed: {e}")))
    }

    /// Logits after feeding `ids` in one call with an empty cache (no reuse): for checking
    /// the KV cache, not needed to enhance.
    pub fn logits_without_cache(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let context = self.registry.begin()?;
        let mut cache = self.decoder.empty_cache()?;
        self.decoder.step(ids, &mut cache, &context)
    }

    /// Logits after feeding `ids` in calls of at most `chunk` tokens, as [`PromptEnhancer::enhance`]
    /// prefills with [`PREFILL_CHUNK`]: for checking the chunked prefill.
    pub fn logits_after_chunked_prefill(&self, ids: &[u32], chunk: usize) -> Result<Vec<f32>> {
        let context = self.registry.begin()?;
        let mut cache = self.decoder.empty_cache()?;
        self.decoder.prefill(ids, &mut cache, &context, chunk)
    }

    /// Logits after each token of `ids`, fed one at a time through the KV cache after a
    /// prefill of the first `prefill` tokens: for checking the KV cache.
    pub fn logits_with_cache(&self, ids: &[u32], prefill: usize) -> Result<Vec<Vec<f32>>> {
        let context = self.registry.begin()?;
        let mut cache = self.decoder.empty_cache()?;
        let mut out = vec![self.decoder.step(&ids[..prefill], &mut cache, &context)?];
        for &id in &ids[prefill..] {
            out.push(self.decoder.step(&[id], &mut cache, &context)?);
        }
        debug_assert_eq!(cache.len(), ids.len());
        Ok(out)
    }
}

/// Tokenizer path, decoder graph entry, enhancer section and quantization section (standalone
/// enhancer packages are float) of a package of either kind, the decoder's interface checked.
fn read_package(dir: &Path, verify_all: bool) -> Result<(PathBuf, GraphEntry, EnhancerInfo, Option<QuantizationInfo>)> {
    let path = dir.join("manifest.json");
    let text = read_manifest_json(dir, "not a zimage model or enhancer package")?;
    let head: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::package(&path, format!("invalid JSON: {e}")))?;
    let format = head.get("format").and_then(|f| f.as_str());
    let (tokenizer, graph, info, quantization) = match format {
        Some(FORMAT_NAME) => {
            let m = Manifest::load(dir, verify_all)?;
            match (m.enhancer, m.graphs.text_decoder) {
                (Some(info), Some(graph)) => (resolve(dir, &m.tokenizer.path), graph, info, m.quantization),
                _ => {
                    return Err(Error::package(
                        dir,
                        "this package has no prompt enhancer (add one with export-scripts/export_enhancer.py add, or load a standalone enhancer package)",
                    ))
                }
            }
        }
        Some(ENHANCER_FORMAT_NAME) => {
            let m = EnhancerManifest::load(dir, verify_all)?;
            (resolve(dir, &m.tokenizer.path), m.graphs.text_decoder, m.enhancer, None)
        }
        _ => {
            return Err(Error::package(
                &path,
                format!("format is {}, neither {FORMAT_NAME} nor {ENHANCER_FORMAT_NAME}", json_field(&head, "format")),
            ))
        }
    };
    kv_decoder::check_interface(&info, &graph).map_err(|m| Error::package(&path, m))?;
    Ok((tokenizer, graph, info, quantization))
}
