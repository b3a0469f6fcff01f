"""The GPU path end to end: `pantry local --device cuda --dtype bfloat16` as real processes (kvstore
master and node, prefill, decode, conductor) serving a model of SmolLM2-135M's shape (random
weights, SmolLM2's own tokenizer: the GGUF is too large to travel to a lent GPU machine, and
speed does not depend on the weights' values), measured through the OpenAI HTTP API:

  TTFT      a fresh prompt (cold: prefill computes it, decode pulls its blocks from the pool; no
            prompt is computed on decode here, --decode-prefill-tokens 0) and
            the same prompt again (repeated: decode's own prefix cache), 512/1024/2048 tokens;
  decode    output tok/s of 1 and 8 concurrent streams (256-token prompts, 128 tokens each).

Baseline in the same run, same GPU, same weights and dtype: transformers. Its TTFT is one
forward pass over the prompt and the first token's argmax (no server, no pool: a floor, not a
peer), the same for a repeat (it caches no prefix); its decode tok/s is `generate`'s, with the
whole batch started at once.

    python3 bench/gpu_serve.py [--device cuda] [--dtype bfloat16] [--tokenizer smollm2|DIR]
                               [--lengths 512 1024 2048] [--streams 1 8] [--json FILE]

`--device cpu --dtype float32 --lengths 64 --streams 1 2 --new-tokens 8` is a quick check of the
bench itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpu_check import smollm2_shaped  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ttft_prefix import make_prompt, start_pantry, ttft  # noqa: E402

from engine.model_files import load_tokenizer  # noqa: E402
from pantry.cli.client_stream import stream_request  # noqa: E402
from pantry.common.serving import format_table  # noqa: E402

STREAM_PROMPT = 256  # tokens of each decode stream's prompt


def save_tokenizer(spec: str, dest: Path) -> None:
    """The tokenizer of `spec` (a model spec, or a directory holding a tokenizer.json) as
    tokenizer.json and tokenizer_config.json in `dest`."""
    source = Path(spec)
    dest.mkdir(parents=True, exist_ok=True)
    if (source / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (source / name).is_file():
                shutil.copy(source / name, dest / name)
        return
    tok = load_tokenizer(spec)
    if tok is None:
        raise SystemExit(f"no tokenizer in {spec}")
    tok.backend.save(str(dest / "tokenizer.json"))
    eos = [tok.backend.id_to_token(i) for i in tok.eos_token_ids]
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tok.bos_token, **({"eos_token": eos[0]} if eos else {})}))


def model_dir(root: Path, tokenizer: str) -> Path:
    """SmolLM2-shaped random weights beside SmolLM2's tokenizer, so the conductor tokenizes and
    detokenizes as it would."""
    path = smollm2_shaped(root)
    save_tokenizer(tokenizer, path)
    return path


def stream_rate(http: str, prompts: list[list[int]], new_tokens: int) -> float:
    """Output tok/s of the prompts streamed together: tokens after each stream's first, over the
    time from the first stream's first token to the last stream's last."""
    firsts: list[float] = []
    lasts: list[float] = []
    counts: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(ids: list[int]) -> None:
        stamps: list[float] = []
        try:
            stream_request(http, "/v1/completions",
                           {"prompt": ids, "max_tokens": new_tokens, "temperature": 0,
                            "ignore_eos": True},
                           on_text=lambda _t: stamps.append(time.perf_counter()))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(exc)
            return
        with lock:
            firsts.append(stamps[0])
            lasts.append(stamps[-1])
            counts.append(len(stamps) - 1)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) / (max(lasts) - min(firsts))


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def transformers_baseline(path: Path, device: str, dtype: torch.dtype, lengths: list[int],
                          streams: list[int], new_tokens: int, reps: int,
                          rng: random.Random) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    hf: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    out: dict[str, float] = {}
    with torch.inference_mode():
        def first_token(ids: torch.Tensor) -> Callable[[], Any]:
            return lambda: hf(ids).logits[:, -1].argmax(-1).tolist()

        def generate(ids: torch.Tensor, n: int) -> Callable[[], Any]:
            return lambda: hf.generate(ids, attention_mask=torch.ones_like(ids),
                                       do_sample=False, max_new_tokens=n, min_new_tokens=n)

        warm = torch.tensor([make_prompt(rng, 64)], device=device)
        timed(generate(warm, 4), sync)
        for length in lengths:
            out[f"ttft {length}"] = statistics.median(
                timed(first_token(torch.tensor([make_prompt(rng, length)], device=device)), sync)
                for _ in range(reps))
        for n in streams:
            ids = torch.tensor([make_prompt(rng, STREAM_PROMPT) for _ in range(n)],
                               device=device)
            # The decode steps alone: generate(k + 1) less generate(1) (the prompt's pass).
            steps = statistics.median(
                timed(generate(ids, new_tokens + 1), sync) - timed(generate(ids, 1), sync)
                for _ in range(reps))
            out[f"decode {n}"] = n * new_tokens / steps
    return out


def pantry_figures(path: Path, workdir: Path, ns: argparse.Namespace,
                   rng: random.Random) -> dict[str, float]:
    proc, info = start_pantry(workdir, max(*ns.lengths, STREAM_PROMPT) + ns.new_tokens + 64,
                              "--device", ns.device, "--dtype", ns.dtype,
                              # Every miss through prefill and the pool: the disaggregated path.
                              "--decode-prefill-tokens", "0", model=str(path))
    http = info["http"]
    out: dict[str, float] = {}
    try:
        ttft(http, make_prompt(rng, 64))  # warm-up: first-call costs are not serving
        stream_rate(http, [make_prompt(rng, 64)], 4)
        for length in ns.lengths:
            cold, repeated = [], []
            for _ in range(ns.reps):
                ids = make_prompt(rng, length)
                c, cached_cold = ttft(http, ids)
                r, cached = ttft(http, ids)
                assert cached_cold == 0, "a fresh prompt must not hit the pool"
                assert cached >= length - length % 16 - 16, f"repeat hit only {cached} tokens"
                cold.append(c)
                repeated.append(r)
            out[f"ttft {length}"] = statistics.median(cold)
            out[f"repeated {length}"] = statistics.median(repeated)
        for n in ns.streams:
            out[f"decode {n}"] = statistics.median(
                stream_rate(http, [make_prompt(rng, STREAM_PROMPT) for _ in range(n)],
                            ns.new_tokens)
                for _ in range(ns.reps))
        out["graph steps"] = graph_steps(info)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return out


def graph_steps(info: dict[str, Any]) -> float:
    """Decode steps the decode engines replayed as CUDA graphs, from their /metrics."""
    total = 0.0
    for name, role in info["roles"].items():
        if name.startswith("decode"):
            with urllib.request.urlopen(role["metrics"], timeout=10) as resp:
                for family in text_string_to_metric_families(resp.read().decode()):
                    if family.name == "pantry_engine_cuda_graph_steps":
                        total += sum(s.value for s in family.samples)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokenizer", default="smollm2",
                    help="'smollm2' (the embedded GGUF) or a directory with its tokenizer.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    if ns.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name() if ns.device.startswith("cuda") else "CPU"
    print(f"{where}, torch {torch.__version__}, SmolLM2-135M shape, {ns.dtype}, "
          f"median of {ns.reps}", flush=True)
    rng = random.Random(time.time_ns())
    with tempfile.TemporaryDirectory(prefix="pantry-gpu-serve-") as tmp:
        path = model_dir(Path(tmp), ns.tokenizer)
        ours = pantry_figures(path, Path(tmp) / "local", ns, rng)
        base = transformers_baseline(path, ns.device, getattr(torch, ns.dtype), ns.lengths,
                                     ns.streams, ns.new_tokens, ns.reps, rng)
    rows: list[list[object]] = []
    for length in ns.lengths:
        b = base[f"ttft {length}"]
        for kind in ("ttft", "repeated"):
            p = ours[f"{kind} {length}"]
            rows.append([f"TTFT {'cold' if kind == 'ttft' else 'repeated'} {length} tokens",
                         f"{p * 1000:.1f} ms", f"{b * 1000:.1f} ms", f"{p / b:.2f}"])
    for n in ns.streams:
        p, b = ours[f"decode {n}"], base[f"decode {n}"]
        rows.append([f"decode, {n} stream{'s' if n > 1 else ''}", f"{p:.1f} tok/s",
                     f"{b:.1f} tok/s", f"{p / b:.2f}"])
    print(format_table(["measure", "Pantry (served)", "transformers (in-process)",
                        "Pantry / transformers"], rows))
    print(f"decode steps replayed as CUDA graphs: {ours['graph steps']:.0f}")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"pantry": ours, "transformers": base}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
