"""Replay the goldens with a package alone: numpy + ONNX Runtime + the `tokenizers` library, no
diffusers. It is an executable description of what the runtime has to do (docs/goldens.md)
and a check that the packages and the goldens agree.

    python check_goldens.py models/tiny-zimage [--golden tests/golden/tiny-zimage]

Prints, per case, the relative L2 error of the final latents and the largest uint8 difference
of the images; exits 1 if latents are off by more than 1e-4 or any pixel by more than 1 level.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch  # only for torch.randn with a CPU generator: the noise the goldens use
from PIL import Image
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent


class Package:
    def __init__(self, path: Path):
        self.manifest = json.loads((path / "manifest.json").read_text())
        self.sessions = {
            name: ort.InferenceSession(str(path / g["path"]), providers=["CPUExecutionProvider"])
            for name, g in self.manifest["graphs"].items()
        }
        self.tokenizer = Tokenizer.from_file(str(path / self.manifest["tokenizer"]["path"]))

    def run(self, graph, **inputs):
        return self.sessions[graph].run(None, inputs)

    def token_ids(self, prompt: str, max_len: int) -> list[int]:
        text = self.manifest["text_encoder"]["prompt_template"].format(prompt=prompt)
        return self.tokenizer.encode(text, add_special_tokens=False).ids[:max_len]

    def encode(self, prompt: str, max_len: int) -> np.ndarray:
        ids = np.array([self.token_ids(prompt, max_len)], np.int64)
        return self.run("text_encoder", input_ids=ids, attention_mask=np.ones_like(ids))[0][0]

    def schedule(self, steps: int, image_seq_len: int):
        """FlowMatchEulerDiscreteScheduler.set_timesteps as ZImagePipeline drives it, in float32."""
        cfg = self.manifest["scheduler"]
        sigmas = torch.linspace(1.0, 1.0 / steps, steps).numpy()
        if cfg.get("use_dynamic_shifting", False):
            base, top = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
            lo, hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
            m = (hi - lo) / (top - base)
            mu = image_seq_len * m + (lo - m * base)
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            shift = cfg.get("shift", 1.0)
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        sigmas = sigmas.astype(np.float32)
        return np.append(sigmas, np.float32(0.0)), sigmas * np.float32(cfg.get("num_train_timesteps", 1000))

    def transformer(self, x, t_norm, features):
        width = max(len(f) for f in features)
        feats = np.zeros((len(features), width, features[0].shape[1]), np.float32)
        mask = np.zeros((len(features), width), bool)
        for i, f in enumerate(features):
            feats[i, : len(f)], mask[i, : len(f)] = f, True
        timestep = np.full(len(features), t_norm, np.float32)
        return self.run("transformer", latents=x, timestep=timestep, cap_feats=feats, cap_mask=mask)[0]

    def decode(self, z):
        vae = self.manifest["vae"]
        z = (z / np.float32(vae["scaling_factor"]) + np.float32(vae["shift_factor"])).astype(np.float32)
        image = np.clip(self.run("vae_decoder", latents=z)[0] * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        return np.round(image * 255).astype(np.uint8)  # numpy rounds half to even, like diffusers

    def image_latents(self, image, gen):
        """VAE posterior sample (one generator draw), scaled for the transformer."""
        vae = self.manifest["vae"]
        mean, logvar = self.run("vae_encoder", image=image)
        z = mean + np.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).numpy()
        return ((z - np.float32(vae["shift_factor"])) * np.float32(vae["scaling_factor"])).astype(np.float32)


def denoise(pkg, case, x, sigmas, timesteps, start=0, after_step=None):
    n, g = case["num_images_per_prompt"], case["guidance_scale"]
    msl = case["max_sequence_length"]
    pos = [pkg.encode(case["prompt"], msl)] * n
    neg = [pkg.encode(case["negative_prompt"] or "", msl)] * n if g > 0 else None
    for i in range(start, len(timesteps)):
        t_norm = (np.float32(1000) - timesteps[i]) / np.float32(1000)
        # As diffusers: the float32 t_norm as a Python float against the Python float (numpy would
        # compare in float32, where float32 0.1 is not above 0.1).
        scale = 0.0 if g > 0 and case["cfg_truncation"] <= 1 and float(t_norm) > case["cfg_truncation"] else g
        if scale > 0:
            out = pkg.transformer(np.concatenate([x, x]), t_norm, pos + neg)
            p, q = out[:n], out[n:]
            pred = p + np.float32(scale) * (p - q)
            if case["cfg_normalization"] > 0:
                for j in range(n):
                    limit = np.linalg.norm(p[j]) * np.float32(case["cfg_normalization"])
                    norm = np.linalg.norm(pred[j])
                    if norm > limit:
                        pred[j] = pred[j] * (limit / norm)
        else:
            pred = pkg.transformer(x, t_norm, pos)
        x = (x + (sigmas[i + 1] - sigmas[i]) * -pred).astype(np.float32)
        if after_step is not None:
            x = after_step(i, x)
    return x


def latent_size(pkg, case):
    f = pkg.manifest["vae"]["scale_factor"]
    return 2 * (case["height"] // (2 * f)), 2 * (case["width"] // (2 * f))


def text_to_image(pkg, case, golden):
    h, w = latent_size(pkg, case)
    batch = case["num_images_per_prompt"]
    channels = pkg.manifest["transformer"]["in_channels"]
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    x = torch.randn(batch, channels, h, w, generator=gen).numpy()
    sigmas, timesteps = pkg.schedule(case["num_inference_steps"], (h // 2) * (w // 2))
    return denoise(pkg, case, x, sigmas, timesteps)


def image_to_image(pkg, case, golden):
    """Draw 1: posterior sample of the init image; draw 2: the noise. Inpaint then blends."""
    h, w = latent_size(pkg, case)
    steps, batch = case["num_inference_steps"], case["num_images_per_prompt"]
    channels = pkg.manifest["transformer"]["in_channels"]
    sigmas, timesteps = pkg.schedule(steps, (h // 2) * (w // 2))
    start = int(steps - min(steps * case["strength"], steps))
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    pixels = np.asarray(Image.open(golden / case["init_image_file"]).convert("RGB"), np.float32) / 255
    z = pkg.image_latents((pixels * 2 - 1).transpose(2, 0, 1)[None], gen).repeat(batch, axis=0)
    noise = torch.randn(batch, channels, h, w, generator=gen).numpy()
    x = (sigmas[start] * noise + (1 - sigmas[start]) * z).astype(np.float32)
    blend = None
    if "mask_file" in case:
        mask = np.asarray(Image.open(golden / case["mask_file"]).convert("L"), np.float32) / 255
        mask = (mask >= 0.5).astype(np.float32)
        rows = np.floor(np.arange(h) * (mask.shape[0] / h)).astype(int)
        cols = np.floor(np.arange(w) * (mask.shape[1] / w)).astype(int)
        m = mask[rows][:, cols][None, None]

        def blend(i, x):
            keep = z if i == steps - 1 else sigmas[i + 1] * noise + (1 - sigmas[i + 1]) * z
            return ((1 - m) * keep + m * x).astype(np.float32)

    return denoise(pkg, case, x, sigmas, timesteps, start, blend)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--golden", type=Path, help="default: tests/golden/<package folder name>")
    args = parser.parse_args(argv)
    golden = args.golden or REPO / "tests" / "golden" / args.package.name
    pkg = Package(args.package)
    cases = json.loads((golden / "cases.json").read_text())
    ok = True

    for row in json.loads((REPO / "tests/golden/common/tokens.json").read_text()):
        if pkg.token_ids(row["prompt"], row["max_sequence_length"]) != row["ids"]:
            print(f"tokens {row['name']}: MISMATCH")
            ok = False
    for row in cases["text_features"]:
        want = np.load(golden / row["features_file"])
        got = pkg.encode(row["prompt"], row["max_sequence_length"])
        print(f"text features {row['prompt'][:30]!r}: rel {np.linalg.norm(got - want) / np.linalg.norm(want):.2e}")

    tf = {k[: -len("_file")]: np.load(golden / v) for k, v in cases["transformer_forward"].items()}
    (got,) = pkg.run("transformer", latents=tf["latents"], timestep=tf["timestep"], cap_feats=tf["cap_feats"],
                     cap_mask=tf["cap_mask"])
    rel = float(np.linalg.norm(got - tf["output"]) / np.linalg.norm(tf["output"]))
    ok &= rel <= 1e-5
    print(f"transformer forward: rel {rel:.2e}")

    for section, run in (("text_to_image", text_to_image), ("image_to_image", image_to_image), ("inpaint", image_to_image)):
        for case in cases[section]:
            latents = run(pkg, case, golden)
            want = np.load(golden / case["latents_file"])
            rel = float(np.linalg.norm(latents - want) / np.linalg.norm(want))
            images = pkg.decode(latents)
            ref = np.stack([np.asarray(Image.open(golden / f)) for f in case["image_files"]])
            diff = np.abs(images.astype(int) - ref.astype(int))
            good = rel <= 1e-4 and diff.max() <= 1
            ok &= good
            print(f"{section:<15} {case['name']:<34} latents rel {rel:.2e}  max |u8 diff| {diff.max()}"
                  f" on {np.mean(diff > 0):.1e} of values  {'ok' if good else 'FAIL'}")
    print("all goldens reproduced" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
