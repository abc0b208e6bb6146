//! The encode-once prompt: `zimage_encode_prompt()` (in [`crate::pipeline`]) returns one of
//! these, and any number of generations can use it as their prompt or negative prompt.

use crate::panic::guard_value;

/// An encoded prompt (the text encoder's output), made by `zimage_encode_prompt()` and freed
/// with `zimage_prompt_embedding_free()`. Immutable: one embedding can be used by several
/// generations on several threads at once, and with any pipeline of the same model.
pub struct zimage_prompt_embedding {
    pub(crate) embedding: sdk::PromptEmbedding,
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
