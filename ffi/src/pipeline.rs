//! The pipeline handle: load, generate, encode prompts, cancel, free.

use std::ffi::c_char;
use std::time::Duration;

use sdk::{Device, Generation, Pipeline, Progress, Providers};

use crate::args;
use crate::error::{zimage_result, Failure};
use crate::image::zimage_image_list;
use crate::log::{log, zimage_log_level, Logger};
use crate::panic::{guard, guard_value};
use crate::params::{self, zimage_generate_params, zimage_load_params, Generate};
use crate::prompt::zimage_prompt_embedding;

/// A loaded model package: its ONNX Runtime sessions, ready to generate.
///
/// Thread safety: `zimage_generate()`, `zimage_encode_prompt()` and `zimage_cancel()` may be
/// called on one pipeline from several threads at once. Generations then take turns inside
/// each graph (one ONNX Runtime call at a time per graph), so they overlap rather than run
/// fully in parallel; load one pipeline per thread for that, at the cost of memory.
/// `zimage_pipeline_free()` must not race with any other call on the same pipeline.
pub struct zimage_pipeline {
    pub(crate) pipeline: Pipeline,
    logger: Option<Logger>,
}

/// Loads the model package in the folder `package_dir` (UTF-8). `params` may be NULL for the
/// defaults (CPU). On success `*out_pipeline` receives a pipeline to free with
/// `zimage_pipeline_free()`; on failure it is left untouched.
///
/// The first load in a process also loads ONNX Runtime, which then stays loaded: every later
/// pipeline must use the same library.
#[no_mangle]
pub unsafe extern "C" fn zimage_pipeline_load(
    package_dir: *const c_char,
    params: *const zimage_load_params,
    out_pipeline: *mut *mut zimage_pipeline,
) -> zimage_result {
    guard(|| {
        let dir = unsafe { args::string(package_dir, "package_dir") }?;
        let out = args::output(out_pipeline, "out_pipeline")?;
        let params::Load { options, logger } = unsafe { params::load_options(params) }?;
        let logger = logger.as_ref();
        log(logger, zimage_log_level::Info, || format!("loading model package {dir} on {}", options.device));
        let pipeline =
            Pipeline::load(dir, &options).inspect_err(|e| log(logger, zimage_log_level::Error, || e.to_string()))?;
        log(logger, zimage_log_level::Info, || {
            format!(
                "loaded {dir} in {:.2} s with ONNX Runtime {}; {}",
                pipeline.load_time().as_secs_f64(),
                pipeline.runtime_library().display(),
                describe_providers(&pipeline.providers())
            )
        });
        warn_on_fallback(logger, &options, &pipeline.providers());
        let handle = Box::new(zimage_pipeline { pipeline, logger: logger.copied() });
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

fn describe_providers(p: &Providers) -> String {
    format!(
        "text_encoder on {}, transformer on {}, vae_decoder on {}, vae_encoder on {}",
        p.text_encoder, p.transformer, p.vae_decoder, p.vae_encoder
    )
}

/// With `allow_cpu_fallback` the SDK runs on CPU when a provider cannot be set up; the C
/// caller has no other way to notice.
fn warn_on_fallback(logger: Option<&Logger>, options: &sdk::LoadOptions, used: &Providers) {
    let wanted_transformer: Device = options.transformer_device.unwrap_or(options.device);
    if used.text_encoder != options.device || used.transformer != wanted_transformer {
        log(logger, zimage_log_level::Warn, || {
            format!(
                "a requested execution provider could not be set up and CPU is used instead: {}",
                describe_providers(used)
            )
        });
    }
}

/// Frees a pipeline and its sessions. No other call may be using it. NULL is fine; freeing
/// twice is not. Images and embeddings made with it stay valid.
#[no_mangle]
pub unsafe extern "C" fn zimage_pipeline_free(pipeline: *mut zimage_pipeline) {
    guard_value((), || {
        if !pipeline.is_null() {
            drop(unsafe { Box::from_raw(pipeline) });
        }
    })
}

/// Generates images. On success `*out_images` receives a list to free with
/// `zimage_image_list_free()`; on failure it is left untouched.
///
/// Blocks until done. `ZIMAGE_RESULT_CANCELLED` when the progress callback returned false or
/// `zimage_cancel()` was called meanwhile; the pipeline stays usable either way. Every failure
/// is also sent to the pipeline's log callback (cancellation at INFO, the rest at ERROR).
#[no_mangle]
pub unsafe extern "C" fn zimage_generate(
    pipeline: *const zimage_pipeline,
    params: *const zimage_generate_params,
    out_images: *mut *mut zimage_image_list,
) -> zimage_result {
    guard(|| {
        let handle = unsafe { args::reference(pipeline, "pipeline") }?;
        logged(handle, unsafe { generate(handle, params, out_images) })
    })
}

/// Sends a failed call on `handle` to its log callback, then passes the result on.
fn logged<T>(handle: &zimage_pipeline, result: Result<T, Failure>) -> Result<T, Failure> {
    if let Err(f) = &result {
        let level = if f.code == zimage_result::Cancelled { zimage_log_level::Info } else { zimage_log_level::Error };
        log(handle.logger.as_ref(), level, || f.message.clone());
    }
    result
}

unsafe fn generate(
    handle: &zimage_pipeline,
    params: *const zimage_generate_params,
    out_images: *mut *mut zimage_image_list,
) -> Result<(), Failure> {
    let out = args::output(out_images, "out_images")?;
    let Generate { request, progress, progress_user_data, enhance } = unsafe { params::generate_request(params) }?;
    log(handle.logger.as_ref(), zimage_log_level::Debug, || {
        format!(
            "generate {}x{}, {} steps, {} image(s), guidance {}, seed {}",
            request.width,
            request.height,
            request.steps,
            request.count,
            request.guidance_scale,
            request.seed.map_or("random".to_string(), |s| s.to_string())
        )
    });
    let mut on_progress = |p: &Progress| -> bool {
        match progress {
            Some(callback) => unsafe {
                callback(p.step as u32, p.total_steps as u32, p.elapsed.as_secs_f64(), progress_user_data)
            },
            None => true,
        }
    };
    let generation = match enhance {
        None => handle.pipeline.generate(&request, Some(&mut on_progress))?,
        Some((enhancer, options)) => {
            // Checked non-NULL when the parameters were read; the header makes the caller keep
            // it alive during the call.
            let enhancer = &unsafe { &*enhancer }.enhancer;
            let generation = handle.pipeline.generate_enhanced(enhancer, &options, &request, Some(&mut on_progress))?;
            log(handle.logger.as_ref(), zimage_log_level::Debug, || {
                format!("enhanced prompt: {}", generation.enhanced_prompt.as_deref().unwrap_or(""))
            });
            generation
        }
    };
    log_generation(handle.logger.as_ref(), &generation);
    let list = Box::new(zimage_image_list::new(generation));
    unsafe { out.write(Box::into_raw(list)) };
    Ok(())
}

fn log_generation(logger: Option<&Logger>, g: &Generation) {
    if g.prompt_truncated() {
        log(logger, zimage_log_level::Warn, || {
            format!(
                "the prompt was truncated from {} to {} tokens",
                g.prompt_tokens.full_length,
                g.prompt_tokens.ids.len()
            )
        });
    }
    log(logger, zimage_log_level::Info, || {
        let t = &g.timings;
        format!(
            "generated {} image(s) in {:.2} s (seed {}; text encoder {:.2} s, denoising {:.2} s, VAE {:.2} s)",
            g.images.len(),
            t.total.as_secs_f64(),
            g.seed,
            t.text_encode.as_secs_f64(),
            t.denoise_steps.iter().sum::<Duration>().as_secs_f64(),
            t.vae_decode.as_secs_f64()
        )
    });
}

/// Encodes `prompt` (UTF-8) once, for use as `prompt_embedding` or `negative_prompt_embedding`
/// in any number of generations. `max_sequence_length`: tokens kept, chat template included;
/// 0 = the package's default. On success `*out_embedding` receives an embedding to free with
/// `zimage_prompt_embedding_free()`.
#[no_mangle]
pub unsafe extern "C" fn zimage_encode_prompt(
    pipeline: *const zimage_pipeline,
    prompt: *const c_char,
    max_sequence_length: u32,
    out_embedding: *mut *mut zimage_prompt_embedding,
) -> zimage_result {
    guard(|| {
        let handle = unsafe { args::reference(pipeline, "pipeline") }?;
        let encode = || -> Result<(), Failure> {
            let prompt = unsafe { args::string(prompt, "prompt") }?;
            let out = args::output(out_embedding, "out_embedding")?;
            let max = (max_sequence_length > 0).then_some(max_sequence_length as usize);
            let embedding = handle.pipeline.encode_prompt(prompt, max)?;
            unsafe { out.write(Box::into_raw(Box::new(zimage_prompt_embedding { embedding }))) };
            Ok(())
        };
        logged(handle, encode())
    })
}

/// Stops every generation and prompt encoding running on `pipeline` at the moment of the call;
/// they return `ZIMAGE_RESULT_CANCELLED` soon after (the ONNX Runtime call in flight is
/// interrupted). Calls started afterwards are not affected. Safe to call from any thread (a UI
/// thread while a worker generates, say) and returns at once; not from a signal handler, as it
/// takes a lock.
#[no_mangle]
pub unsafe extern "C" fn zimage_cancel(pipeline: *const zimage_pipeline) -> zimage_result {
    guard(|| {
        let handle = unsafe { args::reference(pipeline, "pipeline") }?;
        handle.pipeline.cancel_handle().cancel();
        Ok(())
    })
}
