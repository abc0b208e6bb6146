"""export.py's --src check: a diffusers-format Z-Image folder is accepted, anything else is
refused with a message naming what is wrong (no torch needed)."""

import argparse
import json

import pytest

from zimage_export.source_folder import (
    REQUIRED_FILES,
    SourceFolderError,
    check_qwen3_checkpoint,
    check_source_folder,
    require_source_folder,
)


def make_folder(root, pipeline="ZImagePipeline", weights=".safetensors"):
    for f in REQUIRED_FILES:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("{}")
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    for folder in ("transformer", "text_encoder", "vae"):
        (root / folder / f"model{weights}").write_bytes(b"\0")
    return root


@pytest.mark.parametrize("pipeline", ["ZImagePipeline", "ZImageOmniPipeline", "ZImageImg2ImgPipeline"])
@pytest.mark.parametrize("weights", [".safetensors", ".bin"])
def test_a_complete_folder_passes(tmp_path, pipeline, weights):
    check_source_folder(make_folder(tmp_path, pipeline, weights))


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(SourceFolderError, match="is not a folder"):
        check_source_folder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SourceFolderError, match="is not a folder"):
        check_source_folder(tmp_path / "file")


def test_every_missing_file_is_named(tmp_path):
    src = make_folder(tmp_path)
    (src / "tokenizer" / "tokenizer.json").unlink()
    (src / "vae" / "config.json").unlink()
    with pytest.raises(SourceFolderError) as e:
        check_source_folder(src)
    assert "missing tokenizer/tokenizer.json, vae/config.json" in str(e.value)


def test_a_component_without_weights_is_refused(tmp_path):
    src = make_folder(tmp_path)
    (src / "transformer" / "model.safetensors").unlink()
    with pytest.raises(SourceFolderError, match=r"missing transformer/\*\.safetensors$"):
        check_source_folder(src)


@pytest.mark.parametrize("model_index", ['{"_class_name": "FluxPipeline"}', '{"_class_name": 3}', "[]", "{}"])
def test_another_pipeline_is_refused(tmp_path, model_index):
    src = make_folder(tmp_path)
    (src / "model_index.json").write_text(model_index)
    with pytest.raises(SourceFolderError, match="not a Z-Image one"):
        check_source_folder(src)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00"])
def test_unreadable_model_index_is_refused(tmp_path, content):
    src = make_folder(tmp_path)
    (src / "model_index.json").write_bytes(content)
    with pytest.raises(SourceFolderError, match="is not valid JSON"):
        check_source_folder(src)


def test_the_command_line_form_exits_as_argparse_does(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="export.py")
    with pytest.raises(SystemExit) as e:
        require_source_folder(parser, tmp_path / "nope")
    assert e.value.code == 2
    assert "export.py: error: --src:" in capsys.readouterr().err
    require_source_folder(parser, make_folder(tmp_path))  # no exit


def test_a_qwen3_checkpoint_needs_config_tokenizer_and_weights(tmp_path):
    with pytest.raises(SourceFolderError, match="is not a folder"):
        check_qwen3_checkpoint(tmp_path / "nope")
    with pytest.raises(SourceFolderError, match=r"missing config.json, tokenizer.json, \*.safetensors$"):
        check_qwen3_checkpoint(tmp_path)
    for f in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors"):
        (tmp_path / f).write_text("{}")
    check_qwen3_checkpoint(tmp_path)
    parser = argparse.ArgumentParser(prog="export_enhancer.py")
    with pytest.raises(SystemExit):
        require_source_folder(parser, tmp_path / "nope", "--hf", check_qwen3_checkpoint)
