"""A small streaming client for the OpenAI HTTP API that times the first token; used by the demo
and the benchmarks, where time to first token is measured on the client side."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StreamResult:
    text: str
    ttft_s: float
    total_s: float
    usage: dict[str, Any]


def stream_request(base_url: str, path: str, body: dict[str, Any],
                   on_text: Callable[[str], None] | None = None,
                   timeout: float = 600.0) -> StreamResult:
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(base_url + path, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    ttft = 0.0
    parts: list[str] = []
    usage: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if text and not ttft:
                    ttft = time.perf_counter() - start
                if text:
                    parts.append(text)
                    if on_text:
                        on_text(text)
    return StreamResult("".join(parts), ttft, time.perf_counter() - start, usage)
