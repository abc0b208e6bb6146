"""The prepacked layout writer's pure parts (no ONNX Runtime): reading ONNX Runtime's records of
packed copies, the data file's alignment and de-duplication, the architecture names the
runtime compares."""

import hashlib
from types import SimpleNamespace

import pytest

from zimage_export import prepacked
from zimage_export.prepacked import BIG_ALIGNMENT, BIG_BYTES, SMALL_ALIGNMENT, _DataFile, prepacked_entries


def tensor(*entries):
    return SimpleNamespace(external_data=[SimpleNamespace(key=k, value=v) for k, v in entries])


def test_packed_copies_are_read_from_onnx_runtimes_external_data_records():
    # As ONNX Runtime 1.31.1 writes them: "prepacked_<i>" -> "Op+hash|offset;length;checksum[|...]".
    t = tensor(("location", "t.onnx.data"), ("offset", "0"), ("length", "16"),
               ("prepacked_0", "MatMul+1234|64;32;0"), ("prepacked_1", "Gemm+99|128;8;0|192;4;0"))
    assert prepacked_entries(t) == [("prepacked_0", "MatMul+1234", [(64, 32, "0")]),
                                    ("prepacked_1", "Gemm+99", [(128, 8, "0"), (192, 4, "0")])]
    assert prepacked_entries(tensor(("location", "t.onnx.data"), ("offset", "0"), ("length", "16"))) == []
    model = SimpleNamespace(graph=SimpleNamespace(initializer=[t, t]))
    assert prepacked.prepacked_ops(model) == {"Gemm": 2, "MatMul": 2}


def test_the_data_file_aligns_what_it_appends_and_stores_each_content_once(tmp_path):
    path = tmp_path / "g.onnx.data"
    path.write_bytes(b"x" * 1000)  # the portable graph's tensors, kept where they are
    kept = hashlib.sha256(b"k" * 10).digest()
    data = _DataFile(path, {kept: 10})
    small, big = b"s" * 100, b"b" * BIG_BYTES
    a = data.add(small)
    b = data.add(big)
    assert a % SMALL_ALIGNMENT == 0 and a >= 1000
    assert b % BIG_ALIGNMENT == 0 and b >= a + len(small)
    assert data.add(small) == a, "the same bytes twice are stored once"
    assert data.add(b"k" * 10) == 10, "a tensor the portable graph already has is pointed at"
    added = data.added()
    data.close()
    content = path.read_bytes()
    assert len(content) == 1000 + added
    assert content[:1000] == b"x" * 1000, "the portable graph's bytes are untouched"
    assert content[a:a + len(small)] == small and content[b:b + len(big)] == big


@pytest.mark.parametrize("machine, rust", [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("aarch64", "aarch64"),
                                           ("arm64", "aarch64"), ("riscv64", "riscv64")])
def test_the_architecture_is_named_as_rust_names_it(monkeypatch, machine, rust):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert prepacked.machine_arch() == rust
