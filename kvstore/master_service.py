"""The running master: its gRPC server (the KVMaster servicer, `kvstore.master_servicer`),
the reaper thread, /metrics, and the leader lease when several masters share one Redis.

With Redis metadata several masters may run on one Redis: one leads, the others stand by
(`kvstore.master_role`: who serves, fencing, gRPC health). `pantry_kv_master_leader` on
/metrics says whether this master leads."""

from __future__ import annotations

import logging
import threading
import time

import grpc

from kvstore.auth import load_token, token_interceptors
from kvstore.config import REGISTER_MESSAGE_BYTES, MasterConfig
from kvstore.errors import NotLeaderError
from kvstore.leader import LeaderLease, Leadership, new_master_id
from kvstore.master import Master
from kvstore.master_role import LEADER, NOT_LEADER, SERVICE_NAME, STANDBY
from kvstore.master_servicer import MasterServicer
from pantry.common.metrics import MetricsServer
from pantry.common.serving import create_grpc_server
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# How soon the KVMaster health status follows a change of leadership.
_HEALTH_TICK_S = 0.2

# Re-exported: tests, charts and `pantry local` name the service and roles from here.
__all__ = ["LEADER", "NOT_LEADER", "SERVICE_NAME", "STANDBY", "MasterServer", "MasterServicer",
           "start_master"]


class MasterServer:
    """A running master: the gRPC server, the reaper thread that drives timeouts, /metrics."""

    def __init__(self, server: grpc.Server, port: int, servicer: MasterServicer,
                 metrics: MetricsServer) -> None:
        self.server = server
        self.port = port
        self.servicer = servicer
        self.metrics = metrics
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="kv-master-reaper",
                                        daemon=True)
        self._reaper.start()

    @property
    def master(self) -> Master:
        """The master being served (a standby that never led has none: AssertionError)."""
        return self.servicer.master

    def leading(self) -> bool:
        return self.servicer.leading()

    def _reap_loop(self) -> None:
        # Health follows leadership within a tick; the reaper runs every reap_interval_s.
        interval = self.servicer.config.reap_interval_s
        tick = min(interval, _HEALTH_TICK_S)
        next_reap = time.monotonic() + interval
        while not self._stop.wait(tick):
            self.servicer.sync_health()
            if time.monotonic() < next_reap:
                continue
            next_reap = time.monotonic() + interval
            if not self.servicer.leading():
                continue  # a standby's state is stale: it must not write to Redis
            try:
                self.master.reap()
            except NotLeaderError as e:
                self.servicer.lost(e)
            except Exception:  # the reaper must survive a bad round; log it loudly
                log.exception("reaper round failed")

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.server.stop(grace).wait()
        self._reaper.join(timeout=5)
        self.metrics.close()
        leading = self.servicer.leading()
        if leading:
            try:
                self.master.close()
            except NotLeaderError as e:  # deposed while stopping: nothing more is ours
                log.warning("%s", e)
                leading = False
        if self.servicer.leadership is not None:
            # Released once the last changes are committed: a standby takes over at once.
            self.servicer.leadership.stop(release=leading)


def start_master(config: MasterConfig, master: Master | None = None) -> MasterServer:
    """A serving master (gRPC with health and reflection, reaper, /metrics)."""
    token = load_token(config.token_file)
    # Redis metadata: whoever holds the leader lease serves (a memory backend is one master).
    elect = master is None and config.metadata.startswith("redis://")
    if master is None and not elect:
        master = Master(config)
    servicer = MasterServicer(config, master)
    metrics = servicer.metrics
    server, port, health_servicer = create_grpc_server(
        config.host, config.port, lambda s: pb_grpc.add_KVMasterServicer_to_server(servicer, s),
        [SERVICE_NAME], max_workers=config.max_workers, thread_name_prefix="kv-master",
        max_message_bytes=REGISTER_MESSAGE_BYTES,
        interceptors=token_interceptors(token, [SERVICE_NAME]))
    servicer.address = config.advertise_address or f"{config.host}:{port}"
    servicer.health = health_servicer
    servicer.sync_health()  # a master that must win the lease first is NOT_SERVING till then
    if elect:
        lease = LeaderLease(config.metadata, new_master_id(), servicer.address,
                            config.lease_ttl_s, timeout_s=config.lease_renew_s / 2)
        servicer.leadership = Leadership(lease, config.lease_ttl_s, config.lease_renew_s,
                                         servicer.take_over, servicer.step_down)
    server.start()
    try:
        metrics_server = MetricsServer(metrics.registry, config.host, config.metrics_port)
    except BaseException:
        server.stop(0)
        raise
    if servicer.leadership is not None:
        servicer.leadership.start()
    log.info("kvstore master %s on %s:%d, metrics at %s",
             "campaigning for the leader lease" if elect else "serving", config.host, port,
             metrics_server.url)
    return MasterServer(server, port, servicer, metrics_server)
