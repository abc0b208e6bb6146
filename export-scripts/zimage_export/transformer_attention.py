"""The transformer's attention computed in query chunks (opt-in; docs/loading.md, "The
transformer's attention").

The exporter writes each transformer block's attention as one opset-23 `Attention` node
(queries, keys and values `[B, H, S, D]`, a boolean mask `[B, 1, S, S]` where captions are
batched). ONNX Runtime's CPU kernel computes every head's whole score matrix before the
softmax: B x H x S x S floats, S the image tokens plus the padded caption, and the mask as
floats besides. For the real model (30 heads) that is 1.9 GiB at 1024x1024, 9.6 GiB at
1536x1536 and 30 GiB at 2048x2048, per image in the batch.

The softmax is per query row, so the rows can go through the same kernel in chunks: `chunks`
`Attention` nodes, each with a slice of the queries (and of the mask's rows) against all keys
and values, their outputs concatenated. Each row's arithmetic is the one it had; the outputs
were the same bit for bit on every graph measured, and the rewrite is checked in ONNX Runtime
against the original before it replaces it. The queries (and mask rows) are padded with zero
rows to a multiple of `chunks`, so that every chunk has rows whatever S is (at least 33: one
image token and a 32-token caption); the padding's outputs are sliced off. With 16 chunks one
sixteenth of the scores is alive at a time.

Only the CPU was measured (docs/loading.md): on a GPU the chunks are 16 kernel sequences instead
of one, and neither CUDA's speed nor TensorRT's handling of the rewritten graph has been
checked, so export.py applies it only when asked (`--chunked-attention N`); `python -m
zimage_export.transformer_attention --package P` rewrites a package's transformer graphs in place (rebuilding the prepacked CPU
layout when the package has one).

Needs onnx, onnxruntime and numpy (no torch).
"""

import argparse
import json
from pathlib import Path

from .graph_rewrite import rewrite_graphs
from .manifest import write_manifest
from .onnx_io import node_attribute

# Graphs holding the transformer blocks' attention.
TRANSFORMER_GRAPHS = ("transformer", "transformer_omni")
DEFAULT_CHUNKS = 16
PREFIX = "chunked_attention_"


def _is_attention(node) -> bool:
    return node.op_type == "Attention" and node.domain in ("", "ai.onnx")


def _check_chunkable(node) -> None:
    """Only the form the exporter writes: 4-D inputs (no head-count attributes), no causal mask,
    no past keys or values, one output."""
    if any(node.input[4:]):
        raise ValueError(f"{node.name}: past keys or values: not the exporter's attention")
    if len([o for o in node.output if o]) != 1:
        raise ValueError(f"{node.name}: more than one output: not the exporter's attention")
    if node_attribute(node, "is_causal", 0):
        raise ValueError(f"{node.name}: causal attention cannot be cut into query chunks this way")
    if node_attribute(node, "q_num_heads", 0) or node_attribute(node, "kv_num_heads", 0):
        raise ValueError(f"{node.name}: 3-D inputs: not the exporter's attention")


def chunk_model(model, chunks: int = DEFAULT_CHUNKS) -> int:
    """Rewrites every `Attention` node of `model` into `chunks` query chunks, in place; returns
    how many. A node of another form than the exporter's is refused (ValueError), and so is a
    model that was already rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    if chunks < 2:
        raise ValueError(f"chunks must be at least 2 (got {chunks})")
    graph = model.graph
    if any(i.name.startswith(PREFIX) for i in graph.initializer):
        raise ValueError("the attention is already in query chunks")
    attention = [n for n in graph.node if _is_attention(n)]
    for node in attention:
        _check_chunkable(node)
    if not attention:
        return 0
    c = PREFIX
    graph.initializer.extend([
        numpy_helper.from_array(np.array([0], np.int64), c + "zero"),
        numpy_helper.from_array(np.array([2], np.int64), c + "axis"),
        numpy_helper.from_array(np.array([chunks], np.int64), c + "chunks"),
        numpy_helper.from_array(np.array([chunks - 1], np.int64), c + "chunks_less_one"),
    ])
    nodes = []
    for index, node in enumerate(graph.node):
        if not _is_attention(node):
            nodes.append(node)
            continue
        p = f"{c}{index}_"
        q, k, v = node.input[0], node.input[1], node.input[2]
        mask = node.input[3] if len(node.input) > 3 and node.input[3] else None
        zero = c + "zero"
        nodes += [
            # S, the rows per chunk ceil(S / chunks), and the padding to chunks x that.
            helper.make_node("Shape", [q], [p + "rows"], name=p + "rows", start=2, end=3),
            helper.make_node("Add", [p + "rows", c + "chunks_less_one"], [p + "rows_up"], name=p + "rows_up"),
            helper.make_node("Div", [p + "rows_up", c + "chunks"], [p + "chunk_rows"], name=p + "chunk_rows"),
            helper.make_node("Mul", [p + "chunk_rows", c + "chunks"], [p + "padded_rows"], name=p + "padded_rows"),
            helper.make_node("Sub", [p + "padded_rows", p + "rows"], [p + "padding"], name=p + "padding"),
            # Pads of a 4-D tensor: nothing before any axis, `padding` after axis 2.
            helper.make_node("Concat", [zero] * 6 + [p + "padding", zero], [p + "pads"], name=p + "pads", axis=0),
            helper.make_node("Pad", [q, p + "pads"], [p + "q"], name=p + "pad_q"),
        ]
        queries = [f"{p}q{i}" for i in range(chunks)]
        nodes.append(helper.make_node("Split", [p + "q"], queries, name=p + "split_q", axis=2, num_outputs=chunks))
        if mask:
            masks = [f"{p}mask{i}" for i in range(chunks)]
            nodes += [
                helper.make_node("Pad", [mask, p + "pads"], [p + "mask"], name=p + "pad_mask"),
                helper.make_node("Split", [p + "mask"], masks, name=p + "split_mask", axis=2, num_outputs=chunks),
            ]
        outputs = [f"{p}out{i}" for i in range(chunks)]
        for i in range(chunks):
            part = helper.make_node("Attention", [queries[i], k, v] + ([masks[i]] if mask else []), [outputs[i]],
                                    name=f"{p}attention{i}")
            part.attribute.extend(node.attribute)
            nodes.append(part)
        nodes += [
            helper.make_node("Concat", outputs, [p + "out"], name=p + "concat", axis=2),
            helper.make_node("Slice", [p + "out", zero, p + "rows", c + "axis"], [node.output[0]], name=p + "unpad"),
        ]
    graph.ClearField("node")
    graph.node.extend(nodes)
    return len(attention)


def stage_chunked(path: Path, feeds: dict, chunks: int = DEFAULT_CHUNKS) -> tuple[Path | None, int]:
    """Writes the rewrite of graph file `path` beside it (its external data stays shared) and
    checks it against the original in ONNX Runtime on `feeds`; returns (the staged file, or None
    when the graph has no attention, and the count). The caller replaces or removes the file."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    count = chunk_model(model, chunks)
    if count == 0:
        return None, 0
    staged = path.with_name(f".{path.name}.chunked.tmp.onnx")
    onnx.save(model, str(staged))
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        run = lambda file: ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"]).run(None, feeds)
        for want, got in zip(run(path), run(staged)):
            if want.shape != got.shape or not np.allclose(want, got, rtol=1e-5, atol=1e-6, equal_nan=True):
                raise RuntimeError(f"{path.name}: the chunked attention's outputs differ from the original's")
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged, count


def chunk_package(package: Path, chunks: int = DEFAULT_CHUNKS) -> dict:
    """Rewrites the transformer graphs of an existing package in place, updates their manifest
    entries and rebuilds a prepacked CPU layout made from the old graph; manifest.json is written
    last. Graphs that are links into another package are left to that package's rewrite (run it
    first). A package with ControlNets, or whose Omni transformer reads transformer.onnx's weights,
    is refused (ValueError), untouched. Returns the manifest."""
    from . import prepacked

    package = Path(package)
    manifest = json.loads((package / "manifest.json").read_text())
    if manifest.get("controlnets"):
        # A ControlNet graph reads the transformer's weights at fixed offsets of its files (of
        # transformer.onnx itself when the weights are inline) and records the transformer's
        # sha256; its own control blocks would keep one node. Not handled: refused whole.
        raise ValueError(f"{package}: the package carries ControlNets ({', '.join(manifest['controlnets'])}), which "
                         "read transformer.onnx at fixed offsets: rewrite the package without them, then add them "
                         "again with export_controlnet.py")
    if (manifest.get("edit") or {}).get("transformer_weights"):
        raise ValueError(f"{package}: its Omni transformer reads transformer.onnx's weights at fixed offsets (an "
                         "editing package): chunk at export instead (export.py --chunked-attention)")

    def stage(name, path):
        import onnx

        feeds = prepacked._sample_inputs(onnx.load(str(path), load_external_data=False))
        file, count = stage_chunked(path, feeds, chunks)
        return file, f"{count} attention(s) in {chunks} query chunks"

    for name in rewrite_graphs(package, manifest, TRANSFORMER_GRAPHS, stage):
        entry = manifest["graphs"][name]
        if entry.get("cpu_prepacked"):  # made from the old graph: made again from the new one
            prepacked.remove(package, manifest, name)
            entry["cpu_prepacked"] = prepacked.prebuild(package, manifest, name, None)
    write_manifest(package, manifest)
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="rewrite this package's transformer graphs in place")
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="query chunks per attention (default 16)")
    args = parser.parse_args(argv)
    chunk_package(args.package, args.chunks)


if __name__ == "__main__":
    main()
