"""Export a diffusers-format Z-Image folder to a zimage model package.

    python export.py --src Z-Image-Turbo --out zimage-turbo-fp16 --precision fp16

Writes text_encoder.onnx, transformer.onnx, vae_decoder.onnx, vae_encoder.onnx and
vae_decoder_cpu.onnx (the decoder with Winograd convolutions, for --winograd-vae on the CPU;
each graph with one .onnx.data file beside it when its weights exceed 32 MiB), tokenizer.json
and manifest.json, as described in docs/package-format.md. Components are loaded one at a time, directly in the package precision,
so peak memory is about one component's weights (plus the exporter's working set).

`--weights int8|int4` then quantizes the transformer and text encoder (quantize_package.py,
docs/quantization.md). Last, the VAE graphs get their prebuilt CPU layouts
(`<graph>.nchwc<B>.onnx`, zimage_export/cpu_layout.py; `--no-cpu-layouts` leaves them out).
`--prepacked-transformer` adds the float transformer's prepacked CPU layout
(zimage_export/prepacked.py: faster loads on CPUs that pack weights the same way, at about the
transformer's bytes again on disk). `--chunked-attention N` (opt-in, measured on the CPU only)
computes the transformer's attention in N query chunks (zimage_export/transformer_attention.py:
1/N of the score matrices alive at once; docs/loading.md). For an Omni (editing) folder, the
last step points transformer_omni.onnx's weights at transformer.onnx's bytes
(zimage_export/shared_weights.py): the package stores the transformer's weights once.
"""

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

from zimage_export import onnx_io
from zimage_export.source_folder import require_source_folder
from zimage_export.manifest import (
    OPTIONAL_GRAPHS,
    REQUIRED_GRAPHS,
    VARIANT_DEFAULTS,
    build_manifest,
    detect_variant,
    generation_defaults,
)
from zimage_export.winograd_math import DEFAULT_MIN_CHANNELS
from quantize_package import add_arguments as add_quantize_arguments, options_from as quantize_options

# Package precision -> torch dtype (by name: torch is imported once the arguments are parsed,
# so that --help works without it). No bf16: the graphs export, but ONNX Runtime 1.31's CUDA
# provider has no bfloat16 kernel for some of their nodes (Pad first; tried on an H200,
# docs/gpu.md), so such a package runs nowhere.
DTYPES = {"fp32": "float32", "fp16": "float16"}

# ONNX opset per graph. At 23 the exporter writes the transformer's attention and RMSNorms as
# the fused Attention / RMSNormalization ops, which ONNX Runtime runs as single kernels
# (attention and norms -30 % on CPU, see docs/gpu.md for CUDA). The text encoder stays at 18: at
# 23 its rotary embeddings become RotaryEmbedding nodes whose cos/sin caches keep the traced
# batch size. The VAEs stay at 18: their group norms would become GroupNormalization, which
# ONNX Runtime's CPU runs slower (VAE decode 14.0 -> 15-17 s on the mid-size model) than the
# InstanceNormalization form.
DEFAULT_OPSETS = {"text_encoder": 18, "transformer": 23, "vae_decoder": 18, "vae_encoder": 18, "vae_decoder_cpu": 18,
                  "siglip": 18, "transformer_omni": 23}


def pad_token_id(src: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src / "tokenizer")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")
    return int(tokenizer.pad_token_id)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="diffusers-format Z-Image folder")
    parser.add_argument("--out", type=Path, required=True, help="package folder to write")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--opset", type=int, help="one ONNX opset for every graph (default: DEFAULT_OPSETS)")
    parser.add_argument("--name", help="source name for the manifest (default: the --src folder name)")
    parser.add_argument("--graphs", nargs="+", choices=[*REQUIRED_GRAPHS, *OPTIONAL_GRAPHS],
                        help="export only these (default: all)")
    parser.add_argument("--external-data-threshold", type=int, default=onnx_io.DEFAULT_EXTERNAL_DATA_THRESHOLD,
                        help="graphs whose weights exceed this many bytes keep them in <graph>.onnx.data")
    parser.add_argument("--winograd-min-channels", type=int, default=DEFAULT_MIN_CHANNELS,
                        help="vae_decoder_cpu: 3x3 convolutions with at least this many input and output channels "
                             "use Winograd (lower only for tests: narrower ones are slower that way)")
    parser.add_argument("--variant", choices=["auto", *VARIANT_DEFAULTS], default="auto",
                        help="family member whose recommended steps/guidance the manifest records: turbo (8 steps, no "
                             "guidance), base (the non-distilled Z-Image: 50 steps, guidance 4); auto: from the "
                             "--name / --src folder name")
    parser.add_argument("--default-steps", type=int, help="recommended steps (overrides the variant's)")
    parser.add_argument("--default-guidance", type=float, help="recommended guidance scale (overrides the variant's)")
    parser.add_argument("--default-cfg-normalization", type=float, help="recommended cfg_normalization (0 = off)")
    parser.add_argument("--default-cfg-truncation", type=float, help="recommended cfg_truncation (1 = never)")
    parser.add_argument("--no-cpu-layouts", action="store_true",
                        help="do not add the VAE graphs' prebuilt CPU layouts (zimage_export/cpu_layout.py: the "
                             "graphs as ONNX Runtime rewrites them for this CPU's NCHWc block width, which loads "
                             "faster on CPUs with the same width; about doubles the VAE's bytes on disk)")
    parser.add_argument("--prepacked-transformer", action="store_true",
                        help="add the float transformer's prepacked CPU layout (zimage_export/prepacked.py: the "
                             "graph with its GEMM weights as this CPU's kernels pack them, so that a load maps them "
                             "instead of packing; used only where a probe shows the same packing; about the "
                             "transformer's bytes again on disk)")
    parser.add_argument("--chunked-attention", type=int, default=0, metavar="N",
                        help="compute the transformer's attention in N query chunks (zimage_export/"
                             "transformer_attention.py: the CPU kernel holds 1/N of the scores at once; opt-in, the "
                             "GPU side is not measured; 0, the default: one node)")
    quantize_flags = add_quantize_arguments(parser, required=False)
    args = parser.parse_args(argv)
    # The quantization is checked before the export, which takes long on a real model: a
    # refused option after it would leave a float package where a quantized one was asked for.
    if args.weights:
        if args.activations and args.precision != "fp32":
            parser.error(f"--activations {args.activations} is made from fp32 graphs (the CPU's), not "
                         f"--precision {args.precision}")
        try:
            quantize_options(args)
        except (ValueError, OSError) as e:
            parser.error(str(e))
    else:
        # (--int8-vae also applies to a float package: it adds the int8 VAE decoder.)
        given = [dest for dest in quantize_flags
                 if dest not in ("weights", "int8_vae") and getattr(args, dest) != parser.get_default(dest)]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} is a quantization option: it needs --weights int8|int4")
    if args.chunked_attention == 1 or args.chunked_attention < 0:
        parser.error("--chunked-attention: 0 (off) or at least 2 chunks")
    if args.prepacked_transformer and args.weights:
        parser.error("--prepacked-transformer is for float transformers (a quantized one packs a quarter of the "
                     "bytes, and its kernels are not probed)")
    require_source_folder(parser, args.src)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} exists and is not a folder")
    variant = args.variant if args.variant != "auto" else detect_variant(args.name or str(args.src))
    defaults = generation_defaults(variant, {
        "steps": args.default_steps, "guidance_scale": args.default_guidance,
        "cfg_normalization": args.default_cfg_normalization, "cfg_truncation": args.default_cfg_truncation,
    })
    print(f"variant {variant}: recommended settings {defaults or VARIANT_DEFAULTS['turbo']}", flush=True)
    options = {"vae_decoder_cpu": {"winograd_min_channels": args.winograd_min_channels}}

    import torch  # only now, so that --help works without it

    from zimage_export.graphs import GRAPHS

    dtype = getattr(torch, DTYPES[args.precision])
    torch.manual_seed(0)  # nothing should be random, but keep any stray draw reproducible
    src, out = args.src.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer" / "tokenizer.json", out / "tokenizer.json")
    for name in args.graphs or list(GRAPHS):
        start = time.time()
        opset = args.opset or DEFAULT_OPSETS[name]
        spec = GRAPHS[name](src, dtype, **options.get(name, {}))
        if spec is None:  # an optional graph this folder has no use for
            for stale in (out / f"{name}.onnx", onnx_io.external_data_path(out / f"{name}.onnx")):
                stale.unlink(missing_ok=True)
            why = ("no convolution is wide enough for it to differ from vae_decoder" if name == "vae_decoder_cpu"
                   else "not an Omni (editing) folder")
            print(f"skipped {name}: {why}", flush=True)
            continue
        path = onnx_io.export_graph(spec, out, opset, args.external_data_threshold)
        if name.startswith("vae_"):
            # The mid-block attention as one MultiHeadAttention node: it never stores the
            # [S, S] scores (zimage_export/vae_attention.py); the group norms summed in two
            # levels (ONNX Runtime's InstanceNormalization drifts at photo sizes; zimage_export/vae_group_norm.py).
            # Each checked on the traced input.
            from zimage_export.vae_attention import fuse_file
            from zimage_export.vae_group_norm import rewrite_norms_file

            traced = {spec.input_names[0]: spec.args[0].numpy()}
            fused = fuse_file(path, traced)
            norms = rewrite_norms_file(path, traced)
            print(f"{name}: {fused} attention(s) as MultiHeadAttention, {norms} group norm(s) in two levels", flush=True)
        del spec
        gc.collect()
        print(f"exported {name} in {time.time() - start:.1f} s", flush=True)

    if not all((out / f"{name}.onnx").exists() for name in REQUIRED_GRAPHS):
        print("some graphs are missing: manifest.json not written (partial export)")
        return
    manifest = build_manifest(src, out, args.precision, args.name or src.name, pad_token_id(src), defaults)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out / 'manifest.json'}")
    if args.weights:
        from zimage_export.quantize import quantize_package

        start = time.time()
        manifest = quantize_package(out, out, quantize_options(args), args.external_data_threshold)
        for graph, rep in manifest["quantization"]["graphs"].items():
            print(f"{args.weights} {graph}: {rep['quantized']} weights quantized, kept: {', '.join(rep['kept']) or 'none'}")
        print(f"quantized in {time.time() - start:.1f} s", flush=True)
    if args.chunked_attention:
        from zimage_export.transformer_attention import chunk_package

        chunk_package(out, args.chunked_attention)
    if args.int8_vae:
        from zimage_export.vae_int8 import add_int8_decoder_and_report

        add_int8_decoder_and_report(out)
    if not args.no_cpu_layouts:
        from zimage_export.cpu_layout import add_layouts

        add_layouts(out)
    if args.prepacked_transformer:
        from zimage_export.prepacked import add_prepacked

        add_prepacked(out)
    # Last, after every rewrite of transformer.onnx: the Omni transformer reads its weights.
    from zimage_export.shared_weights import share_omni_weights

    shared = share_omni_weights(out)
    if shared is not None:
        print(f"transformer_omni: {shared['shared_bytes']} bytes of weights read from transformer.onnx, "
              f"{shared['own_bytes']} its own", flush=True)


if __name__ == "__main__":
    main()
