//! Pillow's `Image.resize` for 8-bit RGB, bit for bit: the reference pipelines resize
//! pictures with PIL (transformers' SigLIP2 processor: bilinear; diffusers' Flux2 processor:
//! Lanczos), and parity with them needs the same integers, which general-purpose resizers
//! (the `image` crate, fast_image_resize) do not promise.
//!
//! The algorithm is Pillow's separable convolution (`libImaging/Resample.c`): per output
//! column/row, float64 filter weights over the source window, normalised, converted to fixed
//! point with 22 fractional bits; two passes through an 8-bit intermediate, each output
//! rounded and clipped to 0..=255: horizontal first (over only the rows the vertical pass
//! reads) or, as Pillow 13 does when the height shrinks by more than twice as many pixels as
//! the width, vertical first. Written from the algorithm's description; checked byte for byte
//! against Pillow 13.0.0 (`tests/golden/common/resize.json`, `sdk/tests/reference_tables.rs`)
//! and through transformers' SigLIP2 processor goldens (`sdk/tests/edit.rs`). Pictures go
//! through `image_io::resize_rgb_with`, which checks them; this module works on pixel buffers.

/// Pillow's resampling filters (those the pipelines use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
    Lanczos,
}

impl Filter {
    /// By Pillow's / the manifest's name ("bilinear", "bicubic", "lanczos").
    pub fn from_name(name: &str) -> Option<Filter> {
        match name {
            "bilinear" => Some(Filter::Bilinear),
            "bicubic" => Some(Filter::Bicubic),
            "lanczos" => Some(Filter::Lanczos),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                // Keys' cubic with a = -0.5, as Pillow.
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One axis: for each output index, the first source index, the window length and its
/// fixed-point weights.
struct Coefficients {
    first: Vec<usize>,
    len: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut first = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut window = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; negatives clamp to 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize - xmin;
        let mut total = 0.0;
        for (x, w) in window.iter_mut().enumerate().take(xmax) {
            *w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *w;
        }
        for (x, w) in window.iter().enumerate().take(xmax) {
            let w = if total != 0.0 { w / total } else { *w };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        first.push(xmin);
        len.push(xmax);
    }
    Coefficients { first, len, ksize, weights }
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `pixels` (`in_w` x `in_h`, `C` bytes a pixel: 3 for RGB, 1 for gray) to `out_w` x
/// `out_h` as Pillow's `Image.resize(size, filter)` does for an RGB or L image (no box, no
/// reducing_gap; each channel on its own, so a gray picture gives what its RGB copy gives in
/// each channel). Every size is at least 1 and `pixels` holds `in_w * in_h * C` bytes:
/// `image_io::resize_rgb_with` and `resize_gray` check both, and are the entry points.
pub(crate) fn resize<const C: usize>(
    pixels: &[u8],
    in_w: usize,
    in_h: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<u8> {
    if (in_w, in_h) == (out_w, out_h) {
        return pixels.to_vec(); // Pillow returns a copy
    }
    let horiz = coefficients(in_w, out_w, filter);
    let vert = coefficients(in_h, out_h, filter);
    let (need_h, need_v) = (out_w != in_w, out_h != in_h);
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
    // many pixels as the width does (a faster horizontal pass). The 8-bit intermediate makes
    // the order visible in the result: both orders round and clip in between.
    let vertical_first = in_h > out_h && (in_h - out_h) as i64 > (in_w as i64 - out_w as i64) * 2;
    if vertical_first {
        let narrow = vertical_pass::<C>(pixels, in_w, &vert, 0);
        if need_h {
            horizontal_pass::<C>(&narrow, in_w, out_h, 0, &horiz)
        } else {
            narrow
        }
    } else if need_h {
        // Only the rows the vertical pass reads.
        let first = vert.first[0];
        let last = vert.first[out_h - 1] + vert.len[out_h - 1];
        let wide = horizontal_pass::<C>(pixels, in_w, last - first, first, &horiz);
        if need_v {
            vertical_pass::<C>(&wide, out_w, &vert, first)
        } else {
            wide
        }
    } else {
        vertical_pass::<C>(pixels, in_w, &vert, 0)
    }
}

/// Pillow's horizontal pass: `rows` rows of `src` (`src_w` pixels wide) from row `row_first`,
/// each resampled to the coefficients' output width.
fn horizontal_pass<const C: usize>(
    src: &[u8],
    src_w: usize,
    rows: usize,
    row_first: usize,
    horiz: &Coefficients,
) -> Vec<u8> {
    let out_w = horiz.first.len();
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; rows * out_w * C];
    for y in 0..rows {
        let line = &src[(y + row_first) * src_w * C..(y + row_first + 1) * src_w * C];
        for xx in 0..out_w {
            let k = &horiz.weights[xx * horiz.ksize..];
            let x0 = horiz.first[xx];
            let mut acc = [half; C];
            for x in 0..horiz.len[xx] {
                let px = &line[(x0 + x) * C..(x0 + x) * C + C];
                for c in 0..C {
                    acc[c] += px[c] as i64 * k[x] as i64;
                }
            }
            for c in 0..C {
                out[(y * out_w + xx) * C + c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Pillow's vertical pass over `src` (`width` pixels wide; its row 0 is the source's row
/// `row_offset`): one output row per coefficient window.
fn vertical_pass<const C: usize>(src: &[u8], width: usize, vert: &Coefficients, row_offset: usize) -> Vec<u8> {
    let out_h = vert.first.len();
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; out_h * width * C];
    for yy in 0..out_h {
        let k = &vert.weights[yy * vert.ksize..];
        let y0 = vert.first[yy] - row_offset;
        for xx in 0..width {
            let mut acc = [half; C];
            for y in 0..vert.len[yy] {
                let px = &src[((y0 + y) * width + xx) * C..((y0 + y) * width + xx) * C + C];
                for c in 0..C {
                    acc[c] += px[c] as i64 * k[y] as i64;
                }
            }
            for c in 0..C {
                out[(yy * width + xx) * C + c] = clip8(acc[c]);
            }
        }
    }
    out
}
