//! Merging adapters into base weights: `W' = W + Σ scale_i · Δ_i`, computed in float32 and
//! stored back in the base tensor's element type and layout.
//!
//! `Δ` is `(alpha / rank) · B · A` for a low-rank pair (`B [out, r]`, `A [r, in]`) and
//! `(alpha / rank) · (W1 ⊗ W2)` for LoKr. A package may store a Linear weight as torch does
//! (`[out, in]`) or transposed (`[in, out]`, ONNX MatMul's layout); the product is then formed
//! transposed, `Aᵀ · Bᵀ`, so it lands in the stored order without a transposed copy of `W`.

use half::{bf16, f16};

use super::update::{Factor, Matrix, Update};
use crate::package::initializers::ElementType;

/// A merged weight, ready to hand to ONNX Runtime in place of the package's initializer.
#[derive(Debug, Clone, PartialEq)]
pub enum MergedData {
    Float32(Vec<f32>),
    Float16(Vec<f16>),
    BFloat16(Vec<bf16>),
}

impl MergedData {
    pub fn len(&self) -> usize {
        match self {
            MergedData::Float32(v) => v.len(),
            MergedData::Float16(v) => v.len(),
            MergedData::BFloat16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            MergedData::Float32(v) => v.len() * 4,
            MergedData::Float16(v) => v.len() * 2,
            MergedData::BFloat16(v) => v.len() * 2,
        }
    }
}

/// Decodes little-endian stored bytes to float32.
pub(crate) fn to_f32(bytes: &[u8], element: ElementType) -> Vec<f32> {
    match element {
        ElementType::Float32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        ElementType::Float16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        ElementType::BFloat16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    }
}

/// Converts the merged float32 values to the stored element type. `Err` names the first
/// value that is not finite there (a NaN, or an overflow of float16's range).
pub(crate) fn from_f32(values: Vec<f32>, element: ElementType) -> Result<MergedData, usize> {
    let data = match element {
        ElementType::Float32 => MergedData::Float32(values),
        ElementType::Float16 => MergedData::Float16(values.iter().map(|&v| f16::from_f32(v)).collect()),
        ElementType::BFloat16 => MergedData::BFloat16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
    };
    let first_bad = match &data {
        MergedData::Float32(v) => v.iter().position(|x| !x.is_finite()),
        MergedData::Float16(v) => v.iter().position(|x| !x.is_finite()),
        MergedData::BFloat16(v) => v.iter().position(|x| !x.is_finite()),
    };
    match first_bad {
        Some(index) => Err(index),
        None => Ok(data),
    }
}

/// Adds `factor · Δ` to `weight`, which holds `out × in` values stored `[out, in]`, or
/// `[in, out]` when `transposed`.
pub(crate) fn add_update(weight: &mut [f32], out: usize, inn: usize, transposed: bool, update: &Update, factor: f32) {
    debug_assert_eq!(weight.len(), out * inn);
    match update {
        Update::LowRank { up, down, .. } => {
            // Stored [R, C] += left [R, r] · right [r, C].
            let (left, right) =
                if transposed { (down.transposed(), up.transposed()) } else { (up.clone(), down.clone()) };
            let left = Matrix { data: left.data.iter().map(|v| v * factor).collect(), ..left };
            add_product(weight, &left, &right);
        }
        Update::Lokr { w1, w2, .. } => {
            let w1 = w1.dense();
            let w2 = w2.dense();
            // kron(w1, w2)[i1*c + i2, j1*d + j2] = w1[i1, j1] * w2[i2, j2]
            let (c, d) = (w2.rows, w2.cols);
            for i1 in 0..w1.rows {
                for j1 in 0..w1.cols {
                    let a = w1.data[i1 * w1.cols + j1] * factor;
                    for i2 in 0..c {
                        let row = i1 * c + i2;
                        for j2 in 0..d {
                            let col = j1 * d + j2;
                            let index = if transposed { col * out + row } else { row * inn + col };
                            weight[index] += a * w2.data[i2 * d + j2];
                        }
                    }
                }
            }
        }
    }
}

/// `target [R, C] += left [R, K] · right [K, C]`, rows split over the machine's threads.
fn add_product(target: &mut [f32], left: &Matrix, right: &Matrix) {
    let (rows, k, cols) = (left.rows, left.cols, right.cols);
    debug_assert_eq!(right.rows, k);
    debug_assert_eq!(target.len(), rows * cols);
    if rows == 0 || cols == 0 {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rows).max(1);
    // Small products are not worth a thread.
    let threads = if rows * k * cols < 1 << 20 { 1 } else { threads };
    let rows_per = rows.div_ceil(threads);
    let work = |chunk: &mut [f32], first_row: usize| {
        for (r, out_row) in chunk.chunks_exact_mut(cols).enumerate() {
            let row = first_row + r;
            for kk in 0..k {
                let a = left.data[row * k + kk];
                if a == 0.0 {
                    continue;
                }
                let b = &right.data[kk * cols..(kk + 1) * cols];
                for (t, &bv) in out_row.iter_mut().zip(b) {
                    *t += a * bv;
                }
            }
        }
    };
    if threads == 1 {
        work(target, 0);
        return;
    }
    std::thread::scope(|scope| {
        for (i, chunk) in target.chunks_mut(rows_per * cols).enumerate() {
            let work = &work;
            scope.spawn(move || work(chunk, i * rows_per));
        }
    });
}

impl Matrix {
    pub(crate) fn transposed(&self) -> Matrix {
        let mut data = vec![0.0; self.data.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                data[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        Matrix { rows: self.cols, cols: self.rows, data }
    }

    fn product(&self, other: &Matrix) -> Matrix {
        let mut data = vec![0.0; self.rows * other.cols];
        add_product(&mut data, self, other);
        Matrix { rows: self.rows, cols: other.cols, data }
    }
}

impl Factor {
    fn dense(&self) -> Matrix {
        match self {
            Factor::Full(m) => m.clone(),
            Factor::LowRank(a, b) => a.product(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rows: usize, cols: usize, data: &[f32]) -> Matrix {
        Matrix { rows, cols, data: data.to_vec() }
    }

    #[test]
    fn low_rank_update_in_both_layouts() {
        // W [2, 3], B [2, 1], A [1, 3]: W + 0.5 * B A
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let update = Update::LowRank { up: m(2, 1, &[1.0, 2.0]), down: m(1, 3, &[1.0, 0.0, -1.0]), alpha: None };
        let mut plain = w.to_vec();
        add_update(&mut plain, 2, 3, false, &update, 0.5);
        assert_eq!(plain, [1.5, 2.0, 2.5, 5.0, 5.0, 5.0]);
        // The same weight stored [in, out].
        let mut stored = vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        add_update(&mut stored, 2, 3, true, &update, 0.5);
        assert_eq!(stored, [1.5, 5.0, 2.0, 5.0, 2.5, 5.0]);
    }

    #[test]
    fn lokr_update_is_a_kronecker_product() {
        let update = Update::Lokr {
            w1: Factor::Full(m(1, 2, &[1.0, 2.0])),
            w2: Factor::Full(m(2, 1, &[3.0, 4.0])),
            alpha: None,
        };
        // kron([1 2], [3; 4]) = [[3, 6], [4, 8]]
        let mut w = vec![0.0; 4];
        add_update(&mut w, 2, 2, false, &update, 1.0);
        assert_eq!(w, [3.0, 6.0, 4.0, 8.0]);
        let mut t = vec![0.0; 4];
        add_update(&mut t, 2, 2, true, &update, 1.0);
        assert_eq!(t, [3.0, 4.0, 6.0, 8.0]);
    }

    #[test]
    fn float16_overflow_is_reported() {
        assert_eq!(from_f32(vec![1.0, 1e6], ElementType::Float16), Err(1));
        assert_eq!(from_f32(vec![1.0, f32::NAN], ElementType::Float32), Err(1));
        assert!(from_f32(vec![1.0, 2.0], ElementType::Float32).is_ok());
    }
}
