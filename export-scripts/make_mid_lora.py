"""A LoRA for the mid-size benchmark model (`make_fixtures.py --mid-size`): diffusers/PEFT
format, rank 4 on every attention and feed-forward Linear of every block, like the tiny
fixtures' `peft.safetensors`. For timing LoRA switches (`sdk/examples/lora_switch.rs`), not a
golden.

    export-scripts/.venv/bin/python export-scripts/make_mid_lora.py [--out FILE]
"""

import argparse
from pathlib import Path

from zimage_export.fixtures.configs import MID
from zimage_export.fixtures.goldens_lora import _linear_shapes, write_peft

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "models" / "mid-zimage-lora" / "peft.safetensors")
    args = parser.parse_args()
    info = write_peft(MID, _linear_shapes(MID), args.out, seed=7)
    print(f"{args.out}: {info['modules']} modules ({info['format']})")


if __name__ == "__main__":
    main()
