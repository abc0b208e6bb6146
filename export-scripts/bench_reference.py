"""Benchmark the reference implementation: diffusers' ZImagePipeline on PyTorch CPU, timed
stage by stage the way `zimage bench` times zimage, with the same report (table or JSON).

    python bench_reference.py --src Z-Image-Turbo --width 512 --height 512 --threads 8 --json > ref.json
    zimage bench --model zimage-turbo --width 512 --height 512 --threads 8 --json > zimage.json
    python bench_reference.py --reference-json ref.json --compare zimage.json

`--compare ZIMAGE_JSON` prints both reports side by side with their ratios, after running the
reference (or, with `--reference-json`, from an earlier run's report). Use the same size,
steps, count, guidance and thread count on both sides; a mismatch is reported.

Stages: tokenize = chat template + tokenizer call; text_encode = text encoder forward;
step i = from the start of step i (the first transformer forward, then the end of the
previous step) to the end of the step callback (transformer + guidance + scheduler update);
vae_decode = `vae.decode`; total = the whole pipeline call including conversion to 8-bit
images. diffusers pads prompts to max_sequence_length (512) before encoding; zimage encodes
only the real tokens: that difference is part of what is measured.
"""

import argparse
import json
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# The default prompt of `zimage bench` (cli/src/bench.rs): both sides encode the same text.
BENCH_PROMPT = "a red fox sitting in fresh snow at sunrise, detailed fur, soft light"
# Folders of a diffusers Z-Image folder that hold weights (the tokenizer holds none).
WEIGHT_FOLDERS = ("text_encoder", "transformer", "vae")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="diffusers-format Z-Image folder (model_index.json, transformer/, ...)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--count", type=int, default=1, help="images per generation")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    ap.add_argument("--runs", type=int, default=3, help="timed runs")
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--prompt", default=BENCH_PROMPT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--compare", type=Path, metavar="ZIMAGE_JSON", help="print this `zimage bench --json` report beside the reference")
    ap.add_argument("--reference-json", type=Path, metavar="REF_JSON", help="use this earlier report instead of running diffusers")
    args = ap.parse_args()
    if args.src is None and args.reference_json is None:
        ap.error("--src is required (or --reference-json with --compare)")
    if args.runs < 1 or args.warmup < 0:
        ap.error("--runs must be at least 1 and --warmup at least 0")
    return args


class StageClock:
    """Accumulates wall time per stage name for the current run."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.totals = {}
        self.open = {}  # stage -> start time of the forward call in progress
        self.step_start = None
        self.steps = []

    @contextmanager
    def measure(self, stage):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - start


class TimedTokenizer:
    """Forwards everything to the tokenizer, timing the two calls the pipeline makes."""

    def __init__(self, inner, clock):
        self._inner = inner
        self._clock = clock

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        with self._clock.measure("tokenize"):
            return self._inner(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        with self._clock.measure("tokenize"):
            return self._inner.apply_chat_template(*args, **kwargs)


def instrument(pipe, clock):
    """Timing wrappers and hooks around the stages; the pipeline code itself is unchanged."""
    # DiffusionPipeline.__setattr__ would re-register a component in its config; the proxy
    # is a measurement detail, so it bypasses that.
    object.__setattr__(pipe, "tokenizer", TimedTokenizer(pipe.tokenizer, clock))

    def forward_timer(module, stage):
        def pre(_module, _args):
            clock.open[stage] = time.perf_counter()
            # Step 1 starts with the first transformer call; later steps at the previous step's end.
            if stage == "transformer" and clock.step_start is None:
                clock.step_start = clock.open[stage]

        def post(_module, _args, _output):
            clock.totals[stage] = clock.totals.get(stage, 0.0) + time.perf_counter() - clock.open.pop(stage)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    forward_timer(pipe.text_encoder, "text_encode")
    forward_timer(pipe.transformer, "transformer")

    decode = pipe.vae.decode

    def timed_decode(*args, **kwargs):
        with clock.measure("vae_decode"):
            return decode(*args, **kwargs)

    pipe.vae.decode = timed_decode


def peak_rss_bytes():
    """VmHWM, as `zimage bench` reads it; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def weight_bytes(src):
    files = [p for folder in WEIGHT_FOLDERS for p in (src / folder).rglob("*") if p.suffix in (".safetensors", ".bin")]
    return sum(p.stat().st_size for p in files)


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_reference(args):
    import diffusers
    import torch
    import transformers
    from diffusers import ZImagePipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rss_before_load = peak_rss_bytes()
    start = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(args.src, dtype=torch.float32)
    pipe.to("cpu")
    load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    rss_after_load = peak_rss_bytes()

    clock = StageClock()
    instrument(pipe, clock)

    def on_step_end(_pipe, _i, _t, callback_kwargs):
        now = time.perf_counter()
        clock.steps.append(now - clock.step_start)
        clock.step_start = now
        return callback_kwargs

    samples = []
    for i in range(args.warmup + args.runs):
        clock.reset()
        generator = torch.Generator("cpu").manual_seed(args.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(
                prompt=args.prompt,
                height=args.height,
                width=args.width,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                num_images_per_prompt=args.count,
                generator=generator,
                callback_on_step_end=on_step_end,
                output_type="pil",
            )
        total = time.perf_counter() - start
        if i >= args.warmup:
            samples.append({
                "tokenize_s": clock.totals.get("tokenize", 0.0),
                "text_encode_s": clock.totals.get("text_encode", 0.0),
                "denoise_steps_s": list(clock.steps),
                "denoise_s": sum(clock.steps),
                "vae_decode_s": clock.totals.get("vae_decode", 0.0),
                "total_s": total,
                "transformer_s": clock.totals.get("transformer", 0.0),
            })
        label = f"warmup {i + 1}/{args.warmup}" if i < args.warmup else f"run {i + 1 - args.warmup}/{args.runs}"
        print(f"{label}: {total:.3f} s", file=sys.stderr)

    steps = min(len(s["denoise_steps_s"]) for s in samples)
    stages = [("tokenize", "tokenize_s"), ("text_encode", "text_encode_s")]
    rows = [dict(summary([s[key] for s in samples]), name=name) for name, key in stages]
    rows += [dict(summary([s["denoise_steps_s"][i] for s in samples]), name=f"step {i + 1}") for i in range(steps)]
    rows += [dict(summary([s[key] for s in samples]), name=name) for name, key in
             [("denoise", "denoise_s"), ("vae_decode", "vae_decode_s"), ("total", "total_s")]]
    return {
        "implementation": "diffusers",
        "version": diffusers.__version__,
        "torch_version": torch.__version__,
        "model": str(args.src),
        "config": {
            "width": args.width, "height": args.height, "steps": args.steps, "count": args.count,
            "warmup": args.warmup, "runs": args.runs, "guidance": args.guidance, "threads": args.threads,
            "threads_used": torch.get_num_threads(), "device": "cpu", "prompt": args.prompt, "seed": args.seed,
        },
        "load_s": load_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_after_load_bytes": rss_after_load,
        "rss_before_load_bytes": rss_before_load,
        "weight_bytes": weight_bytes(args.src),
        "stages": rows,
        "images_per_s": summary([args.count / s["total_s"] for s in samples]),
        "runs": samples,
    }


def duration(seconds):
    """Milliseconds below a second, seconds above (as `zimage bench`)."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f} ms" if seconds < 1.0 else f"{seconds:.3f} s"


def mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def table(r):
    """The `zimage bench` table, from a report of either implementation."""
    c = r["config"]
    threads = "default" if c.get("threads") is None else c["threads"]
    out = [
        f"{r['implementation']} {r['version']}: {r['model']}",
        f"{c['width']}x{c['height']}, {c['steps']} steps, {c['count']} image(s), guidance {float(c['guidance']):.1f}, "
        f"{c['runs']} runs after {c['warmup']} warmup, device {c['device']}, threads {threads}",
        "",
        f"{'stage':<16}{'median':>14}{'min':>14}{'max':>14}",
    ]
    for row in r["stages"]:
        out.append(f"{row['name']:<16}{duration(row['median']):>14}{duration(row['min']):>14}{duration(row['max']):>14}")
    ips = r["images_per_s"]
    out.append(f"{'images/s':<16}{ips['median']:>14.3f}{ips['min']:>14.3f}{ips['max']:>14.3f}")
    out.append("")
    ratio = r.get("total_over_onnx_runtime")
    if ratio:
        out.append(f"total / ONNX Runtime time: {ratio['median']:.4f} (min {ratio['min']:.4f}, max {ratio['max']:.4f})")
    out.append(f"load (session creation): {duration(r['load_s'])}")
    peak, weights = r.get("peak_rss_bytes"), r.get("weight_bytes")
    share = f"{peak / weights:.2f}" if peak and weights else "n/a"
    # Python's baseline (interpreter + torch import) is part of the reference's peak.
    before = f", before load {mib(r['rss_before_load_bytes'])}" if r.get("rss_before_load_bytes") else ""
    out.append(f"peak RSS: {mib(peak)} (after load {mib(r.get('peak_rss_after_load_bytes'))}{before}); "
               f"weights {mib(weights)}; peak RSS / weights {share}")
    return "\n".join(out) + "\n"


def compare(ref, zim):
    """Both reports side by side. ratio > 1 means zimage is faster (or smaller)."""
    keys = ("width", "height", "steps", "count", "guidance", "threads", "prompt")
    mismatched = [k for k in keys if ref["config"].get(k) != zim["config"].get(k)]
    out = []
    if mismatched:
        out.append("warning: the runs differ in " + ", ".join(
            f"{k} ({ref['config'].get(k)!r} vs {zim['config'].get(k)!r})" for k in mismatched))
    c = zim["config"]
    out.append(f"{c['width']}x{c['height']}, {c['steps']} steps, {c['count']} image(s); medians over "
               f"{ref['config']['runs']} (diffusers) and {c['runs']} (zimage) runs")
    out.append(f"diffusers {ref['version']}: {ref['model']}")
    out.append(f"zimage {zim['version']}: {zim['model']}")
    out.append("")
    out.append(f"{'stage':<16}{'diffusers':>14}{'zimage':>14}{'ratio':>10}")

    def row(name, a, b, text, better_when_lower=True):
        ratio = "-"
        if a and b:
            ratio = f"{(a / b if better_when_lower else b / a):.2f}x"
        out.append(f"{name:<16}{text(a):>14}{text(b):>14}{ratio:>10}")

    zstages = {s["name"]: s for s in zim["stages"]}
    for s in ref["stages"]:
        z = zstages.get(s["name"])
        row(s["name"], s["median"], z["median"] if z else None, duration)
    row("images/s", ref["images_per_s"]["median"], zim["images_per_s"]["median"],
        lambda v: "-" if v is None else f"{v:.3f}", better_when_lower=False)
    row("load", ref["load_s"], zim["load_s"], duration)
    row("peak RSS", ref.get("peak_rss_bytes"), zim.get("peak_rss_bytes"), mib)
    out.append("")
    out.append("ratio = diffusers / zimage (images/s: zimage / diffusers): above 1, zimage is faster or smaller")
    return "\n".join(out) + "\n"


def main():
    args = parse_args()
    if args.reference_json:
        report = json.loads(args.reference_json.read_text())
    else:
        report = run_reference(args)
    if args.compare:
        print(compare(report, json.loads(args.compare.read_text())), end="")
    elif args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report), end="")


if __name__ == "__main__":
    main()
