"""A copy of an fp32 package whose transformer products see outlier activation channels, with
the same function (docs/quantization.md, "int8 activations"):

    python outlier_channels.py --package MID_FP32 --out MID_OUTLIERS [--factor 20 --channels 8]

Why: trained transformers have a few activation channels far larger than the rest (LLM.int8,
SmoothQuant); a random-weight model has none, so it cannot show how a quantization copes with
them. Here every quantizable product `y = x W` of the transformer becomes `y = (x * d) (W / d)`,
with `d` `--factor` on `--channels` channels chosen at random per product input (seeded) and 1
elsewhere: the float function is unchanged (the script checks that the rewritten transformer
gives the original's outputs, relative L2 below 1e-5, and refuses otherwise), but the products'
inputs now carry outlier channels. Quantize the copy with quantize_package.py and compare it with
the original float package (`cargo run --release -p zimage --example quant_quality -- FP32 ...`).
The other files are copied unchanged. Needs onnx and onnxruntime.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from zimage_export.manifest import graph_entry
from zimage_export.quantize import (GraphReport, QuantizeOptions, _initializers, save_graphs, sort_products,
                                    transformer_keep, transformer_names)

# Relative L2 between the original and the rewritten transformer above which the rewrite is wrong
# (float rounding of the scaled weights gives about 1e-7).
SAME_FUNCTION = 1e-5


def add_outlier_channels(model, names: dict, factor: float, channels: int, seed: int) -> int:
    """Rewrites `model` in place; returns how many product inputs got outlier channels."""
    from onnx import helper, numpy_helper

    graph = model.graph
    # The products the quantizer would quantize at its defaults (the kept ones are left alone).
    quantized, _ = sort_products(model, dict(names), transformer_keep(QuantizeOptions("int8")), GraphReport())
    inits = _initializers(graph)
    consumers = {}
    for node in quantized:
        consumers.setdefault(node.input[0], []).append(node)
    rng = np.random.default_rng(seed)
    scaled = {}
    for x, nodes in consumers.items():
        k = inits[nodes[0].input[1]].dims[0]
        if channels > k:
            raise ValueError(f"--channels {channels} exceeds a product's {k} input channels")
        d = np.ones(k, np.float32)
        d[rng.choice(k, channels, replace=False)] = factor
        graph.initializer.append(numpy_helper.from_array(d, x + "_outliers"))
        scaled[x] = x + "_with_outliers"
        for node in nodes:
            w = node.input[1]
            inits[w].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[w]) / d[:, None], w))
            node.input[0] = scaled[x]
    def outliers(x: str):  # x * d, right where x is made
        return helper.make_node("Mul", [x, x + "_outliers"], [scaled[x]], name=x + "_outliers")

    graph_inputs = {i.name for i in graph.input}
    nodes = list(graph.node)
    graph.ClearField("node")
    graph.node.extend(outliers(x) for x in scaled if x in graph_inputs)
    for node in nodes:
        graph.node.append(node)
        graph.node.extend(outliers(o) for o in node.output if o in scaled)
    return len(scaled)


def check_same_function(original: Path, rewritten: Path, manifest: dict) -> float:
    """Both transformers on the same seeded inputs: their outputs' relative L2."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    spec = manifest["transformer"]
    rng = np.random.default_rng(0)
    side = 2 * spec["patch_size"]
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in (original, rewritten)]
    width = next(i.shape[-1] for i in sessions[0].get_inputs() if i.name == "cap_feats")
    tokens = spec["sequence_multiple"]
    feeds = {"latents": rng.standard_normal((1, spec["in_channels"], side, side)).astype(np.float32),
             "timestep": np.array([0.5], np.float32),
             "cap_feats": rng.standard_normal((1, tokens, width)).astype(np.float32),
             "cap_mask": np.ones((1, tokens), bool)}
    want, got = (s.run(None, feeds)[0] for s in sessions)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="an fp32 package, not quantized")
    parser.add_argument("--out", type=Path, required=True, help="a new folder")
    parser.add_argument("--factor", type=float, default=20.0, help="how much larger the outlier channels are")
    parser.add_argument("--channels", type=int, default=8, help="outlier channels per product input")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import onnx

    manifest = json.loads((args.package / "manifest.json").read_text())
    if manifest.get("quantization") or manifest.get("precision") != "fp32":
        parser.error(f"{args.package}: want an fp32 package that is not quantized")
    if not args.factor > 0 or args.channels < 1:
        parser.error("--factor must be positive and --channels at least 1")
    if args.out.exists():
        parser.error(f"{args.out} exists")
    path = manifest["graphs"]["transformer"]["path"]
    model = onnx.load(str(args.package / path))
    count = add_outlier_channels(model, transformer_names(manifest), args.factor, args.channels, args.seed)
    args.out.mkdir(parents=True)
    for f in args.package.iterdir():
        if not f.name.startswith(Path(path).stem) and f.name != "manifest.json":
            shutil.copy2(f, args.out / f.name)
    save_graphs({"transformer": model}, args.out, path + ".data")
    err = check_same_function(args.package / path, args.out / path, manifest)
    if not err < SAME_FUNCTION:
        shutil.rmtree(args.out)
        raise SystemExit(f"the rewritten transformer differs from the original by {err:.2e}: not written")
    manifest["graphs"]["transformer"] = graph_entry(args.out, "transformer")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"{count} product inputs with {args.channels} channels x{args.factor:g}; "
          f"the transformer's outputs differ by {err:.2e} (float rounding); wrote {args.out}")


if __name__ == "__main__":
    main()
