"""Limits and health on a running system: the concurrency limit answers 429 and harms nobody,
and /health turns 503 while a role does not answer, 200 again when it does."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.local_system import LocalSystem, start_local, stop_local

PROMPT = list(range(20, 60))


@pytest.fixture(scope="module")
def limited_system(tmp_path_factory: pytest.TempPathFactory,
                   tiny_dirs: dict[str, Path]) -> Iterator[LocalSystem]:
    system = start_local(str(tiny_dirs["llama"]), tmp_path_factory.mktemp("sys-limits"),
                         "--kv-cache-bytes", "16MiB", "--pool-bytes", "64MiB",
                         "--max-concurrent-requests", "1")
    try:
        yield system
    finally:
        stop_local(system)


def test_concurrency_limit_is_429_and_harms_nobody(limited_system: LocalSystem) -> None:
    body = {"prompt": PROMPT, "max_tokens": 64, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    alone = limited_system.post("/v1/completions", body).json()["choices"][0]["token_ids"]
    tokens: list[int] = []
    with httpx.stream("POST", limited_system.http + "/v1/completions",
                      json={**body, "stream": True}, timeout=60) as first:
        lines = first.iter_lines()
        for line in lines:  # the first request is now in flight
            if line.startswith("data: {"):
                tokens += json.loads(line[6:])["choices"][0]["token_ids"]
                break
        second = limited_system.post("/v1/completions", body)
        assert second.status_code == 429, second.text
        assert "max_concurrent_requests" in second.json()["error"]["message"]
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                tokens += json.loads(line[6:])["choices"][0].get("token_ids", [])
    assert tokens == alone  # the request in flight was not disturbed


def test_health_follows_the_roles(limited_system: LocalSystem) -> None:
    url = limited_system.http + "/health"
    assert httpx.get(url, timeout=10).status_code == 200
    decode_pid = limited_system.role("decode")["pid"]
    os.kill(decode_pid, signal.SIGSTOP)  # a hung engine: alive, answering nothing
    try:
        resp = httpx.get(url, timeout=30)
        assert resp.status_code == 503
        assert resp.json()["roles"] == {"prefill:prefill-0": True, "decode:decode-0": False,
                                        "kvstore": True}
    finally:
        os.kill(decode_pid, signal.SIGCONT)
    assert httpx.get(url, timeout=30).status_code == 200
    assert limited_system.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 3,
                                                   "temperature": 0}).status_code == 200


def test_prefill_down_decode_computes_the_prompt(limited_system: LocalSystem) -> None:
    body = {"prompt": list(range(100, 160)), "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    expected = limited_system.post("/v1/completions", {**body, "user": "a"}).json()
    assert expected["usage"]["prefill_skipped"] is False
    prefill_pid = limited_system.role("prefill")["pid"]
    os.kill(prefill_pid, signal.SIGSTOP)
    try:
        roles = httpx.get(limited_system.http + "/health", timeout=30).json()["roles"]
        assert roles["prefill:prefill-0"] is False
        got = limited_system.post("/v1/completions", {**body, "user": "b"}).json()
    finally:
        os.kill(prefill_pid, signal.SIGCONT)
    assert got["choices"][0]["token_ids"] == expected["choices"][0]["token_ids"]
    assert got["usage"]["prefill_skipped"] is True
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    metrics = httpx.get(limited_system.http + "/metrics", timeout=10).text
    assert 'route="decode_fallback"' in metrics


def test_metrics_show_every_role(limited_system: LocalSystem) -> None:
    limited_system.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    httpx.get(limited_system.http + "/health", timeout=30)  # a fresh poll of every role
    metrics = httpx.get(limited_system.http + "/metrics", timeout=10).text
    lines = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                 if line and not line.startswith("#"))
    assert float(lines['pantry_engine_total_blocks{engine="decode-0",role="decode"}']) > 0
    assert float(lines['pantry_engine_requests{engine="prefill-0",role="prefill"}']) >= 1
    assert float(lines["pantry_pool_objects"]) >= 2
    assert float(lines["pantry_pool_capacity_bytes"]) == 64 * 2**20
