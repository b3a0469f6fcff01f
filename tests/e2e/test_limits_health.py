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
        # Decode paused, so the first request stays in flight however fast the engine is (a
        # tiny model can finish its 64 tokens before a second request arrives).
        decode_pid = limited_system.role("decode")["pid"]
        os.kill(decode_pid, signal.SIGSTOP)
        try:
            second = limited_system.post("/v1/completions", body)
        finally:
            os.kill(decode_pid, signal.SIGCONT)
        assert second.status_code == 429, second.text
        assert second.json()["error"] == {
            "message": "1 requests in flight (max_concurrent_requests); retry later",
            "type": "rate_limit_error", "param": None, "code": 429}
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
    fallback = 'pantry_conductor_requests_total{finish="length",route="decode_fallback"}'
    before = limited_system.metrics("conductor").get(fallback, 0.0)
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
    assert limited_system.metrics("conductor")[fallback] == before + 1


def test_metrics_show_every_role(limited_system: LocalSystem) -> None:
    """Every role serves its own /metrics, and the conductor's one scrape of the whole system
    agrees with what each role says of itself."""
    limited_system.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    httpx.get(limited_system.http + "/health", timeout=30)  # a fresh poll of every role
    own = {role: limited_system.metrics(role)
           for role in ("kv-master", "kv-node", "prefill", "decode", "conductor")}
    seen = own["conductor"]
    for role, engine_id in (("prefill", "prefill-0"), ("decode", "decode-0")):
        mine = f'{{engine_id="{engine_id}",role="{role}"}}'
        theirs = f'{{engine="{engine_id}",role="{role}"}}'
        for name in ("requests_total", "computed_tokens_total", "pool_tokens_total",
                     "kv_blocks", "kv_free_blocks"):
            assert seen[f"pantry_conductor_engine_{name}{theirs}"] == \
                own[role][f"pantry_engine_{name}{mine}"], (role, name)
        assert seen[f"pantry_conductor_role_up{theirs}"] == 1.0
    master = own["kv-master"]
    for name in ("objects", "used_bytes", "capacity_bytes"):
        assert seen[f"pantry_conductor_pool_{name}"] == master[f"pantry_kv_master_{name}"], name
    assert master["pantry_kv_master_capacity_bytes"] == 64 * 2**20
    assert own["kv-node"]["pantry_kv_node_segment_capacity_bytes"] == 64 * 2**20


def test_the_pool_answers_only_this_systems_roles(limited_system: LocalSystem) -> None:
    """pantry local makes one service token per run: the kvstore master refuses a client
    without it and says nothing else, and answers the operator who holds the token file."""
    import subprocess
    import sys

    master = limited_system.info["kv_master"]
    token_file = limited_system.info["token_file"]
    assert Path(token_file).stat().st_mode & 0o777 == 0o600
    env = {k: v for k, v in os.environ.items() if k != "PANTRY_TOKEN_FILE"}
    refused = subprocess.run([sys.executable, "-m", "kvstore", "status", "--master", master],
                             capture_output=True, text=True, timeout=60, env=env)
    assert (refused.returncode, refused.stdout) == (3, "")
    assert refused.stderr.strip() == ("kvstore: rpc failed: StatusCode.UNAUTHENTICATED: "
                                      "a valid pantry service token is required")
    allowed = subprocess.run([sys.executable, "-m", "kvstore", "status", "--master", master,
                              "--token-file", token_file],
                             capture_output=True, text=True, timeout=60, env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert "node-0" in allowed.stdout
