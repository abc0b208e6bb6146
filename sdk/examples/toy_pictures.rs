//! Writes the toy model's pictures for the README (docs/images/toy-*.png, 64x64) with the
//! request `scripts/demo.sh` makes (64x64, 8 steps, seed 42, no guidance); the committed ones
//! are demo.sh's outputs upscaled 4x nearest-neighbour (the same pixels, 256x256):
//!     cargo run -p zimage --example toy_pictures -- models/toy-zimage docs/images
use std::path::PathBuf;

use zimage::{GenerateRequest, LoadOptions, Pipeline};

const PICTURES: [(&str, &str); 3] = [
    ("toy-red-circle.png", "a red circle on a blue background"),
    ("toy-yellow-square.png", "a large yellow square on the left on a black background"),
    ("toy-green-square-zh.png", "黑色背景上右边有一个大绿色正方形"),
];

fn main() -> zimage::Result<()> {
    let mut args = std::env::args().skip(1);
    let package = PathBuf::from(args.next().unwrap_or_else(|| "models/toy-zimage".into()));
    let out = PathBuf::from(args.next().unwrap_or_else(|| "docs/images".into()));
    let pipeline = Pipeline::load(&package, &LoadOptions::default())?;
    for (file, prompt) in PICTURES {
        let mut request = GenerateRequest::new(prompt);
        request.width = 64;
        request.height = 64;
        request.seed = Some(42);
        let generation = pipeline.generate(&request, None)?;
        let path = out.join(file);
        zimage::image_io::write_png(&path, &generation.images[0], &[("prompt", prompt.to_string())])?;
        println!("{}: {prompt}", path.display());
    }
    Ok(())
}
