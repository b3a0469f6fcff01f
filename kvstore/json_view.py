"""The JSON forms of what the `kvstore` read commands print with `--json`: one object per
command (one per line for a stream). Keys are spelled out here, not derived from the
dataclasses, so scripts that read them do not break when a domain type grows a field."""

from __future__ import annotations

import json
from typing import Any

from kvstore.events import EventGap, PoolEvent
from kvstore.metadata import NodeStatus, ObjectEntry, PoolStatus


def dumps(obj: dict[str, Any]) -> str:
    """One line, keys in the order written."""
    return json.dumps(obj, separators=(",", ":"))


def node_json(n: NodeStatus) -> dict[str, Any]:
    return {
        "node_id": n.node.node_id,
        "address": n.node.address,
        "host_id": n.node.host_id,
        "epoch": n.node.epoch,
        "capacity_bytes": n.capacity_bytes,
        "used_bytes": n.used_bytes,
        "objects": n.objects,
        "heartbeat_age_s": round(n.heartbeat_age_s, 3),
        "draining": n.draining,
        "ssd_bytes": n.node.ssd_bytes,
        "ssd_used_bytes": n.ssd_used_bytes,
        "ssd_objects": n.ssd_objects,
    }


def status_json(s: PoolStatus) -> dict[str, Any]:
    return {
        "nodes": [node_json(n) for n in s.nodes],
        "capacity_bytes": s.capacity_bytes,
        "used_bytes": s.used_bytes,
        "objects": s.objects,
        "puts": s.puts,
        "hits": s.hits,
        "misses": s.misses,
        "evictions": s.evictions,
    }


def object_json(o: ObjectEntry) -> dict[str, Any]:
    loc = o.location
    return {"key": loc.key, "node_id": loc.node_id, "tier": loc.tier, "offset": loc.offset,
            "length": loc.length, "epoch": loc.epoch,
            "state": "sealed" if o.sealed else "pending", "leased": o.leased}


def objects_json(objects: list[ObjectEntry], truncated: bool) -> dict[str, Any]:
    return {"objects": [object_json(o) for o in objects], "truncated": truncated}


def event_json(e: PoolEvent | EventGap) -> dict[str, Any]:
    if isinstance(e, EventGap):
        return {"run_id": e.run_id, "gap": e.lost}
    return {"seq": e.seq, "run_id": e.run_id, "kind": e.kind.value, "key": e.key,
            "node_id": e.node_id, "tier": e.tier, "time": e.time}
