//! Prompt-enhancer throughput and memory on CPU.
//!
//!     cargo run --release -p zimage --example enhance_bench -- PACKAGE [--tokens N] [--threads N] [--runs N] [--prompt TEXT] [--pipeline]
//!
//! `--pipeline` loads the whole pipeline first (text encoder, transformer, VAE), encodes the
//! prompt once with the text encoder, then attaches the enhancer (which shares the text
//! encoder's weights file): the memory of a Z-Image package's text graphs together.
//!
//! PACKAGE is a Z-Image package with an enhancer or a standalone enhancer package. Greedy
//! decoding with the end token ignored is not possible through the API, so use a model that
//! does not stop early (random weights never emit `<|im_end|>`) to time exactly N tokens.
//! Prints prefill time, decode tokens/second (decode calls after the prompt), and resident /
//! proportional memory after loading and after generating (Linux).

use std::time::Instant;

use zimage::{EnhanceOptions, LoadOptions, Pipeline, PromptEnhancer};

fn memory_mib() -> String {
    let field = |file: &str, key: &str| -> Option<f64> {
        let text = std::fs::read_to_string(file).ok()?;
        let line = text.lines().find(|l| l.starts_with(key))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
    };
    match (field("/proc/self/status", "VmRSS:"), field("/proc/self/smaps_rollup", "Pss:")) {
        (Some(rss), Some(pss)) => format!("RSS {rss:.0} MiB, PSS {pss:.0} MiB"),
        _ => "memory: n/a".into(),
    }
}

fn main() -> zimage::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut package = None;
    let (mut tokens, mut threads, mut runs, mut with_pipeline) = (64usize, None, 3usize, false);
    let mut prompt = "A cat holding a sign that says hello world, studio lighting".to_string();
    while let Some(a) = args.next() {
        let mut value = || args.next().expect("option value");
        match a.as_str() {
            "--tokens" => tokens = value().parse().expect("--tokens N"),
            "--threads" => threads = Some(value().parse().expect("--threads N")),
            "--runs" => runs = value().parse().expect("--runs N"),
            "--prompt" => prompt = value(),
            "--pipeline" => with_pipeline = true,
            _ => package = Some(a),
        }
    }
    let package = package.expect("usage: enhance_bench PACKAGE [--tokens N] [--threads N] [--runs N] [--prompt TEXT]");
    println!("before load: {}", memory_mib());
    let load_options = {
        let mut o = LoadOptions::default();
        o.threads = threads;
        o
    };
    let pipeline = if with_pipeline {
        let start = Instant::now();
        let pipeline = Pipeline::load(&package, &load_options)?;
        println!("pipeline loaded in {:.2} s: {}", start.elapsed().as_secs_f64(), memory_mib());
        let start = Instant::now();
        pipeline.encode_prompt(&prompt, None)?;
        println!("prompt encoded in {:.3} s: {}", start.elapsed().as_secs_f64(), memory_mib());
        Some(pipeline)
    } else {
        None
    };
    let start = Instant::now();
    let enhancer = match &pipeline {
        Some(p) => p.attach_enhancer(&load_options)?,
        None => PromptEnhancer::load(&package, &load_options)?,
    };
    let info = enhancer.info();
    println!(
        "loaded {package} in {:.2} s (hidden {}, {} layers, {} KV heads x {}): {}",
        start.elapsed().as_secs_f64(),
        info.hidden_size,
        info.num_layers,
        info.num_kv_heads,
        info.head_dim,
        memory_mib()
    );
    let options = {
        let mut o = EnhanceOptions::default();
        o.max_new_tokens = tokens;
        o
    };
    for run in 0..runs {
        let r = enhancer.enhance(&prompt, &options, None)?;
        let t = r.timings;
        println!(
            "run {run}: prompt {} tokens, prefill {:.3} s ({:.0} tokens/s); generated {} tokens ({:?}); decode {} tokens/s; {}",
            r.prompt_tokens,
            t.prefill.as_secs_f64(),
            r.prompt_tokens as f64 / t.prefill.as_secs_f64(),
            r.token_ids.len(),
            r.finish,
            t.tokens_per_second().map_or("-".to_string(), |v| format!("{v:.2}")),
            memory_mib()
        );
    }
    Ok(())
}
