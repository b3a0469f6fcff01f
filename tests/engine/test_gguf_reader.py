"""Our GGUF reader against the gguf package's own: the same fields and tensors, on a file gguf's
writer made with every value type, and on the shipped SmolLM2 file."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.errors import UnsupportedModel
from engine.gguf_reader import GGUFReader
from tests.helpers.tiny_models import smollm2_gguf_path


def same_as_gguf(path: Path) -> GGUFReader:
    """Our reading of `path`, asserted equal to gguf's: every field's contents (gguf's own
    GGUF.* header entries aside), every tensor's name, type, shape and bytes."""
    theirs = gguf.GGUFReader(path)
    ours = GGUFReader(path)
    want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == want
    assert [type(v) for v in ours.fields.values()] == [type(v) for v in want.values()]
    assert len(ours.tensors) == len(theirs.tensors)
    for o, t in zip(ours.tensors, theirs.tensors, strict=True):
        assert (o.name, o.tensor_type, o.shape) == (t.name, t.tensor_type,
                                                    tuple(int(d) for d in t.shape))
        assert o.data.dtype == t.data.dtype and o.data.shape == t.data.shape
        assert np.array_equal(o.data.view(np.uint8), np.asarray(t.data).view(np.uint8))
    return ours


def test_every_value_type_and_tensor_kind(tmp_path: Path) -> None:
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "café 日本")
    w.add_array("t.strs", ["a", "", "ü" * 40])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.empty", [])
    rng = np.random.default_rng(3)
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 5)).astype(np.float16))
    q8 = rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8)  # 4 rows of 64 weights
    w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = same_as_gguf(path)
    assert ours.fields["t.f32"] == pytest.approx(0.1, rel=1e-6)
    assert ours.fields["t.strs"] == ["a", "", "ü" * 40]
    q = ours.tensors[2]
    assert (q.tensor_type, q.shape, q.data.shape) == (gguf.GGMLQuantizationType.Q8_0, (64, 4),
                                                      (4, 68))
    assert np.array_equal(q.data, q8)


@pytest.mark.slow  # gguf's own reader takes seconds over SmolLM2's 98k tokenizer strings
def test_the_shipped_smollm2_file() -> None:
    ours = same_as_gguf(smollm2_gguf_path())
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152
    assert len(ours.tensors) == 272


def test_not_a_gguf_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(UnsupportedModel, match="not a GGUF file"):
        GGUFReader(path)


def test_an_unsupported_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(UnsupportedModel, match="GGUF version 1"):
        GGUFReader(path)


def test_a_truncated_header_names_where(tmp_path: Path) -> None:
    whole = tmp_path / "whole.gguf"
    w = gguf.GGUFWriter(whole, "llama")
    w.add_array("t.strs", ["abc"] * 10)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-20])
    with pytest.raises(UnsupportedModel, match="truncated GGUF"):
        GGUFReader(cut)
