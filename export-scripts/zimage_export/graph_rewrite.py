"""Rewriting some graphs of an existing package in place, all or none: every rewrite is staged
and checked before any graph is replaced (vae_attention.py, transformer_attention.py)."""

import os
from pathlib import Path

from .manifest import file_entry


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
