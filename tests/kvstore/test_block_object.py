from __future__ import annotations

import pytest

from kvstore.block_object import HEADER_ALIGN, decode_block, encode_block, encoded_size


def _obj() -> bytes:
    return encode_block("llama-fp1", "bfloat16", (2, 4, 3), bytes(range(48)))


def test_roundtrip() -> None:
    data = _obj()
    assert len(data) == encoded_size("llama-fp1", "bfloat16", (2, 4, 3), 48)
    assert (len(data) - 48) % HEADER_ALIGN == 0
    obj = decode_block(data, expected_fingerprint="llama-fp1")
    assert obj is not None
    assert obj.fingerprint == "llama-fp1"
    assert obj.dtype == "bfloat16"
    assert obj.shape == (2, 4, 3)
    assert bytes(obj.payload) == bytes(range(48))
    assert decode_block(memoryview(bytearray(data))) is not None


def test_empty_payload_and_scalar_shape() -> None:
    obj = decode_block(encode_block("f", "float32", (), b""))
    assert obj is not None and obj.shape == () and bytes(obj.payload) == b""


@pytest.mark.parametrize("pos", [0, 4, 20, -1, -48])
def test_any_flipped_byte_is_rejected(pos: int) -> None:
    data = bytearray(_obj())
    data[pos] ^= 0x01
    assert decode_block(bytes(data)) is None


def test_length_and_fingerprint_mismatch() -> None:
    data = _obj()
    assert decode_block(data[:-1]) is None
    assert decode_block(data + b"\x00") is None
    assert decode_block(b"") is None
    assert decode_block(b"\x00" * 8) is None
    assert decode_block(data, expected_fingerprint="other") is None
    assert decode_block(data, expected_fingerprint="llama-fp1") is not None
