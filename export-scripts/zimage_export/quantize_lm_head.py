"""The enhancer's tied LM head in a quantized package (docs/quantization.md, "The enhancer").

The enhancer's decoder computes its logits with the token-embedding table itself
(`Gemm(h, embed_tokens.weight, transB=1)`: Qwen3's tied head), and the text encoder and the
decoder look tokens up in the same table (`Gather`). Left float, that table is most of a
quantized package's text weights (mid-size model: 594 of 663 MiB), and a float `Gemm` over it
is packed into a private copy as soon as the session prepacks, which a `MatMulNBits` graph
must do to be fast at one token per call.

So the table is quantized ONCE, block-wise along the hidden dimension, in the byte layout of
`MatMulNBits` weights ([vocab, blocks, block bytes], one scale and zero point per block):

- the LM head becomes `MatMulNBits(h, lm_head.weight_Q<b>, scales, zero_points)` (N = vocab,
  K = hidden): the tied table is the `[K, N]` weight E^T, quantized along K;
- every token-embedding `Gather` of the text encoder and the decoder becomes
  `GatherBlockQuantized` reading the same bytes as a `[vocab, hidden bytes]` table (bits 4:
  two values a byte, low nibble first, which is `MatMulNBits`' packing; its dequantized rows are
  exactly the LM head's, checked in ONNX Runtime 1.31.1);
- `save_graphs` stores tensors with identical bytes once, so the package holds the quantized
  table once (the `MatMulNBits` and the `GatherBlockQuantized` views have different shapes,
  hence different names, and point at the same offset of `text_weights.data`).

With `--keep-embedding` the Gathers keep reading the float table (shared by both graphs) and
only the LM head reads the quantized copy.

The table is always quantized with ONNX Runtime's round-to-nearest kernel (asymmetric, uint8
zero points), whatever `--method` says: `GatherBlockQuantized` reads uint8 zero points, and
HQQ's are float.
"""

import numpy as np

from .onnx_io import node_attribute

COM_MICROSOFT = "com.microsoft"
TABLE = "embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def _inits(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def quantize_table(table: np.ndarray, bits: int, block_size: int):
    """The `[vocab, hidden]` table quantized as the `MatMulNBits` weight E^T ([K = hidden,
    N = vocab]) by ONNX Runtime's round-to-nearest kernel: (packed [vocab, blocks, block_size *
    bits / 8] uint8, scales [vocab, blocks], zero points [vocab, ceil(blocks * bits / 8)] uint8)."""
    from .matmul_nbits import block_quantize  # (imported here: matmul_nbits imports quantize, which imports us)

    return block_quantize(table.T, bits, block_size)


def dequantize_table(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, block_size: int,
                     hidden: int) -> np.ndarray:
    """The float rows `quantize_table`'s output stands for (numpy; for checks)."""
    from .matmul_nbits import unpack  # (imported here, as in quantize_table)

    vocab, blocks, _ = packed.shape
    q = unpack(packed, bits).reshape(vocab, blocks, block_size)
    z = unpack(zero_points, bits).reshape(vocab, -1)[:, :blocks]
    rows = (q.astype(np.float32) - z[:, :, None].astype(np.float32)) * scales[:, :, None].astype(np.float32)
    return rows.reshape(vocab, blocks * block_size)[:, :hidden]


def _find_lm_head(decoder):
    """The decoder's `Gemm(h, embed_tokens.weight, transB=1)` (graph_builder.build_decoder)."""
    heads = [n for n in decoder.graph.node if n.op_type == "Gemm" and len(n.input) >= 2 and n.input[1] == TABLE]
    if len(heads) != 1 or node_attribute(heads[0], "transB", 0) != 1 or len(heads[0].input) > 2:
        raise ValueError(f"the enhancer decoder has no tied LM head Gemm(h, {TABLE}, transB=1) "
                         f"(found {len(heads)}): it was not written by export_enhancer.py")
    return heads[0]


def _gathers(model):
    return [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == TABLE and node_attribute(n, "axis", 0) == 0]


def _replace_nodes(model, replacements: dict) -> None:
    """Replaces nodes by name with lists of nodes, keeping the graph's order."""
    nodes = []
    for n in model.graph.node:
        nodes.extend(replacements.get(n.name, [n]))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)


def quantize_tied_embedding(encoder, decoder, bits: int, block_size: int, accuracy_level: int,
                            quantize_gathers: bool) -> dict:
    """Rewrites the decoder's tied LM head as `MatMulNBits` over the quantized table and, with
    `quantize_gathers`, every token-embedding `Gather` of both graphs as `GatherBlockQuantized`
    over the same bytes (the float table then leaves both graphs). `encoder` and `decoder` are
    ModelProtos with their weights loaded. Returns the manifest's `quantization.lm_head`."""
    import onnx
    from onnx import numpy_helper

    head = _find_lm_head(decoder)
    if not head.name:
        head.name = "lm_head"
    table_proto = _inits(decoder.graph)[TABLE]
    table = numpy_helper.to_array(table_proto)
    vocab, hidden = table.shape
    packed, scales, zero_points = quantize_table(table, bits, block_size)
    blocks = packed.shape[1]
    # Our reading of the layout (nibble order, zero-point packing) against the float table:
    # round to nearest is within half a step everywhere.
    back = dequantize_table(packed, scales, zero_points, bits, block_size, hidden)
    half_step = np.repeat(scales.astype(np.float32), block_size, axis=1)[:, :hidden] / 2
    if not np.all(np.abs(back - table.astype(np.float32)) <= half_step * 1.001 + 1e-7):
        raise AssertionError("the quantized embedding table does not read back within half a step")
    names = {"weight": f"{LM_HEAD}_Q{bits}", "scales": f"{TABLE}_scales", "zero_points": f"{TABLE}_zero_points",
             "rows": f"{TABLE}_Q{bits}"}

    # The LM head: logits [B, V] = h [B, K] x E^T, E^T quantized along K.
    matmul = onnx.helper.make_node(
        "MatMulNBits", [head.input[0], names["weight"], names["scales"], names["zero_points"]], list(head.output),
        name=head.name or "lm_head", domain=COM_MICROSOFT, K=hidden, N=vocab, bits=bits, block_size=block_size,
        **({"accuracy_level": accuracy_level} if accuracy_level else {}))
    decoder.graph.initializer.extend([
        numpy_helper.from_array(packed, names["weight"]),
        numpy_helper.from_array(scales, names["scales"]),
        numpy_helper.from_array(zero_points, names["zero_points"]),
    ])
    _replace_nodes(decoder, {head.name: [matmul]})

    gathers = 0
    if quantize_gathers:
        rows = numpy_helper.from_array(np.ascontiguousarray(packed.reshape(vocab, -1)), names["rows"])
        padded = blocks * block_size != hidden
        for model in (encoder, decoder):
            replacements = {}
            for node in _gathers(model):
                out = node.output[0]
                gathered = out + "_padded" if padded else out
                new = [onnx.helper.make_node(
                    "GatherBlockQuantized", [names["rows"], node.input[1], names["scales"], names["zero_points"]],
                    [gathered], name=node.name + "_quantized", domain=COM_MICROSOFT,
                    bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)]
                if padded:  # the last block is padded with zeros: cut the rows back to `hidden`
                    consts = [(node.name + "_start", [0]), (node.name + "_end", [hidden]), (node.name + "_axis", [-1])]
                    for name, value in consts:
                        model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name))
                    new.append(onnx.helper.make_node("Slice", [gathered, *(c for c, _ in consts)], [out],
                                                     name=node.name + "_unpad"))
                replacements[node.name] = new
                gathers += 1
            if not replacements:
                raise ValueError(f"graph {model.graph.name} has no token-embedding Gather of {TABLE}")
            _replace_nodes(model, replacements)
            inits = _inits(model.graph)
            for name in ("scales", "zero_points"):
                if names[name] not in inits:
                    model.graph.initializer.append(numpy_helper.from_array(
                        scales if name == "scales" else zero_points, names[name]))
            model.graph.initializer.append(rows)
            if TABLE in inits:
                model.graph.initializer.remove(inits[TABLE])
        for model in (encoder, decoder):
            _ensure_opset(model)
    else:
        _ensure_opset(decoder)
    return {
        "tensor": names["weight"],
        "tied_to": TABLE,
        "bits": bits,
        "block_size": block_size,
        "method": "rtn",
        "embedding": "quantized" if quantize_gathers else "float",
        "embedding_tensor": names["rows"] if quantize_gathers else TABLE,
        "gathers_quantized": gathers,
    }


def _ensure_opset(model) -> None:
    import onnx

    if not any(o.domain == COM_MICROSOFT for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(COM_MICROSOFT, 1))
