//! `zimage_generate()`: the call that brings a pipeline, its per-call parameters and the handles
//! they name (prompt embeddings, an enhancer) together, and hands out an image list.

use std::time::Duration;

use sdk::{Generation, Progress};

use crate::args;
use crate::error::{zimage_result, Failure};
use crate::generate_params::{self, zimage_generate_params, Generate};
use crate::image::zimage_image_list;
use crate::log::{log, zimage_log_level, Logger};
use crate::panic::guard;
use crate::pipeline::zimage_pipeline;

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
        let _current = handle.enter();
        handle.logged(unsafe { generate(handle, params, out_images) })
    })
}

unsafe fn generate(
    handle: &zimage_pipeline,
    params: *const zimage_generate_params,
    out_images: *mut *mut zimage_image_list,
) -> Result<(), Failure> {
    let out = args::output(out_images, "out_images")?;
    let Generate { request, progress, progress_user_data, enhance } =
        unsafe { generate_params::generate_request(params) }?;
    log(handle.logger(), zimage_log_level::Debug, || {
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
            log(handle.logger(), zimage_log_level::Debug, || {
                format!("enhanced prompt: {}", generation.enhanced_prompt.as_deref().unwrap_or(""))
            });
            generation
        }
    };
    log_generation(handle.logger(), &generation);
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
