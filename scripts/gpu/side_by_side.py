"""The PyTorch side of the GPU side-by-side: diffusers' ZImagePipeline (SDPA attention) with
random weights drawn on the machine, at Z-Image-Turbo's real widths, timed the way `zimage bench`
times zimage, in one JSON report per precision. `summarize.py` puts it beside zimage's.

    python3 scripts/gpu/side_by_side.py --config real-size --dtype bf16 --dtype fp16 --out $OUT/torch.json

Configs (transformer blocks noise refiner + context refiner + main; text encoder; VAE):
  real-size   2 + 2 + 30 blocks (6.15 B), Qwen3-4B-shaped text encoder, the real VAE shape
  real-width  2 + 2 + 2 blocks (1.09 B), same text encoder and VAE
  tiny        for checking this script on a CPU in seconds

What is timed, per precision (medians over --runs after --warmup):
  step_s        one denoising step inside ZImagePipeline (CUDA-synchronised step callback)
  text_encode_s the text encoder on a 512-token padded prompt, as the pipeline encodes
  pipeline_s    ZImagePipeline from caption features to decoded image (steps + VAE + postprocess)
  end_to_end_s  text_encode_s + pipeline_s
  vae_decode_s  vae.decode of the final latents
  peak_memory   torch.cuda.max_memory_allocated over the pipeline runs (bytes)
  tflops        the transformer's matmul FLOPs per step / step_s, against the card's measured
                matmul rate (`--peak-check`) and the datasheet dense rate
No network is needed: weights are drawn on the device, the tokenizer is skipped (caption
features go in as prompt_embeds; the text encoder is timed on token ids of the same length).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# Z-Image-Turbo's published shapes (transformer/config.json, text_encoder/config.json, vae/config.json).
TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_heads=30, n_kv_heads=30,
    norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512],
)
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
CONFIGS = {
    "real-size": dict(layers=30, refiners=2, transformer=TRANSFORMER, text=QWEN3_4B, vae=VAE),
    "real-width": dict(layers=2, refiners=2, transformer=TRANSFORMER, text=QWEN3_4B, vae=VAE),
    "tiny": dict(
        layers=2, refiners=1,
        transformer=dict(TRANSFORMER, dim=64, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12]),
        text=dict(QWEN3_4B, vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        vae=dict(VAE, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4),
    ),
}
# Dense (no sparsity) tensor-core rates from NVIDIA's datasheets, TFLOP/s, by name substring.
DATASHEET_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def transformer_flops(cfg: dict, image_tokens: int, caption_tokens: int) -> float:
    """Matmul FLOPs of one transformer forward at batch 1 (2 per multiply-add): projections,
    attention scores and values, SwiGLU feed-forward, for each block over its sequence
    (noise refiner: image tokens; context refiner: caption tokens; main blocks: both).
    Embedders, norms, modulation and the final layer are under 1 % and left out."""
    d = cfg["transformer"]["dim"]
    ffn = int(d / 3 * 8)  # diffusers' FeedForward hidden size for Z-Image (10240 at dim 3840)
    def block(s: int) -> float:
        return 2 * s * d * d * 4 + 2 * 2 * s * s * d + 2 * s * d * ffn * 3
    return cfg["refiners"] * (block(image_tokens) + block(caption_tokens)) + cfg["layers"] * block(image_tokens + caption_tokens)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """N(0, 0.02) weights, ones for norm scales: values of a trained model's magnitude, so
    timings (and fp16 range) are representative; drawn where the module lives."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith(".weight") and "norm" in name):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)


def matmul_peak(device: str, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float | None:
    """Measured dense matmul rate (TFLOP/s) on random data: the ceiling to compare against."""
    if not device.startswith("cuda"):
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds, _ = timed(device, lambda: [a @ b for _ in range(reps)])
    return 2 * n**3 * reps / seconds / 1e12


def build(cfg: dict, dtype: torch.dtype, device: str):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.device(device):
        transformer = ZImageTransformer2DModel(**cfg["transformer"], n_layers=cfg["layers"], n_refiner_layers=cfg["refiners"])
        transformer.to(dtype)
        randomize_(transformer, 1)
        text_config = Qwen3Config(**cfg["text"])
        text_config._attn_implementation = "sdpa"
        text_encoder = Qwen3Model(text_config).to(dtype)
        randomize_(text_encoder, 2)
        # ZImagePipeline decodes in the VAE's dtype, and the published pipeline is loaded with one
        # torch_dtype for every component: the VAE runs in the precision under test.
        vae = AutoencoderKL(**cfg["vae"]).to(dtype)
        randomize_(vae, 3)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_one(args, cfg: dict, precision: str) -> dict:
    device, dtype = args.device, DTYPES[precision]
    torch.manual_seed(0)
    load_s, pipe = timed(device, lambda: build(cfg, dtype, device))
    params = sum(p.numel() for p in pipe.transformer.parameters())
    caption_tokens = args.caption_tokens
    text_dim = cfg["text"]["hidden_size"]
    gen = torch.Generator(device=device).manual_seed(0)
    caption = torch.randn(caption_tokens, text_dim, device=device, dtype=dtype, generator=gen)
    ids = torch.randint(0, cfg["text"]["vocab_size"], (1, args.max_sequence_length), device=device, generator=gen)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :caption_tokens] = True
    image_tokens = (args.height // 16) * (args.width // 16)
    flops = transformer_flops(cfg, image_tokens, -(-caption_tokens // 32) * 32)

    def text_encode():
        with torch.no_grad():
            return pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]

    step_times: list[float] = []
    clock = {"last": 0.0}

    def on_step(pipeline, i, t, kwargs):
        synchronize(device)
        now = time.perf_counter()
        step_times.append(now - clock["last"])
        clock["last"] = now
        return kwargs

    def generate():
        synchronize(device)
        clock["last"] = time.perf_counter()
        with torch.no_grad():
            return pipe(prompt_embeds=[caption], height=args.height, width=args.width, num_inference_steps=args.steps,
                        guidance_scale=args.guidance, generator=torch.Generator(device=device).manual_seed(0),
                        output_type="np", callback_on_step_end=on_step)

    latents_shape = (1, 16, args.height // 8, args.width // 8)
    latents = torch.randn(latents_shape, device=device, dtype=dtype, generator=gen)

    def decode():
        with torch.no_grad():
            return pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for run in range(args.warmup + args.runs):
        step_times.clear()
        text_s, _ = timed(device, text_encode)
        pipeline_s, out = timed(device, generate)
        vae_s, _ = timed(device, decode)
        if run >= args.warmup:
            runs.append(dict(text_encode_s=text_s, pipeline_s=pipeline_s, vae_decode_s=vae_s, steps_s=list(step_times),
                             end_to_end_s=text_s + pipeline_s))
    images_finite = bool(torch.isfinite(torch.as_tensor(out.images)).all())
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    # A step's time from the second step on: the first includes the pipeline's set-up.
    step_s = statistics.median(s for r in runs for s in r["steps_s"][1:] or r["steps_s"])
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    measured_peak = matmul_peak(device, dtype) if args.peak_check and dtype != torch.float32 else None
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)
    achieved = flops / step_s / 1e12
    report = dict(
        implementation="diffusers", precision=precision, config=args.config, device=name,
        transformer_parameters=params, width=args.width, height=args.height, steps=args.steps,
        guidance=args.guidance, caption_tokens=caption_tokens, load_s=load_s,
        step_s=step_s, text_encode_s=median("text_encode_s"), pipeline_s=median("pipeline_s"),
        end_to_end_s=median("end_to_end_s"), vae_decode_s=median("vae_decode_s"), peak_memory=peak,
        transformer_flops_per_step=flops, achieved_tflops=achieved, measured_matmul_tflops=measured_peak,
        datasheet_tflops=datasheet, images_finite=images_finite, runs=runs,
    )
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="real-width")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default bf16 and fp16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--caption-tokens", type=int, default=32, help="real tokens of the prompt")
    ap.add_argument("--max-sequence-length", type=int, default=512, help="what the pipeline pads prompts to")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peak-check", action="store_true", help="also measure an 8192^3 matmul's rate")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.width % 16 or args.height % 16 or args.steps < 1 or args.runs < 1 or args.warmup < 0:
        ap.error("sizes must be multiples of 16, steps and runs at least 1")
    if not 0 < args.caption_tokens <= args.max_sequence_length:
        ap.error("--caption-tokens must be 1..=--max-sequence-length")
    cfg = CONFIGS[args.config]
    result = dict(torch=torch.__version__, cuda=torch.version.cuda, results=[], errors=[])
    try:
        import diffusers
        import transformers
        result.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError as e:
        result["errors"].append(f"diffusers/transformers not importable: {e}")
    if not result["errors"]:
        for precision in args.dtype or ["bf16", "fp16"]:
            try:
                result["results"].append(run_one(args, cfg, precision))
            except Exception as e:  # noqa: BLE001 - one precision failing must not hide the other's numbers
                result["errors"].append(f"{precision}: {type(e).__name__}: {e}")
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for r in result["results"]:
        print(f"{r['config']} {r['precision']}: step {r['step_s'] * 1e3:.1f} ms, e2e {r['end_to_end_s']:.3f} s, "
              f"VAE {r['vae_decode_s'] * 1e3:.1f} ms, peak {r['peak_memory']}, {r['achieved_tflops']:.0f} TFLOP/s")
    for e in result["errors"]:
        print("error:", e, file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
