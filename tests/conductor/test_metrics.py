"""The conductor's registry: its own series at zero from the start, and the fleet's last
polled view (role up, engine load, pool status) read at scrape time."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conductor.metrics import ERROR_KINDS, ROUTES
from kvstore.metadata import PoolStatus
from pantry.common.config_flags import MIB
from pantry.common.errors import Unavailable
from tests.conductor.fakes import Rig, engine_load, fake_decode, fake_prefill


def scrape(rig: Rig) -> dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]:
    """Family name -> (type, {sorted labels: value}) from the registry's text exposition."""
    text = generate_latest(rig.conductor.metrics.registry).decode()
    out: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]] = {}
    for family in text_string_to_metric_families(text):
        samples = {(s.name, *sorted(s.labels.items())): s.value for s in family.samples}
        out[family.name] = (family.type, samples)  # type: ignore[assignment]
    return out


def test_own_series_exist_at_zero_before_any_request(pool_address: str) -> None:
    with Rig(pool_address, [fake_prefill("p0")], [fake_decode("d0")]) as rig:
        for kind in ERROR_KINDS:
            assert rig.sample("pantry_conductor_request_errors_total", kind=kind) == 0
        for route in ROUTES:
            assert rig.sample("pantry_conductor_time_to_first_token_seconds_count",
                              route=route) == 0
        for name in ("pantry_conductor_prompt_tokens_total",
                     "pantry_conductor_cached_tokens_total",
                     "pantry_conductor_generated_tokens_total",
                     "pantry_conductor_time_between_tokens_seconds_count",
                     "pantry_conductor_inflight_requests"):
            assert rig.sample(name) == 0, name
        families = scrape(rig)
        # (prometheus_client adds a `_created` gauge per counter and histogram series)
        assert {name: kind for name, (kind, _) in families.items()
                if not name.endswith("_created") and "engine" not in name
                and "pool" not in name} == {
            "pantry_conductor_requests": "counter",
            "pantry_conductor_prompt_tokens": "counter",
            "pantry_conductor_cached_tokens": "counter",
            "pantry_conductor_generated_tokens": "counter",
            "pantry_conductor_request_errors": "counter",
            "pantry_conductor_time_to_first_token_seconds": "histogram",
            "pantry_conductor_time_between_tokens_seconds": "histogram",
            "pantry_conductor_inflight_requests": "gauge",
            "pantry_conductor_role_up": "gauge",
        }


def test_before_the_first_poll_only_role_up_is_shown(pool_address: str) -> None:
    with Rig(pool_address, [fake_prefill("p0")], [fake_decode("d0")]) as rig:
        families = scrape(rig)
        assert families["pantry_conductor_role_up"][1] == {
            ("pantry_conductor_role_up", ("engine", "p0"), ("role", "prefill")): 1.0,
            ("pantry_conductor_role_up", ("engine", "d0"), ("role", "decode")): 1.0,
            ("pantry_conductor_role_up", ("engine", "kvstore"), ("role", "kvstore")): 1.0,
        }
        assert families["pantry_conductor_engine_kv_free_blocks"][1] == {}
        assert "pantry_conductor_pool_objects" not in families


def test_polled_engine_load_and_pool_status(pool_address: str) -> None:
    pre = fake_prefill("p0", load_value=engine_load(
        free_blocks=90, waiting=1, running=2, total_blocks=100, requests_total=12,
        computed_tokens_total=3000, pool_tokens_total=640, busy_seconds_total=4.5))
    dec = fake_decode("d0", load_value=engine_load(free_blocks=7, total_blocks=50))
    with Rig(pool_address, [pre], [dec]) as rig:
        rig.cache(range(3, 3 + 48))  # three blocks
        assert rig.run(rig.conductor.fleet.refresh()) == {
            "prefill:p0": True, "decode:d0": True, "kvstore": True}
        families = scrape(rig)
        p0 = (("engine", "p0"), ("role", "prefill"))
        d0 = (("engine", "d0"), ("role", "decode"))
        expected = {
            "pantry_conductor_engine_waiting_requests": ("gauge", 1, 0),
            "pantry_conductor_engine_running_requests": ("gauge", 2, 0),
            "pantry_conductor_engine_kv_free_blocks": ("gauge", 90, 7),
            "pantry_conductor_engine_kv_blocks": ("gauge", 100, 50),
            "pantry_conductor_engine_requests": ("counter", 12, 0),
            "pantry_conductor_engine_computed_tokens": ("counter", 3000, 0),
            "pantry_conductor_engine_pool_tokens": ("counter", 640, 0),
            "pantry_conductor_engine_busy_seconds": ("counter", 4.5, 0),
        }
        for name, (kind, p_value, d_value) in expected.items():
            sample = name + ("_total" if kind == "counter" else "")
            assert families[name] == (kind, {(sample, *p0): p_value, (sample, *d0): d_value})
        status = rig.conductor.fleet.pool_status
        assert isinstance(status, PoolStatus)
        pool = {name: family for name, family in families.items()
                if name.startswith("pantry_conductor_pool_")}
        assert pool == {
            "pantry_conductor_pool_capacity_bytes":
                ("gauge", {("pantry_conductor_pool_capacity_bytes",): 32 * MIB}),
            "pantry_conductor_pool_used_bytes":
                ("gauge", {("pantry_conductor_pool_used_bytes",): status.used_bytes}),
            "pantry_conductor_pool_objects":
                ("gauge", {("pantry_conductor_pool_objects",): 3}),
            "pantry_conductor_pool_nodes_alive":
                ("gauge", {("pantry_conductor_pool_nodes_alive",): 1}),
            "pantry_conductor_pool_hits": ("counter", {("pantry_conductor_pool_hits_total",): 0}),
            "pantry_conductor_pool_misses":
                ("counter", {("pantry_conductor_pool_misses_total",): 0}),
            "pantry_conductor_pool_evictions":
                ("counter", {("pantry_conductor_pool_evictions_total",): 0}),
            "pantry_conductor_pool_puts_sealed":
                ("counter", {("pantry_conductor_pool_puts_sealed_total",): 3}),
        }
        assert status.used_bytes == 3 * 4096  # one 4 KiB slot per block


def test_a_role_that_stops_answering_is_down_and_its_numbers_go(pool_address: str) -> None:
    pre = fake_prefill("p0")
    with Rig(pool_address, [pre], [fake_decode("d0")]) as rig:
        fleet = rig.conductor.fleet
        rig.run(fleet.refresh())
        assert rig.sample("pantry_conductor_engine_kv_free_blocks",
                          role="prefill", engine="p0") == 100
        pre.load_error = Unavailable("engine fake-p0:0: UNAVAILABLE")
        rig.pool.close()
        assert rig.run(fleet.refresh()) == {
            "prefill:p0": False, "decode:d0": True, "kvstore": False}
        assert rig.sample("pantry_conductor_role_up", role="prefill", engine="p0") == 0
        assert rig.sample("pantry_conductor_role_up", role="decode", engine="d0") == 1
        assert rig.sample("pantry_conductor_role_up", role="kvstore", engine="kvstore") == 0
        assert rig.sample("pantry_conductor_engine_kv_free_blocks",
                          role="prefill", engine="p0") is None
        assert rig.sample("pantry_conductor_pool_objects") is None


def test_each_conductor_has_its_own_registry(pool_address: str) -> None:
    with Rig(pool_address, [fake_prefill("p0")], [fake_decode("d0")]) as one, \
            Rig(pool_address, [fake_prefill("p1")], [fake_decode("d1")]) as two:
        one.conductor.metrics.request_errors.labels(kind="invalid").inc()
        assert one.sample("pantry_conductor_request_errors_total", kind="invalid") == 1
        assert two.sample("pantry_conductor_request_errors_total", kind="invalid") == 0
        assert two.sample("pantry_conductor_role_up", role="prefill", engine="p1") == 1
        assert two.sample("pantry_conductor_role_up", role="prefill", engine="p0") is None
