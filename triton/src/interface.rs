//! The model's tensors: one table that the backend checks a model configuration against and
//! that `zimage triton-repo` writes into `config.pbtxt`.

use crate::api;

/// The Triton data types this model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Uint8,
    Uint64,
    Int32,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    /// The `TRITONSERVER_DataType` value.
    pub fn code(self) -> api::DataTypeCode {
        match self {
            DataType::Uint8 => api::TYPE_UINT8,
            DataType::Uint64 => api::TYPE_UINT64,
            DataType::Int32 => api::TYPE_INT32,
            DataType::Fp32 => api::TYPE_FP32,
            DataType::Fp64 => api::TYPE_FP64,
            DataType::Bytes => api::TYPE_BYTES,
        }
    }

    pub fn from_code(code: api::DataTypeCode) -> Option<DataType> {
        [DataType::Uint8, DataType::Uint64, DataType::Int32, DataType::Fp32, DataType::Fp64, DataType::Bytes]
            .into_iter()
            .find(|d| d.code() == code)
    }

    /// The name in a model configuration (`data_type: TYPE_UINT8`).
    pub fn config_name(self) -> &'static str {
        match self {
            DataType::Uint8 => "TYPE_UINT8",
            DataType::Uint64 => "TYPE_UINT64",
            DataType::Int32 => "TYPE_INT32",
            DataType::Fp32 => "TYPE_FP32",
            DataType::Fp64 => "TYPE_FP64",
            DataType::Bytes => "TYPE_STRING",
        }
    }

    /// The name on the wire (KServe v2 protocol, clients): `UINT8`, `BYTES`, ...
    pub fn wire_name(self) -> &'static str {
        match self {
            DataType::Uint8 => "UINT8",
            DataType::Uint64 => "UINT64",
            DataType::Int32 => "INT32",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Bytes per element; `None` for variable-size BYTES.
    pub fn size(self) -> Option<usize> {
        match self {
            DataType::Uint8 => Some(1),
            DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }
}

/// One tensor of the model's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub data_type: DataType,
    /// Shape without a batch dimension (`max_batch_size: 0`); -1 is any size.
    pub dims: &'static [i64],
    pub optional: bool,
    pub doc: &'static str,
}

const fn input(
    name: &'static str,
    data_type: DataType,
    dims: &'static [i64],
    optional: bool,
    doc: &'static str,
) -> TensorSpec {
    TensorSpec { name, data_type, dims, optional, doc }
}

/// Inputs, in the order `config.pbtxt` lists them.
pub const INPUTS: &[TensorSpec] = &[
    input("PROMPT", DataType::Bytes, &[1], false, "what to draw (UTF-8)"),
    input("NEGATIVE_PROMPT", DataType::Bytes, &[1], true, "what to steer away from; used only with GUIDANCE > 0"),
    input("WIDTH", DataType::Int32, &[1], true, "image width, a multiple of 16 [1024, or INIT_IMAGE's]"),
    input("HEIGHT", DataType::Int32, &[1], true, "image height, a multiple of 16 [1024, or INIT_IMAGE's]"),
    input("STEPS", DataType::Int32, &[1], true, "denoising steps [8]"),
    input("GUIDANCE", DataType::Fp32, &[1], true, "classifier-free guidance scale, 0 = off [0]"),
    input(
        "CFG_NORMALIZATION",
        DataType::Fp32,
        &[1],
        true,
        "with GUIDANCE: caps the guided prediction's norm at this times the conditional one's, 0 = off [the package's]",
    ),
    input(
        "CFG_TRUNCATION",
        DataType::Fp32,
        &[1],
        true,
        "with GUIDANCE: guidance stops after this fraction of the denoising, 1 = never [the package's]",
    ),
    input("SEED", DataType::Uint64, &[1], true, "noise seed [random, returned in the SEED output]"),
    input("COUNT", DataType::Int32, &[1], true, "images from one noise tensor [1]"),
    input("INIT_IMAGE", DataType::Uint8, &[-1, -1, 3], true, "image-to-image start picture, RGB [H, W, 3]"),
    input(
        "MASK",
        DataType::Uint8,
        &[-1, -1],
        true,
        "inpainting mask [H, W], resized to the output size if another, white = repaint",
    ),
    input("STRENGTH", DataType::Fp64, &[1], true, "how much of INIT_IMAGE is regenerated, 0..1 [0.6; 1.0 with MASK]"),
    input(
        "CONTROL_IMAGE",
        DataType::Uint8,
        &[-1, -1, 3],
        true,
        "ControlNet control map, RGB [H, W, 3] (parameter controlnet); with INIT_IMAGE and MASK: ControlNet inpainting",
    ),
    input("CONTROL_SCALE", DataType::Fp32, &[1], true, "ControlNet conditioning scale [0.75]"),
    input(
        "CONTROL_PREPROCESS",
        DataType::Bytes,
        &[1],
        true,
        "none, canny or canny:LOW:HIGH (edges from a photo) [none]",
    ),
    input(
        "REFERENCE_IMAGES",
        DataType::Bytes,
        &[-1],
        true,
        "editing packages (Z-Image-Omni): pictures to edit by the PROMPT's instruction, encoded files (PNG, JPEG, \
         WebP), in order; the last sets the output size without WIDTH/HEIGHT [none]",
    ),
];

/// Outputs.
pub const OUTPUTS: &[TensorSpec] = &[
    input("IMAGE", DataType::Uint8, &[-1, -1, -1, 3], false, "the images, RGB [COUNT, HEIGHT, WIDTH, 3]"),
    input("SEED", DataType::Uint64, &[1], false, "the seed used"),
];

pub fn input_spec(name: &str) -> Option<&'static TensorSpec> {
    INPUTS.iter().find(|t| t.name == name)
}

pub fn output_spec(name: &str) -> Option<&'static TensorSpec> {
    OUTPUTS.iter().find(|t| t.name == name)
}
