"""Training of the toy model, phase by phase (train_toy.py drives it).

Objective (read from diffusers 0.42.1's ZImagePipeline and FlowMatchEulerDiscreteScheduler):
x_sigma = sigma * noise + (1 - sigma) * x0, the transformer is called with t = 1 - sigma, and
the pipeline steps with `-model_output` as d x / d sigma = noise - x0. So the transformer is
trained to output x0 - noise.
"""

import csv
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .scenes import COLOURS, IMAGE_SIZE, Scene, all_scenes, captions, random_scene, render

TOY_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=96, n_layers=3, n_refiner_layers=1,
    n_heads=3, n_kv_heads=3, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0,
    t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[1024, 512, 512],
)
# The tiny fixture's VAE layout (8x down, 16 latent channels), narrower at full resolution
# (flat colours need little there, and that is where the time goes). Two norm groups: with
# one channel per group (8 groups on 8 channels) the decoder's last GroupNorm removes each
# channel's mean, so it could not learn flat colours at all (a first run did not). Scaling/shift factors are
# measured on the trained encoder's latents and written in before saving.
TOY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=2,
    block_out_channels=[8, 16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=1.0, shift_factor=0.0,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True,
    sample_size=IMAGE_SIZE,
)
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
INFERENCE_STEPS = 8


@dataclass
class Budget:
    # Sized for ~45 minutes on one busy CPU core (35 on an idle one): steps cost ~0.28 s (VAE, batch 8), ~0.2 s
    # (decoder only), ~0.38 s (transformer, batch 48). The VAE learns the hues of the palette
    # late (brightness and blue-yellow first; measured: after 400 joint steps only 7 % of
    # shape colours are right): it gets as many steps as the transformer.
    vae_steps: int = 2000
    vae_batch: int = 8
    decoder_steps: int = 2000
    transformer_steps: int = 4800
    transformer_batch: int = 48
    # Measured on 400-step runs: peak 2e-3 reaches the loss 6e-4 reaches in twice the steps.
    transformer_lr: float = 2e-3
    lora_steps: int = 200
    lora_batch: int = 32


@dataclass
class Curve:
    """Loss per logging interval, written as CSV rows (phase, step, loss, seconds)."""
    rows: list = field(default_factory=list)
    start: float = field(default_factory=time.time)

    def log(self, phase: str, step: int, loss: float) -> None:
        elapsed = time.time() - self.start
        self.rows.append((phase, step, f"{loss:.6f}", f"{elapsed:.0f}"))
        print(f"{phase} step {step}: loss {loss:.5f} ({elapsed:.0f} s)", flush=True)

    def write(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("phase", "step", "mean_loss", "elapsed_s"))
            w.writerows(self.rows)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------- VAE

# Extra weight of the shape's pixels in the VAE's loss: a small shape is 4 % of the picture, so
# an unweighted loss learns backgrounds and lets small shapes blur into them (the first toy
# VAE got 32 % of the shape colours right from exact latents).
SHAPE_WEIGHT = 4.0


def vae_batch(rng: random.Random, n: int):
    """`n` random scenes with slightly jittered geometry (+-2 px, +-1 px size: the decoder also
    sees near misses of the 1890 pictures the transformer draws), as [n, 3, 64, 64] in [-1, 1],
    with per-pixel loss weights (1 on the background, 1 + SHAPE_WEIGHT on the shape)."""
    images, weights = [], []
    for _ in range(n):
        scene = random_scene(rng)
        img = render(scene, supersample=1, jitter=(rng.uniform(-2, 2), rng.uniform(-2, 2), rng.uniform(-1, 1)))
        bg = np.array(COLOURS[scene.background][0], dtype=np.float32) / 127.5 - 1.0
        weights.append(1.0 + SHAPE_WEIGHT * (np.abs(img - bg).sum(-1) > 0.05))
        images.append(img)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x, torch.from_numpy(np.stack(weights).astype(np.float32))[:, None]


def vae_loss(recon, x, weight):
    """Weighted MSE + 0.1 L1, normalised by the mean weight (so its scale is comparable with the
    unweighted loss)."""
    e = recon - x
    return (weight * (e * e + 0.1 * e.abs())).mean() / weight.mean()


def train_vae(seed: int, budget: Budget, curve: Curve, log_every: int = 50):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TOY_VAE).train()
    rng = random.Random(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    total = 0.0
    for step in range(budget.vae_steps):
        x, weight = vae_batch(rng, budget.vae_batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, budget.vae_steps, 2e-3, warmup=30)
        # A deterministic autoencoder: decoding samples while the encoder's variance is still ~1
        # drowns the signal (a first run learnt nothing in 300 steps). The mean is kept near unit
        # scale by a weak L2 term; the variance head is fixed afterwards (fix_variance).
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mode()).sample
        rec = vae_loss(recon, x, weight)
        loss = rec + 1e-4 * posterior.mean.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += rec.item()
        if (step + 1) % log_every == 0:
            curve.log("vae", step + 1, total / log_every)
            total = 0.0
    fix_variance(vae)
    return vae.eval()


def finetune_decoder(vae, seed: int, budget: Budget, curve: Curve, log_every: int = 50):
    """More steps for the decoder alone, the encoder frozen: the latents (and so the
    transformer's data) stay those of train_vae, only their decoding sharpens. The joint phase
    learns backgrounds first and shape colours late; this phase is where they come right."""
    rng = random.Random(seed + 7)
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    total = 0.0
    for step in range(budget.decoder_steps):
        x, weight = vae_batch(rng, budget.vae_batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, budget.decoder_steps, 2e-3, warmup=10)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        loss = vae_loss(recon, x, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
        if (step + 1) % log_every == 0:
            curve.log("vae_decoder", step + 1, total / log_every)
            total = 0.0
    for p in vae.parameters():
        p.requires_grad_(True)
    return vae.eval()


@torch.no_grad()
def fix_variance(vae, logvar: float = -12.0) -> None:
    """The encoder's log-variance channels become the constant `logvar` (std 0.0025), so
    `latent_dist.sample()` (image-to-image) and `mode()` give the same latents to within noise
    far below what the transformer resolves."""
    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    conv.weight[half:] = 0.0
    conv.bias[half:] = logvar


@torch.no_grad()
def encode_scenes(vae, scenes: list[Scene]) -> torch.Tensor:
    """Posterior means of every scene's picture (unnormalised), [N, 16, 8, 8]."""
    out = []
    for i in range(0, len(scenes), 64):
        x = torch.from_numpy(np.stack([render(s) for s in scenes[i:i + 64]])).permute(0, 3, 1, 2)
        out.append(vae.encode(x).latent_dist.mode())
    return torch.cat(out)


def set_latent_normalisation(vae, latents: torch.Tensor) -> torch.Tensor:
    """Measure shift/scale on the data set (as the real VAE's factors were), store them in the
    config, and return the normalised latents the transformer learns."""
    shift = float(latents.mean())
    scale = float(1.0 / (latents - shift).std())
    shift, scale = round(shift, 4), round(scale, 4)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (latents - shift) * scale


# ---------------------------------------------------------------- text features


@torch.no_grad()
def caption_features(tokenizer, text_encoder, texts: list[str], batch: int = 256) -> dict[str, torch.Tensor]:
    """The transformer's caption input as ZImagePipeline makes it: the chat template (thinking
    on, generation prompt), the second-to-last hidden state, valid tokens only. Batched with
    padding on the right: attention is causal, so padding does not reach the valid tokens."""
    out = {}
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True) for t in texts]
    tokenizer.padding_side = "right"
    for i in range(0, len(texts), batch):
        ids = tokenizer(prompts[i:i + batch], padding=True, return_tensors="pt")
        mask = ids.attention_mask.bool()
        # The base model only: the LM head's logits are not needed.
        hidden = text_encoder.model(input_ids=ids.input_ids, attention_mask=mask,
                                    output_hidden_states=True).hidden_states[-2]
        for j, text in enumerate(texts[i:i + batch]):
            out[text] = hidden[j][mask[j]].clone()
    return out


# ---------------------------------------------------------------- transformer


def inference_sigmas() -> list[float]:
    """The sigmas the package's 8-step schedule visits (the pipeline's default sigmas through
    the scheduler's static shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / INFERENCE_STEPS, INFERENCE_STEPS).tolist())
    return [float(s) for s in sched.sigmas[:-1]]


def sample_sigmas(gen: torch.Generator, n: int, at: torch.Tensor) -> torch.Tensor:
    """Half the batch at the schedule's own sigmas (where the toy is used), half shifted-uniform
    (shift 3, as the schedule) so that other step counts work too."""
    u = torch.rand(n, generator=gen)
    shifted = 3 * u / (1 + 2 * u)
    pick = at[torch.randint(len(at), (n,), generator=gen)]
    return torch.where(torch.rand(n, generator=gen) < 0.5, pick, shifted)


# How much more a latent pixel covered by the shape counts in the flow loss than a background
# one. Unweighted, the flat background is nearly all of the loss: a run of 2400 steps learnt the
# background colour (94 %) and drew the shape's colour, position and size at chance.
SHAPE_LOSS_WEIGHT = 8.0


def shape_weights(scenes: list[Scene]) -> torch.Tensor:
    """Per-latent-pixel loss weights [N, 1, 8, 8]: 1 + SHAPE_LOSS_WEIGHT x the share of the
    8x8 pixel block the shape covers (pixels that differ from the background colour)."""
    out = []
    for scene in scenes:
        img = render(scene)
        background = np.asarray(COLOURS[scene.background][0], dtype=np.float32) / 127.5 - 1.0
        covered = (np.abs(img - background).max(axis=-1) > 0.1).astype(np.float32)
        share = covered.reshape(IMAGE_SIZE // 8, 8, IMAGE_SIZE // 8, 8).mean(axis=(1, 3))
        out.append(1.0 + SHAPE_LOSS_WEIGHT * share)
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


def flow_loss(transformer, x0, feats, sigma, noise, weight=None):
    s = sigma.view(-1, 1, 1, 1)
    xt = s * noise + (1 - s) * x0
    out = transformer(list(xt.unsqueeze(2).unbind(0)), 1 - sigma, feats, return_dict=False)[0]
    pred = torch.stack(out).squeeze(2)
    if weight is None:
        return torch.nn.functional.mse_loss(pred, x0 - noise)
    return ((pred - (x0 - noise)).pow(2) * weight).mean() / weight.mean()


def pick_batch(rng: random.Random, n_scenes: int, batch: int):
    return [rng.randrange(n_scenes) for _ in range(batch)]


def train_transformer(seed: int, budget: Budget, curve: Curve, latents: torch.Tensor, scene_caps: list[list[str]],
                      feats: dict[str, torch.Tensor], weights: torch.Tensor, log_every: int = 100, check=None):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**TOY_TRANSFORMER).train()
    with torch.no_grad():  # the pad tokens start as torch.empty: give them defined values
        model.x_pad_token.normal_(0, 0.02)
        model.cap_pad_token.normal_(0, 0.02)
    _run(model, list(model.parameters()), "transformer", seed, budget.transformer_steps, budget.transformer_batch,
         budget.transformer_lr, curve, len(latents),
         lambda ids, rng: (latents[ids], [_caption(rng, scene_caps[i], feats) for i in ids], weights[ids]),
         log_every, check)
    return model.eval()


def _caption(rng: random.Random, options: list[str], feats) -> torch.Tensor:
    # 5 % unconditional (the empty prompt), so classifier-free guidance has a meaning.
    return feats[""] if rng.random() < 0.05 else feats[rng.choice(options)]


def _run(model, params, phase, seed, steps, batch, peak_lr, curve, n_items, make_batch, log_every, check):
    rng = random.Random(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    at = torch.tensor(inference_sigmas())
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    total = 0.0
    for step in range(steps):
        x0, feats, weight = make_batch(pick_batch(rng, n_items, batch), rng)
        sigma = sample_sigmas(gen, batch, at)
        noise = torch.randn(x0.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr)
        loss = flow_loss(model, x0, feats, sigma, noise, weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        total += loss.item()
        if (step + 1) % log_every == 0:
            curve.log(phase, step + 1, total / log_every)
            total = 0.0
        if check is not None and (step + 1) % 400 == 0:
            check(model, step + 1)


def prepare_scenes():
    scenes = all_scenes()
    return scenes, [captions(s) for s in scenes]


# ---------------------------------------------------------------- LoRA: circles turn green

LORA_TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


def lora_scene(scene: Scene) -> Scene:
    """What the recolouring LoRA draws for a scene: every circle green (on a green background,
    unchanged - there it would vanish), everything else as the base model."""
    if scene.shape == "circle" and scene.background != "green":
        return Scene(scene.shape, "green", scene.background, scene.position, scene.size)
    return scene


def train_lora(transformer, seed: int, budget: Budget, curve: Curve, vae, scenes, scene_caps, feats,
               log_every: int = 50):
    from peft import LoraConfig

    targets = [f"layers.{i}.{m}" for i in range(TOY_TRANSFORMER["n_layers"]) for m in LORA_TARGETS]
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian")
    torch.manual_seed(seed)
    transformer.add_adapter(config)
    transformer.train()
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for n, p in transformer.named_parameters():
        p.requires_grad_("lora_" in n)
    lora_scenes = [lora_scene(s) for s in scenes]
    targets_lat = set_latents_like(vae, lora_scenes)
    weights = shape_weights(lora_scenes)
    _run(transformer, params, "lora", seed, budget.lora_steps, budget.lora_batch, 1e-3, curve, len(scenes),
         lambda ids, rng: (targets_lat[ids], [feats[rng.choice(scene_caps[i])] for i in ids], weights[ids]),
         log_every, None)
    transformer.eval()
    return config


def set_latents_like(vae, scenes):
    lat = encode_scenes(vae, scenes)
    return (lat - vae.config.shift_factor) * vae.config.scaling_factor


# ---------------------------------------------------------------- sampling (for checks)


@torch.no_grad()
def sample(transformer, vae, feats: list[torch.Tensor], seed: int) -> np.ndarray:
    """8 Euler steps exactly as ZImagePipeline (no guidance); uint8 images [N, 64, 64, 3]."""
    sig = inference_sigmas() + [0.0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(feats), 16, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=gen)
    for i in range(INFERENCE_STEPS):
        t = torch.full((len(feats),), 1 - sig[i])
        out = torch.stack(transformer(list(x.unsqueeze(2).unbind(0)), t, feats, return_dict=False)[0]).squeeze(2)
        x = x + (sig[i + 1] - sig[i]) * (-out)
    img = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def colour_name(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float32)
    return min(COLOURS, key=lambda c: float(((np.array(COLOURS[c][0]) - rgb) ** 2).sum()))
