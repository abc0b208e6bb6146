"""Parity on configs that are not in the repo: random-weight Z-Image models of configs drawn at
random, each built in diffusers format, exported and verified by export.py / verify.py as a
user would, given diffusers goldens by the fixture writers, and generated again by the runtime
(`cargo run --example golden_check`, the bounds of tests/parity.rs).

    python random_config_parity.py --seeds 1 2 3 [--quantized] [--fp16] [--out DIR] [--keep]

A seed draws every width, head count and depth of the transformer, its RoPE axes and lengths,
the Qwen3 text encoder (its hidden size is the transformer's caption width), the VAE (1 to 4
blocks: scale factor 1 to 8, 4 to 16 latent channels, quant convs and the mid-block attention
on or off), the scheduler (a static shift or dynamic shifting with drawn parameters) and the
image sizes (multiples of twice the VAE factor). The goldens are tiny-zimage's full list (text
to image with and without guidance, truncation and normalisation, two images, empty and long
prompts; image to image; inpainting; LoRAs in the four file formats, alone and two at once),
then a ControlNet drawn for the transformer (any of diffusers' modes, a control input with or
without inpainting channels, places on any layers, a folder or one file) is added with
export_controlnet.py and checked against ZImageControlNetPipeline (and the inpainting one) with
and without LoRAs; the prompt enhancer is added to the package (export_enhancer.py add: the text
encoder rewritten to share the decoder's weights) and its greedy generations checked against
transformers' token for token, as are those of a standalone enhancer of a drawn Qwen3 config;
last, an Omni (editing) model on the same config with a drawn SigLIP2 and processor is built,
exported, verified and checked against ZImageOmniPipeline.
Needs torch and diffusers (export-scripts/.venv) and the Rust toolchain. Prints one line per
seed and writes DIR/summary.json; exits 1 if any seed failed (where diffusers itself fails on
the LoRA goldens, the line says so and the other goldens are still checked). Each seed's
folders are deleted unless it failed (or diffusers did) or --keep is given.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def draw_config(seed: int):
    """A valid random FixtureConfig: the constraints are diffusers' (head size = sum of the RoPE
    axes, each even; caption width = the text encoder's hidden size; latent channels = the
    transformer's input channels; VAE channels divisible by its group count)."""
    from zimage_export.fixtures.configs import QWEN3_COMMON, FixtureConfig

    rng = random.Random(seed)
    axes = [2 * rng.randint(1, 6) for _ in range(3)]
    heads = rng.randint(1, 4)
    te_heads = rng.choice([1, 2, 3, 4])
    te_head_dim = rng.choice([4, 6, 8])
    te_hidden = rng.choice([8, 12, 16, 24, 32])
    latent_channels = rng.choice([4, 8, 16])
    blocks = rng.randint(1, 4)
    groups = rng.choice([2, 4, 8])
    channels = [groups * rng.randint(1, 4) for _ in range(blocks)]
    multiple = 2 * 2 ** (blocks - 1)  # patch size 2 times the VAE's factor
    # Sizes of 16 to 96 pixels, multiples of twice the VAE factor.
    sizes = [multiple * rng.randint(max(1, -(-16 // multiple)), max(1, 96 // multiple)) for _ in range(4)]
    patches = max(sizes) // multiple
    if rng.random() < 0.5:
        scheduler = {"num_train_timesteps": 1000, "shift": rng.choice([1.0, 1.5, 2.0, 3.0, 4.5, 6.0]),
                     "use_dynamic_shifting": False}
    else:
        scheduler = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True,
                     "base_shift": round(rng.uniform(0.2, 0.7), 3), "max_shift": round(rng.uniform(0.8, 1.6), 3),
                     "base_image_seq_len": rng.choice([4, 16, 64, 256]),
                     "max_image_seq_len": rng.choice([512, 1024, 4096])}
    return FixtureConfig(
        name=f"random-{seed}",
        seed=seed,
        transformer=dict(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=heads * sum(axes),
            n_layers=rng.randint(1, 3), n_refiner_layers=rng.randint(1, 2), n_heads=heads, n_kv_heads=heads,
            norm_eps=rng.choice([1e-5, 1e-6]), qk_norm=True, cap_feat_dim=te_hidden,
            rope_theta=rng.choice([100.0, 256.0, 10000.0]), t_scale=1000.0, axes_dims=axes,
            # Captions take positions up to 512 tokens (+ padding); images one per patch.
            axes_lens=[rng.randint(600, 1536), rng.randint(patches + 1, 256), rng.randint(patches + 1, 256)],
        ),
        text_encoder=dict(
            QWEN3_COMMON, hidden_size=te_hidden, intermediate_size=rng.choice([16, 24, 40, 64]),
            # (at least 2: Z-Image reads hidden_states[-2]; export.py refuses one)
            num_hidden_layers=rng.randint(2, 4), num_attention_heads=te_heads,
            num_key_value_heads=rng.choice([k for k in (1, 2, 3, 4) if te_heads % k == 0]), head_dim=te_head_dim,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=rng.randint(1, 2),
            norm_num_groups=groups, block_out_channels=channels, down_block_types=["DownEncoderBlock2D"] * blocks,
            up_block_types=["UpDecoderBlock2D"] * blocks, scaling_factor=round(rng.uniform(0.2, 1.5), 4),
            shift_factor=round(rng.uniform(-0.2, 0.2), 4), use_quant_conv=rng.random() < 0.5,
            use_post_quant_conv=rng.random() < 0.5, mid_block_add_attention=rng.random() < 0.7,
            force_upcast=True, sample_size=32,
        ),
        scheduler=scheduler,
        t2i_size=(sizes[0], sizes[1]),
        t2i_alt_size=(sizes[2], sizes[3]),
    )


def draw_controlnet(seed: int, cfg):
    """A random ControlNet for the seed's transformer (its own generator: the base draw is
    unchanged): any mode diffusers has (none, "control_layers" as 2.0, "control_noise_refiner" as
    2.1), a control input of C or 2C+1 channels (inpainting), places on any main and refiner
    layers (0 always, as diffusers asserts), saved as a folder or, where diffusers' single-file
    layout can say the mode, as one .safetensors file. Returns (fixture, single_file, cases) with
    cases in goldens_controlnet's (T2I, INPAINT, LORA) formats."""
    from zimage_export.fixtures.configs import NEGATIVE
    from zimage_export.fixtures.controlnet_configs import ControlNetFixture

    rng = random.Random(f"controlnet-{seed}")
    t = cfg.transformer
    mode = rng.choice([None, "control_layers", "control_noise_refiner"])
    inpaint = rng.random() < 0.5
    places = [0] + sorted(rng.sample(range(1, t["n_layers"]), rng.randint(0, t["n_layers"] - 1)))
    refiner_places = None
    if mode is not None:  # one hint per layer of the branch that runs over the noise refiner
        hints = len(places) if mode == "control_layers" else t["n_refiner_layers"]
        count = rng.randint(1, min(hints, t["n_refiner_layers"]))
        refiner_places = sorted(rng.sample(range(t["n_refiner_layers"]), count))
    config = dict(control_layers_places=places, control_refiner_layers_places=refiner_places,
                  control_in_dim=2 * t["in_channels"] + 1 if inpaint else t["in_channels"],
                  add_control_noise_refiner=mode)
    # A single file says its mode by its keys: "control_layers" has none of its own (the published
    # 2.0 file's zero refiner blocks are not in a model built by diffusers), so it stays a folder.
    single_file = mode != "control_layers" and rng.random() < 0.5
    t2i = [("scale_0.75", "english", "square", 42, 0.0, None, 0.75),
           ("scale_1.0_cfg_nonsquare", "mixed_quoted", "alt", 11, 3.0, NEGATIVE, rng.choice([1.0, 0.6]))]
    inpaint_cases = [("scale_0.7_cfg", 22, 2.0, NEGATIVE, 0.7)] if inpaint else []
    lora = [("peft_0.8_kohya_1.2", "chinese", "square", 9, 0.0, None, 0.8, [("peft", 0.8), ("kohya", 1.2)])]
    return ControlNetFixture("random-control", cfg.name, seed + 5000, config), single_file, (t2i, inpaint_cases, lora)


def add_controlnet(seed: int, cfg, src: Path, package: Path, golden: Path, log, result: dict) -> str | None:
    """Adds the seed's ControlNet (draw_controlnet) to `package` with export_controlnet.py, as a
    user would, and writes its diffusers goldens to golden/controlnet (with the LoRA goldens'
    files where diffusers made them). Returns the failed stage, or None."""
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    from zimage_export.fixtures.controlnet_configs import build_controlnet
    from zimage_export.fixtures.goldens_controlnet import write_cases, write_controlnet_goldens

    fixture, single_file, cases = draw_controlnet(seed, cfg)
    result["controlnet"] = {**fixture.config, "single_file": single_file}
    model = build_controlnet(fixture, dict(ZImageTransformer2DModel.load_config(src / "transformer")))
    folder = golden.parent / "controlnet-src"
    model.save_pretrained(folder)
    given = folder
    extra = []
    if single_file:  # only the ControlNet's keys, as published; the places given as --config
        given = golden.parent / "controlnet.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, given)
        overrides = golden.parent / "controlnet.config.json"
        places = ("control_layers_places", "control_refiner_layers_places")
        overrides.write_text(json.dumps({k: fixture.config[k] for k in places}))
        extra = ["--config", overrides]
    if not run(sys.executable, HERE / "export_controlnet.py", "--package", package, "--src", src, "--controlnet",
               given, "--name", fixture.name, *extra, log=log):
        return "export_controlnet"
    log.flush()
    lora_dir = golden / "loras" if (golden / "lora.json").exists() else None
    try:
        entry = write_controlnet_goldens(cfg, src, folder, fixture.name, str(package), golden / "controlnet",
                                         lora_dir, cases)
    except Exception as e:
        traceback.print_exc(file=log)
        if lora_dir is None:
            return f"the ControlNet goldens (diffusers: {type(e).__name__}: {e})"
        # As with the LoRA goldens: where diffusers fails with LoRAs, the rest is still checked.
        result["reference_failed"] = f"diffusers could not make the ControlNet + LoRA golden: {type(e).__name__}: {e}"
        entry = write_controlnet_goldens(cfg, src, folder, fixture.name, str(package), golden / "controlnet",
                                         None, cases)
    write_cases(golden / "controlnet", [entry])
    return None


# The enhancer goldens' cases (attached and standalone): make_enhancer_fixtures.CASES' format
# with the prompt's key in goldens_common.PROMPTS (torch-free).
ENHANCER_CASES = [("english_thinking", "english", True, 16, None), ("chinese", "chinese", False, 16, None),
                  ("quoted", "mixed_quoted", True, 12, None),
                  ("custom_system", "emoji", False, 16, "Describe the picture."), ("short_limit", "english", True, 3, None)]


def draw_enhancer(seed: int):
    """A random standalone prompt enhancer (its own generator): a tied Qwen3 of any width, head
    count, grouped-query ratio, head size, depth, RoPE base and norm epsilon, built as the
    fixture's is (unit embedding rows, the <|im_end|> row scaled so that some answers stop).
    Returns (config, seed, <|im_end|> scale, cases): cases in make_enhancer_fixtures.CASES'
    format with the prompt's key in goldens_common.PROMPTS (torch-free)."""
    from zimage_export.fixtures.configs import QWEN3_COMMON

    rng = random.Random(f"enhancer-{seed}")
    heads = rng.choice([1, 2, 3, 4])
    config = dict(QWEN3_COMMON, hidden_size=rng.choice([8, 12, 16, 24, 32]),
                  intermediate_size=rng.choice([16, 24, 40, 64]), num_hidden_layers=rng.randint(1, 4),
                  num_attention_heads=heads, num_key_value_heads=rng.choice([k for k in (1, 2, 3, 4) if heads % k == 0]),
                  head_dim=rng.choice([4, 6, 8]), rope_theta=rng.choice([10_000.0, 1_000_000.0]),
                  rms_norm_eps=rng.choice([1e-6, 1e-5]))
    return config, seed + 9000, round(rng.uniform(1.25, 1.6), 3), ENHANCER_CASES


def enhancer_cases(drawn: list) -> list:
    from zimage_export.fixtures.goldens_common import PROMPTS

    return [(name, PROMPTS[key], thinking, max_new, system) for name, key, thinking, max_new, system in drawn]


def add_enhancer(src: Path, package: Path, golden: Path, log) -> str | None:
    """Adds the prompt enhancer to `package` with `export_enhancer.py add` (the text encoder is
    rewritten to share its weights with the decoder) and records transformers' greedy
    generations of the seed's text encoder as a causal LM in golden/enhancer (golden_check
    attaches the enhancer to the pipeline). Returns the failed stage, or None."""
    from make_enhancer_fixtures import record_goldens

    if not run(sys.executable, HERE / "export_enhancer.py", "add", "--package", package, "--src", src, log=log):
        return "export_enhancer add"
    log.flush()
    record_goldens(src / "text_encoder", golden / "enhancer", enhancer_cases(ENHANCER_CASES), str(package),
                   tokenizer_dir=src / "tokenizer", quiet=True)
    return None


def check_standalone_enhancer(seed: int, tokenizer: Path, folder: Path, log, result: dict) -> str | None:
    """The seed's standalone enhancer (draw_enhancer): a Hugging Face folder, exported with
    `export_enhancer.py standalone`, transformers' greedy goldens, golden_check. Returns the
    failed stage, or None."""
    from make_enhancer_fixtures import build_hf_folder, record_goldens

    config, model_seed, im_end_scale, drawn = draw_enhancer(seed)
    result["enhancer"] = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "head_dim", "rope_theta")}
    hf = build_hf_folder(folder / "enhancer-hf", tokenizer, config, model_seed, im_end_scale)
    package = folder / "enhancer-package"
    if not run(sys.executable, HERE / "export_enhancer.py", "standalone", "--hf", hf, "--out", package, log=log):
        return "export_enhancer standalone"
    log.flush()
    record_goldens(hf, folder / "enhancer-golden", enhancer_cases(drawn), str(package), quiet=True)
    if not golden_check(package, folder / "enhancer-golden", log):
        return "enhancer golden_check"
    return None


def draw_omni(seed: int, cfg):
    """An Omni (editing) model on the seed's config (its own generator: the base draw is
    unchanged): the transformer with a SigLIP2 input (`siglip_feat_dim`), a random tiny SigLIP2
    (width, heads, depth, patch 8 or 16, a 2x2 to 5x5 position grid) and processor settings
    (patch budget, resampling), and reference pictures of 64-112 px (the pipeline's minimum
    side is 64), one not a multiple of twice the VAE factor (centre-cropped). Returns (config,
    siglip, processor, references, cases): references as goldens_omni's, cases as the arguments
    of its edit_case with the prompt's key in goldens_common.PROMPTS (torch-free)."""
    from dataclasses import replace

    from zimage_export.fixtures.configs import NEGATIVE

    rng = random.Random(f"omni-{seed}")
    heads = rng.choice([1, 2, 4])
    patch = rng.choice([8, 16])
    siglip = dict(hidden_size=heads * rng.choice([4, 6, 8]), intermediate_size=rng.choice([16, 32, 48]),
                  num_hidden_layers=rng.randint(1, 2), num_attention_heads=heads, num_channels=3,
                  num_patches=rng.randint(2, 5) ** 2, patch_size=patch, layer_norm_eps=1e-6,
                  hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    processor = dict(patch_size=patch, max_num_patches=rng.randint(8, 48), resample=rng.choice([2, 3]))
    multiple = 2 * vae_factor(cfg.vae)
    whole = lambda: multiple * rng.randint(-(-64 // multiple), 112 // multiple)  # noqa: E731
    cropped = [rng.randint(64, 112) for _ in range(2)]
    if multiple > 1 and all(side % multiple == 0 for side in cropped):
        cropped[0] += 1 if cropped[0] < 112 else -1
    references = {"ref_a": (whole(), whole()), "ref_b": (whole(), whole()), "ref_c": tuple(cropped)}
    t = dict(cfg.transformer, siglip_feat_dim=siglip["hidden_size"])
    # Every latent patch of a reference has a position, and so does its SigLIP2 grid, which
    # diffusers stretches over the reference's latent pixels (twice its patches).
    latent_side = max(side for size in references.values() for side in size) // vae_factor(cfg.vae)
    t["axes_lens"] = [t["axes_lens"][0], *(max(n, latent_side) for n in t["axes_lens"][1:])]
    height, width = cfg.t2i_size
    # (name, references, prompt key, seed, steps, guidance, negative, cfg normalization, truncation, size)
    cases = [
        ("one_ref", ["ref_a"], "english", 1, 4, 0.0, None, 0.0, 1.0, None),
        ("two_refs_cfg", ["ref_b", "ref_c"], "mixed_quoted", 2, 4, 4.0, NEGATIVE, 1.3, 0.7, None),
        ("empty_instruction", ["ref_c"], "empty", 3, 3, 5.0, None, 0.0, 1.0, None),
        ("defaults", ["ref_a"], "chinese", 4, 50, 5.0, None, 0.0, 1.0, None),  # the package's defaults
        ("explicit_size", ["ref_a", "ref_b"], "english", 5, 4, 0.0, None, 0.0, 1.0, (width, height)),
        # No reference: ZImageOmniPipeline's text-to-image.
        ("text_only", [], "chinese", 6, 3, 3.0, NEGATIVE, 0.0, 1.0, (width, height)),
    ]
    omni = replace(cfg, name=f"{cfg.name}-omni", transformer=t)
    return omni, siglip, processor, references, cases


# --quantized: the Omni package is also quantized these ways (QUANTIZED's flags), and verify.py
# holds every graph, the Omni transformer quantized with the transformer included, to its bounds.
OMNI_QUANTIZED = ("int8", "w8a8x2-gptq")


def check_omni(seed: int, cfg, tokenizer: Path, folder: Path, log, result: dict, quantized: bool = False) -> str | None:
    """Builds the seed's Omni model (draw_omni) as a diffusers ZImageOmniPipeline folder, exports
    and verifies it as a user would, writes its goldens with diffusers and transformers, and runs
    golden_check on them; with `quantized`, quantizes it (OMNI_QUANTIZED) and verifies that too.
    Returns the failed stage, or None."""
    from zimage_export.fixtures.goldens_common import PROMPTS
    from zimage_export.fixtures.goldens_omni import OMNI_LORA, edit_case, write_omni_goldens, write_omni_lora_goldens
    from zimage_export.fixtures.omni import build_omni_folder

    omni, siglip, processor, references, drawn = draw_omni(seed, cfg)
    cases = [edit_case(name, refs, PROMPTS[prompt], case_seed, steps, guidance, negative=negative, cfg_norm=norm,
                       cfg_trunc=trunc, size=size)
             for name, refs, prompt, case_seed, steps, guidance, negative, norm, trunc, size in drawn]
    result["omni"] = {"siglip": siglip, "processor": processor, "references": references}
    src = build_omni_folder(tokenizer, folder / "omni-src", omni, siglip, processor, seed + 7000)
    package = folder / "omni-package"
    if not run(sys.executable, HERE / "export.py", "--src", src, "--out", package, "--name", omni.name, log=log):
        return "omni export"
    if not run(sys.executable, HERE / "verify.py", package, "--src", src, log=log):
        return "omni verify"
    log.flush()
    try:
        write_omni_goldens(src, folder / "omni-golden", str(package), references, cases)
        # An adapter on the Omni-only modules (written for this config), and the base model's
        # LoRAs, which fit the Omni transformer (the same config's layers), where the base
        # goldens wrote them.
        lora_dir = folder / "golden" / "loras"
        refs = list(references)
        lora_cases = [("lora_siglip", refs[:1], "english", seed + 13, 3, 0.0, None, [(OMNI_LORA, 1.0)])]
        if (folder / "golden" / "lora.json").exists():
            lora_cases += [
                ("lora_peft", refs[:1], "english", seed + 11, 4, 0.0, None, [("peft", 0.8)]),
                ("lora_two_cfg", refs[:2], "chinese", seed + 12, 3, 4.0, "blurry", [("peft", 0.7), ("kohya", 1.3)]),
            ]
        write_omni_lora_goldens(src, folder / "omni-golden", lora_dir, lora_cases)
    except Exception as e:
        traceback.print_exc(file=log)
        return f"the Omni goldens (diffusers: {type(e).__name__}: {e})"
    if not golden_check(package, folder / "omni-golden", log):
        return "omni golden_check"
    multiple = 2 * vae_factor(cfg.vae)
    for name in OMNI_QUANTIZED if quantized else ():
        flags = QUANTIZED[name][0]
        calibration = ["--calibration-size", str(multiple * -(-32 // multiple))] if "gptq" in flags else []
        out = folder / f"omni-quantized-{name}"
        if not run(sys.executable, HERE / "quantize_package.py", "--package", package, "--out", out, *flags,
                   *calibration, log=log):
            return f"omni quantize {name}"
        if not json.loads((out / "manifest.json").read_text())["edit"].get("transformer_weights"):
            return f"omni {name}: the quantized Omni graph shares no weights with the transformer"
        if not run(sys.executable, HERE / "verify.py", out, "--src", src, log=log):
            return f"omni {name} verify"
    return None


def vae_factor(vae: dict) -> int:
    """The VAE's scale factor: each block after the first halves the resolution."""
    return 2 ** (len(vae["block_out_channels"]) - 1)


# --quantized: each package is also quantized these ways (quantize_package.py) and compared
# with its float self by the quant_quality example; a random tiny model's error is far larger
# than a trained one's (docs/quantization.md, "Tests"), so the bounds on the worst final-latent
# relative L2 only catch a broken quantization (NaN, garbage), not a slightly worse one.
QUANTIZED = {
    "int8": (["--weights", "int8"], 0.05),
    "int4": (["--weights", "int4"], 0.4),
    "int4-hqq": (["--weights", "int4", "--method", "hqq"], 0.4),
    "int4-gptq-te8": (["--weights", "int4", "--method", "gptq", "--text-encoder-weights", "int8",
                       "--calibration-count", "2", "--calibration-steps", "4"], 0.4),
    "w8a8x2-gptq": (["--weights", "int8", "--activations", "int8x2", "--method", "gptq",
                     "--calibration-count", "2", "--calibration-steps", "4"], 0.05),
}


# --fp16: the package is also exported in float16 (the GPU's precision; it runs on the CPU too)
# and compared with the float32 package the same way. Measured on tiny-zimage: 6.1e-4.
FP16_BOUND = 5e-3


def check_variants(package: Path, src: Path, folder: Path, size: int, log, worst: dict, quantized: bool,
                   fp16: bool) -> str | None:
    """Makes the package's variants (an fp16 export with export.py and verify.py; each QUANTIZED
    way with quantize_package.py), puts each one's worst final-latent relative L2 from `package`
    (the quant_quality example) in `worst`, and returns the first failure's description, or None."""
    made = {}  # name -> (folder, bound)
    if fp16:
        out = folder / "package-fp16"
        if not run(sys.executable, HERE / "export.py", "--src", src, "--out", out, "--precision", "fp16", log=log):
            return "fp16 export"
        if not run(sys.executable, HERE / "verify.py", out, "--src", src, log=log):
            return "fp16 verify"
        made["fp16"] = (out, FP16_BOUND)
    for name, (flags, bound) in QUANTIZED.items() if quantized else ():
        calibration = ["--calibration-size", str(size)] if "gptq" in flags else []
        out = folder / f"quantized-{name}"
        if not run(sys.executable, HERE / "quantize_package.py", "--package", package, "--out", out, *flags,
                   *calibration, log=log):
            return f"quantize {name}"
        made[name] = (out, bound)
    command = ["cargo", "run", "--release", "-q", "-p", "zimage", "--example", "quant_quality", "--", package,
               *(out for out, _ in made.values()), "--size", str(size), "--steps", "4", "--prompts", "2",
               "--threads", "1"]
    table = subprocess.run([str(a) for a in command], cwd=REPO, capture_output=True, text=True)
    log.write(table.stderr + table.stdout)
    if table.returncode != 0:
        return "quant_quality"
    names = {str(out): name for name, (out, _) in made.items()}
    for line in table.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] in names:
            worst[names[cells[0]]] = float(cells[2])
    for name, (_, bound) in made.items():
        error = worst.get(name, float("nan"))
        if not error <= bound:  # (NaN fails)
            return f"{name}: worst final-latent rel L2 {error} (bound {bound})"
    return None


def golden_check(package: Path, golden: Path, log) -> bool:
    """The runtime against a goldens folder: the golden_check example (sdk/examples)."""
    return run("cargo", "run", "--release", "-q", "-p", "zimage", "--example", "golden_check", "--", package, golden,
               log=log)


def run(*args, log) -> bool:
    """Runs a command from the repository root (cargo's workspace), its output into `log`."""
    return subprocess.run([str(a) for a in args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode == 0


def check_seed(seed: int, out: Path, tokenizer: Path, keep: bool, quantized: bool, fp16: bool) -> dict:
    from zimage_export.fixtures.build import build_pipeline_folder
    from zimage_export.fixtures.goldens_lora import write_lora_goldens
    from zimage_export.fixtures.goldens_pipeline import write_package_goldens

    cfg = draw_config(seed)
    folder = out / cfg.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.time()
    result = {"seed": seed, "config": asdict(cfg)}
    with open(folder / "log.txt", "w") as log:
        src = build_pipeline_folder(cfg, tokenizer, folder / "src")
        package = folder / "package"
        steps = [
            ("export", [sys.executable, HERE / "export.py", "--src", src, "--out", package, "--name", cfg.name]),
            ("verify", [sys.executable, HERE / "verify.py", package, "--src", src]),
        ]
        for stage, command in steps:
            if not run(*command, log=log):
                result["failed"] = stage
                break
        else:
            log.flush()
            try:
                write_package_goldens(cfg, src, folder / "golden", full=True)
            except Exception as e:  # the reference failed: nothing to compare with
                traceback.print_exc(file=log)
                result["failed"] = f"the goldens (diffusers: {type(e).__name__}: {e})"
            try:
                write_lora_goldens(cfg, src, folder / "golden", full=True)
            except Exception as e:  # (lora.json is written last: golden_check then skips the LoRAs)
                traceback.print_exc(file=log)
                result["reference_failed"] = f"diffusers could not make the LoRA goldens: {type(e).__name__}: {e}"
        if "failed" not in result and (quantized or fp16):
            # (before the ControlNet is added: quantize_package.py refuses packages with ControlNets)
            log.flush()
            multiple = 2 * vae_factor(cfg.vae)
            result["variants_worst_latent_rel_l2"] = {}
            failure = check_variants(package, src, folder, multiple * -(-32 // multiple), log,
                                     result["variants_worst_latent_rel_l2"], quantized, fp16)
            if failure:
                result["failed"] = failure
        if "failed" not in result:
            failure = (add_controlnet(seed, cfg, src, package, folder / "golden", log, result)
                       or add_enhancer(src, package, folder / "golden", log))
            if failure:
                result["failed"] = failure
            elif not golden_check(package, folder / "golden", log):
                result["failed"] = "golden_check"
        if "failed" not in result:
            failure = (check_standalone_enhancer(seed, tokenizer, folder, log, result)
                       or check_omni(seed, cfg, tokenizer, folder, log, result, quantized))
            if failure:
                result["failed"] = failure
    result["seconds"] = round(time.time() - started)
    if "failed" not in result and "reference_failed" not in result and not keep:
        shutil.rmtree(folder)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=HERE / ".cache" / "random-configs")
    parser.add_argument("--tokenizer", type=Path, help="official Qwen3 tokenizer.json (default: fetch with npm)")
    parser.add_argument("--keep", action="store_true", help="keep every seed's folders, not only the failures")
    parser.add_argument("--quantized", action="store_true",
                        help="also quantize each package (int8, int4 rtn / hqq / gptq with an int8 text encoder, "
                             "int8x2 activations with gptq) and bound its distance from the float package")
    parser.add_argument("--fp16", action="store_true",
                        help="also export each config in float16 and bound its distance from the float32 package")
    args = parser.parse_args(argv)

    import diffusers
    import torch
    import transformers

    from zimage_export.fixtures.tokenizer import tokenizer_source

    # One line per seed on the console; the libraries' notices and progress bars say nothing here.
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # two LoRAs at once, on purpose

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = tokenizer_source(HERE / ".cache", args.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        result = check_seed(seed, args.out, tokenizer, args.keep, args.quantized, args.fp16)
        results.append(result)
        t, v = result["config"]["transformer"], result["config"]["vae"]
        shape = (f"dim {t['dim']} heads {t['n_heads']} layers {t['n_layers']}+{t['n_refiner_layers']}, "
                 f"caption {t['cap_feat_dim']}, VAE x{vae_factor(v)} "
                 f"{v['latent_channels']} channels, sizes {result['config']['t2i_size']} "
                 f"{result['config']['t2i_alt_size']}")
        status = f"FAILED at {result['failed']} (log: {args.out / result['config']['name'] / 'log.txt'})" \
            if "failed" in result else "ok"
        if "reference_failed" in result:  # not the runtime's failure; said, not counted
            status += f" ({result['reference_failed']}; the other goldens checked)"
        control = result.get("controlnet")
        if control:
            shape += (f"; ControlNet {control['add_control_noise_refiner']}, in {control['control_in_dim']}, "
                      f"places {control['control_layers_places']} / {control['control_refiner_layers_places']}"
                      f"{', one file' if control['single_file'] else ''}")
        enhancer = result.get("enhancer")
        if enhancer:
            shape += (f"; enhancer: width {enhancer['hidden_size']}, {enhancer['num_hidden_layers']} layers, "
                      f"{enhancer['num_attention_heads']}/{enhancer['num_key_value_heads']} heads of "
                      f"{enhancer['head_dim']}")
        omni = result.get("omni")
        if omni:
            shape += (f"; Omni: SigLIP2 {omni['siglip']['hidden_size']} wide, patch {omni['siglip']['patch_size']}, "
                      f"{omni['processor']['max_num_patches']} patches, references {list(omni['references'].values())}")
        variants = result.get("variants_worst_latent_rel_l2")
        if variants:
            shape += "; worst final-latent rel L2: " + ", ".join(f"{k} {v:.2g}" for k, v in variants.items())
        print(f"seed {seed}: {status}, {result['seconds']} s; {shape}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(1 if any("failed" in r for r in results) else 0)


if __name__ == "__main__":
    main()
