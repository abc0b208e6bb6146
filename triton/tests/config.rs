//! Model configurations: the JSON Triton 2.51 gave for the config.pbtxt that `zimage
//! triton-repo` writes (tests/fixtures/model_config.json, from GET /v2/models/zimage/config),
//! and edits of it that must be refused with a clear reason.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use triton_zimage::api::{
    INSTANCEGROUPKIND_AUTO, INSTANCEGROUPKIND_CPU, INSTANCEGROUPKIND_GPU, INSTANCEGROUPKIND_MODEL,
};
use triton_zimage::config::{DeviceKind, ModelSettings, DEFAULT_MAX_COUNT, DEFAULT_MAX_PROMPT_BYTES};
use zimage::Device;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model_config.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn settings(config: &Value) -> Result<ModelSettings, String> {
    ModelSettings::from_config(&config.to_string(), Path::new("/models/zimage/1"))
}

fn with_parameter(key: &str, value: &str) -> Value {
    let mut config = fixture();
    config["parameters"][key] = json!({ "string_value": value });
    config
}

fn error(config: &Value) -> String {
    settings(config).expect_err("the configuration must be refused")
}

#[test]
fn the_generated_configuration_is_accepted_with_its_parameters() {
    let s = settings(&fixture()).unwrap();
    assert_eq!(s.package, PathBuf::from("/models/zimage/1/model"));
    assert_eq!(s.device, Some(DeviceKind::Cpu));
    assert_eq!(s.threads, Some(1));
    assert_eq!(s.max_prompt_bytes, DEFAULT_MAX_PROMPT_BYTES);
    assert_eq!(s.max_count, DEFAULT_MAX_COUNT);
    assert!(!s.allow_cpu_fallback);
    assert_eq!(s.onnxruntime_library, None);
    assert_eq!(s.controlnet, None);
    // Made before the ControlNet inputs existed: a configuration that leaves optional inputs
    // out is still accepted.
    assert!(!fixture().to_string().contains("CONTROL_IMAGE"));
}

#[test]
fn the_loras_parameter_lists_files_with_scales() {
    let s = settings(&with_parameter("loras", "loras/a.safetensors:0.5; /abs/b.safetensors ;")).unwrap();
    let files: Vec<(PathBuf, f32)> = s.loras.iter().map(|f| (f.path.clone(), f.scale)).collect();
    assert_eq!(
        files,
        [(PathBuf::from("/models/zimage/1/loras/a.safetensors"), 0.5), (PathBuf::from("/abs/b.safetensors"), 1.0)]
    );
    assert!(settings(&fixture()).unwrap().loras.is_empty());
    let e = error(&with_parameter("loras", "a.safetensors:nan"));
    assert!(e.contains("parameter loras") && e.contains("not finite"), "{e}");
}

#[test]
fn the_controlnet_parameter_loads_it() {
    let s = settings(&with_parameter("controlnet", "union-2.1")).unwrap();
    assert_eq!(s.controlnet.as_deref(), Some("union-2.1"));
    assert_eq!(s.load_options(Device::Cpu).controlnet.as_deref(), Some("union-2.1"));
    assert!(error(&with_parameter("controlnet", " ")).contains("controlnet"));
}

#[test]
fn dims_written_as_strings_are_read_too() {
    // protobuf's JSON writes int64 as strings; Triton's HTTP API as numbers.
    let mut config = fixture();
    for kind in ["input", "output"] {
        for tensor in config[kind].as_array_mut().unwrap() {
            let dims: Vec<Value> = tensor["dims"].as_array().unwrap().iter().map(|d| json!(d.to_string())).collect();
            tensor["dims"] = json!(dims);
        }
    }
    assert!(settings(&config).is_ok());
}

#[test]
fn package_paths_are_relative_to_the_version_folder_unless_absolute() {
    assert_eq!(
        settings(&with_parameter("package", "pkg/tiny")).unwrap().package,
        PathBuf::from("/models/zimage/1/pkg/tiny")
    );
    assert_eq!(settings(&with_parameter("package", "/srv/zimage")).unwrap().package, PathBuf::from("/srv/zimage"));
    assert!(error(&with_parameter("package", " ")).contains("package is empty"));
}

#[test]
fn parameters_are_parsed_and_checked() {
    let s = settings(&with_parameter("max_count", "16")).unwrap();
    assert_eq!(s.max_count, 16);
    assert_eq!(s.load_options(Device::Cpu).gpu.tensorrt.max_images, 16);
    assert_eq!(settings(&with_parameter("max_prompt_bytes", "100")).unwrap().max_prompt_bytes, 100);
    assert!(settings(&with_parameter("allow_cpu_fallback", "true")).unwrap().allow_cpu_fallback);
    assert!(settings(&with_parameter("winograd_vae", "yes")).unwrap().winograd_vae);
    let int8 = settings(&with_parameter("int8_vae", "true")).unwrap();
    assert!(int8.int8_vae && int8.load_options(Device::Cpu).int8_vae);
    assert!(!settings(&with_parameter("winograd_vae", "yes")).unwrap().load_options(Device::Cpu).int8_vae);
    let tiled = settings(&with_parameter("vae_tiling", "512")).unwrap();
    assert_eq!(tiled.load_options(Device::Cpu).vae_tiling, Some(zimage::VaeTiling { tile_size: 512, overlap: 128 }));
    assert_eq!(
        settings(&with_parameter("vae_tiling", "256:32")).unwrap().vae_tiling,
        Some(zimage::VaeTiling { tile_size: 256, overlap: 32 })
    );
    assert!(error(&with_parameter("vae_tiling", "wide"))
        .contains("parameter vae_tiling: invalid request: \"wide\" is not SIZE"));
    let guided = settings(&with_parameter("tensorrt_guidance", "true")).unwrap();
    assert!(guided.load_options(Device::TensorRt { device_id: 0 }).gpu.tensorrt.guidance);
    assert!(!s.load_options(Device::Cpu).gpu.tensorrt.guidance);
    assert_eq!(settings(&with_parameter("device", "tensorrt")).unwrap().device, Some(DeviceKind::TensorRt));
    assert_eq!(
        settings(&with_parameter("tensorrt_cache", "/var/cache/trt")).unwrap().tensorrt_cache,
        Some(PathBuf::from("/var/cache/trt"))
    );
    assert!(error(&with_parameter("max_count", "65")).contains("max_count: \"65\" is not an integer in 1..=64"));
    assert!(error(&with_parameter("threads", "0")).contains("threads"));
    assert!(error(&with_parameter("allow_cpu_fallback", "maybe")).contains("not true or false"));
    assert!(error(&with_parameter("device", "cuda:1")).contains("gpus"));
    assert!(error(&with_parameter("thread", "2")).contains("unknown parameter \"thread\""));
}

#[test]
fn the_tensors_must_match_the_backend() {
    let mut config = fixture();
    config["max_batch_size"] = json!(4);
    assert!(error(&config).contains("max_batch_size must be 0"));

    let mut config = fixture();
    config["input"][2]["data_type"] = json!("TYPE_INT64");
    assert_eq!(error(&config), "input WIDTH: data_type must be TYPE_INT32 (got \"TYPE_INT64\")");

    let mut config = fixture();
    config["input"][0]["dims"] = json!([2]);
    assert_eq!(error(&config), "input PROMPT: dims must be [1] (got [2])");

    let mut config = fixture();
    config["input"][0]["optional"] = json!(true);
    assert!(error(&config).contains("PROMPT is required by the backend"));

    let mut config = fixture();
    config["input"].as_array_mut().unwrap().remove(0);
    assert_eq!(error(&config), "the configuration must declare the input PROMPT");

    let mut config = fixture();
    config["output"].as_array_mut().unwrap().retain(|t| t["name"] != "IMAGE");
    assert_eq!(error(&config), "the configuration must declare the output IMAGE");

    let mut config = fixture();
    config["input"].as_array_mut().unwrap().push(json!({"name": "LORA", "data_type": "TYPE_STRING", "dims": [1]}));
    assert!(error(&config).starts_with("input \"LORA\" is not one of this backend's: PROMPT, NEGATIVE_PROMPT"));

    // Optional inputs may be left out of a configuration (clients then cannot send them).
    let mut config = fixture();
    config["input"].as_array_mut().unwrap().retain(|t| t["name"] == "PROMPT");
    assert!(settings(&config).is_ok());
}

#[test]
fn each_instance_runs_on_its_kind_and_device() {
    let cpu = settings(&with_parameter("device", "cpu")).unwrap();
    assert_eq!(cpu.instance_device(INSTANCEGROUPKIND_CPU, 0), Ok(Device::Cpu));
    assert!(cpu.instance_device(INSTANCEGROUPKIND_GPU, 1).unwrap_err().contains("use KIND_CPU"));

    let mut unset = fixture();
    unset["parameters"].as_object_mut().unwrap().remove("device");
    let unset = settings(&unset).unwrap();
    assert_eq!(unset.device, None);
    assert_eq!(unset.instance_device(INSTANCEGROUPKIND_CPU, 0), Ok(Device::Cpu));
    assert_eq!(unset.instance_device(INSTANCEGROUPKIND_GPU, 3), Ok(Device::Cuda { device_id: 3 }));

    let cuda = settings(&with_parameter("device", "cuda")).unwrap();
    assert_eq!(cuda.instance_device(INSTANCEGROUPKIND_GPU, 2), Ok(Device::Cuda { device_id: 2 }));
    assert!(cuda.instance_device(INSTANCEGROUPKIND_CPU, 0).unwrap_err().contains("use KIND_GPU"));

    let trt = settings(&with_parameter("device", "tensorrt")).unwrap();
    assert_eq!(trt.instance_device(INSTANCEGROUPKIND_GPU, 1), Ok(Device::TensorRt { device_id: 1 }));

    for kind in [INSTANCEGROUPKIND_MODEL, INSTANCEGROUPKIND_AUTO] {
        assert!(cpu.instance_device(kind, 0).unwrap_err().contains("not supported"));
    }
}
