"""The GPU path: `--device cuda --dtype bfloat16` on the engine roles.

On CUDA: greedy generation through the runner equals transformers' (float32: token for token;
bfloat16: the first token and logits within bfloat16 rounding), batched decode through the Triton
kernel equals one sequence at a time, the model's forward never waits on the device (the sampled
ids are the one thing a step brings back), and blocks move through a real pool in and out of a
GPU cache (float and int8). Without CUDA those tests skip with the reason; the settings and the
bfloat16 plumbing are still checked on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from decode.engine import DecodeEngine
from decode.sequence import DecodeJob
from engine.attention_batch import AttentionBatch
from engine.kv_cache import PagedKVCache
from engine.loader import LoadedModel, load_model
from engine.role_config import EngineRoleConfig
from engine.role_core import EngineCore
from engine.role_server import build_core
from engine.runner import ModelRunner
from engine.sampling import Sampler
from engine.triton_kernels import reference_dequantize_int8, reference_quantize_int8
from kvstore.hashing import PoolAddressing
from pantry.common.errors import ConfigError
from pantry.common.sampling import SamplingParams
from prefill.engine import PrefillEngine, PrefillJob
from tests.decode.engine_rig import hf_greedy, pool_client, prompt, running_pool
from tests.engine.test_kv_int8 import _transfer
from tests.engine.test_runner_vs_transformers import NEW_TOKENS, Seq, prompt_ids, run_greedy
from tests.helpers.tiny_models import make_tiny_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA device: torch.cuda.is_available() is False on this machine")


def _hf(path: Path, dtype: torch.dtype, device: str) -> Any:
    hf: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None  # the runner never stops on EOS; nor may the oracle
    hf.generation_config.pad_token_id = 0
    return hf


def _hf_greedy(hf: Any, prompt: list[int], device: str) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = hf.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        logits = hf(ids).logits[0, -1].float()
    return out[0, len(prompt):].tolist(), logits


# ---- settings, on any machine -------------------------------------------------------------------


def test_device_and_dtype_settings() -> None:
    base = dict(model="m", kv_master="h:1", engine_id="e")
    default = EngineRoleConfig(**base)  # type: ignore[arg-type]
    assert (default.device, default.dtype) == ("cpu", "float32")
    gpu = EngineRoleConfig(**base, device="cuda:1", dtype="bfloat16")  # type: ignore[arg-type]
    assert (gpu.device, gpu.dtype) == ("cuda:1", "bfloat16")
    with pytest.raises(ConfigError, match="device: 'gpu' must be cpu, cuda or cuda:N"):
        EngineRoleConfig(**base, device="gpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dtype: 'int4' must be one of float32, bfloat16"):
        EngineRoleConfig(**base, dtype="int4")  # type: ignore[arg-type]


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_a_config_error(tiny_llama: Path) -> None:
    config = EngineRoleConfig(model=str(tiny_llama), kv_master="127.0.0.1:1", engine_id="g",
                              device="cuda")
    with pytest.raises(ConfigError, match="device: cuda asked for, but torch sees no CUDA"):
        build_core(config, "decode")


def test_bfloat16_runner_equals_transformers_first_step(tiny_llama: Path) -> None:
    """The dtype plumbing (weights, rotary, cache, attention) in bfloat16 on CPU: the prompt's
    logits are transformers' bfloat16 logits exactly."""
    loaded = load_model(tiny_llama, dtype=torch.bfloat16)
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    runner = ModelRunner(loaded, num_blocks=8, block_size=16)
    assert runner.kv.k.dtype == torch.bfloat16
    prompt = prompt_ids(40, seed=3)
    logits = runner.step([Seq(runner, prompt).step_for(40)])[0]
    _, ref = _hf_greedy(_hf(tiny_llama, torch.bfloat16, "cpu"), prompt, "cpu")
    assert torch.equal(logits, ref)


# ---- on CUDA ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_models(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[Path, LoadedModel]]:
    return {v: (tiny_model_dirs[v], load_model(tiny_model_dirs[v], device="cuda"))
            for v in ("llama", "qwen2", "mistral")}


@needs_cuda
@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("length", [5, 16, 40])
def test_cuda_float32_greedy_matches_transformers(cuda_models: dict, variant: str,
                                                  length: int) -> None:
    path, loaded = cuda_models[variant]
    assert loaded.model.lm_head.weight.is_cuda
    prompt = prompt_ids(length, seed=length)
    ours, first_logits = run_greedy(loaded, prompt)
    want, ref = _hf_greedy(_hf(path, torch.float32, "cuda"), prompt, "cuda")
    assert ours == want
    torch.testing.assert_close(first_logits, ref, atol=1e-3, rtol=1e-3)


@needs_cuda
def test_cuda_bfloat16_first_token_matches_transformers(tiny_model_dirs: dict[str, Path]
                                                        ) -> None:
    path = tiny_model_dirs["llama"]
    loaded = load_model(path, dtype=torch.bfloat16, device="cuda")
    prompt = prompt_ids(40, seed=3)
    ours, first_logits = run_greedy(loaded, prompt)
    want, ref = _hf_greedy(_hf(path, torch.bfloat16, "cuda"), prompt, "cuda")
    assert ours[0] == want[0]
    # A few bfloat16 steps (1/32 between 4 and 8) of different summation orders.
    assert (first_logits - ref).abs().max().item() <= 0.125


@needs_cuda
def test_cuda_prompts_take_flash_attention_not_cudnn(tiny_llama: Path) -> None:
    """cuDNN's attention builds a plan for every new prompt length (~100 ms each on an H200):
    the runner turns it off, so prompts of new lengths take flash attention as they come."""
    from torch.profiler import ProfilerActivity, profile

    from engine.runner import SeqStep

    runner = ModelRunner(load_model(tiny_llama, dtype=torch.bfloat16, device="cuda"),
                         num_blocks=16)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for n in (23, 37):
            runner.step([SeqStep(tuple(prompt_ids(n, seed=n)), 0, tuple(range(-(-n // 16))))])
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention" in ops
    assert not any("cudnn_attention" in op for op in ops)


@needs_cuda
def test_cuda_sliding_window_matches_transformers(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "mistral-sw", "mistral", seed=11, sliding_window=8)
    loaded = load_model(path, device="cuda")
    prompt = prompt_ids(40, seed=90)
    ours, _ = run_greedy(loaded, prompt, chunks=[3, 37])
    assert ours == _hf_greedy(_hf(path, torch.float32, "cuda"), prompt, "cuda")[0]


@needs_cuda
def test_cuda_batched_decode_equals_one_at_a_time(cuda_models: dict) -> None:
    """Three sequences of ragged lengths decode together through the Triton kernel."""
    _, loaded = cuda_models["qwen2"]
    prompts = [prompt_ids(n, seed=n + 1) for n in (5, 17, 33)]
    alone = [run_greedy(loaded, p)[0] for p in prompts]
    runner = ModelRunner(loaded, num_blocks=32, block_size=16)
    seqs = [Seq(runner, p) for p in prompts]
    logits = runner.step([s.step_for(len(s.tokens)) for s in seqs])
    outs: list[list[int]] = [[] for _ in seqs]
    for _ in range(NEW_TOKENS):
        for i, s in enumerate(seqs):
            token = int(logits[i].argmax())
            outs[i].append(token)
            s.tokens.append(token)
        logits = runner.step([s.step_for(1) for s in seqs])
    assert outs == alone


@needs_cuda
def test_cuda_decode_forward_never_waits_on_the_device(cuda_models: dict) -> None:
    """With the step's metadata built, the forward (attention through the Triton kernel
    included) and greedy sampling synchronize once: the sampled ids coming back."""
    _, loaded = cuda_models["llama"]
    runner = ModelRunner(loaded, num_blocks=16, block_size=16)
    seqs = [Seq(runner, prompt_ids(n, seed=n)) for n in (9, 20)]
    runner.step([s.step_for(len(s.tokens)) for s in seqs])
    for s in seqs:
        s.tokens.append(7)
    steps = [s.step_for(1) for s in seqs]
    batch = AttentionBatch.build([1, 1], [st.start_pos for st in steps],
                                 [st.block_table for st in steps], 16, device="cuda")
    ids = torch.tensor([7, 7], device="cuda")
    positions = torch.tensor([st.start_pos for st in steps], device="cuda")
    last = torch.tensor([0, 1], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            hidden = runner.model(ids, positions, batch, runner.kv)
            logits = runner.model.compute_logits(hidden.index_select(0, last)).float()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    tokens = Sampler().sample(logits, [greedy, greedy], [None, None])
    assert tokens == logits.argmax(-1).tolist()


@pytest.fixture(scope="module")
def pool_address() -> Iterator[str]:
    with running_pool("gpu") as address:
        yield address


@needs_cuda
@pytest.mark.parametrize("pool_kv_dtype", ["auto", "int8"])
def test_cuda_blocks_round_trip_through_the_pool(pool_address: str, pool_kv_dtype: str) -> None:
    """Gather kernel, one copy to the host, the pool, one copy back, scatter kernel; int8 also
    quantized and dequantized by the Triton kernels, equal to the torch reference's result."""
    def cache(seed: int) -> PagedKVCache:
        c = PagedKVCache(2, 8, 16, 2, 8, torch.bfloat16, device="cuda")
        g = torch.Generator().manual_seed(seed)
        c.k.copy_(torch.randn(c.k.shape, generator=g))
        c.v.copy_(torch.randn(c.v.shape, generator=g))
        return c

    src, dst = cache(1), cache(2)
    keys = PoolAddressing(f"fp-gpu-{pool_kv_dtype}", 16).block_keys(list(range(48)), tenant="t")
    with pool_client(pool_address) as client:
        writer, _ = _transfer(client, src, f"fp-gpu-{pool_kv_dtype}", pool_kv_dtype)
        reader, _ = _transfer(client, dst, f"fp-gpu-{pool_kv_dtype}", pool_kv_dtype)
        assert writer.store(keys, [0, 1, 2]) == 3
        assert reader.load(keys, [5, 6, 7]) == 3
    for s, d in ((0, 5), (1, 6), (2, 7)):
        block = src.read_block(s)
        got = dst.read_block(d)
        if pool_kv_dtype == "auto":
            assert torch.equal(got, block)
        else:
            q, scales = reference_quantize_int8(block.cpu())
            want = reference_dequantize_int8(q, scales, torch.bfloat16)
            # The GPU's division may round a tie the other way: one step at most, plus the
            # bfloat16 rounding of both sides (half a step of 1/32 each below 8).
            assert bool(((got.cpu().float() - want.float()).abs()
                         <= scales[..., None] + 1 / 32).all())
            assert (got.cpu().float() == want.float()).float().mean() > 0.99


@needs_cuda
@pytest.mark.parametrize("pool_kv_dtype", ["auto", "int8"])
def test_cuda_prefill_to_decode_through_the_pool(tiny_llama: Path, pool_address: str,
                                                  pool_kv_dtype: str) -> None:
    """Both roles on the GPU: prefill stores the prompt's blocks, decode pulls them and streams
    the rest. At full precision the output is transformers'; int8 changes the KV only within
    half a quantization step, so the first tokens (computed by prefill) still agree."""
    ids = prompt(40, seed=12)
    expected = hf_greedy(tiny_llama, ids, 8)

    def core(role: str) -> EngineCore:
        config = EngineRoleConfig(model=str(tiny_llama), kv_master=pool_address,
                                  engine_id=f"{role}-gpu-{pool_kv_dtype}", block_size=16,
                                  kv_cache_bytes=1 << 20, device="cuda",
                                  pool_kv_dtype=pool_kv_dtype)
        return EngineCore(config, role, load_model(config.model, device="cuda"),
                          pool_client(pool_address))

    pcore = core("prefill")
    try:
        pre = PrefillEngine(pcore).prefill(
            PrefillJob("r", ids, "", SamplingParams(temperature=0.0, max_tokens=8,
                                                    ignore_eos=True)))
    finally:
        pcore.close()
    assert pre.first_token == expected[0]
    engine = DecodeEngine(core("decode"))
    try:
        handle = engine.submit(DecodeJob(request_id="r", token_ids=ids, tenant="",
                                         sampling=SamplingParams(temperature=0.0, max_tokens=8,
                                                                 ignore_eos=True),
                                         first_token=pre.first_token))
        events = list(handle.events(timeout=60.0))
    finally:
        engine.stop()
        engine.core.close()
    tokens = tuple(t for e in events for t in e.token_ids)
    # Both full blocks and the 8-token tail came from the pool: none of the prompt computed.
    assert (events[0].pool_tokens, events[0].computed_tokens) == (40, 0)
    if pool_kv_dtype == "auto":
        assert tokens == expected
    else:
        assert tokens[0] == expected[0] and len(tokens) == 8
