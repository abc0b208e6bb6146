//! Encoded images: PNG (the SDK's encoder, with the generation parameters in text chunks:
//! the bytes `zimage generate` writes), JPEG and lossless WebP; and the short-lived store
//! behind `response_format: "url"`.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zimage::image_io::ImageFormat;
use zimage::RgbImage;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn parse(s: &str) -> Option<OutputFormat> {
        match s {
            "png" => Some(OutputFormat::Png),
            "jpeg" | "jpg" => Some(OutputFormat::Jpeg),
            "webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }
}

/// Encodes one image with the SDK's encoders. `compression` (OpenAI's `output_compression`,
/// 0-100) is the JPEG quality (default 100; 0 is taken as 1); PNG and WebP are lossless and
/// ignore it. Only PNG carries the parameters.
pub fn encode(
    image: &RgbImage,
    format: OutputFormat,
    compression: Option<u8>,
    parameters: &[(&str, String)],
) -> Result<Vec<u8>, ApiError> {
    let format = match format {
        OutputFormat::Png => ImageFormat::Png,
        OutputFormat::Jpeg => ImageFormat::Jpeg { quality: compression.unwrap_or(100).clamp(1, 100) },
        OutputFormat::Webp => ImageFormat::Webp,
    };
    zimage::image_io::encode_image(image, format, parameters)
        .map_err(|e| ApiError::internal(format!("encoding the {} image failed: {e}", format.name())))
}

/// Images kept for `response_format: "url"`, each under an unguessable name, for `ttl`, at
/// most `capacity` of them (the oldest go first).
pub struct ImageStore {
    inner: Mutex<StoreInner>,
    ttl: Duration,
    capacity: usize,
}

#[derive(Default)]
struct StoreInner {
    images: HashMap<String, (Instant, &'static str, Vec<u8>)>,
    order: VecDeque<String>,
}

impl ImageStore {
    pub fn new(ttl: Duration, capacity: usize) -> ImageStore {
        ImageStore { inner: Mutex::default(), ttl, capacity: capacity.max(1) }
    }

    /// Keeps `bytes`; returns the file name to put in the URL.
    pub fn put(&self, bytes: Vec<u8>, format: OutputFormat) -> String {
        let name = format!("{:016x}{:016x}.{}", random_u64(), random_u64(), format.name());
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut inner);
        while inner.order.len() >= self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.images.remove(&old);
            }
        }
        inner.images.insert(name.clone(), (Instant::now(), format.content_type(), bytes));
        inner.order.push_back(name.clone());
        name
    }

    pub fn get(&self, name: &str) -> Option<(&'static str, Vec<u8>)> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut inner);
        inner.images.get(name).map(|(_, content_type, bytes)| (*content_type, bytes.clone()))
    }

    fn expire(&self, inner: &mut StoreInner) {
        while let Some(oldest) = inner.order.front() {
            match inner.images.get(oldest) {
                Some((at, _, _)) if at.elapsed() < self.ttl => break,
                _ => {
                    let old = inner.order.pop_front().expect("front exists");
                    inner.images.remove(&old);
                }
            }
        }
    }
}

/// 64 bits from std's OS-seeded SipHash keys (fresh keys per call): for names no client can
/// guess, not for cryptography.
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_drops_the_oldest_past_capacity_and_expired_images() {
        let store = ImageStore::new(Duration::from_secs(60), 2);
        let a = store.put(vec![1], OutputFormat::Png);
        let b = store.put(vec![2], OutputFormat::Jpeg);
        let c = store.put(vec![3], OutputFormat::Webp);
        assert!(store.get(&a).is_none());
        assert_eq!(store.get(&b), Some(("image/jpeg", vec![2])));
        assert_eq!(store.get(&c), Some(("image/webp", vec![3])));
        assert_ne!(b, c);
        let short = ImageStore::new(Duration::ZERO, 4);
        let d = short.put(vec![4], OutputFormat::Png);
        assert!(short.get(&d).is_none());
    }

    #[test]
    fn formats_encode_to_their_own_signature() {
        let image = RgbImage { width: 16, height: 16, pixels: vec![128; 16 * 16 * 3] };
        let png = encode(&image, OutputFormat::Png, None, &[("seed", "1".into())]).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let jpeg = encode(&image, OutputFormat::Jpeg, Some(80), &[]).unwrap();
        assert_eq!(&jpeg[..3], &[0xff, 0xd8, 0xff]);
        let webp = encode(&image, OutputFormat::Webp, None, &[]).unwrap();
        assert_eq!((&webp[..4], &webp[8..12]), (&b"RIFF"[..], &b"WEBP"[..]));
    }
}
