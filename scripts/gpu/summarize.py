"""One report of a GPU check: zimage's `bench --json` reports and side_by_side.py's PyTorch
reports, side by side, as summary.json and summary.md.

    python3 scripts/gpu/summarize.py --out-dir $OUT --torch $OUT/torch-rw.json \\
        --zimage rw-fp16=$OUT/bench-rw-fp16.json --zimage rw-fp16-nograph=$OUT/bench-rw-nograph.json ...

For each zimage run: the median step (steps 2.., over all timed runs), the end-to-end time of a
generation (`total_s`: tokenize, text encoding, steps, VAE decode), the VAE decode, peak device
memory, the loop's host traffic per step and why CUDA graphs were not used, if they were not.
For each PyTorch run: the same quantities from side_by_side.py. `--pair ZIMAGE_LABEL=CONFIG`
names which PyTorch config a zimage run is compared with (the ratio is diffusers' best step
over zimage's: above 1 means zimage is faster). Missing or failed inputs are reported, never
filled in.
"""

import argparse
import json
import statistics
from pathlib import Path


def zimage_row(label: str, path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return dict(label=label, error=f"{path}: {e}")
    runs = d.get("runs") or []
    if not runs:
        return dict(label=label, error=f"{path}: no timed runs")
    steps = [s for r in runs for s in (r["denoise_steps_s"][1:] or r["denoise_steps_s"])]
    traffic = [r.get("host_traffic") for r in runs]
    return dict(
        label=label,
        device=d.get("providers", {}).get("transformer"),
        step_s=statistics.median(steps),
        first_step_s=statistics.median(r["denoise_steps_s"][0] for r in runs),
        end_to_end_s=statistics.median(r["total_s"] for r in runs),
        text_encode_s=statistics.median(r["text_encode_s"] for r in runs),
        vae_decode_s=statistics.median(r["vae_decode_s"] for r in runs),
        load_s=d.get("load_s"),
        peak_device_memory=d.get("peak_device_memory"),
        host_bytes_per_step=None if None in traffic else max(t["max_step_bytes"] for t in traffic),
        cuda_graph_fallback=d.get("cuda_graph_fallback"),
        width=d.get("config", {}).get("width"),
        height=d.get("config", {}).get("height"),
        steps=d.get("config", {}).get("steps"),
    )


def torch_rows(path: Path) -> tuple[list[dict], list[str]]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [], [f"{path}: {e}"]
    rows = [{k: v for k, v in r.items() if k != "runs"} for r in d.get("results", [])]
    for r in rows:
        r.update(torch=d.get("torch"), diffusers=d.get("diffusers"), transformers=d.get("transformers"))
    return rows, [f"{path}: {e}" for e in d.get("errors", [])]


def gib(v) -> str:
    return "n/a" if v is None else f"{v / 2**30:.2f} GiB"


def ms(v) -> str:
    return "n/a" if v is None else f"{v * 1e3:.1f} ms"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--torch", type=Path, action="append", default=[])
    ap.add_argument("--zimage", action="append", default=[], metavar="LABEL=FILE")
    ap.add_argument("--pair", action="append", default=[], metavar="ZIMAGE_LABEL=CONFIG")
    ap.add_argument("--note", action="append", default=[], help="a line for the report (card, driver, versions)")
    args = ap.parse_args(argv)
    errors: list[str] = []
    zimage = []
    for item in args.zimage:
        label, sep, path = item.partition("=")
        if not sep:
            ap.error(f"--zimage {item!r}: expected LABEL=FILE")
        row = zimage_row(label, Path(path))
        (errors.append(row["error"]) if "error" in row else zimage.append(row))
    torch_all = []
    for path in args.torch:
        rows, errs = torch_rows(path)
        torch_all += rows
        errors += errs
    comparisons = []
    for item in args.pair:
        label, sep, config = item.partition("=")
        if not sep:
            ap.error(f"--pair {item!r}: expected ZIMAGE_LABEL=CONFIG")
        z = next((r for r in zimage if r["label"] == label), None)
        t = [r for r in torch_all if r["config"] == config]
        if z is None or not t:
            errors.append(f"pair {item}: {'no zimage run ' + label if z is None else 'no PyTorch run of ' + config}")
            continue
        best = min(t, key=lambda r: r["step_s"])
        comparisons.append(dict(
            zimage=label, torch_config=config, torch_best_precision=best["precision"],
            zimage_step_s=z["step_s"], torch_best_step_s=best["step_s"],
            speedup_step=best["step_s"] / z["step_s"],
            zimage_end_to_end_s=z["end_to_end_s"], torch_best_end_to_end_s=min(r["end_to_end_s"] for r in t),
            zimage_achieved_tflops=best["transformer_flops_per_step"] / z["step_s"] / 1e12,
            torch_best_achieved_tflops=best["achieved_tflops"],
            measured_matmul_tflops=best.get("measured_matmul_tflops"), datasheet_tflops=best.get("datasheet_tflops"),
        ))
    summary = dict(notes=args.note, zimage=zimage, torch=torch_all, comparisons=comparisons, errors=errors)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))

    lines = ["# GPU check", ""] + [f"- {n}" for n in args.note] + [""]
    lines += ["## zimage", "", "| run | step | first step | end to end | VAE decode | peak device memory | host bytes/step | CUDA graphs |",
              "|---|---|---|---|---|---|---|---|"]
    for r in zimage:
        graphs = "replayed" if r["cuda_graph_fallback"] is None else r["cuda_graph_fallback"].replace("|", "/")
        lines.append(f"| {r['label']} | {ms(r['step_s'])} | {ms(r['first_step_s'])} | {r['end_to_end_s']:.3f} s | "
                     f"{ms(r['vae_decode_s'])} | {gib(r['peak_device_memory'])} | {r['host_bytes_per_step']} | {graphs} |")
    lines += ["", "## diffusers (PyTorch, SDPA)", "",
              "| config | precision | step | end to end | VAE decode | peak memory | TFLOP/s (step) |", "|---|---|---|---|---|---|---|"]
    for r in torch_all:
        lines.append(f"| {r['config']} | {r['precision']} | {ms(r['step_s'])} | {r['end_to_end_s']:.3f} s | "
                     f"{ms(r['vae_decode_s'])} | {gib(r['peak_memory'])} | {r['achieved_tflops']:.0f} |")
    if comparisons:
        lines += ["", "## Side by side", "",
                  "| zimage run | vs | diffusers' best step | zimage step | diffusers / zimage | zimage TFLOP/s | matmul peak measured | datasheet |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            peak = "n/a" if c["measured_matmul_tflops"] is None else f"{c['measured_matmul_tflops']:.0f}"
            sheet = "n/a" if c["datasheet_tflops"] is None else f"{c['datasheet_tflops']:.0f}"
            lines.append(f"| {c['zimage']} | {c['torch_config']} ({c['torch_best_precision']}) | {ms(c['torch_best_step_s'])} | "
                         f"{ms(c['zimage_step_s'])} | {c['speedup_step']:.2f} | {c['zimage_achieved_tflops']:.0f} | {peak} | {sheet} |")
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    (args.out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    main()
