"""Where a package's load time goes: ONNX Runtime session creation per graph, split by graph
optimisation level and weight prepacking (docs/loading.md).

    python export-scripts/bench_session_creation.py PACKAGE [--threads 2] [--repeat 2] [--fresh-process]

For each graph of the package's core (text encoder, transformer, VAE decoder, VAE encoder),
times `InferenceSession` creation on the CPU at level ALL with prepacking (what zimage does for
the transformer and VAE graphs), ALL without, BASIC without and no optimisation without, after
one untimed creation (page cache warm), and prints the best of --repeat. ALL/pack - ALL/nopack
is prepacking; ALL/nopack - BASIC/nopack is the level-ALL layout optimisation. A graph with
a prebuilt CPU layout (manifest `cpu_layout` or `cpu_prepacked`, docs/package-format.md) gets a
second row for it.

`--fresh-process` creates every timed session in a new Python process, as a program's first
load does: in one process, memory freed by an earlier session is reused, which hides the page
faults of fresh memory (what a prepacked layout saves).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import onnxruntime as ort

LEVELS = {
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
SETTINGS = [("ALL", True), ("ALL", False), ("BASIC", False), ("off", False)]
GRAPHS = ["text_encoder", "transformer", "vae_decoder", "vae_encoder"]


def create_seconds(path: str, level: str, prepack: bool, threads: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    start = time.perf_counter()
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return time.perf_counter() - start


def fresh_process_seconds(path: str, level: str, prepack: bool, threads: int) -> float:
    """create_seconds in a new Python process (this script with --child)."""
    out = subprocess.run([sys.executable, __file__, "--child", path, level, str(int(prepack)), str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _, _, path, level, prepack, threads = sys.argv
        print(create_seconds(path, level, prepack == "1", int(threads)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--fresh-process", action="store_true", help="time each session in a new process")
    args = ap.parse_args()
    timed = fresh_process_seconds if args.fresh_process else create_seconds
    print("| graph | " + " | ".join(f"{lv}/{'pack' if p else 'nopack'}" for lv, p in SETTINGS) + " | load average |")
    print("|---" * (len(SETTINGS) + 2) + "|")
    manifest = json.load(open(os.path.join(args.package, "manifest.json")))
    rows = []
    for graph in GRAPHS:
        entry = manifest["graphs"][graph]
        rows.append((graph, entry["path"]))
        for layout in ("cpu_layout", "cpu_prepacked"):
            if entry.get(layout):
                rows.append((f"{graph} ({layout})", entry[layout]["path"]))
    for graph, file in rows:
        path = os.path.join(args.package, file)
        cells = []
        for level, prepack in SETTINGS:
            create_seconds(path, level, prepack, args.threads)  # page cache warm
            best = min(timed(path, level, prepack, args.threads) for _ in range(args.repeat))
            cells.append(f"{best:.2f} s")
        print(f"| {graph} | " + " | ".join(cells) + f" | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
