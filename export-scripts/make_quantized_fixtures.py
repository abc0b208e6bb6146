"""Make the quantized test packages from models/tiny-zimage (no torch needed):

    python make_quantized_fixtures.py

models/tiny-zimage-int8 and models/tiny-zimage-int4: tiny-zimage with its transformer and text
encoder quantized by quantize_package.py at the defaults (block 32, rtn). Every other file is
a byte-identical copy (git stores it once). The quantization is deterministic: a re-run
rewrites the same bytes. sdk/tests/quantized.rs compares them with tiny-zimage's fp32 goldens
(docs/quantization.md has the measured distances and the tolerances).
"""

import argparse
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


if __name__ == "__main__":
    main()
