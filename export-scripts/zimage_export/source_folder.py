"""Checks that a --src folder is a diffusers-format Z-Image folder before anything is loaded or
written, so that a wrong path or an incomplete download is refused with one message naming
what is missing (instead of a traceback from deep inside transformers, after an empty output
folder has been made)."""

import json
from pathlib import Path

# model_index.json's _class_name: any of diffusers' Z-Image pipelines (ZImagePipeline, its
# Img2Img / Inpaint / ControlNet siblings, which share the components, and ZImageOmniPipeline).
PIPELINE_PREFIX, PIPELINE_SUFFIX = "ZImage", "Pipeline"

# Files every such folder has, relative to it.
REQUIRED_FILES = (
    "model_index.json",
    "tokenizer/tokenizer.json",
    "scheduler/scheduler_config.json",
    "transformer/config.json",
    "text_encoder/config.json",
    "vae/config.json",
)

# Components whose weights must be present (diffusers and transformers write .safetensors,
# older checkpoints .bin; sharded checkpoints have several).
WEIGHT_FOLDERS = ("transformer", "text_encoder", "vae")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class SourceFolderError(ValueError):
    """The folder is not a diffusers-format Z-Image folder; the message says why."""


def check_source_folder(src: Path) -> None:
    """Raises SourceFolderError unless `src` holds a complete Z-Image pipeline."""
    if not src.is_dir():
        raise SourceFolderError(f"{src} is not a folder (want a diffusers-format Z-Image folder: "
                                f"model_index.json, transformer/, text_encoder/, vae/, ...)")
    missing = [f for f in REQUIRED_FILES if not (src / f).is_file()]
    missing += [f"{folder}/*.safetensors" for folder in WEIGHT_FOLDERS
                if (src / folder).is_dir() and not _has_weights(src / folder)]
    if missing:
        raise SourceFolderError(f"{src} is not a complete diffusers-format Z-Image folder: missing "
                                f"{', '.join(missing)}")
    try:
        model_index = json.loads((src / "model_index.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceFolderError(f"{src / 'model_index.json'} is not valid JSON: {e}") from None
    pipeline = model_index.get("_class_name") if isinstance(model_index, dict) else None
    if not (isinstance(pipeline, str) and pipeline.startswith(PIPELINE_PREFIX) and pipeline.endswith(PIPELINE_SUFFIX)):
        raise SourceFolderError(f"{src} holds a {pipeline!r} pipeline, not a Z-Image one "
                                f"({PIPELINE_PREFIX}...{PIPELINE_SUFFIX} in model_index.json)")


def _has_weights(folder: Path) -> bool:
    return any(f.suffix in WEIGHT_SUFFIXES for f in folder.iterdir() if f.is_file())


def check_qwen3_checkpoint(hf: Path) -> None:
    """Raises SourceFolderError unless `hf` is a Hugging Face causal-LM checkpoint folder with
    the files the standalone enhancer export reads (config.json, tokenizer.json, weights)."""
    if not hf.is_dir():
        raise SourceFolderError(f"{hf} is not a folder (want a Hugging Face Qwen3 checkpoint: config.json, "
                                f"tokenizer.json, *.safetensors)")
    missing = [f for f in ("config.json", "tokenizer.json") if not (hf / f).is_file()]
    if not _has_weights(hf):
        missing.append("*.safetensors")
    if missing:
        raise SourceFolderError(f"{hf} is not a complete Hugging Face checkpoint: missing {', '.join(missing)}")


def require_source_folder(parser, src: Path, option: str = "--src", check=check_source_folder) -> None:
    """A folder check for a command line: a bad folder ends the script as argparse ends it on a
    bad argument (usage, the message, exit status 2)."""
    try:
        check(src)
    except SourceFolderError as e:
        parser.error(f"{option}: {e}")
