"""The int8-activation rewrite's graph (zimage_export/quantize_w8a8.py) against a numpy model of
what it promises: per-token scales max|x| / 127, codes round-half-to-even(x / s) + 128, the
remainder in steps 254 times finer, and the product of those codes with the per-column weight
codes, scaled per row and per column. Checked on a batch of two so that the stacked terms'
rows meet their own scales."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zimage_export.quantize_w8a8 import PREFIX, quantize_model_w8a8, quantize_weight_per_channel

K, N = 40, 24


def product_model(w: np.ndarray):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", N])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="product")], "product", [x], [y],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def run(model, x: np.ndarray, extra=()):
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.UINT8, ["batch", "tokens", K])
                              for name in extra)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def tokens() -> np.ndarray:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 7, K)).astype(np.float32)
    # A token whose largest magnitude is 127 has scale 1: its codes are x itself rounded, and
    # halves must round to even (2.5 -> 2, -3.5 -> -4, 0.5 -> 0), as ONNX's Round does.
    x[0, 1] = np.clip(np.round(x[0, 1] * 20) / 2, -126, 126)
    x[0, 1, :4] = [127.0, 2.5, -3.5, 0.5]
    x[1, 2] *= 1e-3  # a small token: its own fine scale
    x[1, 3, 5] = -40.0  # an outlier sets its token's scale alone
    x[1, 4] = 0.0  # a token of zeros: codes 128, product 0
    return x


def reference(x: np.ndarray, q: np.ndarray, w_scale: np.ndarray, two_terms: bool):
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(127), np.float32(1e-30))
    scaled = x / scale
    rounded = np.rint(scaled)  # half to even
    codes = (rounded + 128).astype(np.uint8)
    rest_codes = (np.rint((scaled - rounded) * np.float32(254)) + 128).astype(np.uint8)
    w = q.astype(np.float64) * w_scale.astype(np.float64)
    y = (codes.astype(np.float64) - 128) @ w * scale
    if two_terms:
        y += (rest_codes.astype(np.float64) - 128) @ w * (scale.astype(np.float64) / 254)
    return codes, rest_codes, y


@pytest.mark.parametrize("activations", ["int8", "int8x2"])
def test_codes_and_product_match_the_numpy_model(activations):
    two_terms = activations == "int8x2"
    w = (np.random.default_rng(11).standard_normal((K, N)) * 0.1).astype(np.float32)
    model = product_model(w)
    quantize_model_w8a8(model, activations=activations)
    x = tokens()
    extra = [PREFIX + "0_codes"] + ([PREFIX + "0_rest_codes"] if two_terms else [])
    got = run(model, x, extra)
    q, w_scale = quantize_weight_per_channel(w)
    codes, rest_codes, y = reference(x, q, w_scale, two_terms)
    assert np.array_equal(got[1], codes)
    assert list(codes[0, 1, :4]) == [255, 130, 124, 128]
    if two_terms:
        assert np.array_equal(got[2], rest_codes)
    assert np.all(got[0][1, 4] == 0)
    np.testing.assert_allclose(got[0], y, rtol=2e-6, atol=1e-6 * np.abs(y).max())
    # And near the float product (measured: one term 2.40e-2, two 5.86e-3: the second bound fails
    # a lost remainder).
    exact = x.astype(np.float64) @ w.astype(np.float64)
    error = np.linalg.norm(got[0] - exact) / np.linalg.norm(exact)
    assert error < (3e-2 if not two_terms else 8e-3), error


@pytest.mark.parametrize("activations", ["int8", "int8x2"])
def test_a_non_finite_token_gives_a_non_finite_row_and_leaves_the_others(activations):
    w = (np.random.default_rng(11).standard_normal((K, N)) * 0.1).astype(np.float32)
    clean = tokens()
    model = product_model(w)
    quantize_model_w8a8(model, activations=activations)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y_clean = session.run(None, {"x": clean})[0]
    for bad in (np.nan, np.inf, -np.inf):
        x = clean.copy()
        x[1, 2, 9] = bad
        y = session.run(None, {"x": x})[0]
        assert np.all(np.isnan(y[1, 2]))
        others = np.ones(y.shape[:2], bool)
        others[1, 2] = False
        assert np.array_equal(y[others], y_clean[others])


def test_the_chain_scales_inside_the_product():
    """Why the graph is fast (docs/quantization.md, "The activations' chain"): every pass over the
    activations or the product costs about a tenth of the product, so the row scales go in as
    MatMulIntegerToFloat's a_scale (no Mul of its output) and the codes come from QuantizeLinear
    (no Round, Add and Cast)."""
    model = product_model(np.ones((K, N), np.float32))
    quantize_model_w8a8(model, activations="int8x2")
    ops = [node.op_type for node in model.graph.node]
    assert "Round" not in ops and "Cast" not in ops and "Abs" not in ops
    product = next(node for node in model.graph.node if node.op_type == "MatMulIntegerToFloat")
    assert product.input[2] == PREFIX + "0_both_scales"
    consumers = [node.op_type for node in model.graph.node if product.output[0] in node.input]
    assert consumers == ["Split"]
