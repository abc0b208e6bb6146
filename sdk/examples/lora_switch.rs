//! What a LoRA switch costs on a loaded pipeline: time and memory.
//!
//!     cargo run --release -p zimage --example lora_switch -- PACKAGE LORA [--threads N] [--scales 1.0,0.6,0]
//!
//! Loads PACKAGE without adapters, then for each scale sets LORA at that scale (0 = removes it,
//! back to the base weights) with `Pipeline::set_loras`, timing the switch (read the touched
//! weights, merge in float32, rebuild the transformer's session) and reporting the process's
//! resident memory after it and the peak since the start (Linux: VmRSS / VmHWM), next to the
//! package's weight size and the size of one merged copy of the tensors the LoRA touches.

use std::sync::Arc;
use std::time::Instant;

use zimage::{LoadOptions, LoraAdapter, LoraSetting, Pipeline};

fn status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with(key))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() -> zimage::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut package, mut lora, mut threads) = (None, None, None);
    let mut scales = vec![1.0f32, 0.6, 0.0];
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = Some(args.next().expect("--threads N").parse().expect("a number")),
            "--scales" => {
                scales = args.next().expect("--scales LIST").split(',').map(|s| s.parse().expect("a scale")).collect()
            }
            _ if package.is_none() => package = Some(a),
            _ => lora = Some(a),
        }
    }
    let (package, lora) = (package.expect("PACKAGE"), lora.expect("LORA"));
    let mut options = LoadOptions::default();
    options.threads = threads;
    let t = Instant::now();
    let pipeline = Pipeline::load(&package, &options)?;
    let weights = pipeline.manifest().weight_bytes() as f64 / (1 << 20) as f64;
    println!(
        "load: {:.2} s; weights {weights:.0} MiB; RSS {:.0} MiB, peak {:.0} MiB",
        t.elapsed().as_secs_f64(),
        status_mib("VmRSS:"),
        status_mib("VmHWM:")
    );
    let t = Instant::now();
    let adapter = Arc::new(LoraAdapter::load(&lora)?);
    let bytes_per_value = match pipeline.manifest().precision {
        zimage::Precision::Fp32 => 4.0,
        _ => 2.0,
    };
    let touched = adapter.target_elements() as f64 * bytes_per_value / (1 << 20) as f64;
    println!(
        "read {lora}: {:.2} s; {} modules; one merged copy of the tensors it touches ({}): {touched:.0} MiB",
        t.elapsed().as_secs_f64(),
        adapter.modules().count(),
        pipeline.manifest().precision
    );
    for scale in scales {
        let set = if scale == 0.0 { Vec::new() } else { vec![LoraSetting::new(Arc::clone(&adapter), scale)] };
        let t = Instant::now();
        pipeline.set_loras(&set)?;
        println!(
            "set_loras(scale {scale}): {:.2} s; RSS {:.0} MiB, peak so far {:.0} MiB",
            t.elapsed().as_secs_f64(),
            status_mib("VmRSS:"),
            status_mib("VmHWM:")
        );
    }
    Ok(())
}
