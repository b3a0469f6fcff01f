"""`--pool-kv-dtype int8`: blocks go to a real pool quantized (values and per-token-head scales in
one object) and come back dequantized within half a quantization step; int8 and full-precision
blocks never mix (own dtype name in the object header, own layout fingerprint, so own keys)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import xxhash
from prometheus_client import CollectorRegistry

from engine.engine_metrics import PoolClientMetrics
from engine.kv_cache import PagedKVCache
from engine.pool_transfer import INT8_POOL_DTYPE, PoolTransfer, layout_fingerprint
from engine.role_config import EngineRoleConfig
from engine.runner import SeqStep
from engine.triton_kernels import reference_dequantize_int8, reference_quantize_int8
from kvstore.block_object import encoded_size
from kvstore.hashing import PoolAddressing
from pantry.common.errors import ConfigError
from tests.decode.engine_rig import make_core, pool_client, running_pool

SHAPE = (2, 2, 16, 2, 8)  # [L, K/V, block_size, n_kv, hd] of one block of _cache()
VALUES = 2 * 2 * 16 * 2 * 8
LABELS = {"role": "test", "engine_id": "int8-0"}


def _cache(seed: int) -> PagedKVCache:
    cache = PagedKVCache(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=2,
                         head_dim=8, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    cache.k[0, 1, 0] *= 50  # an outlier token (layer 0, block 1, token 0): its own scale only
    return cache


def _transfer(client: object, cache: PagedKVCache, fingerprint: str, pool_kv_dtype: str
              ) -> tuple[PoolTransfer, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = PoolClientMetrics(registry, LABELS["role"], LABELS["engine_id"])
    return PoolTransfer(client, cache, fingerprint, metrics, pool_kv_dtype), registry  # type: ignore[arg-type]


def _value(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(f"pantry_pool_client_{name}", LABELS)


@pytest.fixture(scope="module")
def pool_address() -> Iterator[str]:
    with running_pool("int8") as address:
        yield address


def test_int8_payload_is_values_then_scales() -> None:
    xfer, _ = _transfer(None, _cache(1), "fp", "int8")
    assert xfer.payload_nbytes == VALUES + 4 * (VALUES // 8)  # 1024 + 512 bytes
    assert xfer.layout.dtype == INT8_POOL_DTYPE and xfer.layout.shape == SHAPE
    full, _ = _transfer(None, _cache(1), "fp", "auto")
    assert full.payload_nbytes == 4 * VALUES and full.layout.dtype == "float32"
    raw = xfer.encode([1, 3])
    assert raw.shape == (2, 1536) and str(raw.dtype) == "uint8"
    block = _cache(1).read_block(3)
    q, s = reference_quantize_int8(block)
    assert raw[1, :VALUES].tobytes() == q.numpy().tobytes()
    assert raw[1, VALUES:].tobytes() == s.numpy().tobytes()


def test_int8_round_trip_through_the_pool(pool_address: str) -> None:
    src, dst = _cache(1), _cache(2)
    keys = PoolAddressing("fp-int8", 16).block_keys(list(range(48)), tenant="t")
    with pool_client(pool_address) as client:
        writer, wreg = _transfer(client, src, "fp-int8", "int8")
        reader, rreg = _transfer(client, dst, "fp-int8", "int8")
        assert writer.store(keys, [0, 1, 2]) == 3
        assert reader.load(keys, [5, 6, 7]) == 3
    object_bytes = encoded_size("fp-int8", INT8_POOL_DTYPE, SHAPE, 1536)
    assert _value(wreg, "written_bytes_total") == 3 * object_bytes
    assert _value(rreg, "read_bytes_total") == 3 * object_bytes
    assert _value(rreg, "blocks_hit_total") == 3
    for s, d in ((0, 5), (1, 6), (2, 7)):
        block = src.read_block(s)
        q, scales = reference_quantize_int8(block)
        got = dst.read_block(d)
        # Exactly the dequantized values, and so within half a step of the originals.
        assert torch.equal(got, reference_dequantize_int8(q, scales, torch.float32))
        assert bool(((got - block).abs() <= scales[..., None] / 2 + 1e-6).all())
    # The outlier token coarsened its own row only.
    _, scales = reference_quantize_int8(src.read_block(1))
    assert scales[0, 0, 0, 0] > 20 * scales[0, 0, 1, 0]


@pytest.mark.parametrize("writer_dtype,reader_dtype", [("auto", "int8"), ("int8", "auto")])
def test_int8_and_full_precision_objects_never_mix(pool_address: str, writer_dtype: str,
                                                   reader_dtype: str) -> None:
    """Even under one fingerprint (so one key), a reader of the other dtype refuses the object:
    the header's dtype is part of the layout it checks."""
    base = 1000 if writer_dtype == "auto" else 2000
    keys = PoolAddressing("fp-mix", 16).block_keys(list(range(base, base + 32)), tenant="t")
    dst = _cache(4)
    before = dst.read_block(0).clone()
    with pool_client(pool_address) as client:
        writer, _ = _transfer(client, _cache(3), "fp-mix", writer_dtype)
        reader, rreg = _transfer(client, dst, "fp-mix", reader_dtype)
        assert writer.store(keys, [0, 1]) == 2
        assert reader.load(keys, [0, 1]) == 0
    assert torch.equal(dst.read_block(0), before)
    assert _value(rreg, "blocks_rejected_total") == 1
    assert _value(rreg, "blocks_missed_total") == 1


def test_int8_has_its_own_fingerprint_and_full_precision_keeps_its_own() -> None:
    args = ("m", "digest", torch.float32, 16)
    unchanged = xxhash.xxh3_128_hexdigest(b"m|digest|float32|block=16|layout=1|tp=0/1")
    assert layout_fingerprint(*args) == unchanged
    assert layout_fingerprint(*args, pool_kv_dtype="auto") == unchanged
    int8 = xxhash.xxh3_128_hexdigest(b"m|digest|float32|block=16|layout=1|tp=0/1|pool=int8")
    assert layout_fingerprint(*args, pool_kv_dtype="int8") == int8
    with pytest.raises(ValueError, match="pool_kv_dtype 'fp8'"):
        layout_fingerprint(*args, pool_kv_dtype="fp8")


def test_pool_kv_dtype_setting() -> None:
    base = dict(model="m", kv_master="h:1", engine_id="e")
    assert EngineRoleConfig(**base).pool_kv_dtype == "auto"  # type: ignore[arg-type]
    assert EngineRoleConfig(**base, pool_kv_dtype="int8").pool_kv_dtype == "int8"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pool_kv_dtype: 'fp8' must be one of auto, int8"):
        EngineRoleConfig(**base, pool_kv_dtype="fp8")  # type: ignore[arg-type]


def test_engine_cores_with_int8_share_blocks_only_with_int8_cores(tiny_llama: Path,
                                                                  pool_address: str) -> None:
    """The setting reaches the core: its fingerprint (so the conductor refuses a fleet that
    disagrees), its keys, and what its transfer writes and reads."""
    prefill = make_core(tiny_llama, pool_address, "prefill", "p-int8", pool_kv_dtype="int8")
    decode = make_core(tiny_llama, pool_address, "decode", "d-int8", pool_kv_dtype="int8")
    full = make_core(tiny_llama, pool_address, "decode", "d-full")
    try:
        assert prefill.description.fingerprint == decode.description.fingerprint
        assert full.description.fingerprint != decode.description.fingerprint
        assert decode.transfer.layout.dtype == INT8_POOL_DTYPE
        assert full.transfer.layout.dtype == "float32"
        prompt = list(range(3, 43))
        keys = prefill.addressing.block_keys(prompt, tenant="t")
        table = prefill.runner.allocator.allocate(3)
        prefill.runner.step([SeqStep(tuple(prompt), 0, tuple(table))])
        assert prefill.transfer.store(keys, table[:2]) == 2
        got = decode.runner.allocator.allocate(2)
        assert decode.transfer.load(keys, got) == 2
        for src, dst in zip(table[:2], got, strict=True):
            block = prefill.runner.kv.read_block(src)
            q, scales = reference_quantize_int8(block)
            assert torch.equal(decode.runner.kv.read_block(dst),
                               reference_dequantize_int8(q, scales, torch.float32))
        full_keys = full.addressing.block_keys(prompt, tenant="t")
        assert set(full_keys).isdisjoint(keys)
        assert full.transfer.load(full_keys, full.runner.allocator.allocate(2)) == 0
    finally:
        for core in (prefill, decode, full):
            core.close()
