"""What the two costly parts of a load buy (docs/loading.md): each measurement runs in a fresh
process (so peak RSS is its own), ONNX Runtime on the CPU, arena and memory patterns as zimage
sets them.

    python export-scripts/bench_load_tradeoffs.py prepack PACKAGE [--side 512] [--steps 4] [--threads 2]
    python export-scripts/bench_load_tradeoffs.py vae PACKAGE [--side 512 256 ...] [--threads 2]

`prepack`: the transformer's session with and without weight prepacking, alternating twice:
session creation seconds, then `--steps` transformer calls at `--side` pixels with 64 caption
tokens (seconds each), RSS after load and peak, and how far the outputs of the two settings
are apart (the packed kernels sum in another order; each setting must repeat itself exactly).
`vae`: the VAE decoder at level ALL, arena and memory patterns off (zimage's settings for VAE
graphs): RSS after load, one decode per `--side` (one process each), its seconds and the peak.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return -1


def _peak_mib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _child_prepack(pkg: str, prepack: bool, side: int, steps: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    t = time.perf_counter()
    session = ort.InferenceSession(str(Path(pkg) / "transformer.onnx"), so, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t
    after_load = _rss_mib()
    manifest = json.loads((Path(pkg) / "manifest.json").read_text())
    t_cfg = manifest["transformer"]
    rng = np.random.default_rng(0)
    latent = side // manifest["vae"]["scale_factor"]
    feeds = {
        "latents": rng.standard_normal((1, t_cfg["in_channels"], latent, latent), dtype=np.float32),
        "timestep": np.array([0.5], np.float32),
        "cap_feats": rng.standard_normal((1, 64, t_cfg["cap_feat_dim"]), dtype=np.float32),
        "cap_mask": np.ones((1, 64), bool),
    }
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = session.run(None, feeds)[0]
        times.append(time.perf_counter() - t)
    return {"prepack": prepack, "load_s": load, "step_s": times, "rss_after_load_mib": after_load,
            "peak_mib": _peak_mib(), "checksum": float(np.abs(out).astype(np.float64).sum())}


def _child_vae(pkg: str, side: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    t = time.perf_counter()
    session = ort.InferenceSession(str(Path(pkg) / "vae_decoder.onnx"), so, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t
    after_load = _rss_mib()
    manifest = json.loads((Path(pkg) / "manifest.json").read_text())
    latent = side // manifest["vae"]["scale_factor"]
    z = np.random.default_rng(0).standard_normal((1, manifest["vae"]["latent_channels"], latent, latent), dtype=np.float32)
    t = time.perf_counter()
    session.run(None, {"latents": z})
    return {"side": side, "load_s": load, "decode_s": time.perf_counter() - t, "rss_after_load_mib": after_load,
            "peak_mib": _peak_mib()}


def _in_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout)


def _load_average() -> str:
    return open("/proc/loadavg").read().split()[0]


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "prepack":
            result = _child_prepack(rest[0], rest[1] == "1", int(rest[2]), int(rest[3]), int(rest[4]))
        else:
            result = _child_vae(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["prepack", "vae"])
    ap.add_argument("package", type=Path)
    ap.add_argument("--side", type=int, nargs="+", default=[512])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.what == "prepack":
        checksums = {False: set(), True: set()}
        for _ in range(2):
            for prepack in (False, True):
                la = _load_average()
                r = _in_child(["prepack", str(args.package), "1" if prepack else "0", str(args.side[0]),
                               str(args.steps), str(args.threads)])
                checksums[prepack].add(r["checksum"])
                steps = " ".join(f"{s:.2f}" for s in r["step_s"])
                print(f"prepacking {'on ' if prepack else 'off'}: session {r['load_s']:.2f} s, steps {steps} s, "
                      f"RSS after load {r['rss_after_load_mib']} MiB, peak {r['peak_mib']} MiB (load average {la})")
        if any(len(c) != 1 for c in checksums.values()):
            sys.exit(f"a setting did not repeat its own output: {checksums}")
        off, on = checksums[False].pop(), checksums[True].pop()
        print(f"sum of |output|: {off!r} without, {on!r} with prepacking (relative {abs(on - off) / abs(off):.1e})")
    else:
        for side in args.side:
            la = _load_average()
            r = _in_child(["vae", str(args.package), str(side), str(args.threads)])
            print(f"VAE decode {side}x{side}: session {r['load_s']:.2f} s, RSS after load {r['rss_after_load_mib']} "
                  f"MiB, decode {r['decode_s']:.2f} s, peak {r['peak_mib']} MiB (load average {la})")


if __name__ == "__main__":
    main()
