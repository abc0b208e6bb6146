"""Which layers does quantization hurt? One forward of a float package's transformer (and one
pass of its text encoder) against its quantized versions, each keeping one group of layers in
float, on your own weights:

    python quant_sensitivity.py --package zimage-turbo-fp32 --weights int8
    python quant_sensitivity.py --package P --weights int4 --group "first layer=layers.0.*" --group "w2=*.feed_forward.w2.*"
    python quant_sensitivity.py --package P --weights int8 --activations int8   # the int8-activation transformer
    python quant_sensitivity.py --package P --weights int8 --activations int8x2 --method gptq   # calibrated once
    python quant_sensitivity.py --package P --weights int4 --method gptq --text-encoder-weights int8

For each group the transformer is quantized as `quantize_package.py` would (same options, same
kept layers) plus the group kept in float, and run on the same inputs: the package's own text
encoder's features for a few prompts, seeded noise latents at three timesteps. It prints the
relative L2 distance of the transformer's outputs from the float ones, and the weights the
group holds. Then the text encoder: its features' distance with int8 compute
(accuracy_level 4), float compute (0), and the token embedding kept.

A single forward is a quick, rough guide: what decides is the final latents of whole
generations (`cargo run --release -p zimage --example quant_quality`, docs/quantization.md).
On the mid-size random-weight model a group's single-forward effect over-stated its effect on
the final latents (keeping the noise refiner cut the int8 forward error by 29 % and the
int4 one by 34 %, the final latents' by 8-9 %).

Needs onnx, onnxruntime and tokenizers (no torch). Quantizing one variant holds the
transformer's weights twice in memory.
"""

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from quantize_package import add_arguments as add_quantize_arguments, options_from
from zimage_export.calibration import cpu_session, gptq_codes, pad_caption
from zimage_export.quantize import (
    check_keep_patterns,
    gptq_rounding,
    matches_any,
    quantize_model,
    quantize_transformer,
    tensor_bytes,
    transformer_names,
)

PROMPTS = (
    "a red fox sitting in fresh snow at dawn, soft light",
    "一只橘猫趴在窗台上晒太阳，窗外是上海的老弄堂",
    'a neon sign that reads "OPEN 24H" above a rainy street at night',
)
# Timesteps as the transformer takes them (1 - sigma): early, middle and late in a generation.
TIMESTEPS = (0.05, 0.5, 0.9)
# Groups of the Z-Image transformer by diffusers parameter name.
DEFAULT_GROUPS = {
    "noise refiner": ("noise_refiner.*",),
    "context refiner": ("context_refiner.*",),
    "first main layer": ("layers.0.*",),
    "attention q/k/v": ("*.attention.to_q.*", "*.attention.to_k.*", "*.attention.to_v.*"),
    "attention out": ("*.attention.to_out.*",),
    "feed-forward w1/w3": ("*.feed_forward.w1.*", "*.feed_forward.w3.*"),
    "feed-forward w2": ("*.feed_forward.w2.*",),
}


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="an fp32 or fp16 package")
    parser.add_argument("--size", type=int, default=256, help="image side of the latents (pixels)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group", action="append", default=[], metavar="NAME=PATTERN[,PATTERN]",
                        help="a group of transformer weights to try keeping (replaces the default groups)")
    add_quantize_arguments(parser, required=True)
    args = parser.parse_args(argv)
    import onnx
    from tokenizers import Tokenizer

    options = options_from(args)
    groups = DEFAULT_GROUPS
    if args.group:
        groups = {}
        for g in args.group:
            name, sep, patterns = g.partition("=")
            if not sep or not patterns:
                parser.error(f"--group {g!r}: want NAME=PATTERN[,PATTERN]")
            groups[name] = tuple(patterns.split(","))
    manifest = json.loads((args.package / "manifest.json").read_text())
    if manifest.get("quantization"):
        parser.error(f"{args.package} is already quantized")
    names = transformer_names(manifest)
    for patterns in groups.values():
        check_keep_patterns(patterns, names.values())
    graphs = manifest["graphs"]
    text = manifest["text_encoder"]
    scale = manifest["vae"]["scale_factor"]
    multiple = manifest["transformer"]["sequence_multiple"]

    # Inputs: the float text encoder's features of each prompt, padded as the runtime pads them.
    tokenizer = Tokenizer.from_file(str(args.package / manifest["tokenizer"]["path"]))
    ids = [np.array([tokenizer.encode(text["prompt_template"].format(prompt=p)).ids], np.int64) for p in PROMPTS]
    encoder_path = str(args.package / graphs["text_encoder"]["path"])
    encoder = cpu_session(encoder_path, args.threads)
    features = [encoder.run(None, {"input_ids": i, "attention_mask": np.ones_like(i)})[0] for i in ids]
    del encoder
    step = scale * manifest["transformer"]["patch_size"]
    if args.size < step or args.size % step:
        parser.error(f"--size must be a positive multiple of {step}")
    side = args.size // scale
    rng = np.random.default_rng(0)
    inputs = []
    for f in features:
        cap, mask = pad_caption(f, multiple)
        noise = rng.standard_normal((1, manifest["transformer"]["in_channels"], side, side)).astype(np.float32)
        for t in TIMESTEPS:
            inputs.append({"latents": noise * np.float32(1 - t), "timestep": np.array([t], np.float32),
                           "cap_feats": cap, "cap_mask": mask})

    def forward(model) -> np.ndarray:
        s = cpu_session(model, args.threads)
        return np.concatenate([s.run(None, x)[0].ravel() for x in inputs])

    transformer_path = args.package / graphs["transformer"]["path"]
    reference = forward(str(transformer_path))
    base = onnx.load(str(transformer_path))
    init_bytes = {t.name: len(tensor_bytes(t)) for t in base.graph.initializer}
    activations = f", {options.activations} activations" if options.activations else ""
    print(f"{args.package}: {options.weights}, block {options.block_size}, {options.method}{activations}; "
          f"{len(inputs)} forwards at {args.size}x{args.size}")
    print("| transformer, kept in float | forward rel L2 | the group's float weights | seconds |")
    print("|---|---|---|---|")
    # gptq: calibrated once, on the defaults' products (the largest set); each group reuses the codes.
    calibrated = {}

    def calibrate(model, products):
        if not calibrated:
            calibrated["codes"], calibrated["summary"] = gptq_codes(
                model, products, args.package, manifest, options.calibration, options.gptq_damping,
                rounding=gptq_rounding(options))
        codes = calibrated["codes"]
        return {n.input[1]: codes[n.input[1]] for n in products if n.input[1] in codes}, calibrated["summary"]

    for name, patterns in {"(defaults only)": (), **groups}.items():
        t0 = time.time()
        model = copy.deepcopy(base)
        group_options = replace(options, keep=(*options.keep, *patterns))
        quantize_transformer(model, group_options, dict(names), calibrate=calibrate)
        err = rel_l2(forward(model.SerializeToString()), reference)
        held = sum(n for init, n in init_bytes.items() if matches_any(names.get(init, ""), patterns))
        print(f"| {name} | {err:.3e} | {held / 2**20:.1f} MiB | {time.time() - t0:.0f} |", flush=True)
        del model

    # The text encoder (at its own width): int8 compute, float compute, embedding kept.
    encoder = onnx.load(encoder_path)
    options = replace(options, weights=options.text_encoder_weights, method=options.weight_only_method,
                      activations=None)
    print("| text encoder | features rel L2 (worst prompt) |")
    print("|---|---|")
    for name, variant in {
        "accuracy_level 4 (int8 compute)": replace(options, accuracy_level=4),
        "accuracy_level 0 (float compute)": replace(options, accuracy_level=0),
        "accuracy_level 0, embedding kept": replace(options, accuracy_level=0, quantize_embedding=False),
    }.items():
        model = copy.deepcopy(encoder)
        try:
            quantize_model(model, variant, token_embedding=True)
        except ValueError as e:  # hqq cannot quantize the embedding
            print(f"| {name} | not made: {e} |")
            continue
        s = cpu_session(model.SerializeToString(), args.threads)
        worst = max(rel_l2(s.run(None, {"input_ids": i, "attention_mask": np.ones_like(i)})[0], f)
                    for i, f in zip(ids, features))
        print(f"| {name} | {worst:.3e} |", flush=True)


if __name__ == "__main__":
    main()
