"""The transformer attention's query chunks (zimage_export/transformer_attention.py): synthetic
opset-23 `Attention` graphs as the exporter writes them, run in ONNX Runtime against the original
node and a float64 numpy reference, and the package rewrite on a copy of the committed tiny
package (its prepacked CPU layout rebuilt)."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from zimage_export import prepacked
from zimage_export.manifest import file_entry
from zimage_export.transformer_attention import chunk_model, chunk_package

REPO = Path(__file__).resolve().parents[2]


def attention_graph(masked=True, **attributes):
    """q, k, v [B, H, S, D] (and a boolean mask [B, 1, S, S]) -> one Attention -> y."""
    floats = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "h", "s", "d"])
    inputs = [floats("q"), floats("k"), floats("v")]
    if masked:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["b", 1, "s", "s"]))
    node = helper.make_node("Attention", [i.name for i in inputs], ["y"], name="attention", **attributes)
    graph = helper.make_graph([node], "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 23)])


def feeds(batch, heads, rows, depth, masked, seed=0):
    rng = np.random.default_rng(seed)
    f = {n: rng.standard_normal((batch, heads, rows, depth)).astype(np.float32) for n in ("q", "k", "v")}
    if masked:
        # Key-padding masks as the captions give them: each batch item keeps its first keys.
        keep = rng.integers(1, rows + 1, batch)
        f["mask"] = np.broadcast_to((np.arange(rows)[None, :] < keep[:, None])[:, None, None, :],
                                    (batch, 1, rows, rows)).copy()
    return f


def run(model, inputs):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def reference(f):
    q, k, v = (f[n].astype(np.float64) for n in ("q", "k", "v"))
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    if "mask" in f:
        scores = np.where(f["mask"], scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return (scores / scores.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("rows,chunks", [(33, 16), (48, 16), (70, 4), (5, 2), (36, 2)])
def test_chunks_give_the_original_outputs(masked, rows, chunks):
    f = feeds(batch=2, heads=3, rows=rows, depth=8, masked=masked)
    original = attention_graph(masked)
    chunked = attention_graph(masked)
    assert chunk_model(chunked, chunks) == 1
    assert sum(n.op_type == "Attention" for n in chunked.graph.node) == chunks
    want, got = run(original, f), run(chunked, f)
    assert got.shape == want.shape == (2, 3, rows, 8)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, reference(f), rtol=1e-4, atol=1e-5)


def test_attributes_are_kept_and_other_forms_are_refused():
    scaled = attention_graph(scale=0.5)
    chunk_model(scaled, 4)
    f = feeds(batch=1, heads=2, rows=9, depth=4, masked=True, seed=1)
    np.testing.assert_allclose(run(scaled, f), run(attention_graph(scale=0.5), f), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="already in query chunks"):
        chunk_model(scaled, 4)
    with pytest.raises(ValueError, match="causal"):
        chunk_model(attention_graph(is_causal=1), 4)
    with pytest.raises(ValueError, match="3-D inputs"):
        chunk_model(attention_graph(q_num_heads=2, kv_num_heads=2), 4)
    with pytest.raises(ValueError, match="at least 2"):
        chunk_model(attention_graph(), 1)


def test_the_tiny_package_is_rewritten_with_its_prepacked_layout(tmp_path):
    package = tmp_path / "tiny-zimage"
    shutil.copytree(REPO / "models/tiny-zimage", package)
    entry_before = json.loads((package / "manifest.json").read_text())["graphs"]["transformer"]
    original = onnx.load(str(package / "transformer.onnx"), load_external_data=False)
    # Two captions of different lengths in one batch: the mask has False entries.
    f = prepacked._sample_inputs(original)
    f["cap_mask"][1, 2:] = False
    want = run(original, f)

    manifest = chunk_package(package)
    entry = manifest["graphs"]["transformer"]
    assert json.loads((package / "manifest.json").read_text()) == manifest
    assert entry["sha256"] != entry_before["sha256"]
    assert file_entry(package / "transformer.onnx") == {k: entry[k] for k in ("path", "bytes", "sha256")}
    rewritten = onnx.load(str(package / "transformer.onnx"), load_external_data=False)
    attention = [n for n in rewritten.graph.node if n.op_type == "Attention"]
    assert len(attention) == 16 * sum(n.op_type == "Attention" for n in original.graph.node) > 0
    np.testing.assert_allclose(run(rewritten, f), want, rtol=1e-5, atol=1e-6)
    # The prepacked layout was rebuilt from the rewritten graph and gives its outputs.
    layout = entry["cpu_prepacked"]
    assert layout["sha256"] != entry_before["cpu_prepacked"]["sha256"]
    session = ort.InferenceSession(str(package / layout["path"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, f)[0], want, rtol=1e-5, atol=1e-6)
    assert not [p.name for p in package.iterdir() if p.name.startswith(".")], "no staging file left behind"


def test_a_package_with_controlnets_is_refused_untouched(tmp_path):
    package = tmp_path / "tiny-zimage-control"
    shutil.copytree(REPO / "models/tiny-zimage-control", package, symlinks=False)
    before = {p.name: p.read_bytes() for p in package.iterdir()}
    with pytest.raises(ValueError, match="carries ControlNets \\(union-v1, union-v2.1\\)"):
        chunk_package(package)
    assert {p.name: p.read_bytes() for p in package.iterdir()} == before
