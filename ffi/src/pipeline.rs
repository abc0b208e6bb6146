//! The pipeline handle: load, cancel, free. Handles loaded against a pipeline (prompt
//! embeddings, attached enhancers) live in their own modules above this one, and generation,
//! which names them, above those (see ffi/README.md, "Handles").

use std::collections::BTreeSet;
use std::ffi::c_char;
use std::sync::Mutex;

use sdk::{Pipeline, Providers};

use crate::args;
use crate::error::{zimage_result, Failure};
use crate::load_params::{self, zimage_load_params};
use crate::log::{log, zimage_log_level, Logger};
use crate::ort_log::CurrentLogger;
use crate::panic::{guard, guard_value};

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
    /// The graphs whose CPU fallback the log callback has been told about: a graph's session
    /// may be made after load (the VAE encoder's, by the first request that encodes a
    /// picture), so each call reports the fallbacks that are new since the last one.
    reported_fallbacks: Mutex<BTreeSet<String>>,
}

impl zimage_pipeline {
    pub(crate) fn logger(&self) -> Option<&Logger> {
        self.logger.as_ref()
    }

    /// Makes this pipeline's logger the current thread's (for ONNX Runtime's own log lines)
    /// while the returned guard lives.
    pub(crate) fn enter(&self) -> CurrentLogger {
        CurrentLogger::enter(self.logger.clone())
    }

    /// With `allow_cpu_fallback` the SDK runs a graph on the CPU when its provider cannot be
    /// set up; the C caller has no other way to notice, nor to learn why: one WARN per graph,
    /// the first time the fallback is seen (at load, or at the call that made the session).
    pub(crate) fn report_fallbacks(&self) {
        // The lines are logged after the lock is released: the log callback may call zimage on
        // this pipeline, which comes back here.
        let new: Vec<String> = {
            let mut reported = self.reported_fallbacks.lock().unwrap_or_else(|p| p.into_inner());
            self.pipeline
                .provider_fallbacks()
                .into_iter()
                .filter(|(graph, _)| reported.insert(graph.to_string()))
                .map(|(graph, reason)| {
                    format!("{graph} runs on the CPU: the requested execution provider could not be set up: {reason}")
                })
                .collect()
        };
        for line in new {
            log(self.logger(), zimage_log_level::Warn, || line);
        }
    }

    /// Sends a failed call on this pipeline to its log callback (a cancellation at INFO, the
    /// rest at ERROR), and any CPU fallback the call's new sessions took, then passes the result on.
    pub(crate) fn logged<T>(&self, result: Result<T, Failure>) -> Result<T, Failure> {
        self.report_fallbacks();
        if let Err(f) = &result {
            let level =
                if f.code == zimage_result::Cancelled { zimage_log_level::Info } else { zimage_log_level::Error };
            log(self.logger(), level, || f.message.clone());
        }
        result
    }
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
        let load_params::Load { options, logger } = unsafe { load_params::load_options(params) }?;
        let _current = CurrentLogger::enter(logger.clone());
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
        let handle =
            Box::new(zimage_pipeline { pipeline, logger: logger.cloned(), reported_fallbacks: Mutex::default() });
        handle.report_fallbacks();
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

/// Frees a pipeline and its sessions. No other call may be using it. NULL is fine; freeing
/// twice is not. What was made with it stays valid: images, prompt embeddings, attached
/// enhancers.
#[no_mangle]
pub unsafe extern "C" fn zimage_pipeline_free(pipeline: *mut zimage_pipeline) {
    guard_value((), || {
        if !pipeline.is_null() {
            drop(unsafe { Box::from_raw(pipeline) });
        }
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

/// Attaches the package's ControlNet `name` (added with export_controlnet.py; UTF-8), or
/// detaches it with NULL: the transformer's session is replaced by the combined transformer +
/// ControlNet graph (the shared weights stay in memory once). LoRAs set on the pipeline stay
/// merged, into the weights the transformer and the ControlNet share. Requests with a
/// `control_image` need one attached. `ZIMAGE_RESULT_PACKAGE` when the package has no such ControlNet or it was
/// made for another transformer (the pipeline keeps what it had). Not while a generation runs
/// on `pipeline` from another thread (it waits for it).
#[no_mangle]
pub unsafe extern "C" fn zimage_pipeline_set_controlnet(
    pipeline: *const zimage_pipeline,
    name: *const c_char,
) -> zimage_result {
    guard(|| {
        let handle = unsafe { args::reference(pipeline, "pipeline") }?;
        let name = if name.is_null() { None } else { Some(unsafe { args::string(name, "name") }?) };
        let _current = handle.enter();
        handle.logged(handle.pipeline.set_controlnet(name).map_err(Failure::from))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::{c_void, CStr};
    use std::sync::atomic::{AtomicPtr, Ordering};

    use crate::args::CBool;
    use crate::generate::zimage_generate;
    use crate::generate_params::zimage_generate_params;
    use crate::image::{zimage_image, zimage_image_list_free};
    use crate::load_params::{zimage_device, zimage_load_params_init};
    use crate::prompt::{zimage_encode_prompt, zimage_prompt_embedding_free};

    /// The pipeline the log callback calls back into, and what those calls returned.
    struct Reenter {
        pipeline: AtomicPtr<zimage_pipeline>,
        nested: Mutex<Vec<zimage_result>>,
    }

    unsafe extern "C" fn encode_on_fallback(level: u32, message: *const c_char, user_data: *mut c_void) {
        let reenter = unsafe { &*(user_data as *const Reenter) };
        let message = unsafe { CStr::from_ptr(message) }.to_string_lossy();
        let pipeline = reenter.pipeline.load(Ordering::SeqCst);
        if level == zimage_log_level::Warn as u32 && message.starts_with("vae_encoder runs on the CPU") {
            let mut embedding = std::ptr::null_mut();
            let code = unsafe { zimage_encode_prompt(pipeline, c"a fox".as_ptr(), 0, &mut embedding) };
            unsafe { zimage_prompt_embedding_free(embedding) };
            reenter.nested.lock().unwrap().push(code);
        }
    }

    /// A log callback may call zimage on the pipeline whose message it receives, also when the
    /// message is a CPU fallback's warning. The CPU build of ONNX Runtime the tests run with
    /// has no CUDA provider: with fallback, every graph runs on the CPU, and the VAE encoder's
    /// session (made by the first image-to-image request) is reported by that request.
    #[test]
    fn the_log_callback_may_call_back_into_the_pipeline() {
        let reenter = Reenter { pipeline: AtomicPtr::new(std::ptr::null_mut()), nested: Mutex::default() };
        let mut load = std::mem::MaybeUninit::uninit();
        unsafe { zimage_load_params_init(load.as_mut_ptr()) };
        let mut load = unsafe { load.assume_init() };
        load.device = zimage_device::Cuda as u32;
        load.allow_cpu_fallback = CBool::TRUE;
        load.log_callback = Some(encode_on_fallback);
        load.log_user_data = &reenter as *const Reenter as *mut c_void;
        let package = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-zimage\0");
        let mut pipeline = std::ptr::null_mut();
        assert_eq!(unsafe { zimage_pipeline_load(package.as_ptr().cast(), &load, &mut pipeline) }, zimage_result::Ok);
        reenter.pipeline.store(pipeline, Ordering::SeqCst);

        let rgb = [128u8; 64 * 64 * 3];
        let mut params = zimage_generate_params_default();
        params.prompt = c"a lighthouse".as_ptr();
        (params.width, params.height, params.steps, params.seed) = (64, 64, 2, 1);
        params.init_image = zimage_image { pixels: rgb.as_ptr(), width: 64, height: 64, stride: 0 };
        let mut images = std::ptr::null_mut();
        assert_eq!(unsafe { zimage_generate(pipeline, &params, &mut images) }, zimage_result::Ok);
        assert_eq!(*reenter.nested.lock().unwrap(), [zimage_result::Ok]);
        unsafe { zimage_image_list_free(images) };
        unsafe { zimage_pipeline_free(pipeline) };
    }

    fn zimage_generate_params_default() -> zimage_generate_params {
        let mut params = std::mem::MaybeUninit::uninit();
        unsafe { crate::generate_params::zimage_generate_params_init(params.as_mut_ptr()) };
        unsafe { params.assume_init() }
    }
}
