"""Which packages export_controlnet.py accepts (zimage_export/controlnet.py), without torch,
onnx or diffusers: float packages yes, quantized ones (the committed int8 / int4 fixtures) no."""

import json
from pathlib import Path

import pytest

from zimage_export.controlnet import check_package_accepts_controlnet

REPO = Path(__file__).resolve().parents[2]


def manifest(package: str) -> dict:
    return json.loads((REPO / "models" / package / "manifest.json").read_text())


@pytest.mark.parametrize("package", ["tiny-zimage", "tiny-zimage-alt", "tiny-zimage-control"])
def test_float_packages_are_accepted(package):
    check_package_accepts_controlnet(manifest(package))


@pytest.mark.parametrize("package", ["tiny-zimage-int8", "tiny-zimage-int4", "tiny-zimage-w8a8", "tiny-zimage-w8a8x2"])
def test_quantized_packages_are_refused(package):
    m = manifest(package)
    assert m["precision"] == "fp32"  # the precision alone would let it through
    with pytest.raises(ValueError, match=r"transformer is quantized \(int[48]\)"):
        check_package_accepts_controlnet(m)


def test_a_quantization_section_without_graph_list_is_refused():
    with pytest.raises(ValueError, match="quantized"):
        check_package_accepts_controlnet({"precision": "fp32", "quantization": {"weights": "int8"}})


def test_text_encoder_only_quantization_is_accepted():
    check_package_accepts_controlnet(
        {"precision": "fp16", "quantization": {"weights": "int4", "graphs": {"text_encoder": {}}}})


def test_other_precisions_are_refused():
    with pytest.raises(ValueError, match="fp32 or fp16"):
        check_package_accepts_controlnet({"precision": "bf16"})
