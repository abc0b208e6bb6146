"""int8 weights *and* int8 activations for the transformer (W8A8, `--activations int8`;
docs/quantization.md, "int8 activations").

Why: `MatMulNBits` (the weight-only path in quantize.py) reaches ONNX Runtime's int8 kernels
only through its own block-wise kernels, which on some CPUs are barely faster than float
(1.05x on an AVX-512 VNNI + AMX Xeon), while ONNX Runtime's general int8 product
(uint8 x int8, MLAS's QGEMM: `MatMulInteger`, `MatMulIntegerToFloat`) ran 5.2x faster than
float there with one activation scale per tensor, 2.6-3.1x in the per-token form below. It
needs the activations in int8 too, so each transformer product becomes:

    s   = max(|x|, over the last axis) / 127       one scale per token (row), at run time
    x8  = uint8(round(x / s) + 128)                symmetric, the zero point 128
    y   = MatMulIntegerToFloat(x8, W8, 1, w_scale, 128, 0) * s

with `W8` the weight quantized symmetrically per output channel (`w_scale`, one per column of
the `[K, N]` weight). Per token and not per tensor because one token's outliers would
otherwise coarsen every other token's steps (mid-size model: final latents 1.72e-2 per tensor,
1.43e-2 per token; weight-only int8: 8.6e-3). Products that read the same activation (attention q, k, v; feed-forward
w1, w3) share one quantized copy of it.

Full 8-bit weights, not 7-bit: x86 CPUs without VNNI multiply uint8 by int8 with `vpmaddubsw`,
which can saturate two products' sum at 16 bits. The runtime avoids that there by asking ONNX
Runtime for its exact uint8 x uint8 kernels (`session.x64quantprecision`, slower); 7-bit
weights would have cost every CPU accuracy (2.1e-2 instead of 1.4e-2).

The same layers as the weight-only path stay in float (quantize.transformer_keep).
"""

import numpy as np

from .quantize import COM_MICROSOFT, GraphReport, _initializers, sort_products

# The quantized activation's range: symmetric int8 steps stored as uint8 around 128.
ACTIVATION_STEPS = 127.0
ACTIVATION_ZERO_POINT = 128
WEIGHT_STEPS = 127.0
# The smallest scale: a token of zeros quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-30
PREFIX = "w8a8_"


def quantize_weight_per_channel(w: np.ndarray):
    """Symmetric int8 quantization of a `[K, N]` weight, one scale per output column:
    w ~= q * scale. A column of zeros gets scale 1 (its codes are zeros)."""
    w = w.astype(np.float32)
    scale = np.abs(w).max(axis=0) / WEIGHT_STEPS
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.round(w / scale), -WEIGHT_STEPS, WEIGHT_STEPS).astype(np.int8)
    return q, scale


def _constants(graph, opset: int) -> None:
    from onnx import numpy_helper

    graph.initializer.extend([
        numpy_helper.from_array(np.array(ACTIVATION_STEPS, np.float32), PREFIX + "steps"),
        numpy_helper.from_array(np.array(ACTIVATION_ZERO_POINT, np.float32), PREFIX + "zero_float"),
        numpy_helper.from_array(np.array(ACTIVATION_ZERO_POINT, np.uint8), PREFIX + "zero"),
        numpy_helper.from_array(np.array(MIN_SCALE, np.float32), PREFIX + "min_scale"),
        numpy_helper.from_array(np.array(0.0, np.float32), PREFIX + "zero_times"),
        numpy_helper.from_array(np.array(1.0, np.float32), PREFIX + "one"),
        # Explicit (0): ONNX Runtime's exact-kernel rewrite (session.x64quantprecision) converts
        # the int8 weights to uint8 together with this zero point.
        numpy_helper.from_array(np.array(0, np.int8), PREFIX + "weight_zero"),
    ])
    if opset >= 13:  # ReduceSum (and from 18 ReduceMax) take their axes as an input
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), PREFIX + "last_axis"))


def _quantize_activation(x: str, p: str, opset: int) -> tuple[list, str, str]:
    """Nodes turning activation `x` into (uint8 codes, per-row scale)."""
    from onnx import TensorProto, helper

    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18, ReduceSum from 13
        reduce_max = helper.make_node("ReduceMax", [p + "abs", PREFIX + "last_axis"], [p + "max"], name=p + "max",
                                      keepdims=1)
    else:
        reduce_max = helper.make_node("ReduceMax", [p + "abs"], [p + "max"], name=p + "max", axes=[-1], keepdims=1)
    if opset >= 13:
        reduce_sum = helper.make_node("ReduceSum", [p + "abs", PREFIX + "last_axis"], [p + "sum"], name=p + "sum",
                                      keepdims=1)
    else:
        reduce_sum = helper.make_node("ReduceSum", [p + "abs"], [p + "sum"], name=p + "sum", axes=[-1], keepdims=1)
    nodes = [
        helper.make_node("Abs", [x], [p + "abs"], name=p + "abs"),
        reduce_max,
        # ONNX Runtime's ReduceMax skips NaN, and a NaN's code would be an ordinary byte: the
        # row's scale must carry it, so that the product is NaN as the float one would be (and
        # the runtime reports non-finite values instead of an image from garbage). A sum keeps
        # NaN (and turns +-inf into inf): the scale adds 0 times it.
        reduce_sum,
        helper.make_node("Mul", [p + "sum", PREFIX + "zero_times"], [p + "non_finite"], name=p + "non_finite"),
        helper.make_node("Div", [p + "max", PREFIX + "steps"], [p + "scale_raw"], name=p + "scale_raw"),
        helper.make_node("Max", [p + "scale_raw", PREFIX + "min_scale"], [p + "scale_finite"], name=p + "scale_finite"),
        helper.make_node("Add", [p + "scale_finite", p + "non_finite"], [p + "scale"], name=p + "scale"),
        helper.make_node("Div", [x, p + "scale"], [p + "scaled"], name=p + "scaled"),
        helper.make_node("Round", [p + "scaled"], [p + "rounded"], name=p + "rounded"),
        helper.make_node("Add", [p + "rounded", PREFIX + "zero_float"], [p + "shifted"], name=p + "shifted"),
        helper.make_node("Cast", [p + "shifted"], [p + "codes"], name=p + "codes", to=TensorProto.UINT8),
    ]
    return nodes, p + "codes", p + "scale"


def quantize_model_w8a8(model, names: dict | None = None, keep=()) -> GraphReport:
    """Rewrites `model`'s constant-weight products (not matching `keep`) as int8 x int8
    `MatMulIntegerToFloat` with per-token activation scales, in place. `names`: initializer name ->
    diffusers parameter name, for `keep` and the report (as quantize.quantize_model)."""
    from onnx import helper, numpy_helper

    report = GraphReport(accuracy_level=None, activations="int8")
    to_quantize = {node.name for node in sort_products(model, names or {}, keep, report)[0]}
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inits = _initializers(graph)
    quantized_inputs = {}  # activation name -> (codes, scale)
    nodes = []
    for node in graph.node:
        if node.name not in to_quantize:
            nodes.append(node)
            continue
        w = node.input[1]
        q, scale = quantize_weight_per_channel(numpy_helper.to_array(inits[w]))
        graph.initializer.remove(inits.pop(w))
        graph.initializer.extend([numpy_helper.from_array(q, w + "_W8"), numpy_helper.from_array(scale, w + "_scale")])
        x = node.input[0]
        if x not in quantized_inputs:
            made, codes, row_scale = _quantize_activation(x, f"{PREFIX}{len(quantized_inputs)}_", opset)
            nodes.extend(made)
            quantized_inputs[x] = (codes, row_scale)
        codes, row_scale = quantized_inputs[x]
        p = node.name + "_w8a8_"
        nodes.extend([
            # The int32 sums times the column scales, in ONNX Runtime's kernel (a_scale 1: the
            # row scales follow, a tensor the kernel takes only as a scalar).
            helper.make_node("MatMulIntegerToFloat",
                             [codes, w + "_W8", PREFIX + "one", w + "_scale", PREFIX + "zero", PREFIX + "weight_zero"],
                             [p + "columns"], name=p + "product", domain=COM_MICROSOFT),
            helper.make_node("Mul", [p + "columns", row_scale], [node.output[0]], name=p + "out"),
        ])
    if quantized_inputs:
        _constants(graph, opset)
        if not any(o.domain == COM_MICROSOFT for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(COM_MICROSOFT, 1))
    graph.ClearField("node")
    graph.node.extend(nodes)
    return report
