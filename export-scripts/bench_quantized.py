"""CPU benchmark of quantized packages against the float package and diffusers, back to back in
one run, printed as one table (docs/quantization.md):

    python export-scripts/bench_quantized.py --zimage target/release/zimage --src MID_SRC \\
        --package fp32=MID_PKG --package int8=MID_PKG_INT8 [--package int4=...] \\
        [--width 512 --height 512 --steps 8 --threads 2 --warmup 1 --runs 2 --repeat 1 --winograd-vae] \\
        [--package int8-tiled=MID_PKG_INT8 --flags "int8-tiled=--vae-tiling 288:32"]

Runs `zimage bench --json` on each package and `bench_reference.py` (diffusers, in this
Python) on --src, in that order, --repeat times (ABAB..., so that load drifts hit every side),
and prints per side the medians over all its runs: load (session creation / from_pretrained),
text encode, the median denoising step, VAE decode, total, peak RSS and RSS / weights, with
ratios against diffusers and each package's step speed-up over the first (float) package. The
machine's load average is printed before and after: timings on a busy machine are noisy.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stage(report, name):
    return next(r["median"] for r in report["stages"] if r["name"] == name)


def step_median(report):
    steps = [r["median"] for r in report["stages"] if r["name"].startswith("step ")]
    return statistics.median(steps)


def run_json(cmd):
    print("$ " + " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zimage", type=Path, required=True, help="the zimage command (target/release/zimage)")
    ap.add_argument("--src", type=Path, required=True, help="the diffusers folder the packages were exported from")
    ap.add_argument("--package", action="append", required=True, metavar="LABEL=DIR",
                    help="a package to time (first: the float one the others are compared with)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all sides, back to back")
    ap.add_argument("--winograd-vae", action="store_true", help="zimage decodes with vae_decoder_cpu")
    ap.add_argument("--no-reference", action="store_true", help="skip diffusers")
    ap.add_argument("--flags", action="append", default=[], metavar="LABEL=FLAGS",
                    help="more `zimage bench` flags for one package's side (e.g. a memory setting)")
    args = ap.parse_args(argv)
    packages = [p.split("=", 1) for p in args.package]
    flags = {label: shlex.split(rest) for label, rest in (f.split("=", 1) for f in args.flags)}
    unknown = set(flags) - {label for label, _ in packages}
    if unknown:
        ap.error(f"--flags for sides that are not packages: {sorted(unknown)}")
    common = ["--width", str(args.width), "--height", str(args.height), "--steps", str(args.steps),
              "--threads", str(args.threads), "--warmup", str(args.warmup), "--runs", str(args.runs), "--json"]
    load_before = os.getloadavg()
    reports = {label: [] for label, _ in packages}
    reports["diffusers"] = []
    for _ in range(args.repeat):
        for label, pkg in packages:
            extra = (["--winograd-vae"] if args.winograd_vae else []) + flags.get(label, [])
            reports[label].append(run_json([str(args.zimage), "bench", "--model", pkg, *common, *extra]))
        if not args.no_reference:
            reports["diffusers"].append(run_json([sys.executable, str(HERE / "bench_reference.py"), "--src", str(args.src), *common]))
    load_after = os.getloadavg()

    def med(label, f):
        return statistics.median(f(r) for r in reports[label])

    sides = [label for label, _ in packages] + ([] if args.no_reference else ["diffusers"])
    rows = [
        ("load (sessions / from_pretrained)", lambda r: r["load_s"], "s"),
        ("text encode", lambda r: stage(r, "text_encode"), "s"),
        ("denoising step (median)", step_median, "s"),
        ("VAE decode", lambda r: stage(r, "vae_decode"), "s"),
        ("total", lambda r: stage(r, "total"), "s"),
        ("peak RSS", lambda r: r["peak_rss_bytes"] / 2**20, "MiB"),
        ("peak RSS / weights", lambda r: r["peak_rss_bytes"] / r["weight_bytes"], "x"),
    ]
    print(f"{args.width}x{args.height}, {args.steps} steps, {args.threads} threads, {args.runs} runs after "
          f"{args.warmup} warmup, x{args.repeat} rounds{', zimage --winograd-vae' if args.winograd_vae else ''}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (medians over all runs)")
    print("| | " + " | ".join(sides) + " |")
    print("|---|" + "---|" * len(sides))
    for name, f, unit in rows:
        cells = []
        for side in sides:
            value = med(side, f)
            text = f"{value:.3g} {unit}" if unit != "MiB" else f"{value:.0f} MiB"
            if side != "diffusers" and not args.no_reference and unit == "s":
                text += f" ({med('diffusers', f) / value:.2f}x)"
            cells.append(text)
        print(f"| {name} | " + " | ".join(cells) + " |")
    base = packages[0][0]
    for label, _ in packages[1:]:
        print(f"transformer step {label} vs {base}: {med(base, step_median) / med(label, step_median):.2f}x faster; "
              f"weights {med(label, lambda r: r['weight_bytes']) / 2**20:.0f} MiB vs {med(base, lambda r: r['weight_bytes']) / 2**20:.0f} MiB")
    if not args.no_reference:
        print("(x) = diffusers' time / this side's time: above 1 is faster than diffusers")


if __name__ == "__main__":
    main()
