"""Prometheus metrics for every role: one registry per component, served on its own port.

Each component owns a `CollectorRegistry` (not the process-global one), so tests can run several
conductors or engines in one process and each scrape shows exactly one component's series.
Names follow Prometheus conventions: `pantry_` prefix, `_total` counters, `_seconds` and
`_bytes` units, histograms for latencies.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# Time to first token: from a pool hit on a small model (~10 ms) to a cold long prompt (~30 s).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Time between tokens: a GPU decode step (~5 ms) to a stalled CPU one (~2 s).
TBT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# Pool reads and writes of a batch of blocks: shm memcpy (~0.1 ms) to a slow network (~5 s).
POOL_IO_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


def configure_metrics() -> None:
    """Called once by each role's command line: Prometheus derives rates from the counters
    themselves, so the extra `*_created` series per counter and histogram are only noise."""
    disable_created_metrics()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # a scrape every few seconds is not news


class MetricsServer:
    """GET /metrics for one registry, on a daemon thread; port 0 picks a free port."""

    # serve_forever notices shutdown() only between polls: a short poll lets a role (and every
    # test that starts one) stop in milliseconds rather than half a second.
    POLL_S = 0.02

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd = make_server(host, port, make_wsgi_app(registry), ThreadingWSGIServer,
                                  handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": self.POLL_S},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        self.host = host
        self.port: int = self._httpd.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
