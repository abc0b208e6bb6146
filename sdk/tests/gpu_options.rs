//! GPU configuration that can be checked without a GPU: TensorRT profiles, cache keys,
//! range checks, and the errors a CPU-only runtime gives.

use std::path::Path;

use zimage::{Device, ErrorKind, GpuOptions, LoadOptions, Manifest, Pipeline, ResolutionRange, TensorRtPrecision};

fn manifest() -> Manifest {
    Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-zimage"), false).unwrap()
}

#[test]
fn transformer_profile_follows_the_declared_range() {
    let m = manifest();
    let gpu = GpuOptions {
        resolutions: ResolutionRange { min: (64, 64), opt: (128, 96), max: (256, 256) },
        max_images: 2,
        guidance: true,
        typical_caption_tokens: 100,
        ..Default::default()
    };
    gpu.check(&m).unwrap();
    let p = gpu.profile("transformer", &m);
    let d = m.transformer.cap_feat_dim;
    let c = m.vae.latent_channels;
    assert_eq!(p.min, format!("latents:1x{c}x8x8,timestep:1,cap_feats:1x1x{d},cap_mask:1x1"));
    assert_eq!(p.opt, format!("latents:2x{c}x12x16,timestep:2,cap_feats:2x100x{d},cap_mask:2x100"));
    assert_eq!(p.max, format!("latents:4x{c}x32x32,timestep:4,cap_feats:4x512x{d},cap_mask:4x512"));
    assert_eq!(gpu.profile("vae_decoder", &m).max, format!("latents:1x{c}x32x32"));
    assert_eq!(gpu.profile("text_encoder", &m).opt, "input_ids:1x100,attention_mask:1x100");
    assert_eq!(gpu.profile("vae_encoder", &m).min, "image:1x3x64x64");
    assert!(gpu.covers(256, 64, 2) && !gpu.covers(272, 64, 1) && !gpu.covers(64, 64, 3));
}

#[test]
fn bad_ranges_are_invalid_requests() {
    let m = manifest();
    let bad = [
        ResolutionRange { min: (60, 64), opt: (64, 64), max: (64, 64) },
        ResolutionRange { min: (128, 128), opt: (64, 64), max: (256, 256) },
        ResolutionRange { min: (64, 64), opt: (64, 64), max: (64, 1 << 20) },
    ];
    for resolutions in bad {
        let gpu = GpuOptions { resolutions, ..Default::default() };
        assert_eq!(gpu.check(&m).unwrap_err().kind(), ErrorKind::InvalidRequest, "{resolutions:?}");
    }
}

#[test]
fn cache_folders_are_keyed_by_package_profile_and_precision() {
    let m = manifest();
    let base = GpuOptions { cache_dir: Some("/cache".into()), ..Default::default() };
    let a = base.cache_dir_for("transformer", &m);
    assert!(a.starts_with("/cache") && a.file_name().unwrap().to_str().unwrap().starts_with("transformer-"));
    assert_eq!(a, base.cache_dir_for("transformer", &m), "stable");
    let fp16 = GpuOptions { tensorrt_precision: TensorRtPrecision::Fp16, ..base.clone() };
    assert_ne!(a, fp16.cache_dir_for("transformer", &m));
    let bigger =
        GpuOptions { resolutions: ResolutionRange { max: (2048, 2048), ..Default::default() }, ..base.clone() };
    assert_ne!(a, bigger.cache_dir_for("transformer", &m));
    let mut other_package = m.clone();
    other_package.graphs.transformer.sha256 = "0".repeat(64);
    assert_ne!(a, base.cache_dir_for("transformer", &other_package));
}

#[test]
fn tensorrt_on_the_cpu_runtime_is_a_provider_error() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-zimage");
    let gpu = GpuOptions {
        cache_dir: Some(std::env::temp_dir().join("zimage-trt-test")),
        resolutions: ResolutionRange { min: (64, 64), opt: (64, 64), max: (128, 128) },
        ..Default::default()
    };
    let options = LoadOptions { device: Device::TensorRt { device_id: 0 }, gpu, ..Default::default() };
    let err = Pipeline::load(&dir, &options).err().expect("no TensorRT in the CPU runtime");
    assert_eq!(err.kind(), ErrorKind::Provider, "{err}");
    assert!(err.to_string().contains("onnxruntime-gpu==1.31.1"), "{err}");
}

#[test]
fn device_names_parse() {
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda { device_id: 0 });
    assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda { device_id: 1 });
    assert_eq!("tensorrt:2".parse::<Device>().unwrap(), Device::TensorRt { device_id: 2 });
    for bad in ["gpu", "cuda:-1", "cuda:x", "cpu:0", ""] {
        assert_eq!(bad.parse::<Device>().unwrap_err().kind(), ErrorKind::InvalidRequest, "{bad}");
    }
}
