//! Randomized and mutated inputs, a bounded number of cases each (`PROPTEST_CASES` overrides
//! them all): request fields, manifest fields, and the bytes of images and manifests. What is
//! asserted: no panic and no abort, and either a typed error of the documented kind or a
//! result that is valid (request checks agree with an independent statement of the documented
//! bounds; decoded images hold exactly width x height pixels within the limits; generations
//! give the asked number of images at the asked size with finite latents).

mod common;

use common::*;
use ndarray::Array4;
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::Value;
use zimage::{image_io, ErrorKind, GenerateRequest, GrayImage, InitImage, Manifest, RgbImage};

fn manifest() -> &'static Manifest {
    static M: std::sync::OnceLock<Manifest> = std::sync::OnceLock::new();
    M.get_or_init(|| Manifest::read(&repo().join("models/tiny-zimage")).unwrap())
}

fn config(cases: u32) -> Config {
    // Failures print their input; nothing is written into the source tree.
    Config { cases, failure_persistence: None, ..Config::default() }
}

// ---------------------------------------------------------------- requests

fn side() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => (1u32..=40).prop_map(|k| k * 16),
        1 => 8190u32..=8210,
        1 => Just(0u32),
        1 => Just(100_000u32),
        1 => Just(u32::MAX),
        2 => any::<u32>(),
    ]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -2.0f32..120.0,
        1 => Just(0.0f32),
        1 => Just(100.0f32),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(1e38f32),
        2 => any::<f32>(),
    ]
}

fn strength() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -0.5f64..1.5,
        1 => Just(0.0f64),
        1 => Just(1.0f64),
        1 => Just(1e-300f64),
        1 => Just(f64::NAN),
        1 => any::<f64>(),
    ]
}

fn rgb(width: u32, height: u32, short: bool) -> RgbImage {
    let len = width as usize * height as usize * 3;
    RgbImage { width, height, pixels: vec![100; if short { len / 2 } else { len }] }
}

/// A request of random fields; an input picture, a mask and caller latents sometimes, of the
/// request's size or not (pictures of another size are valid: they are resized).
fn request() -> impl Strategy<Value = GenerateRequest> {
    let sizes = (side(), side(), prop_oneof![1u32..=12, 0u32..=1100, Just(u32::MAX)]);
    let counts = prop_oneof![1u32..=4, 0u32..=70, Just(u32::MAX)];
    let guidance = (float(), float(), float());
    let init = prop_oneof![
        2 => Just(None),
        1 => (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), strength()).prop_map(Some),
    ];
    let latents = prop_oneof![3 => Just(None), 1 => (any::<bool>(), float()).prop_map(Some)];
    (sizes, counts, guidance, init, latents).prop_map(|((w, h, steps), count, (g, n, t), init, latents)| {
        let mut r = GenerateRequest::new("a fox");
        (r.width, r.height, r.steps, r.count) = (w, h, steps, count);
        (r.guidance_scale, r.cfg_normalization, r.cfg_truncation) = (g, n, t);
        // Pictures and latents are only built at sizes a test can afford; otherwise 16x16.
        let small = |v: u32| if v <= 256 && v > 0 { v } else { 16 };
        if let Some((same_size, short, with_mask, mask_same, strength)) = init {
            let (iw, ih) = if same_size { (small(w), small(h)) } else { (32, 48) };
            let mask = with_mask.then(|| {
                let (mw, mh) = if mask_same { (iw, ih) } else { (iw / 2 + 1, ih) };
                GrayImage { width: mw, height: mh, pixels: vec![255; (mw * mh) as usize] }
            });
            r.init_image = Some(InitImage { image: rgb(iw, ih, short), mask, strength });
        }
        if let Some((right_shape, value)) = latents {
            let (lw, lh) = (small(w) as usize / 8, small(h) as usize / 8);
            let b = if count <= 4 && count > 0 { count as usize } else { 1 };
            let shape = if right_shape { (b, 16, lh, lw) } else { (b, 16, lh + 1, lw) };
            r.latents = Some(Array4::from_elem(shape, if value.is_finite() { value.clamp(-4.0, 4.0) } else { value }));
        }
        r
    })
}

/// The documented bounds (limits.rs, the request's field docs), written out independently of
/// the SDK's checks: what `check_request` must accept, and nothing else.
fn documented_valid(r: &GenerateRequest) -> bool {
    let side_ok = |v: u32| v > 0 && v.is_multiple_of(16) && v <= 8192;
    let finite = [r.guidance_scale, r.cfg_normalization, r.cfg_truncation].iter().all(|v| v.is_finite());
    let mut ok = side_ok(r.width)
        && side_ok(r.height)
        && (1..=1000).contains(&r.steps)
        && (1..=64).contains(&r.count)
        && finite
        && (0.0..=100.0).contains(&r.guidance_scale)
        && (0.0..=100.0).contains(&r.cfg_normalization)
        && r.cfg_truncation >= 0.0;
    if let Some(l) = &r.latents {
        let want = [r.count as usize, 16, 2 * (r.height as usize / 16), 2 * (r.width as usize / 16)];
        ok &= l.shape() == want && l.iter().all(|v| v.is_finite());
    }
    if let Some(init) = &r.init_image {
        let i = &init.image;
        // Any size: a picture or mask of another size than the request's is resized to it.
        ok &= i.pixels.len() == i.width as usize * i.height as usize * 3;
        if let Some(m) = &init.mask {
            ok &= m.pixels.len() == m.width as usize * m.height as usize;
        }
        let steps = r.steps as f64;
        ok &= (0.0..=1.0).contains(&init.strength) && steps - steps * init.strength < steps;
    }
    ok
}

proptest! {
    #![proptest_config(config(1500))]

    /// The request check accepts exactly the documented requests; a refusal is an invalid
    /// request or an image error, never a panic.
    #[test]
    fn request_checks_match_the_documented_bounds(r in request()) {
        match zimage::pipeline::check_request(&r, manifest()) {
            Ok(()) => prop_assert!(documented_valid(&r), "accepted: {r:?}"),
            Err(e) => {
                prop_assert!(matches!(e.kind(), ErrorKind::InvalidRequest | ErrorKind::Image), "{e}");
                prop_assert!(!documented_valid(&r), "refused ({e}): {r:?}");
            }
        }
    }

    /// Prompts of any text and any max_sequence_length: token ids within the limit, the
    /// untruncated length reported, or an invalid request.
    #[test]
    fn any_prompt_tokenizes_within_its_limit(prompt in any::<String>(), max in prop_oneof![0usize..=600, Just(usize::MAX)]) {
        let p = pipeline("tiny-zimage");
        match p.tokenize(&prompt, Some(max)) {
            Ok(t) => {
                prop_assert!(max >= 1);
                prop_assert_eq!(t.ids.len(), t.full_length.min(max));
                prop_assert_eq!(t.truncated(), t.full_length > max);
            }
            Err(e) => {
                prop_assert_eq!(e.kind(), ErrorKind::InvalidRequest);
                prop_assert_eq!(max, 0);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(10))]

    /// Valid small requests run end to end: the asked number of images at the asked size,
    /// finite latents of the right shape.
    #[test]
    fn valid_small_requests_generate(
        w in (1u32..=4).prop_map(|k| k * 16),
        h in (1u32..=4).prop_map(|k| k * 16),
        steps in 1u32..=3,
        count in 1u32..=2,
        guidance in prop_oneof![Just(0.0f32), 0.5f32..6.0],
        normalization in prop_oneof![Just(0.0f32), 0.5f32..2.0],
        truncation in 0.0f32..1.5,
        seed in any::<u64>(),
        init in prop_oneof![Just(None), (any::<bool>(), 0.4f64..=1.0).prop_map(Some)],
    ) {
        let mut r = GenerateRequest::new("a lighthouse");
        (r.width, r.height, r.steps, r.count, r.seed) = (w, h, steps, count, Some(seed));
        (r.guidance_scale, r.cfg_normalization, r.cfg_truncation) = (guidance, normalization, truncation);
        r.return_latents = true;
        if let Some((with_mask, strength)) = init {
            let pixels = (0..w * h * 3).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
            let mask = with_mask.then(|| GrayImage {
                width: w,
                height: h,
                pixels: (0..w * h).map(|i| if i % 3 == 0 { 255 } else { 0 }).collect(),
            });
            r.init_image = Some(InitImage { image: RgbImage { width: w, height: h, pixels }, mask, strength });
        }
        let g = pipeline("tiny-zimage").generate(&r, None).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        prop_assert_eq!(g.images.len(), count as usize);
        for image in &g.images {
            prop_assert_eq!((image.width, image.height), (w, h));
            prop_assert!(image.check().is_ok());
        }
        let latents = g.latents.unwrap();
        prop_assert_eq!(latents.shape(), &[count as usize, 16, h as usize / 8, w as usize / 8][..]);
        prop_assert!(latents.iter().all(|v| v.is_finite()));
    }
}

// ---------------------------------------------------------------- manifests

fn base_manifest() -> Value {
    json(&repo().join("models/tiny-zimage/manifest.json"))
}

/// The manifest fields that image sizes and limits are computed from.
const SIZING: &[&str] = &[
    "transformer.in_channels",
    "transformer.patch_size",
    "transformer.f_patch_size",
    "transformer.cap_feat_dim",
    "transformer.sequence_multiple",
    "transformer.max_caption_tokens",
    "transformer.max_latent_height",
    "transformer.max_latent_width",
    "vae.latent_channels",
    "vae.scale_factor",
    "vae.scaling_factor",
    "vae.shift_factor",
    "text_encoder.hidden_size",
    "text_encoder.max_sequence_length",
];

/// Every path (object keys and array indices) in a JSON value.
fn paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                prefix.push(k.clone());
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                prefix.push(i.to_string());
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(0u64), Just(1), Just(2), Just(3), Just(64), Just(1 << 32), Just(u64::MAX)]
            .prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        Just(serde_json::json!(1e308)),
        ".{0,12}".prop_map(Value::from),
        Just(Value::String("../../etc/passwd".into())),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
    ]
}

/// Replaces (or removes, with `None`) the value at `path`.
fn mutate(root: &mut Value, path: &[String], new: Option<Value>) {
    let (last, parents) = path.split_last().unwrap();
    let mut v = root;
    for key in parents {
        v = match v {
            Value::Object(m) => m.get_mut(key).unwrap(),
            Value::Array(a) => &mut a[key.parse::<usize>().unwrap()],
            _ => unreachable!(),
        };
    }
    match (v, new) {
        (Value::Object(m), Some(new)) => {
            m.insert(last.clone(), new);
        }
        (Value::Object(m), None) => {
            m.remove(last);
        }
        (Value::Array(a), Some(new)) => a[last.parse::<usize>().unwrap()] = new,
        (Value::Array(a), None) => {
            a.remove(last.parse::<usize>().unwrap());
        }
        _ => unreachable!(),
    }
}

/// Whatever a manifest says, reading what it gives is safe: limits, and a request checked
/// against them.
fn use_manifest(m: &Manifest) {
    let _ = (m.size_multiple(), m.max_image_width(), m.max_image_height(), m.weight_bytes());
    let mut r = GenerateRequest::new("x");
    (r.width, r.height) = (64, 64);
    if let Err(e) = zimage::pipeline::check_request(&r, m) {
        assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    }
}

proptest! {
    #![proptest_config(config(600))]

    /// One to three fields of the tiny package's manifest replaced or removed: parsed or
    /// refused with a message, never a panic; a manifest that parses can be used.
    #[test]
    fn mutated_manifest_fields_parse_or_are_refused(
        picks in prop::collection::vec(
            (any::<bool>(), any::<prop::sample::Index>(), prop::option::weighted(0.85, json_value())),
            1..=3,
        )
    ) {
        let mut m = base_manifest();
        for (geometry, index, value) in picks {
            let mut all = Vec::new();
            paths(&m, &mut Vec::new(), &mut all);
            // Half the time one of the numbers that sizes and limits are computed from.
            let sizing: Vec<Vec<String>> = all.iter().filter(|p| SIZING.contains(&p.join(".").as_str())).cloned().collect();
            let from = if geometry && !sizing.is_empty() { &sizing } else { &all };
            if from.is_empty() {
                break;
            }
            let path = index.get(from).clone();
            mutate(&mut m, &path, value);
        }
        let text = serde_json::to_string(&m).unwrap();
        if let Ok(parsed) = Manifest::parse(&text) {
            use_manifest(&parsed);
        }
    }

    /// The manifest's bytes mutated (flips, insertions, deletions, truncation).
    #[test]
    fn mutated_manifest_bytes_parse_or_are_refused(edits in prop::collection::vec(edit(), 1..=6)) {
        let mut bytes = std::fs::read(repo().join("models/tiny-zimage/manifest.json")).unwrap();
        for e in &edits {
            apply(&mut bytes, e);
        }
        if let Ok(parsed) = Manifest::parse(&String::from_utf8_lossy(&bytes)) {
            use_manifest(&parsed);
        }
    }
}

// ---------------------------------------------------------------- image bytes

#[derive(Debug, Clone)]
enum Edit {
    Set(prop::sample::Index, u8),
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Delete(prop::sample::Index, usize),
    Truncate(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        3 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        1 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..32)).prop_map(|(i, v)| Edit::Insert(i, v)),
        1 => (any::<prop::sample::Index>(), 1usize..64).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => any::<prop::sample::Index>().prop_map(Edit::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, e: &Edit) {
    if bytes.is_empty() {
        return;
    }
    match e {
        Edit::Set(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        Edit::Flip(i, bit) => {
            let i = i.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        Edit::Insert(i, v) => {
            let i = i.index(bytes.len());
            bytes.splice(i..i, v.iter().copied());
        }
        Edit::Delete(i, n) => {
            let i = i.index(bytes.len());
            let end = (i + n).min(bytes.len());
            bytes.drain(i..end);
        }
        Edit::Truncate(i) => {
            let i = i.index(bytes.len());
            bytes.truncate(i);
        }
    }
}

/// Valid PNG, JPEG and WebP files of the golden input picture and mask.
fn seeds() -> &'static Vec<Vec<u8>> {
    static S: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let inputs = golden("tiny-zimage/inputs");
        let png = std::fs::read(inputs.join("init.png")).unwrap();
        let mask = std::fs::read(inputs.join("mask.png")).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80).encode_image(&img).unwrap();
        let mut webp = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
            .encode(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
            .unwrap();
        vec![png, mask, jpeg, webp]
    })
}

/// A PNG whose header claims `width` x `height`, with a correct checksum, so that decoders
/// get past it to the size limits and the (too short) pixel data.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = seeds()[0].clone();
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Decoding any bytes: an image error, or an image that holds exactly its pixels, within the
/// limits, of the size its header says.
fn check_decoders(bytes: &[u8]) -> Result<(), TestCaseError> {
    let size = image_io::image_size(bytes);
    if let Err(e) = &size {
        prop_assert_eq!(e.kind(), ErrorKind::Image, "{}", e);
    }
    match image_io::decode_rgb(bytes) {
        Ok(img) => {
            prop_assert!(img.check().is_ok());
            prop_assert!(img.width <= image_io::MAX_INPUT_SIDE && img.height <= image_io::MAX_INPUT_SIDE);
            prop_assert_eq!(size.as_ref().ok(), Some(&(img.width, img.height)));
        }
        Err(e) => prop_assert_eq!(e.kind(), ErrorKind::Image, "{}", e),
    }
    match image_io::decode_gray(bytes) {
        Ok(img) => prop_assert!(img.check().is_ok()),
        Err(e) => prop_assert_eq!(e.kind(), ErrorKind::Image, "{}", e),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(300))]

    /// PNG, JPEG and WebP files with bytes changed, inserted, deleted or cut off.
    #[test]
    fn mutated_images_decode_or_are_refused(seed in 0usize..4, edits in prop::collection::vec(edit(), 1..=8)) {
        let mut bytes = seeds()[seed].clone();
        for e in &edits {
            apply(&mut bytes, e);
        }
        check_decoders(&bytes)?;
    }

    /// Random bytes, bare or behind each format's signature.
    #[test]
    fn random_bytes_decode_or_are_refused(
        magic in prop_oneof![
            Just(&b""[..]),
            Just(&b"\x89PNG\r\n\x1a\n"[..]),
            Just(&b"\xff\xd8\xff"[..]),
            Just(&b"RIFF\x00\x01\x00\x00WEBPVP8L"[..]),
        ],
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = magic.to_vec();
        bytes.extend(body);
        check_decoders(&bytes)?;
    }

    /// Headers that claim any size, up to 2^32 - 1 on a side, with a valid checksum.
    #[test]
    fn claimed_sizes_stay_within_the_limits(
        width in prop_oneof![1u32..=64, 16_000u32..=17_000, Just(u32::MAX), any::<u32>()],
        height in prop_oneof![1u32..=64, 16_000u32..=17_000, Just(u32::MAX), any::<u32>()],
    ) {
        check_decoders(&png_claiming(width, height))?;
    }
}
