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
    let Generate { request, callbacks, enhance } = unsafe { generate_params::generate_request(params) }?;
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
    let mut on_progress = |p: &Progress| callbacks.on_step(p);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::ffi::{c_char, c_void};

    use crate::args::CBool;
    use crate::generate_params::zimage_generate_params_init;
    use crate::image::{zimage_image, zimage_image_list_free, zimage_image_list_get};
    use crate::load_params::zimage_load_params_init;
    use crate::pipeline::{zimage_pipeline_free, zimage_pipeline_load};

    /// One picture of a preview: (width, height, stride) and its pixels.
    type Picture = ((u32, u32, usize), Vec<u8>);

    /// What the callbacks saw, in order: ("progress" or "preview", step, total steps).
    #[derive(Default)]
    struct Seen {
        calls: Vec<(&'static str, u32, u32)>,
        /// Per preview, one picture per image.
        previews: Vec<Vec<Picture>>,
    }

    unsafe extern "C" fn on_progress(step: u32, total: u32, _: f64, user_data: *mut c_void) -> CBool {
        unsafe { &mut *(user_data as *mut Seen) }.calls.push(("progress", step, total));
        CBool::TRUE
    }

    unsafe extern "C" fn on_preview(
        step: u32,
        total: u32,
        images: *const zimage_image,
        count: u32,
        user_data: *mut c_void,
    ) {
        let seen = unsafe { &mut *(user_data as *mut Seen) };
        seen.calls.push(("preview", step, total));
        let views = unsafe { std::slice::from_raw_parts(images, count as usize) };
        let copies = views
            .iter()
            .map(|v| {
                let bytes = unsafe { std::slice::from_raw_parts(v.pixels, v.stride * v.height as usize) };
                ((v.width, v.height, v.stride), bytes.to_vec())
            })
            .collect();
        seen.previews.push(copies);
    }

    /// Generates 64x64 images from a fixed seed; returns what the callbacks saw and the images.
    fn run(
        pipeline: *const zimage_pipeline,
        steps: u32,
        count: u32,
        previews: u32,
        callback: bool,
    ) -> (Seen, Vec<Vec<u8>>) {
        let mut seen = Seen::default();
        let mut params = std::mem::MaybeUninit::uninit();
        unsafe { zimage_generate_params_init(params.as_mut_ptr()) };
        let mut params = unsafe { params.assume_init() };
        params.prompt = c"a red fox in the snow".as_ptr();
        (params.width, params.height, params.steps, params.count, params.seed) = (64, 64, steps, count, 7);
        params.progress_callback = Some(on_progress);
        params.progress_user_data = &mut seen as *mut Seen as *mut c_void;
        params.preview_count = previews;
        params.preview_callback = if callback { Some(on_preview) } else { None };
        let mut list = std::ptr::null_mut();
        assert_eq!(unsafe { zimage_generate(pipeline, &params, &mut list) }, zimage_result::Ok);
        let images = (0..count as usize)
            .map(|i| {
                let mut view = zimage_image::NONE;
                assert_eq!(unsafe { zimage_image_list_get(list, i, &mut view) }, zimage_result::Ok);
                unsafe { std::slice::from_raw_parts(view.pixels, view.stride * view.height as usize) }.to_vec()
            })
            .collect();
        unsafe { zimage_image_list_free(list) };
        (seen, images)
    }

    unsafe extern "C" fn ignore_log(_: u32, _: *const c_char, _: *mut c_void) {}

    #[test]
    fn previews_reach_the_preview_callback() {
        // With a log callback: the first load of the test process decides whether ONNX Runtime
        // logs its INFO lines at all (only when someone listens), which ort_log's tests need.
        let mut load = std::mem::MaybeUninit::uninit();
        unsafe { zimage_load_params_init(load.as_mut_ptr()) };
        let mut load = unsafe { load.assume_init() };
        load.log_callback = Some(ignore_log);
        let package = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-zimage\0");
        let mut pipeline = std::ptr::null_mut();
        let code = unsafe { zimage_pipeline_load(package.as_ptr().cast(), &load, &mut pipeline) };
        assert_eq!(code, zimage_result::Ok);

        let (plain, plain_images) = run(pipeline, 4, 2, 0, false);
        let progress: Vec<_> = (1..=4).map(|step| ("progress", step, 4)).collect();
        assert_eq!(plain.calls, progress);

        // 4 steps, 3 previews: after steps 1, 2 and 3, each right after that step's progress.
        let (seen, images) = run(pipeline, 4, 2, 3, true);
        let expected: Vec<_> = (1..=4)
            .flat_map(|step| [("progress", step, 4), ("preview", step, 4)])
            .filter(|&(kind, step, _)| kind == "progress" || step < 4)
            .collect();
        assert_eq!(seen.calls, expected);
        assert_eq!(seen.previews.len(), 3);
        for preview in &seen.previews {
            assert_eq!(preview.len(), 2, "one picture per image of the request");
            for (shape, pixels) in preview {
                assert_eq!(*shape, (64, 64, 64 * 3));
                // A picture, not an empty buffer: many different values.
                assert!(pixels.iter().collect::<BTreeSet<_>>().len() > 32, "a flat preview");
            }
        }
        // The last preview is the estimate one step early: close to the result, not equal.
        for (i, (_, pixels)) in seen.previews[2].iter().enumerate() {
            assert_ne!(*pixels, images[i], "preview of image {i} at step 3 equals the final image");
        }
        // Previews change nothing in the images.
        assert_eq!(images, plain_images);

        // A count without a callback makes none, and changes nothing either.
        let (seen, images) = run(pipeline, 4, 2, 3, false);
        assert_eq!((seen.calls, images), (progress, plain_images));

        // 8 steps, 2 previews: steps 3 and 6.
        let (seen, _) = run(pipeline, 8, 1, 2, true);
        let at: Vec<u32> = seen.calls.iter().filter(|c| c.0 == "preview").map(|c| c.1).collect();
        assert_eq!(at, [3, 6]);
        unsafe { zimage_pipeline_free(pipeline) };
    }
}
