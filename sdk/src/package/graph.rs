//! The graphs a package carries: what kind each one is, and its manifest entry (file,
//! checksum, declared inputs and outputs).

use serde::Deserialize;

use super::files::FileEntry;

/// The job a graph does in the pipeline. Every place that treats graphs differently matches
/// on this (exhaustively inside the crate), so a new graph (ControlNet, vision encoder) is
/// added here and the compiler lists what must handle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum GraphKind {
    /// Qwen3 text encoder: token ids -> caption features.
    TextEncoder,
    /// The diffusion transformer: one denoising prediction.
    Transformer,
    /// VAE decoder: latents -> pixels.
    VaeDecoder,
    /// The same VAE decoder arranged for the CPU (Winograd convolutions), optional.
    VaeDecoderCpu,
    /// The same VAE decoder with its high-resolution convolutions in int8 (faster on the CPU,
    /// lossy), optional.
    VaeDecoderInt8,
    /// VAE encoder: pixels -> latent distribution (image-to-image, inpainting).
    VaeEncoder,
    /// The prompt enhancer's causal-LM decoder with a KV cache, optional.
    TextDecoder,
    /// SigLIP2 vision encoder of the editing (Omni) models: reference patches -> vision
    /// tokens, optional (`siglip`).
    VisionEncoder,
    /// The transformer in Omni mode (caption, reference latents and vision tokens in one
    /// stream, per-token timesteps), optional: the editing pipeline's denoiser.
    TransformerOmni,
}

impl GraphKind {
    /// Every kind, in manifest order.
    pub const ALL: [GraphKind; 9] = [
        GraphKind::TextEncoder,
        GraphKind::Transformer,
        GraphKind::VaeDecoder,
        GraphKind::VaeDecoderCpu,
        GraphKind::VaeDecoderInt8,
        GraphKind::VaeEncoder,
        GraphKind::TextDecoder,
        GraphKind::VisionEncoder,
        GraphKind::TransformerOmni,
    ];

    /// The graph's key in `manifest.json` (`graphs.<name>`), also its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            GraphKind::TextEncoder => "text_encoder",
            GraphKind::Transformer => "transformer",
            GraphKind::VaeDecoder => "vae_decoder",
            GraphKind::VaeDecoderCpu => "vae_decoder_cpu",
            GraphKind::VaeDecoderInt8 => "vae_decoder_int8",
            GraphKind::VaeEncoder => "vae_encoder",
            GraphKind::TextDecoder => "text_decoder",
            GraphKind::VisionEncoder => "siglip",
            GraphKind::TransformerOmni => "transformer_omni",
        }
    }

    /// Whether every Z-Image package must have this graph.
    pub fn is_required(self) -> bool {
        match self {
            GraphKind::TextEncoder | GraphKind::Transformer | GraphKind::VaeDecoder | GraphKind::VaeEncoder => true,
            GraphKind::VaeDecoderCpu
            | GraphKind::VaeDecoderInt8
            | GraphKind::TextDecoder
            | GraphKind::VisionEncoder
            | GraphKind::TransformerOmni => false,
        }
    }

    /// Whether the graph is one of the VAE's (convolutional image networks).
    pub fn is_vae(self) -> bool {
        match self {
            GraphKind::VaeDecoder | GraphKind::VaeDecoderCpu | GraphKind::VaeDecoderInt8 | GraphKind::VaeEncoder => {
                true
            }
            GraphKind::TextEncoder
            | GraphKind::Transformer
            | GraphKind::TextDecoder
            | GraphKind::VisionEncoder
            | GraphKind::TransformerOmni => false,
        }
    }
}

impl std::fmt::Display for GraphKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One graph file of a package.
#[derive(Debug, Clone, Deserialize)]
pub struct GraphEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    #[serde(default)]
    pub external_data: Option<FileEntry>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// The same graph as ONNX Runtime's CPU provider rewrites it for one NCHWc block width,
    /// saved at export so that a load on such a CPU skips the rewrite (optional).
    #[serde(default)]
    pub cpu_layout: Option<CpuLayout>,
    /// The same graph optimised for the CPU with its packed GEMM weights saved (optional; the
    /// float transformer).
    #[serde(default)]
    pub cpu_prepacked: Option<CpuPrepacked>,
}

/// A graph after ONNX Runtime's level-ALL CPU optimisation (its convolutions in the blocked
/// NCHWc layout), as `export-scripts/zimage_export/cpu_layout.py` saves it: same inputs,
/// outputs and results as the portable graph, but only valid where the CPU provider uses
/// `nchwc_block`-wide channel blocks (16 with AVX-512, 8 with AVX2).
#[derive(Debug, Clone, Deserialize)]
pub struct CpuLayout {
    pub nchwc_block: u32,
    /// The ONNX Runtime version that wrote it (a record; the runtime checks the block width).
    #[serde(default)]
    pub onnxruntime: Option<String>,
    /// The layout's graph file (`path`, `bytes`, `sha256` in the entry).
    #[serde(flatten)]
    pub file: FileEntry,
    #[serde(default)]
    pub external_data: Option<FileEntry>,
}

/// A graph after ONNX Runtime's level-ALL CPU optimisation with the weights its MatMul, Gemm
/// and FusedMatMul kernels pack (MLAS's GEMM layout) saved beside the plain ones, as
/// `export-scripts/zimage_export/prepacked.py` writes it. Loading it maps the packed copies
/// from the file instead of writing them into fresh memory. The packed bytes are only valid for
/// the kernels that wrote them, so the runtime loads the layout only where `probe` computes
/// exactly ([`crate::runtime::prepack_probe`]).
#[derive(Debug, Clone, Deserialize)]
pub struct CpuPrepacked {
    /// The ONNX Runtime version that wrote it (a record; the probe decides).
    #[serde(default)]
    pub onnxruntime: Option<String>,
    /// The processor architecture of the machine that wrote it, as Rust names it (`x86_64`,
    /// `aarch64`): the layout is used only on the same one. MLAS packs differently on other
    /// architectures (KleidiAI's kernels on Arm), and packed copies of another size could be
    /// read past their end, so the probe is not even run there.
    #[serde(default)]
    pub arch: Option<String>,
    /// Bytes appended to the graph's external data file that only this layout reads (its packed
    /// copies): not counted as weights.
    #[serde(default)]
    pub extra_bytes: u64,
    /// The layout's graph file.
    #[serde(flatten)]
    pub file: FileEntry,
    /// The layout's own data file, for a graph that keeps its weights inside the .onnx; without
    /// one, the layout reads the graph's external data file (its unchanged tensors where the
    /// graph reads them, the rest appended).
    #[serde(default)]
    pub external_data: Option<FileEntry>,
    pub probe: PrepackProbe,
}

/// A small graph saved the same way as its [`CpuPrepacked`] layout, whose one output is 0
/// exactly where this runtime reads those packed weights as they were written.
#[derive(Debug, Clone, Deserialize)]
pub struct PrepackProbe {
    #[serde(flatten)]
    pub file: FileEntry,
    #[serde(default)]
    pub external_data: Option<FileEntry>,
}

impl GraphEntry {
    /// The graph file and its external data file, if any, then the same for its CPU layout,
    /// then its prepacked layout and that layout's probe.
    pub fn files(&self) -> impl Iterator<Item = FileEntry> + '_ {
        let graph = FileEntry { path: self.path.clone(), bytes: self.bytes, sha256: self.sha256.clone() };
        let layout =
            self.cpu_layout.iter().flat_map(|l| std::iter::once(l.file.clone()).chain(l.external_data.clone()));
        let prepacked = self.cpu_prepacked.iter().flat_map(|p| {
            std::iter::once(p.file.clone())
                .chain(p.external_data.clone())
                .chain(std::iter::once(p.probe.file.clone()))
                .chain(p.probe.external_data.clone())
        });
        std::iter::once(graph).chain(self.external_data.clone()).chain(layout).chain(prepacked)
    }

    /// Checks the declared inputs and outputs against what the network that runs this graph
    /// needs (names and element types, in order). The caller knows the names.
    pub(crate) fn check_interface(
        &self,
        kind: GraphKind,
        inputs: &[(&str, &str)],
        outputs: &[(&str, &str)],
    ) -> std::result::Result<(), String> {
        check_specs(kind, "input", &self.inputs, inputs)?;
        check_specs(kind, "output", &self.outputs, outputs)
    }
}

fn check_specs(
    kind: GraphKind,
    what: &str,
    actual: &[TensorSpec],
    expected: &[(&str, &str)],
) -> std::result::Result<(), String> {
    let matches =
        actual.len() == expected.len() && actual.iter().zip(expected).all(|(a, (n, t))| a.name == *n && a.dtype == *t);
    if matches {
        return Ok(());
    }
    let want: Vec<String> = expected.iter().map(|(n, t)| format!("{n}:{t}")).collect();
    let got: Vec<String> = actual.iter().map(TensorSpec::to_string).collect();
    Err(format!("graph {kind} has {what}s [{}], this runtime needs [{}]", got.join(", "), want.join(", ")))
}

/// A graph input or output as the manifest declares it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
}

/// `name:dtype`, as error messages list them.
impl std::fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.dtype)
    }
}

/// The `graphs` section of a model package manifest.
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
    /// The same VAE decoder with the convolutions of its up blocks after the first in int8
    /// (static QDQ: `export-scripts/zimage_export/vae_int8.py`); used instead of `vae_decoder`
    /// on the CPU with `LoadOptions::int8_vae` (optional, see docs/quantization.md).
    #[serde(default)]
    pub vae_decoder_int8: Option<GraphEntry>,
    /// Causal-LM decoder with a KV cache for the prompt enhancer (optional).
    #[serde(default)]
    pub text_decoder: Option<GraphEntry>,
    /// SigLIP2 vision encoder for editing (optional; comes with `transformer_omni`).
    #[serde(default)]
    pub siglip: Option<GraphEntry>,
    /// The Omni-mode transformer for editing (optional; comes with `siglip`).
    #[serde(default)]
    pub transformer_omni: Option<GraphEntry>,
}

impl Graphs {
    /// The entry of `kind`, when the package has that graph.
    pub fn get(&self, kind: GraphKind) -> Option<&GraphEntry> {
        match kind {
            GraphKind::TextEncoder => Some(&self.text_encoder),
            GraphKind::Transformer => Some(&self.transformer),
            GraphKind::VaeDecoder => Some(&self.vae_decoder),
            GraphKind::VaeDecoderCpu => self.vae_decoder_cpu.as_ref(),
            GraphKind::VaeDecoderInt8 => self.vae_decoder_int8.as_ref(),
            GraphKind::VaeEncoder => Some(&self.vae_encoder),
            GraphKind::TextDecoder => self.text_decoder.as_ref(),
            GraphKind::VisionEncoder => self.siglip.as_ref(),
            GraphKind::TransformerOmni => self.transformer_omni.as_ref(),
        }
    }

    /// Every graph the package has, with its kind.
    pub fn iter(&self) -> impl Iterator<Item = (GraphKind, &GraphEntry)> {
        GraphKind::ALL.into_iter().filter_map(|kind| self.get(kind).map(|entry| (kind, entry)))
    }
}

#[cfg(test)]
mod tests {
    use super::GraphKind;

    #[test]
    fn names_are_the_manifest_keys() {
        let names: Vec<&str> = GraphKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            [
                "text_encoder",
                "transformer",
                "vae_decoder",
                "vae_decoder_cpu",
                "vae_decoder_int8",
                "vae_encoder",
                "text_decoder",
                "siglip",
                "transformer_omni"
            ]
        );
        let required: Vec<&str> = GraphKind::ALL.iter().filter(|k| k.is_required()).map(|k| k.name()).collect();
        assert_eq!(required, ["text_encoder", "transformer", "vae_decoder", "vae_encoder"]);
    }
}
