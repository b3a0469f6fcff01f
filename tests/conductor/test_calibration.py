"""A cost model from measurements on running engines: exact fits on hand-made samples, and the
simulator running on it."""

from __future__ import annotations

import pytest

from conductor.calibration import CachedRepeat, ColdPrefill, calibrate, fit_line
from conductor.cost_model import ClusterSpec
from conductor.simulator import simulate
from conductor.trace import TraceRequest
from pantry.cli.replay import scale_trace
from pantry.common.errors import ConfigError


def test_fit_line_is_least_squares_clamped_at_zero() -> None:
    assert fit_line([(0, 1.0), (10, 3.0), (20, 5.0)]) == pytest.approx((1.0, 0.2))
    # Noise that would tilt the line below zero gives a flat line at the mean.
    assert fit_line([(10, 2.0), (20, 1.0)]) == (1.5, 0.0)
    # A steep line whose intercept comes out negative: the intercept is clamped, not the slope.
    assert fit_line([(10, 0.5), (20, 2.5)]) == (0.0, pytest.approx(0.2))
    with pytest.raises(ConfigError, match="two different prompt lengths"):
        fit_line([(8, 1.0), (8, 2.0)])


def test_calibrate_prefill_decode_and_transfer() -> None:
    cold = [ColdPrefill(17, 0.010 + 17e-3, 0.004), ColdPrefill(33, 0.010 + 33e-3, 0.006),
            ColdPrefill(65, 0.010 + 65e-3, 0.0)]
    # The 33-token repeat read 4 blocks of 8 and computed 1 token: 11 ms of compute, so the
    # 4 blocks took 8 ms; the 17-token one found nothing cached and does not count.
    repeats = [CachedRepeat(33, 4, 8, 0.019), CachedRepeat(17, 0, 8, 0.5)]
    c = calibrate(cold, repeats)
    assert c.prefill_fixed_s == pytest.approx(0.010)
    assert c.prefill_per_token_s == pytest.approx(1e-3)
    assert c.decode_step_s == pytest.approx(0.005)   # the single-token probe has no gap
    assert c.transfer_per_block_s == pytest.approx(0.002)
    assert c.prefill_model().predict(100, 0) == pytest.approx(0.110)
    assert c.transfer_model().seconds("remote") == pytest.approx(0.002)
    assert c.decode_model().predict(7, 10_000) == pytest.approx(0.005)


def test_simulator_runs_on_a_calibration() -> None:
    c = calibrate([ColdPrefill(8, 0.1 + 8 * 0.01, 0.0), ColdPrefill(16, 0.1 + 16 * 0.01, 0.0)],
                  [CachedRepeat(17, 2, 8, 0.1 + 0.01 + 2 * 0.05)])
    spec = ClusterSpec(prefill_engines=1, decode_engines=1)
    trace = [TraceRequest(0, 16 * 64, 64, (1, 2)), TraceRequest(1000, 24 * 64, 64, (1, 2, 3))]
    arrivals, scaled = scale_trace(trace, spec, 2.0, 1 / 64)
    assert scaled.block_tokens == 8
    assert [(r.timestamp_ms, r.input_length, r.output_length) for r in arrivals] == [
        (0, 16, 1), (2000, 24, 1)]
    result = simulate(arrivals, scaled, "pantry", models=c)
    # First: 16 tokens cold. Second, 2 s later on the idle engine: blocks 1, 2 from the pool
    # (50 ms each), 8 tokens computed.
    assert [o.ttft_s for o in result.outcomes] == [pytest.approx(0.26), pytest.approx(0.28)]
    assert [o.reused_blocks for o in result.outcomes] == [0, 2]
