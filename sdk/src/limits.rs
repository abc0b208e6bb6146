//! Caps that keep a request within what the graphs and memory can hold. One place, so the
//! SDK's checks, the C ABI's documentation and the front ends' argument parsers agree.
//!
//! Every cap is checked before the allocation or read that depends on it: a request is
//! validated before its images are resized or its latents drawn, a file's size before it is
//! read (and the read itself stops at the cap, for devices and pipes whose size is unknown).

/// Most denoising steps in one generation.
pub const MAX_STEPS: u32 = 1000;
/// Most images in one request (they share one batch through the transformer).
pub const MAX_IMAGES_PER_REQUEST: u32 = 64;
/// Most output pixels of one request, its images together (`count x width x height`): 64
/// images of 1024 x 1024, or one of 8192 x 8192. Each side and the count have their own caps,
/// but their product is what the buffers grow with: 64 images of 8192 x 8192 (the largest sides
/// the transformer's position table allows) asked 4 GiB for the latents alone and 48 GiB for
/// the decoded pictures, and the process aborted on the first allocation that failed.
pub const MAX_REQUEST_PIXELS: u64 = 1 << 26;

/// Refuses a request whose images together have more than [`MAX_REQUEST_PIXELS`] pixels.
pub(crate) fn check_request_pixels(count: u32, width: u32, height: u32) -> Result<(), String> {
    let pixels = u64::from(count) * u64::from(width) * u64::from(height);
    if pixels > MAX_REQUEST_PIXELS {
        return Err(format!(
            "{count} images of {width}x{height} are {pixels} pixels; one request makes at most {MAX_REQUEST_PIXELS} \
             (64 x 1024 x 1024): ask for fewer images per request"
        ));
    }
    Ok(())
}

/// Largest classifier-free guidance scale. The guided prediction is `pos + g * (pos - neg)`:
/// its size grows linearly with `g`, and far beyond the 0..20 that Z-Image and diffusers use
/// the latents leave the range the VAE was trained on (the picture saturates to black or
/// white, fp16 activations overflow). 100 leaves room for experiments and keeps every
/// recorded golden (at most 4) valid.
pub const MAX_GUIDANCE_SCALE: f32 = 100.0;
/// Largest `cfg_normalization` factor (the guided prediction's norm is capped at this many
/// times the conditional one's; 0 = off). Useful values are near 1 (the goldens use 1.2); a
/// cap 100 times the conditional norm no longer limits anything a sane guidance scale
/// produces, so larger values only hide typos.
pub const MAX_CFG_NORMALIZATION: f32 = 100.0;
/// The largest ControlNet conditioning scale in magnitude (diffusers' default is 0.75; a scale
/// of 10^6 drew a picture without complaint, 3e38 overflowed into non-finite latents).
pub const MAX_CONTROL_SCALE: f32 = 100.0;

/// Longest text given to the tokenizer, in UTF-8 bytes: a prompt or negative prompt, an edit
/// prompt, the prompt enhancer's input with its system prompt. The text encoder reads only the
/// first `max_sequence_length` tokens (512 by default, at most the package's caption limit:
/// a few kilobytes of text), but the whole text is tokenized first, at 0.3-0.5 s per MiB on one
/// core (8 MiB took 4-5 s and 0.7-1 GB of memory), so megabytes of text from a server request
/// or an application's buffer are refused instead. A longer text is refused, never
/// cut: every accepted prompt gives the tokens diffusers gives.
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

/// Input pictures (init images, masks) with more pixels than this on a side are refused from
/// their header, before decoding.
pub const MAX_INPUT_SIDE: u32 = 16384;
/// Most bytes a decoded input picture may take (its pixels and the decoder's buffers).
pub const MAX_DECODE_BYTES: u64 = 1 << 30;
/// Largest input picture file read (PNG, JPEG, WebP). A 16384 x 16384 photograph is well under
/// this; the cap also bounds reads from devices and pipes (`/dev/zero`), whose size is unknown
/// until read.
pub const MAX_INPUT_FILE_BYTES: u64 = 256 << 20;
/// Largest LoRA file read (it is read whole). Rank-128 LoRAs of the 6B transformer in float32
/// are about 1 GiB; 8 GiB leaves room for full-rank ones and refuses what cannot be a LoRA.
pub const MAX_LORA_FILE_BYTES: u64 = 8 << 30;
/// Largest safetensors header (the JSON before the tensors), as the safetensors crate's own cap.
pub const MAX_SAFETENSORS_HEADER_BYTES: u64 = 100_000_000;
/// Largest `manifest.json` read.
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// Largest latents file (`.npy`) read.
pub const MAX_LATENTS_FILE_BYTES: u64 = 1 << 30;
/// The most values the SigLIP processor makes for one reference picture
/// (`max_num_patches x patch_size^2 x 3`; SigLIP2's is 256 x 768): 64 MiB of float32.
pub const MAX_SIGLIP_VALUES: u64 = 1 << 24;

/// The guidance settings' bounds, for generations and edits alike and for the settings a
/// package recommends (it cannot recommend what it would refuse): the message says which
/// value is out of bounds.
pub(crate) fn check_guidance(scale: f32, normalization: f32, truncation: f32) -> Result<(), String> {
    for (name, v) in [("guidance_scale", scale), ("cfg_normalization", normalization), ("cfg_truncation", truncation)] {
        if !v.is_finite() {
            return Err(format!("{name} must be finite (got {v})"));
        }
    }
    // Beyond these the latents leave the range the VAE decodes and the picture saturates, or
    // the setting cannot have an effect (the constants above say why).
    if !(0.0..=MAX_GUIDANCE_SCALE).contains(&scale) {
        return Err(format!("guidance_scale must be within [0, {MAX_GUIDANCE_SCALE}] (got {scale:?})"));
    }
    if !(0.0..=MAX_CFG_NORMALIZATION).contains(&normalization) {
        return Err(format!(
            "cfg_normalization must be within [0, {MAX_CFG_NORMALIZATION}] (0 = off; got {normalization:?})"
        ));
    }
    // Compared with the normalised time in [0, 1]: values of 1 or more never stop guidance
    // (diffusers' rule); a negative one would switch guidance off at every step.
    if truncation < 0.0 {
        return Err(format!(
            "cfg_truncation must not be negative (1 or more = never stop guidance; got {truncation:?})"
        ));
    }
    Ok(())
}

/// Refuses a text over [`MAX_PROMPT_BYTES`] before it is tokenized; `what` names it.
pub(crate) fn check_prompt_bytes(what: &str, text: &str) -> Result<(), String> {
    check_text_bytes(what, text, "the text encoder reads only its first max_sequence_length tokens")
}

/// As [`check_prompt_bytes`], for text the prompt enhancer reads (it holds at most
/// max_context_tokens tokens).
pub(crate) fn check_enhancer_bytes(what: &str, text: &str) -> Result<(), String> {
    check_text_bytes(what, text, "the enhancer holds at most max_context_tokens tokens")
}

fn check_text_bytes(what: &str, text: &str, why: &str) -> Result<(), String> {
    if text.len() > MAX_PROMPT_BYTES {
        return Err(format!(
            "{what} is {} bytes, more than the limit of {MAX_PROMPT_BYTES} (1 MiB; {why})",
            text.len()
        ));
    }
    Ok(())
}
