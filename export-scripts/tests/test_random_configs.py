"""random_config_parity.py's drawn configs (numpy-free, torch-free: the drawing alone) are ones
diffusers can build and the goldens can use: a config that broke a constraint would fail in
diffusers, not in the runtime, and hide what the check is for."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "random_config_parity.py"


def draw_config(seed):
    spec = importlib.util.spec_from_file_location("random_config_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.draw_config(seed)


@pytest.mark.parametrize("seed", range(200))
def test_drawn_configs_keep_the_models_constraints(seed):
    cfg = draw_config(seed)
    t, te, vae = cfg.transformer, cfg.text_encoder, cfg.vae
    head_dim = t["dim"] // t["n_heads"]
    assert t["dim"] == head_dim * t["n_heads"] and head_dim == sum(t["axes_dims"])
    assert all(d % 2 == 0 and d > 0 for d in t["axes_dims"])  # RoPE pairs
    assert t["cap_feat_dim"] == te["hidden_size"]  # the text encoder's hidden states are the captions
    assert t["in_channels"] == vae["latent_channels"]
    assert te["num_hidden_layers"] >= 2  # Z-Image reads hidden_states[-2]
    assert te["num_attention_heads"] % te["num_key_value_heads"] == 0 and te["head_dim"] % 2 == 0
    assert all(c % vae["norm_num_groups"] == 0 for c in vae["block_out_channels"])
    blocks = len(vae["block_out_channels"])
    assert len(vae["down_block_types"]) == len(vae["up_block_types"]) == blocks
    multiple = 2 * 2 ** (blocks - 1)  # patch size 2 times the VAE's scale factor
    sizes = [*cfg.t2i_size, *cfg.t2i_alt_size]
    assert all(s % multiple == 0 and 16 <= s <= 96 for s in sizes), (sizes, multiple)
    # Captions of up to 512 tokens (+ padding) and every patch have positions.
    assert t["axes_lens"][0] >= 600
    assert min(t["axes_lens"][1:]) > max(sizes) // multiple


def test_the_draw_is_the_seed_s_and_varies():
    assert draw_config(7) == draw_config(7)
    drawn = [draw_config(seed) for seed in range(40)]
    assert len({c.transformer["dim"] for c in drawn}) >= 10
    assert {len(c.vae["block_out_channels"]) for c in drawn} == {1, 2, 3, 4}
    assert {c.scheduler["use_dynamic_shifting"] for c in drawn} == {False, True}
