"""Train a ControlNet for the toy model (models/toy-zimage) that puts the shape where an edge
map says, and add it to a copy of the toy package (models/toy-zimage-control, name `edges`).

    OMP_NUM_THREADS=1 PYTHONPATH=export-scripts /work/venv/bin/python export-scripts/train_toy_controlnet.py

1. Loads the toy's diffusers folder (default: where train_toy.py writes it), all frozen.
2. A diffusers ZImageControlNetModel in the Union 2.1 layout (zimage_export/toy/control.py:
   33 control channels, add_control_noise_refiner="control_noise_refiner", a hint after each
   of the 3 main layers and after the noise refiner), its blocks starting as copies of the
   transformer's.
3. Trains only the ControlNet with train_toy's flow-matching loss on every toy scene, the
   control image being the SDK's Canny edge map (zimage_export/toy/edges.py, bit-identical
   to `zimage::control_preprocess::canny`) of the scene's shape outline, and the caption one
   WITHOUT a position word: where the shape goes can only come from the map.
4. Prints what it draws, measured from pixels (zimage_export/toy/measure.py), with the map
   and with the ControlNet at scale 0.
5. Saves the ControlNet as a diffusers folder (<cache>/toy/controlnet-edges), makes the
   package copy (manifest and transformer.onnx copied, links to the toy's other files: git
   stores them once) and adds the ControlNet with export_controlnet.py; writes the 45 edge maps
   it trained on as one strip (the Rust test checks the SDK makes the same) and the loss curve.
Seeded; one torch thread by default. Run time and results: docs/toy-model.md.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NAME = "edges"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=HERE / ".cache" / "toy" / "src" / "toy-zimage",
                        help="the toy's diffusers folder (train_toy.py writes it there)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="work folder (gitignored)")
    parser.add_argument("--base", type=Path, default=REPO / "models" / "toy-zimage", help="the toy package")
    parser.add_argument("--out", type=Path, default=REPO / "models" / "toy-zimage-control")
    parser.add_argument("--curve", type=Path, default=REPO / "docs" / "toy-controlnet-training.csv")
    parser.add_argument("--maps", type=Path, default=REPO / "tests" / "golden" / "toy-controlnet" / "edge-maps.png")
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the step count (0.1 for a smoke run)")
    parser.add_argument("--skip-export", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zimage_export.toy import control as C
    from zimage_export.toy import train as T
    from zimage_export.toy.edges import geometries

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    budget = C.ControlBudget()
    budget.steps = max(10, int(budget.steps * args.scale))
    curve = T.Curve()
    src = args.src.resolve()
    tokenizer = AutoTokenizer.from_pretrained(src / "tokenizer")
    text_encoder = AutoModelForCausalLM.from_pretrained(src / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(src / "vae").eval()
    transformer = ZImageTransformer2DModel.from_pretrained(src / "transformer").eval()

    scenes, _ = T.prepare_scenes()
    scene_caps = [C.unplaced_captions(s) for s in scenes]
    check_scenes, check_caps, _ = C.placement_check_set(args.seed + 5)
    texts = sorted({c for caps in scene_caps for c in caps} | set(check_caps) | {""})
    feats = T.caption_features(tokenizer, text_encoder, texts)
    latents = T.set_latents_like(vae, scenes)
    weights = T.shape_weights(scenes)
    controls, maps = C.scene_controls(vae, scenes, C.CONTROL_CONFIG["control_in_dim"])
    print(f"{len(scenes)} scenes, {len(texts)} position-less captions, {len(maps)} edge maps "
          f"({time.time() - curve.start:.0f} s)", flush=True)

    controlnet = C.build_controlnet(transformer, args.seed)
    check_controls, _ = C.scene_controls(vae, check_scenes, C.CONTROL_CONFIG["control_in_dim"])

    def check(step, scales=(1.0,)):
        from zimage_export.toy.measure import score

        for scale in scales:
            images = C.sample(transformer, controlnet, vae, [feats[c] for c in check_caps], check_controls, scale,
                              seed=args.seed)
            s = score(images, check_scenes)
            print(f"  step {step}, control scale {scale}: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()),
                  flush=True)
        return images

    check(0, scales=(0.0,))
    C.train_controlnet(controlnet, transformer, args.seed, budget, curve, latents, controls, scene_caps, feats,
                       weights, check=check)
    print(f"trained in {time.time() - curve.start:.0f} s", flush=True)
    images = check(budget.steps, scales=(0.0, 0.75, 1.0))
    _save_strip(images[:40], args.cache / "toy" / "check-controlnet.png")

    folder = args.cache / "toy" / f"controlnet-{NAME}"
    C.standalone(controlnet).save_pretrained(folder)
    print(f"diffusers folder: {folder}", flush=True)
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    curve.write(args.curve)
    args.maps.parent.mkdir(parents=True, exist_ok=True)
    _save_strip([maps[g][..., 0] for g in geometries()], args.maps)  # grey: R = G = B
    if not args.skip_export:
        sys.path.insert(0, str(HERE))
        from make_controlnet_fixtures import linked_copy

        linked_copy(args.base.resolve(), args.out.resolve())
        subprocess.run([sys.executable, str(HERE / "export_controlnet.py"), "--package", str(args.out), "--src",
                        str(src), "--controlnet", str(folder), "--name", NAME], check=True)
    print(f"done in {time.time() - curve.start:.0f} s", flush=True)


def _save_strip(images, path: Path) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(images), axis=1)).save(path)


if __name__ == "__main__":
    main()
