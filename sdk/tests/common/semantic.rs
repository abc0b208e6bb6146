//! Meaning measured from pixels, for the trained toy package (models/toy-zimage): which colour
//! the background and the shape have, where the shape is, how big it is and what kind it is.
//! The scenes the toy was trained on are defined in
//! export-scripts/zimage_export/toy/scenes.py; the palette and geometry here follow it. Other
//! tests (quantized packages, ControlNet, LoRA) reuse these measurements: generate with the toy
//! package, then compare [`measure`] with [`Scene::parse`] of the prompt.

use zimage::RgbImage;

/// The toy data set's palette: name, Chinese name, RGB.
pub const PALETTE: [(&str, &str, [u8; 3]); 7] = [
    ("red", "红色", [220, 30, 30]),
    ("green", "绿色", [30, 180, 40]),
    ("blue", "蓝色", [30, 60, 220]),
    ("yellow", "黄色", [240, 220, 30]),
    ("white", "白色", [245, 245, 245]),
    ("purple", "紫色", [150, 40, 190]),
    ("black", "黑色", [15, 15, 15]),
];
pub const SHAPES: [(&str, &str); 3] = [("circle", "圆形"), ("square", "正方形"), ("triangle", "三角形")];
/// Shape centres in a 64x64 picture: name, Chinese name, (x, y).
pub const POSITIONS: [(&str, &str, (f32, f32)); 5] = [
    ("centre", "中间", (32.0, 32.0)),
    ("left", "左边", (18.0, 32.0)),
    ("right", "右边", (46.0, 32.0)),
    ("top", "上方", (32.0, 18.0)),
    ("bottom", "下方", (32.0, 46.0)),
];
/// Half extents (circle radius, half side) in a 64x64 picture.
pub const SIZES: [(&str, f32); 3] = [("small", 7.0), ("medium", 11.0), ("large", 15.0)];

/// What a caption asks for (the toy's caption grammar: no position = centre, no size = medium).
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub shape: &'static str,
    pub colour: &'static str,
    pub background: &'static str,
    pub position: &'static str,
    pub size: &'static str,
}

impl Scene {
    /// Reads an English or Chinese toy caption ("a large red circle on the left on a blue
    /// background", "蓝色背景上左边有一个大红色圆形"). Panics on words it does not know.
    pub fn parse(caption: &str) -> Scene {
        let chinese = caption.contains('背');
        let shape = SHAPES.iter().find(|(en, zh)| caption.contains(if chinese { zh } else { en })).expect("shape").0;
        // The background is the colour named next to "background" / "背景"; the shape's is the other.
        let (bg_part, fg_part) = if chinese {
            let i = caption.find("背景").unwrap();
            (&caption[..i], &caption[i..])
        } else {
            let i = caption.find(" background").expect("background");
            let j = caption[..i].rfind(" a ").unwrap();
            (&caption[j..i], &caption[..j])
        };
        let colour_in = |part: &str| {
            PALETTE.iter().find(|(en, zh, _)| part.contains(if chinese { zh } else { en })).expect("colour").0
        };
        let position = POSITIONS
            .iter()
            .find(|(en, zh, _)| if chinese { fg_part.contains(zh) } else { fg_part.contains(&format!(" {en}")) })
            .map_or("centre", |p| p.0);
        let size = if chinese {
            if fg_part.contains('大') {
                "large"
            } else if fg_part.contains('小') {
                "small"
            } else {
                "medium"
            }
        } else if fg_part.contains("large") {
            "large"
        } else if fg_part.contains("small") {
            "small"
        } else {
            "medium"
        };
        Scene { shape, colour: colour_in(fg_part), background: colour_in(bg_part), position, size }
    }
}

/// What a picture shows, measured. `None` where the picture has no shape to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub background: &'static str,
    /// Share of the border pixels nearest to the background colour.
    pub background_share: f32,
    pub colour: Option<&'static str>,
    /// Share of the shape's pixels nearest to its colour.
    pub colour_share: f32,
    /// Centre of the shape's bounding box, in 64x64 picture coordinates.
    pub centre: Option<(f32, f32)>,
    /// Half extent of the shape's bounding box, in 64x64 picture pixels.
    pub half_extent: f32,
    /// Shape pixels / bounding box pixels (rendered: square 1, circle 0.80-0.84, triangle 0.54-0.57).
    pub fill: f32,
}

pub fn nearest_colour(rgb: [u8; 3]) -> &'static str {
    PALETTE.iter().min_by_key(|(_, _, c)| distance2(*c, rgb)).unwrap().0
}

fn rgb_of(name: &str) -> [u8; 3] {
    PALETTE.iter().find(|(en, _, _)| *en == name).unwrap().2
}

fn distance2(a: [u8; 3], b: [u8; 3]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (*x as i32 - y as i32).pow(2) as u32).sum()
}

fn pixel(img: &RgbImage, x: u32, y: u32) -> [u8; 3] {
    let i = ((y * img.width + x) * 3) as usize;
    [img.pixels[i], img.pixels[i + 1], img.pixels[i + 2]]
}

/// The pixels (x, y) of the largest 4-connected region of `mask` (row-major, `w` wide; the
/// first found, scanning rows, on ties), so that stray pixels elsewhere move neither the
/// shape's box nor its colour count.
fn largest_component(mask: &[bool], w: usize) -> Vec<(u32, u32)> {
    let h = mask.len() / w;
    let mut seen = vec![false; mask.len()];
    let mut best: Vec<(u32, u32)> = vec![];
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let (mut stack, mut region) = (vec![start], vec![]);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            region.push((x as u32, y as u32));
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if region.len() > best.len() {
            best = region;
        }
    }
    best
}

/// Background = the palette colour most border pixels are nearest to; shape = the largest
/// connected region of pixels clearly not background (more than 60 levels, RGB distance, from
/// it: far above VAE ripple, far below the distance between any two palette colours, >= 150),
/// measured in the picture's own scale mapped onto 64x64. Centre and size from its bounding box
/// (its centroid would put the triangle 1/3 of a half height low). The Python twin is
/// export-scripts/zimage_export/toy/measure.py (what train_toy.py reports).
pub fn measure(img: &RgbImage) -> Measured {
    let (w, h) = (img.width, img.height);
    let mut border = vec![];
    for y in 0..h {
        for x in 0..w {
            if x < 2 || y < 2 || x >= w - 2 || y >= h - 2 {
                border.push(nearest_colour(pixel(img, x, y)));
            }
        }
    }
    let (background, count) = mode(&border);
    let background_share = count as f32 / border.len() as f32;
    let bg = rgb_of(background);
    let mut mask = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            mask.push(distance2(pixel(img, x, y), bg) > 60 * 60);
        }
    }
    let inside = largest_component(&mask, w as usize);
    let scale = 64.0 / w.max(h) as f32;
    if inside.len() < 8 {
        return Measured {
            background,
            background_share,
            colour: None,
            colour_share: 0.0,
            centre: None,
            half_extent: 0.0,
            fill: 0.0,
        };
    }
    let names: Vec<&'static str> = inside.iter().map(|&(x, y)| nearest_colour(pixel(img, x, y))).collect();
    let (colour, ccount) = mode(&names);
    let n = inside.len() as f32;
    let (x0, x1) = (inside.iter().map(|p| p.0).min().unwrap(), inside.iter().map(|p| p.0).max().unwrap());
    let (y0, y1) = (inside.iter().map(|p| p.1).min().unwrap(), inside.iter().map(|p| p.1).max().unwrap());
    let (bw, bh) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
    Measured {
        background,
        background_share,
        colour: Some(colour),
        colour_share: ccount as f32 / n,
        centre: Some(((x0 + x1 + 1) as f32 / 2.0 * scale, (y0 + y1 + 1) as f32 / 2.0 * scale)),
        half_extent: (bw + bh) / 4.0 * scale,
        fill: n / (bw * bh),
    }
}

fn mode(names: &[&'static str]) -> (&'static str, usize) {
    PALETTE
        .iter()
        .map(|(name, _, _)| (*name, names.iter().filter(|n| *n == name).count()))
        .max_by_key(|(_, c)| *c)
        .unwrap()
}

/// The attributes of `want` the picture does not show, by name (empty = it shows the caption).
/// Position: box centre within 6 px of the asked centre (positions are 14 px apart); size: the
/// half extent nearest to the asked one; kind: by fill ratio (square > 0.92, circle 0.68-0.92,
/// triangle < 0.68). Every rendered training picture passes (export-scripts' measure.py).
pub fn mismatches(m: &Measured, want: &Scene) -> Vec<String> {
    let mut out = vec![];
    if m.background != want.background || m.background_share < 0.9 {
        out.push(format!(
            "background {} ({:.2} of the border), want {}",
            m.background, m.background_share, want.background
        ));
    }
    let Some((cx, cy)) = m.centre else {
        out.push("no shape".into());
        return out;
    };
    if m.colour != Some(want.colour) || m.colour_share < 0.6 {
        out.push(format!("colour {:?} ({:.2} of the shape), want {}", m.colour, m.colour_share, want.colour));
    }
    let (_, _, (wx, wy)) = POSITIONS.iter().find(|p| p.0 == want.position).unwrap();
    if (cx - wx).hypot(cy - wy) > 6.0 {
        out.push(format!("centre ({cx:.1}, {cy:.1}), want {} ({wx}, {wy})", want.position));
    }
    let size =
        SIZES.iter().min_by(|a, b| (a.1 - m.half_extent).abs().total_cmp(&(b.1 - m.half_extent).abs())).unwrap().0;
    if size != want.size {
        out.push(format!("size {size} (half extent {:.1}), want {}", m.half_extent, want.size));
    }
    let kind = if m.fill > 0.92 {
        "square"
    } else if m.fill >= 0.68 {
        "circle"
    } else {
        "triangle"
    };
    if kind != want.shape {
        out.push(format!("shape {kind} (fill {:.2}), want {}", m.fill, want.shape));
    }
    out
}
