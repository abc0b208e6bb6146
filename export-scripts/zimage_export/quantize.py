"""Weight-only int8 / int4 quantization of a package's transformer and text encoder with ONNX
Runtime's `MatMulNBits` (docs/quantization.md).

The graphs are exported in float32 or float16 first; this rewrites them in place of a copy:

- every `MatMul` whose right operand is a constant `[K, N]` weight becomes `MatMulNBits`
  (block-wise along K, asymmetric with a zero point per block), unless its weight is kept;
- a `Gemm` with a constant weight (`nn.Linear` on a 2-D input: the transformer's adaLN
  modulations) is first rewritten as `MatMul` + `Add` with the weight transposed to `[K, N]`,
  because the quantizer only rewrites `MatMul`;
- the text encoder's token-embedding `Gather` becomes `GatherBlockQuantized` (blocks along the
  hidden dimension): for Qwen3-4B it is 0.39 B of the 4.0 B parameters.

`accuracy_level=4` lets ONNX Runtime's CPU provider compute the products in int8 (activations
quantized per block on the fly); the CUDA provider ignores it. An int8 text encoder computes in
float instead (`text_encoder_accuracy_level`, below).

Which layers stay in full precision is decided by name: for the transformer, by the diffusers
parameter name found through the manifest's `lora_parameters` table (the exporter renames
constant-folded weights `val_<n>`); the kept names and the counts go into the manifest's
`quantization` section.
"""

from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase

import numpy as np

from .onnx_io import node_attribute
from .quantize_lm_head import TABLE as TIED_TABLE
from .quantize_lm_head import quantize_tied_embedding

WEIGHTS = {"int8": 8, "int4": 4}
# The transformer's activations: None (weight-only), or quantized as one int8 term or two
# (quantize_w8a8.py; the manifest's quantization.activations).
ACTIVATIONS = (None, "int8", "int8x2")
# rtn: round to nearest; hqq: half-quadratic (int4, ONNX Runtime's); gptq: calibrated rounding of
# the transformer's weights (per-channel int8 with int8 activations, MatMulNBits blocks without:
# gptq.py, matmul_nbits.py, calibration.py).
METHODS = ("rtn", "hqq", "gptq")
# ONNX Runtime's CPU kernels (MLAS) have int8-compute paths for these block lengths.
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
# MatMulNBits accuracy_level: 4 = int8 compute on the CPU.
ACCURACY_LEVEL = 4
# The text encoder runs once per generation, the transformer once per step: so the text
# encoder's int8 weights are multiplied in float (accuracy_level 0: no int8 rounding of the
# activations). Measured on the mid-size model (docs/quantization.md): its features' error
# 3.1e-2 -> 2.1e-2, the final latents' 9.8e-3 -> 8.6e-3 (worst prompt 1.08e-2 -> 9.1e-3), for
# 0.5 s more text encoding (ONNX Runtime dequantizes 8-bit weights on every call for float
# compute). int4 weights gain nothing from it (0.374 either way): they keep
# the package's accuracy_level. The enhancer's decoder, which runs once per token, keeps that too.
INT8_TEXT_ENCODER_ACCURACY_LEVEL = 0
# Transformer layers that stay in full precision, by diffusers parameter-name pattern
# (fnmatch): the embedders (input patches, caption features, timestep) and the final layer,
# which every token's value goes through, and the adaLN modulations, which turn the timestep
# into every block's scales and gates. Together 2 % of the real model's weights, and no time:
# the modulations run on [batch, 256], not on the tokens. Measured on the mid-size model (8
# prompts, docs/quantization.md): quantizing the modulations too raises int8's final-latent
# error from 0.97e-2 to 1.10e-2.
TRANSFORMER_KEEP = ("t_embedder.*", "all_x_embedder.*", "cap_embedder.*", "all_final_layer.*",
                    # The Omni transformer's own embedder (SigLIP features -> tokens); the
                    # basic-mode graph does not have it.
                    "siglip_embedder.*")
ADALN = "*.adaLN_modulation.*"
TEXT_ENCODER_KEEP = ()
COM_MICROSOFT = "com.microsoft"


@dataclass
class QuantizeOptions:
    weights: str  # "int8" | "int4"
    block_size: int = DEFAULT_BLOCK_SIZE
    method: str = "rtn"
    quantize_embedding: bool = True
    # Quantize the transformer's adaLN modulations too (saves 2 % of the real model's weights).
    quantize_adaln: bool = False
    # More transformer weights to keep in full precision: fnmatch patterns over diffusers
    # parameter names (`--keep "layers.0.*"`), on top of the default kept set.
    keep: tuple = ()
    # MatMulNBits' accuracy_level: 4 computes in int8 on the CPU (fast); 0 lets the kernel pick
    # (the CPU then dequantizes to float: the int8 rounding of the activations is avoided).
    accuracy_level: int = ACCURACY_LEVEL
    # The text encoder's (None: INT8_TEXT_ENCODER_ACCURACY_LEVEL for int8, else accuracy_level).
    text_encoder_accuracy_level: int | None = None
    # The text encoder's weights ("int8" | "int4"; None: `weights`). An int4 transformer with an
    # int8 text encoder: the text encoder's int4 rounding makes most of an int4 package's error
    # (mid-size model, docs/quantization.md), and in sequential mode the two never share the
    # device, so the larger text encoder does not raise the peak past the transformer's stage
    # by much (the real model: "The real model's sizes").
    text_encoder_weights: str | None = None
    # Packages with the enhancer: the width of the tied token-embedding table / LM head
    # ("int8" | "int4"; None: `weights`). See quantize_lm_head.
    lm_head_weights: str | None = None
    # "int8": the transformer's products also take int8 activations (W8A8, per-token scales,
    # ONNX Runtime's MatMulIntegerToFloat; quantize_w8a8.py): much faster on CPUs with fast int8
    # kernels, less accurate than weight-only int8. "int8x2": each activation as two int8 terms
    # (one product of twice the rows): about 16-bit activations, half int8's speed-up. None:
    # weight-only.
    activations: str | None = None
    # gptq: the calibration run (calibration.CalibrationOptions; None: its defaults) and the
    # damping added to H's diagonal.
    calibration: object = None
    gptq_damping: float | None = None

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {sorted(WEIGHTS)}, not {self.weights!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size must be one of {BLOCK_SIZES}, not {self.block_size}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.method == "hqq" and self.weights != "int4":
            raise ValueError("hqq is a 4-bit method (ONNX Runtime's HQQ quantizer writes 4-bit weights only)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, not {self.accuracy_level}")
        if self.text_encoder_weights is None:
            self.text_encoder_weights = self.weights
        if self.text_encoder_weights not in WEIGHTS:
            raise ValueError(f"text_encoder_weights must be one of {sorted(WEIGHTS)}, not {self.text_encoder_weights!r}")
        if self.method == "hqq" and self.text_encoder_weights != "int4":
            raise ValueError("hqq is a 4-bit method: an int8 text encoder needs --method rtn or gptq")
        if self.text_encoder_accuracy_level is None:
            self.text_encoder_accuracy_level = (INT8_TEXT_ENCODER_ACCURACY_LEVEL if self.text_encoder_weights == "int8"
                                                else self.accuracy_level)
        if self.text_encoder_accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"text_encoder_accuracy_level must be 0..4, not {self.text_encoder_accuracy_level}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {[a for a in ACTIVATIONS if a]}, not {self.activations!r}")
        if self.activations and (self.weights, self.method) not in (("int8", "rtn"), ("int8", "gptq")):
            raise ValueError("int8 activations take int8 rtn or gptq weights (--weights int8 --method rtn|gptq)")
        if self.method == "gptq":
            from .calibration import CalibrationOptions
            from .gptq import DEFAULT_DAMPING

            if self.calibration is None:
                self.calibration = CalibrationOptions()
            if self.gptq_damping is None:
                self.gptq_damping = DEFAULT_DAMPING
            if not self.gptq_damping > 0:
                raise ValueError(f"gptq damping must be positive, not {self.gptq_damping}")
        if self.lm_head_weights is not None and self.lm_head_weights not in WEIGHTS:
            raise ValueError(f"lm_head_weights must be one of {sorted(WEIGHTS)}, not {self.lm_head_weights!r}")

    @property
    def lm_head_bits(self) -> int:
        """The tied table's width: it is also the text encoder's token embedding, so by default
        the text encoder's."""
        return WEIGHTS[self.lm_head_weights or self.text_encoder_weights]

    @property
    def weight_only_method(self) -> str:
        """The method of the graphs other than the transformer (the text encoder): gptq
        calibrates the transformer only, the rest is rounded to nearest."""
        return "rtn" if self.method == "gptq" else self.method

    @property
    def bits(self) -> int:
        return WEIGHTS[self.weights]

    def section(self) -> dict:
        """The manifest's `quantization` section, without the per-graph part."""
        import onnxruntime

        section = {
            "weights": self.weights,
            "bits": self.bits,
            "block_size": self.block_size,
            "method": self.method,
            "symmetric": False,
            "accuracy_level": self.accuracy_level,
            "text_encoder_accuracy_level": self.text_encoder_accuracy_level,
            "quantize_adaln": self.quantize_adaln,
            "keep": list(self.keep),
            "quantizer": f"onnxruntime {onnxruntime.__version__} MatMulNBitsQuantizer",
        }
        if self.text_encoder_weights != self.weights:  # (absent where they are the same, as before)
            section["text_encoder_weights"] = self.text_encoder_weights
        if self.activations:  # (absent from weight-only packages, as before it existed)
            section["activations"] = self.activations
            section["quantizer"] += " + zimage_export.quantize_w8a8 (transformer)"
        if self.method == "gptq":
            section["quantizer"] += " + zimage_export.gptq (the transformer's codes)"
        if self.method == "hqq" and self.quantize_embedding:
            section["quantizer"] += " (the token embedding to nearest: HQQ quantizes MatMuls only)"
        return section


@dataclass
class GraphReport:
    """What happened to one graph: how many weights were quantized, which were kept."""

    quantized: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    accuracy_level: int | None = ACCURACY_LEVEL  # of the graph's MatMulNBits (None: it has none)
    # "int8" / "int8x2": its products take int8 activations (quantize_w8a8.py); None: weight-only.
    activations: str | None = None
    # "gptq" where the graph's weights were rounded by GPTQ (calibration.gptq_codes), with its
    # calibration's summary; None: the package's method.
    method: str | None = None
    calibration: dict | None = None

    def section(self) -> dict:
        # (a kept weight the graph reads twice, as the Omni graph its modulations, is listed once)
        section = {"quantized": len(self.quantized), "kept": sorted(set(self.kept)), "accuracy_level": self.accuracy_level}
        if self.activations:
            section["activations"] = self.activations
        if self.method:
            section["method"] = self.method
            section["calibration"] = self.calibration
        return section


def _initializers(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def _name_nodes(graph) -> None:
    """The quantizer excludes nodes by name: give every unnamed node a unique one."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def gemm_to_matmul(model, should_rewrite) -> list[str]:
    """Rewrites `Gemm(A, W, C)` with a constant W (transA 0, alpha = beta = 1) as
    `MatMul(A, W')` (+ `Add(C)`), W' the `[K, N]` weight, for every W with `should_rewrite(W's
    name)`. Returns the rewritten weights' names. The result is the same function: Gemm only
    takes 2-D A, where MatMul is the same product."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    users = {}
    for node in graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1

    def rewritable(node) -> bool:
        return (node.op_type == "Gemm" and node.input[1] in inits and should_rewrite(node.input[1])
                and node_attribute(node, "transA", 0) == 0 and node_attribute(node, "alpha", 1.0) == 1.0
                and node_attribute(node, "beta", 1.0) == 1.0)

    # A weight is rewritten when every node reading it is such a Gemm with the same transB (the
    # Omni graph runs each adaLN modulation twice, for the noisy and the clean timestep): one
    # [K, N] copy then serves them all.
    gemm_users, trans = {}, {}
    for node in graph.node:
        if rewritable(node):
            gemm_users[node.input[1]] = gemm_users.get(node.input[1], 0) + 1
            trans.setdefault(node.input[1], set()).add(node_attribute(node, "transB", 0))
    convert = {w for w, n in gemm_users.items() if n == users[w] and len(trans[w]) == 1}
    nodes, rewritten = [], []
    for node in graph.node:
        if not (rewritable(node) and node.input[1] in convert):
            nodes.append(node)
            continue
        w_name = node.input[1] + "_kn"
        if node.input[1] not in rewritten:
            w = numpy_helper.to_array(inits[node.input[1]])
            if node_attribute(node, "transB", 0):
                w = w.T
            graph.initializer.remove(inits[node.input[1]])
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
            rewritten.append(node.input[1])
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w_name], [product], name=node.name + "_matmul"))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    return rewritten


def quantize_rows_uint8(table: np.ndarray, block_size: int):
    """Asymmetric uint8 block quantization of a 2-D table along its rows (axis 1), as
    GatherBlockQuantized reads it: value = (q - zero) * scale, one scale and zero point per
    block of `block_size` columns (the last block may be partial). Each block's range is widened
    to include 0 so that 0 is exact. Returns (q [R, C] uint8, scale [R, blocks] float32,
    zero [R, blocks] uint8)."""
    rows, cols = table.shape
    blocks = -(-cols // block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :cols] = table
    b = padded.reshape(rows, blocks, block_size)
    lo = np.minimum(b.min(axis=2), 0.0)
    hi = np.maximum(b.max(axis=2), 0.0)
    scale = (hi - lo) / 255.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, 255)
    q = np.clip(np.round(b / scale[:, :, None]) + zero[:, :, None], 0, 255).astype(np.uint8)
    return np.ascontiguousarray(q.reshape(rows, blocks * block_size)[:, :cols]), scale, zero.astype(np.uint8)


def _quantize_gather_8bit(model, node, block_size: int):
    """`Gather(table, ids)` -> `GatherBlockQuantized(..., bits=8)`: uint8, blocks of `block_size`
    along the hidden axis, a scale and a zero point per block (ONNX Runtime's quantizer writes
    4-bit tables only)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    table_proto = _initializers(graph)[node.input[0]]
    table = numpy_helper.to_array(table_proto)
    q, scale, zero = quantize_rows_uint8(table, block_size)
    name = table_proto.name
    graph.initializer.remove(table_proto)
    graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(q), name + "_Q8"),
        numpy_helper.from_array(scale.astype(table.dtype), name + "_scales"),
        numpy_helper.from_array(zero, name + "_zero_points"),
    ])
    gather_axis = node_attribute(node, "axis", 0)
    return onnx.helper.make_node(
        "GatherBlockQuantized", [name + "_Q8", node.input[1], name + "_scales", name + "_zero_points"],
        [node.output[0]], name=node.name + "_Q8", domain=COM_MICROSOFT,
        gather_axis=gather_axis, quantize_axis=1, block_size=block_size, bits=8)


def _embedding_gathers(model) -> list:
    """Gathers reading a constant 2-D float table on axis 0 (token embeddings)."""
    inits = _initializers(model.graph)
    out = []
    for node in model.graph.node:
        t = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if t is not None and len(t.dims) == 2 and t.data_type in (1, 10) and node_attribute(node, "axis", 0) == 0:
            out.append(node)
    return out


def sort_products(model, names: dict, keep, report: GraphReport) -> tuple[list, list]:
    """Prepares `model`'s products for quantization: rewrites the `Gemm`s not kept by `keep` as
    `MatMul` (gemm_to_matmul), names every node, and sorts the `MatMul`s with a constant 2-D
    weight into those to quantize and those `keep` keeps, returned as two lists of nodes. Each
    weight goes into `report` (quantized or kept; kept `Gemm`s too) under its name in `names`
    (initializer -> diffusers parameter name, or the initializer's own), which gains the
    rewritten weights (`<w>_kn`, reported under their old name)."""
    label = lambda init: names.get(init, init)  # noqa: E731
    kept_by_name = lambda init: matches_any(label(init), keep)  # noqa: E731
    for w in gemm_to_matmul(model, lambda w: not kept_by_name(w)):
        names[w + "_kn"] = label(w)
    _name_nodes(model.graph)
    inits = _initializers(model.graph)
    quantized, kept = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            if kept_by_name(node.input[1]):
                kept.append(node)
                report.kept.append(label(node.input[1]))
            else:
                quantized.append(node)
                report.quantized.append(label(node.input[1]))
        elif node.op_type == "Gemm" and node.input[1] in inits:
            report.kept.append(label(node.input[1]))
    return quantized, kept


def quantize_model(model, options: QuantizeOptions, names: dict | None = None, keep=(),
                   token_embedding: bool = False, calibrate=None) -> GraphReport:
    """Quantizes `model` (an onnx.ModelProto with its weights loaded) in place.

    `token_embedding`: the graph's constant-table Gathers are token embeddings (the text
    encoder's), quantized unless `options.quantize_embedding` is off. Other graphs' Gathers
    (the transformer's RoPE tables) are never touched.

    `names`: initializer name -> the name to report and match `keep` prefixes against (the
    diffusers parameter name); weights without one are reported by initializer name.

    `calibrate`: None, or a function (model, product nodes) -> ({weight name: (B, scales,
    zero_points)}, summary) giving calibrated codes in MatMulNBits' format with ONNX Runtime's
    own scales and zero points (GPTQ: calibration.gptq_codes with gptq_rounding(options)); they
    replace the quantizer's round-to-nearest codes."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    names = names or {}
    label = lambda init: names.get(init, init)  # noqa: E731
    report = GraphReport(accuracy_level=options.accuracy_level)
    products, kept_products = sort_products(model, names, keep, report)
    exclude = [node.name for node in kept_products]
    calibrated = _calibrated_codes(calibrate, model, products, report)

    embeddings = _embedding_gathers(model) if token_embedding else []
    if options.quantize_embedding and options.bits == 8:
        replaced = {}
        for node in embeddings:
            replaced[node.name] = _quantize_gather_8bit(model, node, options.block_size)
            report.quantized.append(label(node.input[0]))
        new_nodes = [replaced.get(n.name, n) for n in model.graph.node]
        model.graph.ClearField("node")
        model.graph.node.extend(new_nodes)
        embeddings = []
    elif options.quantize_embedding:
        report.quantized.extend(label(n.input[0]) for n in embeddings)
    else:
        report.kept.extend(label(n.input[0]) for n in embeddings)

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    if options.method == "hqq":
        if embeddings and options.quantize_embedding:
            # ONNX Runtime's HQQ quantizes MatMuls only: the token-embedding table (a Gather) is
            # rounded to nearest in a pass of its own, as the enhancer's tied table always is.
            _quantize_gathers_to_nearest(model, options)
        algo = HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=options.bits)
    else:
        op_types = ("MatMul", "Gather") if embeddings and options.quantize_embedding else ("MatMul",)
        algo = _round_to_nearest_config(options, op_types)
    quantizer = MatMulNBitsQuantizer(model, algo_config=algo, nodes_to_exclude=exclude,
                                     accuracy_level=options.accuracy_level or None)
    quantizer.process()
    if options.method == "hqq" and options.accuracy_level:  # HQQ's config has no accuracy_level
        for node in quantizer.model.model.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                import onnx

                node.attribute.append(onnx.helper.make_attribute("accuracy_level", options.accuracy_level))
    result = quantizer.model.model
    if result is not model:
        model.CopyFrom(result)
    if calibrated:
        _replace_codes(model, calibrated, options.bits)
    count = sum(1 for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized"))
    if count != len(report.quantized):
        raise RuntimeError(f"expected {len(report.quantized)} quantized nodes, the quantizer wrote {count}")
    return report


def _calibrated_codes(calibrate, model, products, report: GraphReport) -> dict:
    """`calibrate`'s codes for `products` (see quantize_model), recording its summary in
    `report`: a summary marks the graph's codes as GPTQ's; a calibration without one (a
    CodeBook's recording pass) leaves the report as the package's method says."""
    if calibrate is None or not products:
        return {}
    calibrated, summary = calibrate(model, products)
    if summary is not None:
        report.method = summary.pop("method", "gptq")
        report.calibration = summary
    return calibrated


def _round_to_nearest_config(options: QuantizeOptions, op_types: tuple):
    """ONNX Runtime's round-to-nearest configuration for `op_types` (MatMul weights blocked
    along their input axis, Gather tables along the hidden one), asymmetric."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    return DefaultWeightOnlyQuantConfig(
        block_size=options.block_size, is_symmetric=False, accuracy_level=options.accuracy_level or None,
        bits=options.bits, op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)))


def _quantize_gathers_to_nearest(model, options: QuantizeOptions) -> None:
    """Rounds `model`'s constant-table Gathers to nearest in place (GatherBlockQuantized),
    leaving every MatMul to a later pass."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, algo_config=_round_to_nearest_config(options, ("Gather",)))
    quantizer.process()
    if quantizer.model.model is not model:
        model.CopyFrom(quantizer.model.model)


def _replace_codes(model, calibrated: dict, bits: int) -> None:
    """Puts calibrated MatMulNBits codes in place of the quantizer's: `calibrated` maps each float
    weight's name to (B, scales, zero_points), written by the quantizer as `<name>_Q<bits>`,
    `<name>_scales`, `<name>_zero_points`. Its scales and zero points must be the ones the codes
    were chosen for."""
    from onnx import numpy_helper

    inits = _initializers(model.graph)
    for w, (b, scales, zero_points) in calibrated.items():
        names = (f"{w}_Q{bits}", f"{w}_scales", f"{w}_zero_points")
        if any(name not in inits for name in names):
            raise RuntimeError(f"the quantizer did not write {w!r}'s MatMulNBits weight under the expected names")
        for name, ours in zip(names[1:], (scales, zero_points)):
            written = numpy_helper.to_array(inits[name])
            if written.shape != ours.shape or not np.array_equal(written, ours):
                raise RuntimeError(f"the quantizer's {name!r} differs from the one GPTQ rounded against")
        if numpy_helper.to_array(inits[names[0]]).shape != b.shape:
            raise RuntimeError(f"{names[0]!r}: the quantizer's shape differs from GPTQ's {b.shape}")
        inits[names[0]].CopyFrom(numpy_helper.from_array(b, names[0]))


# ---------------------------------------------------------------------------------------------
# Packages

# Graphs that are quantized (and OMNI_GRAPH, below); every other file of the package is copied
# unchanged.
QUANTIZED_GRAPHS = ("transformer", "text_encoder")
# The enhancer's decoder shares the text encoder's weights file (docs/enhancer.md): it is
# quantized with it, and the two graphs keep one weights file.
SHARING_GRAPH = "text_decoder"
# An editing package's transformer in Omni mode: quantized with the transformer, to its codes.
OMNI_GRAPH = "transformer_omni"
# Initializers at least this large go to the external data file when a graph has one.
EXTERNAL_MIN_BYTES = 1024
# Page-aligned offsets let ONNX Runtime map tensors straight from the file.
ALIGNMENT = 4096


def transformer_keep(options: QuantizeOptions) -> tuple:
    """The transformer's kept-weight patterns under `options`."""
    default = TRANSFORMER_KEEP if options.quantize_adaln else (*TRANSFORMER_KEEP, ADALN)
    return (*default, *options.keep)


def quantize_transformer(model, options: QuantizeOptions, names: dict, package=None, manifest=None,
                         calibrate=None, codes: "CodeBook | None" = None,
                         always_calibrate: bool = False) -> GraphReport:
    """Quantizes a transformer graph in place as `options` say: weight-only (`quantize_model`)
    or with int8 activations too (quantize_w8a8), keeping `transformer_keep(options)`. gptq
    calibrates on the float `package` (its folder and manifest), or calls `calibrate` (see
    quantize_model and quantize_model_w8a8) where given; `always_calibrate` calls `calibrate`
    whatever the method (quantize_omni's codes). `codes`: a CodeBook to fill with the
    quantized weights (for the Omni graph)."""
    if options.method != "gptq" and not always_calibrate:
        calibrate = None
    elif calibrate is None:
        if package is None or manifest is None:
            raise ValueError("gptq needs the float package to calibrate on")
        from pathlib import Path

        from .calibration import gptq_codes

        def calibrate(model, products):
            return gptq_codes(model, products, Path(package), manifest, options.calibration, options.gptq_damping,
                              rounding=gptq_rounding(options))

    if codes is not None:
        calibrate = codes.recording(calibrate)
    if options.activations:
        from .quantize_w8a8 import quantize_model_w8a8

        report = quantize_model_w8a8(model, names, transformer_keep(options), options.activations, calibrate)
    else:
        report = quantize_model(model, options, names, transformer_keep(options), calibrate=calibrate)
    if codes is not None:
        codes.collect(model)
    return report


class CodeBook:
    """The transformer's quantized weights by the float weight each was made from, so that the
    Omni transformer (transformer_omni.onnx: the same model's weights in another graph) is
    quantized to the same bytes, GPTQ's calibrated codes included, and the two graphs share them
    (shared_weights.py). `recording(calibrate)` wraps the transformer's calibration to note its
    products' float weights; `collect(model)` notes where the quantized graph put their codes;
    `read_from(path)` names the saved graph to read them from (mapped, not copied: the real
    model's int8 codes are 6.6 GB); `lookup` is the Omni graph's calibration: the codes of
    every product whose float weight the transformer quantized (the Omni-only ones are rounded
    to nearest)."""

    def __init__(self, options: QuantizeOptions):
        self.options = options
        self._pending = {}  # the transformer's weight name -> its float weight's key
        self._names_by_key = {}  # float weight's key -> the initializers holding its codes
        self._graph = None

    @staticmethod
    def _key(t) -> tuple:
        import hashlib

        return hashlib.sha256(tensor_bytes(t)).hexdigest(), t.data_type, tuple(t.dims)

    def _names(self, w: str) -> tuple:
        """The quantized graph's initializers holding weight `w`'s codes (calibrate's format)."""
        if self.options.activations:  # quantize_w8a8: (int8 codes, column scales)
            return f"{w}_W8", f"{w}_scale"
        return f"{w}_Q{self.options.bits}", f"{w}_scales", f"{w}_zero_points"

    def recording(self, calibrate):
        def record(model, products):
            inits = _initializers(model.graph)
            for node in products:
                self._pending[node.input[1]] = self._key(inits[node.input[1]])
            return calibrate(model, products) if calibrate is not None else ({}, None)

        return record

    def collect(self, model) -> None:
        inits = _initializers(model.graph)
        for w, key in self._pending.items():
            names = self._names(w)
            if any(n not in inits for n in names):
                raise RuntimeError(f"the quantized transformer has no {names[0]!r} for weight {w!r}")
            self._names_by_key[key] = names
        self._pending.clear()

    def read_from(self, graph) -> None:
        """The quantized transformer as saved (save_graphs), whose codes `lookup` reads."""
        self._graph = graph

    def lookup(self, model, products) -> tuple[dict, dict | None]:
        from .shared_weights import read_initializers

        inits = _initializers(model.graph)
        wanted = {}
        for node in products:
            names = self._names_by_key.get(self._key(inits[node.input[1]]))
            if names is not None:
                wanted[node.input[1]] = names
        arrays = read_initializers(self._graph, {n for names in wanted.values() for n in names})
        found = {w: tuple(arrays[n] for n in names) for w, names in wanted.items()}
        # The report says where the codes came from where they are not rounded to nearest.
        summary = {"method": "gptq", "codes_from": "transformer", "weights": len(found)} \
            if self.options.method == "gptq" else None
        return found, summary


def quantize_omni(model, options: QuantizeOptions, names: dict, codes: CodeBook) -> GraphReport:
    """Quantizes the Omni transformer (an onnx.ModelProto with its weights loaded) in place as
    the transformer was (`quantize_transformer` with the same options and kept layers, whose
    patterns also keep the Omni-only `siglip_embedder`), its shared weights to the transformer's
    own codes (`codes`, filled while quantizing the transformer). `names`: its initializers'
    diffusers names (the manifest's `edit.omni_parameters`)."""
    if options.method == "hqq":
        # HQQ's codes come from ONNX Runtime's quantizer with float zero points, which
        # CodeBook does not read back: an Omni graph quantized by its own HQQ run would hold
        # other bytes than the transformer, and the two graphs could not share them.
        raise ValueError("--method hqq does not quantize editing (Omni) packages: use rtn or gptq")
    return quantize_transformer(model, options, names, calibrate=codes.lookup, always_calibrate=True)


def gptq_rounding(options: QuantizeOptions):
    """GPTQ's rounding (for calibration.gptq_codes) in the transformer's format under `options`:
    per-channel int8 with int8 activations, else MatMulNBits blocks of the package's width."""
    from .calibration import per_channel_int8
    from .matmul_nbits import gptq_matmul_nbits

    if options.activations:
        return per_channel_int8

    def matmul_nbits(w, h, damping):
        return gptq_matmul_nbits(w, h, options.bits, options.block_size, damping)

    return matmul_nbits


def matches_any(name: str, patterns) -> bool:
    """Whether a parameter name matches one of the kept-weight patterns (fnmatch, case-sensitive)."""
    return any(fnmatchcase(name, p) for p in patterns)


def check_keep_patterns(patterns, parameter_names) -> None:
    """A `--keep` pattern that names no weight is a typo, not a request: refuse it before
    anything is written."""
    parameter_names = list(parameter_names)
    for pattern in patterns:
        if not any(matches_any(name, (pattern,)) for name in parameter_names):
            raise ValueError(f"--keep {pattern!r} matches no transformer weight (diffusers parameter names, "
                             f"such as {parameter_names[0]!r})")


def transformer_names(manifest: dict) -> dict:
    """Transformer initializer name -> diffusers parameter name, from the LoRA table."""
    table = manifest.get("transformer", {}).get("lora_parameters")
    if not table:
        raise ValueError("the package's manifest has no transformer.lora_parameters (exported before LoRA support): "
                         "the transformer's layers cannot be named, so the kept ones cannot be found; re-export it")
    return {entry["initializer"]: name for name, entry in table.items()}


def tensor_bytes(t) -> bytes:
    """A tensor's bytes, from a protobuf that holds them (raw or typed fields)."""
    from onnx import numpy_helper

    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def save_graphs(models: dict, out_dir, data_file: str | None) -> None:
    """Writes `models` (graph name -> ModelProto with its weights loaded) as `<name>.onnx` in
    `out_dir`. With `data_file`, every initializer of at least EXTERNAL_MIN_BYTES goes to that
    one file, written once per name even when several graphs read it (the enhancer's sharing),
    and once per content (tensors of different names with the same bytes share one place); the
    same name with different bytes in two graphs is an error."""
    from pathlib import Path

    import onnx
    from onnx import TensorProto

    out_dir = Path(out_dir)
    if data_file is None:
        for name, model in models.items():
            onnx.save(model, out_dir / f"{name}.onnx")
        return
    import hashlib

    places, digests, by_content = {}, {}, {}
    with open(out_dir / data_file, "wb") as f:
        for model in models.values():
            for t in model.graph.initializer:
                data = tensor_bytes(t)
                if len(data) < EXTERNAL_MIN_BYTES:
                    continue
                digest = hashlib.sha256(data).digest()
                if t.name in places:
                    if digests[t.name] != digest:
                        raise ValueError(f"two graphs hold different tensors named {t.name}: they cannot share {data_file}")
                elif digest in by_content:
                    # The same bytes under another name (the quantized tied embedding, read as
                    # MatMulNBits and as GatherBlockQuantized weights): stored once.
                    places[t.name] = by_content[digest]
                    digests[t.name] = digest
                else:
                    offset = f.tell()
                    pad = (-offset) % ALIGNMENT
                    f.write(b"\0" * pad)
                    places[t.name] = (offset + pad, len(data))
                    digests[t.name] = digest
                    by_content[digest] = places[t.name]
                    f.write(data)
                offset, length = places[t.name]
                t.ClearField("raw_data")
                for field_name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                    t.ClearField(field_name)
                t.data_location = TensorProto.EXTERNAL
                del t.external_data[:]
                for key, value in (("location", data_file), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
    for name, model in models.items():
        onnx.save(model, out_dir / f"{name}.onnx")


def quantize_package(src, out, options: QuantizeOptions, external_data_threshold: int | None = None) -> dict:
    """Writes a quantized copy of package `src` to `out` (which may be `src`: then it is
    rewritten in place). Returns the new manifest (also written to `out/manifest.json`)."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    import onnx

    from .manifest import file_entry, graph_entry, graph_files
    from .onnx_io import DEFAULT_EXTERNAL_DATA_THRESHOLD

    threshold = DEFAULT_EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    src, out = Path(src).resolve(), Path(out).resolve()
    manifest = json.loads((src / "manifest.json").read_text())
    if manifest.get("quantization"):
        weights = manifest["quantization"].get("weights") if isinstance(manifest["quantization"], dict) else None
        raise ValueError(f"{src} is already quantized ({weights or 'its manifest has a quantization section'})")
    missing = [g for g in QUANTIZED_GRAPHS if g not in (manifest.get("graphs") or {})]
    if missing:
        raise ValueError(f"{src} has no {' or '.join(missing)} graph: this quantizes Z-Image packages (a standalone "
                         "prompt enhancer package is not one)")
    if manifest.get("precision") not in ("fp32", "fp16"):
        raise ValueError(f"only fp32 and fp16 packages can be quantized, not {manifest.get('precision')}")
    if options.activations and manifest["precision"] != "fp32":
        # Its activations are quantized from float32 (a CPU format: the CPU computes in fp32).
        raise ValueError(f"int8 activations are made from fp32 packages (the CPU's), not {manifest['precision']}")
    if manifest.get("controlnets"):
        # Their graphs read the float transformer's weights at fixed offsets (docs/controlnet.md).
        raise ValueError(f"{src} has ControlNets, which run on float packages only: quantize a copy without them")
    graphs = manifest["graphs"]
    enhanced = SHARING_GRAPH in graphs
    omni = OMNI_GRAPH in graphs
    rewritten = {g: graphs[g] for g in (*QUANTIZED_GRAPHS, *((SHARING_GRAPH,) if enhanced else ()),
                                        *((OMNI_GRAPH,) if omni else ()))}

    names = transformer_names(manifest)
    omni_names = omni_parameter_names(manifest) if omni else {}
    if omni and options.method == "hqq":
        raise ValueError("--method hqq does not quantize editing (Omni) packages: use rtn or gptq "
                         "(the Omni transformer must be quantized to the transformer's own codes)")
    check_keep_patterns(options.keep, [*names.values(), *omni_names.values()])
    # The Omni graph reads the transformer's weights from transformer.onnx (shared_weights.py):
    # both are quantized here (loading it reads those bytes), and it reads the quantized ones
    # again afterwards.
    shared = bool((manifest.get("edit") or {}).get("transformer_weights"))

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None, prefix=".quantize-") as tmp:
        tmp = Path(tmp)
        report = {}
        # Transformer alone.
        model = onnx.load(str(src / graphs["transformer"]["path"]))
        codes = CodeBook(options) if omni else None
        rep = quantize_transformer(model, options, names, src, manifest, codes=codes)
        report["transformer"] = rep.section()
        if not report["transformer"]["quantized"]:
            # The manifest would call a float transformer quantized (and the runtime refuse
            # it on a GPU, and LoRAs, for that).
            raise ValueError("the --keep patterns keep every transformer weight in float: nothing is left to quantize")
        _save_graph(model, "transformer", tmp, threshold)
        del model
        if codes is not None:
            codes.read_from(tmp / "transformer.onnx")
        if omni:  # to the transformer's codes, weight for weight
            model = onnx.load(str(src / graphs[OMNI_GRAPH]["path"]))
            report[OMNI_GRAPH] = quantize_omni(model, options, omni_names, codes).section()
            _save_graph(model, OMNI_GRAPH, tmp, threshold)
            del model, codes
        # Text encoder (+ the enhancer decoder sharing its weights, its layers quantized the same
        # way; the token-embedding table, which is also the decoder's tied LM head, is quantized
        # once for both by quantize_lm_head: see there).
        # The two share weight bytes whatever their accuracy levels: it is a node attribute.
        encoder_options = QuantizeOptions(options.text_encoder_weights, options.block_size, options.weight_only_method,
                                          quantize_embedding=options.quantize_embedding and not enhanced,
                                          accuracy_level=options.text_encoder_accuracy_level)
        decoder_options = replace(encoder_options, accuracy_level=options.accuracy_level)

        text_models = {"text_encoder": onnx.load(str(src / graphs["text_encoder"]["path"]))}
        rep = quantize_model(text_models["text_encoder"], encoder_options, token_embedding=True)
        report["text_encoder"] = rep.section()
        lm_head = None
        if enhanced:
            text_models[SHARING_GRAPH] = onnx.load(str(src / graphs[SHARING_GRAPH]["path"]))
            rep_dec = quantize_model(text_models[SHARING_GRAPH], decoder_options, token_embedding=False)
            lm_head = quantize_tied_embedding(text_models["text_encoder"], text_models[SHARING_GRAPH],
                                              options.lm_head_bits, options.block_size, options.accuracy_level,
                                              options.quantize_embedding)
            # The head is quantized; the table is no longer kept in float where the lookups
            # read the quantized one (with --keep-embedding they still read the float table).
            rep_dec.quantized.append(lm_head["tensor"])
            if options.quantize_embedding:
                rep.kept.remove(TIED_TABLE)
                rep_dec.kept.remove(TIED_TABLE)
                rep.quantized.append(TIED_TABLE)
                rep_dec.quantized.append(TIED_TABLE)
            report["text_encoder"] = rep.section()
            report[SHARING_GRAPH] = rep_dec.section()
            data_file = graphs["text_encoder"]["external_data"]["path"]
        else:
            big = sum(len(tensor_bytes(t)) for t in text_models["text_encoder"].graph.initializer) > threshold
            data_file = "text_encoder.onnx.data" if big else None
        save_graphs(text_models, tmp, data_file)
        del text_models

        # Everything else is copied (skipped when rewriting in place).
        out.mkdir(parents=True, exist_ok=True)
        # (with their CPU layouts: a prepacked float transformer's layout does not fit the new one)
        old = {e["path"] for g in rewritten.values() for e in graph_files(g)}
        if out != src:
            keep = {manifest["tokenizer"]["path"]}
            for name, g in graphs.items():
                if name not in rewritten:
                    keep |= {e["path"] for e in graph_files(g)}
            for rel in sorted(keep):
                shutil.copyfile(src / rel, out / rel)
        for rel in old:
            (out / rel).unlink(missing_ok=True)
        for f in tmp.iterdir():
            shutil.move(str(f), out / f.name)

    for name in rewritten:
        entry = graph_entry(out, name)
        if enhanced and name in (SHARING_GRAPH, "text_encoder"):
            entry["external_data"] = file_entry(out / data_file)
        graphs[name] = entry
    manifest["quantization"] = {**options.section(), "graphs": report}
    if lm_head is not None:
        manifest["quantization"]["lm_head"] = lm_head
    # The LoRA table points at float weights that are now quantized: LoRAs cannot be merged into
    # MatMulNBits weights by adding deltas, so a quantized package carries no table (the SDK
    # refuses LoRAs on it with ErrorKind::Unsupported).
    manifest["transformer"].pop("lora_parameters", None)
    if omni:
        # (its names, too, were the float weights'; the sharing is written again below)
        manifest["edit"].pop("omni_parameters", None)
        manifest["edit"].pop("transformer_weights", None)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    if shared:
        # A package that was shared stays so. export.py's own packages are shared by its last
        # step, after the rewrites of transformer.onnx that follow quantization.
        from .shared_weights import share_omni_weights

        share_omni_weights(out)
        manifest = json.loads((out / "manifest.json").read_text())
    return manifest


def _save_graph(model, name: str, out_dir, threshold: int) -> None:
    """Saves one graph as save_graphs does, its weights in `<name>.onnx.data` past `threshold`."""
    big = sum(len(tensor_bytes(t)) for t in model.graph.initializer) > threshold
    save_graphs({name: model}, out_dir, f"{name}.onnx.data" if big else None)


def omni_parameter_names(manifest: dict) -> dict:
    """Omni transformer initializer name -> diffusers parameter name (`edit.omni_parameters`)."""
    table = (manifest.get("edit") or {}).get("omni_parameters")
    if not table:
        raise ValueError("the package's manifest has no edit.omni_parameters (exported before editing packages "
                         "could be quantized): the Omni transformer's layers cannot be named, so its kept ones "
                         "cannot be found; re-export it")
    return {entry["initializer"]: name for name, entry in table.items()}
