//! The prompt enhancer: a local Qwen3 that rewrites a prompt before generation. Load it on its
//! own (`zimage_enhancer_load()`, a standalone enhancer package or a Z-Image package with a
//! decoder) or against a pipeline (`zimage_enhancer_attach()`, cancelled with it): the handle
//! pattern of ffi/README.md ("Handles").

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

use sdk::{EnhanceOptions, PromptEnhancer, RandomSampling, Sampling, TokenEvent};

use crate::args::{self, CBool, Versioned, ZIMAGE_RANDOM_SEED};
use crate::error::{zimage_result, Failure};
use crate::load_params::{self, zimage_load_params};
use crate::log::{log, zimage_log_level, Logger};
use crate::ort_log::CurrentLogger;
use crate::panic::{guard, guard_value};
use crate::pipeline::zimage_pipeline;
use crate::strings::c_string;

/// A loaded prompt enhancer (its decoder session and tokenizer), freed with
/// `zimage_enhancer_free()`.
///
/// Thread safety: `zimage_enhance()` and `zimage_enhancer_cancel()` may be called on one
/// enhancer from several threads at once (enhancements take turns per decoder call), and one
/// enhancer may serve `zimage_generate()` calls on any number of pipelines.
/// `zimage_enhancer_free()` must not race with any other call on the same enhancer.
pub struct zimage_enhancer {
    pub(crate) enhancer: PromptEnhancer,
    logger: Option<Logger>,
}

/// How to enhance. Fill it with `zimage_enhance_params_init()` (the built-in system prompt,
/// thinking off, greedy decoding, at most 512 new tokens), then change fields. Pointers in it
/// are borrowed for the duration of the call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct zimage_enhance_params {
    /// `sizeof(zimage_enhance_params)`, set by `zimage_enhance_params_init()`.
    pub struct_size: usize,
    /// The instructions given to the model (UTF-8); NULL uses zimage's built-in ones.
    pub system_prompt: *const c_char,
    /// Let the model reason in a `<think>` block first (better on riddles, slower; the block
    /// counts against `max_new_tokens` and is never part of the returned text).
    pub thinking: CBool,
    /// Most tokens generated, 1..=32768; 0 = the default (512). Generation also stops at the
    /// model's context length.
    pub max_new_tokens: u32,
    /// false: greedy decoding (deterministic; the sampling fields below are ignored).
    /// true: seeded sampling with `temperature`, `top_k` and `top_p`.
    pub sample: CBool,
    /// In (0, 100]; below 1 sharpens the distribution, above 1 flattens it. Default 0.7.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 = all. Default 20.
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens whose probability reaches top_p, in (0, 1].
    /// Default 0.8.
    pub top_p: f32,
    /// The sampling seed; `ZIMAGE_RANDOM_SEED` (the default) draws one, reported through
    /// `zimage_enhance()`'s `out_seed`.
    pub seed: u64,
    /// Most tokens the decoder holds, the templated prompt and the answer together; 0 = the
    /// default (8192). It bounds the key/value cache's memory (Qwen3-4B: 288 KiB per token): a
    /// longer prompt is `ZIMAGE_RESULT_INVALID_REQUEST`, and generation stops when the answer
    /// fills it. The model's own context length applies when it is smaller. (Added after
    /// `seed`: a caller's smaller `struct_size` means the default.)
    pub max_context_tokens: u32,
}

unsafe impl Versioned for zimage_enhance_params {
    const FIRST_VERSION_SIZE: usize = offset_of!(zimage_enhance_params, seed) + size_of::<u64>();

    fn defaults() -> Self {
        // The SDK's defaults, so the C API cannot drift from them.
        let options = EnhanceOptions::default();
        let sampling = RandomSampling::default();
        zimage_enhance_params {
            struct_size: size_of::<Self>(),
            system_prompt: std::ptr::null(),
            thinking: options.thinking.into(),
            max_new_tokens: options.max_new_tokens as u32,
            sample: CBool::FALSE,
            temperature: sampling.temperature,
            top_k: sampling.top_k as u32,
            top_p: sampling.top_p,
            seed: sampling.seed.unwrap_or(ZIMAGE_RANDOM_SEED),
            max_context_tokens: options.max_context_tokens as u32,
        }
    }
}

/// Fills `params` with the defaults and sets `struct_size`.
///
/// Writes this library's whole struct. Kept for programs built against headers without the init
/// macros; the header's `zimage_enhance_params_init` macro calls
/// `zimage_enhance_params_init_sized()` instead.
#[no_mangle]
pub unsafe extern "C" fn zimage_enhance_params_init(params: *mut zimage_enhance_params) -> zimage_result {
    guard(|| unsafe { args::init_sized(params, size_of::<zimage_enhance_params>(), zimage_enhance_params::defaults()) })
}

/// Like `zimage_enhance_params_init()`, but writes only the first `size` bytes, with
/// `struct_size = size`: `size` is the caller's `sizeof(zimage_enhance_params)`, which the header's
/// `zimage_enhance_params_init` macro passes, so a program built against an older, smaller header
/// gets its own struct filled. A `size` that is no version's `sizeof` (one from a newer header
/// included) is `ZIMAGE_RESULT_INVALID_ARGUMENT` and writes
/// only `struct_size`, to 0 (when `size` holds it), so that every call refuses the struct.
#[no_mangle]
pub unsafe extern "C" fn zimage_enhance_params_init_sized(
    params: *mut zimage_enhance_params,
    size: usize,
) -> zimage_result {
    guard(|| unsafe { args::init_sized(params, size, zimage_enhance_params::defaults()) })
}

/// Reads enhance parameters; NULL means all defaults. Range checks are the SDK's
/// (`ZIMAGE_RESULT_INVALID_REQUEST`).
pub(crate) unsafe fn enhance_options(
    params: *const zimage_enhance_params,
    what: &str,
) -> Result<EnhanceOptions, Failure> {
    let p =
        if params.is_null() { zimage_enhance_params::defaults() } else { unsafe { args::versioned(params, what) }? };
    let system_prompt =
        unsafe { args::optional_string(p.system_prompt, &format!("{what}->system_prompt")) }?.map(str::to_owned);
    let sampling = if p.sample.get() {
        Sampling::Random(RandomSampling {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            seed: (p.seed != ZIMAGE_RANDOM_SEED).then_some(p.seed),
        })
    } else {
        Sampling::Greedy
    };
    let mut options = EnhanceOptions::default();
    options.system_prompt = system_prompt;
    options.thinking = p.thinking.get();
    if p.max_new_tokens != 0 {
        options.max_new_tokens = p.max_new_tokens as usize;
    }
    options.sampling = sampling;
    if p.max_context_tokens != 0 {
        options.max_context_tokens = p.max_context_tokens as usize;
    }
    Ok(options)
}

/// Called for every generated token (end tokens excepted), on the thread that called
/// `zimage_enhance()`. `index` counts from 0; `text` (UTF-8, valid only during the call) is the
/// text this token completes, empty while a multi-byte character is incomplete; `thinking` is
/// true inside the `<think>…</think>` block, tags included. Return true to go on, false to stop:
/// the call then fails with `ZIMAGE_RESULT_CANCELLED`.
pub type zimage_token_callback = Option<
    unsafe extern "C" fn(
        index: u32,
        token_id: u32,
        text: *const c_char,
        thinking: bool,
        user_data: *mut c_void,
    ) -> CBool,
>;

/// Loads the prompt enhancer of the package in `package_dir` (UTF-8): a standalone enhancer
/// package, or a Z-Image package that carries a decoder (`ZIMAGE_RESULT_PACKAGE` when it has
/// none). `params` may be NULL for the defaults (CPU); its log callback receives this
/// enhancer's messages. A TensorRT `device` runs the decoder with CUDA. On success
/// `*out_enhancer` receives an enhancer to free with `zimage_enhancer_free()`.
#[no_mangle]
pub unsafe extern "C" fn zimage_enhancer_load(
    package_dir: *const c_char,
    params: *const zimage_load_params,
    out_enhancer: *mut *mut zimage_enhancer,
) -> zimage_result {
    guard(|| {
        let dir = unsafe { args::string(package_dir, "package_dir") }?;
        unsafe { load_into(out_enhancer, params, dir, |options| PromptEnhancer::load(dir, options)) }
    })
}

/// Loads the prompt enhancer of the package `pipeline` was loaded from (`ZIMAGE_RESULT_PACKAGE`
/// when it has no decoder). `zimage_cancel(pipeline)` then stops this enhancer's enhancements
/// too. `params` as for `zimage_enhancer_load()`; the pipeline's own load parameters are not
/// reused. The enhancer does not keep the pipeline alive: either may be freed first.
#[no_mangle]
pub unsafe extern "C" fn zimage_enhancer_attach(
    pipeline: *const zimage_pipeline,
    params: *const zimage_load_params,
    out_enhancer: *mut *mut zimage_enhancer,
) -> zimage_result {
    guard(|| {
        let pipeline = unsafe { args::reference(pipeline, "pipeline") }?;
        let dir = pipeline.pipeline.package_dir().display().to_string();
        unsafe { load_into(out_enhancer, params, &dir, |options| pipeline.pipeline.attach_enhancer(options)) }
    })
}

/// What `zimage_enhancer_load()` and `zimage_enhancer_attach()` share: read the parameters,
/// log, load with `load`, and hand the enhancer out.
unsafe fn load_into(
    out_enhancer: *mut *mut zimage_enhancer,
    params: *const zimage_load_params,
    dir: &str,
    load: impl FnOnce(&sdk::LoadOptions) -> sdk::Result<PromptEnhancer>,
) -> Result<(), Failure> {
    let out = args::output(out_enhancer, "out_enhancer")?;
    let load_params::Load { options, logger } = unsafe { load_params::load_options(params) }?;
    let _current = CurrentLogger::enter(logger.clone());
    log(logger.as_ref(), zimage_log_level::Info, || {
        format!("loading the prompt enhancer of {dir} on {}", options.device)
    });
    let enhancer = load(&options).inspect_err(|e| log(logger.as_ref(), zimage_log_level::Error, || e.to_string()))?;
    unsafe { out.write(loaded(enhancer, logger)) };
    Ok(())
}

fn loaded(enhancer: PromptEnhancer, logger: Option<Logger>) -> *mut zimage_enhancer {
    log(logger.as_ref(), zimage_log_level::Info, || {
        format!("loaded the prompt enhancer of {} on {}", enhancer.package_dir().display(), enhancer.device())
    });
    if let Some(reason) = enhancer.provider_fallback() {
        log(logger.as_ref(), zimage_log_level::Warn, || {
            format!(
                "{} runs on the CPU: the requested execution provider could not be set up: {reason}",
                sdk::GraphKind::TextDecoder
            )
        });
    }
    Box::into_raw(Box::new(zimage_enhancer { enhancer, logger }))
}

/// Frees an enhancer. No other call may be using it, and no `zimage_generate()` whose
/// parameters name it may be running. NULL is fine; freeing twice is not.
#[no_mangle]
pub unsafe extern "C" fn zimage_enhancer_free(enhancer: *mut zimage_enhancer) {
    guard_value((), || {
        if !enhancer.is_null() {
            drop(unsafe { Box::from_raw(enhancer) });
        }
    })
}

/// Rewrites `prompt` (UTF-8, not blank; with the system prompt at most 1 MiB) into a detailed
/// visual description. `params` may be NULL for the defaults. `callback` (NULL for none) sees
/// each token as it is generated, with `user_data` passed back unchanged.
///
/// On success `*out_text` receives the rewritten prompt (UTF-8, trimmed, without any think
/// block; empty when the model spent every token thinking), to free with `zimage_string_free()`,
/// and `*out_seed`, unless `out_seed` is NULL, the sampling seed used (0 with greedy decoding).
/// On failure neither is written. `ZIMAGE_RESULT_CANCELLED` when the callback returned false
/// or `zimage_enhancer_cancel()` (or, for an attached enhancer, `zimage_cancel()`) was called
/// meanwhile; `ZIMAGE_RESULT_INVALID_REQUEST` for out-of-range parameters or a prompt longer
/// than the model's context.
#[no_mangle]
pub unsafe extern "C" fn zimage_enhance(
    enhancer: *const zimage_enhancer,
    prompt: *const c_char,
    params: *const zimage_enhance_params,
    callback: zimage_token_callback,
    user_data: *mut c_void,
    out_text: *mut *mut c_char,
    out_seed: *mut u64,
) -> zimage_result {
    guard(|| {
        let handle = unsafe { args::reference(enhancer, "enhancer") }?;
        let _current = CurrentLogger::enter(handle.logger.clone());
        let result = unsafe { enhance(handle, prompt, params, callback, user_data, out_text, out_seed) };
        if let Err(f) = &result {
            let level =
                if f.code == zimage_result::Cancelled { zimage_log_level::Info } else { zimage_log_level::Error };
            log(handle.logger.as_ref(), level, || f.message.clone());
        }
        result
    })
}

unsafe fn enhance(
    handle: &zimage_enhancer,
    prompt: *const c_char,
    params: *const zimage_enhance_params,
    callback: zimage_token_callback,
    user_data: *mut c_void,
    out_text: *mut *mut c_char,
    out_seed: *mut u64,
) -> Result<(), Failure> {
    let prompt = unsafe { args::string(prompt, "prompt") }?;
    let out = args::output(out_text, "out_text")?;
    let options = unsafe { enhance_options(params, "params") }?;
    let mut on_token = |event: &TokenEvent| -> bool {
        let Some(callback) = callback else { return true };
        let text = c_string(event.text);
        unsafe { callback(event.index as u32, event.token_id, text.as_ptr(), event.thinking, user_data) }.get()
    };
    let with_callback: Option<&mut dyn FnMut(&TokenEvent) -> bool> = match callback {
        Some(_) => Some(&mut on_token),
        None => None,
    };
    let enhancement = handle.enhancer.enhance(prompt, &options, with_callback)?;
    log(handle.logger.as_ref(), zimage_log_level::Info, || {
        format!(
            "enhanced a prompt of {} tokens into {} new tokens in {:.2} s ({:?})",
            enhancement.prompt_tokens,
            enhancement.token_ids.len(),
            enhancement.timings.total.as_secs_f64(),
            enhancement.finish
        )
    });
    let text = c_string(&enhancement.text);
    unsafe { out.write(text.into_raw()) };
    if let Some(seed) = unsafe { out_seed.as_mut() } {
        *seed = enhancement.seed.unwrap_or(0);
    }
    Ok(())
}

/// Stops every enhancement running on `enhancer` at the moment of the call (they return
/// `ZIMAGE_RESULT_CANCELLED` soon after); for an attached enhancer, the pipeline's generations
/// too. Later calls are not affected. Safe to call from any thread; returns at once.
#[no_mangle]
pub unsafe extern "C" fn zimage_enhancer_cancel(enhancer: *const zimage_enhancer) -> zimage_result {
    guard(|| {
        let handle = unsafe { args::reference(enhancer, "enhancer") }?;
        handle.enhancer.cancel_handle().cancel();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_default_to_the_sdk_and_are_checked() {
        let mut p = std::mem::MaybeUninit::<zimage_enhance_params>::uninit();
        assert_eq!(unsafe { zimage_enhance_params_init(p.as_mut_ptr()) }, zimage_result::Ok);
        let mut p = unsafe { p.assume_init() };
        assert_eq!(unsafe { enhance_options(&p, "p") }.unwrap(), EnhanceOptions::default());
        assert_eq!(unsafe { enhance_options(std::ptr::null(), "p") }.unwrap(), EnhanceOptions::default());
        p.max_new_tokens = 0;
        assert_eq!(unsafe { enhance_options(&p, "p") }.unwrap().max_new_tokens, 512);
        p.sample = CBool::TRUE;
        p.seed = 7;
        p.system_prompt = c"Describe.".as_ptr();
        let o = unsafe { enhance_options(&p, "p") }.unwrap();
        assert_eq!(o.system_prompt.as_deref(), Some("Describe."));
        assert_eq!(o.sampling, Sampling::Random(RandomSampling { seed: Some(7), ..RandomSampling::default() }));
        p.max_context_tokens = 100;
        assert_eq!(unsafe { enhance_options(&p, "p") }.unwrap().max_context_tokens, 100);
        p.max_context_tokens = 0;
        assert_eq!(unsafe { enhance_options(&p, "p") }.unwrap().max_context_tokens, sdk::DEFAULT_MAX_CONTEXT_TOKENS);
        // A caller built before the field existed: its struct ends at `seed`, the default applies.
        p.max_context_tokens = 100;
        p.struct_size = zimage_enhance_params::FIRST_VERSION_SIZE;
        assert_eq!(unsafe { enhance_options(&p, "p") }.unwrap().max_context_tokens, sdk::DEFAULT_MAX_CONTEXT_TOKENS);
        p.struct_size = 3;
        assert_eq!(unsafe { enhance_options(&p, "p") }.unwrap_err().code, zimage_result::InvalidArgument);
    }
}
