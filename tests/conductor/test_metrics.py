"""Prometheus text rendering of counters, histograms and gauges, line by line."""

from __future__ import annotations

import threading

import pytest

from conductor.metrics import Metrics


def test_counter_lines_with_and_without_labels() -> None:
    m = Metrics()
    m.counter("reqs_total", "Requests.")
    m.counter("tokens_total", "Tokens.")
    m.inc("reqs_total", route="chat", finish="stop")
    m.inc("reqs_total", route="chat", finish="stop")
    m.inc("reqs_total", route="completions", finish="length")
    m.inc("tokens_total", 40)
    m.inc("tokens_total", 2.5)
    assert m.render() == (
        "# HELP reqs_total Requests.\n"
        "# TYPE reqs_total counter\n"
        'reqs_total{finish="length",route="completions"} 1\n'
        'reqs_total{finish="stop",route="chat"} 2\n'
        "# HELP tokens_total Tokens.\n"
        "# TYPE tokens_total counter\n"
        "tokens_total 42.5\n"
    )
    assert m.value("reqs_total", finish="stop", route="chat") == 2
    assert m.value("reqs_total", route="chat", finish="stop") == 2   # label order irrelevant
    assert m.value("reqs_total", route="nope") == 0


def test_declared_counter_without_series_renders_only_help_and_type() -> None:
    m = Metrics()
    m.counter("errors_total", "Errors.")
    assert m.render() == "# HELP errors_total Errors.\n# TYPE errors_total counter\n"


def test_histogram_lines_are_cumulative_with_inf_count_and_sum() -> None:
    m = Metrics()
    m.histogram("ttft_seconds", "TTFT.", (0.1, 0.5, 1.0))
    for v in (0.05, 0.1, 0.3, 2.0):
        m.observe("ttft_seconds", v, route="chat")
    m.observe("ttft_seconds", 0.7, route="api")
    assert m.render() == (
        "# HELP ttft_seconds TTFT.\n"
        "# TYPE ttft_seconds histogram\n"
        'ttft_seconds_bucket{route="api",le="0.1"} 0\n'
        'ttft_seconds_bucket{route="api",le="0.5"} 0\n'
        'ttft_seconds_bucket{route="api",le="1"} 1\n'
        'ttft_seconds_bucket{route="api",le="+Inf"} 1\n'
        'ttft_seconds_count{route="api"} 1\n'
        'ttft_seconds_sum{route="api"} 0.7\n'
        'ttft_seconds_bucket{route="chat",le="0.1"} 2\n'
        'ttft_seconds_bucket{route="chat",le="0.5"} 3\n'
        'ttft_seconds_bucket{route="chat",le="1"} 3\n'
        'ttft_seconds_bucket{route="chat",le="+Inf"} 4\n'
        'ttft_seconds_count{route="chat"} 4\n'
        'ttft_seconds_sum{route="chat"} 2.45\n'
    )


def test_unlabelled_histogram() -> None:
    m = Metrics()
    m.histogram("h", "H.", (1.0,))
    m.observe("h", 3.0)
    assert m.render().splitlines()[2:] == [
        'h_bucket{le="1"} 0', 'h_bucket{le="+Inf"} 1', "h_count 1", "h_sum 3",
    ]


def test_observe_into_undeclared_histogram_raises() -> None:
    with pytest.raises(KeyError):
        Metrics().observe("nope", 1.0)


def test_metrics_sorted_by_name_then_gauges() -> None:
    m = Metrics()
    m.counter("b_total", "B.")
    m.histogram("a_seconds", "A.", (1.0,))
    m.inc("b_total")
    gauges = {"z_free_blocks": ("Free blocks.", {(("engine", "d0"),): 12.0, (): 3.0})}
    lines = m.render(gauges).splitlines()
    assert [ln for ln in lines if ln.startswith("# TYPE")] == [
        "# TYPE a_seconds histogram", "# TYPE b_total counter", "# TYPE z_free_blocks gauge",
    ]
    assert lines[-4:] == [
        "# HELP z_free_blocks Free blocks.", "# TYPE z_free_blocks gauge",
        "z_free_blocks 3", 'z_free_blocks{engine="d0"} 12',
    ]


def test_concurrent_increments_are_not_lost() -> None:
    m = Metrics()
    m.counter("c_total", "C.")

    def work() -> None:
        for _ in range(2000):
            m.inc("c_total", kind="x")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.value("c_total", kind="x") == 8000


def test_large_counter_renders_exactly() -> None:
    m = Metrics()
    m.counter("pantry_prompt_tokens_total", "Prompt tokens received.")
    m.inc("pantry_prompt_tokens_total", 1234567)
    assert "pantry_prompt_tokens_total 1234567\n" in m.render()
