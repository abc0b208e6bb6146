"""Tensor names of the enhancer's Qwen3 graphs, in plain Python: the weights both graphs read
from text_weights.data, and the decoder's KV-cache inputs and outputs, which the SDK feeds and
reads by name (docs/enhancer.md)."""

# A decoder layer's linear maps and norms, by their path in transformers' Qwen3DecoderLayer.
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")


def linear_weight(layer: int, linear: str) -> str:
    """Layer `layer`'s linear map `linear` (one of LINEARS), stored once as W^T ([in, out]) so
    that MatMul reads it as it is."""
    return f"layers.{layer}.{linear}.weight_t"


def norm_weight(layer: int, norm: str) -> str:
    """Layer `layer`'s RMSNorm scale `norm` (one of NORMS)."""
    return f"layers.{layer}.{norm}.weight"


def past_names(layer: int) -> tuple[str, str]:
    """The decoder's key and value cache inputs of layer `layer`."""
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """The decoder's key and value cache outputs of layer `layer` (past and new positions)."""
    return f"present.{layer}.key", f"present.{layer}.value"
