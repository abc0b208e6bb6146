//! The encode-once prompt: a handle loaded against a pipeline (`zimage_encode_prompt()`), owned
//! by the caller, usable by any number of generations as their prompt or negative prompt.

use std::ffi::c_char;

use crate::args;
use crate::error::{zimage_result, Failure};
use crate::panic::{guard, guard_value};
use crate::pipeline::zimage_pipeline;

/// An encoded prompt (the text encoder's output), made by `zimage_encode_prompt()` and freed
/// with `zimage_prompt_embedding_free()`. Immutable: one embedding can be used by several
/// generations on several threads at once, and with any pipeline of the same model. It holds
/// its own data: it stays valid after the pipeline that made it is freed.
pub struct zimage_prompt_embedding {
    pub(crate) embedding: sdk::PromptEmbedding,
}

/// Encodes `prompt` (UTF-8, at most 1 MiB) once, for use as `prompt_embedding` or
/// `negative_prompt_embedding` in any number of generations. `max_sequence_length`: tokens kept, chat template included;
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
        let _current = handle.enter();
        let encode = || -> Result<(), Failure> {
            let prompt = unsafe { args::string(prompt, "prompt") }?;
            let out = args::output(out_embedding, "out_embedding")?;
            let max = (max_sequence_length > 0).then_some(max_sequence_length as usize);
            let embedding = handle.pipeline.encode_prompt(prompt, max)?;
            unsafe { out.write(Box::into_raw(Box::new(zimage_prompt_embedding { embedding }))) };
            Ok(())
        };
        handle.logged(encode())
    })
}

/// The number of tokens kept (chat template included); 0 for NULL.
#[no_mangle]
pub unsafe extern "C" fn zimage_prompt_embedding_token_count(embedding: *const zimage_prompt_embedding) -> usize {
    guard_value(0, || unsafe { embedding.as_ref() }.map_or(0, |e| e.embedding.tokens.ids.len()))
}

/// True when the prompt was longer than `max_sequence_length` and its end was dropped; false
/// for NULL.
#[no_mangle]
pub unsafe extern "C" fn zimage_prompt_embedding_truncated(embedding: *const zimage_prompt_embedding) -> bool {
    guard_value(false, || unsafe { embedding.as_ref() }.is_some_and(|e| e.embedding.tokens.truncated()))
}

/// Frees an embedding. Generations that used it are unaffected (they hold their own copy).
/// NULL is fine; freeing twice is not.
#[no_mangle]
pub unsafe extern "C" fn zimage_prompt_embedding_free(embedding: *mut zimage_prompt_embedding) {
    guard_value((), || {
        if !embedding.is_null() {
            drop(unsafe { Box::from_raw(embedding) });
        }
    })
}
