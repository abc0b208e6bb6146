//! GPU configuration that can be checked without a GPU: TensorRT profiles, cache keys,
//! range checks, and the errors a CPU-only runtime gives.

use std::path::Path;

use zimage::{
    Device, ErrorKind, GpuOptions, GraphKind, LoadOptions, Manifest, Pipeline, ResolutionRange, TensorRtOptions,
    TensorRtPrecision,
};

fn manifest() -> Manifest {
    Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-zimage"), false).unwrap()
}

#[test]
fn transformer_profile_follows_the_declared_range() {
    let m = manifest();
    let mut trt = TensorRtOptions::default();
    trt.resolutions = ResolutionRange { min: (64, 64), opt: (128, 96), max: (256, 256) };
    trt.max_images = 2;
    trt.guidance = true;
    trt.typical_caption_tokens = 100;
    trt.check(&m).unwrap();
    let profile = |kind| trt.profile(kind, &m).expect("TensorRT serves this graph");
    let p = profile(GraphKind::Transformer);
    let d = m.transformer.cap_feat_dim;
    let c = m.vae.latent_channels;
    assert_eq!(p.min, format!("latents:1x{c}x8x8,timestep:1,cap_feats:1x1x{d},cap_mask:1x1"));
    assert_eq!(p.opt, format!("latents:2x{c}x12x16,timestep:2,cap_feats:2x100x{d},cap_mask:2x100"));
    assert_eq!(p.max, format!("latents:4x{c}x32x32,timestep:4,cap_feats:4x512x{d},cap_mask:4x512"));
    assert_eq!(profile(GraphKind::VaeDecoder).max, format!("latents:1x{c}x32x32"));
    assert_eq!(profile(GraphKind::VaeDecoderCpu), profile(GraphKind::VaeDecoder));
    assert_eq!(profile(GraphKind::TextEncoder).opt, "input_ids:1x100,attention_mask:1x100");
    assert_eq!(profile(GraphKind::VaeEncoder).min, "image:1x3x64x64");
    // The enhancer's decoder grows its cache every step: TensorRT does not serve it.
    assert_eq!(trt.profile(GraphKind::TextDecoder, &m), None);
    assert!(trt.covers(256, 64, 2) && !trt.covers(272, 64, 1) && !trt.covers(64, 64, 3));
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
        let mut trt = TensorRtOptions::default();
        trt.resolutions = resolutions;
        assert_eq!(trt.check(&m).unwrap_err().kind(), ErrorKind::InvalidRequest, "{resolutions:?}");
    }
}

#[test]
fn cache_folders_are_keyed_by_the_loaded_graph_profile_and_precision() {
    let m = manifest();
    let mut base = TensorRtOptions::default();
    base.cache_dir = Some("/cache".into());
    let key = |trt: &TensorRtOptions, kind: GraphKind, manifest: &Manifest| {
        let profile = trt.profile(kind, manifest).unwrap();
        trt.cache_dir_for(kind, manifest.graphs.get(kind).unwrap(), &profile)
    };
    let a = key(&base, GraphKind::Transformer, &m);
    assert!(a.starts_with("/cache") && a.file_name().unwrap().to_str().unwrap().starts_with("transformer-"));
    assert_eq!(a, key(&base, GraphKind::Transformer, &m), "stable");
    let mut fp16 = base.clone();
    fp16.precision = TensorRtPrecision::Fp16;
    assert_ne!(a, key(&fp16, GraphKind::Transformer, &m));
    let mut bigger = base.clone();
    bigger.resolutions = ResolutionRange { max: (2048, 2048), ..Default::default() };
    assert_ne!(a, key(&bigger, GraphKind::Transformer, &m));
    let mut other_package = m.clone();
    other_package.graphs.transformer.sha256 = "0".repeat(64);
    assert_ne!(a, key(&base, GraphKind::Transformer, &other_package));
    // Two decoder graphs of one package with one profile: the entry loaded decides the key.
    let direct = key(&base, GraphKind::VaeDecoder, &m);
    let winograd = key(&base, GraphKind::VaeDecoderCpu, &m);
    assert_ne!(direct, winograd);
}

#[test]
fn tensorrt_on_the_cpu_runtime_is_a_provider_error() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-zimage");
    let gpu = {
        let mut o = GpuOptions::default();
        o.tensorrt.cache_dir = Some(std::env::temp_dir().join("zimage-trt-test"));
        o.tensorrt.resolutions = ResolutionRange { min: (64, 64), opt: (64, 64), max: (128, 128) };
        o
    };
    let options = {
        let mut o = LoadOptions::default();
        o.device = Device::TensorRt { device_id: 0 };
        o.gpu = gpu;
        o
    };
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
