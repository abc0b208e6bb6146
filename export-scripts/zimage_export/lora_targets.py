"""Where each of the transformer's Linear weights ended up in the exported graph, for LoRA.

The exporter renames weights: a Linear that becomes a Gemm keeps its tensor ([out, in]) under
the wrapper's module path, one that becomes a MatMul gets a constant-folded transposed copy
([in, out]) named `val_<n>`. Neither name says which diffusers parameter it is, so the export
matches them by value: every Linear weight of the source model (in the package precision, as
the export loaded it) is looked for among the graph's 2-D initializers, as stored and
transposed. The runtime merges LoRAs into the initializers this table names
(manifest `transformer.lora_parameters`, docs/package-format.md).

`match_parameters` works on plain arrays (numpy only, tested without torch); `lora_parameters`
reads the source folder and the saved graph.
"""

import hashlib
from pathlib import Path

# ONNX TensorProto data types of the float initializers a LoRA can change.
ONNX_FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16"}


def _digest(array) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def match_parameters(weights, initializers) -> tuple[dict, list[str]]:
    """`weights`: (diffusers parameter name, [out, in] array) pairs; `initializers`: (name,
    array, dtype name) for the graph's 2-D float initializers. Returns the table
    {parameter: {"initializer", "layout", "dtype"}} (sorted by parameter) and the parameters
    that were not found exactly once (a weight the graph holds in another form, or whose
    values equal another weight's, so that matching cannot tell them apart)."""
    by_digest: dict[str, list[tuple[str, str, tuple]]] = {}
    for name, array, dtype in initializers:
        by_digest.setdefault(_digest(array), []).append((name, dtype, tuple(array.shape)))
    table, missing, used = {}, [], {}
    for param, weight in weights:
        found = []
        for layout, view in (("out_in", weight), ("in_out", weight.T)):
            for name, dtype, shape in by_digest.get(_digest(view), []):
                if shape == tuple(view.shape):
                    found.append((name, layout, dtype))
        # A square weight equal to its own transpose would match twice under one name.
        if len({name for name, _, _ in found}) != 1:
            missing.append(param)
            continue
        name, layout, dtype = found[0]
        if name in used:  # two parameters with identical values: neither can be told apart
            missing.append(param)
            missing.append(used[name])
            table.pop(used[name], None)
            continue
        used[name] = param
        table[param] = {"initializer": name, "layout": layout, "dtype": dtype}
    return dict(sorted(table.items())), sorted(set(missing))


def _graph_initializers(graph: Path):
    """(name, array, dtype) of every 2-D float initializer, read one at a time (external data
    through a memory map, so the weights are never all in memory)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    maps = {}
    for tensor in model.graph.initializer:
        if len(tensor.dims) != 2 or tensor.data_type not in ONNX_FLOAT_TYPES:
            continue
        dtype = ONNX_FLOAT_TYPES[tensor.data_type]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            path = graph.parent / info["location"]
            if path not in maps:
                maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
            offset = int(info.get("offset", 0))
            np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
            count = int(np.prod(tensor.dims))
            raw = maps[path][offset: offset + count * np.dtype(np_dtype).itemsize]
            array = raw.view(np_dtype).reshape(tuple(tensor.dims))
        else:
            array = numpy_helper.to_array(tensor)
            if dtype == "bfloat16":
                array = array.view(np.uint16) if array.dtype.itemsize == 2 else array
        yield tensor.name, array, dtype


def _source_linear_weights(src: Path, dtype):
    """(parameter name, [out, in] numpy array in the package precision) for every nn.Linear
    of the source transformer, loaded tensor by tensor from its safetensors files."""
    import json

    import torch
    from diffusers import ZImageTransformer2DModel
    from safetensors import safe_open

    folder = src / "transformer"
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(config)
    linear = sorted(f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    del model
    files = sorted(folder.glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                where[key] = f
    for param in linear:
        with safe_open(str(where[param]), framework="pt") as handle:
            tensor = handle.get_tensor(param).to(dtype)
        # bfloat16 has no numpy type: compare its bits.
        array = tensor.view(torch.uint16).numpy() if dtype == torch.bfloat16 else tensor.numpy()
        yield param, array


def lora_parameters(src: Path, graph: Path, dtype) -> tuple[dict, list[str]]:
    """The manifest table for `graph` (an exported transformer.onnx) and the Linear weights
    of the source that could not be located in it."""
    initializers = list(_graph_initializers(graph))
    return match_parameters(_source_linear_weights(src, dtype), initializers)
