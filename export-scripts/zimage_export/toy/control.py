"""Training of the toy ControlNet (train_toy_controlnet.py drives it): a diffusers
ZImageControlNetModel on the frozen toy transformer, taught to put the shape where an edge map
says, with captions that do not say where.

The objective is train_toy's (flow matching as Z-Image samples it, the shape-weighted squared
error, half the sigmas at the 8-step schedule's own); the transformer, VAE and text encoder are
frozen, only the ControlNet's own modules learn. The control input is what the SDK and
diffusers' ZImageControlNetPipeline feed the ControlNet: the control image VAE-encoded (mode),
shifted and scaled like latents, zero-padded to control_in_dim channels.
"""

import random
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import train as T
from .edges import control_map, geometries
from .scenes import POSITIONS, Scene, unplaced_captions

# The 2.1 union layout (add_control_noise_refiner="control_noise_refiner", 2C + 1 = 33 control
# channels, so the same ControlNet could also inpaint), cut to the toy's 3 main layers and 1
# noise-refiner layer: a hint after every main layer and after the noise refiner.
CONTROL_CONFIG = dict(
    control_layers_places=[0, 1, 2], control_refiner_layers_places=[0], control_in_dim=33,
    add_control_noise_refiner="control_noise_refiner",
)
# Copied from the transformer's config (ZImageControlNetModel takes them separately).
SHARED_CONFIG_KEYS = ("all_patch_size", "all_f_patch_size", "dim", "n_refiner_layers", "n_heads", "n_kv_heads",
                      "norm_eps", "qk_norm")
OWN_PREFIXES = ("control_layers.", "control_noise_refiner.", "control_all_x_embedder.")


@dataclass
class ControlBudget:
    # ~0.37 s per step of 32 on one core of a busy 2-core machine: ~10 minutes (docs/toy-model.md).
    # The placement is learnt by step 800 (position 0.96 from pixels); the rest lowers the loss.
    steps: int = 1600
    batch: int = 32
    lr: float = 1e-3
    # Share of captions replaced by the empty prompt: the map alone must then give the shape.
    empty_caption: float = 0.05


def build_controlnet(transformer, seed: int):
    """A ZImageControlNetModel for `transformer`, its control blocks starting as copies of the
    transformer blocks they sit beside (the attention, feed-forward, norms and modulation; the
    before/after projections stay zero as diffusers initialises them, so training starts from
    the plain transformer's prediction), then attached to the transformer's shared modules."""
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    cfg = {k: transformer.config[k] for k in SHARED_CONFIG_KEYS}
    model = ZImageControlNetModel(**cfg, **CONTROL_CONFIG)
    with torch.no_grad():
        for block, place in zip(model.control_layers, model.config.control_layers_places):
            block.load_state_dict(transformer.layers[place].state_dict(), strict=False)
        for block, source in zip(model.control_noise_refiner, transformer.noise_refiner):
            block.load_state_dict(source.state_dict(), strict=False)
    # diffusers 0.42.1's forward reads this flag under autograd but sets it only in
    # enable_gradient_checkpointing(): without it, training raises AttributeError.
    model.gradient_checkpointing = False
    return ZImageControlNetModel.from_transformer(model, transformer)


def own_parameters(controlnet) -> list:
    return [p for n, p in controlnet.named_parameters() if n.startswith(OWN_PREFIXES)]


def standalone(controlnet):
    """A copy with only the ControlNet's own modules (what is saved and exported): the shared
    ones belong to the transformer."""
    from diffusers import ZImageControlNetModel

    cfg = {k: v for k, v in controlnet.config.items() if not k.startswith("_")}
    model = ZImageControlNetModel(**cfg)
    own = {k: v for k, v in controlnet.state_dict().items() if k.startswith(OWN_PREFIXES)}
    model.load_state_dict(own)
    return model.eval()


@torch.no_grad()
def control_latents(vae, maps: list[np.ndarray], control_in_dim: int) -> torch.Tensor:
    """Control images ([H, W, 3] uint8) -> the ControlNet's input [N, control_in_dim, h, w], as
    ZImageControlNetPipeline makes it: pixels to [-1, 1], VAE mode, (z - shift) * scale,
    zero-padded to control_in_dim channels."""
    x = torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    z = vae.encode(x).latent_dist.mode()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    pad = torch.zeros(z.shape[0], control_in_dim - z.shape[1], *z.shape[2:])
    return torch.cat([z, pad], dim=1)


def scene_controls(vae, scenes: list[Scene], control_in_dim: int):
    """The control latents of every scene's edge map [N, control_in_dim, h, w] (one per
    geometry, shared by the scenes that have it) and the maps by geometry."""
    geo = geometries()
    maps = {g: control_map(*g) for g in geo}
    lat = control_latents(vae, [maps[g] for g in geo], control_in_dim)
    index = {g: i for i, g in enumerate(geo)}
    return lat[[index[(s.shape, s.position, s.size)] for s in scenes]], maps


def predict(transformer, controlnet, x, t, feats, control, scale: float):
    """The transformer's velocity with the ControlNet's hints, batched as the pipeline does."""
    xs = list(x.unsqueeze(2).unbind(0))
    hints = controlnet(xs, t, feats, list(control.unsqueeze(2).unbind(0)), conditioning_scale=scale)
    out = transformer(xs, t, feats, controlnet_block_samples=hints, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


def train_controlnet(controlnet, transformer, seed: int, budget: ControlBudget, curve: T.Curve, latents, controls,
                     scene_caps, feats, weights, log_every: int = 50, check=None):
    """Flow matching as train_toy's transformer phase (same sigma sampling and shape-weighted
    loss), only the ControlNet's own parameters learning."""
    for p in transformer.parameters():
        p.requires_grad_(False)
    params = own_parameters(controlnet)
    for p in params:
        p.requires_grad_(True)
    controlnet.train()
    rng = random.Random(seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    at = torch.tensor(T.inference_sigmas())
    opt = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.01)
    total = 0.0
    for step in range(budget.steps):
        ids = T.pick_batch(rng, len(latents), budget.batch)
        x0, control, weight = latents[ids], controls[ids], weights[ids]
        caps = [feats[""] if rng.random() < budget.empty_caption else feats[rng.choice(scene_caps[i])] for i in ids]
        sigma = T.sample_sigmas(gen, budget.batch, at)
        noise = torch.randn(x0.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] = T.lr_at(step, budget.steps, budget.lr)
        s = sigma.view(-1, 1, 1, 1)
        pred = predict(transformer, controlnet, s * noise + (1 - s) * x0, 1 - sigma, caps, control, 1.0)
        loss = ((pred - (x0 - noise)).pow(2) * weight).mean() / weight.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        total += loss.item()
        if (step + 1) % log_every == 0:
            curve.log("controlnet", step + 1, total / log_every)
            total = 0.0
        if check is not None and (step + 1) % 400 == 0 and step + 1 < budget.steps:
            controlnet.eval()
            check(step + 1)
            controlnet.train()
    for p in params:
        p.requires_grad_(False)
    return controlnet.eval()


@torch.no_grad()
def sample(transformer, controlnet, vae, feats, control, scale: float, seed: int) -> np.ndarray:
    """8 Euler steps as ZImageControlNetPipeline (no guidance); uint8 images [N, 64, 64, 3]."""
    sig = T.inference_sigmas() + [0.0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(feats), 16, control.shape[2], control.shape[3], generator=gen)
    for i in range(T.INFERENCE_STEPS):
        t = torch.full((len(feats),), 1 - sig[i])
        x = x + (sig[i + 1] - sig[i]) * (-predict(transformer, controlnet, x, t, feats, control, scale))
    img = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def placement_check_set(seed: int, n_scenes: int = 30):
    """Random scenes (`n_scenes`, seeded), each asked with one of its position-less captions
    and an edge map at every position: what the ControlNet is judged on. Returns
    (wanted scenes, captions, geometries)."""
    from .scenes import random_scene

    rng = random.Random(seed)
    wanted, caps = [], []
    for _ in range(n_scenes):
        scene = random_scene(rng)
        caption = rng.choice(unplaced_captions(scene))
        for position in POSITIONS:
            wanted.append(replace(scene, position=position))
            caps.append(caption)
    return wanted, caps, [(s.shape, s.position, s.size) for s in wanted]
