"""Train the toy Z-Image model on synthetic scenes and export it as a zimage package.

    PYTHONPATH=export-scripts /work/venv/bin/python export-scripts/train_toy.py \
        --tokenizer models/tiny-zimage/tokenizer.json

Exact Z-Image architecture with diffusers' own classes, tiny sizes (64x64 pictures, 8x8
latents, 16 image tokens):
1. text encoder: the tiny fixture's Qwen3 (TINY_A, same seed, so its graph is byte-identical
   to models/tiny-zimage/text_encoder.onnx), random and frozen; the real Qwen3 tokenizer and
   chat template. The transformer learns to read its features.
2. VAE (AutoencoderKL): trained as an autoencoder on rendered scenes, then its decoder alone
   (encoder frozen); its latent shift/scale measured on the data set.
3. transformer (ZImageTransformer2DModel): flow matching as Z-Image samples it (see
   zimage_export/toy/train.py), on every scene of zimage_export/toy/scenes.py with English
   and Chinese captions.
4. a rank-4 LoRA on the trained transformer that turns circles green
   (models/toy-zimage-lora/green-circles.safetensors, diffusers/PEFT format).
The diffusers folder goes to <cache>/src/toy-zimage, the package to models/toy-zimage (via
export.py), the loss curve to docs/toy-model-training.csv. Seeded; see docs/toy-model.md for
run time and reproducibility.
"""

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CHECK_PROMPTS = [
    "a red circle on a blue background",
    "a large yellow square on the left on a black background",
    "a small white triangle at the top on a purple background",
    "蓝色背景上有一个红色圆形",
    "黑色背景上右边有一个大绿色正方形",
    "a blue circle at the bottom on a yellow background",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="official Qwen3 tokenizer.json (default: fetch with npm)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="work folder (gitignored)")
    parser.add_argument("--out", type=Path, default=REPO / "models" / "toy-zimage")
    parser.add_argument("--lora-out", type=Path, default=REPO / "models" / "toy-zimage-lora" / "green-circles.safetensors")
    parser.add_argument("--curve", type=Path, default=REPO / "docs" / "toy-model-training.csv")
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (results depend on it in the last bits; 1 was fastest on a shared 2-core machine)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.1 for a smoke run)")
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--max-vae-error", type=float, default=25.0, help="stop when the VAE is worse (levels)")
    parser.add_argument("--reuse-vae", action="store_true", help="take the VAE of the last run from the cache")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from zimage_export.fixtures.build import build_text_encoder
    from zimage_export.fixtures.configs import TINY_A
    from zimage_export.fixtures.tokenizer import tokenizer_source, write_tokenizer_folder
    from zimage_export.toy import train as T

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    budget = T.Budget()
    for name in ("vae_steps", "decoder_steps", "transformer_steps", "lora_steps"):
        setattr(budget, name, max(10, int(getattr(budget, name) * args.scale)))
    work = args.cache / "toy"
    work.mkdir(parents=True, exist_ok=True)
    tok_folder = work / "tokenizer"
    write_tokenizer_folder(tokenizer_source(args.cache, args.tokenizer), tok_folder)
    tokenizer = AutoTokenizer.from_pretrained(tok_folder)
    text_encoder = build_text_encoder(TINY_A)
    curve = T.Curve()

    scenes, scene_caps = T.prepare_scenes()
    texts = sorted({c for caps in scene_caps for c in caps} | set(CHECK_PROMPTS) | {""})
    feats = T.caption_features(tokenizer, text_encoder, texts)
    print(f"{len(scenes)} scenes, {len(texts)} captions encoded ({time.time() - curve.start:.0f} s)", flush=True)

    if not (args.reuse_vae and (work / "vae").exists()):  # --reuse-vae: for iterating on the later phases only
        vae = T.train_vae(args.seed, budget, curve)
        _check_vae(vae, scenes, work / "check-vae-joint.png")
        vae = T.finetune_decoder(vae, args.seed, budget, curve)
        vae.save_pretrained(work / "vae")
    # The later phases always start from the saved VAE, so that a full run and a --reuse-vae run
    # of the same VAE take the same path and give the same bytes (the in-memory trained module
    # and its reloaded copy differed in the transformer's last bits).
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    latents = T.set_latent_normalisation(vae, T.encode_scenes(vae, scenes))
    print(f"latent shift {vae.config.shift_factor}, scale {vae.config.scaling_factor}", flush=True)
    if _check_vae(vae, scenes, work / "check-vae.png") > args.max_vae_error:
        sys.exit(f"the VAE reconstructs too badly to train on (more than {args.max_vae_error} levels)")

    def check(model, step):
        model.eval()
        images = T.sample(model, vae, [feats[p] for p in CHECK_PROMPTS], seed=step)
        _save_strip(images, work / f"check-{step:05d}.png")
        for prompt, img in zip(CHECK_PROMPTS, images):
            print(f"  {prompt!r}: centre {T.colour_name(img[32, 32])}, corner {T.colour_name(img[2, 2])}", flush=True)
        model.train()

    transformer = T.train_transformer(args.seed, budget, curve, latents, scene_caps, feats, T.shape_weights(scenes), check=check)
    check(transformer, budget.transformer_steps)
    _check_semantics("transformer, measured from pixels", transformer, vae, feats, scenes, scene_caps, args.seed)
    src = _save_pipeline(work / "src" / "toy-zimage", tok_folder, vae, text_encoder, transformer, tokenizer)
    print(f"diffusers folder: {src}", flush=True)

    lora_model = copy.deepcopy(transformer)
    T.train_lora(lora_model, args.seed + 100, budget, curve, vae, scenes, scene_caps, feats)
    _save_lora(lora_model, args.lora_out)
    check(lora_model, 99999)
    _check_semantics("LoRA (want: circles green), measured from pixels", lora_model, vae, feats, scenes, scene_caps,
                     args.seed, lora_scene=T.lora_scene)
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    curve.write(args.curve)
    print(f"trained in {time.time() - curve.start:.0f} s; curve in {args.curve}", flush=True)

    if not args.skip_export:
        subprocess.run([sys.executable, str(HERE / "export.py"), "--src", str(src), "--out", str(args.out),
                        "--name", "toy-zimage", "--no-cpu-layouts"], check=True)


def _check_vae(vae, scenes, path: Path) -> None:
    """Reconstruction error of the VAE on every 10th scene (levels, 0-255) and what its pictures
    show, measured from pixels; a strip of every 100th."""
    import numpy as np
    import torch

    from zimage_export.toy.scenes import render

    x = torch.from_numpy(np.stack([render(s) for s in scenes[::10]])).permute(0, 3, 1, 2)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    err = float((y - x).abs().mean()) * 127.5
    from zimage_export.toy.measure import score

    images = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    print(f"VAE reconstruction: mean abs error {err:.1f} levels; measured from pixels: "
          f"{_fmt(score(images, scenes[::10]))}", flush=True)
    _save_strip(((torch.cat([x, y], 2)[::10] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), path)
    return err


def _fmt(scores: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items())


def _check_semantics(label: str, model, vae, feats, scenes, scene_caps, seed: int, lora_scene=None) -> None:
    """What the model draws for 126 random scenes (a random one of each one's captions), 8 steps,
    measured from pixels (zimage_export/toy/measure.py, the twin of the Rust semantic tests)."""
    import random

    from zimage_export.toy import train as T
    from zimage_export.toy.measure import score

    rng = random.Random(seed)
    ids = rng.sample(range(len(scenes)), 126)
    picked = [scenes[i] for i in ids]
    caps = [rng.choice(scene_caps[i]) for i in ids]
    images = T.sample(model, vae, [feats[c] for c in caps], seed=seed)
    want = [lora_scene(s) for s in picked] if lora_scene else picked
    print(f"{label}: {_fmt(score(images, want))}", flush=True)


def _save_strip(images, path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.concatenate(list(images), axis=1)).save(path)


def _save_pipeline(folder: Path, tok_folder: Path, vae, text_encoder, transformer, tokenizer) -> Path:
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from zimage_export.fixtures.tokenizer import write_tokenizer_folder
    from zimage_export.toy.train import SCHEDULER

    if folder.exists():
        shutil.rmtree(folder)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    # As the fixtures: the official tokenizer files, and exactly the configured scheduler keys.
    write_tokenizer_folder(tok_folder, folder / "tokenizer")
    import diffusers

    sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": diffusers.__version__, **SCHEDULER}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    return folder


def _save_lora(model, path: Path) -> None:
    from diffusers import ZImagePipeline
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model)
    config = model.peft_config["default"]
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    ZImagePipeline.save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name,
                                     transformer_lora_adapter_metadata=metadata)
    _sort_safetensors_metadata(path)


def _sort_safetensors_metadata(path: Path) -> None:
    """safetensors writes its `__metadata__` keys in hash order, which changes from run to run;
    rewrite the header with them sorted so that equal contents give equal bytes. Only the order
    changes: the header keeps its length and the tensor data is not touched."""
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:
        raise SystemExit(f"{path}: the rewritten safetensors header is longer than the original")
    path.write_bytes(raw[:8] + text.ljust(n, b" ") + raw[8 + n:])


if __name__ == "__main__":
    main()
