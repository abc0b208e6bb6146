"""The VAE's self-attention as one ONNX Runtime `MultiHeadAttention` node (com.microsoft).

Why: the exporter writes diffusers' `scaled_dot_product_attention` as MatMul-Softmax-MatMul,
which stores the whole [B, heads, S, S] score matrix. The VAE's mid-block attention (decoder and
encoder) runs at latent resolution, S = (H/8)(W/8) tokens, so its scores alone take 64 MiB at
512x512, 1 GiB at 1024x1024, 5.1 GiB at 1536x1536 and 16 GiB at 2048x2048, whatever the VAE's
width. ONNX Runtime's `MultiHeadAttention` computes the same attention without storing them: on
the CPU it runs MLAS's flash attention (query and key tiles sized to the L2 cache), on CUDA its
memory-efficient (cutlass) or unfused kernels. One float32 attention of the real VAE's shape
(one head of 512 channels, 2 threads, ONNX Runtime 1.31.1): 16384 tokens (1024x1024) 3.77 s and
+1120 MiB as MatMul-Softmax-MatMul, 2.30 s and +137 MiB (its inputs and output) as
`MultiHeadAttention`; 4096 tokens (512x512) 0.26 s -> 0.13 s.

The rewrite works on the exported graph, so it applies to packages exported before it too
(`python -m zimage_export.vae_attention --package P`). It finds, around each Softmax:

    q4 = Transpose[0,2,1,3](Reshape(q, [B, S, heads, D]))      (q, k, v: [B, S, heads * D])
    k4 = ...Reshape/Transpose chain...(Reshape(k, the same shape))
    v4 = Transpose[0,2,1,3](Reshape(v, the same shape))
    out = Reshape(Transpose[0,2,1,3](MatMul(Softmax(MatMul(q4 * c, k4 * c)), v4)), [B, S, C])

and writes `out = MultiHeadAttention(q, k, v, num_heads=heads, scale=c * c)` in its place
(scale 1 without the two Muls: the scale is always written, as the kernel's default would be
1/sqrt(D)). Nodes left unused are removed. Every rewritten graph is run against the original in ONNX Runtime on a probe input
before it replaces it. Only float32 attention is rewritten: ONNX Runtime's CPU kernel is float32
only (the VAE is float32 in every package this exporter writes).

Needs onnx, onnxruntime and numpy (no torch).
"""

import argparse
from pathlib import Path

from .graph_rewrite import Graph, replace_nodes, rewrite_file, rewrite_vae_package, stage_rewritten
from .onnx_io import node_attribute

COM_MICROSOFT = "com.microsoft"
# Rewritten and original graph agree to float rounding (the flash kernel sums in another order).
RTOL = 1e-4


def _is_transpose(g, name, perm):
    node = g.op(name, "Transpose")
    return node if node is not None and list(node_attribute(node, "perm", [])) == perm else None


def _split_heads(g, name):
    """`name` = Transpose[0,2,1,3](Reshape(x, shape)): returns (x, shape tensor name) or None."""
    transpose = _is_transpose(g, name, [0, 2, 1, 3])
    reshape = transpose and g.op(transpose.input[0], "Reshape")
    return (reshape.input[0], reshape.input[1]) if reshape else None


def _strip_scale(g, name):
    """(input, scale) for `name` = Mul(input, scalar constant) in either order, else (name, None)."""
    node = g.op(name, "Mul")
    if node is not None:
        for i, j in ((0, 1), (1, 0)):
            value = g.constant(node.input[j])
            if value is not None and value.size == 1:
                return node.input[i], float(value.reshape(()))
    return name, None


def _key_source(g, name, shape):
    """Follows Reshape/Transpose nodes up from the transposed key to the Reshape that split the
    key's heads with the query's `shape`; returns that Reshape's input."""
    for _ in range(16):
        node = g.producer.get(name)
        if node is None or node.op_type not in ("Reshape", "Transpose"):
            return None
        if node.op_type == "Reshape" and node.input[1] == shape:
            return node.input[0]
        name = node.input[0]
    return None


def _heads(g, shape):
    """The heads count of a [B, S, heads, D] reshape target: a constant, or a Concat whose third
    part is one."""
    value = g.constant(shape)
    if value is not None and value.size == 4:
        return int(value[2])
    concat = g.op(shape, "Concat")
    if concat is not None and len(concat.input) == 4:
        part = g.constant(concat.input[2])
        if part is not None and part.size == 1:
            return int(part.reshape(()))
    return None


def _float32(g, name):
    """Whether tensor `name` is float32, judged by the scale constants or the weights that make it."""
    from onnx import TensorProto

    node = g.producer.get(name)
    for _ in range(4):
        if node is None:
            return False
        types = [g.constants[i].data_type for i in node.input if i in g.constants and g.constants[i].data_type
                 in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)]
        if types:
            return types[0] == TensorProto.FLOAT
        node = g.producer.get(node.input[0])
    return False


def match(g, softmax):
    """The rewrite of one Softmax's attention: (the Reshape whose output it replaces, q, k, v,
    heads, scale), or None when the Softmax is not one."""
    if node_attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    scores = g.op(softmax.input[0], "MatMul")
    weighted = g.sole_consumer(softmax.output[0], "MatMul")
    if scores is None or weighted is None or weighted.input[0] != softmax.output[0]:
        return None
    q_scaled, qc = _strip_scale(g, scores.input[0])
    k_scaled, kc = _strip_scale(g, scores.input[1])
    if (qc is None) != (kc is None):
        return None
    query = _split_heads(g, q_scaled)
    value = _split_heads(g, weighted.input[1])
    if query is None or value is None or value[1] != query[1]:
        return None
    key = _key_source(g, k_scaled, query[1])
    merge = g.sole_consumer(weighted.output[0], "Transpose")
    if key is None or merge is None or list(node_attribute(merge, "perm", [])) != [0, 2, 1, 3]:
        return None
    out = g.sole_consumer(merge.output[0], "Reshape")
    heads = _heads(g, query[1])
    if out is None or heads is None or heads < 1 or not _float32(g, query[0]):
        return None
    return out, query[0], key, value[0], heads, (qc * kc if qc is not None else 1.0)


def fuse_model(model) -> int:
    """Rewrites every matching attention of `model` (an onnx ModelProto, changed in place) and
    removes the nodes left unused. Returns how many were rewritten."""
    from onnx import helper

    g = Graph(model.graph)
    rewrites = {}
    for node in list(model.graph.node):
        if node.op_type == "Softmax":
            found = match(g, node)
            if found is not None:
                out, q, k, v, heads, scale = found
                rewrites[id(out)] = helper.make_node(
                    "MultiHeadAttention", [q, k, v], [out.output[0]], domain=COM_MICROSOFT,
                    name=f"{out.name or out.output[0]}_attention", num_heads=heads, scale=scale)
    if not rewrites:
        return 0
    # In the Reshape's place: q, k and v are made before the scores, so the order stays valid.
    replace_nodes(model, {key: [node] for key, node in rewrites.items()})
    if not any(o.domain == COM_MICROSOFT for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(COM_MICROSOFT, 1))
    return len(rewrites)


def stage_fused(path: Path, inputs: dict) -> tuple[Path | None, int]:
    """Writes the rewrite of graph file `path` beside it and checks it against the original on
    `inputs` (graph_rewrite.stage_rewritten). Returns (the staged file, how many attentions were
    rewritten), or (None, 0) when there is none to rewrite. Raises RuntimeError, leaving nothing
    behind, when the check fails or a Softmax is not an attention it knows."""
    path = Path(path)

    def rewrite(model):
        softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
        fused = fuse_model(model)
        if fused not in (0, softmaxes):
            raise RuntimeError(f"{path.name}: {softmaxes - fused} of its {softmaxes} Softmax nodes are not an "
                               "attention this rewrite knows; nothing was changed")
        return fused

    return stage_rewritten(path, inputs, rewrite, RTOL, "attention")


def fuse_file(path: Path, inputs: dict) -> int:
    """Rewrites the graph file `path` in place (`stage_fused`, then the staged file replaces it).
    Returns how many attentions were rewritten; the file is left untouched when none was, or
    when the check fails (RuntimeError)."""
    return rewrite_file(stage_fused, path, inputs)


def fuse_package(package: Path) -> dict:
    """Rewrites the VAE graphs of an existing package (graph_rewrite.rewrite_vae_package).
    Returns the manifest."""
    return rewrite_vae_package(package, stage_fused, lambda fused: f"{fused} attention(s) rewritten as MultiHeadAttention")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="rewrite this package's VAE graphs in place")
    args = parser.parse_args(argv)
    fuse_package(args.package)


if __name__ == "__main__":
    main()
