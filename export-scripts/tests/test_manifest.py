"""manifest.json assembly (zimage_export/manifest.py), without torch, onnx or diffusers."""

import hashlib
import json
from pathlib import Path

import pytest

from zimage_export.fixtures.configs import BASE_VARIANT, TINY_A, TINY_B, TINY_BASE
from zimage_export.manifest import (
    OPTIONAL_GRAPHS,
    REQUIRED_GRAPHS,
    file_entry,
    generation_defaults,
    graph_files,
    manifest_dict,
    package_graphs,
    transformer_limits,
)
from zimage_export.onnx_io import external_data_path

REPO = Path(__file__).resolve().parents[2]


def test_file_entry_names_sizes_and_hashes(tmp_path):
    (tmp_path / "abc.bin").write_bytes(b"abc")
    assert file_entry(tmp_path / "abc.bin") == {
        "path": "abc.bin",  # the name only: entries are relative to the package folder
        "bytes": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",  # FIPS 180-2's "abc"
    }
    (tmp_path / "empty").write_bytes(b"")
    assert file_entry(tmp_path / "empty")["sha256"] == hashlib.sha256(b"").hexdigest()


def test_file_entry_hashes_files_larger_than_one_read(tmp_path):
    data = bytes(range(256)) * (65536 + 3)  # 16 MiB + 768 bytes: two reads of 16 MiB
    (tmp_path / "big.data").write_bytes(data)
    entry = file_entry(tmp_path / "big.data")
    assert entry["bytes"] == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("axes_lens, patch, want", [
    ([1024, 512, 512], 2, (992, 1024, 1024)),  # Z-Image-Turbo's: P + 1 <= 1023 -> P = 992
    ([256, 64, 64], 2, (224, 128, 128)),  # tiny-zimage-alt's
    ([34, 8, 16], 2, (32, 16, 32)),  # P = 32 just fits: P + 1 = 33 = axes_lens[0] - 1
    ([33, 8, 8], 1, (0, 8, 8)),  # P = 32 does not
])
def test_transformer_limits(axes_lens, patch, want):
    limits = transformer_limits(axes_lens, patch)
    assert (limits["max_caption_tokens"], limits["max_latent_height"], limits["max_latent_width"]) == want


def test_package_graphs_lists_optional_graphs_only_when_exported(tmp_path):
    for name in REQUIRED_GRAPHS:
        (tmp_path / f"{name}.onnx").write_bytes(b"")
    assert package_graphs(tmp_path) == ["text_encoder", "transformer", "vae_decoder", "vae_encoder"]
    (tmp_path / "vae_decoder_cpu.onnx").write_bytes(b"")
    assert package_graphs(tmp_path) == [*REQUIRED_GRAPHS, "vae_decoder_cpu"]
    # The editing graphs (Omni folders), in manifest order.
    (tmp_path / "transformer_omni.onnx").write_bytes(b"")
    (tmp_path / "siglip.onnx").write_bytes(b"")
    assert package_graphs(tmp_path) == [*REQUIRED_GRAPHS, *OPTIONAL_GRAPHS]
    assert OPTIONAL_GRAPHS == ("vae_decoder_cpu", "siglip", "transformer_omni")
    # Required graphs are listed even when missing: export.py writes no manifest then.
    (tmp_path / "transformer.onnx").unlink()
    assert "transformer" in package_graphs(tmp_path)


def test_graph_files_lists_a_graph_its_data_and_its_cpu_layouts():
    """What quantize_package.py copies for a graph it does not rewrite (tiny-zimage's committed
    vae_decoder has a CPU layout without external data; its transformer keeps its weights in
    the .onnx, so its prepacked layout has a data file of its own)."""
    committed = json.loads((REPO / "models" / "tiny-zimage" / "manifest.json").read_text())["graphs"]
    assert [e["path"] for e in graph_files(committed["vae_decoder"])] == ["vae_decoder.onnx", "vae_decoder.nchwc16.onnx"]
    assert [e["path"] for e in graph_files(committed["transformer"])] == [
        "transformer.onnx", "transformer.prepacked.onnx", "transformer.prepacked.onnx.data",
        "transformer.prepack_probe.onnx", "transformer.prepack_probe.onnx.data"]
    big = {"path": "g.onnx", "external_data": {"path": "g.onnx.data"},
           "cpu_layout": {"path": "g.nchwc8.onnx", "external_data": {"path": "g.nchwc8.onnx.data"}}}
    assert [e["path"] for e in graph_files(big)] == ["g.onnx", "g.onnx.data", "g.nchwc8.onnx", "g.nchwc8.onnx.data"]


def test_external_data_sits_beside_its_graph():
    assert external_data_path(Path("pkg/transformer.onnx")) == Path("pkg/transformer.onnx.data")


@pytest.mark.parametrize("cfg", [TINY_A, TINY_B, TINY_BASE], ids=lambda c: c.name)
def test_manifest_dict_reproduces_the_committed_fixture_manifests(cfg):
    """From the fixture configs that make_fixtures.py built the diffusers folders from, the
    assembly gives the committed manifest.json byte for byte. The graph entries and the LoRA
    table (which need onnx and the source weights to compute) and the source folder's hash are
    taken from it."""
    package = REPO / "models" / cfg.name
    text = (package / "manifest.json").read_text()
    committed = json.loads(text)
    diffusers_version = committed["source"]["diffusers_version"]
    configs = {
        "model_index": {"_class_name": "ZImagePipeline"},
        "transformer": cfg.transformer,
        "text_encoder": cfg.text_encoder,
        "vae": cfg.vae,
        # As fixtures/build.py writes scheduler_config.json.
        "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": diffusers_version,
                      **cfg.scheduler},
    }
    manifest = manifest_dict(
        configs,
        precision="fp32",
        name=cfg.name,
        diffusers_version=diffusers_version,
        model_index_sha256=committed["source"]["model_index_sha256"],
        tokenizer=file_entry(package / "tokenizer.json"),
        graphs=committed["graphs"],
        pad_token_id=151643,  # <|endoftext|>, the Qwen3 tokenizer's pad token
        lora_parameters=committed["transformer"]["lora_parameters"],
        generation_defaults=generation_defaults(BASE_VARIANT) if cfg is TINY_BASE else None,
    )
    assert list(manifest["graphs"]) == package_graphs(package)
    assert json.dumps(manifest, indent=2, ensure_ascii=False) + "\n" == text


def test_variant_is_read_from_the_folder_name():
    from zimage_export.manifest import detect_variant

    assert detect_variant("Z-Image-Turbo") == "turbo"
    assert detect_variant("/models/Z-Image-Turbo/") == "turbo"
    assert detect_variant("Tongyi-MAI/Z-Image") == "base"
    assert detect_variant("z-image-base") == "base"
    assert detect_variant("my-finetune") == "turbo"  # the historic default; --variant overrides


def test_generation_defaults_are_written_only_when_not_turbos():
    from zimage_export.manifest import generation_defaults

    assert generation_defaults("turbo") is None
    assert generation_defaults("turbo", {"steps": None}) is None
    assert generation_defaults("base") == {
        "variant": "base", "steps": 50, "guidance_scale": 4.0, "cfg_normalization": 0.0, "cfg_truncation": 1.0,
    }
    assert generation_defaults("base", {"steps": 28, "guidance_scale": None}) == {
        "variant": "custom", "steps": 28, "guidance_scale": 4.0, "cfg_normalization": 0.0, "cfg_truncation": 1.0,
    }
    assert generation_defaults("turbo", {"steps": 9})["steps"] == 9
    with pytest.raises(ValueError):
        generation_defaults("base", {"sampler": "heun"})
