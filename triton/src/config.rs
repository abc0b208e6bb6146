//! A model's configuration (Triton's JSON form of `config.pbtxt`): its tensors are checked
//! against [`crate::interface`], its `parameters` become [`ModelSettings`].

use std::path::{Path, PathBuf};

use serde_json::Value;
use zimage::Device;

use crate::interface::{self, TensorSpec};

/// Where a model's pipelines run, before the instance's device index is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    TensorRt,
}

/// The `parameters` a zimage model understands.
pub const PARAMETERS: &[(&str, &str)] = &[
    ("package", "the model package folder, absolute or relative to the model's version folder [model]"),
    ("device", "cpu, cuda or tensorrt [cpu for KIND_CPU instances, cuda for KIND_GPU]"),
    ("threads", "ONNX Runtime intra-op threads per graph and instance [one per physical core]"),
    ("onnxruntime_library", "the ONNX Runtime shared library [$ORT_DYLIB_PATH, then beside libtriton_zimage.so]"),
    ("max_prompt_bytes", "longest PROMPT / NEGATIVE_PROMPT accepted, in UTF-8 bytes [16384]"),
    ("max_count", "largest COUNT accepted (also sizes TensorRT profiles) [4]"),
    ("allow_cpu_fallback", "true: run on the CPU when the GPU provider cannot be set up [false]"),
    ("tensorrt_cache", "TensorRT engine and timing cache folder, kept per node [~/.cache/zimage/tensorrt]"),
    ("tensorrt_guidance", "true: TensorRT profiles also cover GUIDANCE > 0 (twice the batch) [false]"),
    ("winograd_vae", "true: decode with the package's Winograd VAE decoder on the CPU [false]"),
    ("int8_vae", "true: decode with the package's int8 VAE decoder on the CPU: faster, lossy [false]"),
    ("vae_tiling", "SIZE or SIZE:OVERLAP pixels: decode larger images in overlapping tiles, less memory [off]"),
    ("controlnet", "a ControlNet of the package (export_controlnet.py) to load, for CONTROL_IMAGE requests [none]"),
    ("loras", "LoRA adapters merged into the transformer: FILE[:SCALE] separated by ';', relative to the version folder [none]"),
];

pub const DEFAULT_MAX_PROMPT_BYTES: usize = 16384;
pub const DEFAULT_MAX_COUNT: u32 = 4;

/// What a model's configuration asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// The package folder (resolved against the version folder).
    pub package: PathBuf,
    /// `None`: decided by each instance's kind.
    pub device: Option<DeviceKind>,
    pub threads: Option<usize>,
    pub onnxruntime_library: Option<PathBuf>,
    pub max_prompt_bytes: usize,
    pub max_count: u32,
    pub allow_cpu_fallback: bool,
    pub tensorrt_cache: Option<PathBuf>,
    pub tensorrt_guidance: bool,
    pub winograd_vae: bool,
    pub int8_vae: bool,
    pub vae_tiling: Option<zimage::VaeTiling>,
    /// The package's ControlNet loaded as the transformer (CONTROL_IMAGE requests).
    pub controlnet: Option<String>,
    /// LoRA files (resolved against the version folder) merged into the transformer.
    pub loras: Vec<zimage::LoraFile>,
}

impl ModelSettings {
    /// Reads and checks a model configuration. `version_dir` is `<repository>/<model>/<version>`.
    pub fn from_config(config: &str, version_dir: &Path) -> Result<ModelSettings, String> {
        let config: Value =
            serde_json::from_str(config).map_err(|e| format!("the model configuration is not JSON: {e}"))?;
        let max_batch_size = config.get("max_batch_size").map(as_i64).transpose()?.unwrap_or(0);
        if max_batch_size != 0 {
            return Err(format!(
                "max_batch_size must be 0 (got {max_batch_size}): requests carry no batch dimension; COUNT asks for several images"
            ));
        }
        check_tensors(&config, "input", interface::INPUTS)?;
        check_tensors(&config, "output", interface::OUTPUTS)?;

        let mut settings = ModelSettings {
            package: version_dir.join("model"),
            device: None,
            threads: None,
            onnxruntime_library: None,
            max_prompt_bytes: DEFAULT_MAX_PROMPT_BYTES,
            max_count: DEFAULT_MAX_COUNT,
            allow_cpu_fallback: false,
            tensorrt_cache: None,
            tensorrt_guidance: false,
            winograd_vae: false,
            int8_vae: false,
            vae_tiling: None,
            controlnet: None,
            loras: Vec::new(),
        };
        let empty = serde_json::Map::new();
        let parameters = match config.get("parameters") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(map)) => map,
            Some(_) => return Err("parameters must be a map".into()),
        };
        for (key, value) in parameters {
            let text = value
                .get("string_value")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("parameter {key:?} has no string_value"))?
                .trim();
            match key.as_str() {
                "package" => settings.package = version_dir.join(nonempty(key, text)?),
                "device" => {
                    settings.device = Some(match text {
                        "cpu" => DeviceKind::Cpu,
                        "cuda" => DeviceKind::Cuda,
                        "tensorrt" | "trt" => DeviceKind::TensorRt,
                        _ => {
                            return Err(format!(
                                "parameter device: {text:?} is not cpu, cuda or tensorrt (the GPU index comes from the instance group's gpus)"
                            ))
                        }
                    })
                }
                "threads" => settings.threads = Some(number(key, text, 1, 1024)? as usize),
                "onnxruntime_library" => settings.onnxruntime_library = Some(PathBuf::from(nonempty(key, text)?)),
                "max_prompt_bytes" => settings.max_prompt_bytes = number(key, text, 1, 1 << 20)? as usize,
                "max_count" => settings.max_count = number(key, text, 1, zimage::MAX_IMAGES_PER_REQUEST as u64)? as u32,
                "allow_cpu_fallback" => settings.allow_cpu_fallback = boolean(key, text)?,
                "tensorrt_cache" => settings.tensorrt_cache = Some(PathBuf::from(nonempty(key, text)?)),
                "tensorrt_guidance" => settings.tensorrt_guidance = boolean(key, text)?,
                "winograd_vae" => settings.winograd_vae = boolean(key, text)?,
                "int8_vae" => settings.int8_vae = boolean(key, text)?,
                "vae_tiling" => {
                    settings.vae_tiling = Some(text.parse().map_err(|e| format!("parameter vae_tiling: {e}"))?)
                }
                "controlnet" => settings.controlnet = Some(nonempty(key, text)?.to_string()),
                "loras" => {
                    for item in text.split(';').map(str::trim).filter(|i| !i.is_empty()) {
                        let mut file: zimage::LoraFile =
                            item.parse().map_err(|e: zimage::Error| format!("parameter loras: {item:?}: {e}"))?;
                        file.path = version_dir.join(&file.path);
                        settings.loras.push(file);
                    }
                }
                _ => {
                    let known: Vec<&str> = PARAMETERS.iter().map(|(k, _)| *k).collect();
                    return Err(format!("unknown parameter {key:?} (known: {})", known.join(", ")));
                }
            }
        }
        Ok(settings)
    }

    /// The device one instance's pipeline runs on, from the instance's kind
    /// (`TRITONSERVER_InstanceGroupKind`) and device index.
    pub fn instance_device(&self, kind: crate::api::InstanceGroupKind, device_id: i32) -> Result<Device, String> {
        use crate::api::{INSTANCEGROUPKIND_CPU, INSTANCEGROUPKIND_GPU};
        match (kind, self.device) {
            (INSTANCEGROUPKIND_CPU, None | Some(DeviceKind::Cpu)) => Ok(Device::Cpu),
            (INSTANCEGROUPKIND_CPU, Some(other)) => {
                Err(format!("a KIND_CPU instance cannot run on device {other:?}: use KIND_GPU with gpus: [...]"))
            }
            (INSTANCEGROUPKIND_GPU, None | Some(DeviceKind::Cuda)) => Ok(Device::Cuda { device_id }),
            (INSTANCEGROUPKIND_GPU, Some(DeviceKind::TensorRt)) => Ok(Device::TensorRt { device_id }),
            (INSTANCEGROUPKIND_GPU, Some(DeviceKind::Cpu)) => {
                Err("parameter device is cpu but the instance group is KIND_GPU: use KIND_CPU".into())
            }
            (other, _) => Err(format!("instance kind {other} is not supported: use KIND_CPU or KIND_GPU")),
        }
    }

    /// The SDK's load options for one instance.
    pub fn load_options(&self, device: Device) -> zimage::LoadOptions {
        let mut options = zimage::LoadOptions::default();
        options.device = device;
        options.threads = self.threads;
        options.runtime_library = self.onnxruntime_library.clone();
        options.allow_cpu_fallback = self.allow_cpu_fallback;
        options.winograd_vae = self.winograd_vae;
        options.int8_vae = self.int8_vae;
        options.vae_tiling = self.vae_tiling;
        options.controlnet = self.controlnet.clone();
        options.gpu.tensorrt.cache_dir = self.tensorrt_cache.clone();
        options.gpu.tensorrt.max_images = self.max_count;
        options.gpu.tensorrt.guidance = self.tensorrt_guidance;
        options
    }
}

/// Each declared input (output) must be one of `specs`, with its type and shape; the ones
/// `specs` marks required must be declared, and not as optional.
fn check_tensors(config: &Value, kind: &str, specs: &[TensorSpec]) -> Result<(), String> {
    let declared = match config.get(kind) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => return Err(format!("{kind} must be a list")),
    };
    let mut seen = Vec::new();
    for tensor in &declared {
        let name = tensor.get("name").and_then(Value::as_str).ok_or_else(|| format!("an {kind} has no name"))?;
        let spec = specs.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
            format!("{kind} {name:?} is not one of this backend's: {}", names.join(", "))
        })?;
        let data_type = tensor.get("data_type").and_then(Value::as_str).unwrap_or("");
        if data_type != spec.data_type.config_name() {
            return Err(format!(
                "{kind} {name}: data_type must be {} (got {data_type:?})",
                spec.data_type.config_name()
            ));
        }
        let dims = tensor
            .get("dims")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{kind} {name} has no dims"))?
            .iter()
            .map(as_i64)
            .collect::<Result<Vec<_>, _>>()?;
        if dims != spec.dims {
            return Err(format!("{kind} {name}: dims must be {:?} (got {dims:?})", spec.dims));
        }
        if kind == "input" && !spec.optional && tensor.get("optional").and_then(Value::as_bool) == Some(true) {
            return Err(format!("input {name} is required by the backend and cannot be optional"));
        }
        seen.push(name);
    }
    for spec in specs.iter().filter(|s| !s.optional) {
        if !seen.contains(&spec.name) {
            return Err(format!("the configuration must declare the {kind} {}", spec.name));
        }
    }
    Ok(())
}

/// protobuf's JSON writes 64-bit integers as strings.
fn as_i64(value: &Value) -> Result<i64, String> {
    match value {
        Value::Number(n) => n.as_i64().ok_or_else(|| format!("{n} is not an integer")),
        Value::String(s) => s.parse().map_err(|_| format!("{s:?} is not an integer")),
        other => Err(format!("{other} is not an integer")),
    }
}

fn nonempty<'a>(key: &str, text: &'a str) -> Result<&'a str, String> {
    if text.is_empty() {
        Err(format!("parameter {key} is empty"))
    } else {
        Ok(text)
    }
}

fn number(key: &str, text: &str, min: u64, max: u64) -> Result<u64, String> {
    text.parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("parameter {key}: {text:?} is not an integer in {min}..={max}"))
}

fn boolean(key: &str, text: &str) -> Result<bool, String> {
    match text {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("parameter {key}: {text:?} is not true or false")),
    }
}
