"""Token sampling: greedy, temperature, top-k and top-p, reproducible per request seed.

The settings themselves (SamplingParams) live in pantry.common.sampling, torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pantry.common.sampling import SamplingParams


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


class Sampler:
    def sample(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> list[int]:
        """One token per row of logits [B, vocab]."""
        assert logits.dim() == 2 and logits.shape[0] == len(params) == len(generators)
        logits = logits.float()
        # One argmax for the batch and one copy of its ids to the host: on a GPU the sampled ids
        # are the only thing a step brings back. Rows that sample use the request's CPU
        # generator (the same draws on any device), so only those rows are copied whole.
        greedy = torch.argmax(logits, dim=-1).tolist()
        host = None if all(p.greedy for p in params) else logits.cpu()
        out: list[int] = []
        for i, (p, gen) in enumerate(zip(params, generators, strict=True)):
            if p.greedy:
                out.append(int(greedy[i]))
            else:
                assert host is not None
                out.append(_sample_row(host[i], p, gen))
        return out


def _sample_row(row: Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    row = (row / p.temperature).cpu()
    if 0 < p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top one survives.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        drop[0] = False
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(row, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
