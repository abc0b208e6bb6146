"""Carry a random-weight package to a machine without carrying its weight bytes.

`strip PKG OUT` copies the package to OUT without its large external-data files and writes
`skeleton.json`, which lists every large float tensor's byte range; small tensors (norms, shape
constants, index tables) are kept verbatim, end to end, in `<data>.small`. `fill OUT` rebuilds each data file
there with the small tensors in place and the large ones drawn from N(0, 0.02): the same graph
and shapes, so timings mean what they would on the original package. Only for random-weight
benchmark packages (the manifest's sha256 of a large file is not checked at load, its size is).
Needs numpy and onnx.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx

LARGE = 1 << 20
FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
               onnx.TensorProto.BFLOAT16: "bfloat16"}


def random_bytes(rng, dtype, length: int) -> np.ndarray:
    """N(0, 0.02) values of `dtype` as bytes; bfloat16 (which numpy lacks) is the top half of
    each float32."""
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


def strip(package: Path, out: Path) -> None:
    shutil.copytree(package, out, ignore=shutil.ignore_patterns("*.data"))
    ranges = {}
    for graph in package.glob("*.onnx"):
        for dtype, location, offset, length in external_tensors(graph):
            entry = ranges.setdefault(location, {"bytes": (package / location).stat().st_size, "large": []})
            # Several initializers may read one range (scripts/gpu/deepen.py): list it once.
            item = [offset, length, onnx.TensorProto.DataType.Name(dtype)]
            if dtype in FLOAT_TYPES and length >= LARGE and item not in entry["large"]:
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
            data[offset:offset + length] = random_bytes(rng, FLOAT_TYPES[getattr(onnx.TensorProto, dtype_name)], length)
        assert taken == small.size, location
        data.tofile(out / location)
        (out / f"{location}.small").unlink()


if __name__ == "__main__":
    command, *paths = sys.argv[1:]
    {"strip": strip, "fill": fill}[command](*map(Path, paths))
