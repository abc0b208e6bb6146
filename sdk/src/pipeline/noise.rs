//! Gaussian noise bit-compatible with `torch.randn(shape, generator=torch.Generator("cpu")
//! .manual_seed(seed))` in float32, so a seed gives the same image as diffusers.
//!
//! torch draws with MT19937. Tensors of 16 or more values use a Box-Muller transform over
//! blocks of 16 float uniforms; smaller tensors take a scalar double-precision path that
//! caches every second normal in the generator. Both are reproduced here, including that
//! cache, because the image-to-image pipeline draws twice from one generator.

use ndarray::{ArrayD, IxDyn};

/// MT19937 as seeded by `torch.Generator.manual_seed` (only the low 32 bits of the seed count).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// A seeded generator that draws float32 normal tensors in torch's order.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    cached_double_normal: Option<f64>,
}

impl TorchGenerator {
    pub fn new(seed: u64) -> Self {
        TorchGenerator { engine: Mt19937::new(seed), cached_double_normal: None }
    }

    /// torch's float uniform in [0, 1): 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// torch's double uniform in [0, 1): 53 bits of a 64-bit draw (first word high).
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(shape, generator=self)` in float32, C order.
    pub fn randn(&mut self, shape: &[usize]) -> ArrayD<f32> {
        let n: usize = shape.iter().product();
        let mut data = vec![0f32; n];
        if n >= 16 {
            for v in data.iter_mut() {
                *v = self.uniform_f32();
            }
            let mut i = 0;
            while i + 16 <= n {
                box_muller_16(&mut data[i..i + 16]);
                i += 16;
            }
            if !n.is_multiple_of(16) {
                // torch redraws the last 16 values from fresh uniforms.
                let tail = &mut data[n - 16..];
                for v in tail.iter_mut() {
                    *v = self.uniform_f32();
                }
                box_muller_16(tail);
            }
        } else {
            for v in data.iter_mut() {
                *v = self.normal_f64() as f32;
            }
        }
        ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape matches length")
    }
}

/// Box-Muller over 16 uniforms: the first 8 give the radii, the last 8 the angles. torch does
/// this in float32 (vectorised), and float32 here lands closest to it (about 4e-7 apart).
fn box_muller_16(block: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0f32 * u1.ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI) as f32 * u2;
        block[j] = radius * theta.cos();
        block[j + 8] = radius * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // First outputs of the reference mt19937 seeded with 5489 (C++ std::mt19937 default).
        let mut mt = Mt19937::new(5489);
        assert_eq!(mt.next_u32(), 3_499_211_612);
        assert_eq!(mt.next_u32(), 581_869_302);
        assert_eq!(mt.next_u32(), 3_890_346_734);
    }
}
