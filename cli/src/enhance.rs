//! `zimage enhance` and the `--enhance` option of `generate`: rewriting a prompt locally with
//! the package's Qwen3 decoder (or a separate enhancer package).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use zimage::{
    EnhanceOptions, Enhancement, LoadOptions, Pipeline, PromptEnhancer, RandomSampling, Sampling, TokenEvent,
};

use crate::model_args::ModelArgs;
use crate::output::{out, secs, Failure};
use crate::{interrupt, log};

/// Decoding options shared by `enhance` and `generate --enhance`.
#[derive(Args, Clone)]
pub struct EnhanceFlags {
    /// Enhancer package (a Z-Image package with a decoder, or a standalone one made by
    /// export-scripts/export_enhancer.py) [default: the --model package].
    #[arg(long, value_name = "DIR")]
    pub enhancer: Option<PathBuf>,
    /// Let the model reason in a <think> block before answering (never part of the result).
    #[arg(long)]
    pub thinking: bool,
    /// Most tokens to generate, thinking included.
    #[arg(long, value_name = "N", default_value_t = EnhanceOptions::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Most tokens the enhancer holds, the templated prompt and the answer together (bounds
    /// its memory: Qwen3-4B keeps 288 KiB per token); a longer prompt is refused.
    #[arg(long, value_name = "N", default_value_t = EnhanceOptions::default().max_context_tokens)]
    pub max_context_tokens: usize,
    /// Sample with this temperature instead of greedy decoding.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Sample among the K most likely tokens (0 = all); implies sampling.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens reaching probability P; implies sampling.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Seed for sampling [default: random, reported].
    #[arg(long, value_name = "S")]
    pub sampling_seed: Option<u64>,
    /// Replace the built-in system prompt.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    pub system_prompt: Option<String>,
}

impl EnhanceFlags {
    pub fn options(&self) -> EnhanceOptions {
        let sampled =
            self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some() || self.sampling_seed.is_some();
        let sampling = if sampled {
            let d = RandomSampling::default();
            Sampling::Random(RandomSampling {
                temperature: self.temperature.unwrap_or(d.temperature),
                top_k: self.top_k.unwrap_or(d.top_k),
                top_p: self.top_p.unwrap_or(d.top_p),
                seed: self.sampling_seed,
            })
        } else {
            Sampling::Greedy
        };
        let mut options = EnhanceOptions::default();
        options.system_prompt = self.system_prompt.clone();
        options.thinking = self.thinking;
        options.max_new_tokens = self.max_new_tokens;
        options.max_context_tokens = self.max_context_tokens;
        options.sampling = sampling;
        options
    }

    /// The enhancer of `pipeline`'s package (cancelled with it), or of `--enhancer DIR`.
    pub fn load_for(&self, pipeline: &Pipeline, options: &LoadOptions) -> zimage::Result<PromptEnhancer> {
        match &self.enhancer {
            Some(dir) if dir != pipeline.package_dir() => PromptEnhancer::load(dir, options),
            _ => pipeline.attach_enhancer(options),
        }
    }
}

#[derive(Args)]
pub struct EnhanceArgs {
    /// Package holding the enhancer: a Z-Image package with a decoder, or a standalone one.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The prompt to rewrite.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    prompt: String,
    #[command(flatten)]
    flags: EnhanceFlags,
    /// Print tokens as they are generated (stderr for the thinking block).
    #[arg(long)]
    stream: bool,
    /// ONNX Runtime intra-op threads [default: one per physical core].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// ONNX Runtime shared library.
    #[arg(long, value_name = "PATH")]
    ort_library: Option<PathBuf>,
    /// Print a JSON summary on stdout instead of the text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EnhanceArgs) -> Result<(), Failure> {
    let mut options = LoadOptions::default();
    options.runtime_library = args.ort_library.clone();
    options.threads = args.threads;
    let dir = args.flags.enhancer.clone().unwrap_or_else(|| args.model.clone());
    let enhancer = PromptEnhancer::load(&dir, &options)?;
    interrupt::set_cancel_handle(enhancer.cancel_handle());
    // A closed stdout stops the generation at the next token (nobody reads it any more).
    let mut stdout_failure: Option<Failure> = None;
    let mut stream = |event: &TokenEvent| {
        if event.thinking {
            let _ = write!(std::io::stderr().lock(), "{}", event.text);
        } else if let Err(e) = out(event.text) {
            stdout_failure = Some(e);
            return false;
        }
        !interrupt::interrupted()
    };
    let streaming = args.stream && !args.json;
    let result = interrupt::run_cancellable(|| {
        enhancer.enhance(&args.prompt, &args.flags.options(), if streaming { Some(&mut stream) } else { None })
    });
    if let Some(failure) = stdout_failure {
        return Err(failure);
    }
    let result = result?;
    if args.json {
        out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&enhancement_json(&result)).expect("JSON values serialise")
        ))?;
    } else if streaming {
        out("\n")?;
    } else {
        out(&format!("{}\n", result.text))?;
    }
    if result.text.trim().is_empty() {
        log::stderr_line(
            "warning",
            &format!("no description within {} tokens ({:?})", args.flags.max_new_tokens, result.finish),
        );
    }
    Ok(())
}

pub fn enhancement_json(e: &Enhancement) -> serde_json::Value {
    json!({
        "text": e.text,
        "thinking": e.thinking,
        "finish": format!("{:?}", e.finish),
        "prompt_tokens": e.prompt_tokens,
        "new_tokens": e.token_ids.len(),
        "seed": e.seed,
        "seconds": secs(e.timings.total),
        "tokens_per_second": e.timings.tokens_per_second(),
    })
}

/// For `generate --enhance`: the same load options as the pipeline.
pub fn load_options(model: &ModelArgs) -> LoadOptions {
    model.options(1, false)
}
