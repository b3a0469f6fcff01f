"""`pantry local`'s options: the engine settings it passes on keep the engines' defaults, help
and checks, so a bad value fails before any process starts."""

from __future__ import annotations

import dataclasses

import pytest

from engine.role_config import EngineRoleConfig
from pantry.cli.local_options import LocalOptions
from pantry.common.errors import ConfigError


@pytest.mark.parametrize("name", ["device", "dtype", "pool_kv_dtype", "cuda_graphs"])
def test_engine_settings_are_the_engines_own(name: str) -> None:
    ours = {f.name: f for f in dataclasses.fields(LocalOptions)}[name]
    theirs = {f.name: f for f in dataclasses.fields(EngineRoleConfig)}[name]
    assert ours.default == theirs.default
    assert ours.metadata["help"] == theirs.metadata["help"]


def test_defaults_are_cpu_float32_exact_pool_kv() -> None:
    options = LocalOptions()
    assert (options.device, options.dtype, options.pool_kv_dtype, options.cuda_graphs) == (
        "cpu", "float32", "auto", True)
    gpu = LocalOptions(device="cuda:0", dtype="bfloat16", pool_kv_dtype="int8")
    assert (gpu.device, gpu.dtype, gpu.pool_kv_dtype) == ("cuda:0", "bfloat16", "int8")


@pytest.mark.parametrize(("setting", "message"), [
    ({"device": "gpu"}, "device: 'gpu' must be cpu, cuda or cuda:N"),
    ({"dtype": "int4"}, "dtype: 'int4' must be one of float32, bfloat16, float16"),
    ({"pool_kv_dtype": "fp8"}, "pool_kv_dtype: 'fp8' must be one of auto, int8"),
    ({"cpu_split": "half"}, "cpu_split: 'half' must be one of adaptive, shared, pin"),
])
def test_a_bad_engine_setting_is_refused_before_anything_starts(setting: dict[str, str],
                                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LocalOptions(**setting)  # type: ignore[arg-type]
