"""An int8 VAE decoder for fast CPU decoding (docs/quantization.md, "int8 VAE decoder").

On the CPU the VAE decode is half of a generation (mid-size model at 512x512: 11.5 s of the
int8 package's 22.8 s), and 77 % of it is convolutions already running near the cores' float
peak. ONNX Runtime's `QLinearConv` computes them in int8 (AVX-512 VNNI / AVX2 kernels), 2.5x
faster, at a cost in image quality. So a package can carry a second decoder,
`vae_decoder_int8`, that the runtime uses instead of `vae_decoder` only when asked
(`LoadOptions::int8_vae`, `--int8-vae`); the default decoder stays the exact one.

What is quantized (static QDQ, ONNX Runtime's quantizer):
- the convolutions of every up block after the first, i.e. all the decoder's convolutions at
  128x128 latent-pixels and more, where 89 % of the arithmetic is; `conv_in`, the mid block,
  the first (lowest-resolution) up block and `conv_out` stay in float: they cost little and
  each adds as much error as a quantized block (measured on the mid-size decoder);
- weights int8 per output channel, activations uint8 per tensor (the x86 int8 kernels take
  unsigned activations and signed weights; int8 activations fall back to a slow path); the
  weights use 7 bits (`reduce_range`): x86 CPUs without VNNI multiply uint8 by int8 with
  `vpmaddubsw`, which saturates a pair of full-range products at 16 bits and would give wrong
  pixels there; 7-bit weights cannot reach it (255 x 64 x 2 < 32768). Measured cost: 47.4 ->
  47.0 dB mean PSNR on the toy, none on the mid-size decoder; same speed with VNNI. (ONNX
  Runtime's other remedy, `session.x64quantprecision`, made the decode as slow as float here);
- activation ranges from calibration: the package's own VAE encoder's latent means of a fixed
  set of synthetic pictures (gradients, shapes, noise textures, stripes), which are the
  latents a trained decoder is made for, plus two latents of Gaussian noise as the denoising
  loop starts them (N(0, 1) / scaling_factor + shift_factor), at the 99.999th percentile
  (min/max ranges gave 27 % more error on the mid-size decoder).

The result is checked against the float decoder on the calibration latents (finite, relative
L2 recorded in the manifest entry's `int8` record). Needs onnx, onnxruntime and numpy.

    python -m zimage_export.vae_int8 --package PACKAGE
"""

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .manifest import graph_entry, graph_files, write_manifest

GRAPH = "vae_decoder_int8"
# Convolutions quantized: those of the up blocks after the first (by weight name).
QUANTIZED_CONV = re.compile(r"^decoder\.up_blocks\.([1-9][0-9]*)\.")
CALIBRATION_PICTURES = 4
CALIBRATION_LATENT_SIDE = 32
GAUSSIAN_LATENTS = 2
PERCENTILE = 99.999
REDUCE_RANGE = True
# A decoder this far from the float one is broken, not merely quantized.
MAX_REL_L2 = 0.5


def calibration_pictures(side: int, count: int = CALIBRATION_PICTURES):
    """`count` deterministic synthetic pictures in [-1, 1], [count, 3, side, side]."""
    import numpy as np

    rng = np.random.default_rng(20261201)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    pictures = []
    for i in range(count):
        kind = i % 4
        if kind == 0:  # colour gradient with discs
            img = np.stack([x, y, 1 - x * y], 0) * rng.uniform(0.5, 1, (3, 1, 1))
            for _ in range(4):
                cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25)
                mask = (y - cy) ** 2 + (x - cx) ** 2 < r * r
                img[:, mask] = rng.uniform(0, 1, (3, 1))
        elif kind == 1:  # rectangles on a noisy background
            img = np.broadcast_to(rng.uniform(0, 1, (3, 1, 1)), (3, side, side)).copy()
            img += rng.normal(0, 0.05, img.shape)
            for _ in range(6):
                y0, x0 = rng.integers(0, side - 8, 2)
                h, w = rng.integers(4, side // 2, 2)
                img[:, y0:y0 + h, x0:x0 + w] = rng.uniform(0, 1, (3, 1, 1))
        elif kind == 2:  # smooth multi-scale noise texture
            img = np.zeros((3, side, side), np.float32)
            for octave in (4, 8, 16, 32):
                coarse = rng.uniform(0, 1, (3, octave, octave))
                img += np.kron(coarse, np.ones((side // octave, side // octave))) / 4
        else:  # stripes and checkers of several frequencies (edges, text-like detail)
            f = rng.integers(4, 24, 3)
            img = np.stack([(np.sin(2 * np.pi * f[0] * x) > 0), (np.sin(2 * np.pi * f[1] * y) > 0),
                            ((np.floor(x * f[2]) + np.floor(y * f[2])) % 2 == 0)], 0).astype(np.float32)
        pictures.append(np.clip(img, 0, 1) * 2 - 1)
    return np.stack(pictures).astype(np.float32)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def calibration_latents(package: Path, manifest: dict):
    """The package's VAE encoder's latent means of the calibration pictures, then Gaussian
    latents as the denoising loop starts them, in the decoder's input space (the runtime divides
    the loop's latents by scaling_factor and adds shift_factor before decoding)."""
    import numpy as np

    vae = manifest["vae"]
    side = CALIBRATION_LATENT_SIDE * vae["scale_factor"]
    encoder = _session(package / manifest["graphs"]["vae_encoder"]["path"])
    encoded = [encoder.run(None, {"image": p[None]})[0] for p in calibration_pictures(side)]
    rng = np.random.default_rng(20261202)
    shape = (1, vae["latent_channels"], CALIBRATION_LATENT_SIDE, CALIBRATION_LATENT_SIDE)
    noise = [(rng.standard_normal(shape) / vae["scaling_factor"] + vae["shift_factor"]).astype(np.float32)
             for _ in range(GAUSSIAN_LATENTS)]
    return encoded + noise


def quantized_conv_nodes(model) -> tuple[list[str], list[str]]:
    """(node names to quantize, weight names of the convolutions kept in float)."""
    quantized, kept = [], []
    for node in model.graph.node:
        if node.op_type == "Conv":
            if QUANTIZED_CONV.match(node.input[1]):
                quantized.append(node.name)
            else:
                kept.append(node.input[1])
    return quantized, kept


def add_int8_decoder(package: Path) -> dict:
    """Writes `vae_decoder_int8.onnx` (+ `.data` when the decoder has external data) into
    `package` from its `vae_decoder` and adds it to manifest.json (rewritten last, through a
    temporary file). Returns the manifest."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    manifest = json.loads((package / "manifest.json").read_text())
    source_entry = manifest["graphs"]["vae_decoder"]
    latents = calibration_latents(package, manifest)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"latents": z} for z in latents])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory(dir=package) as tmp:
        tmp = Path(tmp)
        # The quantizer's onnx loader refuses external data files with several hard links
        # (packages made with linked copies have them): quantize a private copy.
        for f in graph_files(source_entry):
            shutil.copyfile(package / f["path"], tmp / f["path"])
        source = tmp / source_entry["path"]
        model = onnx.load(str(source), load_external_data=False)
        nodes, kept = quantized_conv_nodes(model)
        if not nodes:
            raise RuntimeError("vae_decoder: no convolution of an up block after the first to quantize")
        if not all(nodes):
            raise RuntimeError("vae_decoder: a convolution to quantize has no node name (the quantizer selects by name)")
        weights = {t.name: t.data_type for t in model.graph.initializer}
        selected = set(nodes)
        conv_weights = [n.input[1] for n in model.graph.node if n.name in selected]
        if any(weights.get(w) != onnx.TensorProto.FLOAT for w in conv_weights):
            raise RuntimeError("vae_decoder: the int8 decoder is made from a float32 VAE (the CPU's); this "
                               "package's convolution weights are not all float32 initializers")
        out = tmp / "out" / f"{GRAPH}.onnx"
        out.parent.mkdir()
        external = source_entry.get("external_data") is not None
        quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["Conv"], nodes_to_quantize=nodes,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": PERCENTILE},
                        reduce_range=REDUCE_RANGE, use_external_data_format=external)
        written = sorted(p.name for p in out.parent.iterdir())
        expected = sorted([out.name] + ([f"{out.name}.data"] if external else []))
        if written != expected:
            raise RuntimeError(f"the quantizer wrote {written}, expected {expected}")
        float_decoder, int8_decoder = _session(source), _session(out)
        errors = []
        for z in latents:
            want = float_decoder.run(None, {"latents": z})[0]
            got = int8_decoder.run(None, {"latents": z})[0]
            if not np.isfinite(got).all():
                raise RuntimeError("vae_decoder_int8 gives non-finite pixels on the calibration latents")
            errors.append(float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)))
        if max(errors) > MAX_REL_L2:
            raise RuntimeError(f"vae_decoder_int8 is {max(errors):.3g} (relative L2) from the float decoder: broken")
        old = manifest["graphs"].get(GRAPH)
        for f in out.parent.iterdir():
            os.replace(f, package / f.name)
        # A rewrite without external data leaves no stale data file of the previous one behind.
        for f in graph_files(old or {}):
            if f["path"] not in expected:
                (package / f["path"]).unlink(missing_ok=True)
    entry = graph_entry(package, GRAPH)
    entry["int8"] = {
        "quantized_convolutions": len(nodes),
        "kept_float": kept,
        "weights": "int8, per output channel",
        "weights_range": "7 bits (reduce_range)" if REDUCE_RANGE else "8 bits",
        "activations": "uint8, per tensor",
        "calibration": f"vae_encoder latent means of {CALIBRATION_PICTURES} synthetic pictures and "
                       f"{GAUSSIAN_LATENTS} Gaussian latents, {CALIBRATION_LATENT_SIDE}x{CALIBRATION_LATENT_SIDE}, "
                       f"percentile {PERCENTILE}",
        "calibration_rel_l2": max(errors),
        "onnxruntime": ort.__version__,
    }
    manifest["graphs"][GRAPH] = entry
    write_manifest(package, manifest)
    return manifest


def add_int8_decoder_and_report(package: Path) -> dict:
    """`add_int8_decoder`, then one line about what it did."""
    manifest = add_int8_decoder(package)
    info = manifest["graphs"][GRAPH]["int8"]
    print(f"{GRAPH}: {info['quantized_convolutions']} convolutions in int8, {len(info['kept_float'])} kept in float; "
          f"relative L2 {info['calibration_rel_l2']:.3e} from the float decoder on the calibration latents")
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="add vae_decoder_int8 to this package")
    args = parser.parse_args(argv)
    add_int8_decoder_and_report(args.package)


if __name__ == "__main__":
    main()
