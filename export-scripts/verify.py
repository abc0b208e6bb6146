"""Check every graph of a package against the PyTorch modules it was exported from.

    python verify.py PACKAGE_DIR --src DIFFUSERS_DIR

Each graph runs in ONNX Runtime (CPU) on fresh random inputs at shapes unlike the traced ones
(batch 1 and 2, caption lengths that are not multiples of 32, unequal caption lengths in one
batch, non-square latents) and is compared with the float32 PyTorch reference: transformers'
hidden_states[-2], diffusers' transformer called with per-item lists as the pipeline does,
and AutoencoderKL's decode / encode. Exit status 1 when a float32 package exceeds a relative L2
error of 1e-5; for fp16 packages the figures are reported only. In int8 / int4 packages
(manifest `quantization`) the transformer and the text encoder are held to
QUANTIZED_TOLERANCE instead (their weights are rounded on purpose; docs/quantization.md has
the measurements), the VAE still to the float bound.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from zimage_export.source_folder import require_source_folder

FP32_TOLERANCE = 1e-5
# Relative L2 bounds of quantized graphs against the float32 module, by weights: several times
# what a correct quantization gives on the tiny fixtures (random weights, the worst case
# measured: int8 transformer 1.4e-2, text encoder 3.6e-2; int4 0.15 / 0.36; docs/quantization.md),
# below what a broken one gives (int4 zero points off by one: 0.6).
QUANTIZED_TOLERANCE = {"int8": 0.1, "int4": 0.5}


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm((got - want).ravel()) / max(np.linalg.norm(want.ravel()), 1e-30))


def session(package: Path, graph: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(package / f"{graph}.onnx"), options, providers=["CPUExecutionProvider"])


def text_encoder_cases(src: Path, package: Path, gen: torch.Generator):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src / "text_encoder", dtype=torch.float32).eval()
    sess = session(package, "text_encoder")
    vocab = model.config.vocab_size
    for lens in ([11], [23, 9], [5, 17, 30]):
        seq = max(lens)
        ids = torch.randint(0, vocab, (len(lens), seq), generator=gen)
        mask = (torch.arange(seq)[None, :] < torch.tensor(lens)[:, None]).long()
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        (got,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        # Only real tokens are ever used downstream; compare those.
        keep = mask.bool().numpy()
        yield f"lens={lens}", rel_l2(got[keep], want.numpy()[keep]), float(np.abs(got[keep] - want.numpy()[keep]).max())


def transformer_cases(src: Path, package: Path, gen: torch.Generator):
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel.from_pretrained(src / "transformer", dtype=torch.float32).eval()
    sess = session(package, "transformer")
    c, dcap = model.config.in_channels, model.config.cap_feat_dim
    # (latent h, w, caption lengths, padded caption tensor length)
    for h, w, lens, width in ((4, 6, [13], 13), (6, 10, [7, 40], 40), (10, 4, [20, 33], 50), (8, 8, [1, 64, 31], 64)):
        b = len(lens)
        latents = torch.randn(b, c, h, w, generator=gen)
        timestep = torch.rand(b, generator=gen)
        feats = torch.randn(b, width, dcap, generator=gen)
        mask = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
        with torch.no_grad():
            out = model(list(latents.unsqueeze(2).unbind(0)), timestep, [f[:n] for f, n in zip(feats, lens)], return_dict=False)[0]
        want = torch.stack(out).squeeze(2).numpy()
        inputs = {"latents": latents.numpy(), "timestep": timestep.numpy(), "cap_feats": feats.numpy(), "cap_mask": mask.numpy()}
        (got,) = sess.run(None, inputs)
        yield f"latent {h}x{w} caps={lens} L={width}", rel_l2(got, want), float(np.abs(got - want).max())


def vae_cases(src: Path, package: Path, gen: torch.Generator):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(src / "vae", dtype=torch.float32).eval()
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    dec, enc = session(package, "vae_decoder"), session(package, "vae_encoder")
    # The CPU variant, where the package has one (Winograd tiles of 4: sides of 6 leave partial tiles).
    decoders = [("vae_decoder", dec)]
    if (package / "vae_decoder_cpu.onnx").exists():
        decoders.append(("vae_decoder_cpu", session(package, "vae_decoder_cpu")))
    for b, h, w in ((1, 4, 6), (2, 6, 4)):
        z = torch.randn(b, vae.config.latent_channels, h, w, generator=gen)
        with torch.no_grad():
            want = vae.decode(z).sample.numpy()
        for graph, sess in decoders:
            (got,) = sess.run(None, {"latents": z.numpy()})
            yield graph, f"latent {b}x{h}x{w}", rel_l2(got, want), float(np.abs(got - want).max())
        image = torch.rand(b, 3, h * f, w * f, generator=gen) * 2 - 1
        with torch.no_grad():
            dist = vae.encode(image).latent_dist
        mean, logvar = enc.run(None, {"image": image.numpy()})
        for name, got, want in (("mean", mean, dist.mean), ("logvar", logvar, dist.logvar)):
            yield f"vae_encoder.{name}", f"image {b}x{h * f}x{w * f}", rel_l2(got, want.numpy()), float(np.abs(got - want.numpy()).max())


def siglip_cases(src: Path, package: Path, gen: torch.Generator):
    """siglip.onnx (real patches as a grid) vs Siglip2VisionModel on the processor's padded
    input with its attention mask: grids smaller and larger than the position table."""
    from transformers import Siglip2VisionModel

    model = Siglip2VisionModel.from_pretrained(src / "siglip", dtype=torch.float32).eval()
    sess = session(package, "siglip")
    depth = model.config.num_channels * model.config.patch_size**2
    for h, w, padded in ((1, 1, 4), (2, 7, 20), (5, 3, 15), (6, 6, 40)):
        pixels = torch.randn(1, padded, depth, generator=gen)
        mask = (torch.arange(padded) < h * w).long()[None]
        with torch.no_grad():
            want = model(pixel_values=pixels, pixel_attention_mask=mask,
                         spatial_shapes=torch.tensor([[h, w]])).last_hidden_state[0, : h * w].numpy()
        (got,) = sess.run(None, {"pixel_patches": pixels[:, : h * w].reshape(1, h, w, depth).numpy()})
        got = got.reshape(h * w, -1)
        yield f"grid {h}x{w} (padded to {padded})", rel_l2(got, want), float(np.abs(got - want).max())


def transformer_omni_cases(src: Path, package: Path, gen: torch.Generator):
    """transformer_omni.onnx fed by zimage_export.omni_pack (what the runtime does) vs
    diffusers' transformer in Omni mode (lists, as ZImageOmniPipeline calls it)."""
    from diffusers import ZImageTransformer2DModel

    from zimage_export.omni_pack import pack_batch, pack_item, target_output

    model = ZImageTransformer2DModel.from_pretrained(src / "transformer", dtype=torch.float32).eval()
    sess = session(package, "transformer_omni")
    cfg = model.config
    p, c = cfg.all_patch_size[0], cfg.in_channels
    # (caption segment lengths per item, latent sizes (conditions..., target), SigLIP grids)
    for caps, sizes, grids in (
        ([[7, 20, 4]], [(4, 6), (4, 6)], [(2, 3)]),
        ([[7, 3, 45, 4], [7, 3, 9, 4]], [(8, 4), (6, 10), (6, 10)], [(4, 2), (1, 5)]),
        ([[30, 2, 33, 40, 4]], [(2, 2), (10, 6), (4, 4), (6, 8)], [(3, 3), (2, 6), (1, 1)]),
        # No condition image (Omni text-to-image): no vision stream at all.
        ([[12], [40]], [(6, 4)], []),
    ):
        # Within the model's positions (a SigLIP2 grid is stretched over its latent's pixels).
        sizes = [(min(h, (cfg.axes_lens[1] - 1) // p), min(w, (cfg.axes_lens[2] - 1) // p)) for h, w in sizes]
        lats = [torch.randn(c, h * p, w * p, generator=gen) for h, w in sizes]
        sigs = [torch.randn(h, w, cfg.siglip_feat_dim, generator=gen) for h, w in grids]
        feats = [[torch.randn(n, cfg.cap_feat_dim, generator=gen) for n in lens] for lens in caps]
        noise = [0] * len(grids) + [1]
        t = torch.rand(len(caps), generator=gen)
        siglips = [[*sigs, None] if sigs else None for _ in caps]
        with torch.no_grad():
            out = model(x=[[lat.unsqueeze(1) for lat in lats] for _ in caps], t=t, cap_feats=feats,
                        siglip_feats=siglips, image_noise_mask=[noise for _ in caps], return_dict=False)[0]
        np_lats = [lat.numpy() for lat in lats]
        np_sigs = [s.numpy() for s in sigs] + [None] if sigs else None
        items = [pack_item([f.numpy() for f in item], np_lats, np_sigs, noise, p, cfg.siglip_feat_dim)
                 for item in feats]
        (x_out,) = sess.run(None, pack_batch(items, t.numpy()))
        got = np.stack([target_output(x_out[i], np_lats, p) for i in range(len(caps))])
        want = torch.stack(out).squeeze(2).numpy()
        yield f"caps={caps} images={len(sizes)}", rel_l2(got, want), float(np.abs(got - want).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--graphs", nargs="+", choices=["text_encoder", "transformer", "vae", "siglip", "transformer_omni"],
                        help="check only these (default: every graph the package has)")
    parser.add_argument("--precision", choices=["fp32", "fp16"],
                        help="package precision (default: from manifest.json; needed without one)")
    args = parser.parse_args(argv)
    require_source_folder(parser, args.src)

    manifest_path = args.package / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    precision = args.precision or manifest["precision"]
    quantization = manifest.get("quantization") or {}
    weights = quantization.get("weights")
    # Each quantized graph's width (--text-encoder-weights may make the text encoder wider).
    graph_weights = {"transformer": weights, "text_encoder": quantization.get("text_encoder_weights", weights)}
    if "transformer_omni" in quantization.get("graphs", {}):  # (quantized with the transformer)
        graph_weights["transformer_omni"] = weights
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    if args.graphs is None:  # the editing graphs are checked where the package has them
        args.graphs = ["text_encoder", "transformer", "vae"] + [
            g for g in ("siglip", "transformer_omni") if (args.package / f"{g}.onnx").exists()]
    if "text_encoder" in args.graphs:
        rows += [("text_encoder", *r) for r in text_encoder_cases(args.src, args.package, gen)]
    if "transformer" in args.graphs:
        rows += [("transformer", *r) for r in transformer_cases(args.src, args.package, gen)]
    if "vae" in args.graphs:
        rows += list(vae_cases(args.src, args.package, gen))
    if "siglip" in args.graphs:
        rows += [("siglip", *r) for r in siglip_cases(args.src, args.package, gen)]
    if "transformer_omni" in args.graphs:
        rows += [("transformer_omni", *r) for r in transformer_omni_cases(args.src, args.package, gen)]

    failed = False
    print(f"package {args.package} ({precision}{', ' + weights + ' weights' if weights else ''}) vs PyTorch float32")
    print(f"{'graph':<20} {'case':<42} {'rel L2':>10} {'max abs':>10}  status")
    for graph, case, rel, max_abs in rows:
        width = graph_weights.get(graph)
        bound = QUANTIZED_TOLERANCE[width] if width else FP32_TOLERANCE
        ok = np.isfinite(rel) and (precision != "fp32" or rel <= bound)
        status = ("ok" if ok else "FAIL") if precision == "fp32" else ("report" if np.isfinite(rel) else "FAIL")
        failed |= not ok
        print(f"{graph:<20} {case:<42} {rel:>10.2e} {max_abs:>10.2e}  {status}")
    print("FAILED" if failed else "all graphs within tolerance" if precision == "fp32" else "done (fp16: figures only)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
