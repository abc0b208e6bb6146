"""Tensor names of the enhancer's graphs (zimage_export/enhancer/names.py): the weights both
graphs share and the KV-cache inputs and outputs the SDK feeds by name."""

import json
from pathlib import Path

from zimage_export.enhancer.names import LINEARS, NORMS, linear_weight, norm_weight, past_names, present_names

REPO = Path(__file__).resolve().parents[2]


def test_weight_names_follow_transformers_module_paths():
    assert linear_weight(3, "self_attn.q_proj") == "layers.3.self_attn.q_proj.weight_t"
    assert linear_weight(0, "mlp.down_proj") == "layers.0.mlp.down_proj.weight_t"
    assert norm_weight(12, "self_attn.k_norm") == "layers.12.self_attn.k_norm.weight"
    assert norm_weight(0, "input_layernorm") == "layers.0.input_layernorm.weight"


def test_weight_names_are_unique_across_layers():
    names = [f(i, n) for i in range(36) for f, group in ((linear_weight, LINEARS), (norm_weight, NORMS)) for n in group]
    assert len(names) == 36 * 11
    assert len(set(names)) == len(names)


def test_cache_names():
    assert past_names(0) == ("past_key_values.0.key", "past_key_values.0.value")
    assert present_names(35) == ("present.35.key", "present.35.value")


def test_committed_decoder_io_uses_these_names():
    manifest = json.loads((REPO / "models" / "tiny-qwen3-enhancer" / "manifest.json").read_text())
    layers = manifest["enhancer"]["num_layers"]
    graph = manifest["graphs"]["text_decoder"]
    assert layers == 3
    assert [v["name"] for v in graph["inputs"]] == [
        "input_ids", "attention_mask", "position_ids", *(n for i in range(layers) for n in past_names(i))]
    assert [v["name"] for v in graph["outputs"]] == ["logits", *(n for i in range(layers) for n in present_names(i))]
