"""Prepacked CPU layout of the float transformer (docs/package-format.md, "cpu_prepacked").

    python -m zimage_export.prepacked --package PKG [--graphs transformer]
    python -m zimage_export.prepacked --package PKG --remove

Why: when ONNX Runtime's CPU provider creates a session it repacks every constant weight of a
MatMul or Gemm into the blocked layout of its GEMM kernels (MLAS), in a fresh private copy. For
the float transformer that is most of the load: mid-size model, 0.75-0.9 s of a 0.8-0.9 s
session on one thread, much of it the page faults of the copy (docs/loading.md). ONNX Runtime
can save those packed weights with the optimised graph
(`session.save_external_prepacked_constant_initializers`) and, at the next load, map them from
the file instead of packing. This module writes that graph beside the portable one.

The packed bytes are MLAS's format for the CPU and the ONNX Runtime that wrote them, and ONNX
Runtime reads them back without checking anything: on a CPU whose kernels pack differently
they would load and compute with misread weights. So:
- the package also carries a **probe** saved the same way: each way the layout's kernels pack
  a weight (MatMul, Gemm and FusedMatMul, B plain and transposed) on small and blocking-size
  weights, with inputs and weights of small multiples of 1/8 (every product and partial sum is
  exact in float32, whatever order a kernel adds in). The probe's only output is the largest
  |y - expected|; the runtime loads the layout only where it is exactly 0 (and only on the CPU
  provider, and never with weights replaced by a LoRA, whose packed copies the file does not
  have);
- a layout whose prepacked kernels the probe does not cover (MatMulNBits of a quantized
  transformer) is refused: quantized packages pack a quarter of the bytes and already load
  fast.

Disk: the portable graph and its file are left as they are (a ControlNet's graphs read the
transformer's weight file at its offsets, docs/controlnet.md). Where the graph keeps its
weights in `<graph>.onnx.data`, the layout reads its unchanged tensors there and what only it
reads (its packed copies, about the weights' size again, and any tensor its optimisation
changed) is appended to that file, page-aligned; the manifest records those extra bytes, which
do not count as the package's weights. A graph with its weights inside the .onnx (the tiny test
packages) gets the layout's own data file instead.

Needs onnx, onnxruntime and numpy (no torch).
"""

import argparse
import hashlib
import os
import shutil
from pathlib import Path

from .manifest import file_entry, write_manifest
from .onnx_io import name_nodes_by_position
from .quantize import tensor_bytes

DEFAULT_GRAPHS = ("transformer",)
# Kernels whose packed weights the probe checks (all are MLAS's float GEMM packing).
PROBED_OPS = ("MatMul", "Gemm", "FusedMatMul")
# Initializers at least this large go to the shared data file (ONNX Runtime's own threshold when
# it saves the layout); smaller ones stay inside the .onnx.
EXTERNAL_MIN_BYTES = 1024
# Large tensors start on 64 KiB boundaries (ONNX Runtime maps a tensor whose offset is a multiple
# of the allocation granularity: the page on Linux, 64 KiB on Windows); small ones on 64 bytes.
BIG_BYTES = 1 << 20
BIG_ALIGNMENT = 1 << 16
SMALL_ALIGNMENT = 64
# Probe shapes (rows of A, K, N): one small, one across MLAS's K and N blocking (256 / 128).
PROBE_SHAPES = ((3, 37, 53), (2, 257, 129))
# platform.machine() -> the name Rust's std::env::consts::ARCH gives the same processors.
RUST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def machine_arch() -> str:
    """This machine's architecture as the runtime checks it (the layout is used only there)."""
    import platform

    machine = platform.machine()
    return RUST_ARCH.get(machine.lower(), machine)


def layout_name(graph_path: str) -> str:
    return f"{Path(graph_path).stem}.prepacked.onnx"


def probe_name(graph_path: str) -> str:
    return f"{Path(graph_path).stem}.prepack_probe.onnx"


def _ort_options(save_to: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the "hardware specific optimizations" warning is the point here
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", save_to.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(EXTERNAL_MIN_BYTES))
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    return options


def save_prepacked(source: Path, target: Path) -> None:
    """Has ONNX Runtime (CPU, level ALL) save `source` optimised, with its packed weights, as
    `target` + `target`.data."""
    import onnxruntime as ort

    ort.InferenceSession(str(source), _ort_options(target), providers=["CPUExecutionProvider"])


def prepacked_entries(tensor) -> list[tuple[str, str, list[tuple[int, int, str]]]]:
    """A saved initializer's packed copies: (entry key, kernel key "Op+hash", [(offset, length,
    checksum)]), as ONNX Runtime writes them into its external_data ("prepacked_<i>" ->
    "key|offset;length;checksum[|...]")."""
    out = []
    for e in tensor.external_data:
        if not e.key.startswith("prepacked"):
            continue
        fields = e.value.split("|")
        blobs = []
        for blob in fields[1:]:
            offset, length, checksum = blob.split(";")
            blobs.append((int(offset), int(length), checksum))
        out.append((e.key, fields[0], blobs))
    return out


def prepacked_ops(model) -> dict[str, int]:
    """Op type -> number of packed copies in a saved model."""
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        for _, key, _ in prepacked_entries(t):
            op = key.split("+")[0]
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def _external(tensor) -> dict:
    return {e.key: e.value for e in tensor.external_data}


class _Reader:
    """Reads tensors' bytes from their external data files (kept open) or from the protobuf."""

    def __init__(self, base: Path):
        self.base, self.files = base, {}

    def read(self, location: str, offset: int, length: int) -> bytes:
        f = self.files.get(location)
        if f is None:
            f = self.files[location] = open(self.base / location, "rb")
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise ValueError(f"{location}: {length} bytes at {offset} run past the end of the file")
        return data

    def tensor(self, t) -> bytes:
        from onnx import TensorProto

        if t.data_location == TensorProto.EXTERNAL:
            e = _external(t)
            return self.read(e["location"], int(e.get("offset", 0)), int(e["length"]))
        return tensor_bytes(t)

    def close(self):
        for f in self.files.values():
            f.close()


class _DataFile:
    """Where the layout's tensors and packed copies go: appended to an existing data file (whose
    tensors can then be pointed at), or a new one. Each distinct content is stored once, and
    everything new starts on an aligned offset: ONNX Runtime's own file does not align small
    packed copies (it pads only those over its threshold), and MLAS's kernels read a packed copy
    with aligned vector loads: a probe layout exactly as ONNX Runtime 1.31.1 saved it crashed the
    process (packed weights of 300x140 at an offset 16 bytes past a 64-byte boundary, 3-row
    products)."""

    def __init__(self, path: Path, existing: dict[bytes, int] | None = None):
        self.path, self.by_content = path, dict(existing or {})
        self.file = open(path, "ab")
        self.start = self.file.tell()

    def add(self, data: bytes) -> int:
        digest = hashlib.sha256(data).digest()
        if digest in self.by_content:
            return self.by_content[digest]
        align = BIG_ALIGNMENT if len(data) >= BIG_BYTES else SMALL_ALIGNMENT
        offset = self.file.tell()
        pad = (-offset) % align
        self.file.write(b"\0" * pad)
        self.file.write(data)
        self.by_content[digest] = offset + pad
        return offset + pad

    def added(self) -> int:
        return self.file.tell() - self.start

    def close(self):
        self.file.close()


def _point(tensor, location: str, offset: int, length: int, prepacked: list[tuple[str, str]] = ()) -> None:
    from onnx import TensorProto

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length)), *prepacked):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _inline(tensor, data: bytes) -> None:
    from onnx import TensorProto

    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]
    tensor.raw_data = data


def portable_tensors(portable, package: Path, data_name: str) -> dict[bytes, int]:
    """sha256 -> offset of each tensor the portable graph keeps in `data_name` (so that the
    layout's unchanged tensors point there instead of being stored twice)."""
    reader, places = _Reader(package), {}
    try:
        for t in portable.graph.initializer:
            e = _external(t)
            if e.get("location") == data_name:
                places.setdefault(hashlib.sha256(reader.tensor(t)).digest(), int(e.get("offset", 0)))
    finally:
        reader.close()
    return places


def write_layout_data(layout, layout_dir: Path, data: _DataFile, data_name: str) -> int:
    """Points every initializer of `layout` (as ONNX Runtime saved it in `layout_dir`) and its
    packed copies into `data` (file name `data_name`), small ones back inside the protobuf.
    Returns the bytes of packed copies."""
    saved = _Reader(layout_dir)
    packed = 0
    try:
        for t in layout.graph.initializer:
            tensor = saved.tensor(t)
            entries = []
            for key, kernel_key, blobs in prepacked_entries(t):
                placed = []
                for offset, length, checksum in blobs:
                    blob = saved.read(_external(t)["location"], offset, length)
                    placed.append(f"{data.add(blob)};{length};{checksum}")
                    packed += length
                entries.append((key, "|".join([kernel_key, *placed])))
            if len(tensor) < EXTERNAL_MIN_BYTES and not entries:
                _inline(t, tensor)
            else:
                _point(t, data_name, data.add(tensor), len(tensor), entries)
    finally:
        saved.close()
    return packed


def _probe_weights(rng, shape):
    import numpy as np

    return (rng.integers(-32, 33, size=shape) / 8).astype(np.float32)


def probe_model():
    """The probe (not yet optimised): input `one` [1] (fed 1.0), output `max_abs_error` [],
    the largest |y - expected| over every probed kernel and shape."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(20261201)
    nodes, inits, errors = [], [], []
    variants = [("MatMul", "", {}, False)]
    variants += [("Gemm", "", {"transB": tb}, bool(tb)) for tb in (0, 1)]
    variants += [("FusedMatMul", "com.microsoft", {"transB": tb, "alpha": 1.0}, bool(tb)) for tb in (0, 1)]
    for v, (op, domain, attrs, transposed) in enumerate(variants):
        for s, (m, k, n) in enumerate(PROBE_SHAPES):
            tag = f"{op}_{v}_{s}"
            a = _probe_weights(rng, (m, k))
            b = _probe_weights(rng, (k, n))
            # Exact: products are multiples of 1/64, sums stay below 2^24 / 64 in magnitude.
            expected = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
            if not np.array_equal(expected.astype(np.float64), a.astype(np.float64) @ b.astype(np.float64)):
                raise AssertionError(f"probe {tag}: the expected products are not exact in float32")
            inits += [numpy_helper.from_array(a, f"{tag}_a"),
                      numpy_helper.from_array(np.ascontiguousarray(b.T) if transposed else b, f"{tag}_b"),
                      numpy_helper.from_array(expected, f"{tag}_expected")]
            # A times the input (1.0): not a constant, so the product is computed at run time.
            nodes.append(helper.make_node("Mul", [f"{tag}_a", "one"], [f"{tag}_x"]))
            nodes.append(helper.make_node(op, [f"{tag}_x", f"{tag}_b"], [f"{tag}_y"], domain=domain, **attrs))
            nodes.append(helper.make_node("Sub", [f"{tag}_y", f"{tag}_expected"], [f"{tag}_d"]))
            nodes.append(helper.make_node("Abs", [f"{tag}_d"], [f"{tag}_abs"]))
            nodes.append(helper.make_node("ReduceMax", [f"{tag}_abs"], [f"{tag}_err"], keepdims=0))
            errors.append(f"{tag}_err")
    nodes.append(helper.make_node("Max", errors, ["max_abs_error"]))
    graph = helper.make_graph(
        nodes, "prepack_probe",
        [helper.make_tensor_value_info("one", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("max_abs_error", TensorProto.FLOAT, [])],
        inits,
    )
    return helper.make_model(graph, ir_version=8, producer_name="zimage", opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def probe_error(path: Path) -> float:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), _ort_options(), providers=["CPUExecutionProvider"])
    return float(session.run(None, {"one": np.ones(1, np.float32)})[0])


def write_probe(staging: Path, name: str) -> dict:
    """Saves the probe prepacked into `staging`; refuses one whose kernels packed nothing or
    that does not compute exactly. Returns its op counts."""
    import onnx

    work = staging / ".probe"
    work.mkdir()
    onnx.save(probe_model(), str(work / "source.onnx"))
    save_prepacked(work / "source.onnx", work / name)
    saved = onnx.load(str(work / name), load_external_data=False)
    name_nodes_by_position(saved)
    data = _DataFile(staging / f"{name}.data")
    try:
        write_layout_data(saved, work, data, f"{name}.data")
    finally:
        data.close()
    onnx.save(saved, str(staging / name))
    shutil.rmtree(work)
    ops = prepacked_ops(saved)
    # Two shapes of each variant: MatMul 2, Gemm 4, FusedMatMul 4.
    if ops != {"FusedMatMul": 4, "Gemm": 4, "MatMul": 2}:
        raise RuntimeError(f"the probe's kernels did not all prepack ({ops}): this ONNX Runtime cannot be probed")
    error = probe_error(staging / name)
    if error != 0.0:
        raise RuntimeError(f"the prepacked probe computes with error {error} on the machine that wrote it")
    return ops


def _sample_inputs(graph) -> dict:
    """Small random inputs for a graph (a ModelProto), from its declared shapes: every symbolic
    dimension 4 (batch 4, 4x4 latents, 4 caption tokens for the transformer)."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for i in graph.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 4 for d in i.type.tensor_type.shape.dim]
        elem = i.type.tensor_type.elem_type
        if elem == 1:
            feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
        elif elem == 10:
            feeds[i.name] = rng.standard_normal(dims).astype(np.float16)
        elif elem == 7:
            feeds[i.name] = np.ones(dims, np.int64)
        elif elem == 9:
            feeds[i.name] = np.ones(dims, bool)
        else:
            raise ValueError(f"no probe input for element type {elem} ({i.name})")
    return feeds


def prebuild(package: Path, manifest: dict, name: str, feeds: dict | None) -> dict:
    """Writes graph `name`'s prepacked layout and probe into `package` and returns its manifest
    entry (`cpu_prepacked`; the graph's `external_data` entry is updated when the layout's data
    went there). `feeds`: inputs on which the layout must give the portable graph's outputs bit
    for bit (None: inputs made from the graph's declared shapes)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    entry = manifest["graphs"][name]
    source = package / entry["path"]
    if entry.get("cpu_prepacked"):
        raise ValueError(f"{name} already has a prepacked layout (remove it first: --remove)")
    layout, probe = layout_name(entry["path"]), probe_name(entry["path"])
    shared = entry.get("external_data")
    # Appended to the graph's own data file (a copy, replaced at the end), or a file of its own.
    data_name = shared["path"] if shared else f"{layout}.data"
    staging = package / f".{Path(entry['path']).stem}.prepacked.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "ort").mkdir(parents=True)
    try:
        save_prepacked(source, staging / "ort" / layout)
        saved = onnx.load(str(staging / "ort" / layout), load_external_data=False)
        ops = prepacked_ops(saved)
        if not ops:
            raise RuntimeError(f"{name}: ONNX Runtime packed no weight of this graph: nothing to prebuild")
        unprobed = sorted(set(ops) - set(PROBED_OPS))
        if unprobed:
            raise RuntimeError(f"{name}: packed weights of {', '.join(unprobed)}, which the probe does not check "
                               f"(only {', '.join(PROBED_OPS)}): a quantized graph? Prepacked layouts are for float graphs")
        name_nodes_by_position(saved)
        existing = {}
        if shared:
            if (package / shared["path"]).stat().st_size != shared["bytes"]:
                raise ValueError(f"{shared['path']} is not the size the manifest records")
            existing = portable_tensors(onnx.load(str(source), load_external_data=False), package, data_name)
            shutil.copyfile(package / data_name, staging / data_name)
        data = _DataFile(staging / data_name, existing)
        try:
            packed = write_layout_data(saved, staging / "ort", data, data_name)
            extra = data.added()
        finally:
            data.close()
        onnx.save(saved, str(staging / layout))
        shutil.rmtree(staging / "ort")
        probe_ops = write_probe(staging, probe)

        feeds = feeds if feeds is not None else _sample_inputs(onnx.load(str(source), load_external_data=False))
        options = _ort_options()
        want = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"]).run(None, feeds)
        # The layout reads its data file from the staging folder: check it there, before anything moves.
        got = ort.InferenceSession(str(staging / layout), options, providers=["CPUExecutionProvider"]).run(None, feeds)
        for w, g in zip(want, got):
            if w.shape != g.shape or not np.array_equal(w, g):
                raise RuntimeError(f"{name}: the prepacked layout's outputs differ from the graph's")
        for f in sorted(staging.iterdir()):
            os.replace(f, package / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if shared:
        entry["external_data"] = file_entry(package / data_name)
    probe_data = package / f"{probe}.data"
    return {
        "onnxruntime": ort.__version__,
        "arch": machine_arch(),
        "ops": ops,
        "packed_bytes": packed,
        # Bytes appended to the graph's own data file (not weights); 0 with a file of its own.
        "extra_bytes": extra if shared else 0,
        **file_entry(package / layout),
        "external_data": None if shared else file_entry(package / data_name),
        "probe": {
            **file_entry(package / probe),
            "ops": probe_ops,
            "external_data": file_entry(probe_data) if probe_data.exists() else None,
        },
    }


def remove(package: Path, manifest: dict, name: str) -> None:
    """Drops graph `name`'s prepacked layout and probe, and what was appended for them to the
    graph's data file."""
    entry = manifest["graphs"][name]
    prepacked = entry.pop("cpu_prepacked", None)
    if not prepacked:
        return
    shared = entry.get("external_data")
    if shared and prepacked.get("extra_bytes"):
        path = package / shared["path"]
        staging = path.with_name(f".{path.name}.tmp")
        with open(path, "rb") as src, open(staging, "wb") as dst:
            remaining = shared["bytes"] - prepacked["extra_bytes"]
            while remaining > 0:
                chunk = src.read(min(remaining, 1 << 24))
                if not chunk:
                    raise ValueError(f"{path.name} is shorter than the manifest records")
                dst.write(chunk)
                remaining -= len(chunk)
        os.replace(staging, path)
        entry["external_data"] = file_entry(path)
    for f in (prepacked, prepacked.get("external_data"), prepacked["probe"], prepacked["probe"].get("external_data")):
        if f:
            (package / f["path"]).unlink(missing_ok=True)


def add_prepacked(package: Path, graphs: tuple[str, ...] = DEFAULT_GRAPHS, feeds: dict | None = None) -> dict:
    """Adds the prepacked layouts of `graphs`; rewrites manifest.json last. Returns it."""
    import json

    manifest = json.loads((package / "manifest.json").read_text())
    for name in graphs:
        if name not in manifest["graphs"]:
            raise ValueError(f"the package has no {name} graph")
        p = manifest["graphs"][name]["cpu_prepacked"] = prebuild(package, manifest, name, feeds)
        print(f"{name}: prepacked layout {p['path']} ({p['ops']}; {p['packed_bytes'] / 2**20:.0f} MiB packed, "
              f"{p['extra_bytes'] / 2**20:.0f} MiB appended to the graph's data file)", flush=True)
    write_manifest(package, manifest)
    return manifest


def main(argv=None) -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--graphs", nargs="+", default=list(DEFAULT_GRAPHS))
    parser.add_argument("--remove", action="store_true", help="remove the prepacked layouts instead")
    args = parser.parse_args(argv)
    if args.remove:
        manifest = json.loads((args.package / "manifest.json").read_text())
        for name in args.graphs:
            remove(args.package, manifest, name)
        write_manifest(args.package, manifest)
    else:
        add_prepacked(args.package, tuple(args.graphs))


if __name__ == "__main__":
    main()
