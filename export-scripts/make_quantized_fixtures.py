"""Make the quantized test packages from models/tiny-zimage (no torch needed):

    python make_quantized_fixtures.py

models/tiny-zimage-int8 and models/tiny-zimage-int4: tiny-zimage with its transformer and text
encoder quantized by quantize_package.py at the defaults (block 32, rtn). Every other file is
a byte-identical copy (git stores it once). The quantization is deterministic: a re-run
rewrites the same bytes. sdk/tests/quantized.rs compares them with tiny-zimage's fp32 goldens
(docs/quantization.md has the measured distances and the tolerances).

models/tiny-zimage-enhanced-int4: models/tiny-zimage-enhanced (the prompt enhancer's decoder
sharing text_weights.data with the text encoder) quantized the same way, with the decoder's
quantized tied LM head (docs/quantization.md, "The enhancer"); sdk/tests/quantized_enhancer.rs.
tiny-zimage-enhanced was made before the LoRA table existed; its transformer is tiny-zimage's
(same sha256, checked), so tiny-zimage's table names its layers.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from zimage_export.quantize import QuantizeOptions, quantize_package

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO / "models")
    args = parser.parse_args(argv)
    for weights in ("int8", "int4"):
        out = args.models / f"tiny-zimage-{weights}"
        quantize_package(args.models / "tiny-zimage", out, QuantizeOptions(weights))
        print(f"wrote {out}")
    write_enhanced(args.models, "int4")


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
