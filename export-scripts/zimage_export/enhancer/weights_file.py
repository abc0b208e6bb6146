"""One external-data file for several graphs: each weight is written once and every graph that
uses it points at the same bytes (same name, same offset)."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

# Page-aligned offsets let ONNX Runtime map tensors straight from the file.
ALIGNMENT = 4096


def write_weights(weights: dict[str, np.ndarray], names: list[str], path: Path) -> dict[str, tuple[int, int]]:
    """Writes `names` (in order) to `path`; returns name -> (offset, length)."""
    places = {}
    with open(path, "wb") as f:
        for name in names:
            data = np.ascontiguousarray(weights[name], dtype=np.float32).tobytes()
            offset = f.tell()
            pad = (-offset) % ALIGNMENT
            f.write(b"\0" * pad)
            places[name] = (offset + pad, len(data))
            f.write(data)
    return places


def attach(model: onnx.ModelProto, weights: dict[str, np.ndarray], places: dict[str, tuple[int, int]], file_name: str) -> None:
    """Adds every weight the graph reads as an initializer stored in `file_name`."""
    used = {i for node in model.graph.node for i in node.input}
    for name in sorted(used & places.keys()):
        offset, length = places[name]
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(weights[name].shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", file_name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        model.graph.initializer.append(t)
    missing = {i for i in used if i not in places and i not in {c.name for c in model.graph.initializer}}
    produced = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.input}
    if missing - produced:
        raise ValueError(f"graph {model.graph.name} reads undefined tensors {sorted(missing - produced)}")
