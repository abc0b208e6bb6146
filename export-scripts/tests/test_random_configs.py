"""random_config_parity.py's drawn configs (numpy-free, torch-free: the drawing alone) are ones
diffusers can build and the goldens can use: a config that broke a constraint would fail in
diffusers, not in the runtime, and hide what the check is for."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "random_config_parity.py"


def script():
    spec = importlib.util.spec_from_file_location("random_config_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def draw_config(seed):
    return script().draw_config(seed)


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


@pytest.mark.parametrize("seed", range(200))
def test_drawn_controlnets_are_ones_diffusers_runs(seed):
    cfg = draw_config(seed)
    fixture, single_file, (t2i, inpaint, lora) = script().draw_controlnet(seed, cfg)
    t, c = cfg.transformer, fixture.config
    places, refiner = c["control_layers_places"], c["control_refiner_layers_places"]
    assert places[0] == 0 and places == sorted(set(places)) and places[-1] < t["n_layers"]  # diffusers asserts 0
    assert c["control_in_dim"] in (t["in_channels"], 2 * t["in_channels"] + 1)
    assert c["add_control_noise_refiner"] in (None, "control_layers", "control_noise_refiner")
    if c["add_control_noise_refiner"] is None:
        assert refiner is None
    else:  # one hint per layer of the branch run over the noise refiner, each to a refiner layer
        hints = len(places) if c["add_control_noise_refiner"] == "control_layers" else t["n_refiner_layers"]
        assert 1 <= len(refiner) <= hints and refiner == sorted(set(refiner)) and refiner[-1] < t["n_refiner_layers"]
    # A single file says "control_layers" by keys a model built by diffusers does not have.
    assert not (single_file and c["add_control_noise_refiner"] == "control_layers")
    # The inpainting pipeline refuses a ControlNet without mask channels; the text-to-image one
    # takes either.
    assert bool(inpaint) == (c["control_in_dim"] == 2 * t["in_channels"] + 1) and t2i and lora


def test_the_controlnet_draw_is_the_seed_s_and_varies():
    module = script()
    assert module.draw_controlnet(3, draw_config(3)) == module.draw_controlnet(3, draw_config(3))
    drawn = [module.draw_controlnet(seed, draw_config(seed)) for seed in range(40)]
    assert {f.config["add_control_noise_refiner"] for f, _, _ in drawn} == {None, "control_layers",
                                                                           "control_noise_refiner"}
    assert {f.config["control_in_dim"] % 2 for f, _, _ in drawn} == {0, 1}
    assert {single for _, single, _ in drawn} == {False, True}
    assert max(len(f.config["control_layers_places"]) for f, _, _ in drawn) >= 2


@pytest.mark.parametrize("seed", range(200))
def test_drawn_omni_models_are_ones_diffusers_runs(seed):
    module = script()
    cfg = draw_config(seed)
    omni, siglip, processor, references, cases = module.draw_omni(seed, cfg)
    t = omni.transformer
    # The base draw is kept: only the SigLIP2 input and the positions it needs are added.
    added = ("siglip_feat_dim", "axes_lens")
    assert {k: v for k, v in t.items() if k not in added} == {k: v for k, v in cfg.transformer.items() if k not in added}
    assert omni.text_encoder == cfg.text_encoder and omni.vae == cfg.vae and omni.seed == cfg.seed
    assert t["siglip_feat_dim"] == siglip["hidden_size"]
    assert siglip["hidden_size"] % siglip["num_attention_heads"] == 0
    assert round(siglip["num_patches"] ** 0.5) ** 2 == siglip["num_patches"]  # a square position grid
    assert processor["patch_size"] == siglip["patch_size"]
    factor = module.vae_factor(cfg.vae)
    assert all(64 <= side <= 112 for size in references.values() for side in size)  # the pipeline's minimum
    assert any(side % (2 * factor) for side in references["ref_c"])  # centre-cropped
    # Positions: every latent pixel of a reference (its SigLIP2 grid is stretched over them).
    assert min(t["axes_lens"][1:]) >= max(side for size in references.values() for side in size) // factor
    assert t["axes_lens"][0] == cfg.transformer["axes_lens"][0]
    for name, refs, *_, size in cases:
        assert set(refs) <= set(references), name
        # (no reference: ZImageOmniPipeline's text-to-image, which needs the size)
        assert refs or size is not None, name
        assert size is None or all(side % (2 * factor) == 0 for side in size), name
    assert any(not refs for _, refs, *_ in cases), "a case without references"


def test_the_omni_draw_is_the_seed_s_and_varies():
    module = script()
    assert module.draw_omni(5, draw_config(5)) == module.draw_omni(5, draw_config(5))
    drawn = [module.draw_omni(seed, draw_config(seed)) for seed in range(40)]
    assert {siglip["patch_size"] for _, siglip, *_ in drawn} == {8, 16}
    assert {processor["resample"] for _, _, processor, *_ in drawn} == {2, 3}
    assert len({siglip["hidden_size"] for _, siglip, *_ in drawn}) >= 5


@pytest.mark.parametrize("seed", range(200))
def test_drawn_enhancers_are_ones_transformers_builds(seed):
    config, model_seed, im_end_scale, cases = script().draw_enhancer(seed)
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0  # grouped queries
    assert config["head_dim"] % 2 == 0 and config["num_hidden_layers"] >= 1  # RoPE pairs
    assert config["tie_word_embeddings"]  # export_enhancer.py takes tied LM heads only
    assert 1.0 < im_end_scale < 2.0 and model_seed != seed
    assert {thinking for _, _, thinking, _, _ in cases} == {False, True}
    assert all(max_new >= 1 for _, _, _, max_new, _ in cases)


def test_the_enhancer_draw_is_the_seed_s_and_varies():
    module = script()
    assert module.draw_enhancer(9) == module.draw_enhancer(9)
    drawn = [module.draw_enhancer(seed)[0] for seed in range(40)]
    assert {c["num_hidden_layers"] for c in drawn} == {1, 2, 3, 4}
    assert len({(c["num_attention_heads"], c["num_key_value_heads"]) for c in drawn}) >= 5
