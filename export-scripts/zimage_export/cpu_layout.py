"""Prebuilt CPU layouts of the VAE graphs (docs/package-format.md, "cpu_layout").

ONNX Runtime's CPU provider rewrites every convolution of a graph into its blocked NCHWc
layout when it creates a session at optimisation level ALL (the NchwcTransformer): it reorders
each filter into channel blocks of the width its MLAS kernels use (16 floats with AVX-512, 8
with AVX2). That rewrite is what makes the VAE decode fast, and it is the VAE decoder's whole
session time: 0.29-0.35 s of the mid-size package's 0.3 s, against 0.03-0.05 s for loading the
rewritten graph (one process per load, 2 threads). So the package can carry the rewritten graph
beside the portable one: `<graph>.nchwc<B>.onnx`, saved by ONNX Runtime itself
(`optimized_model_filepath`), with the block width it was made for. The runtime uses it only on
the CPU provider and only when its ONNX Runtime reports the same block width (the probe below);
anywhere else it loads the portable graph, which gives the same pixels.

The probe is one com.microsoft.nchwc ReorderInput node on 4 channels: the runtime pads the
channels to its block width, so the output's channel count is that width. The SDK runs the same
bytes (sdk/src/runtime/nchwc_probe.onnx, written by `python -m zimage_export.cpu_layout
--write-probe PATH`).

Needs onnx, onnxruntime and numpy (no torch).
"""

import argparse
import json
import os
import shutil
from pathlib import Path

from .manifest import file_entry, write_manifest
from .onnx_io import name_nodes_by_position

# Graphs that get a prebuilt layout: the convolutional ones (the rewrite is about convolutions).
LAYOUT_GRAPHS = ("vae_decoder", "vae_decoder_cpu", "vae_encoder")
# ReorderInput needs a multiple of 4 channels; 4 pads to the full block width.
PROBE_CHANNELS = 4


def probe_model_bytes() -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("ReorderInput", ["x"], ["y"], domain="com.microsoft.nchwc")
    graph = helper.make_graph(
        [node], "nchwc_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, PROBE_CHANNELS, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, ir_version=8, producer_name="zimage", opset_imports=[
        helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft.nchwc", 1)])
    return model.SerializeToString()


def nchwc_block() -> int | None:
    """The NCHWc block width of this process's ONNX Runtime CPU provider, or None when it has
    no NCHWc kernels."""
    import numpy as np
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(probe_model_bytes(), providers=["CPUExecutionProvider"])
        y = session.run(None, {"x": np.zeros((1, PROBE_CHANNELS, 1, 1), np.float32)})[0]
    except Exception:  # noqa: BLE001 - any failure means: no usable NCHWc kernels
        return None
    return int(y.shape[1])


def cpu_session(path: Path, save_to: Path | None = None, external_data: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
        if external_data is not None:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", external_data)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def probe_input(manifest: dict, name: str, rows: int = 8, cols: int = 8) -> dict:
    """A small random input of VAE graph `name` (input name -> array): rows x cols latents, or
    the picture they decode to."""
    import numpy as np

    vae = manifest["vae"]
    rng = np.random.default_rng(0)
    if name == "vae_encoder":
        f = vae["scale_factor"]
        return {"image": rng.uniform(-1, 1, (1, 3, rows * f, cols * f)).astype(np.float32)}
    return {"latents": rng.standard_normal((1, vae["latent_channels"], rows, cols)).astype(np.float32)}


def prebuild(package: Path, manifest: dict, name: str, block: int) -> dict | None:
    """Writes graph `name`'s layout for `block` into `package` and returns its manifest entry, or
    None when the rewrite changes nothing (no convolution it handles). Refuses a layout whose
    outputs differ from the portable graph's."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    entry = manifest["graphs"][name]
    source = package / entry["path"]
    stem = f"{Path(entry['path']).stem}.nchwc{block}.onnx"
    data = f"{stem}.data" if entry.get("external_data") else None
    staging = package / f".{stem}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        cpu_session(source, staging / stem, data)
        model = onnx.load(str(staging / stem), load_external_data=False)
        if not any(n.domain == "com.microsoft.nchwc" for n in model.graph.node):
            return None
        name_nodes_by_position(model)
        onnx.save(model, str(staging / stem))
        inputs = probe_input(manifest, name)
        want = cpu_session(source).run(None, inputs)
        got = cpu_session(staging / stem).run(None, inputs)
        for w, g in zip(want, got):
            if w.shape != g.shape or not np.array_equal(w, g):
                raise RuntimeError(f"{name}: the NCHWc layout's outputs differ from the graph's "
                                   f"(max {np.abs(w - g).max() if w.shape == g.shape else 'shape'})")
        for f in staging.iterdir():
            os.replace(f, package / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "nchwc_block": block,
        "onnxruntime": ort.__version__,
        **file_entry(package / stem),
        "external_data": file_entry(package / data) if data else None,
    }


def add_layouts(package: Path, graphs: tuple[str, ...] = LAYOUT_GRAPHS) -> dict:
    """Adds (or replaces) the prebuilt CPU layouts of the package's VAE graphs; rewrites
    manifest.json last (through a temporary file). Returns the manifest."""
    manifest = json.loads((package / "manifest.json").read_text())
    block = nchwc_block()
    if block is None:
        print("this ONNX Runtime has no NCHWc kernels: no CPU layouts written")
        return manifest
    for name in graphs:
        entry = manifest["graphs"].get(name)
        if entry is None:
            continue
        old = entry.pop("cpu_layout", None)
        layout = prebuild(package, manifest, name, block)
        if old is not None:
            kept = {layout["path"], (layout.get("external_data") or {}).get("path")} if layout else set()
            for f in (old, old.get("external_data")):
                if f and f["path"] not in kept:
                    (package / f["path"]).unlink(missing_ok=True)
        if layout is None:
            print(f"{name}: no convolution ONNX Runtime rewrites, no CPU layout")
            continue
        entry["cpu_layout"] = layout
        print(f"{name}: CPU layout {layout['path']} (NCHWc block {block})", flush=True)
    write_manifest(package, manifest)
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, help="add the CPU layouts to this package")
    parser.add_argument("--graphs", nargs="+", choices=LAYOUT_GRAPHS, default=list(LAYOUT_GRAPHS))
    parser.add_argument("--write-probe", type=Path, help="write the block-width probe model here")
    args = parser.parse_args(argv)
    if args.write_probe:
        args.write_probe.write_bytes(probe_model_bytes())
    if args.package:
        add_layouts(args.package, tuple(args.graphs))


if __name__ == "__main__":
    main()
