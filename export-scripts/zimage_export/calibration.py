"""Calibration activations for GPTQ (`--method gptq`): the second moments `H = X^T X` of the
inputs `X` of a float transformer's products, gathered while that transformer generates
(docs/quantization.md, "GPTQ").

Each calibration prompt is encoded by the package's own float text encoder, then denoised from
seeded noise for `steps` Euler steps with the package's own schedule (its scheduler config,
sigma = linspace(1, 1/N, N) shifted, as sdk/src/pipeline/scheduler.rs), guidance off, exactly
as the SDK's turbo default runs: so the activations are those of real trajectories, at every
timestep, and not of noise alone. ONNX Runtime runs the package's unmodified transformer with
the products' inputs as extra outputs (its data files mapped, not copied).

H takes K^2 float64s per distinct input (the real model: ~40 GB in all), so the inputs are
gathered in passes that each hold at most `memory_gib`, running the prompts again per pass
(the trajectories are deterministic, so every pass sees the same activations).

The prompts are not the ones the quality measurements use (sdk/examples/quant_quality.rs,
quant_sensitivity.py): a quantization calibrated on its own test prompts would look better than
it is.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIBRATION_PROMPTS = (
    "a weathered wooden boat pulled up on a pebble beach, overcast morning",
    "一位穿着汉服的女孩站在樱花树下，柔和的春日阳光",
    "a busy food market in Bangkok at night, string lights, motion blur",
    "studio product photo of a ceramic coffee mug on a marble table",
    "a snowy mountain village with smoke rising from chimneys, wide shot",
    "手写的毛笔字“春风”贴在红色的门上",
    "a golden retriever puppy running through autumn leaves",
    "a vintage poster with the words \"GRAND HOTEL\" in art deco letters",
    "an aerial view of terraced rice fields after rain",
    "close-up portrait of a young man with freckles, natural window light",
    "a futuristic train station with glass ceilings, people walking",
    "一碗热气腾腾的兰州拉面，牛肉和香菜，俯拍",
    "watercolor illustration of a fox reading a book under a tree",
    "a desert highway at sunset with a lone motorcycle",
    "a cluttered artist's desk with brushes, paint tubes and sketches",
    "underwater photo of a sea turtle over a coral reef",
)
DEFAULT_PROMPTS = 8
DEFAULT_SIZE = 512
DEFAULT_STEPS = 8
DEFAULT_MEMORY_GIB = 16.0


@dataclass
class CalibrationOptions:
    prompts: tuple = CALIBRATION_PROMPTS[:DEFAULT_PROMPTS]
    size: int = DEFAULT_SIZE  # image side, pixels
    steps: int = DEFAULT_STEPS
    seed: int = 0
    memory_gib: float = DEFAULT_MEMORY_GIB  # the most H held at once (float64)
    threads: int = 0  # ONNX Runtime's intra-op threads (0: its default)
    # Classifier-free guidance of the calibration trajectories (None: the package's
    # generation_defaults.guidance_scale, 0 where it has none, as Z-Image-Turbo). With guidance the
    # transformer also runs on the empty negative prompt, whose activations are calibrated too.
    guidance: float | None = None

    def __post_init__(self):
        self.prompts = tuple(self.prompts)
        if not self.prompts or any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise ValueError("calibration needs at least one non-empty prompt")
        if self.steps < 1:
            raise ValueError(f"calibration steps must be at least 1, not {self.steps}")
        if self.size < 1:
            raise ValueError(f"calibration size must be positive, not {self.size}")
        if not self.memory_gib > 0:
            raise ValueError(f"calibration memory must be positive, not {self.memory_gib}")
        if self.guidance is not None and not (np.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"calibration guidance must be finite and not negative, not {self.guidance}")

    def section(self) -> dict:
        """What the manifest records (the prompts by count: a user's own may be private)."""
        return {"prompts": len(self.prompts), "size": self.size, "steps": self.steps, "seed": self.seed}


def guidance(options: CalibrationOptions, manifest: dict) -> tuple[float, float]:
    """(scale, truncation) of the calibration's classifier-free guidance: `options.guidance`, or
    the package's generation_defaults (scale 0 and truncation 1 where it has none). As the SDK
    (sdk/src/pipeline/denoise.rs), a step whose normalised timestep exceeds a truncation <= 1
    runs unguided; cfg_normalization is not applied (it rescales the prediction, not the
    activations the statistics are made of)."""
    defaults = manifest.get("generation_defaults") or {}
    scale = options.guidance if options.guidance is not None else float(defaults.get("guidance_scale", 0.0))
    return scale, float(defaults.get("cfg_truncation", 1.0))


def sigmas(scheduler: dict, steps: int, image_seq_len: int) -> list:
    """The sampler's sigmas (`steps` + 1, ending in 0), as sdk/src/pipeline/scheduler.rs."""
    base = np.linspace(1.0, 1.0 / steps, steps, dtype=np.float32)
    if scheduler.get("use_dynamic_shifting", False):
        base_len = scheduler.get("base_image_seq_len", 256)
        max_len = scheduler.get("max_image_seq_len", 4096)
        base_shift = scheduler.get("base_shift", 0.5)
        max_shift = scheduler.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        mu = image_seq_len * m + base_shift - m * base_len
        e = np.float32(mu if scheduler.get("time_shift_type", "exponential") == "linear" else np.exp(mu))
        s = e / (e + (1.0 / base - 1.0))
    else:
        shift = np.float32(scheduler.get("shift", 1.0))
        s = shift * base / (1.0 + (shift - 1.0) * base)
    terminal = scheduler.get("shift_terminal")
    if terminal:
        s = 1.0 - (1.0 - s) / ((1.0 - s[-1]) / (1.0 - terminal))
    return [float(v) for v in s] + [0.0]


def cpu_session(model, threads: int, external_data=None):
    """A quiet CPU ONNX Runtime session of `model` (a path or serialized bytes), with
    `external_data` ({file name: bytes-like}) handed over from memory where given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if external_data:
        names = list(external_data)
        buffers = [external_data[n] for n in names]
        options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def pad_caption(features: np.ndarray, multiple: int):
    """(cap_feats, cap_mask): text features padded to the transformer's sequence multiple with
    masked zeros, as the runtime pads them."""
    pad = (-features.shape[1]) % multiple
    cap = np.concatenate([features, np.zeros((1, pad, features.shape[2]), features.dtype)], axis=1)
    mask = np.array([[True] * features.shape[1] + [False] * pad])
    return cap.astype(np.float32), mask


def caption_inputs(package: Path, manifest: dict, prompts, threads: int) -> list:
    """(cap_feats, cap_mask) per prompt: the float text encoder's features, padded
    (`pad_caption`)."""
    from tokenizers import Tokenizer

    text = manifest["text_encoder"]
    tokenizer = Tokenizer.from_file(str(package / manifest["tokenizer"]["path"]))
    encoder = cpu_session(str(package / manifest["graphs"]["text_encoder"]["path"]), threads)
    multiple = manifest["transformer"]["sequence_multiple"]
    limit = text.get("max_sequence_length", 512)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(text["prompt_template"].format(prompt=prompt)).ids[:limit]
        ids = np.array([ids], np.int64)
        features = encoder.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        out.append(pad_caption(features, multiple))
    return out


def _session_with_outputs(transformer: Path, outputs, threads: int):
    """An ONNX Runtime session of the transformer graph with `outputs` added. Its external data
    files are handed to ONNX Runtime mapped from the package (ONNX Runtime refuses a re-saved
    graph whose data lies elsewhere, links included), so nothing is copied to disk."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(transformer), load_external_data=False)
    known = {o.name for o in model.graph.output}
    # A product's input has its weight's type (float32, or float16 in fp16 packages).
    weight_types = {t.name: t.data_type for t in model.graph.initializer}
    input_types = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in weight_types:
            input_types.setdefault(node.input[0], weight_types[node.input[1]])
    for name in outputs:
        if name not in known:
            elem_type = input_types.get(name, onnx.TensorProto.FLOAT)
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    files = sorted({next(e.value for e in t.external_data if e.key == "location")
                    for t in model.graph.initializer if uses_external_data(t)})
    mapped = {f: np.memmap(transformer.parent / f, dtype=np.uint8, mode="r") for f in files}
    return cpu_session(model.SerializeToString(), threads, mapped)


def _passes(sizes: dict, memory_gib: float) -> list:
    """Inputs grouped so that each group's H (K^2 float64s each) fits `memory_gib`."""
    budget = memory_gib * 2**30
    groups, current, held = [], [], 0
    for name, k in sizes.items():
        need = k * k * 8
        if current and held + need > budget:
            groups.append(current)
            current, held = [], 0
        current.append(name)
        held += need
    if current:
        groups.append(current)
    return groups


def hessian_passes(package: Path, manifest: dict, inputs: dict, options: CalibrationOptions, log=print):
    """Yields dicts {input name: (H, tokens)} covering `inputs` ({name: K}), one per pass.
    Raises ValueError where the float transformer's activations are not finite."""
    package = Path(package)
    transformer = package / manifest["graphs"]["transformer"]["path"]
    spec = manifest["transformer"]
    step = manifest["vae"]["scale_factor"] * spec["patch_size"]
    if options.size % step:
        raise ValueError(f"calibration size must be a multiple of {step}, not {options.size}")
    side = options.size // manifest["vae"]["scale_factor"]
    if side > min(spec.get("max_latent_height", side), spec.get("max_latent_width", side)):
        raise ValueError(f"calibration size {options.size} is larger than the transformer takes")
    image_seq_len = (side // spec["patch_size"]) ** 2
    schedule = sigmas(manifest.get("scheduler", {}), options.steps, image_seq_len)
    captions = caption_inputs(package, manifest, options.prompts, options.threads)
    scale, truncation = guidance(options, manifest)
    negative = caption_inputs(package, manifest, [""], options.threads)[0] if scale > 0 else None
    shape = (1, spec["in_channels"], side, side)
    groups = _passes(inputs, options.memory_gib)
    for number, group in enumerate(groups, 1):
        session = _session_with_outputs(transformer, group, options.threads)
        names = [session.get_outputs()[0].name, *group]
        # The graph's input types (fp16 packages may take float16).
        types = {i.name: np.float16 if i.type == "tensor(float16)" else np.float32 for i in session.get_inputs()}
        acc = {name: np.zeros((inputs[name], inputs[name]), np.float64) for name in group}
        tokens = dict.fromkeys(group, 0)
        rng = np.random.default_rng(options.seed)
        for p, (cap, mask) in enumerate(captions):
            latents = rng.standard_normal(shape).astype(np.float32)
            for i in range(options.steps):
                t = np.array([1.0 - schedule[i]], np.float32)
                guided = scale > 0 and not (truncation <= 1.0 and float(t[0]) > truncation)
                predictions = []
                for caption, caption_mask in ((cap, mask), *((negative,) if guided else ())):
                    feed = {"latents": latents, "timestep": t, "cap_feats": caption, "cap_mask": caption_mask}
                    feed = {k: v.astype(types[k]) if k in types and v.dtype.kind == "f" else v
                            for k, v in feed.items()}
                    out = session.run(names, feed)
                    for name, x in zip(group, out[1:]):
                        # (float16 activations are summed in float32, as float32 ones, then float64)
                        x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
                        if not np.isfinite(x).all():
                            raise ValueError(f"calibration: the float transformer's activation {name!r} is not "
                                             f"finite (prompt {p + 1}, step {i + 1})")
                        acc[name] += (x.T @ x).astype(np.float64)
                        tokens[name] += x.shape[0]
                    predictions.append(out[0].astype(np.float32))
                prediction = predictions[0]
                if guided:  # pos + g * (pos - neg), as the SDK's guide()
                    prediction = prediction + np.float32(scale) * (prediction - predictions[1])
                latents = latents + np.float32(schedule[i + 1] - schedule[i]) * -prediction
            log(f"calibration pass {number}/{len(groups)}: prompt {p + 1}/{len(captions)}")
        del session
        yield {name: (acc[name], tokens[name]) for name in group}


def per_channel_int8(w, h, damping):
    """GPTQ in the int8 activation packages' format: ((int8 codes, float32 scales), errors...)."""
    from .gptq import gptq_per_channel

    q, scale, err, rtn_err = gptq_per_channel(w, h, damping)
    return (q, scale), err, rtn_err


def gptq_codes(model, nodes, package: Path, manifest: dict, options: CalibrationOptions, damping: float,
               log=print, rounding=per_channel_int8) -> tuple[dict, dict]:
    """GPTQ codes for the weights of `nodes` (products `x @ W` of `model`, W a `[K, N]`
    initializer), calibrated on `package`'s float transformer. `rounding(W, H, damping)` ->
    (the weight in its package format, GPTQ's weighted error, RTN's): per_channel_int8 (the int8
    activation packages), or MatMulNBits blocks (weight-only int8 / int4): quantize.gptq_rounding
    picks the one for a package's options. Returns
    ({W name: the weight in that format}, a summary for the manifest)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    by_input = {}
    for node in nodes:
        by_input.setdefault(node.input[0], []).append(node.input[1])
    sizes = {x: inits[ws[0]].dims[0] for x, ws in by_input.items()}
    codes, gains, fallbacks, tokens = {}, [], 0, 0
    for hessians in hessian_passes(package, manifest, sizes, options, log):
        for x, (h, count) in hessians.items():
            tokens = max(tokens, count)
            for w in by_input[x]:
                codes[w], err, rtn_err = rounding(numpy_helper.to_array(inits[w]), h, damping)
                if err < rtn_err:
                    gains.append(err / rtn_err)
                else:
                    fallbacks += 1
            del h
    scale, _ = guidance(options, manifest)
    summary = {
        **options.section(),
        **({"guidance": scale} if scale > 0 else {}),  # (absent without: as before it existed)
        "damping": damping,
        "tokens": tokens,
        "weights": len(codes),
        "rounded_to_nearest": fallbacks,  # where GPTQ was no better on the calibration data
        "weighted_error_vs_rtn": round(float(np.mean(gains)), 4) if gains else 1.0,
    }
    return codes, summary
