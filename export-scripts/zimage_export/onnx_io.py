"""Running torch.onnx.export (the dynamo exporter) the same way for every graph.

torch and onnx are imported where they are used, so that the defaults here and the naming
helpers can be read without them (export.py --help, the tests)."""

import gc
from pathlib import Path

# Default for export_graph's `external_data_threshold`: graphs with more weight bytes than this
# keep them in a `<graph>.onnx.data` file. Protobuf cannot hold more than 2 GiB, but the reason
# to go lower is the runtime: ONNX Runtime maps page-aligned external data instead of copying
# weights out of a parsed protobuf. Measured on the mid-size benchmark model (2.0 GB of
# weights, zimage bench 256x256, 2 threads): load 4.0 s -> 2.2 s, peak RSS 3.36 GB -> 2.03 GB.
# Writing external data also streams the weights to disk, where an embedded graph is
# serialised in memory. The tiny test graphs stay embedded. export.py passes
# --external-data-threshold.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 32 * 1024 * 1024

# Manifest dtype of each ONNX element type a package graph has on its inputs and outputs, by
# the name of onnx.TensorProto's enum value.
ONNX_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "INT64": "int64", "BOOL": "bool"}


def external_data_path(graph: Path) -> Path:
    """`<graph>.onnx.data` beside `<graph>.onnx`: where a graph's weights go when they do not
    stay embedded (docs/package-format.md)."""
    return graph.with_name(graph.name + ".data")


def weight_bytes(module) -> int:
    """Bytes of a torch module's parameters and buffers, each tensor once (tied weights are
    one tensor under two names)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def strip_debug_metadata(model) -> None:
    """Drop the exporter's debug metadata: per-node Python stack traces with absolute source
    paths and FX node dumps (about a third of a small graph's size), and the graph-level dump
    of torch.export's range constraints, whose order follows Python's randomised set hashing.
    Without them, exports are byte-identical across runs and checkout locations."""
    import onnx_ir as ir

    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        graph.metadata_props.clear()
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.clear()


def export_graph(spec, out_dir: Path, opset: int,
                 external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
                 fold_shared_weights: bool = False) -> Path:
    """Export `spec.module(*spec.args)` to `out_dir / spec.filename`. Weights go to ONE
    `<file>.data` beside the graph when they exceed `external_data_threshold` bytes; smaller
    graphs are self-contained.

    The graph is optimised (constant folding, e.g. of transposed weight matrices) only after
    the module and the exporter's traced program are released: each folded matrix then
    replaces its source instead of doubling it, so peak memory stays near one copy of the
    weights.

    `fold_shared_weights`, for graphs that call a module twice (the ControlNet graph runs the
    noise refiner twice): torch.export emits one Transpose per call of a Linear, so a weight
    used twice feeds two Transposes. onnxscript's constant folding skips a Transpose of a large
    (> 8192 elements) initializer that has more than one consumer, and only its later
    common-subexpression pass merges the two Transposes into one. The weight would then stay in
    its [out, in] layout behind a runtime Transpose, where the plain transformer graph holds it
    folded as [in, out]. A second optimizer pass folds the merged Transpose, so the weight is
    stored once, in the same layout and with the same bytes as in transformer.onnx."""
    import onnx
    import torch

    path = Path(out_dir) / spec.filename
    for stale in (path, external_data_path(path)):
        stale.unlink(missing_ok=True)
    module, spec.module = spec.module, None
    external = weight_bytes(module) > external_data_threshold
    module.eval()
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            tuple(spec.args),
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_shapes=spec.dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=external,
            optimize=False,
        )
    del module
    program.exported_program = None
    gc.collect()
    program.optimize()
    if fold_shared_weights:
        program.optimize()
    strip_debug_metadata(program.model)
    program.save(str(path), external_data=external)
    del program
    gc.collect()
    # The checker reads external data through the path, so it works for both layouts.
    onnx.checker.check_model(str(path))
    return path


def node_attribute(node, name: str, default=None):
    """The value of `node`'s attribute `name`, or `default` when the node does not set it."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def name_nodes_by_position(model) -> None:
    """Names every node of a graph ONNX Runtime saved `<op>_<position>`. ONNX Runtime names the
    nodes it adds from a process-wide counter ("..._token_61"), so the same graph would come out
    with other names after other sessions; by position, a re-export is byte-identical whatever
    ran before it. Only the protobuf changes; the weights stay where ONNX Runtime wrote them."""
    for index, node in enumerate(model.graph.node):
        node.name = f"{node.op_type}_{index}"


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Names and element types of a saved graph's inputs and outputs (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [{"name": v.name, "dtype": ONNX_DTYPES[onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)]}
                for v in values]

    return describe(model.graph.input), describe(model.graph.output)
