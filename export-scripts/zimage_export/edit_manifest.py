"""The manifest's "edit" section: what the runtime needs to run ZImageOmniPipeline's editing
path besides the graphs (docs/editing.md): the SigLIP2 image processor's settings, the prompt
segments that wrap each reference in <|vision_start|>...<|vision_end|>, the reference image
checks of diffusers' Flux2ImageProcessor, and the pipeline's defaults."""

import inspect
import json
from pathlib import Path

# PIL resampling filter ids (PIL.Image.Resampling) -> the names the runtime implements.
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}

# ZImageOmniPipeline._encode_prompt with N >= 1 images builds N + 2 text segments, encoded one
# by one: first, (N - 1) x between, prompt_prefix + prompt + prompt_suffix, last; with none, one.
PROMPT_SEGMENTS = {
    "first": "<|im_start|>user\n<|vision_start|>",
    "between": "<|vision_end|><|vision_start|>",
    "prompt_prefix": "<|vision_end|>",
    "prompt_suffix": "<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
    "last": "<|vision_end|><|im_end|>",
    # Without images (Omni-mode text-to-image) the prompt is one segment: prefix + prompt + suffix.
    "no_image_prefix": "<|im_start|>user\n",
    "no_image_suffix": "<|im_end|>\n<|im_start|>assistant\n",
}

# diffusers puts no limit on the number of references; every one adds a caption segment, a
# latent image and a SigLIP grid to the sequence. The runtime refuses more than this (a
# package may record another number).
MAX_REFERENCE_IMAGES = 8


def pipeline_defaults() -> dict:
    from diffusers import ZImageOmniPipeline

    params = inspect.signature(ZImageOmniPipeline.__call__).parameters
    return {
        "num_inference_steps": params["num_inference_steps"].default,
        "guidance_scale": float(params["guidance_scale"].default),
        "cfg_truncation": float(params["cfg_truncation"].default),
        "max_sequence_length": params["max_sequence_length"].default,
    }


def reference_checks() -> dict:
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    params = inspect.signature(Flux2ImageProcessor.check_image_input).parameters
    return {
        "min_side": params["min_side_length"].default,
        "max_aspect_ratio": params["max_aspect_ratio"].default,
        # Larger references are resized (Lanczos) to this area before anything else.
        "max_area": params["max_area"].default,
    }


def edit_section(src: Path, package: Path) -> dict | None:
    """None unless the package has both editing graphs."""
    if not ((package / "siglip.onnx").exists() and (package / "transformer_omni.onnx").exists()):
        return None
    read = lambda *p: json.loads(src.joinpath(*p).read_text())  # noqa: E731
    siglip = read("siglip", "config.json")
    proc = read("siglip_processor", "preprocessor_config.json")
    vision = siglip.get("vision_config", siglip)
    resample = proc.get("resample", 2)
    if resample not in RESAMPLE:
        raise ValueError(f"siglip_processor resample {resample} is not a PIL filter this runtime knows")
    vae = read("vae", "config.json")
    return {
        "siglip": {
            "hidden_size": vision["hidden_size"],
            "patch_size": vision["patch_size"],
            "num_channels": vision.get("num_channels", 3),
        },
        "image_processor": {
            "patch_size": proc.get("patch_size", 16),
            "max_num_patches": proc.get("max_num_patches", 256),
            "resample": RESAMPLE[resample],
            "do_resize": proc.get("do_resize", True),
            "do_rescale": proc.get("do_rescale", True),
            "rescale_factor": proc.get("rescale_factor", 1 / 255),
            "do_normalize": proc.get("do_normalize", True),
            "image_mean": proc.get("image_mean", [0.5, 0.5, 0.5]),
            "image_std": proc.get("image_std", [0.5, 0.5, 0.5]),
        },
        "reference": {
            **reference_checks(),
            # References are cropped to multiples of this for the VAE (vae scale * 2).
            "multiple": 2 ** (len(vae["block_out_channels"]) - 1) * 2,
            "max_images": MAX_REFERENCE_IMAGES,
        },
        "prompt_segments": PROMPT_SEGMENTS,
        "defaults": pipeline_defaults(),
    }
