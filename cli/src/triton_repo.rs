//! `zimage triton-repo`: a ready Triton model repository for a package (config.pbtxt and the
//! package, linked or copied), served by the zimage backend (crate zimage-triton).

use crate::output::{out, Failure};
use std::path::PathBuf;

use clap::Args;
use triton_zimage::config::DeviceKind;
use triton_zimage::repository::{self, RepositoryOptions};

#[derive(Args)]
pub struct TritonRepoArgs {
    /// Model package folder (made by export-scripts/export.py).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The model repository to write into (created if missing); the model goes to REPO/NAME.
    #[arg(long, value_name = "REPO")]
    out: PathBuf,
    /// The model's name in Triton.
    #[arg(long, value_name = "NAME", default_value = "zimage")]
    name: String,
    /// Instances (one pipeline each) per device: per GPU for cuda/tensorrt.
    #[arg(long, value_name = "N", default_value_t = 1)]
    instances: u32,
    /// Where the instances run: cpu (KIND_CPU), cuda or tensorrt (KIND_GPU).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = ["cpu", "cuda", "tensorrt"])]
    device: String,
    /// cuda/tensorrt: the GPUs to use, e.g. 0,1 [default: every GPU Triton sees].
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    gpus: Option<Vec<u32>>,
    /// Copy the package into the repository instead of linking to it.
    #[arg(long)]
    copy: bool,
    /// ONNX Runtime intra-op threads per graph and instance [default: one per physical core].
    /// 1..=1024, what the backend accepts: another count wrote a repository Triton then
    /// refused to load.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
    /// Largest COUNT one request may ask for [default: 4].
    #[arg(long, value_name = "K")]
    max_count: Option<u32>,
    /// tensorrt: the engine cache folder on each node [default: ~/.cache/zimage/tensorrt].
    #[arg(long, value_name = "DIR")]
    trt_cache: Option<PathBuf>,
    /// A ControlNet of the package (export_controlnet.py) the model loads, for requests with
    /// CONTROL_IMAGE.
    #[arg(long, value_name = "NAME")]
    controlnet: Option<String>,
    /// A LoRA adapter the model merges into its transformer, FILE[:SCALE] (repeatable; the path
    /// is written as given: absolute, or relative to the version folder REPO/NAME/1).
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = zimage_load_flags::parse_lora)]
    loras: Vec<zimage::LoraFile>,
}

pub fn run(args: TritonRepoArgs) -> Result<(), Failure> {
    let device = match args.device.as_str() {
        "cuda" => DeviceKind::Cuda,
        "tensorrt" => DeviceKind::TensorRt,
        _ => DeviceKind::Cpu,
    };
    if let Some(file) = args.loras.iter().find(|f| f.path.to_string_lossy().contains(';')) {
        return Err(Failure::Usage(format!(
            "--lora {}: the model parameter lists LoRAs separated by ';', so a path cannot contain one",
            file.path.display()
        )));
    }
    let mut options = RepositoryOptions::new(device);
    options.name = args.name;
    options.instances = args.instances;
    options.gpus = args.gpus;
    options.copy = args.copy;
    options.threads = args.threads.map(|n| n as usize);
    options.max_count = args.max_count;
    options.tensorrt_cache = args.trt_cache;
    options.controlnet = args.controlnet;
    options.loras = args.loras;
    let model_dir = repository::write_repository(&args.model, &args.out, &options)?;
    out(&format!(
        "wrote {}\nserve it with: tritonserver --model-repository {} --backend-directory DIR \
         (DIR/zimage/libtriton_zimage.so)\n",
        model_dir.display(),
        args.out.display()
    ))
}
