"""Make the quantized test packages from models/tiny-zimage (torch only for -int4-hqq: ONNX
Runtime's HQQ quantizer uses it):

    python make_quantized_fixtures.py

models/tiny-zimage-int8 and models/tiny-zimage-int4: tiny-zimage with its transformer and text
encoder quantized by quantize_package.py at the defaults (block 32, rtn). Every other file is
a byte-identical copy (git stores it once). The quantization is deterministic: a re-run
rewrites the same bytes. sdk/tests/quantized.rs compares them with tiny-zimage's fp32 goldens
(docs/quantization.md has the measured distances and the tolerances).

models/tiny-zimage-w8a8 and -w8a8x2: tiny-zimage-int8 with the transformer's products taking
int8 activations too (`--activations int8` and `int8x2`, zimage_export/quantize_w8a8.py); their
text encoder is tiny-zimage-int8's, byte for byte. models/tiny-zimage-w8a8x2-gptq: -w8a8x2 with
the transformer's weights rounded by GPTQ (`--method gptq`), calibrated on the 16 built-in
prompts at 64x64, 8 steps (zimage_export/calibration.py, gptq.py): the same format, other codes.
models/tiny-zimage-int4-gptq-te8: -int4 with the transformer's MatMulNBits codes chosen by GPTQ
(zimage_export/matmul_nbits.py) on the same calibration, and an int8 text encoder
(`--text-encoder-weights int8`): -int8's, byte for byte.
models/tiny-zimage-int4-hqq: -int4 with the products rounded by ONNX Runtime's HQQ (`--method
hqq`: float zero points) and the token embedding, which HQQ does not handle, rounded to nearest
in a pass of its own.

tests/golden/w8a8/product_{fp32,w8a8,w8a8x2}.onnx: one [64, 48] product (seeded weights) in
float and rewritten by quantize_w8a8 (one int8 term, two), for sdk/src/runtime/int8_products.rs's
tests of the rewrite itself (its error, zero rows, NaN rows, the exact kernels).

models/tiny-zimage-enhanced-int4: models/tiny-zimage-enhanced (the prompt enhancer's decoder
sharing text_weights.data with the text encoder) quantized the same way, with the decoder's
quantized tied LM head (docs/quantization.md, "The enhancer"); sdk/tests/quantized_enhancer.rs.
tiny-zimage-enhanced was made before the LoRA table existed; its transformer is tiny-zimage's
(same sha256, checked), so tiny-zimage's table names its layers.

models/tiny-zimage-omni-int8 and -omni-w8a8x2-gptq (`--omni-only` writes just these): the
editing package models/tiny-zimage-omni quantized as -int8 and -w8a8x2-gptq are, its Omni
transformer to the transformer's own codes and still reading them from transformer.onnx
(zimage_export/quantize.py, CodeBook); sdk/tests/quantized.rs edits with them against the
fp32 editing goldens.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from zimage_export.calibration import CALIBRATION_PROMPTS, CalibrationOptions
from zimage_export.quantize import QuantizeOptions, quantize_package

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--omni-only", action="store_true", help="write only the quantized editing packages")
    args = parser.parse_args(argv)
    calibration = CalibrationOptions(CALIBRATION_PROMPTS, size=64, steps=8)
    write_omni(args.models, calibration)
    if args.omni_only:
        return
    for weights in ("int8", "int4"):
        out = args.models / f"tiny-zimage-{weights}"
        quantize_package(args.models / "tiny-zimage", out, QuantizeOptions(weights))
        print(f"wrote {out}")
    out = args.models / "tiny-zimage-int4-hqq"
    quantize_package(args.models / "tiny-zimage", out, QuantizeOptions("int4", method="hqq"))
    print(f"wrote {out}")
    for activations, name in (("int8", "w8a8"), ("int8x2", "w8a8x2")):
        out = args.models / f"tiny-zimage-{name}"
        quantize_package(args.models / "tiny-zimage", out, QuantizeOptions("int8", activations=activations))
        print(f"wrote {out}")
    # GPTQ, calibrated on a few small generations of the fp32 tiny model (seconds).
    for name, options in (("w8a8x2-gptq", QuantizeOptions("int8", method="gptq", activations="int8x2",
                                                          calibration=calibration)),
                          ("int4-gptq-te8", QuantizeOptions("int4", method="gptq", text_encoder_weights="int8",
                                                            calibration=calibration))):
        out = args.models / f"tiny-zimage-{name}"
        quantize_package(args.models / "tiny-zimage", out, options)
        print(f"wrote {out}")
    write_w8a8_products(args.models.parent / "tests" / "golden" / "w8a8")
    write_enhanced(args.models, "int4")


def write_omni(models: Path, calibration: CalibrationOptions) -> None:
    for name, options in (("int8", QuantizeOptions("int8")),
                          ("w8a8x2-gptq", QuantizeOptions("int8", method="gptq", activations="int8x2",
                                                          calibration=calibration))):
        out = models / f"tiny-zimage-omni-{name}"
        if out.exists():
            shutil.rmtree(out)
        manifest = quantize_package(models / "tiny-zimage-omni", out, options)
        if not manifest["edit"].get("transformer_weights"):
            raise SystemExit(f"{out}: its Omni transformer shares no weights with the transformer")
        print(f"wrote {out} ({manifest['edit']['transformer_weights']['shared_bytes']} bytes shared)")


def write_w8a8_products(out: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from zimage_export.quantize_w8a8 import quantize_model_w8a8

    k, n = 64, 48
    w = np.random.default_rng(17).standard_normal((k, n)).astype(np.float32) * 0.1
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="product")], "product", [x], [y],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out / "product_fp32.onnx")
    for activations, name in (("int8", "w8a8"), ("int8x2", "w8a8x2")):
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(model)
        quantize_model_w8a8(rewritten, activations=activations)
        onnx.checker.check_model(rewritten)
        onnx.save(rewritten, out / f"product_{name}.onnx")
    print(f"wrote {out}")


def write_enhanced(models: Path, weights: str) -> None:
    plain = json.loads((models / "tiny-zimage" / "manifest.json").read_text())
    out = models / f"tiny-zimage-enhanced-{weights}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tiny-zimage-enhanced"
        shutil.copytree(models / "tiny-zimage-enhanced", src)
        manifest = json.loads((src / "manifest.json").read_text())
        if manifest["graphs"]["transformer"]["sha256"] != plain["graphs"]["transformer"]["sha256"]:
            raise SystemExit("tiny-zimage-enhanced's transformer is not tiny-zimage's: its layers cannot be named")
        manifest["transformer"]["lora_parameters"] = plain["transformer"]["lora_parameters"]
        (src / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        quantize_package(src, out, QuantizeOptions(weights))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
