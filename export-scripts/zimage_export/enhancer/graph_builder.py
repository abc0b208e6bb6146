"""Writing Qwen3 graphs directly with onnx.helper (standard opset-18 ops only).

Why not torch.onnx.export: the exporter names and folds weights as it likes (tiny models get
pre-transposed copies called `val_20`, big ones a Transpose node that ONNX Runtime folds into a
second copy at load). Sharing one weights file between the text encoder and the decoder needs
both graphs to read the *same* tensors in the *same* layout, so both are written here:
- every linear weight is stored once as `<hf name>_t` = W^T ([in, out]) and used by MatMul as is;
- the tied LM head is `Gemm(h, embed_tokens.weight, transB=1)`, reading the embedding table in
  place (no transposed copy).
Numerics follow transformers' Qwen3 (float32): RMSNorm x * 1/sqrt(mean(x^2) + eps) * w, q/k
head norms, rotate-half RoPE from the model's own inv_freq, grouped-query attention, SiLU MLP.
"""

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .names import LINEARS, NORMS, linear_weight, norm_weight, past_names, present_names

OPSET = 18
MASK_MIN = float(np.finfo(np.float32).min)  # what transformers adds for hidden keys


@dataclass(frozen=True)
class Qwen3Shape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float

    @staticmethod
    def from_config(cfg) -> "Qwen3Shape":
        for layer_type in getattr(cfg, "layer_types", None) or []:
            if layer_type != "full_attention":
                raise ValueError(f"unsupported attention layer type {layer_type!r} (sliding window is not exported)")
        if not getattr(cfg, "tie_word_embeddings", False):
            raise ValueError("the checkpoint's LM head is not tied to the embeddings; only tied Qwen3 models are supported")
        if getattr(cfg, "rope_scaling", None) not in (None, {}) and (cfg.rope_scaling or {}).get("rope_type", "default") != "default":
            raise ValueError(f"rope scaling {cfg.rope_scaling} is not supported")
        return Qwen3Shape(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            rms_norm_eps=cfg.rms_norm_eps,
        )


def weights_from_model(model) -> dict[str, np.ndarray]:
    """float32 arrays under the graph names, from a transformers Qwen3ForCausalLM."""
    import torch

    base = model.model
    out = {
        "embed_tokens.weight": base.embed_tokens.weight,
        "rotary_emb.inv_freq": base.rotary_emb.inv_freq,
        "norm.weight": base.norm.weight,
    }
    for i, layer in enumerate(base.layers):
        modules = dict(layer.named_modules())
        for n in LINEARS:
            if getattr(modules[n], "bias", None) is not None:
                raise ValueError(f"layers.{i}.{n} has a bias; Qwen3 has none")
            out[linear_weight(i, n)] = modules[n].weight.t()
        for n in NORMS:
            out[norm_weight(i, n)] = modules[n].weight
    with torch.no_grad():
        return {k: np.ascontiguousarray(v.detach().to(torch.float32).cpu().numpy()) for k, v in out.items()}


class _Graph:
    """Collects nodes with unique names; `op` returns the output name(s)."""

    def __init__(self):
        self.nodes, self.consts, self.count = [], [], 0

    def op(self, op_type, *inputs, outputs=1, **attrs):
        self.count += 1
        names = [f"{op_type.lower()}_{self.count}" + (f"_{k}" if outputs > 1 else "") for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"n{self.count}_{op_type}", **attrs))
        return names[0] if outputs == 1 else names

    def const(self, name, values, dtype=np.int64):
        arr = np.asarray(values, dtype=dtype)
        self.consts.append(onnx.numpy_helper.from_array(arr, name))
        return name


def _rms_norm(g: _Graph, x: str, weight: str, eps: str) -> str:
    var = g.op("ReduceMean", g.op("Mul", x, x), "axis_last", keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, eps)))
    return g.op("Mul", g.op("Mul", x, inv), weight)


def _rope(g: _Graph, x: str, cos: str, sin: str, half: int) -> str:
    """x * cos + rotate_half(x) * sin on [B, heads, S, hd]; cos/sin are [B, 1, S, hd]."""
    x1 = g.op("Slice", x, "zero", "half", "axis_last")
    x2 = g.op("Slice", x, "half", "int_max", "axis_last")
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def _layer(g, s: Qwen3Shape, i: int, x, cos, sin, mask_bias, past_k=None, past_v=None):
    """One decoder layer. Returns (x, k_all, v_all) with k/v [B, kv_heads, T, hd]."""
    h = _rms_norm(g, x, norm_weight(i, "input_layernorm"), "eps")

    def heads(proj, n, norm):
        y = g.op("Reshape", g.op("MatMul", h, linear_weight(i, f"self_attn.{proj}")), f"shape_bs_{n}_hd")
        if norm:
            y = _rms_norm(g, y, norm_weight(i, f"self_attn.{norm}"), "eps")
        return g.op("Transpose", y, perm=[0, 2, 1, 3])  # [B, n, S, hd]

    q = _rope(g, heads("q_proj", s.num_heads, "q_norm"), cos, sin, s.head_dim // 2)
    k = _rope(g, heads("k_proj", s.num_kv_heads, "k_norm"), cos, sin, s.head_dim // 2)
    v = heads("v_proj", s.num_kv_heads, None)
    if past_k is not None:
        k = g.op("Concat", past_k, k, axis=2)
        v = g.op("Concat", past_v, v, axis=2)
    # Grouped-query attention without copying the cache: q [B, kv, rep, S, hd] against
    # k/v [B, kv, 1, T, hd]; query head j uses kv head j // rep, as transformers' repeat_kv.
    q5 = g.op("Reshape", q, "shape_q5")
    k5 = g.op("Unsqueeze", k, "axis_2")
    v5 = g.op("Unsqueeze", v, "axis_2")
    scores = g.op("Mul", g.op("MatMul", q5, g.op("Transpose", k5, perm=[0, 1, 2, 4, 3])), "scale")
    probs = g.op("Softmax", g.op("Add", scores, mask_bias), axis=-1)
    ctx = g.op("Reshape", g.op("MatMul", probs, v5), "shape_b_h_s_hd")  # [B, H, S, hd]
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), "shape_bs_flat")
    x = g.op("Add", x, g.op("MatMul", ctx, linear_weight(i, "self_attn.o_proj")))
    h2 = _rms_norm(g, x, norm_weight(i, "post_attention_layernorm"), "eps")
    gate = g.op("MatMul", h2, linear_weight(i, "mlp.gate_proj"))
    up = g.op("MatMul", h2, linear_weight(i, "mlp.up_proj"))
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    x = g.op("Add", x, g.op("MatMul", act, linear_weight(i, "mlp.down_proj")))
    return x, k, v


def _common(g: _Graph, s: Qwen3Shape, ids: str, positions: str):
    """Embeddings, shape constants and RoPE tables shared by both graphs.
    `positions` is int64 [B, S]."""
    g.const("axis_last", [-1])
    g.const("axis_1", [1])
    g.const("axis_2", [2])
    g.const("zero", [0])
    g.const("half", [s.head_dim // 2])
    g.const("int_max", [np.iinfo(np.int64).max])
    g.const("eps", s.rms_norm_eps, np.float32)
    g.const("scale", s.head_dim**-0.5, np.float32)
    g.const("mask_min", MASK_MIN, np.float32)
    g.const("fzero", 0.0, np.float32)
    bs = g.op("Slice", g.op("Shape", ids), "zero", g.const("two", [2]))  # [B, S]
    b = g.op("Slice", bs, "zero", "axis_1")
    rep = s.num_heads // s.num_kv_heads
    g.nodes.append(helper.make_node("Concat", [bs, g.const("c_h_hd", [s.num_heads, s.head_dim])], ["shape_bs_%d_hd" % s.num_heads], axis=0))
    if s.num_kv_heads != s.num_heads:
        g.nodes.append(helper.make_node("Concat", [bs, g.const("c_kv_hd", [s.num_kv_heads, s.head_dim])], ["shape_bs_%d_hd" % s.num_kv_heads], axis=0))
    g.nodes.append(helper.make_node("Concat", [b, g.const("c_q5", [s.num_kv_heads, rep, -1, s.head_dim])], ["shape_q5"], axis=0))
    g.nodes.append(helper.make_node("Concat", [b, g.const("c_bhsd", [s.num_heads, -1, s.head_dim])], ["shape_b_h_s_hd"], axis=0))
    g.nodes.append(helper.make_node("Concat", [bs, g.const("c_flat", [s.num_heads * s.head_dim])], ["shape_bs_flat"], axis=0))
    x = g.op("Gather", "embed_tokens.weight", ids, axis=0)
    # transformers: freqs = inv_freq x position (float32), emb = cat(freqs, freqs), cos/sin.
    pos = g.op("Unsqueeze", g.op("Cast", positions, to=TensorProto.FLOAT), "axis_last")  # [B, S, 1]
    freqs = g.op("Mul", pos, "rotary_emb.inv_freq")  # [B, S, hd/2]
    emb = g.op("Concat", freqs, freqs, axis=-1)
    cos = g.op("Unsqueeze", g.op("Cos", emb), "axis_1")  # [B, 1, S, hd]
    sin = g.op("Unsqueeze", g.op("Sin", emb), "axis_1")
    return x, cos, sin


def _mask_bias(g: _Graph, allowed: str) -> str:
    """[B, 1, 1, S, T] additive bias (0 = visible, float32 min = hidden) for the 5-d scores."""
    return g.op("Where", g.op("Unsqueeze", allowed, "axis_1"), "fzero", "mask_min")


def _weights_info(names, weights):
    return [helper.make_tensor(n, TensorProto.FLOAT, weights[n].shape, vals=[]) for n in names]


def build_encoder(s: Qwen3Shape) -> onnx.ModelProto:
    """input_ids, attention_mask [B, S] int64 -> hidden_states [B, S, D] = transformers'
    hidden_states[-2] (output of layer n-2; the last layer and the final norm are not used)."""
    g = _Graph()
    x, cos, sin = None, None, None
    seq = None
    # positions 0..S-1 for every row, as the Z-Image text encoder is called (right padding).
    g.const("zero_s", 0, np.int64)
    g.const("one_s", 1, np.int64)
    shape = g.op("Shape", "input_ids")
    seq = g.op("Squeeze", g.op("Slice", shape, "axis_1", g.const("two_1", [2])), "zero")
    idx = g.op("Range", "zero_s", seq, "one_s")  # [S]
    positions = g.op("Expand", g.op("Unsqueeze", idx, "zero"), g.op("Slice", shape, "zero", "two_1"))
    x, cos, sin = _common(g, s, "input_ids", positions)
    causal = g.op("LessOrEqual", g.op("Unsqueeze", idx, "zero"), g.op("Unsqueeze", idx, "axis_1"))  # [S, S]: key <= query
    keys = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.const("axes_12", [1, 2]))  # [B,1,1,T]
    allowed = g.op("And", g.op("Unsqueeze", causal, g.const("axes_01", [0, 1])), keys)  # [B, 1, S, T]
    bias = _mask_bias(g, allowed)
    for i in range(s.num_layers - 1):
        x, _, _ = _layer(g, s, i, x, cos, sin, bias)
    g.nodes.append(helper.make_node("Identity", [x], ["hidden_states"]))
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", "sequence", s.hidden_size])]
    return _model(g, "zimage_text_encoder", inputs, outputs)


def build_decoder(s: Qwen3Shape) -> onnx.ModelProto:
    """Causal LM step with a KV cache.
    Inputs: input_ids [B, S], attention_mask [B, P+S] (1 = real, over cache and new tokens),
    position_ids [B, S], past_key_values.{i}.key/value [B, kv_heads, P, hd] (P may be 0).
    Outputs: logits [B, V] for the LAST input position only (all generation needs; a full
    [B, S, V] would be 300 MB for a 512-token prompt), present.{i}.key/value [B, kv, P+S, hd]."""
    g = _Graph()
    x, cos, sin = _common(g, s, "input_ids", "position_ids")
    past = g.op("Slice", g.op("Shape", past_names(0)[0]), "axis_2", g.const("three", [3]))  # [1]: P
    seq = g.op("Slice", g.op("Shape", "input_ids"), "axis_1", "axis_2")  # [1]: S
    total = g.op("Add", past, seq)
    g.const("zero_s", 0, np.int64)
    g.const("one_s", 1, np.int64)
    q_abs = g.op("Range", g.op("Squeeze", past, "zero"), g.op("Squeeze", total, "zero"), "one_s")  # [S]
    k_idx = g.op("Range", "zero_s", g.op("Squeeze", total, "zero"), "one_s")  # [T]
    causal = g.op("LessOrEqual", g.op("Unsqueeze", k_idx, "zero"), g.op("Unsqueeze", q_abs, "axis_1"))  # [S, T]
    keys = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.const("axes_12", [1, 2]))
    allowed = g.op("And", g.op("Unsqueeze", causal, g.const("axes_01", [0, 1])), keys)  # [B, 1, S, T]
    bias = _mask_bias(g, allowed)
    presents = []
    for i in range(s.num_layers):
        x, k, v = _layer(g, s, i, x, cos, sin, bias, *past_names(i))
        present_k, present_v = present_names(i)
        g.nodes.append(helper.make_node("Identity", [k], [present_k]))
        g.nodes.append(helper.make_node("Identity", [v], [present_v]))
        presents += [present_k, present_v]
    x = _rms_norm(g, x, "norm.weight", "eps")
    last = g.op("Gather", x, g.op("Sub", g.op("Squeeze", seq, "zero"), "one_s"), axis=1)  # [B, D]
    g.nodes.append(helper.make_node("Gemm", [last, "embed_tokens.weight"], ["logits"], transB=1))
    kv = lambda n, p: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", s.num_kv_heads, p, s.head_dim])  # noqa: E731
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
    ]
    for i in range(s.num_layers):
        inputs += [kv(name, "past_sequence") for name in past_names(i)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", s.vocab_size])]
    outputs += [kv(n, "total_sequence") for n in presents]
    return _model(g, "zimage_text_decoder", inputs, outputs)


def _model(g: _Graph, name, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="zimage export_enhancer")
    model.ir_version = 9
    return model
