//! Pixels in and out: decoder output → RGB8 exactly as diffusers post-processes it, PNG
//! writing with the generation parameters in text chunks, and reading input images.
//!
//! Files in and out are handled as untrusted and fallible: every read is bounded
//! ([`read_file_capped`]) and decoded within pixel limits, and every output is written to a
//! temporary file beside its destination and renamed over it when complete ([`StagedFile`]).

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use image::metadata::Orientation;
use image::ImageDecoder;
use ndarray::{Array4, ArrayView3};

use crate::error::{Error, Result};
use crate::limits::{MAX_DECODE_BYTES, MAX_INPUT_FILE_BYTES, MAX_LATENTS_FILE_BYTES};
use crate::pil_resize::{self, Filter};

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
pub fn to_rgb8(image: ArrayView3<f32>) -> Result<RgbImage> {
    let (channels, h, w) = image.dim();
    if channels < 3 || u32::try_from(h).is_err() || u32::try_from(w).is_err() {
        return Err(Error::invalid(format!("to_rgb8 needs [3, H, W] values, got {:?}", image.shape())));
    }
    let mut pixels = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let v = (image[[c, y, x]] / 2.0 + 0.5).clamp(0.0, 1.0);
                pixels.push((v * 255.0).round_ties_even() as u8);
            }
        }
    }
    Ok(RgbImage { width: w as u32, height: h as u32, pixels })
}

/// True when every value of a decoder output `[3, H, W]` is clipped by [`to_rgb8`] (at or
/// beyond -1 or 1): the picture is all 0s and 255s. An empty output counts as not clipped.
pub fn all_clipped(image: ArrayView3<f32>) -> bool {
    !image.is_empty() && image.iter().all(|&v| !(-1.0 < v && v < 1.0))
}

/// RGB8 → `[1, 3, H, W]` in [-1, 1], as diffusers' image processor normalises. Crate-private:
/// it trusts the buffer's size, which its callers have checked ([`RgbImage::check`]).
pub(crate) fn to_model_input(image: &RgbImage) -> Array4<f32> {
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

/// Writes a PNG with `iTXt` chunks (e.g. the generation parameters), atomically: see
/// [`StagedFile`]. A failed write is an I/O error and leaves nothing at `path`.
pub fn write_png(path: &Path, image: &RgbImage, text: &[(&str, String)]) -> Result<()> {
    write_image(path, image, ImageFormat::Png, text)
}

/// Writes `image` in `format` atomically, as [`write_png`].
pub fn write_image(path: &Path, image: &RgbImage, format: ImageFormat, text: &[(&str, String)]) -> Result<()> {
    let mut staged = StagedFile::create(path)?;
    staged.write_image(image, format, text)?;
    staged.commit()
}

/// The bytes [`write_png`] writes to a file, in memory (a server's response).
pub fn encode_png(image: &RgbImage, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    png_into(&mut bytes, image, text, Path::new("PNG"))?;
    Ok(bytes)
}

/// An output picture format. PNG is lossless and carries the generation parameters in text
/// chunks; JPEG is lossy (at `quality`, 1..=100) and WebP lossless, neither with parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg { quality: u8 },
    Webp,
}

impl ImageFormat {
    /// The JPEG quality used when none is given.
    pub const DEFAULT_JPEG_QUALITY: u8 = 95;

    /// The format a file name asks for: `.png` or no extension PNG, `.jpg` / `.jpeg` JPEG at
    /// `jpeg_quality`, `.webp` WebP (any case); another extension is `None`.
    pub fn for_path(path: &Path, jpeg_quality: u8) -> Option<ImageFormat> {
        let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            None | Some("png") => Some(ImageFormat::Png),
            Some("jpg" | "jpeg") => Some(ImageFormat::Jpeg { quality: jpeg_quality }),
            Some("webp") => Some(ImageFormat::Webp),
            Some(_) => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg { .. } => "jpeg",
            ImageFormat::Webp => "webp",
        }
    }
}

/// Encodes `image` in `format`; `text` goes into a PNG's `iTXt` chunks (the other formats
/// carry none). A JPEG quality outside 1..=100 is an invalid request.
pub fn encode_image(image: &RgbImage, format: ImageFormat, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image_into(&mut bytes, image, format, text, Path::new(format.name()))?;
    Ok(bytes)
}

/// The one encoding of each format into `out`; `dest` names the destination in errors.
fn image_into<W: std::io::Write>(
    out: W,
    image: &RgbImage,
    format: ImageFormat,
    text: &[(&str, String)],
    dest: &Path,
) -> Result<()> {
    use image::ImageEncoder;
    let other = |e: image::ImageError| match e {
        image::ImageError::IoError(io) => Error::io(dest, io),
        other => Error::Image(format!("{}: {other}", dest.display())),
    };
    match format {
        ImageFormat::Png => png_into(out, image, text, dest),
        ImageFormat::Jpeg { quality } => {
            if !(1..=100).contains(&quality) {
                return Err(Error::invalid(format!("JPEG quality must be 1..=100 (got {quality})")));
            }
            image.check()?;
            image::codecs::jpeg::JpegEncoder::new_with_quality(out, quality)
                .write_image(&image.pixels, image.width, image.height, image::ExtendedColorType::Rgb8)
                .map_err(other)
        }
        ImageFormat::Webp => {
            image.check()?;
            image::codecs::webp::WebPEncoder::new_lossless(out)
                .write_image(&image.pixels, image.width, image.height, image::ExtendedColorType::Rgb8)
                .map_err(other)
        }
    }
}

/// The one PNG encoding: RGB8 with `iTXt` chunks. `dest` names the destination in errors; a
/// failed write is an I/O error, anything else an image error.
fn png_into<W: std::io::Write>(out: W, image: &RgbImage, text: &[(&str, String)], dest: &Path) -> Result<()> {
    image.check()?;
    let encoding = |e: png::EncodingError| match e {
        png::EncodingError::IoError(io) => Error::io(dest, io),
        other => Error::Image(format!("{}: {other}", dest.display())),
    };
    let mut encoder = png::Encoder::new(out, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        // tEXt is Latin-1; iTXt carries UTF-8 (prompts in Chinese, emoji).
        encoder
            .add_itxt_chunk(key.to_string(), value.clone())
            .map_err(|e| Error::Image(format!("PNG text chunk {key}: {e}")))?;
    }
    let mut writer = encoder.write_header().map_err(encoding)?;
    writer.write_image_data(&image.pixels).map_err(encoding)?;
    writer.finish().map_err(encoding)
}

/// Writes `[B, C, h, w]` latents as a float32 `.npy` file, atomically (see [`StagedFile`]).
pub fn write_npy(path: &Path, latents: &Array4<f32>) -> Result<()> {
    let mut staged = StagedFile::create(path)?;
    staged.write_npy(latents)?;
    staged.commit()
}

/// Writes `bytes` (a JSON summary, ...) to `path`, atomically (see [`StagedFile`]).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut staged = StagedFile::create(path)?;
    staged.write_bytes(bytes)?;
    staged.commit()
}

/// Checks, before any work is done, that an output can be written at `path`: its folder
/// exists, `path` is not a folder, a device or anything but a regular file, is not
/// read-only, and a file can be created beside it (a probe file is made and removed).
pub fn check_writable(path: &Path) -> Result<()> {
    let dest = destination(path)?;
    drop(StagedFile::create(&dest)?);
    Ok(())
}

/// An output file being written: a temporary file in the destination's folder (so that the
/// final rename stays on one file system), renamed over the destination by
/// [`commit`](StagedFile::commit) once complete and flushed to disk. Dropped before that (an
/// error, a cancelled run), it removes the temporary file: readers of the destination never
/// see half a file, and a failed or interrupted write leaves nothing behind.
pub struct StagedFile {
    dest: PathBuf,
    temp: PathBuf,
    file: Option<std::fs::File>,
}

impl StagedFile {
    /// Creates the (empty) temporary file for `dest`, after the checks of [`check_writable`].
    pub fn create(dest: &Path) -> Result<StagedFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dest = destination(dest)?;
        let name = dest.file_name().expect("checked by destination()").to_string_lossy().into_owned();
        // At most 128 bytes of the name, so that a legal name of up to 255 bytes (the usual
        // limit) still has a legal temporary name; the process id and counter keep it unique.
        let mut keep = name.len().min(128);
        while !name.is_char_boundary(keep) {
            keep -= 1;
        }
        let temp = dest.with_file_name(format!(
            ".{}.{}-{}.zimage-tmp",
            &name[..keep],
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| Error::io(parent_of(&dest), e))?;
        Ok(StagedFile { dest, temp, file: Some(file) })
    }

    /// Where the file goes once committed.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// The temporary file being written (removed on drop unless committed).
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    fn writer(&mut self) -> BufWriter<&std::fs::File> {
        BufWriter::new(self.file.as_ref().expect("open until commit"))
    }

    /// Encodes `image` as PNG with `iTXt` chunks into the temporary file.
    pub fn write_png(&mut self, image: &RgbImage, text: &[(&str, String)]) -> Result<()> {
        self.write_image(image, ImageFormat::Png, text)
    }

    /// Encodes `image` in `format` into the temporary file (`text` in a PNG's chunks).
    pub fn write_image(&mut self, image: &RgbImage, format: ImageFormat, text: &[(&str, String)]) -> Result<()> {
        let dest = self.dest.clone();
        let mut out = self.writer();
        image_into(&mut out, image, format, text, &dest)?;
        out.flush().map_err(|e| Error::io(&dest, e))
    }

    /// Writes `latents` as a float32 `.npy` array into the temporary file.
    pub fn write_npy(&mut self, latents: &Array4<f32>) -> Result<()> {
        use ndarray_npy::WriteNpyExt;
        let dest = self.dest.clone();
        let mut out = self.writer();
        latents.write_npy(&mut out).map_err(|e| match e {
            ndarray_npy::WriteNpyError::Io(io) => Error::io(&dest, io),
            other => Error::Image(format!("{}: {other}", dest.display())),
        })?;
        out.flush().map_err(|e| Error::io(&dest, e))
    }

    /// Writes raw bytes into the temporary file.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let dest = self.dest.clone();
        let mut out = self.writer();
        out.write_all(bytes).and_then(|()| out.flush()).map_err(|e| Error::io(&dest, e))
    }

    /// Flushes the temporary file to disk and renames it over the destination.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("open until commit");
        file.sync_all().map_err(|e| Error::io(&self.dest, e))?;
        drop(file);
        std::fs::rename(&self.temp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        // Renamed: nothing left to remove on drop.
        self.temp = PathBuf::new();
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// The path an output is written to: `path` itself, or the file an existing symbolic link
/// points to. Refuses what cannot be replaced by a regular file.
fn destination(path: &Path) -> Result<PathBuf> {
    let not_writable =
        |message: &str| Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, message.to_string()));
    if path.file_name().is_none() {
        return Err(not_writable("not a file name"));
    }
    let dest = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::canonicalize(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "is a symbolic link to nothing (its target or a folder on the way does not exist)",
                ),
            ),
            _ => Error::io(path, e),
        })?,
        Ok(_) => path.to_path_buf(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_path_buf(),
        Err(e) => return Err(Error::io(path, e)),
    };
    match std::fs::metadata(&dest) {
        Ok(meta) if meta.is_dir() => return Err(not_writable("is a folder, not a file")),
        Ok(meta) if !meta.is_file() => return Err(not_writable("is not a regular file (a device, pipe or socket)")),
        Ok(meta) if meta.permissions().readonly() => {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::PermissionDenied, "the file is read-only"),
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(path, e)),
    }
    let parent = parent_of(&dest);
    match std::fs::metadata(&parent) {
        Ok(meta) if meta.is_dir() => Ok(dest),
        Ok(_) => Err(Error::io(
            &parent,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "the output folder is not a folder"),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::io(&parent, std::io::Error::new(std::io::ErrorKind::NotFound, "output folder does not exist")))
        }
        Err(e) => Err(Error::io(&parent, e)),
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Input images larger than this many pixels on a side are refused before decoding.
pub use crate::limits::MAX_INPUT_SIDE;

/// Reads a whole file, refusing one larger than `max_bytes`: a regular file's size is checked
/// before reading, and the read stops after `max_bytes + 1` bytes, so devices, pipes and files
/// that grow meanwhile (`/dev/zero`) are bounded too. Too large is an I/O error of kind
/// [`std::io::ErrorKind::FileTooLarge`].
pub fn read_file_capped(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let too_large = || {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!("larger than the limit of {}", human_bytes(max_bytes)),
            ),
        )
    };
    if meta.is_dir() {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a folder, not a file")));
    }
    if meta.is_file() && meta.len() > max_bytes {
        return Err(too_large());
    }
    let expected = if meta.is_file() { meta.len() } else { 0 };
    let mut bytes = Vec::with_capacity(expected.min(max_bytes) as usize);
    file.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large());
    }
    Ok(bytes)
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// Reads an input picture file (at most [`MAX_INPUT_FILE_BYTES`]): a file too large is an
/// image error, other failures I/O errors.
fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    read_file_capped(path, MAX_INPUT_FILE_BYTES).map_err(|e| match e {
        Error::Io { path, source } if source.kind() == std::io::ErrorKind::FileTooLarge => {
            Error::Image(format!("{}: the file is {source}", path.display()))
        }
        other => other,
    })
}

/// Reads a PNG, JPEG or WebP file as RGB8. An alpha channel is dropped, as PIL's
/// `convert("RGB")` does (no compositing). The file is read with [`read_file_capped`]
/// ([`MAX_INPUT_FILE_BYTES`]) and decoded within [`MAX_INPUT_SIDE`] and [`MAX_DECODE_BYTES`].
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = read_image_file(path)?;
    decode_rgb(&bytes).map_err(|e| Error::Image(format!("{}: {}", path.display(), strip(e))))
}

/// Reads the whole file of an input picture, bounded like [`load_rgb`], without decoding it
/// (see [`image_size`], [`decode_rgb`]).
pub fn read_image_bytes(path: &Path) -> Result<Vec<u8>> {
    read_image_file(path)
}

/// Width and height of an encoded picture as it will be decoded (upright: see [`decode_rgb`]),
/// from its header, without decoding its pixels.
pub fn image_size(bytes: &[u8]) -> Result<(u32, u32)> {
    let ((width, height), orientation) = header(bytes)?;
    Ok(if swaps_sides(orientation) { (height, width) } else { (width, height) })
}

/// Decodes PNG, JPEG or WebP bytes as RGB8 (alpha dropped), upright: an EXIF orientation (a
/// phone photograph's) is applied, as diffusers' `load_image` applies it
/// (`PIL.ImageOps.exif_transpose`) before `convert("RGB")`.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    let (decoded, orientation) = decode(bytes)?;
    let mut rgb = image::DynamicImage::ImageRgb8(rgb8_in_place(decoded));
    rgb.apply_orientation(orientation);
    let rgb = rgb.into_rgb8();
    Ok(RgbImage { width: rgb.width(), height: rgb.height(), pixels: rgb.into_raw() })
}

/// The picture as RGB8 (alpha dropped, as PIL's `convert("RGB")` drops it) without a second
/// picture-sized buffer where it can: an RGB8 picture is taken as it is, an RGBA8 one is
/// compacted in its own buffer (the image crate's conversion would add 3/4 of the decode cap,
/// 768 MiB for a 16384 x 16384 RGBA picture, to the 1 GiB it already holds).
fn rgb8_in_place(picture: image::DynamicImage) -> image::RgbImage {
    match picture {
        image::DynamicImage::ImageRgba8(rgba) => {
            let (width, height) = rgba.dimensions();
            let mut samples = rgba.into_raw();
            let pixels = samples.len() / 4;
            // Pixel i moves from 4i to 3i: never over a pixel not yet moved.
            for i in 1..pixels {
                samples.copy_within(4 * i..4 * i + 3, 3 * i);
            }
            samples.truncate(pixels * 3);
            samples.shrink_to_fit();
            image::RgbImage::from_raw(width, height, samples).expect("three bytes per pixel")
        }
        other => other.into_rgb8(),
    }
}

/// Reads a mask file as 8-bit gray (colour converted with ITU-R 601 weights like PIL's
/// `convert("L")`), bounded like [`load_rgb`].
pub fn load_gray(path: &Path) -> Result<GrayImage> {
    let bytes = read_image_file(path)?;
    decode_gray(&bytes).map_err(|e| Error::Image(format!("{}: {}", path.display(), strip(e))))
}

/// Reads an inpainting mask for a request of `width` x `height`: 8-bit gray as [`load_gray`]
/// reads it, resized by [`resize_gray`] when it has another size (as diffusers' mask processor
/// brings a mask to the size the image is made at).
pub fn load_mask(path: &Path, width: u32, height: u32) -> Result<GrayImage> {
    resize_gray(&load_gray(path)?, width, height)
}

/// Decodes PNG, JPEG or WebP bytes as 8-bit gray, upright like [`decode_rgb`].
pub fn decode_gray(bytes: &[u8]) -> Result<GrayImage> {
    let (decoded, orientation) = decode(bytes)?;
    // Converted first: a rotation copies the picture, the gray one is the smallest.
    let mut gray = image::DynamicImage::ImageLuma8(luma(decoded));
    gray.apply_orientation(orientation);
    let gray = gray.into_luma8();
    Ok(GrayImage { width: gray.width(), height: gray.height(), pixels: gray.into_raw() })
}

/// Decodes PNG, JPEG or WebP bytes, upright like [`decode_rgb`], in the image crate's form, for
/// a front end that reads more than the colours (the server reads a mask's transparency).
pub fn decode_upright(bytes: &[u8]) -> Result<image::DynamicImage> {
    let (mut decoded, orientation) = decode(bytes)?;
    decoded.apply_orientation(orientation);
    Ok(decoded)
}

/// A picture as 8-bit gray, as [`decode_gray`] converts it (PIL's `convert("L")`).
pub fn to_gray(picture: image::DynamicImage) -> GrayImage {
    let gray = luma(picture);
    GrayImage { width: gray.width(), height: gray.height(), pixels: gray.into_raw() }
}

/// PIL's `convert("L")`: gray pictures as they are, colour ones by [`pil_luma`] (alpha dropped).
fn luma(picture: image::DynamicImage) -> image::GrayImage {
    match picture {
        image::DynamicImage::ImageLuma8(gray) => gray,
        // Colour pictures in 8 bits are read where they are (no RGB copy of a large mask).
        image::DynamicImage::ImageRgb8(rgb) => {
            let (width, height) = rgb.dimensions();
            let pixels = rgb.pixels().map(|p| pil_luma(p.0)).collect();
            image::GrayImage::from_raw(width, height, pixels).expect("one byte per pixel")
        }
        image::DynamicImage::ImageRgba8(rgba) => {
            let (width, height) = rgba.dimensions();
            let pixels = rgba.pixels().map(|p| pil_luma([p.0[0], p.0[1], p.0[2]])).collect();
            image::GrayImage::from_raw(width, height, pixels).expect("one byte per pixel")
        }
        other => {
            let (width, height) = (other.width(), other.height());
            let pixels = other.to_rgb8().pixels().map(|p| pil_luma(p.0)).collect();
            image::GrayImage::from_raw(width, height, pixels).expect("one byte per pixel")
        }
    }
}

/// PIL's RGB → L conversion: `(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`.
fn pil_luma([r, g, b]: [u8; 3]) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// A reader for PNG, JPEG or WebP bytes, with the decoding limits set.
fn reader(bytes: &[u8]) -> Result<image::ImageReader<std::io::Cursor<&[u8]>>> {
    if bytes.is_empty() {
        return Err(Error::Image("the image is empty (0 bytes)".into()));
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image(e.to_string()))?;
    if !matches!(reader.format(), Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP)) {
        return Err(Error::Image("not a PNG, JPEG or WebP image".into()));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    Ok(reader)
}

/// The pixels as stored, with the orientation to apply to them. The header is read twice (once
/// here for the orientation, once by the decode), so that the decode keeps the image crate's own
/// accounting of [`MAX_DECODE_BYTES`].
fn decode(bytes: &[u8]) -> Result<(image::DynamicImage, Orientation)> {
    let (_, orientation) = header(bytes)?;
    let pixels = guard("decoding the image", || {
        let reader = reader(bytes)?;
        if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
            return Err(Error::Image("the JPEG file is truncated (it ends before its end-of-image marker)".into()));
        }
        reader.decode().map_err(decode_error)
    })?;
    Ok((eight_bits_as_pillow_reads(pixels), orientation))
}

/// 16-bit PNGs as Pillow reads them (and so diffusers' `load_image`): colour ones, with or
/// without alpha, and gray ones with alpha keep the high byte of each sample (Pillow's
/// `RGB;16B` and `LA;16B` raw modes), where the image crate would round to the nearest 8-bit
/// value (a level apart on half the samples); gray ones without alpha open as Pillow's `I;16`
/// mode, whose `convert("RGB")` clips at 255 instead of scaling, so most of such a picture is
/// white: that is the picture diffusers computes with, so it is the one used here too.
fn eight_bits_as_pillow_reads(picture: image::DynamicImage) -> image::DynamicImage {
    use image::DynamicImage::{ImageLuma16, ImageLumaA16, ImageRgb16, ImageRgba16};
    fn map<P: image::Pixel<Subpixel = u16>, Q: image::Pixel<Subpixel = u8>>(
        from: &image::ImageBuffer<P, Vec<u16>>,
        sample: impl Fn(u16) -> u8,
    ) -> image::ImageBuffer<Q, Vec<u8>> {
        let samples = from.as_raw().iter().map(|&v| sample(v)).collect();
        image::ImageBuffer::from_raw(from.width(), from.height(), samples).expect("as many samples")
    }
    let high = |v: u16| (v >> 8) as u8;
    match &picture {
        ImageLuma16(gray) => image::DynamicImage::ImageLuma8(map(gray, |v| v.min(255) as u8)),
        ImageLumaA16(gray) => image::DynamicImage::ImageLumaA8(map(gray, high)),
        ImageRgb16(rgb) => image::DynamicImage::ImageRgb8(map(rgb, high)),
        ImageRgba16(rgba) => image::DynamicImage::ImageRgba8(map(rgba, high)),
        _ => picture,
    }
}

/// The stored width and height, and the EXIF orientation (PNG `eXIf`, JPEG APP1, WebP `EXIF`).
/// Metadata that cannot be read counts as no orientation, as Pillow ignores an orientation it
/// cannot use; a header that cannot be read is the image error the decode would give.
fn header(bytes: &[u8]) -> Result<((u32, u32), Orientation)> {
    guard("reading the image header", || {
        let mut decoder = reader(bytes)?.into_decoder().map_err(decode_error)?;
        let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
        Ok((decoder.dimensions(), orientation))
    })
}

/// Whether applying `orientation` exchanges width and height (the EXIF values 5 to 8).
fn swaps_sides(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    )
}

/// Whether a JPEG reaches its end-of-image marker. The decoder fills a scan cut short with
/// grey and reports nothing, where Pillow (the reference) refuses the file as truncated; bytes
/// after the end-of-image marker (a camera's appended video or vendor trailer) are not part of
/// the image, and Pillow ignores them. So the file is walked from its start as a decoder reads
/// it: each marker segment skipped by its length (an EXIF thumbnail, end marker included, lies
/// inside its APP1 segment), each scan's entropy-coded data read to the next marker (0xFF
/// followed by 0x00 or a restart marker belongs to the data), until the end-of-image marker:
/// complete; or the bytes run out first: truncated.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return true; // not a JPEG stream start: the decoder's own error says more
    }
    let mut i = 2;
    loop {
        // The next marker: 0xFF, then any fill 0xFF bytes, then its code. Decoders skip stray
        // bytes before a marker, so the walk does too.
        while i < bytes.len() && bytes[i] != 0xFF {
            i += 1;
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&code) = bytes.get(i) else { return false };
        i += 1;
        match code {
            0xD9 => return true,
            // Standalone markers: start of image, restarts, TEM.
            0xD8 | 0xD0..=0xD7 | 0x01 => {}
            _ => {
                let Some(length) = bytes.get(i..i + 2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize) else {
                    return false;
                };
                i += length;
                if i > bytes.len() {
                    return false;
                }
                if code == 0xDA {
                    // Entropy-coded data up to the next marker that is not a stuffed byte or a
                    // restart.
                    loop {
                        let Some(&byte) = bytes.get(i) else { return false };
                        if byte != 0xFF {
                            i += 1;
                            continue;
                        }
                        match bytes.get(i + 1) {
                            None => return false,
                            Some(0x00 | 0xD0..=0xD7) => i += 2,
                            Some(_) => break, // a marker: the walk reads it
                        }
                    }
                }
            }
        }
    }
}

fn decode_error(e: image::ImageError) -> Error {
    match e {
        image::ImageError::Limits(_) => Error::Image(format!(
            "the image is too large (more than {MAX_INPUT_SIDE} pixels on a side or {} decoded)",
            human_bytes(MAX_DECODE_BYTES)
        )),
        other => Error::Image(format!("cannot decode the image: {other}")),
    }
}

/// Runs a decoder on untrusted bytes: a panic inside it (a decoder bug) becomes an image error
/// instead of ending the process.
fn guard<T>(what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .unwrap_or_else(|_| Err(Error::Image(format!("the decoder failed while {what} (malformed file)"))))
}

fn strip(e: Error) -> String {
    match e {
        Error::Image(m) => m,
        other => other.to_string(),
    }
}

/// Resizes to `width` x `height` as diffusers' image processor does to an init, control or
/// inpainting picture of another size: Pillow's Lanczos resize, byte for byte
/// ([`crate::pil_resize`]). The target is limited to [`MAX_INPUT_SIDE`] on a side (check the
/// request against the model first: a target the model refuses should never be resized to).
pub fn resize_rgb(image: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    resize_rgb_with(image, width, height, Filter::Lanczos)
}

/// Resizes with one of Pillow's filters, byte for byte as Pillow's `Image.resize` ([`pil_resize`]):
/// what transformers' SigLIP2 processor and diffusers' Omni references do. The target is
/// limited as [`resize_rgb`]'s: a huge one is an error, not an allocation that aborts.
pub fn resize_rgb_with(image: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::invalid("resize target must be at least 1x1"));
    }
    if width > MAX_INPUT_SIDE || height > MAX_INPUT_SIDE {
        return Err(Error::invalid(format!(
            "resize target {width}x{height} exceeds {MAX_INPUT_SIDE} pixels on a side"
        )));
    }
    image.check_input("picture to resize")?;
    let pixels = pil_resize::resize::<3>(
        &image.pixels,
        image.width as usize,
        image.height as usize,
        width as usize,
        height as usize,
        filter,
    );
    Ok(RgbImage { width, height, pixels })
}

/// Resizes a mask to `width` x `height` as diffusers' mask processor does to an inpainting mask
/// of another size than the image it is made at: Pillow's Lanczos resize of the gray picture
/// (each band is resampled alike, so this is the RGB resize of the gray replicated), before the
/// pipeline binarises it at 0.5. Limited like [`resize_rgb`].
pub fn resize_gray(mask: &GrayImage, width: u32, height: u32) -> Result<GrayImage> {
    mask.check_input("mask to resize")?;
    if (mask.width, mask.height) == (width, height) {
        return Ok(mask.clone());
    }
    if width == 0 || height == 0 || width > MAX_INPUT_SIDE || height > MAX_INPUT_SIDE {
        return Err(Error::invalid(format!(
            "resize target {width}x{height} must be 1..={MAX_INPUT_SIDE} pixels on a side"
        )));
    }
    // One channel, not an RGB copy (a 16384^2 mask took 3 x 256 MiB more): Pillow resizes each
    // channel on its own, so the result is the same.
    let pixels = pil_resize::resize::<1>(
        &mask.pixels,
        mask.width as usize,
        mask.height as usize,
        width as usize,
        height as usize,
        Filter::Lanczos,
    );
    Ok(GrayImage { width, height, pixels })
}

/// Pillow's `Image.crop((left, top, left + width, top + height))` inside the picture.
pub fn crop_rgb(image: &RgbImage, left: u32, top: u32, width: u32, height: u32) -> Result<RgbImage> {
    image.check()?;
    let fits = |start: u32, len: u32, side: u32| start.checked_add(len).is_some_and(|end| end <= side);
    if !fits(left, width, image.width) || !fits(top, height, image.height) || width == 0 || height == 0 {
        return Err(Error::invalid(format!(
            "crop {width}x{height} at ({left}, {top}) does not fit in {}x{}",
            image.width, image.height
        )));
    }
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
    for y in top..top + height {
        let start = (y as usize * image.width as usize + left as usize) * 3;
        pixels.extend_from_slice(&image.pixels[start..start + width as usize * 3]);
    }
    Ok(RgbImage { width, height, pixels })
}

impl RgbImage {
    /// Checks that the picture is not empty and the buffer holds exactly width x height x 3 bytes.
    pub fn check(&self) -> Result<()> {
        check_buffer("RGB", self.width, self.height, 3, self.pixels.len())
    }

    /// [`RgbImage::check`] for a picture a caller hands in (`what` names it), which also may be
    /// no larger than [`MAX_INPUT_SIDE`] on a side, as a decoded file may not: a 1 x 20,000,000
    /// picture's resize weights took half a GB and squashed it silently.
    pub fn check_input(&self, what: &str) -> Result<()> {
        self.check()?;
        check_input_side(what, self.width, self.height)
    }
}

fn check_input_side(what: &str, width: u32, height: u32) -> Result<()> {
    if width > MAX_INPUT_SIDE || height > MAX_INPUT_SIDE {
        return Err(Error::Image(format!(
            "the {what} is {width}x{height}: input pictures may be at most {MAX_INPUT_SIDE} pixels on a side"
        )));
    }
    Ok(())
}

/// The one buffer check of [`RgbImage`] and [`GrayImage`]: `channels` bytes a pixel.
fn check_buffer(kind: &str, width: u32, height: u32, channels: usize, len: usize) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::Image(format!("{kind} image of {width}x{height} is empty (a side of 0 pixels)")));
    }
    let need = width as usize * height as usize * channels;
    if len != need {
        return Err(Error::Image(format!("{kind} image of {width}x{height} needs {need} bytes, has {len}")));
    }
    Ok(())
}

impl GrayImage {
    /// Checks that the picture is not empty and the buffer holds exactly width x height bytes.
    pub fn check(&self) -> Result<()> {
        check_buffer("gray", self.width, self.height, 1, self.pixels.len())
    }

    /// [`GrayImage::check`] for a mask a caller hands in, limited as [`RgbImage::check_input`].
    pub fn check_input(&self, what: &str) -> Result<()> {
        self.check()?;
        check_input_side(what, self.width, self.height)
    }
}

/// Reads `[B, C, h, w]` float32 latents from a `.npy` file.
/// The file is read with [`read_file_capped`] ([`MAX_LATENTS_FILE_BYTES`]).
pub fn read_npy(path: &Path) -> Result<Array4<f32>> {
    use ndarray_npy::ReadNpyExt;
    let bytes = read_file_capped(path, MAX_LATENTS_FILE_BYTES)?;
    check_npy_size(&bytes).map_err(|e| Error::invalid(format!("{}: cannot read latents: {e}", path.display())))?;
    Array4::<f32>::read_npy(bytes.as_slice())
        .map_err(|e| Error::invalid(format!("{}: cannot read latents: {e}", path.display())))
}

/// The `.npy` reader allocates what the header's shape asks before reading any data: a
/// 100-byte file declaring (1, 16, 2^20, 2^20) asked 64 TiB. Checks that shape's float32 values
/// against the bytes after the header first.
fn check_npy_size(bytes: &[u8]) -> std::result::Result<(), String> {
    let not_npy = || "not an .npy file".to_string();
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(not_npy());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        _ => return Err(not_npy()),
    };
    let header = bytes.get(start..start.saturating_add(header_len)).ok_or_else(not_npy)?;
    let header = String::from_utf8_lossy(header);
    let shape = header.split("'shape':").nth(1).and_then(|rest| rest.split(')').next()).ok_or_else(not_npy)?;
    let mut values: u64 = 1;
    for side in shape.trim_start().trim_start_matches('(').split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let side: u64 = side.parse().map_err(|_| format!("shape ({shape}) is not a list of sizes"))?;
        values = values.checked_mul(side).ok_or_else(|| format!("shape ({shape}) overflows"))?;
    }
    let data = (bytes.len() - start - header_len) as u64;
    if values.checked_mul(4).is_none_or(|need| need > data) {
        return Err(format!(
            "shape ({shape}) needs {values} float32 values, the file holds {data} bytes after its header"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// An RGBA picture compacted in place is the image crate's own RGB conversion.
    #[test]
    fn rgba_is_compacted_to_the_crates_rgb() {
        let (w, h) = (37u32, 11u32);
        let samples: Vec<u8> = (0..w * h * 4).map(|i| (i * 29 % 253) as u8).collect();
        let rgba = image::RgbaImage::from_raw(w, h, samples).unwrap();
        let want = image::DynamicImage::ImageRgba8(rgba.clone()).into_rgb8();
        let got = super::rgb8_in_place(image::DynamicImage::ImageRgba8(rgba));
        assert_eq!(got, want);
        let one = image::RgbaImage::from_raw(1, 1, vec![1, 2, 3, 4]).unwrap();
        assert_eq!(super::rgb8_in_place(image::DynamicImage::ImageRgba8(one)).into_raw(), vec![1, 2, 3]);
    }

    use super::*;

    /// A gray picture resized on its own channel gives what its RGB copy gives in each channel
    /// (Pillow resizes channels independently), growing and shrinking, for every filter path.
    #[test]
    fn gray_resizes_equal_their_rgb_copies() {
        for (w, h, tw, th) in [(37, 23, 64, 48), (300, 200, 64, 48), (64, 400, 48, 64), (50, 50, 17, 90), (5, 7, 5, 3)]
        {
            let pixels: Vec<u8> = (0..w * h).map(|i| ((i * 37 + i / 11) % 256) as u8).collect();
            let gray = GrayImage { width: w, height: h, pixels };
            let rgb = RgbImage { width: w, height: h, pixels: gray.pixels.iter().flat_map(|&v| [v, v, v]).collect() };
            let via_rgb: Vec<u8> = resize_rgb(&rgb, tw, th).unwrap().pixels.chunks(3).map(|p| p[0]).collect();
            assert_eq!(resize_gray(&gray, tw, th).unwrap().pixels, via_rgb, "{w}x{h} -> {tw}x{th}");
        }
        let gray = GrayImage { width: 4, height: 4, pixels: vec![0; 16] };
        assert_eq!(resize_gray(&gray, 0, 4).unwrap_err().kind(), crate::ErrorKind::InvalidRequest);
    }

    /// WebP is lossless (the pixels back exactly), JPEG close at quality 95; a quality outside
    /// 1..=100 and a short pixel buffer are refused; formats by extension.
    #[test]
    fn pictures_encode_in_each_format() {
        let pixels = (0..32u32 * 24 * 3).map(|i| ((i * 7) % 256) as u8 / 2 + 64).collect();
        let image = RgbImage { width: 32, height: 24, pixels };
        let webp = encode_image(&image, ImageFormat::Webp, &[]).unwrap();
        assert_eq!(decode_rgb(&webp).unwrap(), image);
        let jpeg = encode_image(&image, ImageFormat::Jpeg { quality: 95 }, &[]).unwrap();
        assert_eq!(&jpeg[..2], [0xFF, 0xD8]);
        assert_eq!(decode_rgb(&jpeg).unwrap().pixels.len(), image.pixels.len());
        for quality in [0, 101] {
            let e = encode_image(&image, ImageFormat::Jpeg { quality }, &[]).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidRequest, "{e}");
        }
        let short = RgbImage { width: 32, height: 24, pixels: vec![0; 5] };
        for format in [ImageFormat::Png, ImageFormat::Jpeg { quality: 90 }, ImageFormat::Webp] {
            assert_eq!(encode_image(&short, format, &[]).unwrap_err().kind(), crate::ErrorKind::Image);
        }
        assert_eq!(ImageFormat::for_path(Path::new("a/b.JPG"), 70), Some(ImageFormat::Jpeg { quality: 70 }));
        assert_eq!(ImageFormat::for_path(Path::new("b.webp"), 70), Some(ImageFormat::Webp));
        assert_eq!(ImageFormat::for_path(Path::new("b"), 70), Some(ImageFormat::Png));
        assert_eq!(ImageFormat::for_path(Path::new("b.gif"), 70), None);
    }

    /// The `.npy` header's shape is checked against the file before the reader allocates it.
    #[test]
    fn npy_shapes_beyond_the_file_are_refused() {
        let npy = |shape: &str, data: usize| {
            let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
            let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
            bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend(std::iter::repeat_n(0u8, data));
            bytes
        };
        let e = check_npy_size(&npy("(1, 16, 1048576, 1048576)", 16)).unwrap_err();
        assert!(e.contains("needs 17592186044416 float32 values"), "{e}");
        assert!(check_npy_size(&npy("(1, 16, 2, 2)", 256)).is_ok());
        assert!(check_npy_size(&npy("(1, 16, 2, 2)", 255)).is_err());
        assert!(check_npy_size(&npy("(18446744073709551615, 2)", 0)).unwrap_err().contains("overflows"));
        assert!(check_npy_size(b"not numpy at all").is_err());
        let dir = std::env::temp_dir().join(format!("zimage-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("huge.npy");
        std::fs::write(&path, npy("(1, 16, 1048576, 1048576)", 16)).unwrap();
        assert_eq!(read_npy(&path).unwrap_err().kind(), crate::ErrorKind::InvalidRequest);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Public helpers given a picture whose buffer does not match its size, or values that are
    /// not three channels, return errors instead of panicking.
    #[test]
    fn inconsistent_pictures_are_errors_not_panics() {
        let lying = RgbImage { width: 10, height: 10, pixels: vec![] };
        assert!(crop_rgb(&lying, 0, 0, 2, 2).is_err());
        assert!(to_rgb8(ndarray::Array3::<f32>::zeros((1, 4, 4)).view()).is_err());
        let ok = to_rgb8(ndarray::Array3::<f32>::zeros((3, 2, 5)).view()).unwrap();
        assert_eq!((ok.width, ok.height, ok.pixels), (5, 2, vec![128; 30]));
    }

    /// A disk that fills up while the PNG is written (/dev/full: every write fails with
    /// ENOSPC) is an I/O error naming the destination, and leaves neither the destination nor
    /// the temporary file.
    #[cfg(unix)]
    #[test]
    fn a_full_disk_is_an_io_error_and_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("zimage-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("out.png");
        let image = RgbImage { width: 64, height: 64, pixels: vec![7; 64 * 64 * 3] };
        for latents in [false, true] {
            let mut staged = StagedFile::create(&dest).unwrap();
            let temp = staged.temp_path().to_path_buf();
            assert!(temp.exists());
            staged.file = Some(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap());
            let e = if latents {
                staged.write_npy(&Array4::zeros((1, 16, 64, 64))).unwrap_err()
            } else {
                staged.write_png(&image, &[("prompt", "x".into())]).unwrap_err()
            };
            assert_eq!(e.kind(), crate::error::ErrorKind::Io, "{e}");
            match &e {
                Error::Io { path, source } => {
                    assert_eq!(path, &dest);
                    assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}");
                }
                other => panic!("{other}"),
            }
            drop(staged);
            assert!(!temp.exists() && !dest.exists());
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_stop_at_the_cap() {
        let dir = std::env::temp_dir().join(format!("zimage-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, [1u8; 100]).unwrap();
        assert_eq!(read_file_capped(&path, 100).unwrap().len(), 100);
        let e = read_file_capped(&path, 99).unwrap_err();
        assert!(matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::FileTooLarge), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
