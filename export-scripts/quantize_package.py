"""Quantize an existing zimage package's transformer and text encoder (weight-only int8/int4,
ONNX Runtime MatMulNBits; docs/quantization.md):

    python quantize_package.py --package zimage-turbo --out zimage-turbo-int8 --weights int8

`--method gptq` rounds the transformer's weights (int8 or int4, with or without int8
activations) against calibration activations instead of to nearest: it first generates a few
built-in prompts with the float transformer (zimage_export/calibration.py, gptq.py,
matmul_nbits.py). The text encoder is rounded to nearest.

`--activations int8` (fp32 packages) also quantizes the transformer's activations, per token at
run time: a faster, less accurate CPU-only package; `--activations int8x2` quantizes them as two
int8 terms, about 16-bit: half that speed-up, weight-only int8's accuracy
(zimage_export/quantize_w8a8.py).

An editing package's Omni transformer (transformer_omni.onnx) is quantized with the
transformer, to the transformer's own codes, and reads them from transformer.onnx (docs/quantization.md,
"Editing (Omni) packages"). Every other file is copied unchanged. `--int8-vae` also writes `vae_decoder_int8`, an int8
VAE decoder for faster, lossy CPU decoding (zimage_export/vae_int8.py). `export.py --weights ...` does the same right after
exporting. Needs onnx and onnxruntime only (no torch, no diffusers folder).
"""

import argparse
from pathlib import Path

from zimage_export.calibration import (
    CALIBRATION_PROMPTS,
    DEFAULT_MEMORY_GIB,
    DEFAULT_PROMPTS,
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    CalibrationOptions,
)
from zimage_export.gptq import DEFAULT_DAMPING
from zimage_export.quantize import ACCURACY_LEVEL, ACTIVATIONS, BLOCK_SIZES, DEFAULT_BLOCK_SIZE, METHODS, WEIGHTS, QuantizeOptions, quantize_package


def add_arguments(parser: argparse.ArgumentParser, required: bool) -> list[str]:
    """The quantization flags, shared with export.py; returns their destinations (`weights`
    first), so that export.py can refuse the others without `--weights`."""
    before = {action.dest for action in parser._actions}
    parser.add_argument("--weights", choices=sorted(WEIGHTS), required=required,
                        help="weight-only quantization of the transformer and text encoder (MatMulNBits)")
    parser.add_argument("--activations", choices=[a for a in ACTIVATIONS if a], default=None,
                        help="int8: the transformer's products also take int8 activations (W8A8, per-token scales; "
                             "fp32 packages, CPU only): several times faster products where ONNX Runtime has fast "
                             "int8 kernels, about twice weight-only int8's error; int8x2: each activation as two "
                             "int8 terms (one product of twice the rows), about weight-only int8's error and robust to "
                             "outlier channels (docs/quantization.md)")
    parser.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=DEFAULT_BLOCK_SIZE,
                        help="weights per quantization block (along the input dimension)")
    parser.add_argument("--method", choices=METHODS, default="rtn",
                        help="rtn: round to nearest; hqq: half-quadratic (int4 only); gptq: the transformer's weights "
                             "rounded against calibration activations (runs the float transformer on the "
                             "--calibration-* prompts first; docs/quantization.md)")
    parser.add_argument("--calibration-prompts", type=Path, default=None, metavar="FILE",
                        help="gptq: calibration prompts, one per line (default: built-in prompts)")
    parser.add_argument("--calibration-count", type=int, default=DEFAULT_PROMPTS,
                        help=f"gptq: how many built-in prompts (at most {len(CALIBRATION_PROMPTS)})")
    parser.add_argument("--calibration-size", type=int, default=DEFAULT_SIZE, help="gptq: calibration image side (pixels)")
    parser.add_argument("--calibration-steps", type=int, default=DEFAULT_STEPS, help="gptq: denoising steps per prompt")
    parser.add_argument("--calibration-seed", type=int, default=0, help="gptq: the calibration noise's seed")
    parser.add_argument("--calibration-guidance", type=float, default=None,
                        help="gptq: classifier-free guidance of the calibration generations, which then also run "
                             "the empty negative prompt (default: the package's generation_defaults, 0 without)")
    parser.add_argument("--calibration-memory", type=float, default=DEFAULT_MEMORY_GIB, metavar="GIB",
                        help="gptq: the most calibration statistics held at once; more passes over the prompts "
                             "where they need more (the real model's: about 40 GiB)")
    parser.add_argument("--gptq-damping", type=float, default=None,
                        help=f"gptq: added to H's diagonal, a fraction of its mean (default {DEFAULT_DAMPING})")
    parser.add_argument("--accuracy-level", type=int, choices=range(5), default=ACCURACY_LEVEL,
                        help="MatMulNBits accuracy_level: 4 = int8 compute on the CPU (fast), 0 = float compute")
    parser.add_argument("--text-encoder-accuracy-level", type=int, choices=range(5), default=None,
                        help="the text encoder's accuracy_level (default: 0 for int8, float compute, which cuts "
                             "its error by a third for ~0.5 s more per generation on the mid-size model; "
                             "--accuracy-level for int4)")
    parser.add_argument("--quantize-adaln", action="store_true",
                        help="quantize the transformer's adaLN modulations too (kept in full precision by default)")
    parser.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                        help="keep more transformer weights in full precision: a glob over diffusers parameter "
                             "names, e.g. 'layers.0.*' (repeatable)")
    parser.add_argument("--keep-embedding", action="store_true",
                        help="keep the text encoder's token embedding table in full precision")
    parser.add_argument("--text-encoder-weights", choices=sorted(WEIGHTS), default=None,
                        help="the text encoder's weights (default: --weights); `--weights int4 --text-encoder-weights "
                             "int8`: an int4 transformer with a more accurate text encoder (docs/quantization.md)")
    parser.add_argument("--lm-head-weights", choices=sorted(WEIGHTS), default=None,
                        help="packages with the enhancer: width of the tied embedding table / LM head "
                             "(default: the text encoder's)")
    parser.add_argument("--int8-vae", action="store_true",
                        help="also write vae_decoder_int8, an int8 VAE decoder the runtime uses with --int8-vae "
                             "(about 2x faster CPU decoding, lossy; zimage_export/vae_int8.py)")
    return [action.dest for action in parser._actions if action.dest not in before]


def calibration_from(args):
    """The gptq calibration run's options (None for the other methods)."""
    if args.method != "gptq":
        return None
    if args.calibration_prompts is not None:
        prompts = [line.strip() for line in args.calibration_prompts.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p]
    else:
        if not 1 <= args.calibration_count <= len(CALIBRATION_PROMPTS):
            raise ValueError(f"--calibration-count must be 1..{len(CALIBRATION_PROMPTS)}, not {args.calibration_count}")
        prompts = CALIBRATION_PROMPTS[:args.calibration_count]
    return CalibrationOptions(prompts, args.calibration_size, args.calibration_steps, args.calibration_seed,
                              args.calibration_memory, guidance=args.calibration_guidance)


def options_from(args) -> QuantizeOptions:
    return QuantizeOptions(args.weights, args.block_size, args.method, quantize_embedding=not args.keep_embedding,
                          accuracy_level=args.accuracy_level, quantize_adaln=args.quantize_adaln,
                          keep=tuple(args.keep), text_encoder_accuracy_level=args.text_encoder_accuracy_level,
                          text_encoder_weights=args.text_encoder_weights,
                          lm_head_weights=args.lm_head_weights, activations=args.activations,
                          calibration=calibration_from(args), gptq_damping=args.gptq_damping)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="an fp32 or fp16 package")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (may be --package: rewritten in place)")
    add_arguments(parser, required=True)
    args = parser.parse_args(argv)
    try:
        options = options_from(args)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        manifest = quantize_package(args.package, args.out, options)
    except (ValueError, OSError) as e:
        # A refused package or option: refusals come before the output folder is touched (the
        # graphs are written to a temporary folder first).
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    for graph, rep in manifest["quantization"]["graphs"].items():
        print(f"{graph}: {rep['quantized']} weights quantized, kept: {', '.join(rep['kept']) or 'none'}")
    if args.int8_vae:
        from zimage_export.vae_int8 import add_int8_decoder_and_report

        add_int8_decoder_and_report(args.out)
    print(f"wrote {args.out / 'manifest.json'}")


if __name__ == "__main__":
    main()
