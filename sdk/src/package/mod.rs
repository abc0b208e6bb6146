//! The model package a pipeline loads (format in `docs/package-format.md`): `manifest.json`,
//! its sections, the graphs it names and their files. Everything here is about the format;
//! what a graph's inputs and outputs must be is known by the network that runs it (`model`).
//!
//! - [`graph`]: [`GraphKind`], a graph's manifest entry;
//! - [`precision`]: a graph's [`Precision`];
//! - [`quantization`]: the `quantization` section of int8 / int4 packages;
//! - [`format`](mod@format): format names and versions, reading `manifest.json`;
//! - [`files`]: file entries, checksums, path safety;
//! - [`scheduler_config`]: the scheduler section;
//! - [`generation_defaults`]: the settings the model is meant to run with (steps, guidance);
//! - [`enhancer`]: the prompt enhancer's section and the standalone enhancer package;
//! - [`edit`]: the editing (Omni) section;
//! - [`controlnet`]: the ControlNet add-ons' section;
//! - [`tokenizer_file`]: `tokenizer.json` read into a tokenizer (fast for BPE files);
//! - [`tokenizer_limits`]: how much its text stages may lengthen a text, checked at load.

pub mod controlnet;
pub mod edit;
pub mod enhancer;
pub mod files;
pub mod format;
pub mod generation_defaults;
pub mod graph;
pub mod initializers;
pub mod lora_table;
pub mod precision;
pub mod quantization;
pub mod scheduler_config;
pub(crate) mod tokenizer_file;
pub(crate) mod tokenizer_limits;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use controlnet::ControlNetInfo;
use edit::EditInfo;
use enhancer::EnhancerInfo;
use files::{check_package_files, FileEntry};
use format::{json_field, json_kind, read_manifest_json};
pub use format::{FORMAT_NAME, FORMAT_VERSION};
use generation_defaults::GenerationDefaults;
use graph::{GraphKind, Graphs};
pub use lora_table::LoraParameter;
pub use precision::Precision;
use quantization::QuantizationInfo;
use scheduler_config::SchedulerConfig;

/// A Z-Image model package's `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub precision: Precision,
    #[serde(default)]
    pub source: serde_json::Value,
    pub tokenizer: FileEntry,
    pub graphs: Graphs,
    pub text_encoder: TextEncoderInfo,
    pub transformer: TransformerInfo,
    pub vae: VaeInfo,
    pub scheduler: SchedulerConfig,
    /// Recommended steps and guidance; absent = Z-Image-Turbo's (8 steps, no guidance).
    #[serde(default)]
    pub generation_defaults: GenerationDefaults,
    /// The prompt enhancer (`graphs.text_decoder`), when the package carries one.
    #[serde(default)]
    pub enhancer: Option<EnhancerInfo>,
    /// The pipelines the package supports ("text_to_image", "image_to_image", "inpaint",
    /// "edit"); absent in packages exported before editing: the first three.
    #[serde(default)]
    pub pipelines: Option<Vec<String>>,
    /// Editing (Omni): with `graphs.siglip` and `graphs.transformer_omni`.
    #[serde(default)]
    pub edit: Option<EditInfo>,
    /// ControlNet add-ons by name (docs/controlnet.md); empty in a package without them.
    #[serde(default)]
    pub controlnets: BTreeMap<String, ControlNetInfo>,
    /// How the transformer and text-encoder weights were quantized (int8 / int4 weight-only),
    /// when they were (docs/quantization.md).
    #[serde(default)]
    pub quantization: Option<QuantizationInfo>,
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
    /// The Linear weights LoRAs may change, by diffusers parameter name
    /// (`layers.0.attention.to_q.weight`): where each is in the transformer graph. Absent in
    /// packages exported before LoRA support (they then refuse LoRAs).
    #[serde(default)]
    pub lora_parameters: Option<BTreeMap<String, LoraParameter>>,
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

impl Manifest {
    /// Reads and checks `dir/manifest.json`, then every file it names (presence, size, and
    /// sha256 for files under [`files::ALWAYS_HASH_BELOW_BYTES`], or all files with `verify_all`).
    pub fn load(dir: &Path, verify_all: bool) -> Result<Manifest> {
        let text = read_manifest_json(dir, "not a zimage model package (export one with export-scripts/export.py)")?;
        let manifest = Manifest::parse(&text).map_err(|m| Error::package(dir.join("manifest.json"), m))?;
        manifest.check_files(dir, verify_all)?;
        Ok(manifest)
    }

    /// Reads and checks `dir/manifest.json` alone, without looking at the files it names:
    /// cheap, for checking a request against the package's limits before loading it
    /// ([`check_request`](crate::pipeline::check_request)). [`Manifest::load`] does the rest.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let text = read_manifest_json(dir, "not a zimage model package (export one with export-scripts/export.py)")?;
        Manifest::parse(&text).map_err(|m| Error::package(dir.join("manifest.json"), m))
    }

    /// Parses and checks the manifest text alone (no file access).
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        let head: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        if !head.is_object() {
            return Err(format!("the manifest is {}, not a JSON object", json_kind(&head)));
        }
        if head.get("format").and_then(|v| v.as_str()) != Some(FORMAT_NAME) {
            return Err(format!("format is {}, expected \"{FORMAT_NAME}\"", json_field(&head, "format")));
        }
        if head.get("format_version").and_then(|v| v.as_u64()) != Some(FORMAT_VERSION as u64) {
            return Err(format!(
                "format_version {} is not supported: this zimage reads version {FORMAT_VERSION}; re-export the package with a matching export-scripts/export.py",
                json_field(&head, "format_version")
            ));
        }
        let manifest: Manifest = serde_json::from_value(head).map_err(|e| format!("manifest.json: {e}"))?;
        manifest.check_values()?;
        Ok(manifest)
    }

    fn check_values(&self) -> std::result::Result<(), String> {
        let decoder = &self.graphs.vae_decoder;
        for (name, variant) in
            [("vae_decoder_cpu", &self.graphs.vae_decoder_cpu), ("vae_decoder_int8", &self.graphs.vae_decoder_int8)]
        {
            if variant.as_ref().is_some_and(|v| v.inputs != decoder.inputs || v.outputs != decoder.outputs) {
                return Err(format!("graphs.{name} must have vae_decoder's inputs and outputs"));
            }
        }
        let t = &self.transformer;
        let v = &self.vae;
        // Far above any real model, low enough that sizes computed from them (image limits,
        // sequence lengths, tensor shapes) cannot overflow: a hostile manifest is refused here
        // rather than panicking or wrapping around later.
        for (name, value, max) in [
            ("transformer.in_channels", t.in_channels, 1 << 16),
            ("transformer.patch_size", t.patch_size, 64),
            ("transformer.cap_feat_dim", t.cap_feat_dim, 1 << 20),
            ("transformer.sequence_multiple", t.sequence_multiple, 1 << 16),
            ("transformer.max_caption_tokens", t.max_caption_tokens, 1 << 20),
            ("transformer.max_latent_height", t.max_latent_height, 1 << 16),
            ("transformer.max_latent_width", t.max_latent_width, 1 << 16),
            ("vae.scale_factor", v.scale_factor, 64),
            ("text_encoder.max_sequence_length", self.text_encoder.max_sequence_length, 1 << 20),
        ] {
            if value > max {
                return Err(format!("{name} {value} is beyond any supported model (at most {max})"));
            }
        }
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
        // Checked as the float32 the decoder scales by (1e300 passes as an f64 and is infinite
        // as an f32: every image came out the same constant).
        let (scaling, shift) = (v.scaling_factor as f32, v.shift_factor as f32);
        if !((1e-6..=1e6).contains(&scaling.abs()) && shift.abs() <= 1e6) {
            return Err(format!(
                "vae.scaling_factor must be 1e-6..=1e6 in magnitude and shift_factor at most 1e6 (got {} and {})",
                v.scaling_factor, v.shift_factor
            ));
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
        if let Some(table) = &t.lora_parameters {
            lora_table::check_table("transformer.lora_parameters", table)?;
        }
        if let Some(q) = &self.quantization {
            q.check()?;
        }
        self.scheduler.check()?;
        self.generation_defaults.check()?;
        let edit_graphs = (self.graphs.siglip.is_some(), self.graphs.transformer_omni.is_some());
        match (&self.edit, edit_graphs) {
            (Some(info), (true, true)) => {
                info.check(t.cap_feat_dim, self.size_multiple(), &self.graphs.transformer.sha256)?
            }
            (None, (false, false)) => {}
            _ => return Err("graphs.siglip, graphs.transformer_omni and the edit section come together".into()),
        }
        if self.supports("edit") != self.edit.is_some() {
            return Err("pipelines lists \"edit\" exactly when the package has the edit section".into());
        }
        match (&self.enhancer, &self.graphs.text_decoder) {
            (Some(info), Some(_)) => info.check()?,
            (None, None) => {}
            _ => return Err("graphs.text_decoder and the enhancer section come together (one is missing)".into()),
        }
        Ok(())
    }

    fn check_files(&self, dir: &Path, verify_all: bool) -> Result<()> {
        let graph_files = self.graphs.iter().flat_map(|(_, entry)| entry.files());
        check_package_files(dir, std::iter::once(self.tokenizer.clone()).chain(graph_files), verify_all)
    }

    /// Whether the package supports `pipeline` ("text_to_image", "image_to_image",
    /// "inpaint", "edit"): from its `pipelines` list, or the first three for packages
    /// without one.
    pub fn supports(&self, pipeline: &str) -> bool {
        match &self.pipelines {
            Some(list) => list.iter().any(|p| p == pipeline),
            None => matches!(pipeline, "text_to_image" | "image_to_image" | "inpaint"),
        }
    }

    /// Absolute path of a file named in the manifest (already checked to stay inside `dir`).
    pub fn resolve(dir: &Path, relative: &str) -> PathBuf {
        files::resolve(dir, relative)
    }

    /// The package's weights in one line: `fp32`, or `fp32, int8 rtn, block 32` when quantized.
    pub fn weights_summary(&self) -> String {
        match &self.quantization {
            Some(q) => format!("{}, {}", self.precision, q.summary()),
            None => self.precision.to_string(),
        }
    }

    /// Whether the transformer's products take int8 activations (`quantization.activations`: a
    /// CPU-only format).
    pub fn int8_activations(&self) -> bool {
        self.quantization.as_ref().is_some_and(|q| q.int8_activations())
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
    /// A weights file shared by several graphs counts once; `vae_decoder_cpu` and
    /// `vae_decoder_int8` are loaded instead of `vae_decoder`, not besides it, so they are not
    /// counted (see [`Manifest::weight_bytes_decoding_with`]).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes_decoding_with(GraphKind::VaeDecoder)
    }

    /// [`Manifest::weight_bytes`] of a pipeline that decodes with `decoder` (`vae_decoder`,
    /// `vae_decoder_cpu` or `vae_decoder_int8`): that decoder counts, the other two do not.
    pub fn weight_bytes_decoding_with(&self, decoder: GraphKind) -> u64 {
        let decoders = [GraphKind::VaeDecoder, GraphKind::VaeDecoderCpu, GraphKind::VaeDecoderInt8];
        let mut seen = std::collections::BTreeSet::new();
        self.graphs
            .iter()
            .filter(|(kind, _)| *kind == decoder || !decoders.contains(kind))
            .map(|(_, g)| {
                // The packed copies a prepacked CPU layout keeps in the same file are not weights.
                let packed = g.cpu_prepacked.as_ref().map_or(0, |p| p.extra_bytes);
                let shared = g
                    .external_data
                    .as_ref()
                    .filter(|e| seen.insert(e.path.clone()))
                    .map_or(0, |e| e.bytes.saturating_sub(packed));
                g.bytes.saturating_add(shared)
            })
            // Saturating: the sizes come from the manifest and are only checked against the
            // files when the package loads.
            .fold(0u64, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::Manifest;

    /// tiny-zimage's manifest with its transformer's weights in a data file of `data_bytes`,
    /// `extra_bytes` of which a prepacked layout appended.
    fn with_transformer_data(data_bytes: u64, extra_bytes: Option<u64>) -> Manifest {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-zimage/manifest.json");
        let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let t = &mut m["graphs"]["transformer"];
        t["external_data"] = serde_json::json!({"path": "transformer.onnx.data", "bytes": data_bytes, "sha256": "00"});
        match extra_bytes {
            Some(extra) => {
                t["cpu_prepacked"]["extra_bytes"] = extra.into();
                t["cpu_prepacked"]["external_data"] = serde_json::Value::Null;
            }
            None => {
                t.as_object_mut().unwrap().remove("cpu_prepacked");
            }
        }
        Manifest::parse(&m.to_string()).unwrap()
    }

    #[test]
    fn packed_copies_appended_to_a_graphs_data_file_are_not_weights() {
        let plain = with_transformer_data(1_000_000, None).weight_bytes();
        assert_eq!(with_transformer_data(1_900_000, Some(900_000)).weight_bytes(), plain);
        // The same file without the layout's record counts all of it.
        assert_eq!(with_transformer_data(1_900_000, None).weight_bytes(), plain + 900_000);
    }
}
