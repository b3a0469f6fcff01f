"""`--pool-kv-dtype int8` against full precision, over a fixed prompt set, through a real pool
(in-process master + one node on loopback), in one run:

  bytes   what the pool holds per block and in all, full precision vs int8 (header included)
  tokens  greedy-token agreement: engine A computes each prompt and stores its full blocks;
          engine B, which holds nothing, pulls them (dequantized for int8), computes the tail
          and generates --new-tokens greedily. Full precision through the pool is bit-exact, so
          its tokens are the reference; int8's are compared position by position and by
          the length of the common prefix.

    .venv/bin/python bench/int8_kv.py [--models tiny smollm2] [--new-tokens 32]
        [--prompts 8] [--join 1] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from engine.engine_metrics import PoolClientMetrics  # noqa: E402
from engine.loader import LoadedModel, load_model  # noqa: E402
from engine.pool_transfer import PoolTransfer, layout_fingerprint  # noqa: E402
from engine.runner import ModelRunner, SeqStep  # noqa: E402
from kvstore.block_object import encoded_size  # noqa: E402
from kvstore.client import KVStoreClient  # noqa: E402
from kvstore.config import ClientConfig, MasterConfig, NodeConfig  # noqa: E402
from kvstore.hashing import PoolAddressing  # noqa: E402
from kvstore.master_service import start_master  # noqa: E402
from kvstore.node_service import start_node  # noqa: E402
from pantry.common.config_flags import MIB  # noqa: E402

BLOCK = 16
# The fixed prompt set: plain English of different lengths and subjects (tokenized with the
# model's own tokenizer); a model without one (the tiny random model) gets seeded token ids.
PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press adapted from wine "
    "making. Within fifty years presses were running in more than two hundred cities, and the "
    "price of books fell so far that",
    "To make a sourdough starter, mix equal weights of flour and water in a clean jar, cover it "
    "loosely and leave it somewhere warm. Every day, discard half and feed it again with fresh "
    "flour and water. After about a week the starter should double in size within a few hours "
    "of feeding, which means",
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n"
    "    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:"
    "\n            out.append(a[i])\n            i += 1\n        else:\n",
    "Photosynthesis converts light energy into chemical energy. In the light-dependent "
    "reactions, which take place in the thylakoid membranes, water is split and oxygen is "
    "released; the energy captured is stored in ATP and NADPH. In the Calvin cycle, which runs "
    "in the stroma, these carriers are used to",
    "Dear hiring manager, I am writing to apply for the position of data engineer advertised on "
    "your website. Over the last five years I have designed and operated batch and streaming "
    "pipelines that move several terabytes a day, and I have led a team of four engineers "
    "through a migration from an on-premises cluster to",
    "A train leaves the station at nine in the morning travelling at eighty kilometres an hour. "
    "A second train leaves the same station two hours later on a parallel track travelling at "
    "one hundred and twenty kilometres an hour. To find when the second train catches up with "
    "the first, we note that",
    "The committee met on Tuesday to review the budget for the coming year. The chair opened "
    "by noting that revenue had fallen short of the forecast by six percent, mostly because two "
    "large contracts were delayed. Several members argued that the shortfall should be covered "
    "by",
    "In the mountains the weather changes quickly. A clear morning can turn into a storm by "
    "early afternoon, so experienced hikers start early, carry a waterproof layer even in "
    "summer, and agree on a turnaround time before they set out. When clouds begin to build "
    "over the ridge, the safest choice is usually to",
)


@dataclass(frozen=True)
class Result:
    tokens: list[list[int]]
    object_bytes: int
    blocks: int


def prompts_for(loaded: LoadedModel, count: int, join: int) -> list[list[int]]:
    """`count` prompts, the i-th made of `join` texts from the i-th on (cyclically), so
    `--join` lengthens the context that comes from the pool."""
    if loaded.tokenizer is not None:
        texts = [" ".join(PROMPTS[(i + j) % len(PROMPTS)] for j in range(join))
                 for i in range(count)]
        return [loaded.tokenizer.encode(text) for text in texts]
    g = torch.Generator().manual_seed(0)
    vocab = loaded.config.vocab_size
    return [torch.randint(3, vocab, ((48 + 24 * i) * join,), generator=g).tolist()
            for i in range(count)]


def run(loaded: LoadedModel, prompts: Sequence[list[int]], address: str, pool_kv_dtype: str,
        new_tokens: int) -> Result:
    fingerprint = layout_fingerprint(loaded.model_id, loaded.weights_digest, loaded.dtype, BLOCK,
                                     pool_kv_dtype=pool_kv_dtype)
    addressing = PoolAddressing(fingerprint, BLOCK)
    longest = max(len(p) for p in prompts) + new_tokens + 1
    blocks_each = -(-longest // BLOCK)
    engines = []
    client = KVStoreClient(address, host_id="bench",
                           config=ClientConfig(max_object_bytes=64 * MIB))
    for _ in ("a", "b"):
        runner = ModelRunner(loaded, num_blocks=blocks_each + 1, block_size=BLOCK)
        metrics = PoolClientMetrics(CollectorRegistry(), "bench", f"int8-{pool_kv_dtype}")
        engines.append((runner, PoolTransfer(client, runner.kv, fingerprint, metrics,
                                             pool_kv_dtype)))
    (runner_a, xfer_a), (runner_b, xfer_b) = engines
    outputs: list[list[int]] = []
    stored = 0
    try:
        for prompt in prompts:
            keys = addressing.block_keys(prompt, tenant="bench")
            table = runner_a.allocator.allocate(blocks_each)
            runner_a.step([SeqStep(tuple(prompt), 0, tuple(table))])
            stored += xfer_a.store(keys, table[: len(keys)])
            runner_a.allocator.free(table)

            table = runner_b.allocator.allocate(blocks_each)
            loaded_blocks = xfer_b.load(keys, table[: len(keys)])
            assert loaded_blocks == len(keys), (loaded_blocks, len(keys))
            start = min(loaded_blocks * BLOCK, len(prompt) - 1)
            logits = runner_b.step([SeqStep(tuple(prompt[start:]), start, tuple(table))])
            out: list[int] = []
            for _ in range(new_tokens):
                token = int(logits[0].argmax())
                out.append(token)
                logits = runner_b.step([SeqStep((token,), len(prompt) + len(out) - 1,
                                                tuple(table))])
            runner_b.allocator.free(table)
            outputs.append(out)
    finally:
        client.close()
    layout = xfer_a.layout
    per_object = encoded_size(fingerprint, layout.dtype, layout.shape, xfer_a.payload_nbytes)
    return Result(outputs, per_object, stored)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--join", type=int, default=1,
                    help="texts per prompt (longer prompts: more of the context is int8)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ns = ap.parse_args()
    master = start_master(MasterConfig(port=0, max_object_bytes=64 * MIB))
    address = f"127.0.0.1:{master.port}"
    node = start_node(NodeConfig(master_address=address, node_id="bench-int8",
                                 dram_bytes=1024 * MIB, host_id="bench", heartbeat_s=0.5,
                                 max_object_bytes=64 * MIB, prefault=False))
    time.sleep(1.0)  # the node's first heartbeat registers it
    print(f"int8 KV in the pool vs {ns.dtype} ({ns.device}), {ns.prompts} prompts, "
          f"{ns.new_tokens} greedy tokens each, block {BLOCK}")
    print(f"{'model':10} {'prompt tok':>10} {'blocks':>6} {'bytes/block full':>16} "
          f"{'int8':>8} {'saved':>6} {'tok agree':>9} {'exact seqs':>10} {'mean prefix':>11}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in ns.models:
                spec: str | Path = name
                if name == "tiny":
                    from tests.helpers.tiny_models import make_tiny_model
                    spec = make_tiny_model(Path(tmp) / "tiny-llama", "llama", seed=7)
                loaded = load_model(spec, dtype=getattr(torch, ns.dtype), device=ns.device)
                prompts = prompts_for(loaded, ns.prompts, ns.join)
                full = run(loaded, prompts, address, "auto", ns.new_tokens)
                int8 = run(loaded, prompts, address, "int8", ns.new_tokens)
                positions = sum(len(t) for t in full.tokens)
                agree = sum(x == y for a, b in zip(full.tokens, int8.tokens, strict=True)
                            for x, y in zip(a, b, strict=True))
                prefixes = [common_prefix(a, b)
                            for a, b in zip(full.tokens, int8.tokens, strict=True)]
                exact = sum(p == ns.new_tokens for p in prefixes)
                print(f"{name:10} {statistics.mean(len(p) for p in prompts):>10.0f} "
                      f"{full.blocks:>6} {full.object_bytes:>16} {int8.object_bytes:>8} "
                      f"{1 - int8.object_bytes / full.object_bytes:>6.1%} "
                      f"{agree / positions:>9.1%} {exact:>6}/{len(prompts):<3} "
                      f"{statistics.mean(prefixes):>11.1f}")
                print(f"{'':10} total in the pool: {full.blocks * full.object_bytes / MIB:.2f} MiB "
                      f"full vs {int8.blocks * int8.object_bytes / MIB:.2f} MiB int8 "
                      f"({full.object_bytes / int8.object_bytes:.2f}x smaller)")
    finally:
        node.stop(grace=0)
        master.stop(grace=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
