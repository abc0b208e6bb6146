"""The VAE's group norms summed in two levels, exact to float rounding at photo sizes.

Why: torch.onnx writes diffusers' `nn.GroupNorm` as

    r = Reshape(x, [0, G, -1]);  n = InstanceNormalization(r, ones, zeros);
    y = Add(Mul(Reshape(n, Shape(x)), weight [C, 1, 1]), bias [C, 1, 1])

and ONNX Runtime's CPU `InstanceNormalization` sums the `C/G x H x W` values of a group in
float32 lanes that grow with the picture (one norm of 4 x 736 x 992 values with a large mean:
7e-4 from float64). The VAE encoder of the real VAE's shape (the mid-size model) at 992x736 was
5.7-9.2e-4 from its float64 result, the decoder at 512x512 6.7e-5.

The rewrite sums each row first (W values), then the rows' means (C/G x H of them), with the
variance taken from the centred values as PyTorch does, and folds the affine weight and bias
into a per-channel scale and shift:

    g = Reshape(x, [0, G, C/G, -1, W])
    mean = ReduceMean(ReduceMean(g, [4]), [2, 3]);  c = g - mean
    var = ReduceMean(ReduceMean(c * c, [4]), [2, 3])
    y = Reshape(c * (weight' / sqrt(var + eps)) + bias', Shape(x))   weight', bias': [1, G, C/G, 1, 1]

The same encoder is then 8.7-9.4e-6 from float64 and the decoder 4.3e-6, in the same time
(ONNX Runtime 1.31.1, 2 threads: encoder 9.63 -> 9.43 s, decoder 6.28 -> 6.12 s;
export-scripts/vae_precision.py, docs/goldens.md "Large pictures"). The attention's norm sees
[N, C, tokens], which becomes one row of tokens per channel.

It works on the exported graph, so it also applies to packages exported before it
(`python -m zimage_export.vae_group_norm --package P`); export.py runs it on every VAE graph.
Every rewritten graph is run against the original on a probe input before it replaces it. Only
float32 norms in graphs of opset 18 or later are rewritten (ReduceMean's axes as an input).

Needs onnx, onnxruntime and numpy (no torch).
"""

import argparse
from pathlib import Path

from .graph_rewrite import Graph, replace_nodes, rewrite_file, rewrite_vae_package, stage_rewritten
from .onnx_io import node_attribute

# The rewritten graph is more precise than the original; on the small probe inputs both are
# within float rounding of each other.
RTOL = 1e-4
MIN_OPSET = 18


def _affine(g, node, op_type, other_than):
    """(`node`'s sole consumer of type `op_type`, the name of its other input), or None."""
    user = g.sole_consumer(node.output[0], op_type)
    if user is None or len(user.input) != 2 or other_than not in user.input:
        return None
    other = user.input[1] if user.input[0] == other_than else user.input[0]
    return user, other


def _channel_vector(g, name):
    """C when `name` is a float32 constant of shape [C, 1, ...] (at least 2D), else None. Only
    its dims are read: the data may be in an external file."""
    from onnx import TensorProto

    tensor = g.constants.get(name)
    if tensor is None or tensor.data_type != TensorProto.FLOAT or len(tensor.dims) < 2:
        return None
    if any(d != 1 for d in tensor.dims[1:]) or tensor.dims[0] < 1:
        return None
    return int(tensor.dims[0])


def match(g, norm):
    """The parts of one exported group norm around InstanceNormalization `norm`: (x, batch dim
    of the first Reshape, groups, channels, eps, Shape(x), weight, bias, the Add whose output
    the rewrite takes over), or None when it is not one."""
    import numpy as np

    if len(norm.input) != 3:
        return None
    scale, shift = g.constant(norm.input[1]), g.constant(norm.input[2])
    if scale is None or shift is None or scale.dtype != np.float32 or scale.ndim != 1:
        return None
    groups = scale.shape[0]
    if groups < 1 or shift.shape != scale.shape or not (scale == 1).all() or not (shift == 0).all():
        return None
    split = g.op(norm.input[0], "Reshape")
    split_shape = split is not None and g.constant(split.input[1])
    if split is None or split_shape is None or split_shape.shape != (3,) or node_attribute(split, "allowzero", 0):
        return None
    batch, split_groups, rest = (int(v) for v in split_shape)
    if batch < 0 or split_groups != groups or rest != -1:
        return None
    x = split.input[0]
    back = g.sole_consumer(norm.output[0], "Reshape")
    shape_of_x = back is not None and g.op(back.input[1], "Shape")
    if (not shape_of_x or shape_of_x.input[0] != x or node_attribute(shape_of_x, "start", 0) != 0
            or node_attribute(shape_of_x, "end") is not None):
        return None
    mul = _affine(g, back, "Mul", back.output[0])
    add = mul and _affine(g, mul[0], "Add", mul[0].output[0])
    if not add:
        return None
    (_, weight), (add, bias) = mul, add
    channels = _channel_vector(g, weight)
    if channels is None or _channel_vector(g, bias) != channels or channels % groups:
        return None
    return x, batch, groups, channels, float(node_attribute(norm, "epsilon", 1e-5)), back.input[1], weight, bias, add


def _two_level_nodes(prefix, x, batch, groups, channels, eps, shape_of_x, weight, bias, out):
    """The nodes and initializers computing the norm of `x` into `out` (module docstring)."""
    import numpy as np
    from onnx import helper, numpy_helper

    per_group = channels // groups
    consts = {
        "lead": np.array([batch, groups, per_group, -1], np.int64),
        "affine_shape": np.array([1, groups, per_group, 1, 1], np.int64),
        "row_axis": np.array([4], np.int64),
        "group_axes": np.array([2, 3], np.int64),
        "eps": np.array(eps, np.float32),
    }
    name = {k: f"{prefix}/{k}" for k in (*consts, "row", "shape", "grouped", "row_mean", "mean", "centred", "squared",
                                         "row_var", "var", "var_eps", "std", "inv_std", "weight", "bias", "scale",
                                         "scaled", "y")}
    n = helper.make_node
    nodes = [
        # Row: the last axis (W, or the attention's tokens), read at run time.
        n("Shape", [x], [name["row"]], start=-1),
        n("Concat", [name["lead"], name["row"]], [name["shape"]], axis=0),
        n("Reshape", [x, name["shape"]], [name["grouped"]]),
        n("ReduceMean", [name["grouped"], name["row_axis"]], [name["row_mean"]], keepdims=1),
        n("ReduceMean", [name["row_mean"], name["group_axes"]], [name["mean"]], keepdims=1),
        n("Sub", [name["grouped"], name["mean"]], [name["centred"]]),
        n("Mul", [name["centred"], name["centred"]], [name["squared"]]),
        n("ReduceMean", [name["squared"], name["row_axis"]], [name["row_var"]], keepdims=1),
        n("ReduceMean", [name["row_var"], name["group_axes"]], [name["var"]], keepdims=1),
        n("Add", [name["var"], name["eps"]], [name["var_eps"]]),
        n("Sqrt", [name["var_eps"]], [name["std"]]),
        n("Reciprocal", [name["std"]], [name["inv_std"]]),
        # weight and bias stay the graph's own tensors (ONNX Runtime folds these Reshapes).
        n("Reshape", [weight, name["affine_shape"]], [name["weight"]]),
        n("Reshape", [bias, name["affine_shape"]], [name["bias"]]),
        n("Mul", [name["inv_std"], name["weight"]], [name["scale"]]),
        n("Mul", [name["centred"], name["scale"]], [name["scaled"]]),
        n("Add", [name["scaled"], name["bias"]], [name["y"]]),
        n("Reshape", [name["y"], shape_of_x], [out]),
    ]
    for i, node in enumerate(nodes):
        node.name = f"{prefix}/{i}_{node.op_type}"
    return nodes, [numpy_helper.from_array(v, name[k]) for k, v in consts.items()]


def rewrite_model(model) -> int:
    """Rewrites every exported group norm of `model` (an onnx ModelProto, changed in place) and
    removes the nodes left unused. Returns how many were rewritten (0 below opset 18)."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        return 0
    g = Graph(model.graph)
    taken = {n.name for n in model.graph.node} | {t.name for t in model.graph.initializer}
    replacements, initializers = {}, []
    for norm in list(model.graph.node):
        if norm.op_type != "InstanceNormalization":
            continue
        found = match(g, norm)
        if found is None:
            continue
        *parts, add = found
        prefix = f"{norm.name or norm.output[0]}/two_level"
        while any(t.startswith(prefix) for t in taken):
            prefix += "_"
        taken.add(prefix)
        nodes, consts = _two_level_nodes(prefix, *parts, add.output[0])
        replacements[id(add)] = nodes
        initializers += consts
    if not replacements:
        return 0
    # In the Add's place: x, Shape(x), weight and bias are all made before it.
    model.graph.initializer.extend(initializers)
    replace_nodes(model, replacements)
    return len(replacements)


def stage_rewritten_norms(path: Path, inputs: dict) -> tuple[Path | None, int]:
    """Writes the rewrite of graph file `path` beside it and checks it against the original on
    `inputs` (graph_rewrite.stage_rewritten). Returns (the staged file, how many norms were
    rewritten), or (None, 0) when there is none."""
    return stage_rewritten(Path(path), inputs, rewrite_model, RTOL, "group norm")


def rewrite_norms_file(path: Path, inputs: dict) -> int:
    """Rewrites graph file `path` in place; returns how many norms were rewritten (the file is
    untouched when none was, or when the check fails: RuntimeError)."""
    return rewrite_file(stage_rewritten_norms, path, inputs)


def rewrite_package(package: Path) -> dict:
    """Rewrites the group norms of an existing package's VAE graphs (all or none), their
    manifest entries and CPU layouts follow (graph_rewrite.rewrite_vae_package). Returns the
    manifest."""
    return rewrite_vae_package(package, stage_rewritten_norms, lambda count: f"{count} group norm(s) summed in two levels")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="rewrite this package's VAE graphs in place")
    args = parser.parse_args(argv)
    rewrite_package(args.package)


if __name__ == "__main__":
    main()
