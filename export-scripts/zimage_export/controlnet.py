"""The ControlNet add-on: load a ZImageControlNetModel (diffusers folder or a single
safetensors file with only the ControlNet's own keys), export the combined
transformer+ControlNet graph, and point its shared weights at the transformer's bytes on disk
(docs/controlnet.md).

Shared weights are found by content (shared_weights.relocate_weights): the ControlNet's own
weights go to `<graph>.onnx.data`, the transformer's are read from its file.
"""

import json
from pathlib import Path

from .shared_weights import EMBED_BELOW

# Published Z-Image-Turbo-Fun-Controlnet-Union layouts (alibaba-pai; diffusers' hlky/* configs),
# used to fill in the config of a single-file checkpoint by its number of control layers.
PUBLISHED_PLACES = {
    6: dict(control_layers_places=[0, 5, 10, 15, 20, 25], control_refiner_layers_places=None),
    15: dict(control_layers_places=list(range(0, 30, 2)), control_refiner_layers_places=[0, 1]),
}
CONTROL_FILE_PREFIX = "controlnet_"


def config_from_single_file(state: dict, transformer_cfg: dict, overrides: dict | None = None) -> dict:
    """A ZImageControlNetModel config for a single-file checkpoint, inferred as diffusers'
    single-file loader classifies the published files: 2.x files have control_noise_refiner keys
    (all-zero before_proj: 2.0, "control_layers"; trained: 2.1, "control_noise_refiner")."""
    import torch

    embed = [k for k in state if k.startswith("control_all_x_embedder.") and k.endswith(".weight")]
    if len(embed) != 1:
        raise ValueError("not a Z-Image ControlNet checkpoint: no control_all_x_embedder.*.weight")
    patch = transformer_cfg["all_patch_size"][0]
    dim, fan_in = state[embed[0]].shape
    n_layers = len({k.split(".")[1] for k in state if k.startswith("control_layers.")})
    refiner_keys = [k for k in state if k.startswith("control_noise_refiner.")]
    before = state.get("control_noise_refiner.0.before_proj.weight")
    if not refiner_keys:
        mode = None  # 1.0 files carry plain control_noise_refiner blocks; none at all is unusual
    elif before is None:
        mode = None
    elif bool(torch.all(before == 0)):
        mode = "control_layers"
    else:
        mode = "control_noise_refiner"
    cfg = dict(
        control_in_dim=fan_in // (patch * patch),
        add_control_noise_refiner=mode,
        all_patch_size=tuple(transformer_cfg["all_patch_size"]),
        all_f_patch_size=tuple(transformer_cfg["all_f_patch_size"]),
        dim=dim,
        n_refiner_layers=transformer_cfg["n_refiner_layers"],
        n_heads=transformer_cfg["n_heads"],
        n_kv_heads=transformer_cfg["n_kv_heads"],
        norm_eps=transformer_cfg["norm_eps"],
        qk_norm=transformer_cfg["qk_norm"],
    )
    if n_layers in PUBLISHED_PLACES:
        cfg.update(PUBLISHED_PLACES[n_layers])
    cfg.update(overrides or {})
    if "control_layers_places" not in cfg or len(cfg["control_layers_places"]) != n_layers:
        raise ValueError(f"{n_layers} control layers match no published layout: pass --config with "
                         "control_layers_places (and control_refiner_layers_places)")
    return cfg


def load_controlnet(path: Path, transformer_cfg: dict, dtype, config: Path | None = None):
    """A diffusers folder (config.json + weights) or one .safetensors file of ControlNet keys.
    Keys of the transformer's shared modules, which ZImageControlNetPipeline.save_pretrained
    copies into the folder, are dropped as diffusers drops them."""
    from diffusers import ZImageControlNetModel
    from diffusers.loaders.single_file_utils import convert_z_image_controlnet_checkpoint_to_diffusers
    from safetensors.torch import load_file

    if path.is_dir():
        cfg = json.loads((path / "config.json").read_text())
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path} has no .safetensors weights")
        state = {}
        for f in files:
            state.update(load_file(f))
    else:
        state = load_file(path)
        overrides = json.loads(config.read_text()) if config else None
        cfg = config_from_single_file(state, transformer_cfg, overrides)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    model = ZImageControlNetModel(**cfg)
    state = convert_z_image_controlnet_checkpoint_to_diffusers(dict(state), cfg)
    own = set(model.state_dict())
    unexpected = [k for k in state if k not in own and not _is_shared_key(k)]
    if unexpected:
        raise ValueError(f"keys the ControlNet does not have: {unexpected[:5]}")
    missing = own - set(state)
    if missing:
        raise ValueError(f"the checkpoint lacks {sorted(missing)[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own})
    return model.to(dtype).eval()


SHARED_PREFIXES = ("t_embedder.", "all_x_embedder.", "cap_embedder.", "noise_refiner.", "context_refiner.",
                   "x_pad_token", "cap_pad_token")


def _is_shared_key(key: str) -> bool:
    return key.startswith(SHARED_PREFIXES)


def check_package_accepts_controlnet(manifest: dict) -> None:
    """Refuses a package whose transformer is quantized (ValueError): the combined graph reads
    the weights it shares with the transformer as float tensors at their offsets in the
    transformer's file, and a quantized transformer holds MatMulNBits blocks instead (storing
    float copies would double the weights). Add the ControlNet to the float package."""
    quantization = manifest.get("quantization")
    if quantization and "transformer" in quantization.get("graphs", {"transformer": None}):
        raise ValueError(f"the package's transformer is quantized ({quantization.get('weights')}): ControlNets run "
                         "on float (fp32 / fp16) packages only; add it to the package it was quantized from")
    if manifest.get("precision") not in ("fp32", "fp16"):
        raise ValueError(f"ControlNets need an fp32 or fp16 package, not {manifest.get('precision')!r}")


def control_graph_name(name: str) -> str:
    return f"{CONTROL_FILE_PREFIX}{name}"


def own_weight_bytes(modules) -> int:
    """Bytes of the ControlNet's own weights the combined graph stores in its own data file:
    the parameters of `modules` (the ControlNet modules the graph runs) of at least
    EMBED_BELOW bytes. A relocation that stored more than this stored a shared weight again."""
    seen, total = set(), 0
    for module in modules:
        for t in module.parameters():
            size = t.numel() * t.element_size()
            if id(t) not in seen and size >= EMBED_BELOW:
                seen.add(id(t))
                total += size
    return total
