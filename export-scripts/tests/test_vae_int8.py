"""The int8 VAE decoder's pure parts (numpy only): the calibration pictures and which
convolutions are quantized."""

from types import SimpleNamespace

import numpy as np

from zimage_export.vae_int8 import calibration_pictures, quantized_conv_nodes


def test_calibration_pictures_are_fixed_and_varied():
    a, b = calibration_pictures(64), calibration_pictures(64)
    assert a.shape == (4, 3, 64, 64) and a.dtype == np.float32
    assert np.array_equal(a, b), "the same pictures every export"
    assert a.min() >= -1 and a.max() <= 1
    # Four different kinds of picture, none flat.
    assert all(a[i].std() > 0.05 for i in range(4))
    assert all(not np.allclose(a[i], a[j]) for i in range(4) for j in range(i + 1, 4))


def node(name, op, weight):
    return SimpleNamespace(name=name, op_type=op, input=["x", weight])


def test_the_up_blocks_after_the_first_are_quantized_and_the_rest_kept():
    model = SimpleNamespace(graph=SimpleNamespace(node=[
        node("c0", "Conv", "decoder.conv_in.weight"),
        node("c1", "Conv", "decoder.mid_block.resnets.0.conv1.weight"),
        node("c2", "Conv", "decoder.up_blocks.0.resnets.0.conv1.weight"),
        node("c3", "Conv", "decoder.up_blocks.1.resnets.0.conv1.weight"),
        node("c4", "Conv", "decoder.up_blocks.1.upsamplers.0.weights.2"),
        node("c5", "Conv", "decoder.up_blocks.12.resnets.2.conv_shortcut.weight"),
        node("m", "MatMul", "decoder.up_blocks.2.attn.weight"),
        node("c6", "Conv", "decoder.conv_out.weight"),
    ]))
    quantized, kept = quantized_conv_nodes(model)
    assert quantized == ["c3", "c4", "c5"]
    assert kept == ["decoder.conv_in.weight", "decoder.mid_block.resnets.0.conv1.weight",
                    "decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.conv_out.weight"]
