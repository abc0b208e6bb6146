"""Makes a deeper benchmark package from an exported one: the transformer's last main block is
repeated until it has `--layers` main blocks, every repeat with initializers of its own that read
the same bytes of the weights file as the block they repeat. ONNX Runtime loads each initializer
into its own device buffer, so the deep package has the real model's weight memory, bandwidth and
kernel count while its files stay the size of the shallow one: the real-size (2 + 2 + 30 blocks,
6.15 B parameters) random-weight package from the real-width 2 + 2 + 2 export, which this CPU
machine can export and the device tool can carry (as a `weights_skeleton.py` skeleton). For
timing and memory only: the repeated blocks compute with one block's weights.

    python3 scripts/gpu/deepen.py PKG OUT --layers 30

How the block is found (the exporter keeps no module names on nodes): nodes are in export order,
and the main blocks are the two runs of nodes, one after the other, that read `layers.{n-2}.*`
and `layers.{n-1}.*` parameters; the runs must match node for node (same operators), which
gives the block's input (the earlier block's output) and output by position. Anything else
aborts: the tool never writes a graph it could not match.
"""

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import onnx


def block_params(manifest: dict, graph: onnx.GraphProto, layer: int) -> set[str]:
    """Initializer names of main block `layer`: by name, and via the manifest's LoRA table for
    weights the exporter renamed (transposed copies named val_*)."""
    prefix = f"layers.{layer}."
    names = {t.name for t in graph.initializer if t.name.startswith(prefix)}
    table = manifest["transformer"].get("lora_parameters", {})
    names |= {entry["initializer"] for key, entry in table.items() if key.startswith(prefix)}
    return names


def span(graph: onnx.GraphProto, params: set[str]) -> tuple[int, int]:
    """First and last index of nodes that read one of `params` directly."""
    hits = [i for i, n in enumerate(graph.node) if params & set(n.input)]
    if not hits:
        sys.exit(f"no node reads {sorted(params)[:3]}...")
    return hits[0], hits[-1]


def deepen(model: onnx.ModelProto, manifest: dict, layers: int) -> onnx.ModelProto:
    graph = model.graph
    count = max(int(t.name.split(".")[1]) for t in graph.initializer if t.name.startswith("layers.")) + 1
    if count < 2 or layers <= count:
        sys.exit(f"the graph has {count} main blocks; --layers must be more (and the graph at least 2)")
    prev_p, last_p = block_params(manifest, graph, count - 2), block_params(manifest, graph, count - 1)
    (_, a1), (b0, b1) = span(graph, prev_p), span(graph, last_p)
    if not a1 < b0:
        sys.exit("the last two main blocks' nodes interleave: not deepening")
    # The last block is the run of nodes after the previous block's output up to its own
    # output, each output `t` nodes after the block's last parameter read (the gated residual
    # add). The right `t`: the previous block's output is read inside the run, and after the
    # run nothing but the block's output is read from it.
    nodes = list(graph.node)
    for t in range(0, 16):
        if b1 + t >= len(nodes) or nodes[a1 + t].op_type != nodes[b1 + t].op_type:
            continue
        run = nodes[a1 + t + 1:b1 + t + 1]
        block_input, block_output = nodes[a1 + t].output[0], nodes[b1 + t].output[0]
        produced = {o for n in run for o in n.output}
        read_after = {i for n in nodes[b1 + t + 1:] for i in n.input if i in produced}
        if block_input in {i for n in run for i in n.input} and read_after == {block_output}:
            break
    else:
        sys.exit("could not delimit the last main block: not deepening")
    last_run, after = run, nodes[b1 + t + 1:]
    if block_output in {o.name for o in graph.output}:
        sys.exit("the block's output is a graph output: not supported")
    params = {t.name: t for t in graph.initializer}
    copies, new_inits, output = [], [], block_output
    for c in range(layers - count):
        suffix = f"__r{c}"
        rename = {o: o + suffix for n in last_run for o in n.output}
        for name in last_p:
            clone = onnx.TensorProto()
            clone.CopyFrom(params[name])
            clone.name = name + suffix
            new_inits.append(clone)
            rename[name] = clone.name
        for n in last_run:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.name = n.name + suffix
            m.ClearField("input")
            m.input.extend(output if i == block_input else rename.get(i, i) for i in n.input)
            m.ClearField("output")
            m.output.extend(rename[o] for o in n.output)
            copies.append(m)
        output = rename[block_output]
    for n in after:
        for k, i in enumerate(n.input):
            if i == block_output:
                n.input[k] = output
    nodes = nodes[:b1 + t + 1] + copies + after
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, required=True)
    args = ap.parse_args(argv)
    manifest = json.loads((args.package / "manifest.json").read_text())
    entry = manifest["graphs"]["transformer"]
    model = onnx.load(args.package / entry["path"], load_external_data=False)
    model = deepen(model, manifest, args.layers)
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.package, args.out)
    data = model.SerializeToString()
    (args.out / entry["path"]).write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    entry["bytes"] = len(data)
    # The LoRA table names one block's weights; a deepened package is for benchmarks only.
    manifest["transformer"]["lora_parameters"] = {}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    blocks = sum(1 for n in model.graph.node if n.op_type == "MatMul")
    print(f"{args.out}: transformer with {args.layers} main blocks ({blocks} MatMul nodes)")


if __name__ == "__main__":
    main()
