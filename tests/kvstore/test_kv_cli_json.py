"""`--json` on the `kvstore` read commands, and `kvstore events`, as real processes on a small
pool (a master, one node, two objects)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kv_helpers import ROOT, raw_size, spawn, wait_for

from kvstore.slab_allocator import slot_bytes
from pantry.common.config_flags import KIB, MIB


def kv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def one_json(*args: str, rc: int = 0) -> dict[str, Any]:
    r = kv(*args)
    assert r.returncode == rc, r.stderr
    (line,) = r.stdout.splitlines()
    out: dict[str, Any] = json.loads(line)
    return out


@pytest.mark.slow
def test_read_commands_print_json(tmp_path: Path) -> None:
    master, minfo = spawn(tmp_path, "master", "master", "--port", "0", "--min-slot-bytes",
                          "4KiB")
    addr = str(minfo["address"])
    node_id = f"json-{os.getpid()}"
    node, ninfo = spawn(tmp_path, "node", "node", "--master", addr, "--node-id", node_id,
                        "--dram-bytes", "16MiB", "--heartbeat", "0.2", "--host-id", "host-j",
                        "--no-prefault")
    try:
        wait_for(lambda: one_json("status", "--master", addr, "--json")["nodes"] != [],
                 what="node registered")
        for key, size in (("j/a", 1000), ("j/b", 5000)):
            src = tmp_path / key.replace("/", "_")
            src.write_bytes(b"\x07" * size)
            assert kv("put", "--master", addr, key, str(src)).returncode == 0

        status = one_json("status", "--master", addr, "--json")
        used = sum(slot_bytes(raw_size(n, k), 4 * KIB) for k, n in (("j/a", 1000),
                                                                     ("j/b", 5000)))
        (n,) = status.pop("nodes")
        assert 0 <= n.pop("heartbeat_age_s") < 5
        assert n.pop("epoch") > 0
        assert n == {"node_id": node_id, "address": ninfo["address"], "host_id": "host-j",
                     "capacity_bytes": 16 * MIB, "used_bytes": used, "objects": 2,
                     "draining": False, "ssd_bytes": 0, "ssd_used_bytes": 0, "ssd_objects": 0}
        assert status == {"capacity_bytes": 16 * MIB, "used_bytes": used, "objects": 2,
                          "puts": 2, "hits": 0, "misses": 0, "evictions": 0, "leader": addr,
                          "masters": [{"address": addr, "role": "leader"}]}

        listed = one_json("ls", "--master", addr, "--json", "--prefix", "j/")
        for o in listed["objects"]:
            assert o.pop("epoch") > 0 and o.pop("offset") >= 0
        assert listed == {"truncated": False, "objects": [
            {"key": "j/a", "node_id": node_id, "tier": "dram", "length": raw_size(1000, "j/a"),
             "state": "sealed", "leased": False},
            {"key": "j/b", "node_id": node_id, "tier": "dram", "length": raw_size(5000, "j/b"),
             "state": "sealed", "leased": False}]}

        assert one_json("exists", "--master", addr, "--json", "j/a", "nope", rc=1) == {
            "exists": {"j/a": True, "nope": False}}
        out = tmp_path / "got.bin"
        assert one_json("get", "--master", addr, "--json", "j/b", "-o", str(out)) == {
            "key": "j/b", "hit": True, "length": 5000}
        assert out.read_bytes() == b"\x07" * 5000
        assert one_json("get", "--master", addr, "--json", "nope", rc=1) == {
            "key": "nope", "hit": False, "length": None}

        r = kv("events", "--master", addr, "--json", "--from-seq", "1", "--count", "3")
        assert r.returncode == 0, r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        run_ids = {e.pop("run_id") for e in events}
        assert len(run_ids) == 1 and all(e.pop("time") > 0 for e in events)
        assert events == [
            {"seq": 1, "kind": "node_joined", "key": "", "node_id": node_id, "tier": ""},
            {"seq": 2, "kind": "stored", "key": "j/a", "node_id": node_id, "tier": "dram"},
            {"seq": 3, "kind": "stored", "key": "j/b", "node_id": node_id, "tier": "dram"}]
        table = kv("events", "--master", addr, "--from-seq", "2", "--count", "1")
        assert table.returncode == 0, table.stderr
        assert table.stdout.split()[0] == "2" and table.stdout.split()[2:] == [
            "stored", node_id, "dram", "j/a"]
    finally:
        for p in (node, master):
            p.kill()
            p.wait()
