"""The connector's vLLM-free parts, in Pantry's own venv: addressing, pages, the background
saver against a real pool, and `pantry vllm-serve`'s command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from connectors.pool_breaker import PoolBreaker
from connectors.vllm_addressing import VllmAddressing, VllmLayout, model_digest
from connectors.vllm_pages import PagedKV
from connectors.vllm_saver import BackgroundSaver
from kvstore.block_object import BlockLayout
from kvstore.client import KVStoreClient
from kvstore.hashing import BlockHasher, make_namespace
from pantry.cli.vllm_serve import VllmServeOptions, connector_root, vllm_command

LAYOUT = VllmLayout(model_digest="d0", vllm_version="0.32.0", backend="cpu:None",
                    dtype="float32", block_size=32, num_layers=30, num_kv_heads=3, head_size=64)


def test_fingerprint_names_vllm_and_changes_with_every_layout_field() -> None:
    fp = LAYOUT.fingerprint()
    assert fp.startswith("vllm:")
    assert fp == VllmLayout(**LAYOUT.__dict__).fingerprint()
    changed = {"model_digest": "d1", "vllm_version": "0.33.0", "backend": "cuda:FLASH",
               "dtype": "bfloat16", "block_size": 64, "num_layers": 31, "num_kv_heads": 4,
               "head_size": 128, "tp_rank": 1, "tp_size": 2}
    fps = {VllmLayout(**{**LAYOUT.__dict__, k: v}).fingerprint() for k, v in changed.items()}
    assert len(fps) == len(changed) and fp not in fps


def test_keys_follow_design_section_3_with_tenant_and_cache_salt() -> None:
    tokens = list(range(100))
    addr = VllmAddressing("vllm:x", 32, tenant="acme", hash_seed=7)
    pk = addr.prompt_keys(tokens, "s1")
    expected = BlockHasher(make_namespace("vllm:x", "acme", "s1"), block_size=32,
                           seed=7).block_keys(tokens)
    assert list(pk.keys) == expected and len(expected) == 3
    assert addr.prompt_keys(tokens, "s2").keys[0] != pk.keys[0]
    assert VllmAddressing("vllm:x", 32, hash_seed=7).prompt_keys(tokens, "s1").keys[0] \
        != pk.keys[0]
    assert addr.prompt_keys(tokens, None).keys == addr.prompt_keys(tokens, "").keys


@pytest.mark.parametrize(("n", "hit_blocks", "keys"),
                         [(20, 0, 0), (32, 0, 1), (33, 1, 1), (64, 1, 2), (300, 9, 9)])
def test_a_hit_leaves_the_last_prompt_token_to_compute(n: int, hit_blocks: int,
                                                       keys: int) -> None:
    pk = VllmAddressing("vllm:x", 32).prompt_keys(list(range(n)), None)
    assert (pk.max_hit_blocks, len(pk.keys)) == (hit_blocks, keys)


def test_model_digest_changes_with_weight_bytes_not_with_the_path(tmp_path: Path) -> None:
    def model(name: str, fill: int) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text('{"a": 1}')
        (d / "model.safetensors").write_bytes(bytes([fill]) * 4096)
        return str(d)

    assert model_digest(model("m1", 1)) == model_digest(model("m2", 1))
    assert model_digest(model("m3", 2)) != model_digest(str(tmp_path / "m1"))
    assert model_digest("org/hub-id") != model_digest("org/other-id")


def _cpu_caches(num_blocks: int) -> dict[str, torch.Tensor]:
    # The CPU backend's per-layer tensor: [num_blocks, num_kv_heads, block_size, 2 * head_size].
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.attn": torch.randn(num_blocks, 3, 32, 8, generator=g) for i in range(4)}


def _payload(caches: dict[str, torch.Tensor], block: int) -> bytes:
    """What a stored block holds: that block's page of every layer, layer after layer."""
    return b"".join(t[block].numpy().tobytes() for t in caches.values())


def test_pages_round_trip_between_instances() -> None:
    src_caches, dst_caches = _cpu_caches(10), {k: torch.zeros(10, 3, 32, 8)
                                               for k in _cpu_caches(10)}
    src, dst = PagedKV(src_caches, 10, "fp"), PagedKV(dst_caches, 10, "fp")
    assert src.layout == BlockLayout("fp", "float32", (4, 3 * 32 * 8))
    assert src.block_nbytes == 4 * 3 * 32 * 8 * 4
    pages = src.gather([7, 2])
    assert [pages[i].tobytes() for i in range(2)] == [_payload(src_caches, 7),
                                                      _payload(src_caches, 2)]
    dst.scatter([1, 5], pages)
    for name in src_caches:
        assert torch.equal(dst_caches[name][1], src_caches[name][7])
        assert torch.equal(dst_caches[name][5], src_caches[name][2])
        assert torch.count_nonzero(dst_caches[name][0]) == 0


def test_pages_gather_into_a_buffer_of_more_blocks() -> None:
    caches = _cpu_caches(6)
    paged = PagedKV(caches, 6, "fp")
    out = paged.new_pages(4)
    pages = paged.gather([5, 0], out)
    assert pages.base is out or pages.base is out.base
    assert out[0].tobytes() == _payload(caches, 5) and out[1].tobytes() == _payload(caches, 0)
    assert not out[2:].any()


def test_pages_of_a_layout_with_kv_first() -> None:
    # GPU-style [2, num_blocks, block_size, heads, head_size]: the block dimension is found.
    caches = {"l0": torch.arange(2 * 6 * 4, dtype=torch.float32).view(2, 6, 4)}
    paged = PagedKV(caches, 6, "fp")
    pages = paged.gather([3])
    assert pages.shape == (1, 1, 32)
    assert pages[0, 0].view(np.float32).tolist() == caches["l0"][:, 3].reshape(-1).tolist()
    caches["l0"][:, 3] = 0
    paged.scatter([3], pages)
    assert caches["l0"][:, 3].reshape(-1).tolist() == pages[0, 0].view(np.float32).tolist()


def _save(saver: BackgroundSaver, paged: PagedKV, keys: tuple[str, ...],
          ids: list[int]) -> bool:
    return saver.submit(keys, lambda out: paged.gather(ids, out), paged.block_nbytes)


def test_saver_stores_verified_pages_and_drops_past_its_backlog(pool_address: str) -> None:
    caches = _cpu_caches(4)
    paged = PagedKV(caches, 4, "vllm:test")
    with KVStoreClient(pool_address, host_id="saver-test") as client:
        saver = BackgroundSaver(client, paged.layout, PoolBreaker(5.0),
                                max_pending_bytes=2 * paged.block_nbytes,
                                new_pages=paged.new_pages)
        keys = ("a" * 32, "b" * 32)
        assert _save(saver, paged, keys, [0, 3])
        assert saver.flush(30)
        assert (saver.stored, saver.dropped) == (2, 0)
        got = client.get_objects(list(keys), paged.layout)
        assert [bytes(o.payload) for o in got.objects if o is not None] == [
            _payload(caches, 0), _payload(caches, 3)]
        assert not _save(saver, paged, ("c" * 32,) * 3, [0, 1, 2])
        assert saver.dropped == 3
        saver.close()


def test_saver_reuses_its_buffers(pool_address: str) -> None:
    caches = _cpu_caches(4)
    paged = PagedKV(caches, 4, "vllm:test")
    made: list[np.ndarray] = []

    def new_pages(n: int) -> np.ndarray:
        made.append(paged.new_pages(n))
        return made[-1]

    with KVStoreClient(pool_address, host_id="saver-test") as client:
        saver = BackgroundSaver(client, paged.layout, PoolBreaker(5.0), 1 << 30, new_pages)
        for i, ids in enumerate(([0, 1], [1, 2, 3], [3, 2, 1], [0], [1, 2, 3, 0])):
            assert _save(saver, paged, tuple(f"{i}{j}".ljust(32, "d") for j in ids), ids)
            assert saver.flush(30)
        # Blocks rounded up to a power of two: a buffer of 2 and one of 4 served all five saves.
        assert [len(b) for b in made] == [2, 4]
        assert (saver.stored, saver.dropped) == (13, 0)
        got = client.get_many(["23".ljust(32, "d"), "30".ljust(32, "d")], paged.layout)
        assert got == [_payload(caches, 3), _payload(caches, 0)]
        saver.close()


def test_saver_drops_while_the_pool_is_down() -> None:
    caches = _cpu_caches(2)
    paged = PagedKV(caches, 2, "vllm:test")
    breaker = PoolBreaker(60.0)
    with KVStoreClient("127.0.0.1:1", host_id="down") as client:
        saver = BackgroundSaver(client, paged.layout, breaker, 1 << 30, paged.new_pages)
        assert _save(saver, paged, ("a" * 32,), [0])
        assert saver.flush(30)
        assert (saver.stored, saver.dropped, breaker.failures) == (0, 1, 1)
        assert not breaker.allows()
        assert not _save(saver, paged, ("b" * 32,), [1])
        assert (saver.dropped, breaker.failures) == (2, 1)
        saver.close()


def test_breaker_asks_again_after_its_wait() -> None:
    breaker = PoolBreaker(0.05)
    breaker.failed("lookup", RuntimeError("down"))
    assert not breaker.allows()
    time.sleep(0.06)
    assert breaker.allows()


def test_vllm_serve_command_line() -> None:
    o = VllmServeOptions(kv_master="127.0.0.1:7000", port=8123, tenant="acme",
                         vllm_python="/v/bin/python", model="/m", enforce_eager=True)
    argv, env = vllm_command(o)
    assert argv[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flag = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    assert (flag["--model"], flag["--port"], flag["--block-size"], flag["--dtype"]) == (
        "/m", "8123", "32", "float32")
    assert "--enforce-eager" in argv and "--enable-prefix-caching" in argv
    assert json.loads(flag["--kv-transfer-config"]) == {
        "kv_connector": "PantryConnector", "kv_connector_module_path": "connectors.vllm_connector",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"kv_master": "127.0.0.1:7000", "tenant": "acme",
                                      "hash_seed": 0}}
    assert env["PYTHONPATH"].split(":")[0] == str(connector_root())
    assert (connector_root() / "connectors" / "vllm_connector.py").is_file()
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
