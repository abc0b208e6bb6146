//! What one adapter adds to one Linear weight, before its factor and scale.

/// A row-major float32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// A LoKr factor: a full matrix, or the product of two.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Factor {
    Full(Matrix),
    LowRank(Matrix, Matrix),
}

impl Factor {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Factor::Full(m) => (m.rows, m.cols),
            Factor::LowRank(a, b) => (a.rows, b.cols),
        }
    }
}

/// What one adapter adds to one Linear weight (before its factor and scale).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Update {
    /// `up [out, r] · down [r, in]`.
    LowRank { up: Matrix, down: Matrix, alpha: Option<f32> },
    /// `w1 ⊗ w2`.
    Lokr { w1: Factor, w2: Factor, alpha: Option<f32> },
}

impl Update {
    /// The `[out, in]` shape of the weight it changes.
    pub fn target_shape(&self) -> (usize, usize) {
        match self {
            Update::LowRank { up, down, .. } => (up.rows, down.cols),
            Update::Lokr { w1, w2, .. } => {
                let (a, b) = w1.shape();
                let (c, d) = w2.shape();
                (a * c, b * d)
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Update::LowRank { up, down, .. } => {
                format!("down [{}, {}], up [{}, {}]", down.rows, down.cols, up.rows, up.cols)
            }
            Update::Lokr { w1, w2, .. } => format!("lokr_w1 {:?}, lokr_w2 {:?}", w1.shape(), w2.shape()),
        }
    }

    pub fn rank(&self) -> usize {
        match self {
            Update::LowRank { down, .. } => down.rows,
            Update::Lokr { w2: Factor::LowRank(a, _), .. } | Update::Lokr { w1: Factor::LowRank(a, _), .. } => a.cols,
            Update::Lokr { .. } => 0,
        }
    }
}
