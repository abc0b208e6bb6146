//! The numeric precision a package's weights were exported in.

use serde::Deserialize;

/// How a package stores its transformer and text-encoder weights (inputs and outputs of every
/// graph stay float32). New precisions (weight-only int8 / int4) are added here, and the
/// compiler then points at every place that must decide what they mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    /// The name used in `manifest.json`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }

    /// Whether ONNX Runtime's CPU provider has kernels for every node such a package uses.
    /// It has no bfloat16 kernels: a bf16 package fails there on its first node with "Could not
    /// find an implementation", so loading it on the CPU is refused up front.
    pub fn runs_on_cpu(self) -> bool {
        match self {
            Precision::Fp32 | Precision::Fp16 => true,
            Precision::Bf16 => false,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::Precision;

    #[test]
    fn names_round_trip_through_json() {
        for p in [Precision::Fp32, Precision::Fp16, Precision::Bf16] {
            let parsed: Precision = serde_json::from_str(&format!("\"{}\"", p.name())).unwrap();
            assert_eq!(parsed, p);
        }
        assert!(serde_json::from_str::<Precision>("\"int3\"").is_err());
    }
}
