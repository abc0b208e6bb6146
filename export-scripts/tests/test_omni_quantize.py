"""Quantizing an editing package (zimage_export/quantize.py: quantize_omni, CodeBook) on the
committed models/tiny-zimage-omni, with onnx and onnxruntime only: the Omni transformer is
quantized to the transformer's own codes and reads them from transformer.onnx, so an editing
package stores its quantized transformer once, as the float one stores its float weights."""

import json
import shutil
from pathlib import Path

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
