"""Locating the transformer's Linear weights among a graph's initializers (lora_targets.py)."""

import numpy as np

from zimage_export.lora_targets import match_parameters


def test_weights_are_found_as_stored_and_transposed():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 3)).astype(np.float32)
    mod = rng.standard_normal((8, 3)).astype(np.float32)
    inits = [("val_7", np.ascontiguousarray(q.T), "float32"), ("mod.weight", mod, "float32"),
             ("bias_like", rng.standard_normal((1, 3)).astype(np.float32), "float32")]
    table, missing = match_parameters([("a.to_q.weight", q), ("a.adaLN.weight", mod)], inits)
    assert table == {
        "a.adaLN.weight": {"initializer": "mod.weight", "layout": "out_in", "dtype": "float32"},
        "a.to_q.weight": {"initializer": "val_7", "layout": "in_out", "dtype": "float32"},
    }
    assert missing == []


def test_weights_that_cannot_be_told_apart_are_left_out():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    changed = rng.standard_normal((2, 4)).astype(np.float32)
    # Two parameters with identical values, and one the graph holds in another form.
    table, missing = match_parameters(
        [("x.weight", w), ("y.weight", w.copy()), ("z.weight", changed)],
        [("val_1", w, "float32"), ("val_2", changed * 2, "float32")],
    )
    assert table == {}
    assert missing == ["x.weight", "y.weight", "z.weight"]
    # A symmetric matrix matches as stored and transposed under one name: still found once.
    s = w + w.T
    table, missing = match_parameters([("s.weight", s)], [("val_3", s, "float32")])
    assert list(table) == ["s.weight"] and missing == []
