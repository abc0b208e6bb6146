"""The VAE attention rewrite (zimage_export/vae_attention.py) on graphs shaped like the exporter's.

The graphs are built with onnx.helper in the shape torch.onnx (dynamo, opset 18) gives diffusers'
VAE attention: Linear q/k/v, heads split by a Reshape to a Concat-made [B, -1, heads, D], the key
transposed through Shape/Slice/Reshape/Transpose, scalar Muls of D^-1/4 on both sides, then
MatMul-Softmax-MatMul and the heads merged back. ONNX Runtime runs the rewritten graphs; numpy
gives the reference."""

import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zimage_export.vae_attention import COM_MICROSOFT, fuse_file, fuse_model

INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)


def exported_attention(channels=8, heads=1, dtype=np.float32, scaled=True, extra_softmax_use=False, seed=0,
                       input_name="x"):
    """x [B, S, channels] -> attention -> to_out, as the exporter writes it. Returns (model, weights).
    With another `input_name`, the input is a VAE's [B, channels, H, W], flattened to x first."""
    rng = np.random.default_rng(seed)
    d = channels // heads
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = {n: (rng.standard_normal((channels, channels)) / np.sqrt(channels)).astype(dtype)
               for n in ("wq", "wk", "wv", "wo")}
    biases = {n: (rng.standard_normal(channels) * 0.1).astype(dtype) for n in ("bq", "bk", "bv")}
    consts = {"minus_one": np.array([-1], np.int64), "heads": np.array([heads], np.int64),
              "head_dim": np.array([d], np.int64), "channels": np.array([channels], np.int64),
              "i_max": np.array([INT64_MAX], np.int64), "i_min": np.array([INT64_MIN], np.int64),
              "m1": np.array([-1], np.int64), "m2": np.array([-2], np.int64),
              "c": np.array([d ** -0.25], dtype)}
    n = helper.make_node
    nodes = []
    if input_name != "x":
        consts["flat_shape"] = np.array([0, channels, -1], np.int64)
        nodes += [n("Reshape", [input_name, "flat_shape"], ["x_flat"]), n("Transpose", ["x_flat"], ["x"], perm=[0, 2, 1])]
    nodes.append(n("Shape", ["x"], ["batch"], start=0, end=1))
    for p in "qkv":
        nodes += [n("MatMul", ["x", f"w{p}"], [f"{p}0"]), n("Add", [f"{p}0", f"b{p}"], [f"{p}_lin"])]
    nodes.append(n("Concat", ["batch", "minus_one", "heads", "head_dim"], ["split"], axis=0))
    for p in "qkv":
        nodes += [n("Reshape", [f"{p}_lin", "split"], [f"{p}_r"], allowzero=1),
                  n("Transpose", [f"{p}_r"], [f"{p}4"], perm=[0, 2, 1, 3])]
    nodes += [
        n("Shape", ["k4"], ["ks"]),
        n("Slice", ["ks", "m1", "i_max"], ["d_dim"]),
        n("Slice", ["ks", "m2", "m1"], ["s_dim"]),
        n("Slice", ["ks", "i_min", "m2"], ["bh_dims"]),
        n("Concat", ["minus_one", "s_dim", "d_dim"], ["flat"], axis=0),
        n("Reshape", ["k4", "flat"], ["k3"]),
        n("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
        n("Concat", ["bh_dims", "d_dim", "s_dim"], ["back"], axis=0),
        n("Reshape", ["k3t", "back"], ["kt"]),
    ]
    q, k = "q4", "kt"
    if scaled:
        nodes += [n("Mul", ["q4", "c"], ["qs"]), n("Mul", ["c", "kt"], ["kts"])]
        q, k = "qs", "kts"
    nodes += [
        n("MatMul", [q, k], ["scores"]),
        n("Softmax", ["scores"], ["p"], axis=-1),
        n("MatMul", ["p", "v4"], ["o4"]),
        n("Transpose", ["o4"], ["o_t"], perm=[0, 2, 1, 3]),
        n("Concat", ["batch", "minus_one", "channels"], ["merge"], axis=0),
        n("Reshape", ["o_t", "merge"], ["o"], allowzero=1),
        n("MatMul", ["o", "wo"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", elem, ["B", "S", channels])]
    if extra_softmax_use:
        nodes.append(n("Identity", ["p"], ["probabilities"]))
        outputs.append(helper.make_tensor_value_info("probabilities", elem, None))
    initializers = [numpy_helper.from_array(v, k) for k, v in {**weights, **biases, **consts}.items()]
    shape = ["B", "S", channels] if input_name == "x" else ["B", channels, "H", "W"]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info(input_name, elem, shape)],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what ONNX Runtime 1.31 reads
    return model, {**weights, **biases}


def reference(x, w, heads, scale=None):
    """The attention in float64: softmax(q k^T * scale) v per head (scale 1/sqrt(D) unless
    given), then to_out."""
    x = x.astype(np.float64)
    b, s, c = x.shape
    d = c // heads

    def split(t):
        return t.reshape(b, s, heads, d).transpose(0, 2, 1, 3)

    q, k, v = (split(x @ w[f"w{p}"] + w[f"b{p}"]) for p in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) * (d ** -0.5 if scale is None else scale)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, s, c) @ w["wo"]


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def attention_nodes(model):
    return [node for node in model.graph.node if node.op_type == "MultiHeadAttention"]


@pytest.mark.parametrize("heads,scaled", [(1, True), (2, True), (4, False)])
def test_the_exported_attention_becomes_one_node_with_the_same_outputs(heads, scaled):
    model, w = exported_attention(channels=16, heads=heads, scaled=scaled)
    x = np.random.default_rng(1).standard_normal((2, 15, 16)).astype(np.float32)
    before = run(model, x)
    assert fuse_model(model) == 1
    (node,) = attention_nodes(model)
    assert node.domain == COM_MICROSOFT
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == heads
    # Unscaled scores stay unscaled: the kernel's default would be 1/sqrt(D).
    assert attrs["scale"] == pytest.approx((16 // heads) ** -0.5 if scaled else 1.0, rel=1e-6)
    assert list(node.input) == ["q_lin", "k_lin", "v_lin"]
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Softmax", "Transpose", "Slice"}, "the score and key-transposition nodes are removed"
    assert {t.name for t in model.graph.initializer} >= {"wq", "wk", "wv", "wo"}
    assert "c" not in {t.name for t in model.graph.initializer}
    assert any(o.domain == COM_MICROSOFT and o.version == 1 for o in model.opset_import)
    onnx.checker.check_model(model)
    after = run(model, x)
    want = reference(x, w, heads, None if scaled else 1.0)
    np.testing.assert_allclose(before, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after, want, rtol=1e-4, atol=1e-5)


def test_float16_attention_is_left_alone():
    """ONNX Runtime's CPU MultiHeadAttention is float32 only."""
    model, _ = exported_attention(dtype=np.float16)
    before = model.SerializeToString()
    assert fuse_model(model) == 0
    assert model.SerializeToString() == before


def test_a_softmax_with_other_uses_is_not_rewritten():
    model, _ = exported_attention(extra_softmax_use=True)
    assert fuse_model(model) == 0
    assert not attention_nodes(model)


def test_fuse_file_rewrites_in_place_keeping_the_files_mode(tmp_path):
    model, w = exported_attention(channels=8, heads=2)
    path = tmp_path / "vae_decoder.onnx"
    onnx.save(model, str(path))
    os.chmod(path, 0o644)
    x = np.random.default_rng(2).standard_normal((1, 12, 8)).astype(np.float32)
    assert fuse_file(path, {"x": x}) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    fused = onnx.load(str(path))
    assert len(attention_nodes(fused)) == 1
    np.testing.assert_allclose(run(fused, x), reference(x, w, 2), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_decoder.onnx"], "no staging file left behind"


def test_fuse_file_leaves_a_graph_without_a_known_attention_untouched(tmp_path):
    model, _ = exported_attention(extra_softmax_use=True)
    path = tmp_path / "vae_encoder.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    assert fuse_file(path, {"x": np.ones((1, 4, 8), np.float32)}) == 0
    assert path.read_bytes() == before


def test_fuse_file_refuses_a_partial_rewrite(tmp_path):
    """A graph with one attention it knows and one Softmax it does not is refused whole."""
    model, _ = exported_attention()
    extra = helper.make_node("Softmax", ["y"], ["y_softmax"], axis=-1)
    model.graph.node.append(extra)
    model.graph.output.append(helper.make_tensor_value_info("y_softmax", TensorProto.FLOAT, None))
    path = tmp_path / "vae_decoder.onnx"
    onnx.save(model, str(path))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="1 of its 2 Softmax nodes"):
        fuse_file(path, {"x": np.ones((1, 4, 8), np.float32)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae_decoder.onnx"]


def test_fuse_package_replaces_nothing_unless_every_graph_passes(tmp_path):
    """The decoder's attention is rewritable, the encoder's graph is not: the package is left
    exactly as it was (no graph replaced, manifest unchanged, no staging file)."""
    import json

    from zimage_export.vae_attention import fuse_package

    decoder, _ = exported_attention(channels=8, input_name="latents")
    encoder, _ = exported_attention(channels=3, input_name="image")
    encoder.graph.node.append(helper.make_node("Softmax", ["y"], ["y_softmax"], axis=-1))
    encoder.graph.output.append(helper.make_tensor_value_info("y_softmax", TensorProto.FLOAT, None))
    onnx.save(decoder, str(tmp_path / "vae_decoder.onnx"))
    onnx.save(encoder, str(tmp_path / "vae_encoder.onnx"))
    manifest = {"vae": {"scale_factor": 1, "latent_channels": 8},
                "graphs": {"vae_decoder": {"path": "vae_decoder.onnx"}, "vae_encoder": {"path": "vae_encoder.onnx"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="vae_encoder.onnx: 1 of its 2 Softmax nodes"):
        fuse_package(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    # Without the odd encoder, the decoder is rewritten and its manifest entry follows.
    onnx.save(exported_attention(channels=3, input_name="image")[0], str(tmp_path / "vae_encoder.onnx"))
    written = fuse_package(tmp_path)
    for name in ("vae_decoder", "vae_encoder"):
        path = tmp_path / f"{name}.onnx"
        assert len(attention_nodes(onnx.load(str(path)))) == 1
        assert written["graphs"][name]["bytes"] == path.stat().st_size
    assert json.loads((tmp_path / "manifest.json").read_text()) == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "vae_decoder.onnx", "vae_encoder.onnx"]
