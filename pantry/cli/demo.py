"""`make demo`: start a whole Pantry on this machine, ask it something twice, and show that the
second answer came from the pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pantry.cli.client_stream import stream_request

SYSTEM_PROMPT = (
    "You are the pantry assistant of a busy restaurant kitchen. The pantry holds flour, rice, "
    "lentils, oats, sugar, salt, dried beans, pasta, honey, tea, coffee, olive oil, vinegar, "
    "tinned tomatoes, chickpeas, coconut milk, stock cubes, cumin, paprika, turmeric, cinnamon, "
    "black pepper, chilli flakes, bay leaves, oregano and thyme. Prep cooks take ingredients "
    "from the pantry in the morning; the plating line takes prepared sauces and garnishes from "
    "it during service. Anything prepared once is labelled and stored, so no cook ever prepares "
    "the same thing twice. Answer briefly and practically, in at most three sentences."
)
QUESTION = "Suggest one vegetarian dish we can cook from the pantry alone."


def _start(workdir: Path) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    ready = workdir / "ready.json"
    cmd = [sys.executable, "-m", "pantry", "local", "--model", "smollm2", "--http-port", "0",
           "--grpc-port", "0", "--ready-file", str(ready), "--log-dir", str(workdir / "logs")]
    print("$ pantry local --model smollm2   (logs in", workdir / "logs", ")")
    proc = subprocess.Popen(cmd)
    start = time.monotonic()
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"pantry local exited with {proc.returncode}; see {workdir}/logs")
        print(f"\r  starting roles ... {time.monotonic() - start:4.0f}s", end="", flush=True)
        time.sleep(0.5)
    print()
    return proc, json.loads(ready.read_text())


@dataclass(frozen=True)
class Answer:
    ttft_s: float
    cached: int
    text: str


def _ask(http: str, model: str, label: str) -> Answer:
    print(f"\n== {label}")
    print(f"user: {QUESTION}\nassistant: ", end="", flush=True)
    body = {"model": model, "max_tokens": 64, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": QUESTION}]}
    result = stream_request(http, "/v1/chat/completions", body,
                            on_text=lambda t: print(t, end="", flush=True))
    usage = result.usage
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    print(f"\n  time to first token: {result.ttft_s * 1000:8.1f} ms")
    if not usage.get("prefill_skipped"):
        where = "prefill engine ran"
    elif cached:
        where = "prefill skipped: decode pulled the prefix from the pool"
    else:  # pantry local's --decode-prefill-tokens: a short prompt stays on decode
        where = "prefill skipped: a short prompt, computed by decode in its own batch"
    print(f"  prompt tokens: {usage.get('prompt_tokens')}, from the pool: {cached}, {where}")
    return Answer(result.ttft_s, int(cached), result.text)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="pantry-demo-") as tmp:
        proc, info = _start(Path(tmp))
        try:
            http, model = str(info["http"]), str(info["model"])
            print(f"serving {model}: OpenAI API at {http}/v1, gRPC Generate at {info['address']}")
            cold = _ask(http, model, "first request: cold, the whole prompt is computed")
            hot = _ask(http, model, "same prompt again: served from the pool")
            print("\n== summary")
            print(f"  TTFT cold {cold.ttft_s * 1000:.1f} ms -> from the pool "
                  f"{hot.ttft_s * 1000:.1f} ms ({hot.ttft_s / cold.ttft_s:.2f}x), "
                  f"{hot.cached} cached tokens, same answer: {cold.text == hot.text}")
            ok = hot.cached > 0 and cold.text == hot.text
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        print("stopped every role.")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
