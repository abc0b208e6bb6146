"""The quantizer's pure parts (numpy only): options, and the uint8 row quantization of the token
embedding table."""

import sys
import types

import numpy as np
import pytest

from zimage_export.quantize import QuantizeOptions, check_keep_patterns, quantize_rows_uint8


def dequantize(q, scale, zero, block_size):
    cols = q.shape[1]
    s = np.repeat(scale, block_size, axis=1)[:, :cols]
    z = np.repeat(zero.astype(np.float32), block_size, axis=1)[:, :cols]
    return (q.astype(np.float32) - z) * s


@pytest.mark.parametrize("cols,block", [(64, 32), (40, 16), (16, 32), (7, 16)])
def test_uint8_rows_round_trip_within_half_a_step(cols, block):
    table = np.random.default_rng(cols).standard_normal((50, cols)).astype(np.float32) * 3
    table[3] = 0.0  # an all-zero row: scale 1, exact
    table[4] = 2.5  # an all-positive row: the range still includes 0
    q, scale, zero = quantize_rows_uint8(table, block)
    blocks = -(-cols // block)
    assert q.shape == table.shape and q.dtype == np.uint8
    assert scale.shape == zero.shape == (50, blocks) and zero.dtype == np.uint8
    back = dequantize(q, scale, zero, block)
    step = np.repeat(scale, block, axis=1)[:, :cols]
    assert np.all(np.abs(back - table) <= step / 2 * (1 + 1e-5))
    assert np.all(back[3] == 0) and np.all(scale[3] == 1)
    assert np.all(zero[4] == 0)
    assert np.all(back[table == 0] == 0)  # zero is exact


def test_options_are_checked():
    assert QuantizeOptions("int8").bits == 8 and QuantizeOptions("int4", 64, "hqq").bits == 4
    for bad in (dict(weights="int3"), dict(weights="int8", block_size=48), dict(weights="int8", block_size=512),
                dict(weights="int8", method="gptq", gptq_damping=-1.0), dict(weights="int8", method="hqq"),
                dict(weights="int8", text_encoder_accuracy_level=5)):
        with pytest.raises(ValueError):
            QuantizeOptions(**bad)


def test_the_text_encoder_multiplies_in_float_only_for_int8():
    # int8: float compute cuts the text encoder's error by a third; int4: no gain, so the int8 compute.
    assert QuantizeOptions("int8").text_encoder_accuracy_level == 0
    assert QuantizeOptions("int4").text_encoder_accuracy_level == 4
    assert QuantizeOptions("int4", accuracy_level=0).text_encoder_accuracy_level == 0
    assert QuantizeOptions("int8", text_encoder_accuracy_level=4).text_encoder_accuracy_level == 4


def test_the_text_encoder_may_be_wider_than_the_transformer(monkeypatch):
    # section() names the quantizer's version; this venv has no ONNX Runtime.
    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(__version__="1.31.1"))
    same = QuantizeOptions("int4")
    assert same.text_encoder_weights == "int4" and same.lm_head_bits == 4
    assert "text_encoder_weights" not in same.section()  # (as in packages made before the option)
    mixed = QuantizeOptions("int4", text_encoder_weights="int8")
    assert mixed.bits == 4 and mixed.text_encoder_weights == "int8"
    assert mixed.text_encoder_accuracy_level == 0  # an int8 text encoder multiplies in float
    assert mixed.lm_head_bits == 8  # the tied table is the text encoder's embedding too
    assert QuantizeOptions("int4", text_encoder_weights="int8", lm_head_weights="int4").lm_head_bits == 4
    section = mixed.section()
    assert (section["weights"], section["bits"], section["text_encoder_weights"]) == ("int4", 4, "int8")
    for bad in (dict(weights="int4", text_encoder_weights="int2"),
                dict(weights="int4", method="hqq", text_encoder_weights="int8")):
        with pytest.raises(ValueError):
            QuantizeOptions(**bad)


def test_keep_patterns_must_name_a_weight():
    names = ["noise_refiner.0.attention.to_q.weight", "layers.3.feed_forward.w2.weight"]
    check_keep_patterns(("noise_refiner.*", "layers.3.*", "*.w2.weight"), names)
    with pytest.raises(ValueError, match="'noise_refinr.\\*' matches no transformer weight"):
        check_keep_patterns(("noise_refiner.*", "noise_refinr.*"), names)


def test_int8_activations_take_int8_rtn_weights():
    assert QuantizeOptions("int8", activations="int8").activations == "int8"
    assert QuantizeOptions("int8", activations="int8x2").activations == "int8x2"
    for bad in (dict(weights="int4", activations="int8"), dict(weights="int8", activations="int4"),
                dict(weights="int4", method="hqq", activations="int8"), dict(weights="int4", activations="int8x2"),
                dict(weights="int8", activations="int16"), dict(weights="int8", activations="int8x3")):
        with pytest.raises(ValueError):
            QuantizeOptions(**bad)


def test_per_channel_weights_round_trip_within_half_a_step():
    from zimage_export.quantize_w8a8 import quantize_weight_per_channel

    w = np.random.default_rng(3).standard_normal((96, 40)).astype(np.float32) * 0.05
    w[:, 7] = 0.0  # a column of zeros: scale 1, codes 0
    w[5, 9] = 3.0  # one outlier sets its column's scale alone
    q, scale = quantize_weight_per_channel(w)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (40,) and scale.dtype == np.float32
    assert np.abs(q).max() <= 127 and q[5, 9] == 127
    back = q.astype(np.float32) * scale
    assert np.all(np.abs(back - w) <= scale / 2 * (1 + 1e-5))
    assert scale[7] == 1 and np.all(q[:, 7] == 0)
    assert np.isclose(scale[9], 3.0 / 127)
