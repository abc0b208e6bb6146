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
    png_into(BufWriter::new(file), image, text, &path.display().to_string())
}

/// The bytes [`write_png`] writes to a file, in memory (a server's response).
pub fn encode_png(image: &RgbImage, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    png_into(&mut bytes, image, text, "PNG")?;
    Ok(bytes)
}

/// The one PNG encoding (`what` names the destination in error messages).
fn png_into<W: std::io::Write>(out: W, image: &RgbImage, text: &[(&str, String)], what: &str) -> Result<()> {
    let mut encoder = png::Encoder::new(out, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        // tEXt is Latin-1; iTXt carries UTF-8 (prompts in Chinese, emoji).
        encoder
            .add_itxt_chunk(key.to_string(), value.clone())
            .map_err(|e| Error::Image(format!("PNG text chunk {key}: {e}")))?;
    }
    let mut writer = encoder.write_header().map_err(|e| Error::Image(format!("{what}: {e}")))?;
    writer.write_image_data(&image.pixels).map_err(|e| Error::Image(format!("{what}: {e}")))?;
    writer.finish().map_err(|e| Error::Image(format!("{what}: {e}")))
}

/// Input images larger than this many pixels on a side are refused before decoding.
pub const MAX_INPUT_SIDE: u32 = 16384;
const MAX_DECODE_BYTES: u64 = 1 << 30;

/// Reads a PNG, JPEG or WebP file as RGB8. An alpha channel is dropped, as PIL's
/// `convert("RGB")` does (no compositing).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes).map_err(|e| Error::Image(format!("{}: {}", path.display(), strip(e))))
}

/// Decodes PNG, JPEG or WebP bytes as RGB8 (alpha dropped).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    let img = decode(bytes)?.to_rgb8();
    Ok(RgbImage { width: img.width(), height: img.height(), pixels: img.into_raw() })
}

/// Reads a mask file as 8-bit gray (colour converted with ITU-R 601 weights like PIL's
/// `convert("L")`).
pub fn load_gray(path: &Path) -> Result<GrayImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_gray(&bytes).map_err(|e| Error::Image(format!("{}: {}", path.display(), strip(e))))
}

/// Decodes PNG, JPEG or WebP bytes as 8-bit gray.
pub fn decode_gray(bytes: &[u8]) -> Result<GrayImage> {
    let img = decode(bytes)?;
    let (width, height) = (img.width(), img.height());
    let pixels = match img {
        image::DynamicImage::ImageLuma8(g) => g.into_raw(),
        other => other.to_rgb8().pixels().map(|p| pil_luma(p.0)).collect(),
    };
    Ok(GrayImage { width, height, pixels })
}

/// PIL's RGB → L conversion: `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`.
fn pil_luma([r, g, b]: [u8; 3]) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

fn decode(bytes: &[u8]) -> Result<image::DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::Image("the image is empty (0 bytes)".into()));
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image(e.to_string()))?;
    if reader.format().is_none() {
        return Err(Error::Image("not a PNG, JPEG or WebP image".into()));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => Error::Image(format!(
            "the image is too large (more than {MAX_INPUT_SIDE} pixels on a side or 1 GiB decoded)"
        )),
        other => Error::Image(format!("cannot decode the image: {other}")),
    })
}

fn strip(e: Error) -> String {
    match e {
        Error::Image(m) => m,
        other => other.to_string(),
    }
}

/// Resizes to `width` x `height` with a Lanczos3 filter (the filter diffusers' image
/// processor uses through PIL; results differ from PIL's by rounding, so feed images that
/// are already at the target size when exact parity matters).
pub fn resize_rgb(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::invalid("resize target must be at least 1x1"));
    }
    if image.width == width && image.height == height {
        return Ok(image.clone());
    }
    let buf = image::RgbImage::from_raw(image.width, image.height, image.pixels.clone())
        .ok_or_else(|| Error::Image("pixel buffer does not match width x height x 3".into()))?;
    let out = image::imageops::resize(&buf, width, height, image::imageops::FilterType::Lanczos3);
    Ok(RgbImage { width, height, pixels: out.into_raw() })
}

impl RgbImage {
    /// Checks that the buffer holds exactly width x height x 3 bytes.
    pub fn check(&self) -> Result<()> {
        if self.width == 0 || self.height == 0 || self.pixels.len() != self.width as usize * self.height as usize * 3 {
            return Err(Error::Image(format!(
                "RGB image of {}x{} needs {} bytes, has {}",
                self.width,
                self.height,
                self.width as usize * self.height as usize * 3,
                self.pixels.len()
            )));
        }
        Ok(())
    }
}

impl GrayImage {
    /// Checks that the buffer holds exactly width x height bytes.
    pub fn check(&self) -> Result<()> {
        if self.width == 0 || self.height == 0 || self.pixels.len() != self.width as usize * self.height as usize {
            return Err(Error::Image(format!(
                "gray image of {}x{} needs {} bytes, has {}",
                self.width,
                self.height,
                self.width as usize * self.height as usize,
                self.pixels.len()
            )));
        }
        Ok(())
    }
}

/// Writes `[B, C, h, w]` latents as a float32 `.npy` file.
pub fn write_npy(path: &Path, latents: &Array4<f32>) -> Result<()> {
    ndarray_npy::write_npy(path, latents).map_err(|e| match e {
        ndarray_npy::WriteNpyError::Io(io) => Error::io(path, io),
        other => Error::Image(format!("{}: {other}", path.display())),
    })
}

/// Reads `[B, C, h, w]` float32 latents from a `.npy` file.
pub fn read_npy(path: &Path) -> Result<Array4<f32>> {
    ndarray_npy::read_npy(path).map_err(|e| Error::invalid(format!("{}: cannot read latents: {e}", path.display())))
}
