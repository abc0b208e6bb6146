"""The quantization flags are refused before any work: export.py checks them before exporting
(a refusal after an export of the real model would have cost its time and left a float package
where a quantized one was asked for), refuses quantization options without --weights, and
quantize_package.py refuses what it cannot make with a message, leaving no output folder."""

import json
import shutil
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

import export  # noqa: E402
import quantize_package  # noqa: E402


def refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code not in (0, None)
    return capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--weights", "int4", "--activations", "int8"], "int8 activations take int8 rtn or gptq weights"),
    (["--precision", "fp16", "--weights", "int8", "--activations", "int8x2"],
     "--activations int8x2 is made from fp32 graphs (the CPU's), not --precision fp16"),
    (["--weights", "int8", "--method", "gptq", "--calibration-count", "99"], "--calibration-count must be 1..16"),
    (["--activations", "int8x2"], "--activations is a quantization option: it needs --weights int8|int4"),
    (["--method", "gptq"], "--method is a quantization option"),
    (["--keep", "noise_refiner.*"], "--keep is a quantization option"),
])
def test_export_refuses_quantization_flags_before_exporting(tmp_path, capsys, flags, message):
    # --src does not exist: a flag refused before the source folder is even looked at.
    err = refused(export.main, ["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), *flags], capsys)
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_export_takes_the_int8_vae_without_weights(tmp_path, capsys):
    # (it adds the int8 VAE decoder to a float package): refused for the missing --src only.
    err = refused(export.main, ["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--int8-vae"], capsys)
    assert "--src:" in err and "quantization option" not in err, err


def test_quantize_package_refuses_what_it_cannot_make(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--out", str(out), "--weights", "int8"]
    # Every weight kept in float: the manifest would call a float transformer quantized.
    err = refused(quantize_package.main, ["--package", str(REPO / "models/tiny-zimage"), *args,
                                          "--activations", "int8x2", "--keep", "*"], capsys)
    assert "keep every transformer weight in float: nothing is left to quantize" in err, err
    # A standalone prompt enhancer package: no transformer.
    err = refused(quantize_package.main, ["--package", str(REPO / "models/tiny-qwen3-enhancer"), *args], capsys)
    assert "has no transformer" in err and "standalone prompt enhancer" in err, err
    # A manifest with a quantization section of its own, however incomplete.
    package = tmp_path / "partial"
    package.mkdir()
    shutil.copy(REPO / "models/tiny-zimage/manifest.json", package / "manifest.json")
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["quantization"] = {"bits": 8}
    (package / "manifest.json").write_text(json.dumps(manifest))
    err = refused(quantize_package.main, ["--package", str(package), *args], capsys)
    assert "is already quantized" in err, err
    assert not out.exists()
