"""One function per package graph: load the component in the package precision, wrap it, trace
it on small inputs and export it with every batch/sequence/spatial dimension dynamic.

Traced sizes are >= 2 and differ from each other: the dynamo exporter specialises dimensions
of size 0/1 and ties dimensions it sees to be equal."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim

from .omni_pack import pack_batch, pack_item
from .omni_wrapper import ZImageOmniTransformerExport
from .siglip import Siglip2VisionExport
from .text_encoder import TextEncoderExport
from .transformer_wrapper import ZImageTransformerExport
from .vae import VaeDecoderExport, VaeEncoderExport
from .winograd_math import DEFAULT_MIN_CHANNELS

MAX = 1 << 20  # an upper bound for the dynamic dimensions the exporter needs to be told


@dataclass
class GraphSpec:
    """What to export: the wrapper module (handed over: export_graph drops it as soon as the
    graph is traced, so its weights can be freed while the ONNX graph is optimised), example
    inputs, graph I/O names and dynamic dimensions."""

    module: torch.nn.Module | None
    args: tuple
    filename: str
    input_names: list
    output_names: list
    dynamic_shapes: dict


def load_text_encoder(src: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src / "text_encoder", dtype=dtype).eval()


def load_transformer(src: Path, dtype: torch.dtype):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel.from_pretrained(src / "transformer", dtype=dtype).eval()


def load_vae(src: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(src / "vae", dtype=dtype).eval()


def vae_dtype(src: Path, dtype: torch.dtype) -> torch.dtype:
    """VAEs marked force_upcast (FLUX's, Z-Image's) overflow in fp16; diffusers runs them in
    float32, and so do our fp16 packages."""
    import json

    config = json.loads((src / "vae" / "config.json").read_text())
    return torch.float32 if config.get("force_upcast", False) else dtype


def text_encoder_spec(src: Path, dtype: torch.dtype) -> GraphSpec:
    wrapper = TextEncoderExport(load_text_encoder(src, dtype))
    ids = torch.tensor([[151644, 872, 198, 100, 200, 300, 151645], [151644, 872, 198, 400, 151645, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    batch, seq = Dim("batch", min=1, max=MAX), Dim("sequence", min=1, max=MAX)
    return GraphSpec(
        wrapper,
        (ids, mask),
        "text_encoder.onnx",
        ["input_ids", "attention_mask"],
        ["hidden_states"],
        {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )


def transformer_spec(src: Path, dtype: torch.dtype) -> GraphSpec:
    model = load_transformer(src, dtype)
    wrapper = ZImageTransformerExport(model)
    cfg = model.config
    p = cfg.all_patch_size[0]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, cfg.in_channels, 3 * p, 5 * p, generator=gen)
    timestep = torch.tensor([0.25, 0.75])
    cap_feats = torch.randn(2, 37, cfg.cap_feat_dim, generator=gen)
    cap_mask = torch.arange(37)[None, :] < torch.tensor([[9], [37]])
    batch = Dim("batch", min=1, max=MAX)
    rows, cols = Dim("patch_rows", min=1, max=MAX), Dim("patch_cols", min=1, max=MAX)
    cap = Dim("caption", min=1, max=MAX)
    return GraphSpec(
        wrapper,
        (latents, timestep, cap_feats, cap_mask),
        "transformer.onnx",
        ["latents", "timestep", "cap_feats", "cap_mask"],
        ["noise_pred"],
        {
            "latents": {0: batch, 2: p * rows, 3: p * cols},
            "timestep": {0: batch},
            "cap_feats": {0: batch, 1: cap},
            "cap_mask": {0: batch, 1: cap},
        },
    )


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_decoder_spec(src: Path, dtype: torch.dtype, winograd_min_channels: int | None = None) -> GraphSpec | None:
    """With `winograd_min_channels`, the CPU variant (vae_decoder_cpu.onnx), or None when no
    convolution is wide enough for it to differ from vae_decoder.onnx."""
    vae = load_vae(src, vae_dtype(src, dtype))
    module = VaeDecoderExport(vae, winograd_min_channels)
    if winograd_min_channels is not None and module.winograd_convs == 0:
        return None
    latents = torch.randn(2, vae.config.latent_channels, 3, 5, generator=torch.Generator().manual_seed(0))
    batch, h, w = Dim("batch", min=1, max=MAX), Dim("latent_h", min=1, max=MAX), Dim("latent_w", min=1, max=MAX)
    return GraphSpec(
        module,
        (latents,),
        "vae_decoder.onnx" if winograd_min_channels is None else "vae_decoder_cpu.onnx",
        ["latents"],
        ["image"],
        {"latents": {0: batch, 2: h, 3: w}},
    )


def vae_decoder_cpu_spec(src: Path, dtype: torch.dtype,
                         winograd_min_channels: int = DEFAULT_MIN_CHANNELS) -> GraphSpec | None:
    """The same decoder for the CPU: its 3x3 convolutions with at least `winograd_min_channels`
    input and output channels computed by Winograd (winograd.py)."""
    return vae_decoder_spec(src, dtype, winograd_min_channels)


def vae_encoder_spec(src: Path, dtype: torch.dtype) -> GraphSpec:
    vae = load_vae(src, vae_dtype(src, dtype))
    f = vae_scale_factor(vae)
    image = torch.rand(2, vae.config.in_channels, 3 * f, 5 * f, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = Dim("batch", min=1, max=MAX)
    h, w = Dim("latent_h", min=1, max=MAX), Dim("latent_w", min=1, max=MAX)
    return GraphSpec(
        VaeEncoderExport(vae),
        (image,),
        "vae_encoder.onnx",
        ["image"],
        ["mean", "logvar"],
        {"image": {0: batch, 2: f * h, 3: f * w}},
    )


def is_omni(src: Path) -> bool:
    """An Omni (editing) folder: a transformer with siglip_feat_dim and a siglip/ component."""
    import json

    config = json.loads((src / "transformer" / "config.json").read_text())
    return config.get("siglip_feat_dim") is not None and (src / "siglip" / "config.json").exists()


def siglip_spec(src: Path, dtype: torch.dtype) -> GraphSpec | None:
    """SigLIP2 vision encoder (Omni folders only; None elsewhere)."""
    if not is_omni(src):
        return None
    from transformers import Siglip2VisionModel

    model = Siglip2VisionModel.from_pretrained(src / "siglip", dtype=dtype).eval()
    cfg = model.config
    depth = cfg.num_channels * cfg.patch_size**2
    patches = torch.randn(2, 3, 5, depth, generator=torch.Generator().manual_seed(0))
    batch, rows, cols = Dim("batch", min=1, max=MAX), Dim("patch_rows", min=1, max=MAX), Dim("patch_cols", min=1, max=MAX)
    return GraphSpec(
        Siglip2VisionExport(model),
        (patches,),
        "siglip.onnx",
        ["pixel_patches"],
        ["hidden_states"],
        {"pixel_patches": {0: batch, 1: rows, 2: cols}},
    )


OMNI_INPUTS = [
    "timestep",
    *(f"{s}_{k}" if k != "feats" else n for s, n in (("x", "x_tokens"), ("cap", "cap_feats"), ("siglip", "siglip_feats"))
      for k in ("feats", "pos", "pad", "noisy", "valid")),
]


def transformer_omni_spec(src: Path, dtype: torch.dtype) -> GraphSpec | None:
    """The transformer in Omni mode (Omni folders only; None elsewhere), traced on a CFG-like
    batch of two items with two condition images and captions of unequal lengths."""
    if not is_omni(src):
        return None
    model = load_transformer(src, dtype)
    cfg = model.config
    p, c = cfg.all_patch_size[0], cfg.in_channels
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).numpy()  # noqa: E731
    latents = [rnd(c, 3 * p, 5 * p), rnd(c, 4 * p, 2 * p), rnd(c, 3 * p, 5 * p)]
    siglips = [rnd(2, 3, cfg.siglip_feat_dim), rnd(3, 2, cfg.siglip_feat_dim), None]
    items = [pack_item([rnd(n, cfg.cap_feat_dim) for n in lens], latents, siglips, [0, 0, 1], p)
             for lens in ([5, 3, 40, 4], [5, 3, 9, 4])]
    feeds = pack_batch(items, [0.25, 0.25])
    args = tuple(torch.from_numpy(feeds[name]) for name in OMNI_INPUTS)
    batch = Dim("batch", min=1, max=MAX)
    seqs = {"x": Dim("x_tokens", min=1, max=MAX), "cap": Dim("cap_tokens", min=1, max=MAX),
            "siglip": Dim("siglip_tokens", min=1, max=MAX)}
    dynamic = {"timestep": {0: batch}}
    for name in OMNI_INPUTS[1:]:
        stream = name.split("_")[0]
        dynamic[name] = {0: batch, 1: seqs[stream]}
    return GraphSpec(
        ZImageOmniTransformerExport(model),
        args,
        "transformer_omni.onnx",
        list(OMNI_INPUTS),
        ["x_out"],
        dynamic,
    )


# Each is called as f(src, dtype, **options); export.py passes vae_decoder_cpu its
# winograd_min_channels.
GRAPHS = {
    "text_encoder": text_encoder_spec,
    "transformer": transformer_spec,
    "vae_decoder": vae_decoder_spec,
    "vae_decoder_cpu": vae_decoder_cpu_spec,
    "vae_encoder": vae_encoder_spec,
    "siglip": siglip_spec,
    "transformer_omni": transformer_omni_spec,
}
