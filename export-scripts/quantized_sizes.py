"""Weight bytes of a quantized package's transformer and text encoder, computed from the model
configs alone (torch's meta device: nothing is allocated), by the rules quantize.py applies:

    python quantized_sizes.py                    # Z-Image-Turbo (real widths), fp16 + int8/int4
    python quantized_sizes.py --transformer-config SRC/transformer/config.json \
        --text-encoder-config SRC/text_encoder/config.json --precision fp32   # any other model

Every nn.Linear weight [N, K] of the transformer becomes MatMulNBits (except the kept ones,
TRANSFORMER_KEEP and the adaLN modulations unless --quantize-adaln) and so does every Linear of the text encoder's first n-1 layers (the last is
pruned, docs/package-format.md); the token embedding becomes GatherBlockQuantized. Per weight:
N * ceil(K/B) blocks of B*bits/8 bytes, one scale per block in the package precision, and
ceil(blocks*bits/8) zero-point bytes per output column. Everything else (norms, biases, kept
layers, pad tokens) stays in the package precision. Graph constants (RoPE tables, shapes) are
left out: well under 1 MB. The transformer's `int8+act` line is `--activations int8` and
`int8x2` alike (quantize_w8a8.py; the same weights): K*N int8 bytes and N float32 scales per
weight, everything else float32 (such packages are made from fp32 ones), whatever --precision
says. The `omni_only` rows are what an editing package's Omni transformer adds (its SigLIP
embedder, kept in float as the other embedders, and its SigLIP refiner blocks): the rest of it
reads the transformer's weights.
"""

import argparse
import json
from pathlib import Path

from zimage_export.quantize import DEFAULT_BLOCK_SIZE, WEIGHTS, QuantizeOptions, matches_any, transformer_keep

# Z-Image-Turbo (docs: /work/shared/reference/zimage-pipeline.md; REAL_WIDTH.md).
REAL_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
    t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512],
)
REAL_TEXT_ENCODER = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6,
)
FLOAT_BYTES = {"fp32": 4, "fp16": 2}
# SigLIP2 so400m's hidden width (ZImageOmniPipeline's vision encoder family).
SIGLIP_FEAT_DIM = 1152


def nbits_bytes(n: int, k: int, bits: int, block: int, scale_bytes: int) -> int:
    """MatMulNBits (and GatherBlockQuantized with blocks along K) bytes of an [N, K] weight."""
    blocks = -(-k // block)
    return n * blocks * (block * bits // 8) + n * blocks * scale_bytes + n * -(-(blocks * bits) // 8)


def gather_bytes(v: int, h: int, bits: int, block: int, scale_bytes: int) -> int:
    """GatherBlockQuantized bytes of a [V, H] table, blocks along H: the data is not padded to
    whole blocks (MatMulNBits' is)."""
    blocks = -(-h // block)
    zero_points = v * blocks if bits == 8 else -(-(v * blocks) // 2)
    return v * h * bits // 8 + v * blocks * scale_bytes + zero_points


def per_channel_bytes(n: int, k: int, scale_bytes: int) -> int:
    """An [N, K] weight as int8 with one scale per output column (int8 activations)."""
    return n * k + n * scale_bytes


def component_bytes(model, kept_prefixes, embedding_name, bits, block, fbytes, weight_bytes=None) -> tuple[int, int]:
    """(float bytes, quantized bytes) of a meta-device module; bits None: nothing quantized.
    `weight_bytes(n, k)`: a quantized Linear's bytes (default: MatMulNBits')."""
    weight_bytes = weight_bytes or (lambda n, k: nbits_bytes(n, k, bits, block, fbytes))
    import torch

    quantized, qbytes = set(), 0
    if bits is not None:
        for name, module in model.named_modules():
            kept = matches_any(f"{name}.weight", kept_prefixes)
            if isinstance(module, torch.nn.Linear) and not kept:
                n, k = module.weight.shape
                qbytes += weight_bytes(n, k)
                quantized.add(f"{name}.weight")
        if embedding_name is not None:
            v, h = dict(model.named_parameters())[embedding_name].shape
            qbytes += gather_bytes(v, h, bits, block, fbytes)
            quantized.add(embedding_name)
    float_bytes = sum(p.numel() * fbytes for n, p in model.named_parameters() if n not in quantized)
    return float_bytes, qbytes


def transformer(config: dict):
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        return ZImageTransformer2DModel(**config)


def omni_only(config: dict, siglip_feat_dim: int):
    """The modules an editing (Omni) transformer adds to the transformer (SigLIP embedder and
    refiner, pad token): what an editing package stores besides the transformer's weights,
    which its Omni graph reads from transformer.onnx (docs/editing.md)."""
    import torch

    model = transformer(dict(config, siglip_feat_dim=siglip_feat_dim))
    container = torch.nn.Module()
    for name in ("siglip_embedder", "siglip_refiner"):
        container.add_module(name, getattr(model, name))
    container.siglip_pad_token = model.siglip_pad_token
    return container


def text_encoder(config: dict):
    """What the package's text encoder holds: the embedding and the first n-1 decoder layers
    (hidden_states[-2] needs no last layer, final norm or LM head)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    cfg = dict(config, num_hidden_layers=config["num_hidden_layers"] - 1)
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(**cfg))
    del model.norm
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--precision", choices=sorted(FLOAT_BYTES), default="fp16")
    parser.add_argument("--quantize-adaln", action="store_true", help="as quantize_package.py's flag")
    parser.add_argument("--keep", action="append", default=[], metavar="PATTERN", help="as quantize_package.py's flag")
    parser.add_argument("--transformer-config", type=Path, help="a diffusers transformer config.json (default: Z-Image-Turbo)")
    parser.add_argument("--text-encoder-config", type=Path, help="a Qwen3 config.json (default: Qwen3-4B)")
    parser.add_argument("--siglip-feat-dim", type=int, default=SIGLIP_FEAT_DIM,
                        help="the editing transformer's SigLIP feature width, for the omni_only rows (default: "
                             "SigLIP2 so400m's 1152; the Omni weights are not published; 0 leaves the rows out)")
    args = parser.parse_args(argv)

    def read(path, default):
        return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")} if path else default

    fbytes = FLOAT_BYTES[args.precision]
    # The kept set exactly as quantize_package.py computes it (the weights width does not enter).
    keep = transformer_keep(QuantizeOptions("int8", quantize_adaln=args.quantize_adaln, keep=tuple(args.keep)))
    transformer_config = read(args.transformer_config, REAL_TRANSFORMER)
    models = [("transformer", transformer(transformer_config), keep, None),
              ("text_encoder", text_encoder(read(args.text_encoder_config, REAL_TEXT_ENCODER)), (), "embed_tokens.weight")]
    if args.siglip_feat_dim:
        models.insert(1, ("omni_only", omni_only(transformer_config, args.siglip_feat_dim), keep, None))
    print(f"precision {args.precision}, block {args.block_size}; GB = 1e9 bytes")
    print(f"{'component':<13} {'weights':<8} {'float part':>11} {'quantized':>10} {'total':>9}")
    for label, model, kept, embedding in models:
        for weights, bits in (("float", None), *WEIGHTS.items()):
            f, q = component_bytes(model, kept, embedding, bits, args.block_size, fbytes)
            print(f"{label:<13} {weights:<8} {f / 1e9:>10.3f}G {q / 1e9:>9.3f}G {(f + q) / 1e9:>8.3f}G")
        if label in ("transformer", "omni_only"):
            fp32 = FLOAT_BYTES["fp32"]
            f, q = component_bytes(model, kept, embedding, 8, args.block_size, fp32,
                                   lambda n, k: per_channel_bytes(n, k, fp32))
            print(f"{label:<13} {'int8+act':<8} {f / 1e9:>10.3f}G {q / 1e9:>9.3f}G {(f + q) / 1e9:>8.3f}G")


if __name__ == "__main__":
    main()
