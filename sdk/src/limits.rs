//! Caps that keep a request within what the graphs and memory can hold. One place, so the
//! SDK's checks, the C ABI's documentation and the front ends' argument parsers agree.

/// Most denoising steps in one generation.
pub const MAX_STEPS: u32 = 1000;
/// Most images in one request (they share one batch through the transformer).
pub const MAX_IMAGES_PER_REQUEST: u32 = 64;
