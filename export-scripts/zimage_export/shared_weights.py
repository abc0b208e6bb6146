"""Graphs that read the transformer's weights from the transformer's own file: a ControlNet's
combined graph (export_controlnet.py) and the Omni transformer (transformer_omni.onnx, which
export.py points at transformer.onnx's bytes last, so that an editing package stores the
transformer's weights once, and a LoRA merged into them reaches both graphs).

Shared weights are found by content, not by name: an initializer of the graph whose bytes equal
a stretch of the transformer's weight file (transformer.onnx.data, or for small packages
transformer.onnx itself, where the weights are raw bytes inside the protobuf) gets an
external-data reference to that stretch. Equal bytes read back as equal values, so the match
cannot be wrong, whatever the exporter named or folded. Everything else (the graph's own
weights) goes to `<graph>.onnx.data`.
"""

import hashlib
import json
from pathlib import Path

from .onnx_io import external_data_path

ALIGN_BIG = 65536  # ONNX Runtime maps page-aligned external tensors instead of copying them
BIG = 1 << 20
EMBED_BELOW = 1024
# Weight types (onnx.TensorProto FLOAT, FLOAT16, BFLOAT16, and UINT8 / INT8 for a quantized
# package's codes); integer shape constants are never moved.
WEIGHT_TYPES = (1, 10, 16, 2, 3)


def transformer_weight_index(package: Path) -> dict:
    """sha256 of every weight blob of transformer.onnx -> (file name, offset, length)."""
    import onnx

    graph_path = package / "transformer.onnx"
    model = onnx.load(str(graph_path), load_external_data=False)
    index = {}
    raw_file = graph_path.read_bytes()
    data_files = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            loc, off, length = info["location"], int(info.get("offset", 0)), int(info["length"])
            if loc not in data_files:
                data_files[loc] = open(package / loc, "rb")
            f = data_files[loc]
            f.seek(off)
            blob = f.read(length)
        elif t.raw_data:
            blob = t.raw_data
            off = raw_file.find(blob)
            if off < 0:
                continue
            loc, length = graph_path.name, len(blob)
        else:
            continue
        index.setdefault(hashlib.sha256(blob).digest(), (loc, off, length))
    for f in data_files.values():
        f.close()
    return index


def read_initializers(graph_path: Path, names) -> dict:
    """The initializers `names` of a saved graph as numpy arrays, those in external data files
    mapped from the file (read-only views: nothing else of the graph is loaded)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(graph_path), load_external_data=False)
    names = set(names)
    arrays, maps = {}, {}
    for t in model.graph.initializer:
        if t.name not in names:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            path = graph_path.parent / info["location"]
            if path not in maps:
                maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            offset, length = int(info.get("offset", 0)), int(info["length"])
            arrays[t.name] = maps[path][offset: offset + length].view(dtype).reshape(tuple(t.dims))
        else:
            arrays[t.name] = numpy_helper.to_array(t)
    missing = names - arrays.keys()
    if missing:
        raise ValueError(f"{graph_path.name} has no initializer {sorted(missing)[0]!r}")
    return arrays


def relocate_weights(package: Path, exported: Path, out_graph: Path) -> dict:
    """Rewrite the exported graph `exported` (weights in `exported`.data or embedded) as
    `out_graph` (which may be `exported`): shared weights point into the transformer's file(s),
    the others go to `out_graph`.data. Returns byte counts.

    Initializers with equal bytes, dtype and shape are merged into one first: a module the
    graph calls twice (the noise refiner in 2.x, the control layers in 2.0) leaves one folded
    copy of a small weight per call, which onnxscript deduplicates only below 1024 elements.
    Merged, each weight is one initializer: one reference on disk, one buffer in memory."""
    import onnx

    index = transformer_weight_index(package)
    model = onnx.load(str(exported), load_external_data=True)
    own_path = external_data_path(out_graph)
    own_path.unlink(missing_ok=True)
    shared = own = merged = 0
    canonical, renames, duplicates = {}, {}, []
    with open(own_path, "wb") as own_file:
        for position, t in enumerate(model.graph.initializer):
            blob = t.raw_data
            # Small tensors stay embedded: shape constants must (ONNX Runtime's shape inference
            # reads them at load), and moving a few bytes saves nothing.
            if len(blob) < EMBED_BELOW or t.data_type not in WEIGHT_TYPES:
                continue
            digest = hashlib.sha256(blob).digest()
            key = (digest, t.data_type, tuple(t.dims))
            if key in canonical:
                renames[t.name] = canonical[key]
                duplicates.append(position)
                merged += len(blob)
                t.ClearField("raw_data")
                continue
            canonical[key] = t.name
            hit = index.get(digest)
            if hit is not None:
                loc, off, length = hit
                shared += length
            else:
                pos = own_file.tell()
                align = ALIGN_BIG if len(blob) >= BIG else 64
                pad = (-pos) % align
                own_file.write(b"\0" * pad)
                loc, off, length = own_path.name, pos + pad, len(blob)
                own_file.write(blob)
                own += length
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", loc), ("offset", str(off)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
    if own == 0:
        own_path.unlink()
    _rename_inputs(model.graph, renames)
    for position in reversed(duplicates):
        del model.graph.initializer[position]
    onnx.save(model, str(out_graph))
    return {"shared_bytes": shared, "own_bytes": own, "merged_bytes": merged}


def _rename_inputs(graph, renames: dict) -> None:
    """Point every node input named in `renames` at its new name. The exported graph is flat
    (functions inlined, no control flow); a subgraph would hide uses, so it is refused."""
    outputs = {o.name for o in graph.output}
    if outputs & renames.keys():
        raise ValueError("a graph output is a merged initializer")
    for node in graph.node:
        if any(a.type in (5, 10) for a in node.attribute):  # GRAPH, GRAPHS
            raise ValueError(f"node {node.name} ({node.op_type}) has a subgraph")
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def share_omni_weights(package: Path) -> dict | None:
    """Points transformer_omni.onnx's weights at transformer.onnx's bytes (relocate_weights)
    and records it in the manifest: the graph's entry is rewritten, and the "edit" section gets
    "transformer_weights" with the transformer's sha256 (the runtime refuses the package if
    transformer.onnx changes under it) and the bytes shared. The last step of export.py, after
    every rewrite of transformer.onnx. None (nothing done) for a package without editing graphs.
    A quantized package shares the quantized codes (quantize.py quantizes both graphs alike)."""
    from .manifest import graph_entry

    manifest_path = package / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if "transformer_omni" not in manifest["graphs"] or manifest.get("edit") is None:
        return None
    graph = package / manifest["graphs"]["transformer_omni"]["path"]
    sizes = relocate_weights(package, graph, graph)
    entry = manifest["graphs"]["transformer_omni"]
    entry.update(graph_entry(package, graph.stem))
    if sizes["shared_bytes"]:
        manifest["edit"]["transformer_weights"] = {
            "sha256": manifest["graphs"]["transformer"]["sha256"],
            "shared_bytes": sizes["shared_bytes"],
        }
    else:
        manifest["edit"].pop("transformer_weights", None)
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return sizes
