"""Carry a random-weight package to a machine without carrying its weight bytes.

`strip PKG OUT [MIN_BYTES]` copies the package to OUT without its external-data files and writes
`skeleton.json`, which lists the byte range of every float or quantized-code tensor of at least
MIN_BYTES (default 1 MiB); smaller tensors (norms, shape constants, index tables) are kept
verbatim, end to end, in `<data>.small`. `fill OUT` rebuilds each data file there with the small
tensors in place and the listed ones drawn: floats from N(0, 0.02), quantized codes (a quantized
package's `MatMulNBits` weights and zero points, its `GatherBlockQuantized` table: every byte is
a valid code) uniformly. The same graph and shapes, so timings and memory mean what they would
on the original package. Only for random-weight benchmark packages (the manifest's sha256 of a
large file is not checked at load, its size is). Needs numpy and onnx.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx

LARGE = 1 << 20
DRAWN_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
               onnx.TensorProto.BFLOAT16: "bfloat16",
               # Quantized codes (MatMulNBits weights, zero points, GatherBlockQuantized tables):
               # drawn as uniform bytes.
               onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.uint8,
               onnx.TensorProto.UINT4: np.uint8, onnx.TensorProto.INT4: np.uint8}


def random_bytes(rng, dtype, length: int) -> np.ndarray:
    """N(0, 0.02) values of `dtype` as bytes (uint8: uniform codes); bfloat16 (which numpy
    lacks) is the top half of each float32."""
    if dtype is np.uint8:
        return rng.integers(0, 256, length, dtype=np.uint8)
    if dtype == "bfloat16":
        values = (rng.standard_normal(length // 2, dtype=np.float32) * 0.02).view(np.uint32)
        return (values >> 16).astype(np.uint16).view(np.uint8)
    count = length // np.dtype(dtype).itemsize
    return (rng.standard_normal(count, dtype=np.float32) * 0.02).astype(dtype).view(np.uint8)


def external_tensors(graph_path: Path):
    model = onnx.load(graph_path, load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        yield tensor.data_type, info["location"], int(info.get("offset", 0)), int(info["length"])


def strip(package: Path, out: Path, min_bytes: int = LARGE) -> None:
    """`min_bytes`: the smallest tensor drawn at `fill` (a quantized real-width package's block
    scales are just under 1 MiB each: pass less to keep them out of the skeleton)."""
    shutil.copytree(package, out, ignore=shutil.ignore_patterns("*.data"))
    ranges = {}
    for graph in package.glob("*.onnx"):
        for dtype, location, offset, length in external_tensors(graph):
            entry = ranges.setdefault(location, {"bytes": (package / location).stat().st_size, "large": []})
            # Several initializers may read one range (scripts/gpu/deepen.py): list it once.
            item = [offset, length, onnx.TensorProto.DataType.Name(dtype)]
            if dtype in DRAWN_TYPES and length >= min_bytes and item not in entry["large"]:
                entry["large"].append(item)
    for location, entry in ranges.items():
        data = np.memmap(package / location, dtype=np.uint8, mode="r")
        entry["large"].sort()
        kept, start = [], 0
        for offset, length, _ in entry["large"] + [[entry["bytes"], 0, None]]:
            kept.append(np.asarray(data[start:offset]))
            start = offset + length
        np.concatenate(kept).tofile(out / f"{location}.small")
    (out / "skeleton.json").write_text(json.dumps(ranges, indent=1))


def fill(out: Path) -> None:
    ranges = json.loads((out / "skeleton.json").read_text())
    rng = np.random.default_rng(0)
    for location, entry in ranges.items():
        small = np.fromfile(out / f"{location}.small", dtype=np.uint8)
        data = np.empty(entry["bytes"], dtype=np.uint8)
        start, taken = 0, 0
        for offset, length, dtype_name in entry["large"] + [[entry["bytes"], 0, None]]:
            data[start:offset] = small[taken:taken + offset - start]
            taken += offset - start
            start = offset + length
            if dtype_name is None:
                break
            data[offset:offset + length] = random_bytes(rng, DRAWN_TYPES[getattr(onnx.TensorProto, dtype_name)], length)
        assert taken == small.size, location
        data.tofile(out / location)
        (out / f"{location}.small").unlink()


if __name__ == "__main__":
    # strip PKG OUT [MIN_BYTES] | fill OUT
    command, *args = sys.argv[1:]
    if command == "strip" and len(args) in (2, 3):
        strip(Path(args[0]), Path(args[1]), *map(int, args[2:]))
    elif command == "fill" and len(args) == 1:
        fill(Path(args[0]))
    else:
        sys.exit("usage: weights_skeleton.py strip PKG OUT [MIN_BYTES] | fill OUT")
