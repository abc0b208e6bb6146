//! Whether ONNX Runtime's uint8 x int8 matrix products are exact on this CPU.
//!
//! MLAS (ONNX Runtime's CPU kernels) multiplies uint8 by int8 on x86 CPUs without VNNI (SSE4.1,
//! AVX2, AVX-512 before Cascade Lake, Zen 2/3) with `vpmaddubsw`, which adds each pair of
//! products in 16 bits with saturation: with full-range int8 weights a pair of large products
//! is clipped, silently. VNNI (`vpdpbusd`: AVX-512 VNNI or AVX-VNNI) and AMX add in 32 bits, as
//! do ARM's kernels. Where the pairs can saturate, a session asks for ONNX Runtime's exact
//! uint8 x uint8 kernels instead (`session.x64quantprecision`: slower, same results).

/// Whether a uint8 x int8 product with full-range weights may saturate on this CPU.
pub fn u8s8_products_may_saturate() -> bool {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        !(std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni"))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    {
        false
    }
}

/// Set to `1`, this environment variable makes a transformer with int8 activations use the exact
/// kernels on every CPU (they are correct everywhere, slower where VNNI makes the fast ones
/// exact): to run a package's exact path on a CPU with VNNI, as `sdk/tests/exact_int8_products.rs`
/// does, or to rule the fast kernels out when a result looks wrong.
pub const EXACT_PRODUCTS_ENV: &str = "ZIMAGE_EXACT_INT8_PRODUCTS";

/// Whether a transformer with int8 activations should use the exact kernels here: where the fast
/// ones may saturate, or where [`EXACT_PRODUCTS_ENV`] asks for them.
pub fn exact_products_wanted() -> bool {
    u8s8_products_may_saturate() || std::env::var_os(EXACT_PRODUCTS_ENV).is_some_and(|v| v == "1")
}

/// The session option that makes ONNX Runtime use its exact uint8 x uint8 kernels on x86.
pub(crate) const EXACT_PRODUCTS_KEY: &str = "session.x64quantprecision";

#[cfg(test)]
mod tests {
    //! The int8-activation rewrite itself (export-scripts/zimage_export/quantize_w8a8.py), on one
    //! `[64, 48]` product written by export-scripts/make_quantized_fixtures.py in float and
    //! rewritten with one int8 term (`product_w8a8.onnx`) and two (`product_w8a8x2.onnx`): its
    //! error, zero and NaN tokens, and the exact kernels.
    use std::path::{Path, PathBuf};

    use ndarray::Array3;
    use ort::session::Session;
    use ort::value::Tensor;

    fn graph(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/w8a8").join(name)
    }

    fn run(name: &str, exact: bool, x: &Array3<f32>) -> Array3<f32> {
        let rt = crate::runtime::runtime(None).expect("ONNX Runtime");
        let mut builder = Session::builder(&rt.env).unwrap().with_intra_threads(1).unwrap();
        if exact {
            builder = builder.with_config_entry(super::EXACT_PRODUCTS_KEY, "1").unwrap();
        }
        let mut session = builder.commit_from_file(graph(name)).unwrap();
        let outputs = session.run(ort::inputs!["x" => Tensor::from_array(x.clone()).unwrap()]).unwrap();
        let (shape, values) = outputs["y"].try_extract_tensor::<f32>().unwrap();
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        Array3::from_shape_vec((dims[0], dims[1], dims[2]), values.to_vec()).unwrap()
    }

    /// Deterministic activations with a different range per token, one token of zeros and one
    /// channel of outliers (what per-token scales are for).
    fn activations() -> Array3<f32> {
        Array3::from_shape_fn((2, 6, 64), |(b, t, k)| {
            if (b, t) == (1, 2) {
                return 0.0;
            }
            let v = ((b * 389 + t * 97 + k * 13) as f32 * 0.37).sin() * (1.0 + t as f32);
            if k == 5 {
                v * 8.0
            } else {
                v
            }
        })
    }

    fn rel_l2(a: &Array3<f32>, b: &Array3<f32>) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    /// A rewritten product's relative L2 from the float one on `activations()`, after checking
    /// that its token of zeros gives exact zeros (the scale is clamped, not 0/0).
    fn product_error(graph: &str) -> f64 {
        let x = activations();
        let got = run(graph, false, &x);
        assert!(got.slice(ndarray::s![1, 2, ..]).iter().all(|&v| v == 0.0), "{graph}");
        let err = rel_l2(&got, &run("product_fp32.onnx", false, &x));
        eprintln!("{graph}: rel L2 {err:.3e}");
        err
    }

    #[test]
    fn the_int8_product_stays_near_the_float_one() {
        // Measured 2026-12-01: 1.31e-2 (the outlier channel coarsens its tokens' steps); the same
        // rounding with one scale per tensor instead of per token gives 2.60e-2 (numpy).
        let err = product_error("product_w8a8.onnx");
        assert!(err > 1e-5 && err < 1.5e-2, "int8-activation product rel L2 {err:.3e}");
    }

    #[test]
    fn two_int8_terms_leave_only_the_weights_rounding() {
        // Measured 2026-12-01: 5.80e-3 against one term's 1.31e-2. What is left is the weights'
        // rounding: the same int8 weights, dequantized, times the float activations give 5.80e-3
        // (numpy). The bound sits between that and one term's error.
        let err = product_error("product_w8a8x2.onnx");
        assert!(err > 1e-5 && err < 7.5e-3, "two-term int8-activation product rel L2 {err:.3e}");
    }

    #[test]
    fn a_nan_token_stays_nan_and_alone() {
        let mut x = activations();
        x[[0, 3, 10]] = f32::NAN;
        x[[1, 4, 20]] = f32::INFINITY;
        for graph in ["product_w8a8.onnx", "product_w8a8x2.onnx"] {
            nan_rows_stay_alone(&run(graph, false, &x));
        }
    }

    fn nan_rows_stay_alone(got: &Array3<f32>) {
        for ((b, t), row_is_bad) in [((0, 3), true), ((1, 4), true), ((0, 2), false), ((1, 5), false)] {
            let row = got.slice(ndarray::s![b, t, ..]);
            if row_is_bad {
                // ONNX Runtime's ReduceMax skips NaN: without the scale's NaN term this row was finite.
                assert!(row.iter().all(|v| !v.is_finite()), "token {b},{t}: {row:?}");
            } else {
                assert!(row.iter().all(|v| v.is_finite()), "token {b},{t}: {row:?}");
            }
        }
    }

    /// ONNX Runtime's exact uint8 x uint8 kernels (what the runtime asks for where uint8 x int8
    /// may saturate) give the same products, bit for bit, as the fast ones where those cannot
    /// saturate: integer sums are exact either way.
    #[test]
    fn the_exact_kernels_give_the_same_products() {
        let x = activations();
        let want = run("product_fp32.onnx", false, &x);
        for graph in ["product_w8a8.onnx", "product_w8a8x2.onnx"] {
            let exact = run(graph, true, &x);
            assert!(rel_l2(&exact, &want) < 1.5e-2, "{graph}");
            if !super::u8s8_products_may_saturate() {
                assert_eq!(exact, run(graph, false, &x), "{graph}");
            }
        }
    }
}
