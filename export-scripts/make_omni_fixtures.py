"""Re-create the committed Omni (editing) fixture: models/tiny-zimage-omni and
tests/golden/tiny-zimage-omni (layout: docs/goldens.md, "Omni").

    export-scripts/.venv/bin/python export-scripts/make_omni_fixtures.py [--tokenizer tokenizer.json]

1. build the tiny random-weight ZImageOmniPipeline folder (zimage_export/fixtures/omni.py:
   tiny-zimage's text encoder, tokenizer and VAE, an Omni transformer, a tiny SigLIP2) in
   export-scripts/.cache/src/tiny-zimage-omni (not committed);
2. export it with export.py (no vae_decoder_cpu: tiny-zimage's parity tests cover that graph)
   and check every graph with verify.py;
3. record the goldens from ZImageOmniPipeline and transformers' Siglip2ImageProcessor, then
   edits with tiny-zimage's LoRAs loaded (`--lora-goldens-only` records just those).
Everything is seeded: a re-run rewrites identical files.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

from zimage_export.fixtures.tokenizer import tokenizer_source

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GRAPHS = ["text_encoder", "transformer", "vae_decoder", "vae_encoder", "siglip", "transformer_omni"]


def run(script: str, *args) -> None:
    subprocess.run([sys.executable, str(HERE / script), *map(str, args)], check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="official Qwen3 tokenizer.json (default: fetch with npm)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="work folder (gitignored)")
    parser.add_argument("--skip-export", action="store_true", help="only re-record the goldens")
    parser.add_argument("--lora-goldens-only", action="store_true",
                        help="only (re-)record the edits with LoRAs (the \"lora\" section of cases.json)")
    parser.add_argument("--edit-cases", nargs="+", metavar="NAME",
                        help="only (re-)record these edit cases (the others' rows are kept); nothing else")
    parser.add_argument("--lora-cases", nargs="+", metavar="NAME",
                        help="with --lora-goldens-only: only these cases (the others' rows are kept)")
    args = parser.parse_args(argv)

    import torch

    from zimage_export.fixtures.goldens_omni import write_omni_goldens, write_omni_lora_goldens
    from zimage_export.fixtures.omni import NAME, build_omni_folder

    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.time()
    src = build_omni_folder(tokenizer_source(args.cache, args.tokenizer), args.cache / "src" / NAME)
    package = REPO / "models" / NAME
    goldens, lora_dir = REPO / "tests" / "golden" / NAME, REPO / "tests" / "golden" / "tiny-zimage" / "loras"
    if args.edit_cases:
        from zimage_export.fixtures.goldens_omni import write_omni_edit_cases

        write_omni_edit_cases(src, goldens, args.edit_cases)
        return
    if args.lora_goldens_only:
        write_omni_lora_goldens(src, goldens, lora_dir, only=args.lora_cases)
        return
    if not args.skip_export:
        run("export.py", "--src", src, "--out", package, "--name", NAME, "--graphs", *GRAPHS, "--no-cpu-layouts")
        run("verify.py", package, "--src", src)
    write_omni_goldens(src, goldens, f"models/{NAME}")
    write_omni_lora_goldens(src, goldens, lora_dir)
    print(f"{NAME}: done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
