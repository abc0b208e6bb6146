"""int8 weights *and* int8 activations for the transformer (W8A8, `--activations int8`;
docs/quantization.md, "int8 activations").

Why: `MatMulNBits` (the weight-only path in quantize.py) reaches ONNX Runtime's int8 kernels
only through its own block-wise kernels, which on some CPUs are barely faster than float
(1.05x on an AVX-512 VNNI + AMX Xeon), while ONNX Runtime's general int8 product
(uint8 x int8, MLAS's QGEMM: `MatMulInteger`, `MatMulIntegerToFloat`) ran 5.2x faster than
float there with one activation scale per tensor, 2.6-3.1x in the per-token form below. It
needs the activations in int8 too, so each transformer product becomes:

    s   = max(|x|, over the last axis) / 127       one scale per token (row), at run time
    x8  = uint8(round(x / s) + 128)                symmetric, the zero point 128 (QuantizeLinear)
    y   = MatMulIntegerToFloat(x8, W8, s, w_scale, 128, 0)     s broadcast over y's rows

with `W8` the weight quantized symmetrically per output channel (`w_scale`, one per column of
the `[K, N]` weight). Per token and not per tensor because one token's outliers would
otherwise coarsen every other token's steps (mid-size model: final latents 1.72e-2 per tensor,
1.43e-2 per token; weight-only int8: 8.6e-3). Products that read the same activation (attention q, k, v; feed-forward
w1, w3) share one quantized copy of it.

Full 8-bit weights, not 7-bit: x86 CPUs without VNNI multiply uint8 by int8 with `vpmaddubsw`,
which can saturate two products' sum at 16 bits. The runtime avoids that there by asking ONNX
Runtime for its exact uint8 x uint8 kernels (`session.x64quantprecision`, slower); 7-bit
weights would have cost every CPU accuracy (2.1e-2 instead of 1.4e-2).

Two int8 terms (`--activations int8x2`): one 8-bit code per value leaves the activations'
rounding as large as the weights' (each about half of int8's error), and a trained model's
outlier channels coarsen every other channel's steps of their token. So the rounding's
remainder is quantized too, with steps 254 times finer (it lies within half a step):

    x   ~= s * (c + r / 254)                       c, r: int8 codes, both stored around 128
    P   = MatMulIntegerToFloat(concat(c8, r8 along axis 0), W8, concat(s, s / 254), w_scale, 128, 0)
    y   = P's first half + P's second half

about 16-bit activations for an int8 product of twice the rows: the error left is the
weights' (mid-size model: final latents 1.07e-2; a function-preserving copy with outlier
channels, x20 on 8 channels of each product's input, outlier_channels.py: 1.86e-2 where int8
gives 6.5e-2 and weight-only int8 1.80e-2).

The same layers as the weight-only path stay in float (quantize.transformer_keep).
"""

import numpy as np

from .quantize import ACTIVATIONS, COM_MICROSOFT, GraphReport, _calibrated_codes, _initializers, sort_products

# The quantized activation's range: symmetric int8 steps stored as uint8 around 128.
ACTIVATION_STEPS = 127.0
ACTIVATION_ZERO_POINT = 128
# int8x2: the remainder of the first rounding, within [-0.5, 0.5] steps, in steps 254x finer
# (codes within [-127, 127], as the first term's).
RESIDUAL_STEPS = 254.0
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


def _constants(graph, opset: int, two_terms: bool) -> None:
    from onnx import numpy_helper

    graph.initializer.extend([
        numpy_helper.from_array(np.array(ACTIVATION_STEPS, np.float32), PREFIX + "steps"),
        numpy_helper.from_array(np.array(ACTIVATION_ZERO_POINT, np.uint8), PREFIX + "zero"),
        numpy_helper.from_array(np.array(MIN_SCALE, np.float32), PREFIX + "min_scale"),
        numpy_helper.from_array(np.array(0.0, np.float32), PREFIX + "zero_times"),
        numpy_helper.from_array(np.array(1.0, np.float32), PREFIX + "one"),
    ])
    if two_terms:
        graph.initializer.extend([
            numpy_helper.from_array(np.array(RESIDUAL_STEPS, np.float32), PREFIX + "residual_steps"),
            numpy_helper.from_array(np.array(1.0 / RESIDUAL_STEPS, np.float32), PREFIX + "residual_scale"),
        ])
    if opset >= 13:  # ReduceSum (and from 18 ReduceMax) take their axes as an input
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), PREFIX + "last_axis"))


def _reduce(op: str, x: str, out: str, opset: int):
    """`op` over the last axis, kept: ReduceMax/ReduceMin take their axes as an input from opset
    18, ReduceSum from 13."""
    from onnx import helper

    if opset >= (13 if op == "ReduceSum" else 18):
        return helper.make_node(op, [x, PREFIX + "last_axis"], [out], name=out, keepdims=1)
    return helper.make_node(op, [x], [out], name=out, axes=[-1], keepdims=1)


def _quantize_activation(x: str, p: str, opset: int, two_terms: bool) -> tuple[list, str, str]:
    """Nodes turning activation `x` into (uint8 codes, per-row scales for MatMulIntegerToFloat's
    `a_scale`); for `two_terms` the codes are the first term's and the remainder's stacked along
    axis 0, and the scales `s` and `s / 254` stacked the same way.

    Every pass over the activations costs about as much as a tenth of the product, so the chain
    makes as few as it can: the range from ReduceMax and ReduceMin of `x` itself (no `Abs`
    copy), the codes from `QuantizeLinear` (rounding half to even, as `Round`, plus the zero
    point and the cast in one vectorised pass), the rounded values back from
    `DequantizeLinear`, and the row scales applied inside the product (its `a_scale` broadcasts
    over the output rows in ONNX Runtime) instead of by separate `Mul`s of the output."""
    from onnx import helper

    nodes = [
        _reduce("ReduceMax", x, p + "high", opset),
        _reduce("ReduceMin", x, p + "low", opset),
        helper.make_node("Neg", [p + "low"], [p + "minus_low"], name=p + "minus_low"),
        helper.make_node("Max", [p + "high", p + "minus_low"], [p + "max"], name=p + "max"),
        # ONNX Runtime's ReduceMax and ReduceMin skip NaN, and a NaN's code would be an ordinary
        # byte: the row's scale must carry it, so that the product is NaN as the float one would
        # be (and the runtime reports non-finite values instead of an image from garbage). A sum
        # keeps NaN (and an infinity, which 0 times turns into NaN): the scale adds 0 times it.
        _reduce("ReduceSum", x, p + "sum", opset),
        helper.make_node("Mul", [p + "sum", PREFIX + "zero_times"], [p + "non_finite"], name=p + "non_finite"),
        helper.make_node("Div", [p + "max", PREFIX + "steps"], [p + "scale_raw"], name=p + "scale_raw"),
        helper.make_node("Max", [p + "scale_raw", PREFIX + "min_scale"], [p + "scale_finite"], name=p + "scale_finite"),
        helper.make_node("Add", [p + "scale_finite", p + "non_finite"], [p + "scale"], name=p + "scale"),
        helper.make_node("Div", [x, p + "scale"], [p + "scaled"], name=p + "scaled"),
        # round(scaled) + 128 as uint8: within [1, 255] (|scaled| <= 127), so never saturated.
        helper.make_node("QuantizeLinear", [p + "scaled", PREFIX + "one", PREFIX + "zero"], [p + "codes"],
                         name=p + "codes"),
    ]
    if not two_terms:
        return nodes, p + "codes", p + "scale"
    nodes += [
        helper.make_node("DequantizeLinear", [p + "codes", PREFIX + "one", PREFIX + "zero"], [p + "rounded"],
                         name=p + "rounded"),
        helper.make_node("Sub", [p + "scaled", p + "rounded"], [p + "rest"], name=p + "rest"),
        helper.make_node("Mul", [p + "rest", PREFIX + "residual_steps"], [p + "rest_scaled"], name=p + "rest_scaled"),
        helper.make_node("QuantizeLinear", [p + "rest_scaled", PREFIX + "one", PREFIX + "zero"], [p + "rest_codes"],
                         name=p + "rest_codes"),
        # One product per weight, not two: ONNX Runtime's exact-kernel rewrite converts each
        # product's int8 weight to a new uint8 initializer of a fixed name, and a second product
        # of the same weight then fails the session (quantize_model_w8a8's zero points).
        # Stacked, both terms go through one product of twice the rows, each row with its scale.
        helper.make_node("Concat", [p + "codes", p + "rest_codes"], [p + "both_codes"], name=p + "both_codes", axis=0),
        helper.make_node("Mul", [p + "scale", PREFIX + "residual_scale"], [p + "rest_scale"], name=p + "rest_scale"),
        helper.make_node("Concat", [p + "scale", p + "rest_scale"], [p + "both_scales"], name=p + "both_scales",
                         axis=0),
    ]
    return nodes, p + "both_codes", p + "both_scales"


def quantize_model_w8a8(model, names: dict | None = None, keep=(), activations: str = "int8",
                        calibrate=None) -> GraphReport:
    """Rewrites `model`'s constant-weight products (not matching `keep`) as int8 x int8
    `MatMulIntegerToFloat` with per-token activation scales, in place: for `activations` "int8x2"
    each product takes the activations' two terms as twice the rows. `names`: initializer
    name -> diffusers parameter name, for `keep` and the report (as quantize.quantize_model).

    `calibrate`: None rounds the weights to nearest; or a function (model, product nodes) ->
    ({weight name: (int8 codes, scales)}, summary) giving calibrated codes (GPTQ:
    calibration.gptq_codes), in RTN's format (a weight it leaves out is rounded to nearest)."""
    from onnx import helper, numpy_helper

    if activations is None or activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS[1:]}, not {activations!r}")
    two_terms = activations == "int8x2"
    report = GraphReport(accuracy_level=None, activations=activations)
    products = sort_products(model, names or {}, keep, report)[0]
    to_quantize = {node.name for node in products}
    calibrated = _calibrated_codes(calibrate, model, products, report)
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inits = _initializers(graph)
    quantized_inputs = {}  # activation name -> (codes, scale)
    done = {}  # weight -> (codes, scales, products so far): a weight two products read
    nodes = []
    for node in graph.node:
        if node.name not in to_quantize:
            nodes.append(node)
            continue
        w = node.input[1]
        if w not in done:
            q, scale = calibrated.pop(w, None) or quantize_weight_per_channel(numpy_helper.to_array(inits[w]))
            graph.initializer.remove(inits.pop(w))
            done[w] = (q, scale, 0)
        q, scale, uses = done[w]
        done[w] = (q, scale, uses + 1)
        # Each product gets its own initializers (the Omni graph runs each adaLN modulation
        # twice): the second's are named `<w>_<k>` (the same bytes, stored once on disk).
        name = w if uses == 0 else f"{w}_{uses}"
        graph.initializer.extend([
            numpy_helper.from_array(q, name + "_W8"),
            numpy_helper.from_array(scale, name + "_scale"),
            # The weight's zero point (0), explicit and its own: ONNX Runtime's exact-kernel
            # rewrite (session.x64quantprecision) converts each product's int8 weight and zero
            # point to new uint8 initializers of fixed names, so a zero point (or weight) that two
            # products share fails the session ("Attempt to replace the existing tensor").
            numpy_helper.from_array(np.array(0, np.int8), name + "_W8_zero"),
        ])
        x = node.input[0]
        if x not in quantized_inputs:
            made, codes, row_scale = _quantize_activation(x, f"{PREFIX}{len(quantized_inputs)}_", opset, two_terms)
            nodes.extend(made)
            quantized_inputs[x] = (codes, row_scale)
        codes, row_scale = quantized_inputs[x]
        p = node.name + "_w8a8_"

        # The int32 sums times the column scales and the rows' scales, in ONNX Runtime's kernel.
        # (Per-row a_scale is outside the contrib op's documented shapes, a scalar or one per
        # column of A: ONNX Runtime 1.31's CPU kernel multiplies its output by any a_scale that
        # broadcasts to it. tests/test_quantize_w8a8.py checks the result against a numpy
        # model, so an ONNX Runtime that does otherwise fails the tests, not the images.)
        product = node.output[0] if not two_terms else p + "both"
        nodes.append(helper.make_node(
            "MatMulIntegerToFloat", [codes, name + "_W8", row_scale, name + "_scale", PREFIX + "zero",
                                     name + "_W8_zero"], [product], name=p + "product", domain=COM_MICROSOFT))
        if two_terms:  # the two terms' rows back apart, each already scaled: first + remainder
            split = {"num_outputs": 2} if opset >= 18 else {}  # (before 18: equal parts by default)
            nodes.extend([
                helper.make_node("Split", [product], [p + "coarse", p + "fine"], name=p + "split", axis=0, **split),
                helper.make_node("Add", [p + "coarse", p + "fine"], [node.output[0]], name=p + "sum"),
            ])
    if quantized_inputs:
        _constants(graph, opset, two_terms)
        if not any(o.domain == COM_MICROSOFT for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(COM_MICROSOFT, 1))
    graph.ClearField("node")
    graph.node.extend(nodes)
    return report
