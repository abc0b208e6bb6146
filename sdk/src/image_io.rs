//! Pixels in and out: decoder output → RGB8 exactly as diffusers post-processes it, PNG
//! writing with the generation parameters in text chunks, and reading input images.

use std::io::BufWriter;
use std::path::Path;

use ndarray::{Array4, ArrayView3};

use crate::error::{Error, Result};

/// An 8-bit RGB image, rows top to bottom, 3 bytes per pixel, no padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// An 8-bit single-channel image (masks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrayImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Decoder output `[3, H, W]` → RGB8: `clamp(x / 2 + 0.5, 0, 1) * 255`, rounded half to even
/// like numpy (Rust's `round` would round half away from zero and differ on ties).
pub fn to_rgb8(image: ArrayView3<f32>) -> RgbImage {
    let (h, w) = (image.shape()[1], image.shape()[2]);
    let mut pixels = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = (image[[c, y, x]] / 2.0 + 0.5).clamp(0.0, 1.0);
                pixels.push((v * 255.0).round_ties_even() as u8);
            }
        }
    }
    RgbImage { width: w as u32, height: h as u32, pixels }
}

/// RGB8 → `[1, 3, H, W]` in [-1, 1], as diffusers' image processor normalises.
pub fn to_model_input(image: &RgbImage) -> Array4<f32> {
    let (h, w) = (image.height as usize, image.width as usize);
    let mut out = Array4::<f32>::zeros((1, 3, h, w));
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = image.pixels[(y * w + x) * 3 + c] as f32 / 255.0;
                out[[0, c, y, x]] = 2.0 * v - 1.0;
            }
        }
    }
    out
}

/// Writes a PNG with `tEXt` chunks (e.g. the generation parameters).
pub fn write_png(path: &Path, image: &RgbImage, text: &[(&str, String)]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        // tEXt is Latin-1; iTXt carries UTF-8 (prompts in Chinese, emoji).
        encoder
            .add_itxt_chunk(key.to_string(), value.clone())
            .map_err(|e| Error::Image(format!("PNG text chunk {key}: {e}")))?;
    }
    let mut writer = encoder.write_header().map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
    writer
        .write_image_data(&image.pixels)
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
    writer.finish().map_err(|e| Error::Image(format!("{}: {e}", path.display())))
}
