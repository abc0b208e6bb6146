"""Rewriting some graphs of an existing package in place, all or none: every rewrite is staged
and checked before any graph is replaced (vae_attention.py, vae_group_norm.py,
transformer_attention.py)."""

import json
import os
import shutil
import tempfile
from pathlib import Path

from .manifest import file_entry, write_manifest

# The graphs of a package that hold a VAE (its group norms and mid-block attention).
VAE_GRAPHS = ("vae_decoder", "vae_decoder_cpu", "vae_decoder_int8", "vae_encoder")


class Graph:
    """Producer and consumers of each tensor of an onnx GraphProto, and its constants."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.constants = {t.name: t for t in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.constants[n.output[0]] = n.attribute[0].t
        self.to_array = numpy_helper.to_array

    def op(self, name, op_type):
        """The node of type `op_type` producing `name`, or None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def sole_consumer(self, name, op_type):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def constant(self, name):
        """The value of a constant tensor, or None. Reads only embedded data: a scale or a shape
        is never in a graph's external data file."""
        tensor = self.constants.get(name)
        if tensor is None or tensor.data_location == 1:  # TensorProto.EXTERNAL
            return None
        return self.to_array(tensor)


def replace_nodes(model, replacements: dict) -> None:
    """Puts `replacements[id(node)]` (a list of nodes) in place of each such node of `model`'s
    graph, then removes the nodes no graph output depends on any more and the initializers no
    node reads. The replacements must only read tensors made before the node they replace."""
    nodes = [new for node in model.graph.node for new in replacements.get(id(node), [node])]
    del model.graph.node[:]
    model.graph.node.extend(_live_nodes(nodes, [o.name for o in model.graph.output]))
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _live_nodes(nodes, outputs):
    """`nodes` (topologically ordered) without those no graph output depends on."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    return list(reversed(live))


def rewrite_graphs(package: Path, manifest: dict, names, stage, linked_records=lambda entry: [entry]) -> list[str]:
    """Stages the rewrite of each graph in `names` that the package has: `stage(name, path)`
    returns (the staged file beside `path`, or None when nothing changes; a line to print). If
    one fails, every staged file is removed and the error raised, with nothing replaced. Then
    each staged file replaces its graph and the graph's manifest entry is refreshed (the caller
    writes the manifest). Graphs that are links into another package are left to that
    package's rewrite: only the records `linked_records(entry)` lists are refreshed. Returns
    the names of the graphs replaced."""
    staged = []
    for name in names:
        entry = manifest["graphs"].get(name)
        if entry is None:
            continue
        path = package / entry["path"]
        if path.is_symlink():
            # A graph shared with another package through a link (the fixtures link identical
            # graphs): that package's rewrite changes it; here only the manifest follows.
            for record in linked_records(entry):
                record.update(file_entry(package / record["path"]))
            print(f"{name}: a link to {os.readlink(path)}; manifest entry refreshed", flush=True)
            continue
        try:
            file, line = stage(name, path)
        except BaseException:
            for file, _ in staged:
                file.unlink(missing_ok=True)
            raise
        print(f"{name}: {line}", flush=True)
        if file is not None:
            staged.append((file, name))
    # Every graph checked: only now is anything replaced.
    for file, name in staged:
        entry = manifest["graphs"][name]
        os.replace(file, package / entry["path"])
        entry.update(file_entry(package / entry["path"]))
    return [name for _, name in staged]


def stage_rewritten(path: Path, inputs: dict, rewrite_model, rtol: float, what: str) -> tuple[Path | None, int]:
    """Writes graph file `path` as `rewrite_model(model)` changes it (in place; it returns how
    many places it rewrote, and raises RuntimeError to refuse) beside it: a hidden temporary
    file, sharing the external data file as it is (the weights do not move). Checks it against
    the original on `inputs` (name -> array): every output within `rtol` of the original's
    largest value. Returns (the staged file, the count), or (None, 0) when nothing was
    rewritten. Raises RuntimeError, leaving nothing behind, when the check fails; `what` names
    the rewrite in that message."""
    import numpy as np
    import onnx

    from .cpu_layout import cpu_session

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    count = rewrite_model(model)
    if count == 0:
        return None, 0
    # Written beside the original so that its external data path still resolves.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".onnx", delete=False) as f:
        staged = Path(f.name)
    try:
        onnx.save(model, str(staged))
        shutil.copymode(path, staged)  # NamedTemporaryFile makes it private
        onnx.checker.check_model(str(staged))
        want = cpu_session(path).run(None, inputs)
        got = cpu_session(staged).run(None, inputs)
        for w, o in zip(want, got):
            scale = max(float(np.abs(w).max()), 1e-30)
            if w.shape != o.shape or not np.isfinite(o).all() or np.abs(w - o).max() > rtol * scale:
                raise RuntimeError(f"{path.name}: the rewritten {what}'s outputs differ from the graph's "
                                   f"(max {np.abs(w - o).max() / scale if w.shape == o.shape else 'shape'} of the "
                                   "output's largest value); nothing was changed")
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged, count


def rewrite_file(stage, path: Path, inputs: dict) -> int:
    """Rewrites graph file `path` in place: `stage(path, inputs)` (a `stage_rewritten` wrapper),
    then the staged file replaces it. Returns the count; the file is left untouched when nothing
    was rewritten or the check failed (RuntimeError)."""
    staged, count = stage(path, inputs)
    if staged is not None:
        os.replace(staged, path)
    return count


def rewrite_vae_package(package: Path, stage, describe) -> dict:
    """Rewrites the VAE graphs of an existing package with `stage(path, inputs)` (a
    `stage_rewritten` wrapper; `describe(count)` is the line printed for each graph), all or
    none; updates their manifest entries and rebuilds the prebuilt CPU layouts of the graphs
    that had one (they are made from the rewritten graphs); manifest.json is rewritten last.
    Graphs that are links into another package are left to that package's rewrite (run it
    first). Returns the manifest."""
    from .cpu_layout import add_layouts, probe_input

    package = Path(package)
    manifest = json.loads((package / "manifest.json").read_text())

    def stage_graph(name, path):
        # Not square, so that rows and columns cannot be confused.
        file, count = stage(path, probe_input(manifest, name, rows=6, cols=10))
        return file, describe(count)

    replaced = rewrite_graphs(package, manifest, VAE_GRAPHS, stage_graph,
                              linked_records=lambda entry: [r for r in (entry, entry.get("cpu_layout")) if r])
    write_manifest(package, manifest)
    relayout = [name for name in replaced if manifest["graphs"][name].get("cpu_layout")]
    if relayout:
        manifest = add_layouts(package, tuple(relayout))
    return manifest
