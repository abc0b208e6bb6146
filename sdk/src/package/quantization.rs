//! The `quantization` section of a manifest: how a package's transformer and text encoder
//! weights were quantized (weight-only int8 / int4, ONNX Runtime `MatMulNBits`;
//! docs/quantization.md). Absent in unquantized packages.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The integer width of a package's quantized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum WeightQuantization {
    Int8,
    Int4,
}

impl WeightQuantization {
    /// The name used in `manifest.json` (`quantization.weights`).
    pub fn name(self) -> &'static str {
        match self {
            WeightQuantization::Int8 => "int8",
            WeightQuantization::Int4 => "int4",
        }
    }

    pub fn bits(self) -> u32 {
        match self {
            WeightQuantization::Int8 => 8,
            WeightQuantization::Int4 => 4,
        }
    }
}

impl std::fmt::Display for WeightQuantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a package's transformer quantizes its activations: its products then run in int8 x int8
/// (docs/quantization.md, "int8 activations").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ActivationQuantization {
    /// One int8 code per value (`--activations int8`): the fastest, about twice weight-only
    /// int8's error.
    Int8,
    /// Two int8 terms per value, a code and its rounding's remainder (`--activations int8x2`):
    /// about 16-bit activations for one int8 product of twice the rows.
    Int8x2,
}

impl ActivationQuantization {
    /// The name used in `manifest.json` (`quantization.activations`).
    pub fn name(self) -> &'static str {
        match self {
            ActivationQuantization::Int8 => "int8",
            ActivationQuantization::Int8x2 => "int8x2",
        }
    }
}

impl std::fmt::Display for ActivationQuantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the quantizer did to one graph.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct QuantizedGraph {
    /// How many weights became `MatMulNBits` / `GatherBlockQuantized`.
    pub quantized: usize,
    /// The weights kept in the package precision (diffusers / transformers parameter names).
    #[serde(default)]
    pub kept: Vec<String>,
    /// Its `MatMulNBits`' accuracy_level: the package's `accuracy_level` for the transformer
    /// and the enhancer's decoder; 0 (float compute) for an int8 text encoder, which runs once
    /// per generation. Absent in packages made before 2026-12-01 (all their graphs use the
    /// package's).
    #[serde(default)]
    pub accuracy_level: Option<u32>,
}

/// The enhancer decoder's quantized LM head (`quantization.lm_head`): Qwen3 ties its LM head
/// to the token-embedding table, which a quantized package with the enhancer stores once,
/// block-quantized, read by the decoder's `MatMulNBits` head and (unless `embedding` is
/// `float`) by the token-embedding `GatherBlockQuantized` of both text graphs. Absent in
/// quantized packages made before it (their decoder's head is a float `Gemm` over the table).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct QuantizedLmHead {
    /// The `MatMulNBits` weight's initializer name.
    pub tensor: String,
    /// The float table it was quantized from (`embed_tokens.weight`).
    #[serde(default)]
    pub tied_to: String,
    pub bits: u32,
    pub block_size: u32,
    #[serde(default)]
    pub method: String,
    /// `quantized`: the token embeddings read the same quantized bytes; `float`: they read the
    /// float table (`--keep-embedding`).
    #[serde(default)]
    pub embedding: String,
}

/// `manifest.json`'s `quantization` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct QuantizationInfo {
    pub weights: WeightQuantization,
    pub bits: u32,
    /// Weights per block along a product's input dimension (one scale and zero point each).
    pub block_size: u32,
    /// The quantization method (`rtn`, `hqq`, `gptq`: the transformer's weights rounded
    /// against calibration activations, the rest `rtn`).
    pub method: String,
    #[serde(default)]
    pub symmetric: bool,
    /// `MatMulNBits`' accuracy_level (4: int8 compute on the CPU).
    #[serde(default)]
    pub accuracy_level: u32,
    /// The tool and version that wrote the weights.
    #[serde(default)]
    pub quantizer: String,
    /// By graph name (`transformer`, `text_encoder`, `text_decoder`).
    #[serde(default)]
    pub graphs: BTreeMap<String, QuantizedGraph>,
    /// Packages with the enhancer: its decoder's quantized LM head.
    #[serde(default)]
    pub lm_head: Option<QuantizedLmHead>,
    /// The text encoder's weights where they differ from `weights` (`--weights int4
    /// --text-encoder-weights int8`); absent: `weights`. The enhancer's decoder shares them.
    #[serde(default)]
    pub text_encoder_weights: Option<WeightQuantization>,
    /// `int8` / `int8x2`: the transformer's quantized products also take int8 activations,
    /// quantized per token at run time (`MatMulIntegerToFloat`; a CPU format). Absent:
    /// weight-only.
    #[serde(default)]
    pub activations: Option<ActivationQuantization>,
}

impl QuantizationInfo {
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if self.bits != self.weights.bits() {
            return Err(format!("quantization.bits {} does not match weights {}", self.bits, self.weights));
        }
        if !(16..=256).contains(&self.block_size) || !self.block_size.is_power_of_two() {
            return Err(format!("quantization.block_size {} is not a power of two in 16..=256", self.block_size));
        }
        if self.activations.is_some() && self.weights != WeightQuantization::Int8 {
            return Err(format!(
                "quantization.activations {} needs int8 weights, not {}",
                self.activations.map_or("", ActivationQuantization::name),
                self.weights
            ));
        }
        if let Some(head) = &self.lm_head {
            if head.bits != 4 && head.bits != 8 {
                return Err(format!("quantization.lm_head.bits {} is neither 4 nor 8", head.bits));
            }
            if !(16..=256).contains(&head.block_size) || !head.block_size.is_power_of_two() {
                return Err(format!(
                    "quantization.lm_head.block_size {} is not a power of two in 16..=256",
                    head.block_size
                ));
            }
        }
        Ok(())
    }

    /// Whether the text encoder and the enhancer's decoder of a package with `has_decoder`
    /// may prepack their weights. Quantized text graphs must (unpacked, ONNX Runtime's CPU
    /// `MatMulNBits` dequantizes every weight on every call: an int4 decoder ran 5.7x slower
    /// than fp32). But in a package with the enhancer made before the quantized LM head, the
    /// decoder's head is a float `Gemm` over the shared embedding table, and prepacking would
    /// copy that whole table into each session: those packages keep sharing the mapped file
    /// unpacked (slow; re-quantize them with export-scripts/quantize_package.py).
    pub fn text_graphs_prepack(&self, has_decoder: bool) -> bool {
        !has_decoder || self.lm_head.is_some()
    }

    /// Whether the transformer's products take int8 activations, in one term or two (a CPU-only
    /// format).
    pub fn int8_activations(&self) -> bool {
        self.activations.is_some()
    }

    /// The text encoder's (and the enhancer decoder's) weights.
    pub fn text_encoder_weights(&self) -> WeightQuantization {
        self.text_encoder_weights.unwrap_or(self.weights)
    }

    /// One line for people and image metadata: `int8 rtn, block 32`, then `, int8 activations`
    /// when the transformer takes them and `, int8 text encoder` when its width differs.
    pub fn summary(&self) -> String {
        let activations = match self.activations {
            Some(a) => format!(", {a} activations"),
            None => String::new(),
        };
        let text_encoder = match self.text_encoder_weights {
            Some(w) if w != self.weights => format!(", {w} text encoder"),
            _ => String::new(),
        };
        format!("{} {}, block {}{activations}{text_encoder}", self.weights, self.method, self.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> QuantizationInfo {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn parses_the_lm_head_of_an_enhanced_package() {
        let q = parse(
            r#"{"weights": "int4", "bits": 4, "block_size": 32, "method": "rtn",
                "lm_head": {"tensor": "lm_head.weight_Q4", "tied_to": "embed_tokens.weight", "bits": 4,
                            "block_size": 32, "method": "rtn", "embedding": "quantized",
                            "embedding_tensor": "embed_tokens.weight_Q4", "gathers_quantized": 2}}"#,
        );
        let head = q.lm_head.as_ref().unwrap();
        assert_eq!((head.tensor.as_str(), head.bits, head.block_size), ("lm_head.weight_Q4", 4, 32));
        assert_eq!(head.embedding, "quantized");
        assert_eq!(q.check(), Ok(()));
        assert!(q.text_graphs_prepack(true));
        let mut odd = q.clone();
        odd.lm_head.as_mut().unwrap().bits = 3;
        assert!(odd.check().unwrap_err().contains("lm_head.bits 3"));
    }

    #[test]
    fn parses_and_checks_a_section() {
        let q = parse(
            r#"{"weights": "int4", "bits": 4, "block_size": 32, "method": "rtn", "symmetric": false,
                "accuracy_level": 4, "quantizer": "onnxruntime 1.31.1 MatMulNBitsQuantizer",
                "graphs": {"transformer": {"quantized": 31, "kept": ["cap_embedder.1.weight"]}}}"#,
        );
        assert_eq!(q.weights, WeightQuantization::Int4);
        assert_eq!(q.graphs["transformer"].quantized, 31);
        assert_eq!(q.summary(), "int4 rtn, block 32");
        assert_eq!(q.text_encoder_weights(), WeightQuantization::Int4);
        assert_eq!(q.check(), Ok(()));
        let mixed = QuantizationInfo { text_encoder_weights: Some(WeightQuantization::Int8), ..q.clone() };
        assert_eq!(mixed.summary(), "int4 rtn, block 32, int8 text encoder");
        assert_eq!(mixed.text_encoder_weights(), WeightQuantization::Int8);
        let parsed = parse(
            r#"{"weights": "int4", "bits": 4, "block_size": 32, "method": "gptq", "text_encoder_weights": "int8"}"#,
        );
        assert_eq!(parsed.text_encoder_weights, Some(WeightQuantization::Int8));
        assert_eq!(parsed.summary(), "int4 gptq, block 32, int8 text encoder");
        let wrong_bits = QuantizationInfo { bits: 8, ..q.clone() };
        assert!(wrong_bits.check().unwrap_err().contains("does not match"));
        let odd_block = QuantizationInfo { block_size: 48, ..q.clone() };
        assert!(odd_block.check().unwrap_err().contains("block_size 48"));
        let huge_block = QuantizationInfo { block_size: 512, ..q.clone() };
        assert!(huge_block.check().is_err());
        assert!(q.lm_head.is_none());
        assert!(q.text_graphs_prepack(false));
        assert!(
            !q.text_graphs_prepack(true),
            "an enhanced package without a quantized LM head shares its file unpacked"
        );
        assert!(serde_json::from_str::<QuantizationInfo>(
            r#"{"weights": "int3", "bits": 3, "block_size": 32, "method": "rtn"}"#
        )
        .is_err());
    }
}
