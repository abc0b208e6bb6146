//! `zimage bench`: the same request run `warmup + runs` times; per-stage median/min/max from
//! the SDK's own `Timings`, session-creation time, peak RSS (and peak GPU memory when a graph
//! runs on a GPU), and the share of the total spent inside ONNX Runtime.
//! `export-scripts/bench_reference.py` prints the same report for diffusers and compares the
//! two JSON files.

use std::io::IsTerminal;

use clap::Args;
use serde_json::{json, Value};
use zimage::{GenerateRequest, Manifest, Timings};

use crate::device_memory::DeviceMemorySampler;
use crate::generate::timings_json;
use crate::interrupt;
use crate::model_args::ModelArgs;
use crate::output::{out, secs, Failure};
use crate::step_report::StageProgress;

/// Most timed runs, and most warmup runs (each run keeps its timings for the report).
pub const MAX_RUNS: u32 = 1000;

/// The default prompt; bench_reference.py uses the same one.
const BENCH_PROMPT: &str = "a red fox sitting in fresh snow at sunrise, detailed fur, soft light";

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image width in pixels.
    #[arg(long, value_name = "W", default_value_t = GenerateRequest::default().width)]
    width: u32,
    /// Image height in pixels.
    #[arg(long, value_name = "H", default_value_t = GenerateRequest::default().height)]
    height: u32,
    /// Denoising steps.
    #[arg(long, value_name = "N", default_value_t = GenerateRequest::default().steps)]
    steps: u32,
    /// Images per generation.
    #[arg(long, value_name = "K", default_value_t = GenerateRequest::default().count)]
    count: u32,
    /// Untimed runs first (the first run pays for ONNX Runtime's lazy initialisation).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=MAX_RUNS as i64))]
    warmup: u32,
    /// Timed runs.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=MAX_RUNS as i64))]
    runs: u32,
    /// Classifier-free guidance scale (above 0 doubles the transformer batch).
    #[arg(long, value_name = "G", default_value_t = GenerateRequest::default().guidance_scale)]
    guidance: f32,
    /// The prompt.
    #[arg(long, value_name = "TEXT", default_value = BENCH_PROMPT, allow_hyphen_values = true)]
    prompt: String,
    /// Noise seed.
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    /// Print the report as JSON on stdout (the input of bench_reference.py --compare).
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> Result<(), Failure> {
    let mut request = GenerateRequest::new(args.prompt.as_str());
    request.width = args.width;
    request.height = args.height;
    request.steps = args.steps;
    request.count = args.count;
    request.guidance_scale = args.guidance;
    request.seed = Some(args.seed);
    // The request is checked before the model loads and anything is sized from it.
    zimage::pipeline::check_request(&request, &Manifest::read(&args.model.model)?)?;

    let progress = StageProgress::new(std::io::stderr().is_terminal());
    let on_gpu = [Some(args.model.load.device), args.model.load.transformer_device]
        .iter()
        .any(|d| matches!(d, Some(zimage::Device::Cuda { .. } | zimage::Device::TensorRt { .. })));
    let device_memory = if on_gpu { DeviceMemorySampler::start() } else { None };
    progress.stage("loading model");
    let pipeline = args.model.load(args.count, args.guidance > 0.0)?;
    let rss_after_load = peak_rss_bytes();

    // Both are at most MAX_RUNS (clap's ranges): no overflow, a bounded allocation.
    let mut samples = Vec::with_capacity(args.runs as usize);
    for i in 0..args.warmup + args.runs {
        let warm = i < args.warmup;
        progress.stage(if warm {
            format!("warmup {}/{}", i + 1, args.warmup)
        } else {
            format!("run {}/{}", i + 1 - args.warmup, args.runs)
        });
        let timings = interrupt::run_cancellable(|| pipeline.generate(&request, None))?.timings;
        if !warm {
            samples.push(timings);
        }
    }
    progress.finish();
    let peak_device_memory = device_memory.map_or(Value::Null, DeviceMemorySampler::finish);

    let providers = pipeline.providers();
    let report = json!({
        "implementation": "zimage",
        "version": zimage::VERSION,
        "model": pipeline.package_dir().display().to_string(),
        "config": {
            "width": args.width,
            "height": args.height,
            "steps": args.steps,
            "count": args.count,
            "warmup": args.warmup,
            "runs": args.runs,
            "guidance": args.guidance,
            "threads": args.model.load.threads,
            "device": args.model.load.device.to_string(),
            "prompt": args.prompt,
            "seed": args.seed,
        },
        "providers": {
            "text_encoder": providers.text_encoder.to_string(),
            "transformer": providers.transformer.to_string(),
            "vae_decoder": providers.vae_decoder.to_string(),
        },
        // vae_decoder_cpu.onnx (Winograd) with --winograd-vae on the CPU, vae_decoder_int8.onnx
        // with --int8-vae, else vae_decoder.onnx.
        "vae_decoder_graph": pipeline.vae_decoder_file().file_name().map(|n| n.to_string_lossy().into_owned()),
        // --vae-tiling as asked (null: whole images); it applies to images larger than a tile.
        "vae_tiling": args.model.load.vae_tiling.map(|t| json!({ "tile_size": t.tile_size, "overlap": t.overlap })),
        "runtime_library": pipeline.runtime_library().display().to_string(),
        "load_s": secs(pipeline.load_time()),
        // Why the transformer's calls are not replayed as CUDA graphs (null: they are).
        "cuda_graph_fallback": pipeline.cuda_graph_fallback(),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_after_load_bytes": rss_after_load,
        // Sampled every 20 ms over loading and all runs; null on CPU or without NVML.
        "peak_device_memory": peak_device_memory,
        // The weights of the graphs this pipeline loads (with the VAE decoder it decodes with).
        "weight_bytes": pipeline.weight_bytes(),
        "stages": stages(&samples),
        "images_per_s": summary(&samples.iter().map(|t| args.count as f64 / secs(t.total)).collect::<Vec<_>>()),
        // Orchestration overhead: 1.0 would mean every moment is spent inside ONNX Runtime.
        "total_over_onnx_runtime": summary(&samples.iter().map(|t| secs(t.total) / secs(t.onnx_runtime)).collect::<Vec<_>>()),
        "runs": samples.iter().map(|t| timings_json(t, pipeline.load_time())).collect::<Vec<_>>(),
    });
    if args.json {
        out(&format!("{}\n", serde_json::to_string_pretty(&report).expect("JSON values serialise")))
    } else {
        out(&table(&report))
    }
}

/// One row per stage, in pipeline order, each a median/min/max over the runs.
fn stages(samples: &[Timings]) -> Value {
    let column = |f: &dyn Fn(&Timings) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let mut rows = vec![
        ("tokenize".to_string(), column(&|t| secs(t.tokenize))),
        ("text_encode".into(), column(&|t| secs(t.text_encode))),
    ];
    let steps = samples.iter().map(|t| t.denoise_steps.len()).min().unwrap_or(0);
    for i in 0..steps {
        rows.push((format!("step {}", i + 1), column(&|t| secs(t.denoise_steps[i]))));
    }
    rows.push(("denoise".into(), column(&|t| secs(t.denoise_steps.iter().sum()))));
    rows.push(("vae_decode".into(), column(&|t| secs(t.vae_decode))));
    rows.push(("total".into(), column(&|t| secs(t.total))));
    rows.push(("onnx_runtime".into(), column(&|t| secs(t.onnx_runtime))));
    Value::Array(
        rows.into_iter()
            .map(|(name, values)| {
                let mut row = summary(&values);
                row["name"] = json!(name);
                row
            })
            .collect(),
    )
}

/// `{median, min, max}` of the values (the median of an even count is the mean of the middle two).
fn summary(values: &[f64]) -> Value {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return json!({ "median": null, "min": null, "max": null });
    }
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    json!({ "median": median, "min": v[0], "max": v[n - 1] })
}

/// The human-readable report; bench_reference.py prints the same layout from the same JSON.
fn table(r: &Value) -> String {
    let c = &r["config"];
    let threads = c["threads"].as_u64().map_or("default".to_string(), |n| n.to_string());
    let mut out = format!(
        "{} {}: {}\n{}x{}, {} steps, {} image(s), guidance {}, {} runs after {} warmup, device {}, threads {}\n\n",
        r["implementation"].as_str().unwrap_or_default(),
        r["version"].as_str().unwrap_or_default(),
        r["model"].as_str().unwrap_or_default(),
        c["width"],
        c["height"],
        c["steps"],
        c["count"],
        c["guidance"],
        c["runs"],
        c["warmup"],
        c["device"].as_str().unwrap_or_default(),
        threads,
    );
    out += &format!("{:<16}{:>14}{:>14}{:>14}\n", "stage", "median", "min", "max");
    for row in r["stages"].as_array().into_iter().flatten() {
        out += &format!(
            "{:<16}{:>14}{:>14}{:>14}\n",
            row["name"].as_str().unwrap_or_default(),
            duration(&row["median"]),
            duration(&row["min"]),
            duration(&row["max"])
        );
    }
    let ips = &r["images_per_s"];
    out += &format!(
        "{:<16}{:>14.3}{:>14.3}{:>14.3}\n\n",
        "images/s",
        num(&ips["median"]),
        num(&ips["min"]),
        num(&ips["max"])
    );
    let ratio = &r["total_over_onnx_runtime"];
    out += &format!(
        "total / ONNX Runtime time: {:.4} (min {:.4}, max {:.4})\n",
        num(&ratio["median"]),
        num(&ratio["min"]),
        num(&ratio["max"])
    );
    out += &format!("load (session creation): {}\n", duration(&r["load_s"]));
    out += &format!(
        "peak RSS: {} (after load {}); weights {}; peak RSS / weights {:.2}\n",
        mib(&r["peak_rss_bytes"]),
        mib(&r["peak_rss_after_load_bytes"]),
        mib(&r["weight_bytes"]),
        num(&r["peak_rss_bytes"]) / num(&r["weight_bytes"])
    );
    let device = &r["peak_device_memory"];
    if !device.is_null() {
        out += &format!(
            "peak GPU memory: {} ({})\n",
            mib(&device["bytes"]),
            device["source"].as_str().unwrap_or_default()
        );
    }
    out
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Milliseconds below a second, seconds above.
fn duration(v: &Value) -> String {
    match v.as_f64() {
        Some(s) if s < 1.0 => format!("{:.3} ms", s * 1e3),
        Some(s) => format!("{s:.3} s"),
        None => "-".into(),
    }
}

fn mib(v: &Value) -> String {
    v.as_f64().map_or("n/a".into(), |b| format!("{:.1} MiB", b / (1024.0 * 1024.0)))
}

/// The process's peak resident set size (VmHWM), Linux only.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
