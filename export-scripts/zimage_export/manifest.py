"""manifest.json of a model package (docs/package-format.md, format version 1).

`manifest_dict` assembles it from plain values and is tested without torch, onnx or diffusers
(tests/test_manifest.py); `build_manifest` reads those values from the diffusers folder and the
exported graphs."""

import hashlib
import json
from pathlib import Path

from .onnx_io import external_data_path

PROMPT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default max_sequence_length
SEQUENCE_MULTIPLE = 32  # SEQ_MULTI_OF in diffusers' transformer_z_image.py


# The settings each member of the family is meant to run with (the examples on their model
# cards). Turbo's (8 steps, no guidance) are what the runtime assumes when a manifest has no
# generation_defaults, so Turbo packages do not write the section.
VARIANT_DEFAULTS = {
    "turbo": {"steps": 8, "guidance_scale": 0.0, "cfg_normalization": 0.0, "cfg_truncation": 1.0},
    "base": {"steps": 50, "guidance_scale": 4.0, "cfg_normalization": 0.0, "cfg_truncation": 1.0},
}


def detect_variant(name: str) -> str:
    """The family member a source folder's name says it is: anything with "turbo" is Turbo;
    "Z-Image" or "Z-Image-Base" (the non-distilled base model) is base; anything else is taken
    for Turbo, the historic default (export.py says so; --variant overrides)."""
    lower = name.lower().rstrip("/").rsplit("/", 1)[-1]
    if "turbo" in lower:
        return "turbo"
    if lower in ("z-image", "z-image-base", "z_image", "z_image_base"):
        return "base"
    return "turbo"


def generation_defaults(variant: str, overrides: dict | None = None) -> dict | None:
    """The manifest's generation_defaults section: the variant's settings with `overrides`
    (keys of VARIANT_DEFAULTS' entries, None = keep) applied; None when they are Turbo's."""
    values = dict(VARIANT_DEFAULTS[variant])
    changed = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(changed) - set(values)
    if unknown:
        raise ValueError(f"unknown generation defaults: {sorted(unknown)}")
    values.update(changed)
    if variant == "turbo" and values == VARIANT_DEFAULTS["turbo"]:
        return None
    return {"variant": variant if not changed else "custom", **values}


# Graphs every package has, and those it has only where they differ from these.
REQUIRED_GRAPHS = ("text_encoder", "transformer", "vae_decoder", "vae_encoder")
OPTIONAL_GRAPHS = ("vae_decoder_cpu", "siglip", "transformer_omni")
# What a package without an explicit "pipelines" list supports (every package exported before
# editing existed); packages with the editing graphs list "edit" too (docs/editing.md).
BASE_PIPELINES = ["text_to_image", "image_to_image", "inpaint"]


def file_entry(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return {"path": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def graph_entry(package: Path, name: str) -> dict:
    from .onnx_io import graph_io  # needs onnx

    path = package / f"{name}.onnx"
    data = external_data_path(path)
    inputs, outputs = graph_io(path)
    return {
        **file_entry(path),
        "external_data": file_entry(data) if data.exists() else None,
        "inputs": inputs,
        "outputs": outputs,
    }


def write_manifest(package: Path, manifest: dict) -> None:
    """Rewrites `package`/manifest.json through a temporary file, so that a reader never sees
    half of it (the tools that add graphs to a package write it last)."""
    import os

    tmp = package / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, package / "manifest.json")


def graph_files(entry: dict) -> list[dict]:
    """The file entries of one graph's manifest entry: the graph, its external data, the same
    for its prebuilt CPU layout (cpu_layout.py), then its prepacked layout and that layout's
    probe (prepacked.py), where present."""
    layout = entry.get("cpu_layout") or {}
    prepacked = entry.get("cpu_prepacked") or {}
    probe = prepacked.get("probe") or {}
    return [e for e in (entry, entry.get("external_data"), layout or None, layout.get("external_data"),
                        prepacked or None, prepacked.get("external_data"), probe or None, probe.get("external_data"))
            if e]


def transformer_limits(axes_lens: list[int], patch_size: int) -> dict:
    """The RoPE tables have axes_lens[i] rows. Caption tokens sit at 1..P and the image at P+1,
    where P is the caption length padded to 32, so P + 1 <= axes_lens[0] - 1. Patch rows and
    columns index axes 1 and 2 directly."""
    max_pad = (axes_lens[0] - 2) // SEQUENCE_MULTIPLE * SEQUENCE_MULTIPLE
    return {
        "max_caption_tokens": max_pad,
        "max_latent_height": axes_lens[1] * patch_size,
        "max_latent_width": axes_lens[2] * patch_size,
    }


def package_graphs(package: Path) -> list[str]:
    """The graphs the manifest lists: every required one, and the optional ones exported."""
    return [g for g in (*REQUIRED_GRAPHS, *OPTIONAL_GRAPHS)
            if g in REQUIRED_GRAPHS or (package / f"{g}.onnx").exists()]


def build_manifest(src: Path, package: Path, precision: str, name: str, pad_token_id: int,
                   defaults: dict | None = None) -> dict:
    import diffusers
    import torch

    from .lora_targets import lora_parameters

    read = lambda *p: json.loads(src.joinpath(*p).read_text())  # noqa: E731
    configs = {
        "model_index": read("model_index.json"),
        "transformer": read("transformer", "config.json"),
        "text_encoder": read("text_encoder", "config.json"),
        "vae": read("vae", "config.json"),
        "scheduler": read("scheduler", "scheduler_config.json"),
    }
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    lora_table, unmatched = lora_parameters(src, package / "transformer.onnx", dtype)
    print(f"LoRA: {len(lora_table)} transformer Linear weights located in transformer.onnx", flush=True)
    if unmatched:
        print(f"LoRA: not located (LoRAs cannot change them): {', '.join(unmatched)}", flush=True)
    from .edit_manifest import edit_section

    edit = edit_section(src, package)
    if edit is not None:
        # The Omni graph's Linear weights by diffusers name, as the transformer's table: they
        # name its layers for quantization (its kept layers, quantize.py).
        edit["omni_parameters"], unmatched = lora_parameters(src, package / "transformer_omni.onnx", dtype)
        if unmatched:
            print(f"transformer_omni: Linear weights not located: {', '.join(unmatched)}", flush=True)
    return manifest_dict(
        configs,
        edit=edit,
        precision=precision,
        name=name,
        diffusers_version=diffusers.__version__,
        model_index_sha256=file_entry(src / "model_index.json")["sha256"],
        tokenizer=file_entry(package / "tokenizer.json"),
        graphs={g: graph_entry(package, g) for g in package_graphs(package)},
        pad_token_id=pad_token_id,
        lora_parameters=lora_table,
        generation_defaults=defaults,
    )


def manifest_dict(configs: dict, *, precision: str, name: str, diffusers_version: str, model_index_sha256: str,
                  tokenizer: dict, graphs: dict, pad_token_id: int, lora_parameters: dict | None = None,
                  generation_defaults: dict | None = None, edit: dict | None = None) -> dict:
    """The manifest, in the order manifest.json has it. `configs`: the diffusers folder's JSON
    files by component ("model_index", "transformer", "text_encoder", "vae", "scheduler");
    `tokenizer` and `graphs`: their finished entries (file_entry, graph_entry);
    `lora_parameters`: the transformer's LoRA table (lora_targets.lora_parameters), left out
    when None; `generation_defaults`: the recommended steps and guidance (generation_defaults()),
    left out when None (Turbo's);
    `edit`: the editing section (edit_manifest.edit_section), which also adds a
    "pipelines" list with "edit"; both are left out when None (packages without editing
    keep their manifests unchanged)."""
    tcfg, tecfg, vcfg = configs["transformer"], configs["text_encoder"], configs["vae"]
    patch = tcfg["all_patch_size"][0]
    return {
        "format": "zimage-model-package",
        "format_version": 1,
        "precision": precision,
        "source": {
            "name": name,
            "pipeline_class": configs["model_index"]["_class_name"],
            "diffusers_version": diffusers_version,
            "model_index_sha256": model_index_sha256,
        },
        "tokenizer": tokenizer,
        "graphs": graphs,
        "text_encoder": {
            "hidden_size": tecfg["hidden_size"],
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "prompt_template": PROMPT_TEMPLATE,
            "pad_token_id": pad_token_id,
        },
        "transformer": {
            "in_channels": tcfg["in_channels"],
            "patch_size": patch,
            "f_patch_size": tcfg["all_f_patch_size"][0],
            "dim": tcfg["dim"],
            "num_heads": tcfg["n_heads"],
            "cap_feat_dim": tcfg["cap_feat_dim"],
            "axes_dims": list(tcfg["axes_dims"]),
            "axes_lens": list(tcfg["axes_lens"]),
            "sequence_multiple": SEQUENCE_MULTIPLE,
            **transformer_limits(tcfg["axes_lens"], patch),
            **({"lora_parameters": lora_parameters} if lora_parameters is not None else {}),
        },
        "vae": {
            "latent_channels": vcfg["latent_channels"],
            "scale_factor": 2 ** (len(vcfg["block_out_channels"]) - 1),
            "scaling_factor": vcfg["scaling_factor"],
            "shift_factor": vcfg["shift_factor"],
        },
        "scheduler": configs["scheduler"],
        **({"generation_defaults": generation_defaults} if generation_defaults is not None else {}),
        **({"pipelines": [*BASE_PIPELINES, "edit"], "edit": edit} if edit is not None else {}),
    }
