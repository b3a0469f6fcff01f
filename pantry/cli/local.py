"""`pantry local`: every role as its own process on loopback, stopped together."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from engine.cpu_split import CpuBoard
from kvstore.auth import TOKEN_FILE_ENV
from pantry.common.serving import format_table, write_ready_file

from .local_options import LocalOptions

log = logging.getLogger("pantry.local")

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 15.0
NODE_ID = "node-0"


def split_cpus(prefill_engines: int = 1, decode_engines: int = 1) -> tuple[list[str], list[str]]:
    """Half the CPUs for prefill, half for decode, as disaggregation gives each its own
    machine: a long prefill then cannot stall the decode steps of running requests. Each half
    is split evenly between that role's engines; engines beyond the CPUs share them in turn.
    With one CPU there is nothing to split: every engine gets '' (no pinning)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return [""] * prefill_engines, [""] * decode_engines
    half = len(cpus) // 2
    return _share(cpus[:half], prefill_engines), _share(cpus[half:], decode_engines)


def _share(cpus: list[int], engines: int) -> list[str]:
    if engines > len(cpus):
        return [str(cpus[i % len(cpus)]) for i in range(engines)]
    bounds = [len(cpus) * i // engines for i in range(engines + 1)]
    return [",".join(map(str, cpus[bounds[i]:bounds[i + 1]])) for i in range(engines)]


def lower_priority(nice: int, idle: bool) -> Callable[[], None] | None:
    """What the child runs before exec, so every thread it starts inherits the priority."""
    if not nice and not idle:
        return None

    def lower() -> None:
        if nice:
            os.nice(nice)
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    return lower


def role_name(kind: str, index: int, count: int) -> str:
    """'prefill' when the kind has one engine, else 'prefill-0', 'prefill-1', ..."""
    return kind if count == 1 else f"{kind}-{index}"


class RoleFailed(RuntimeError):
    """A role exited or did not become ready; the message says which and where its log is."""


@dataclass
class Role:
    name: str
    argv: list[str]
    ready_file: Path
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    info: dict[str, object] = field(default_factory=dict)
    log_path: Path | None = None
    log_file: IO[bytes] | None = None


class LocalCluster:
    def __init__(self, options: LocalOptions, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.roles: list[Role] = []
        # One service token per run: the pool answers only this system's roles. Every kvstore
        # client in the children finds it through $PANTRY_TOKEN_FILE.
        self.token_file = workdir / "pool.token"
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        self.env = {**os.environ, TOKEN_FILE_ENV: str(self.token_file)}

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
               nice: int = 0, idle: bool = False) -> Role:
        ready = self.workdir / f"{name}.ready.json"
        role = Role(name, [sys.executable, *argv, "--ready-file", str(ready)], ready)
        stdout: IO[bytes] | int | None = None
        if self.options.log_dir:
            Path(self.options.log_dir).mkdir(parents=True, exist_ok=True)
            role.log_path = Path(self.options.log_dir) / f"{name}.log"
            role.log_file = open(role.log_path, "ab")  # noqa: SIM115 - closed in stop()
            stdout = role.log_file
        role.proc = subprocess.Popen(role.argv, stdout=stdout, stderr=subprocess.STDOUT
                                     if stdout else None, env=env or self.env,
                                     preexec_fn=lower_priority(nice, idle))
        self.roles.append(role)
        log.info("started %-10s pid %d", name, role.proc.pid)
        return role

    def _wait_ready(self, role: Role, deadline: float) -> None:
        assert role.proc is not None
        while not role.ready_file.exists():
            code = role.proc.poll()
            if code is not None:
                where = f"; see {role.log_path}" if role.log_path else ""
                raise RoleFailed(f"{role.name} exited with status {code} before serving{where}")
            if time.monotonic() > deadline:
                raise RoleFailed(f"{role.name} did not become ready in {START_TIMEOUT_S:.0f}s")
            time.sleep(0.05)
        role.info = json.loads(role.ready_file.read_text())
        role.address = str(role.info["address"])
        log.info("%-10s ready at %s", role.name, role.address)

    def start(self) -> None:
        o = self.options
        deadline = time.monotonic() + START_TIMEOUT_S
        token = ["--token-file", str(self.token_file)]
        # The pool and the conductor go where the scheduler puts them. Kept off decode's half
        # (adaptive), interference p99/p50 was 1.59-1.66 and TTFT p50 44 s, against 1.49-1.60
        # and 40 s left free (alternated, two rounds each). Measured again with the step trace,
        # the pool alone on prefill's half: decode's run-queue time at prefill's pass ends (the
        # master allocating and sealing a pass's 128 blocks) fell from 248-289 to 88-108 ms a
        # round, its whole run-queue time from 35-38 to 30-32 ms a second, p99/p50 1.72-1.74 ->
        # 1.54-1.70 (floors 1.84-2.08 and 1.34-2.02), and TTFT p50 rose 55-59 -> 63-64 s.
        master = self._start("kv-master", ["-m", "kvstore", "master", "--host", o.host,
                                           "--port", "0", *token])
        self._wait_ready(master, deadline)
        node = self._start("kv-node", ["-m", "kvstore", "node", "--master", master.address,
                                       "--host", o.host, "--port", "0", "--node-id", NODE_ID,
                                       "--dram-bytes", str(o.pool_bytes), *token])
        self._wait_ready(node, deadline)
        engine_args = ["--model", o.model, "--kv-master", master.address, "--host", o.host,
                       "--port", "0", "--block-size", str(o.block_size),
                       "--kv-cache-bytes", str(o.kv_cache_bytes),
                       "--max-model-len", str(o.max_model_len), "--threads", str(o.threads),
                       "--device", o.device, "--dtype", o.dtype,
                       "--pool-kv-dtype", o.pool_kv_dtype,
                       "--cuda-graphs" if o.cuda_graphs else "--no-cuda-graphs"]
        pinned = o.cpu_split == "pin"
        prefill_cpus, decode_cpus = (split_cpus(o.prefill_engines, o.decode_engines)
                                     if o.cpu_split != "shared"
                                     else ([""] * o.prefill_engines, [""] * o.decode_engines))
        board: list[str] = []
        if o.cpu_split == "adaptive" and prefill_cpus[0]:  # '' with one CPU: nothing to split
            path = self.workdir / "cpu-board"
            CpuBoard.create(path, ["prefill"] * o.prefill_engines + ["decode"] * o.decode_engines)
            board = ["--cpu-board", str(path)]
        # Engines on every CPU always (shared, or adaptive with one CPU): prefill yields to
        # decode by priority.
        shared = not pinned and not board
        # Engines that may share CPUs: their OpenMP threads that wait would otherwise spin on
        # the cores the other engine is computing on.
        engine_env = self.env if pinned else {"OMP_WAIT_POLICY": "PASSIVE", **self.env}
        engines: dict[str, list[Role]] = {"prefill": [], "decode": []}
        for kind, cpus in (("prefill", prefill_cpus), ("decode", decode_cpus)):
            extra = ["--chunk-tokens", str(o.decode_chunk_tokens)] if kind == "decode" else []
            trace = o.decode_step_trace if kind == "decode" else o.prefill_step_trace
            if trace:
                extra += ["--step-trace", trace]
            env = engine_env
            if kind == "decode" and o.decode_spin and not pinned:
                env = {**engine_env, "GOMP_SPINCOUNT": str(o.decode_spin)}
            if kind == "decode" and o.decode_threads:
                extra += ["--threads", str(o.decode_threads)]  # the later flag wins
            for i, cpu in enumerate(cpus):
                slot = len(engines["prefill"]) + i if kind == "decode" else i
                engines[kind].append(self._start(
                    role_name(kind, i, len(cpus)),
                    ["-m", "pantry", kind, *engine_args, "--engine-id", f"{kind}-{i}",
                     "--cpus", cpu, *board, *(["--cpu-board-slot", str(slot)] if board else []),
                     *extra], env=env,
                    nice=o.prefill_nice if kind == "prefill" and shared else 0,
                    idle=o.prefill_idle and kind == "prefill" and shared))
        for role in [*engines["prefill"], *engines["decode"]]:
            self._wait_ready(role, deadline)
        conductor = self._start("conductor", [
            "-m", "pantry", "conductor", "--model", o.model, "--kv-master", master.address,
            *(a for r in engines["prefill"] for a in ("--prefill", r.address)),
            *(a for r in engines["decode"] for a in ("--decode", r.address)),
            "--host", o.host,
            "--http-port", str(o.http_port), "--grpc-port", str(o.grpc_port),
            "--max-concurrent-requests", str(o.max_concurrent_requests),
            "--decode-prefill-tokens", str(o.decode_prefill_tokens),
            *(["--served-model-name", o.served_model_name] if o.served_model_name else []),
        ])
        self._wait_ready(conductor, deadline)

    def summary(self) -> dict[str, object]:
        by_name = {r.name: r for r in self.roles}
        con = by_name["conductor"].info
        return {
            "http": f"http://{con['http']}",
            "grpc": by_name["conductor"].address,
            "model": con.get("model", ""),
            "kv_master": by_name["kv-master"].address,
            "token_file": str(self.token_file),
            "roles": {r.name: {"address": r.address, "pid": r.proc.pid if r.proc else None,
                               "metrics": self.metrics_url(r)}
                      for r in self.roles},
        }

    @staticmethod
    def metrics_url(role: Role) -> str:
        """Where Prometheus scrapes this role: its own metrics port, or for the conductor the
        /metrics of its HTTP API."""
        if role.info.get("metrics"):
            return str(role.info["metrics"])
        if role.info.get("http"):
            return f"http://{role.info['http']}/metrics"
        return ""

    def table(self) -> str:
        rows: list[tuple[str, str, str, str]] = [
            (r.name, str(r.proc.pid if r.proc else "-"), r.address, self.metrics_url(r))
            for r in self.roles
        ]
        con = next((r for r in self.roles if r.name == "conductor"), None)
        if con and con.info.get("http"):
            rows.append(("http api", "", f"http://{con.info['http']}/v1", ""))
        return format_table(("ROLE", "PID", "ADDRESS", "METRICS"), rows)

    def first_exited(self) -> Role | None:
        return next((r for r in self.roles if r.proc and r.proc.poll() is not None), None)

    def stop(self) -> None:
        """SIGTERM in reverse start order, then SIGKILL whatever is left."""
        for role in reversed(self.roles):
            if role.proc and role.proc.poll() is None:
                role.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for role in reversed(self.roles):
            if role.proc is None:
                continue
            try:
                role.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", role.name)
                role.proc.kill()
                role.proc.wait()
            if role.log_file:
                role.log_file.close()
        self._remove_orphan_segment()

    def _remove_orphan_segment(self) -> None:
        """A node that was killed could not unlink its segment; its memory would stay taken."""
        from kvstore.config import NodeConfig
        from kvstore.node import segment_path

        node = next((r for r in self.roles if r.name == "kv-node"), None)
        if node is None or node.proc is None:
            return
        cfg = NodeConfig(master_address="-", node_id=NODE_ID)
        path = Path(segment_path(cfg, pid=node.proc.pid))
        if path.exists():
            log.warning("kv-node left %s behind; removing it", path)
            path.unlink(missing_ok=True)


def run_local(options: LocalOptions) -> int:
    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with tempfile.TemporaryDirectory(prefix="pantry-local-") as tmp:
        cluster = LocalCluster(options, Path(tmp))
        status = 0
        try:
            cluster.start()
            print(cluster.table(), flush=True)
            write_ready_file(options.ready_file, str(cluster.summary()["grpc"]),
                             **{k: v for k, v in cluster.summary().items() if k != "grpc"})
            while not stop_requested:
                gone = cluster.first_exited()
                if gone is not None:
                    log.error("%s exited with status %s; stopping everything", gone.name,
                              gone.proc.returncode if gone.proc else "?")
                    status = 1
                    break
                time.sleep(0.2)
        except RoleFailed as exc:
            log.error("%s", exc)
            status = 1
        finally:
            if stop_requested and not status:
                log.info("stopping on %s", signal.Signals(stop_requested[0]).name)
            cluster.stop()
            if options.ready_file:
                Path(options.ready_file).unlink(missing_ok=True)
        return status

