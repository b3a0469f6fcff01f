"""A whole Pantry started the way a user starts it: `python -m pantry local`, real processes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from pantry.v1 import engine_pb2, engine_pb2_grpc

START_TIMEOUT_S = 240.0
# Flags every system here is started with, before each test's own (a later flag wins): on a GPU
# machine bench/gpu_check.sh runs the oracle tests with "--device cuda".
EXTRA_ARGS_ENV = "PANTRY_E2E_ARGS"


@dataclass
class LocalSystem:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    log_dir: Path

    @property
    def http(self) -> str:
        return str(self.info["http"])

    @property
    def grpc_address(self) -> str:
        return str(self.info["address"])

    @property
    def model(self) -> str:
        return str(self.info["model"])

    def role(self, name: str) -> dict[str, Any]:
        return dict(self.info["roles"][name])

    def post(self, path: str, body: Any, timeout: float = 120.0) -> httpx.Response:
        return httpx.post(self.http + path, json=body, timeout=timeout)

    def complete(self, ids: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
        body = {"model": self.model, "prompt": ids, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True, **extra}
        resp = self.post("/v1/completions", body)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def prefill_load(self) -> engine_pb2.EngineLoad:
        with grpc.insecure_channel(self.role("prefill")["address"]) as ch:
            stub = engine_pb2_grpc.PrefillEngineStub(ch)
            return stub.Load(engine_pb2.EngineLoadRequest(), timeout=5)

    def metrics(self, role: str) -> dict[str, float]:
        """One scrape of a role's own /metrics URL (from pantry local's ready file), as
        {'name{label="v",...}': value} with labels sorted by name."""
        resp = httpx.get(self.role(role)["metrics"], timeout=10)
        assert resp.status_code == 200, resp.text
        return parse_metrics(resp.text)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))


def parse_metrics(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def start_local(model: str, workdir: Path, *extra: str) -> LocalSystem:
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready.json"
    log_dir = workdir / "logs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Every prompt with a miss goes through prefill and the pool, the path these tests are
    # about; a test of short prompts computed by decode passes its own (a later flag wins).
    proc = subprocess.Popen(
        [sys.executable, "-m", "pantry", "local", "--model", model, "--http-port", "0",
         "--grpc-port", "0", "--ready-file", str(ready), "--log-dir", str(log_dir),
         "--decode-prefill-tokens", "0", *shlex.split(os.environ.get(EXTRA_ARGS_ENV, "")),
         *extra],
        stdout=open(workdir / "local.out", "wb"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = (workdir / "local.out").read_text()
            raise RuntimeError(f"pantry local did not start:\n{out}")
        time.sleep(0.1)
    return LocalSystem(proc, json.loads(ready.read_text()), log_dir)


def stop_local(system: LocalSystem, sig: signal.Signals = signal.SIGTERM) -> None:
    """SIGTERM as Kubernetes sends, or SIGINT as Ctrl-C does; then check nothing is left."""
    pids = [r["pid"] for r in system.info["roles"].values()]
    system.proc.send_signal(sig)
    code = system.proc.wait(timeout=60)
    assert code == 0, f"pantry local exited {code}\n{system.logs()}"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"pid {pid} still running"
    node_pid = system.role("kv-node")["pid"]
    left = [p.name for p in Path("/dev/shm").glob(f"pantry-kv-*-{node_pid}")]
    assert not left, f"shared-memory segments left behind: {left}"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
