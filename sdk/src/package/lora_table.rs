//! Where a diffusers Linear weight is in an exported graph: the entries of the manifest's
//! `transformer.lora_parameters` and `edit.omni_parameters` tables (docs/package-format.md),
//! which LoRAs are merged through.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Where one diffusers parameter is in the graph.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct LoraParameter {
    /// The ONNX initializer holding it.
    pub initializer: String,
    /// `"out_in"`: stored as torch stores it, `[out, in]`; `"in_out"`: transposed (MatMul's
    /// right operand).
    pub layout: String,
    /// The initializer's element type (`float32`, `float16`, `bfloat16`).
    pub dtype: String,
}

impl LoraParameter {
    /// Whether it is stored `[in, out]`.
    pub fn transposed(&self) -> bool {
        self.layout == "in_out"
    }
}

/// Checks a table's layouts (`section`: its place in the manifest, for the message).
pub(crate) fn check_table(section: &str, table: &BTreeMap<String, LoraParameter>) -> Result<(), String> {
    for (name, p) in table {
        if p.layout != "out_in" && p.layout != "in_out" {
            return Err(format!("{section}.{name}: layout {:?} is not out_in or in_out", p.layout));
        }
    }
    Ok(())
}
