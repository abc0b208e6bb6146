"""Parity on configs that are not in the repo: random-weight Z-Image models of configs drawn at
random, each built in diffusers format, exported and verified by export.py / verify.py as a
user would, given diffusers goldens by the fixture writers, and generated again by the runtime
(`cargo run --example golden_check`, the bounds of tests/parity.rs).

    python random_config_parity.py --seeds 1 2 3 [--quantized] [--out DIR] [--keep]

A seed draws every width, head count and depth of the transformer, its RoPE axes and lengths,
the Qwen3 text encoder (its hidden size is the transformer's caption width), the VAE (1 to 4
blocks: scale factor 1 to 8, 4 to 16 latent channels, quant convs and the mid-block attention
on or off), the scheduler (a static shift or dynamic shifting with drawn parameters) and the
image sizes (multiples of twice the VAE factor). The goldens are tiny-zimage's full list (text
to image with and without guidance, truncation and normalisation, two images, empty and long
prompts; image to image; inpainting; LoRAs in the four file formats, alone and two at once).
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


def check_quantized(package: Path, folder: Path, size: int, log, worst: dict) -> str | None:
    """Quantizes `package` each QUANTIZED way and puts each one's worst final-latent relative L2
    in `worst`; returns the first failure's description, or None."""
    made = []
    for name, (flags, _) in QUANTIZED.items():
        calibration = ["--calibration-size", str(size)] if "gptq" in flags else []
        out = folder / f"quantized-{name}"
        if not run(sys.executable, HERE / "quantize_package.py", "--package", package, "--out", out, *flags,
                   *calibration, log=log):
            return f"quantize {name}"
        made.append(out)
    command = ["cargo", "run", "--release", "-q", "-p", "zimage", "--example", "quant_quality", "--", package,
               *made, "--size", str(size), "--steps", "4", "--prompts", "2", "--threads", "1"]
    table = subprocess.run([str(a) for a in command], cwd=REPO, capture_output=True, text=True)
    log.write(table.stderr + table.stdout)
    if table.returncode != 0:
        return "quant_quality"
    for line in table.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith(str(folder)):
            worst[Path(cells[0]).name.removeprefix("quantized-")] = float(cells[2])
    for name, (_, bound) in QUANTIZED.items():
        error = worst.get(name, float("nan"))
        if not error <= bound:  # (NaN fails)
            return f"quantized {name}: worst final-latent rel L2 {error} (bound {bound})"
    return None


def run(*args, log) -> bool:
    """Runs a command from the repository root (cargo's workspace), its output into `log`."""
    return subprocess.run([str(a) for a in args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode == 0


def check_seed(seed: int, out: Path, tokenizer: Path, keep: bool, quantized: bool) -> dict:
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
        if "failed" not in result:
            if not run("cargo", "run", "--release", "-q", "-p", "zimage", "--example", "golden_check", "--",
                       package, folder / "golden", log=log):
                result["failed"] = "golden_check"
            elif quantized:
                log.flush()
                multiple = 2 * vae_factor(cfg.vae)
                result["quantized_worst_latent_rel_l2"] = {}
                failure = check_quantized(package, folder, multiple * -(-32 // multiple), log,
                                          result["quantized_worst_latent_rel_l2"])
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
        result = check_seed(seed, args.out, tokenizer, args.keep, args.quantized)
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
        quantized = result.get("quantized_worst_latent_rel_l2")
        if quantized:
            shape += "; quantized, worst final-latent rel L2: " + ", ".join(f"{k} {v:.2g}" for k, v in quantized.items())
        print(f"seed {seed}: {status}, {result['seconds']} s; {shape}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(1 if any("failed" in r for r in results) else 0)


if __name__ == "__main__":
    main()
