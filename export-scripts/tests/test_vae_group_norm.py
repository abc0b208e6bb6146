"""The VAE group-norm rewrite (zimage_export/vae_group_norm.py) on graphs shaped like the
exporter's, and on the committed tiny package's encoder.

The graphs are built with onnx.helper in the shape torch.onnx (dynamo, opset 18) gives
`nn.GroupNorm`: Reshape to [0, G, -1], InstanceNormalization with unit scale and zero bias,
Reshape back to Shape(x) (with an explicit start=0, as the exporter writes it), then Mul and Add
by [C, 1, 1] (or [C, 1] for the attention's [N, C, tokens] input). numpy in float64 gives the
reference."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zimage_export.fixtures.probe_pictures import photo_sized_vae_input
from zimage_export.vae_group_norm import rewrite_model, rewrite_norms_file, rewrite_package

REPO = Path(__file__).resolve().parents[2]


def exported_group_norm(channels=8, groups=2, rank=4, seed=0, unit_scale=True, affine=True, opset=18, eps=1e-6):
    """x -> GroupNorm(groups, channels) -> y, as the exporter writes it. Returns (model, weight, bias)."""
    rng = np.random.default_rng(seed)
    weight = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
    per_channel = (channels,) + (1,) * (rank - 2)
    inits = [
        numpy_helper.from_array(np.array([0, groups, -1], np.int64), "split_shape"),
        numpy_helper.from_array(np.full(groups, 1.0 if unit_scale else 2.0, np.float32), "ones"),
        numpy_helper.from_array(np.zeros(groups, np.float32), "zeros"),
        numpy_helper.from_array(weight.reshape(per_channel), "weight"),
        numpy_helper.from_array(bias.reshape(per_channel), "bias"),
    ]
    n = helper.make_node
    nodes = [
        n("Reshape", ["x", "split_shape"], ["split"], allowzero=0),
        n("InstanceNormalization", ["split", "ones", "zeros"], ["normed"], epsilon=eps),
        n("Shape", ["x"], ["x_shape"], start=0),
        n("Reshape", ["normed", "x_shape"], ["back"]),
    ]
    last = "back"
    if affine:
        nodes += [n("Mul", ["back", "weight"], ["scaled"]), n("Add", ["scaled", "bias"], ["y"])]
        last = "y"
    dims = [f"d{i}" for i in range(rank)]
    graph = helper.make_graph(nodes, "group_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    return model, weight, bias


def reference(x, groups, weight, bias, eps=1e-6):
    """PyTorch's GroupNorm in float64."""
    xd = x.astype(np.float64)
    grouped = xd.reshape(xd.shape[0], groups, -1)
    mean = grouped.mean(-1, keepdims=True)
    var = ((grouped - mean) ** 2).mean(-1, keepdims=True)
    y = ((grouped - mean) / np.sqrt(var + eps)).reshape(xd.shape)
    per_channel = (1, -1) + (1,) * (xd.ndim - 2)
    return y * weight.reshape(per_channel) + bias.reshape(per_channel)


def run(model, x, threads=2):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def op_types(model):
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("rank,shape", [(4, (2, 8, 6, 10)), (3, (1, 8, 60)), (4, (1, 6, 5, 7))])
def test_the_exported_group_norm_is_rewritten_with_the_same_outputs(rank, shape):
    channels = shape[1]
    model, weight, bias = exported_group_norm(channels=channels, groups=2, rank=rank)
    x = (np.random.default_rng(1).standard_normal(shape) * 2 + 1).astype(np.float32)
    before = run(model, x)
    assert rewrite_model(model) == 1
    onnx.checker.check_model(model)
    types = op_types(model)
    assert "InstanceNormalization" not in types and types.count("ReduceMean") == 4
    # The graph's own weight and bias tensors are kept; the norm's unit scale and zero bias go.
    assert sorted(t.name for t in model.graph.initializer if "/" not in t.name) == ["bias", "weight"]
    after = run(model, x)
    want = reference(x, 2, weight, bias)
    assert after.shape == want.shape
    assert np.abs(after - want).max() < 2e-6
    assert np.abs(after - before).max() < 2e-6


def test_large_groups_are_summed_precisely():
    """4 channels x 512 x 768 values per group with a large mean against a small spread, as
    smooth pictures give: the one-pass InstanceNormalization drifts, the rewrite does not."""
    model, weight, bias = exported_group_norm(channels=8, groups=2)
    x = (np.random.default_rng(2).standard_normal((1, 8, 512, 768)) * 0.5 + 3).astype(np.float32)
    want = reference(x, 2, weight, bias)
    before = np.abs(run(model, x) - want).max()
    rewrite_model(model)
    after = np.abs(run(model, x) - want).max()
    assert after < 5e-6, after
    assert before > 10 * after, (before, after)


def test_what_is_not_an_exported_group_norm_is_left_alone():
    for model in (exported_group_norm(unit_scale=False)[0],  # the norm's own scale is not 1
                  exported_group_norm(affine=False)[0],  # no per-channel Mul/Add after it
                  exported_group_norm(opset=17)[0]):  # ReduceMean takes its axes as an input from 18
        before = model.SerializeToString()
        assert rewrite_model(model) == 0
        assert model.SerializeToString() == before
    # Channels that the groups do not divide.
    model, _, _ = exported_group_norm(channels=6, groups=4)
    assert rewrite_model(model) == 0


def test_rewrite_norms_file_rewrites_in_place(tmp_path):
    model, weight, bias = exported_group_norm()
    path = tmp_path / "vae_encoder.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(3).standard_normal((1, 8, 4, 6)).astype(np.float32)
    assert rewrite_norms_file(path, {"x": x}) == 1
    assert "InstanceNormalization" not in op_types(onnx.load(str(path)))
    assert rewrite_norms_file(path, {"x": x}) == 0  # nothing left to rewrite: untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_encoder.onnx"]


def test_rewrite_package_updates_the_manifest(tmp_path):
    for name in ("vae_decoder", "vae_encoder"):
        onnx.save(exported_group_norm()[0], str(tmp_path / f"{name}.onnx"))
    manifest = {"vae": {"scale_factor": 1, "latent_channels": 8},
                "graphs": {"vae_decoder": {"path": "vae_decoder.onnx"}, "vae_encoder": {"path": "vae_encoder.onnx"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    # The probe input of a graph named vae_encoder is a picture: give the encoder 3 channels.
    onnx.save(exported_group_norm(channels=3, groups=3)[0], str(tmp_path / "vae_encoder.onnx"))
    for model_path in tmp_path.glob("*.onnx"):
        model = onnx.load(str(model_path))
        model.graph.input[0].name = "image" if model_path.stem == "vae_encoder" else "latents"
        for node in model.graph.node:
            node.input[:] = [model.graph.input[0].name if i == "x" else i for i in node.input]
        onnx.save(model, str(model_path))
    written = rewrite_package(tmp_path)
    for name in ("vae_decoder", "vae_encoder"):
        path = tmp_path / f"{name}.onnx"
        assert "InstanceNormalization" not in op_types(onnx.load(str(path)))
        assert written["graphs"][name]["bytes"] == path.stat().st_size
    assert json.loads((tmp_path / "manifest.json").read_text()) == written


def test_the_committed_encoder_is_exact_at_photo_size():
    """models/tiny-zimage's VAE encoder on a 992x736 picture against the same encoder in float64
    (tests/golden/tiny-zimage/large/vae_encoder_f64_mean.npy, goldens_pipeline.py): 7.2e-6 with
    the rewritten norms; the exported InstanceNormalization gave 1.1e-4 (PyTorch's float32
    encoder is itself 4.6e-4 from it)."""
    exact = np.load(REPO / "tests/golden/tiny-zimage/large/vae_encoder_f64_mean.npy")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(REPO / "models/tiny-zimage/vae_encoder.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    mean = session.run(None, {"image": photo_sized_vae_input()})[0][:, :exact.shape[1]]
    assert mean.shape == exact.shape
    assert np.isfinite(mean).all()
    assert np.abs(mean - exact).max() < 2e-5
