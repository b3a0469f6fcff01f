from __future__ import annotations

import pytest

from kvstore.block_object import (
    FORMAT_VERSION,
    HEADER_ALIGN,
    BlockLayout,
    Rejection,
    check_object,
    decode_block,
    encode_block,
    encode_object,
    encoded_size,
)

KEY = "c579f7442a0237f170cdf5d8d9de02bd"
LAYOUT = BlockLayout("llama-fp1", "bfloat16", (2, 4, 3))


def _obj(key: str = KEY) -> bytes:
    return encode_block("llama-fp1", "bfloat16", (2, 4, 3), bytes(range(48)), key=key)


def test_roundtrip_records_key_and_layout() -> None:
    data = _obj()
    assert FORMAT_VERSION == 2
    assert len(data) == encoded_size("llama-fp1", "bfloat16", (2, 4, 3), 48) == 128 + 48
    assert (len(data) - 48) % HEADER_ALIGN == 0
    obj = check_object(data, KEY, LAYOUT)
    assert not isinstance(obj, Rejection)
    assert (obj.key, obj.fingerprint, obj.dtype, obj.shape) == (KEY, "llama-fp1", "bfloat16",
                                                                 (2, 4, 3))
    assert obj.layout == LAYOUT
    assert bytes(obj.payload) == bytes(range(48))
    assert decode_block(memoryview(bytearray(data)), KEY) is not None
    assert decode_block(data, None) is not None  # any key


def test_empty_payload_and_scalar_shape() -> None:
    obj = decode_block(encode_block("f", "float32", (), b"", key="k"), "k")
    assert obj is not None and obj.shape == () and bytes(obj.payload) == b""


def test_raw_layout() -> None:
    obj = check_object(encode_object("name", BlockLayout.raw(3), b"abc"), "name")
    assert not isinstance(obj, Rejection)
    assert obj.layout == BlockLayout("", "uint8", (3,)) and bytes(obj.payload) == b"abc"


@pytest.mark.parametrize(("pos", "why"), [(0, Rejection.FORMAT), (4, Rejection.FORMAT),
                                          (24, Rejection.LENGTH), (-1, Rejection.CHECKSUM),
                                          (-48, Rejection.CHECKSUM)])
def test_any_flipped_byte_is_rejected(pos: int, why: Rejection) -> None:
    data = bytearray(_obj())
    data[pos] ^= 0x01
    assert check_object(bytes(data), KEY) is why
    assert decode_block(bytes(data), KEY) is None


def test_another_keys_object_is_refused_before_hashing() -> None:
    other = _obj("1f2b21c33004a9004124bb2adf0bcd5f")
    assert check_object(other, KEY) is Rejection.KEY
    # The key check comes before the checksum: a damaged payload of another key reads as KEY.
    damaged = bytearray(other)
    damaged[-1] ^= 1
    assert check_object(bytes(damaged), KEY) is Rejection.KEY


def test_length_and_layout_mismatch() -> None:
    data = _obj()
    assert check_object(data[:-1], KEY) is Rejection.LENGTH
    assert check_object(data + b"\x00", KEY) is Rejection.LENGTH
    assert check_object(b"", KEY) is Rejection.FORMAT
    assert check_object(b"\x00" * 8, KEY) is Rejection.FORMAT
    assert check_object(data, KEY, BlockLayout("other", "bfloat16", (2, 4, 3))) is (
        Rejection.LAYOUT)
    assert check_object(data, KEY, BlockLayout("llama-fp1", "float32", (2, 4, 3))) is (
        Rejection.LAYOUT)
    assert check_object(data, KEY, BlockLayout("llama-fp1", "bfloat16", (2, 4, 4))) is (
        Rejection.LAYOUT)
    assert decode_block(data, KEY, expected_fingerprint="other") is None
    assert decode_block(data, KEY, expected_fingerprint="llama-fp1") is not None
