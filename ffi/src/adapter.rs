//! LoRA adapters, after llama.h (`llama_adapter_lora_init(model, path)`, then a per-context set
//! with scales): a handle loaded once against a pipeline (`zimage_lora_adapter_init()`), owned
//! by the caller, and the call that sets which adapters a pipeline's generations apply, with
//! their strengths (`zimage_pipeline_set_adapters()`). See ffi/README.md, "Handles".

use std::ffi::c_char;
use std::sync::Arc;

use sdk::{LoraAdapter, LoraSetting};

use crate::args;
use crate::error::{zimage_result, Failure};
use crate::log::{log, zimage_log_level};
use crate::panic::{guard, guard_value};
use crate::pipeline::zimage_pipeline;

/// A LoRA adapter read from a `.safetensors` file (diffusers/PEFT, kohya, ComfyUI/musubi, LoKr),
/// made by `zimage_lora_adapter_init()` and freed with `zimage_adapter_free()`. Immutable: one
/// adapter can be set on several pipelines of the same model. It holds its own data: it stays
/// valid after the pipeline that made it is freed, and a pipeline it is set on keeps its own
/// reference, so freeing the handle never changes a pipeline.
pub struct zimage_adapter {
    adapter: Arc<LoraAdapter>,
}

/// One adapter and its strength, for `zimage_pipeline_set_adapters()`. `scale` multiplies the
/// adapter's update (diffusers' `set_adapters` weight; 1.0 = as trained, 0 = off); finite.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct zimage_adapter_setting {
    pub adapter: *const zimage_adapter,
    pub scale: f32,
}

/// Reads the LoRA file at `path` (UTF-8) and checks it against `pipeline`'s transformer (every
/// module it changes exists, with matching shapes). On success `*out_adapter` receives an
/// adapter to free with `zimage_adapter_free()`. `ZIMAGE_RESULT_LORA` when the file is not a
/// readable LoRA or is for another model (the message names the first key that does not fit),
/// `ZIMAGE_RESULT_IO` when it cannot be read. Nothing is applied until
/// `zimage_pipeline_set_adapters()`.
#[no_mangle]
pub unsafe extern "C" fn zimage_lora_adapter_init(
    pipeline: *const zimage_pipeline,
    path: *const c_char,
    out_adapter: *mut *mut zimage_adapter,
) -> zimage_result {
    guard(|| {
        let handle = unsafe { args::reference(pipeline, "pipeline") }?;
        let _current = handle.enter();
        let load = || -> Result<(), Failure> {
            let path = unsafe { args::string(path, "path") }?;
            let out = args::output(out_adapter, "out_adapter")?;
            let adapter = Arc::new(LoraAdapter::load(path)?);
            handle.pipeline.check_lora(&adapter)?;
            log(handle.logger(), zimage_log_level::Info, || {
                format!("read LoRA adapter {path} (sha256 {})", adapter.sha256())
            });
            unsafe { out.write(Box::into_raw(Box::new(zimage_adapter { adapter }))) };
            Ok(())
        };
        handle.logged(load())
    })
}

/// Frees an adapter. Pipelines it is set on keep applying it (they hold their own reference).
/// NULL is fine; freeing twice is not.
#[no_mangle]
pub unsafe extern "C" fn zimage_adapter_free(adapter: *mut zimage_adapter) {
    guard_value((), || {
        if !adapter.is_null() {
            drop(unsafe { Box::from_raw(adapter) });
        }
    })
}

/// Sets the adapters that `pipeline`'s later generations (and edits, `zimage_edit()`) apply,
/// merged into the transformer's weights with their scales (`W + Σ scale · B·A`); `count` 0
/// removes them all (`settings` may then be NULL) and gives back the base model exactly. Only
/// the transformer's session is rebuilt, with an editing package's Omni transformer (text
/// encoder and VAE stay loaded). The array is copied and each adapter kept alive
/// by the pipeline, so the caller may free both after the call.
///
/// All or nothing: a set that does not fit (an adapter for another model, a non-finite scale)
/// is refused before anything changes, and the previous set stays active. A generation already
/// running finishes with the set it started with. Must not race with `zimage_pipeline_free()`.
#[no_mangle]
pub unsafe extern "C" fn zimage_pipeline_set_adapters(
    pipeline: *const zimage_pipeline,
    settings: *const zimage_adapter_setting,
    count: usize,
) -> zimage_result {
    guard(|| {
        let handle = unsafe { args::reference(pipeline, "pipeline") }?;
        let _current = handle.enter();
        let set = || -> Result<(), Failure> {
            let loras = unsafe { lora_settings(settings, count) }?;
            handle.pipeline.set_loras(&loras)?;
            log(handle.logger(), zimage_log_level::Info, || format!("{} LoRA adapter(s) active", loras.len()));
            Ok(())
        };
        handle.logged(set())
    })
}

/// Copies the caller's array into SDK settings, checking every element.
unsafe fn lora_settings(settings: *const zimage_adapter_setting, count: usize) -> Result<Vec<LoraSetting>, Failure> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if settings.is_null() {
        return Err(Failure::null("settings (with count > 0)"));
    }
    if count > MAX_ADAPTERS {
        return Err(Failure::invalid(format!("count is {count}; at most {MAX_ADAPTERS} adapters can be set at once")));
    }
    let settings = unsafe { std::slice::from_raw_parts(settings, count) };
    settings
        .iter()
        .enumerate()
        .map(|(i, setting)| {
            let adapter = unsafe { args::reference(setting.adapter, &format!("settings[{i}].adapter")) }?;
            if !setting.scale.is_finite() {
                return Err(Failure::invalid(format!("settings[{i}].scale is {}; it must be finite", setting.scale)));
            }
            Ok(LoraSetting::new(Arc::clone(&adapter.adapter), setting.scale))
        })
        .collect()
}

/// More adapters than anyone merges at once: a bound on what a bad `count` can make us read.
const MAX_ADAPTERS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_before_use() {
        let code = |r: Result<Vec<LoraSetting>, Failure>| r.err().map_or(zimage_result::Ok, |f| f.code);
        assert_eq!(unsafe { lora_settings(std::ptr::null(), 0) }.unwrap().len(), 0);
        assert_eq!(code(unsafe { lora_settings(std::ptr::null(), 1) }), zimage_result::NullArgument);
        let null_adapter = [zimage_adapter_setting { adapter: std::ptr::null(), scale: 1.0 }];
        assert_eq!(code(unsafe { lora_settings(null_adapter.as_ptr(), 1) }), zimage_result::NullArgument);
        assert_eq!(
            code(unsafe { lora_settings(null_adapter.as_ptr(), MAX_ADAPTERS + 1) }),
            zimage_result::InvalidArgument
        );
    }
}
