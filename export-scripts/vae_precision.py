"""How far a package's VAE graphs are from the exact result at a photo's size.

Runs the package's vae_encoder.onnx on a computed picture (`photo_sized_vae_input`: smooth
gradients, a disc, fine stripes) or a picture file (`--picture`) and its vae_decoder.onnx on random latents in ONNX Runtime, and
the diffusers folder's AutoencoderKL on the same inputs in float64 (the exact result for the
float32 weights and inputs) and in float32 (what diffusers computes); prints each one's max
abs difference from float64 and the graphs' median time. docs/goldens.md, "Large pictures".

    python export-scripts/vae_precision.py --src DIFFUSERS_FOLDER --package PKG [--package PKG2 ...] \\
        [--picture FILE] [--width 992 --height 736 --decode-size 512 --threads 2 --runs 5]
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(run, runs: int) -> tuple[np.ndarray, float]:
    out = run()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="the diffusers folder the packages were exported from")
    parser.add_argument("--package", type=Path, action="append", required=True)
    parser.add_argument("--picture", type=Path,
                        help="encode this picture file instead, resized to --width x --height by diffusers' image "
                             "processor (as its pipelines do)")
    parser.add_argument("--width", type=int, default=992)
    parser.add_argument("--height", type=int, default=736)
    parser.add_argument("--decode-size", type=int, default=512, help="decoder output side (square)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    from diffusers import AutoencoderKL

    from zimage_export.fixtures.probe_pictures import photo_sized_vae_input

    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(args.src / "vae").eval()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.picture is None:
        picture = photo_sized_vae_input(args.height, args.width)
    else:
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.utils import load_image

        processor = VaeImageProcessor(vae_scale_factor=scale)
        picture = processor.preprocess(load_image(str(args.picture)), height=args.height, width=args.width).numpy()
    side = args.decode_size // scale
    latents = torch.randn(1, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    rows = {}
    with torch.no_grad():
        for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
            # diffusers' own encode and decode (the graphs are exported from the same modules).
            model = copy.deepcopy(vae).to(dtype)
            rows[name] = (model.encode(torch.from_numpy(picture).to(dtype)).latent_dist.mean.double().numpy(),
                          model.decode(latents.to(dtype)).sample.double().numpy())
    exact_mean, exact_image = rows["float64"]
    print(f"encoder at {args.width}x{args.height}, decoder at {args.decode_size}x{args.decode_size}; "
          "max abs from float64 (median time)")
    print(f"  PyTorch float32: encoder {np.abs(rows['float32'][0] - exact_mean).max():.2e}, "
          f"decoder {np.abs(rows['float32'][1] - exact_image).max():.2e}")
    for package in args.package:
        encoder = session(package / "vae_encoder.onnx", args.threads)
        decoder = session(package / "vae_decoder.onnx", args.threads)
        mean, t_enc = timed(lambda: encoder.run(None, {"image": picture})[0], args.runs)
        image, t_dec = timed(lambda: decoder.run(None, {"latents": latents.numpy()})[0], args.runs)
        print(f"  {package}: encoder {np.abs(mean - exact_mean).max():.2e} ({t_enc:.2f} s), "
              f"decoder {np.abs(image - exact_image).max():.2e} ({t_dec:.2f} s)", flush=True)


if __name__ == "__main__":
    main()
