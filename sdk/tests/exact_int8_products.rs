//! The int8-activation packages (`models/tiny-zimage-w8a8`, `-w8a8x2`) on ONNX Runtime's exact
//! uint8 x uint8 kernels, the path x86 CPUs without VNNI take (docs/quantization.md, "CPUs
//! without VNNI"). `ZIMAGE_EXACT_INT8_PRODUCTS=1` forces that path on any CPU, so this runs it
//! here too: the packages must load (a zero point shared between products once made ONNX
//! Runtime's rewrite for those kernels fail every such session) and generate the same images and
//! latents, bit for bit, as the fast kernels (integer sums are exact either way; on a CPU without
//! VNNI both loads take the exact kernels). Its own test binary: it sets an environment variable,
//! which no other test in this process may race with.

mod common;

use common::*;
use zimage::runtime::int8_products::EXACT_PRODUCTS_ENV;
use zimage::{LoadOptions, Pipeline};

fn load(package: &str) -> Pipeline {
    let mut o = LoadOptions::default();
    o.threads = Some(1);
    Pipeline::load(repo().join("models").join(package), &o).unwrap_or_else(|e| panic!("{package}: {e}"))
}

#[test]
fn the_exact_kernels_load_and_give_the_fast_kernels_results() {
    let cases = json(&golden("tiny-zimage/cases.json"));
    let case = cases["text_to_image"].as_array().unwrap().iter().find(|c| c["name"] == "cfg").expect("the cfg case");
    let request = golden_request(case);
    for package in ["tiny-zimage-w8a8", "tiny-zimage-w8a8x2"] {
        std::env::set_var(EXACT_PRODUCTS_ENV, "1");
        let exact = load(package).generate(&request, None).unwrap_or_else(|e| panic!("{package}: {e}"));
        std::env::remove_var(EXACT_PRODUCTS_ENV);
        let fast = load(package).generate(&request, None).unwrap();
        let latents = exact.latents.as_ref().unwrap();
        assert!(latents.iter().all(|v| v.is_finite()), "{package}: non-finite latents");
        assert_eq!(latents, fast.latents.as_ref().unwrap(), "{package}: the exact kernels' latents differ");
        assert_eq!(exact.images, fast.images, "{package}: the exact kernels' images differ");
    }
}
