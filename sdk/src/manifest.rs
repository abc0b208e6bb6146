//! The model package's `manifest.json` (format in `docs/package-format.md`): parsing and the
//! checks that make a broken or foreign package fail at load time, not mid-generation.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::scheduler::SchedulerConfig;

pub const FORMAT_NAME: &str = "zimage-model-package";
pub const FORMAT_VERSION: u32 = 1;
/// Files at most this large are always checked against their sha256 at load time.
pub const ALWAYS_HASH_BELOW_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub precision: String,
    #[serde(default)]
    pub source: serde_json::Value,
    pub tokenizer: FileEntry,
    pub graphs: Graphs,
    pub text_encoder: TextEncoderInfo,
    pub transformer: TransformerInfo,
    pub vae: VaeInfo,
    pub scheduler: SchedulerConfig,
    /// The prompt enhancer (`graphs.text_decoder`), when the package carries one.
    #[serde(default)]
    pub enhancer: Option<EnhancerInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Graphs {
    pub text_encoder: GraphEntry,
    pub transformer: GraphEntry,
    pub vae_decoder: GraphEntry,
    pub vae_encoder: GraphEntry,
    /// The same VAE decoder arranged for the CPU (its wide 3x3 convolutions by Winograd
    /// F(4x4, 3x3), same weights); used instead of `vae_decoder` on the CPU with
    /// `LoadOptions::winograd_vae` (optional, see docs/package-format.md).
    #[serde(default)]
    pub vae_decoder_cpu: Option<GraphEntry>,
    /// Causal-LM decoder with a KV cache for the prompt enhancer (optional).
    #[serde(default)]
    pub text_decoder: Option<GraphEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GraphEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    #[serde(default)]
    pub external_data: Option<FileEntry>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextEncoderInfo {
    pub hidden_size: usize,
    pub max_sequence_length: usize,
    pub prompt_template: String,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TransformerInfo {
    pub in_channels: usize,
    pub patch_size: usize,
    #[serde(default = "one")]
    pub f_patch_size: usize,
    pub cap_feat_dim: usize,
    pub axes_lens: Vec<usize>,
    pub sequence_multiple: usize,
    pub max_caption_tokens: usize,
    pub max_latent_height: usize,
    pub max_latent_width: usize,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize)]
pub struct VaeInfo {
    pub latent_channels: usize,
    pub scale_factor: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

/// A graph input or output: name and element type.
pub type TensorName = (String, &'static str);

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
    /// Inputs and outputs `text_decoder` must have, in order.
    pub fn decoder_io(&self) -> (Vec<TensorName>, Vec<TensorName>) {
        let mut inputs = vec![
            ("input_ids".to_string(), "int64"),
            ("attention_mask".to_string(), "int64"),
            ("position_ids".to_string(), "int64"),
        ];
        let mut outputs = vec![("logits".to_string(), "float32")];
        for i in 0..self.num_layers {
            for kv in ["key", "value"] {
                inputs.push((format!("past_key_values.{i}.{kv}"), "float32"));
                outputs.push((format!("present.{i}.{kv}"), "float32"));
            }
        }
        (inputs, outputs)
    }

    pub(crate) fn check(&self, graph: &GraphEntry) -> std::result::Result<(), String> {
        if self.num_layers == 0
            || self.num_kv_heads == 0
            || self.head_dim == 0
            || self.vocab_size == 0
            || self.max_positions == 0
        {
            return Err("enhancer: num_layers, num_kv_heads, head_dim, vocab_size and max_positions must be > 0".into());
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
        let (inputs, outputs) = self.decoder_io();
        let inputs: Vec<(&str, &str)> = inputs.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let outputs: Vec<(&str, &str)> = outputs.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        check_io("text_decoder", "input", &graph.inputs, &inputs)?;
        check_io("text_decoder", "output", &graph.outputs, &outputs)
    }
}

/// A standalone prompt-enhancer package (`format: zimage-enhancer-package`): a decoder exported
/// from any Hugging Face Qwen3 checkpoint, with its tokenizer.
#[derive(Debug, Clone, Deserialize)]
pub struct EnhancerManifest {
    pub format: String,
    pub format_version: u32,
    pub precision: String,
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

pub const ENHANCER_FORMAT_NAME: &str = "zimage-enhancer-package";

impl EnhancerManifest {
    /// Reads and checks `dir/manifest.json` of a standalone enhancer package and its files.
    pub fn load(dir: &Path, verify_all: bool) -> Result<EnhancerManifest> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
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
        manifest.enhancer.check(&manifest.graphs.text_decoder).map_err(|m| Error::package(&path, m))?;
        check_graph_files(dir, &[&manifest.tokenizer], &[&manifest.graphs.text_decoder], verify_all)?;
        Ok(manifest)
    }
}

/// Checks the tokenizer-like `files` and each graph with its external data. A weights file
/// shared by several graphs is listed once per graph with the same entry; it is checked once.
fn check_graph_files(dir: &Path, files: &[&FileEntry], graphs: &[&GraphEntry], verify_all: bool) -> Result<()> {
    let mut entries: Vec<FileEntry> = files.iter().map(|f| (*f).clone()).collect();
    for g in graphs {
        entries.push(FileEntry { path: g.path.clone(), bytes: g.bytes, sha256: g.sha256.clone() });
        if let Some(ext) = &g.external_data {
            match entries.iter().find(|e| e.path == ext.path) {
                Some(seen) if seen.bytes == ext.bytes && seen.sha256.eq_ignore_ascii_case(&ext.sha256) => continue,
                Some(_) => {
                    return Err(Error::package(
                        dir,
                        format!("{} is listed twice with different sizes or checksums", ext.path),
                    ))
                }
                None => entries.push(ext.clone()),
            }
        }
    }
    for entry in &entries {
        check_file(dir, entry, verify_all)?;
    }
    Ok(())
}

/// The graph interface this runtime drives. A package whose graphs disagree is refused.
const EXPECTED_IO: [(&str, &[(&str, &str)], &[(&str, &str)]); 4] = [
    ("text_encoder", &[("input_ids", "int64"), ("attention_mask", "int64")], &[("hidden_states", "float32")]),
    (
        "transformer",
        &[("latents", "float32"), ("timestep", "float32"), ("cap_feats", "float32"), ("cap_mask", "bool")],
        &[("noise_pred", "float32")],
    ),
    ("vae_decoder", &[("latents", "float32")], &[("image", "float32")]),
    ("vae_encoder", &[("image", "float32")], &[("mean", "float32"), ("logvar", "float32")]),
];

impl Graphs {
    pub fn get(&self, name: &str) -> &GraphEntry {
        match name {
            "text_encoder" => &self.text_encoder,
            "transformer" => &self.transformer,
            "vae_decoder" => &self.vae_decoder,
            "vae_encoder" => &self.vae_encoder,
            other => unreachable!("unknown graph {other}"),
        }
    }
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`, then every file it names (presence, size, and
    /// sha256 for files under [`ALWAYS_HASH_BELOW_BYTES`], or all files with `verify_all`).
    pub fn load(dir: &Path, verify_all: bool) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::package(
                    dir,
                    "no manifest.json: not a zimage model package (export one with export-scripts/export.py)",
                )
            } else {
                Error::io(&path, e)
            }
        })?;
        let manifest = Manifest::parse(&text).map_err(|m| Error::package(&path, m))?;
        manifest.check_files(dir, verify_all)?;
        Ok(manifest)
    }

    /// Parses and checks the manifest text alone (no file access).
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        let head: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        match head.get("format").and_then(|v| v.as_str()) {
            Some(FORMAT_NAME) => {}
            other => return Err(format!("format is {other:?}, expected \"{FORMAT_NAME}\"")),
        }
        match head.get("format_version").and_then(|v| v.as_u64()) {
            Some(v) if v == FORMAT_VERSION as u64 => {}
            other => {
                return Err(format!(
                    "format_version {other:?} is not supported: this zimage reads version {FORMAT_VERSION}; re-export the package with a matching export-scripts/export.py"
                ))
            }
        }
        let manifest: Manifest = serde_json::from_value(head).map_err(|e| format!("manifest.json: {e}"))?;
        manifest.check_values()?;
        Ok(manifest)
    }

    fn check_values(&self) -> std::result::Result<(), String> {
        for (name, inputs, outputs) in EXPECTED_IO {
            let graph = self.graphs.get(name);
            check_io(name, "input", &graph.inputs, inputs)?;
            check_io(name, "output", &graph.outputs, outputs)?;
        }
        if let Some(cpu) = &self.graphs.vae_decoder_cpu {
            let decoder = &self.graphs.vae_decoder;
            if cpu.inputs != decoder.inputs || cpu.outputs != decoder.outputs {
                return Err("graphs.vae_decoder_cpu must have vae_decoder's inputs and outputs".into());
            }
        }
        let t = &self.transformer;
        let v = &self.vae;
        if t.in_channels == 0 || t.in_channels != v.latent_channels {
            return Err(format!(
                "transformer.in_channels ({}) must equal vae.latent_channels ({}) and be > 0",
                t.in_channels, v.latent_channels
            ));
        }
        if t.patch_size == 0 || t.sequence_multiple == 0 || t.f_patch_size != 1 {
            return Err("transformer.patch_size and sequence_multiple must be > 0, f_patch_size 1".into());
        }
        if !v.scale_factor.is_power_of_two() {
            return Err(format!("vae.scale_factor {} is not a power of two", v.scale_factor));
        }
        if !(v.scaling_factor.is_finite() && v.scaling_factor != 0.0 && v.shift_factor.is_finite()) {
            return Err("vae.scaling_factor must be finite and non-zero, shift_factor finite".into());
        }
        if self.text_encoder.hidden_size != t.cap_feat_dim {
            return Err(format!(
                "text_encoder.hidden_size ({}) differs from transformer.cap_feat_dim ({})",
                self.text_encoder.hidden_size, t.cap_feat_dim
            ));
        }
        if self.text_encoder.max_sequence_length == 0 || !self.text_encoder.prompt_template.contains("{prompt}") {
            return Err("text_encoder needs max_sequence_length > 0 and a prompt_template with {prompt}".into());
        }
        if t.max_caption_tokens == 0 || t.max_latent_height == 0 || t.max_latent_width == 0 {
            return Err("transformer limits (max_caption_tokens, max_latent_height/width) must be > 0".into());
        }
        self.scheduler.check()?;
        match (&self.enhancer, &self.graphs.text_decoder) {
            (Some(info), Some(graph)) => info.check(graph)?,
            (None, None) => {}
            _ => return Err("graphs.text_decoder and the enhancer section come together (one is missing)".into()),
        }
        Ok(())
    }

    fn check_files(&self, dir: &Path, verify_all: bool) -> Result<()> {
        let mut graphs: Vec<&GraphEntry> = EXPECTED_IO.iter().map(|(name, _, _)| self.graphs.get(name)).collect();
        graphs.extend(self.graphs.vae_decoder_cpu.as_ref());
        graphs.extend(self.graphs.text_decoder.as_ref());
        check_graph_files(dir, &[&self.tokenizer], &graphs, verify_all)
    }

    /// Absolute path of a file named in the manifest (already checked to stay inside `dir`).
    pub fn resolve(dir: &Path, relative: &str) -> PathBuf {
        dir.join(relative)
    }

    /// The largest image side (pixels) the transformer's position table allows.
    pub fn max_image_height(&self) -> usize {
        self.transformer.max_latent_height * self.vae.scale_factor
    }

    pub fn max_image_width(&self) -> usize {
        self.transformer.max_latent_width * self.vae.scale_factor
    }

    /// Image sides must be multiples of this (16 for the real VAE).
    pub fn size_multiple(&self) -> usize {
        self.vae.scale_factor * self.transformer.patch_size
    }

    /// Total bytes of weights and graphs: what a fully loaded pipeline should roughly hold.
    /// A weights file shared by several graphs counts once; `vae_decoder_cpu` is loaded instead
    /// of `vae_decoder`, not besides it, so it is not counted.
    pub fn weight_bytes(&self) -> u64 {
        let mut graphs: Vec<&GraphEntry> = EXPECTED_IO.iter().map(|(name, _, _)| self.graphs.get(name)).collect();
        graphs.extend(self.graphs.text_decoder.as_ref());
        let mut seen = std::collections::BTreeSet::new();
        graphs
            .iter()
            .map(|g| g.bytes + g.external_data.as_ref().filter(|e| seen.insert(e.path.clone())).map_or(0, |e| e.bytes))
            .sum()
    }
}

fn check_io(
    graph: &str,
    what: &str,
    actual: &[TensorSpec],
    expected: &[(&str, &str)],
) -> std::result::Result<(), String> {
    let matches =
        actual.len() == expected.len() && actual.iter().zip(expected).all(|(a, (n, t))| a.name == *n && a.dtype == *t);
    if matches {
        Ok(())
    } else {
        let want: Vec<String> = expected.iter().map(|(n, t)| format!("{n}:{t}")).collect();
        let got: Vec<String> = actual.iter().map(|s| format!("{}:{}", s.name, s.dtype)).collect();
        Err(format!("graph {graph} has {what}s [{}], this runtime needs [{}]", got.join(", "), want.join(", ")))
    }
}

fn check_file(dir: &Path, entry: &FileEntry, verify_all: bool) -> Result<()> {
    let rel = Path::new(&entry.path);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::package(
            dir,
            format!("file path {:?} must be relative and stay inside the package", entry.path),
        ));
    }
    let path = dir.join(rel);
    let meta = std::fs::metadata(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::package(dir, format!("{} is missing", entry.path))
        } else {
            Error::io(&path, e)
        }
    })?;
    if meta.len() != entry.bytes {
        return Err(Error::package(
            dir,
            format!(
                "{} has {} bytes, the manifest says {} (incomplete download or copy?)",
                entry.path,
                meta.len(),
                entry.bytes
            ),
        ));
    }
    if verify_all || entry.bytes < ALWAYS_HASH_BELOW_BYTES {
        let actual = sha256_file(&path)?;
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            return Err(Error::package(
                dir,
                format!("{} has sha256 {actual}, the manifest says {}", entry.path, entry.sha256),
            ));
        }
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Lower-case hex sha256 of a byte string.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
