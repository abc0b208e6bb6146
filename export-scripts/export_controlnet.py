"""Add a Z-Image ControlNet (Z-Image-Turbo-Fun-Controlnet-Union 1.0 / 2.0 / 2.1 and any
ZImageControlNetModel) to a package made by export.py (docs/controlnet.md):

    python export_controlnet.py --package zimage-turbo --src Z-Image-Turbo \
        --controlnet Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors --name union-2.1

--controlnet: a diffusers ZImageControlNetModel folder (config.json + safetensors; the
transformer's modules that ZImageControlNetPipeline.save_pretrained copies in are ignored) or
one .safetensors file with only the ControlNet's own keys, as published (its config is inferred
as diffusers' single-file loader does; --config JSON overrides or completes it).

Writes controlnet_<name>.onnx: the transformer with the ControlNet attached, one graph. Its
weights shared with the transformer point at transformer.onnx's own bytes (same file, same
offsets); the ControlNet's own weights go to controlnet_<name>.onnx.data. The manifest gets a
`controlnets.<name>` entry; nothing else in the package changes. The graph is checked against
diffusers (ZImageControlNetModel + ZImageTransformer2DModel) with ONNX Runtime before finishing.
"""

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from zimage_export.source_folder import require_source_folder

CONTROL_OPSET = 23  # as the transformer (export.py DEFAULT_OPSETS)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def control_spec(transformer, controlnet):
    import torch
    from torch.export import Dim

    from zimage_export.controlnet_wrapper import ZImageControlTransformerExport
    from zimage_export.graphs import MAX, GraphSpec

    cfg = transformer.config
    p = cfg.all_patch_size[0]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, cfg.in_channels, 3 * p, 5 * p, generator=gen)
    control = torch.randn(2, controlnet.config.control_in_dim, 3 * p, 5 * p, generator=gen)
    timestep = torch.tensor([0.25, 0.75])
    cap_feats = torch.randn(2, 37, cfg.cap_feat_dim, generator=gen)
    cap_mask = torch.arange(37)[None, :] < torch.tensor([[9], [37]])
    scale = torch.tensor([0.75])
    batch = Dim("batch", min=1, max=MAX)
    rows, cols = Dim("patch_rows", min=1, max=MAX), Dim("patch_cols", min=1, max=MAX)
    cap = Dim("caption", min=1, max=MAX)
    return GraphSpec(
        ZImageControlTransformerExport(transformer, controlnet),
        (latents, timestep, cap_feats, cap_mask, control, scale),
        "combined.onnx",
        ["latents", "timestep", "cap_feats", "cap_mask", "control_context", "conditioning_scale"],
        ["noise_pred"],
        {
            "latents": {0: batch, 2: p * rows, 3: p * cols},
            "timestep": {0: batch},
            "cap_feats": {0: batch, 1: cap},
            "cap_mask": {0: batch, 1: cap},
            "control_context": {0: batch, 2: p * rows, 3: p * cols},
            "conditioning_scale": {},
        },
    )


def check_against_diffusers(transformer, controlnet, graph: Path) -> float:
    """Max |ONNX - diffusers| of noise_pred on a batch of 2 with different caption lengths, a
    non-square latent and two conditioning scales."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from diffusers import ZImageControlNetModel

    cn = ZImageControlNetModel.from_transformer(controlnet, transformer)
    cfg = transformer.config
    gen = torch.Generator().manual_seed(1)
    dtype = next(transformer.parameters()).dtype
    lens, width = [5, 41], 41
    latents = torch.randn(2, cfg.in_channels, 8, 6, generator=gen)
    control = torch.randn(2, cn.config.control_in_dim, 8, 6, generator=gen)
    timestep = torch.tensor([0.2, 0.9])
    feats = torch.randn(2, width, cfg.cap_feat_dim, generator=gen)
    mask = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    worst = 0.0
    for scale in (0.75, 1.0):
        with torch.no_grad():
            xs = list(latents.to(dtype).unsqueeze(2).unbind(0))
            caps = [f[:n].to(dtype) for f, n in zip(feats, lens)]
            hints = cn(xs, timestep, caps, list(control.to(dtype).unsqueeze(2).unbind(0)), conditioning_scale=scale)
            ref = torch.stack(transformer(xs, timestep, caps, controlnet_block_samples=hints,
                                          return_dict=False)[0]).squeeze(2).float().numpy()
        (out,) = session.run(None, {
            "latents": latents.numpy(), "timestep": timestep.numpy(), "cap_feats": feats.numpy(),
            "cap_mask": mask.numpy(), "control_context": control.numpy(),
            "conditioning_scale": np.array([scale], np.float32),
        })
        if not np.isfinite(out).all():
            raise AssertionError("the combined graph returned non-finite values")
        diff = float(np.abs(out - ref).max())
        if not np.isfinite(diff):  # a NaN in the reference: max() below would skip it
            raise AssertionError("diffusers' ControlNet output is not finite; nothing to compare against")
        worst = max(worst, diff)
    return worst


def add_controlnet(package: Path, src: Path, controlnet_path: Path, name: str, config: Path | None = None,
                   tolerance: float | None = None) -> dict:
    import torch
    from diffusers import ZImageTransformer2DModel

    from zimage_export.controlnet import (check_package_accepts_controlnet, control_graph_name, load_controlnet,
                                          own_weight_bytes)
    from zimage_export.shared_weights import relocate_weights
    from zimage_export.manifest import file_entry, graph_entry
    from zimage_export.onnx_io import export_graph

    if not NAME_PATTERN.match(name):
        raise SystemExit(f"--name {name!r}: letters, digits, '.', '_' and '-' only (at most 64)")
    manifest_path = package / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    try:
        check_package_accepts_controlnet(manifest)
    except ValueError as e:
        raise SystemExit(f"{package}: {e}") from None
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[manifest["precision"]]
    if file_entry(src / "model_index.json")["sha256"] != manifest["source"]["model_index_sha256"]:
        raise SystemExit(f"{src} is not the folder {package} was exported from (model_index.json differs)")
    transformer = ZImageTransformer2DModel.from_pretrained(src / "transformer", dtype=dtype).eval()
    controlnet = load_controlnet(controlnet_path, dict(transformer.config), dtype, config)
    ccfg = controlnet.config
    if ccfg.dim != transformer.config.dim:
        raise SystemExit(f"the ControlNet is {ccfg.dim} wide, the package's transformer {transformer.config.dim}")
    stem = control_graph_name(name)
    graph = package / f"{stem}.onnx"
    with tempfile.TemporaryDirectory(dir=package) as tmp:
        spec = control_spec(transformer, controlnet)
        expected_own = own_weight_bytes(spec.module.own_modules())
        exported = export_graph(spec, Path(tmp), CONTROL_OPSET, external_data_threshold=0, fold_shared_weights=True)
        sizes = relocate_weights(package, exported, graph)
    if sizes["own_bytes"] > expected_own:
        raise SystemExit(f"{sizes['own_bytes']} bytes stored as the ControlNet's own, but its weights are "
                         f"{expected_own}: weights shared with the transformer were stored again")
    import onnx

    onnx.checker.check_model(str(graph))
    # Own weights are re-read from the package's files: the check covers the relocation too.
    diff = check_against_diffusers(transformer, controlnet, graph)
    limit = tolerance if tolerance is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    if diff > limit:
        raise SystemExit(f"the combined graph differs from diffusers by {diff} (> {limit})")
    entry = graph_entry(package, stem)
    manifest.setdefault("controlnets", {})[name] = {
        "graph": entry,
        "transformer_sha256": manifest["graphs"]["transformer"]["sha256"],
        "control_in_dim": ccfg.control_in_dim,
        "add_control_noise_refiner": ccfg.add_control_noise_refiner,
        "control_layers_places": list(ccfg.control_layers_places),
        "control_refiner_layers_places": list(ccfg.control_refiner_layers_places or []),
        "dim": ccfg.dim,
        "shared_weight_bytes": sizes["shared_bytes"],
        "own_weight_bytes": sizes["own_bytes"],
    }
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print(f"added ControlNet {name!r} to {package}: {sizes['own_bytes']} own bytes, "
          f"{sizes['shared_bytes']} shared with transformer.onnx, {sizes['merged_bytes']} of repeated "
          f"initializers merged; max abs diff vs diffusers {diff:.3g}")
    return manifest["controlnets"][name]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="package made by export.py")
    parser.add_argument("--src", type=Path, required=True, help="the diffusers folder the package was exported from")
    parser.add_argument("--controlnet", type=Path, required=True, help="ZImageControlNetModel folder or .safetensors")
    parser.add_argument("--name", required=True, help="the ControlNet's name in the package")
    parser.add_argument("--config", type=Path, help="JSON config values for a single-file checkpoint")
    parser.add_argument("--tolerance", type=float, help="max abs diff vs diffusers (default 1e-4 fp32, 5e-2 fp16)")
    args = parser.parse_args(argv)
    require_source_folder(parser, args.src)
    import torch

    torch.manual_seed(0)
    start = time.time()
    add_controlnet(args.package.resolve(), args.src.resolve(), args.controlnet.resolve(), args.name, args.config,
                   args.tolerance)
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
