//! The model repository `zimage triton-repo` writes.

use std::path::{Path, PathBuf};

use triton_zimage::config::DeviceKind;
use triton_zimage::repository::{config_pbtxt, write_repository, RepositoryOptions};
use zimage::ErrorKind;

fn package() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-zimage").canonicalize().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("triton-repository").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_cpu_repository_links_the_package() {
    let out = scratch("cpu");
    let mut options = RepositoryOptions::new(DeviceKind::Cpu);
    options.instances = 2;
    options.threads = Some(1);
    let model = write_repository(&package(), &out, &options).unwrap();
    assert_eq!(model, out.join("zimage"));
    assert_eq!(entries(&out), ["zimage"]);
    assert_eq!(entries(&model), ["1", "config.pbtxt"]);
    let link = model.join("1/model");
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_link(&link).unwrap(), package());
    let config = std::fs::read_to_string(model.join("config.pbtxt")).unwrap();
    assert_eq!(config, config_pbtxt(&options));
    assert!(config.contains("name: \"zimage\"\nbackend: \"zimage\"\n"));
    assert!(config.contains("max_batch_size: 0\n"));
    assert!(config.contains("    count: 2\n    kind: KIND_CPU\n"));
    assert!(!config.contains("gpus"));
    assert!(config.contains("{ name: \"PROMPT\" data_type: TYPE_STRING dims: [ 1 ] },"));
    assert!(config.contains("{ name: \"INIT_IMAGE\" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] optional: true },"));
    assert!(config.contains("{ name: \"STRENGTH\" data_type: TYPE_FP64 dims: [ 1 ] optional: true },"));
    assert!(config.contains("{ name: \"CONTROL_PREPROCESS\" data_type: TYPE_STRING dims: [ 1 ] optional: true },"));
    assert!(config.contains("{ name: \"CFG_TRUNCATION\" data_type: TYPE_FP32 dims: [ 1 ] optional: true },"));
    assert!(config.contains("{ name: \"REFERENCE_IMAGES\" data_type: TYPE_STRING dims: [ -1 ] optional: true }\n]"));
    assert!(!config.contains("key: \"controlnet\""), "no ControlNet parameter unless asked");
    assert!(config.contains("{ name: \"IMAGE\" data_type: TYPE_UINT8 dims: [ -1, -1, -1, 3 ] },"));
    assert!(config.contains("parameters: { key: \"device\" value: { string_value: \"cpu\" } }"));
    assert!(config.contains("parameters: { key: \"threads\" value: { string_value: \"1\" } }"));
    options.controlnet = Some("union-2.1".into());
    options.loras = vec!["/loras/a.safetensors:0.7".parse().unwrap(), "b.safetensors".parse().unwrap()];
    let config = config_pbtxt(&options);
    assert!(config.contains("parameters: { key: \"controlnet\" value: { string_value: \"union-2.1\" } }"));
    assert!(config.contains(
        "parameters: { key: \"loras\" value: { string_value: \"/loras/a.safetensors:0.7;b.safetensors:1\" } }"
    ));
}

#[test]
fn a_gpu_repository_names_its_gpus_and_tensorrt_cache() {
    let mut options = RepositoryOptions::new(DeviceKind::TensorRt);
    options.gpus = Some(vec![0, 2]);
    options.max_count = Some(2);
    options.tensorrt_cache = Some(PathBuf::from("/var/cache/zimage \"trt\""));
    let config = config_pbtxt(&options);
    assert!(config.contains("    count: 1\n    kind: KIND_GPU\n    gpus: [ 0, 2 ]\n"));
    assert!(config.contains("parameters: { key: \"device\" value: { string_value: \"tensorrt\" } }"));
    assert!(config.contains("parameters: { key: \"max_count\" value: { string_value: \"2\" } }"));
    assert!(config.contains("string_value: \"/var/cache/zimage \\\"trt\\\"\""));

    let cuda = config_pbtxt(&RepositoryOptions::new(DeviceKind::Cuda));
    assert!(cuda.contains("kind: KIND_GPU\n  }"), "every GPU when none are named");
}

#[test]
fn a_copied_repository_holds_the_package_files() {
    let out = scratch("copy");
    let mut options = RepositoryOptions::new(DeviceKind::Cpu);
    options.copy = true;
    options.name = "tiny".into();
    let model = write_repository(&package(), &out, &options).unwrap();
    let copy = model.join("1/model");
    assert!(!copy.symlink_metadata().unwrap().file_type().is_symlink());
    assert_eq!(entries(&copy), entries(&package()));
    for name in entries(&package()) {
        assert_eq!(std::fs::read(copy.join(&name)).unwrap(), std::fs::read(package().join(&name)).unwrap(), "{name}");
    }
    assert!(std::fs::read_to_string(model.join("config.pbtxt")).unwrap().contains("name: \"tiny\""));
}

#[test]
fn failures_leave_nothing_behind() {
    let out = scratch("failures");
    let options = RepositoryOptions::new(DeviceKind::Cpu);

    let missing = write_repository(Path::new("/nonexistent/package"), &out, &options).unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::Package);
    assert!(!out.join("zimage").exists());

    write_repository(&package(), &out, &options).unwrap();
    let again = write_repository(&package(), &out, &options).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Io);
    assert!(again.to_string().contains("already exists"), "{again}");
    assert_eq!(entries(&out), ["zimage"], "no staging folder is left");

    let mut bad = RepositoryOptions::new(DeviceKind::Cpu);
    bad.name = "../escape".into();
    assert_eq!(write_repository(&package(), &out, &bad).unwrap_err().kind(), ErrorKind::InvalidRequest);
    let mut bad = RepositoryOptions::new(DeviceKind::Cpu);
    bad.instances = 0;
    assert_eq!(write_repository(&package(), &out, &bad).unwrap_err().kind(), ErrorKind::InvalidRequest);
    let mut bad = RepositoryOptions::new(DeviceKind::Cpu);
    bad.gpus = Some(vec![0]);
    assert_eq!(write_repository(&package(), &out, &bad).unwrap_err().kind(), ErrorKind::InvalidRequest);
    assert_eq!(entries(&out), ["zimage"]);
}
