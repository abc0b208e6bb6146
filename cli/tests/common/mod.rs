//! Helpers shared by the CLI's integration tests.

/// Largest absolute difference; NaN as soon as either side holds one, so that a `<=` bound
/// fails on it (`f32::max` would drop the NaN and pass).
pub fn max_abs_diff<'a>(got: impl IntoIterator<Item = &'a f32>, want: impl IntoIterator<Item = &'a f32>) -> f32 {
    let mut worst = 0.0f32;
    for (a, b) in got.into_iter().zip(want) {
        let d = (a - b).abs();
        if d.is_nan() {
            return f32::NAN;
        }
        worst = worst.max(d);
    }
    worst
}
