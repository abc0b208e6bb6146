"""How long GPTQ's rounding takes per weight at the real transformer's shapes (3840 wide,
feed-forward 10240), to size a real model's `--method gptq` run without its weights: random
weights and a positive-definite H of the right size (the time does not depend on the values).

    python bench_gptq_rounding.py [--bits 4 8] [--width 3840] [--hidden 10240]

Prints one line per shape and format; docs/quantization.md ("GPTQ", "Making it") has the
numbers and the real model's total.
"""

import argparse
import time

import numpy as np

from zimage_export.gptq import gptq_per_channel
from zimage_export.matmul_nbits import gptq_matmul_nbits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=3840)
    parser.add_argument("--hidden", type=int, default=10240)
    parser.add_argument("--bits", type=int, nargs="+", choices=(4, 8), default=(4, 8))
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    shapes = ((args.width, args.width, "attention q/k/v/out"), (args.width, args.hidden, "feed-forward w1/w3"),
              (args.hidden, args.width, "feed-forward w2"))
    for k, n, what in shapes:
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        x = rng.standard_normal((k + 256, k)).astype(np.float32)
        h = (x.T @ x).astype(np.float64)
        del x
        for bits in args.bits:
            start = time.perf_counter()
            gptq_matmul_nbits(w, h, bits, args.block_size)
            print(f"{what} [{k}, {n}], int{bits} blocks of {args.block_size} (weight-only): "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        gptq_per_channel(w, h)
        print(f"{what} [{k}, {n}], int8 per channel (int8 activations): {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
