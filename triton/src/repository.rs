//! A Triton model repository for one zimage package: `<repo>/<name>/config.pbtxt` and
//! `<repo>/<name>/1/model`, the package (a symbolic link to it, or a copy).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use zimage::{Error, Manifest, Result};

use crate::config::DeviceKind;
use crate::interface::{TensorSpec, INPUTS, OUTPUTS};

/// How the repository is laid out. Build from `RepositoryOptions::new` and set fields.
#[derive(Debug, Clone, PartialEq)]
pub struct RepositoryOptions {
    /// The model's name in Triton (and its folder).
    pub name: String,
    /// Instances per device (`count` in the instance group).
    pub instances: u32,
    pub device: DeviceKind,
    /// KIND_GPU only: the GPUs to place instances on; `None` is every GPU Triton sees.
    pub gpus: Option<Vec<u32>>,
    /// Copy the package instead of linking to it (for images and volumes that move).
    pub copy: bool,
    /// ONNX Runtime threads per graph and instance.
    pub threads: Option<usize>,
    /// Largest COUNT a request may ask for.
    pub max_count: Option<u32>,
    /// TensorRT engine cache folder on each node.
    pub tensorrt_cache: Option<PathBuf>,
    /// The package's ControlNet to load (parameter `controlnet`).
    pub controlnet: Option<String>,
    /// LoRA files merged into the transformer (parameter `loras`; absolute paths are kept as
    /// they are, relative ones are relative to the version folder).
    pub loras: Vec<zimage::LoraFile>,
}

impl RepositoryOptions {
    pub fn new(device: DeviceKind) -> Self {
        RepositoryOptions {
            name: "zimage".into(),
            instances: 1,
            device,
            gpus: None,
            copy: false,
            threads: None,
            max_count: None,
            tensorrt_cache: None,
            controlnet: None,
            loras: Vec::new(),
        }
    }
}

/// The model's `config.pbtxt`.
pub fn config_pbtxt(options: &RepositoryOptions) -> String {
    let mut out = String::new();
    let _ =
        writeln!(out, "# Written by zimage triton-repo {}: the zimage backend (libtriton_zimage.so).", zimage::VERSION);
    let _ = writeln!(out, "name: \"{}\"", options.name);
    let _ = writeln!(out, "backend: \"zimage\"");
    let _ = writeln!(out, "# Requests carry no batch dimension: each is one prompt; COUNT asks for several images.");
    let _ = writeln!(out, "max_batch_size: 0");
    write_tensors(&mut out, "input", INPUTS);
    write_tensors(&mut out, "output", OUTPUTS);
    let (kind, device) = match options.device {
        DeviceKind::Cpu => ("KIND_CPU", "cpu"),
        DeviceKind::Cuda => ("KIND_GPU", "cuda"),
        DeviceKind::TensorRt => ("KIND_GPU", "tensorrt"),
    };
    let _ = writeln!(out, "# One zimage pipeline per instance, on the instance's device.");
    let _ = write!(out, "instance_group [\n  {{\n    count: {}\n    kind: {kind}\n", options.instances);
    if let (Some(gpus), true) = (&options.gpus, options.device != DeviceKind::Cpu) {
        let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
        let _ = writeln!(out, "    gpus: [ {} ]", list.join(", "));
    }
    let _ = writeln!(out, "  }}\n]");
    let mut parameters = vec![("package", "model".to_string()), ("device", device.to_string())];
    if let Some(threads) = options.threads {
        parameters.push(("threads", threads.to_string()));
    }
    if let Some(max_count) = options.max_count {
        parameters.push(("max_count", max_count.to_string()));
    }
    if let Some(cache) = &options.tensorrt_cache {
        parameters.push(("tensorrt_cache", cache.display().to_string()));
    }
    if let Some(name) = &options.controlnet {
        parameters.push(("controlnet", name.clone()));
    }
    if !options.loras.is_empty() {
        let items: Vec<String> = options.loras.iter().map(|f| format!("{}:{}", f.path.display(), f.scale)).collect();
        parameters.push(("loras", items.join(";")));
    }
    for (key, value) in parameters {
        let _ = writeln!(out, "parameters: {{ key: \"{key}\" value: {{ string_value: \"{}\" }} }}", escape(&value));
    }
    out
}

fn write_tensors(out: &mut String, kind: &str, specs: &[TensorSpec]) {
    let _ = writeln!(out, "{kind} [");
    for (i, t) in specs.iter().enumerate() {
        let dims: Vec<String> = t.dims.iter().map(i64::to_string).collect();
        let optional = if t.optional { " optional: true" } else { "" };
        let comma = if i + 1 < specs.len() { "," } else { "" };
        let _ = writeln!(out, "  # {}", t.doc);
        let _ = writeln!(
            out,
            "  {{ name: \"{}\" data_type: {} dims: [ {} ]{optional} }}{comma}",
            t.name,
            t.data_type.config_name(),
            dims.join(", ")
        );
    }
    let _ = writeln!(out, "]");
}

/// protobuf text format string escaping.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Writes `<out>/<name>/` for the package in `package`: checks the package first, builds the
/// model folder beside its final place and renames it in, so a failure leaves nothing behind.
/// Returns the model folder.
pub fn write_repository(package: &Path, out: &Path, options: &RepositoryOptions) -> Result<PathBuf> {
    if options.name.is_empty()
        || !options.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        || options.name.starts_with('.')
    {
        return Err(Error::InvalidRequest(format!(
            "model name {:?}: use letters, digits, '_', '-' and '.'",
            options.name
        )));
    }
    if options.instances == 0 || options.instances > 64 {
        return Err(Error::InvalidRequest(format!("instances must be 1..=64 (got {})", options.instances)));
    }
    if options.device == DeviceKind::Cpu && options.gpus.is_some() {
        return Err(Error::InvalidRequest("gpus apply to cuda and tensorrt, not cpu".into()));
    }
    let manifest = Manifest::load(package, false)?;
    // What the backend would refuse when it loads the model is refused now, before anything
    // is written (generate checks the same).
    if let Some(count) = options.max_count.filter(|c| !(1..=zimage::MAX_IMAGES_PER_REQUEST).contains(c)) {
        return Err(Error::InvalidRequest(format!(
            "max_count must be 1..={} (got {count})",
            zimage::MAX_IMAGES_PER_REQUEST
        )));
    }
    if let Some(value) = &options.controlnet {
        zimage::package::controlnet::require_controlnet(&manifest.controlnets, package, value)
            .map_err(Error::InvalidRequest)?;
    }
    for lora in &options.loras {
        zimage::LoraAdapter::load(&lora.path)?;
    }
    let package = std::fs::canonicalize(package).map_err(|source| Error::Io { path: package.to_path_buf(), source })?;
    if out.exists() && !out.is_dir() {
        return Err(Error::Io {
            path: out.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "is a file, not a folder for the repository",
            ),
        });
    }
    std::fs::create_dir_all(out).map_err(|source| Error::Io { path: out.to_path_buf(), source })?;
    let model_dir = out.join(&options.name);
    if model_dir.symlink_metadata().is_ok() {
        return Err(Error::Io {
            path: model_dir,
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; remove it or choose another --name",
            ),
        });
    }
    let staging = out.join(format!(".{}.partial-{}", options.name, std::process::id()));
    let result = build(&staging, &package, options).and_then(|()| {
        std::fs::rename(&staging, &model_dir).map_err(|source| Error::Io { path: model_dir.clone(), source })
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result.map(|()| model_dir)
}

fn build(staging: &Path, package: &Path, options: &RepositoryOptions) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let version = staging.join("1");
    std::fs::create_dir_all(&version).map_err(io(&version))?;
    let config = staging.join("config.pbtxt");
    std::fs::write(&config, config_pbtxt(options)).map_err(io(&config))?;
    let target = version.join("model");
    if options.copy {
        copy_dir(package, &target)
    } else {
        symlink(package, &target).map_err(io(&target))
    }
}

#[cfg(unix)]
fn symlink(from: &Path, to: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(from, to)
}

#[cfg(not(unix))]
fn symlink(from: &Path, to: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_dir(from, to)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|source| Error::Io { path: to.to_path_buf(), source })?;
    let entries = std::fs::read_dir(from).map_err(|source| Error::Io { path: from.to_path_buf(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io { path: from.to_path_buf(), source })?;
        let source_path = entry.path();
        let target = to.join(entry.file_name());
        // Follows links: a package whose files link elsewhere is copied whole.
        let metadata =
            std::fs::metadata(&source_path).map_err(|source| Error::Io { path: source_path.clone(), source })?;
        if metadata.is_dir() {
            copy_dir(&source_path, &target)?;
        } else {
            std::fs::copy(&source_path, &target).map_err(|source| Error::Io { path: target.clone(), source })?;
        }
    }
    Ok(())
}
