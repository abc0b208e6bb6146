"""Quantizing an editing package (zimage_export/quantize.py: quantize_omni, CodeBook) on the
committed models/tiny-zimage-omni, with onnx and onnxruntime only: the Omni transformer is
quantized to the transformer's own codes and reads them from transformer.onnx, so an editing
package stores its quantized transformer once, as the float one stores its float weights."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from zimage_export.quantize import QuantizeOptions, quantize_package

REPO = Path(__file__).resolve().parents[2]
OMNI = REPO / "models" / "tiny-zimage-omni"
# The transformer's quantized products (2 + 1 + 1 blocks x 7), and the SigLIP refiner's (1 x 7).
TRANSFORMER_PRODUCTS = 28
REFINER_PRODUCTS = 7


def _external(t) -> dict | None:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return {"location": info["location"], "offset": int(info.get("offset", 0)), "length": int(info["length"])}


def _transformer_codes(package: Path) -> dict:
    """(offset, length) in transformer.onnx of each of the transformer's MatMulNBits codes."""
    model = onnx.load(str(package / "transformer.onnx"), load_external_data=False)
    raw = (package / "transformer.onnx").read_bytes()
    inits = {t.name: t for t in model.graph.initializer}
    places = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            blob = inits[node.input[1]].raw_data
            places[raw.find(blob), len(blob)] = node.input[1]
    return places


def _omni_codes(package: Path) -> tuple[list, list]:
    """The Omni graph's MatMulNBits codes: (those read from transformer.onnx as (offset,
    length), those in its own file)."""
    model = onnx.load(str(package / "transformer_omni.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    shared, own = [], []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            where = _external(inits[node.input[1]])
            assert where is not None, f"{node.input[1]} is embedded in the graph"
            if where["location"] == "transformer.onnx":
                shared.append((where["offset"], where["length"]))
            else:
                assert where["location"] == "transformer_omni.onnx.data"
                own.append(node.input[1])
    return shared, own


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_the_omni_graph_reads_the_transformers_codes(tmp_path, weights):
    out = tmp_path / "omni"
    manifest = quantize_package(OMNI, out, QuantizeOptions(weights))
    report = manifest["quantization"]["graphs"]
    assert report["transformer"]["quantized"] == TRANSFORMER_PRODUCTS
    assert report["transformer_omni"]["quantized"] == TRANSFORMER_PRODUCTS + REFINER_PRODUCTS
    assert set(report["transformer_omni"]["kept"]) == {*report["transformer"]["kept"], "siglip_embedder.1.weight"}
    codes = _transformer_codes(out)
    assert len(codes) == TRANSFORMER_PRODUCTS
    shared, own = _omni_codes(out)
    # Every product the two graphs have in common reads the transformer's own codes; only the
    # SigLIP refiner's are the Omni graph's.
    assert sorted(shared) == sorted(codes)
    assert len(own) == REFINER_PRODUCTS
    # The sharing is recorded against the new transformer (the runtime checks it), the float
    # names are gone with the float weights.
    edit = manifest["edit"]
    assert edit["transformer_weights"]["sha256"] == manifest["graphs"]["transformer"]["sha256"]
    assert "omni_parameters" not in edit
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_a_shared_package_quantized_in_place_stays_shared(tmp_path):
    package = tmp_path / "omni"
    shutil.copytree(OMNI, package)
    assert json.loads((package / "manifest.json").read_text())["edit"]["transformer_weights"]
    manifest = quantize_package(package, package, QuantizeOptions("int8"))
    shared, own = _omni_codes(package)
    assert len(shared) == TRANSFORMER_PRODUCTS and len(own) == REFINER_PRODUCTS
    assert manifest["edit"]["transformer_weights"]["sha256"] == manifest["graphs"]["transformer"]["sha256"]


def test_kept_patterns_reach_the_omni_only_layers(tmp_path):
    manifest = quantize_package(OMNI, tmp_path / "omni", QuantizeOptions("int8", keep=("siglip_refiner.*",)))
    report = manifest["quantization"]["graphs"]
    assert report["transformer"]["quantized"] == TRANSFORMER_PRODUCTS
    assert report["transformer_omni"]["quantized"] == TRANSFORMER_PRODUCTS
    assert sum(name.startswith("siglip_refiner.") for name in report["transformer_omni"]["kept"]) == REFINER_PRODUCTS
    with pytest.raises(ValueError, match="matches no transformer weight"):
        quantize_package(OMNI, tmp_path / "typo", QuantizeOptions("int8", keep=("siglip_refinr.*",)))
    assert not (tmp_path / "typo").exists()


def test_what_cannot_quantize_an_editing_package_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="hqq does not quantize editing"):
        quantize_package(OMNI, tmp_path / "hqq", QuantizeOptions("int4", method="hqq"))
    assert not (tmp_path / "hqq").exists()
    # A package exported before edit.omni_parameters: its Omni-only layers cannot be named.
    old = tmp_path / "old"
    shutil.copytree(OMNI, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["edit"]["omni_parameters"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no edit.omni_parameters .* re-export it"):
        quantize_package(old, tmp_path / "out", QuantizeOptions("int8"))
    assert not (tmp_path / "out").exists()


def _omni_outputs(package: Path, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(package / "transformer_omni.onnx"), options, providers=["CPUExecutionProvider"])
    (x_out,) = session.run(None, feeds)
    return x_out


def _edit_feeds(manifest: dict, with_references: bool) -> dict:
    """The Omni graph's inputs for one edit step as the runtime packs them (omni_pack): two
    caption segments, a reference and the target, its vision grid; or, without references, one
    segment, the target and no vision stream."""
    from zimage_export.omni_pack import pack_batch, pack_item

    t, siglip = manifest["transformer"], manifest["edit"]["siglip"]["hidden_size"]
    rng = np.random.default_rng(3)
    target = rng.standard_normal((t["in_channels"], 8, 12)).astype(np.float32)
    if with_references:
        segments = [rng.standard_normal((n, t["cap_feat_dim"])).astype(np.float32) for n in (9, 14)]
        latents = [rng.standard_normal((t["in_channels"], 8, 8)).astype(np.float32), target]
        grids = [rng.standard_normal((3, 4, siglip)).astype(np.float32), None]
        item = pack_item(segments, latents, grids, [0, 1], t["patch_size"])
    else:
        segment = rng.standard_normal((11, t["cap_feat_dim"])).astype(np.float32)
        item = pack_item([segment], [target], None, [1], t["patch_size"], siglip_dim=siglip)
    return pack_batch([item], [0.4])


# Measured (2026-12-03; with references / without): int8 1.31e-2 / 1.37e-2, int4 0.139 / 0.149,
# int8 with two-term int8 activations 9.6e-3 / 1.11e-2 (the transformer's forward, in
# sdk/tests/quantized.rs: 1.26e-2, 0.127, 9.1e-3); the bounds about 1.4x those.
@pytest.mark.parametrize("weights, activations, bound", [("int8", None, 2.0e-2), ("int4", None, 0.21),
                                                          ("int8", "int8x2", 1.6e-2)])
@pytest.mark.parametrize("with_references", [True, False])
def test_the_quantized_omni_graph_computes_near_the_float_one(tmp_path, weights, activations, bound,
                                                              with_references):
    """The quantized Omni graph, reading its codes from transformer.onnx, runs in ONNX Runtime
    and stays near the float graph on the same inputs (relative L2 of the x tokens' output),
    with references and without (the masked vision block); sdk/tests/quantized.rs holds whole
    edits of the committed quantized editing packages to their measured distances."""
    out = tmp_path / "omni"
    quantize_package(OMNI, out, QuantizeOptions(weights, activations=activations))
    manifest = json.loads((OMNI / "manifest.json").read_text())
    feeds = _edit_feeds(manifest, with_references)
    want, got = _omni_outputs(OMNI, feeds), _omni_outputs(out, feeds)
    assert np.isfinite(got).all()
    error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert 1e-6 < error < bound, error


def test_modulations_read_twice_are_quantized_once_and_shared(tmp_path):
    """The Omni graph runs each adaLN modulation twice (the noisy and the clean timestep): with
    `--quantize-adaln` both products read the transformer's one quantized copy (gemm_to_matmul
    rewrites a weight every reader of which is such a Gemm), none is left float."""
    out = tmp_path / "omni"
    manifest = quantize_package(OMNI, out, QuantizeOptions("int8", quantize_adaln=True))
    report = manifest["quantization"]["graphs"]
    adaln = 3  # layers.0, layers.1, noise_refiner.0 (the final layer's stays kept)
    assert report["transformer"]["quantized"] == TRANSFORMER_PRODUCTS + adaln
    assert report["transformer_omni"]["quantized"] == TRANSFORMER_PRODUCTS + REFINER_PRODUCTS + 2 * adaln
    assert not any(".adaLN_modulation.0." in name for name in report["transformer_omni"]["kept"])
    shared, own = _omni_codes(out)
    assert sorted(set(shared)) == sorted(_transformer_codes(out)) and len(shared) == TRANSFORMER_PRODUCTS + 2 * adaln
    assert len(own) == REFINER_PRODUCTS
