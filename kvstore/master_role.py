"""Whether this master serves the pool: the leader/standby role of a master process, for its
gRPC edge (`kvstore.master_servicer`).

A master on the memory backend (or handed a `Master`) always leads. With Redis metadata the one
holding the leader lease (`kvstore.leader`) serves and the others stand by, answering every call
UNAVAILABLE with the leader's name, until they take the lease over and rebuild their `Master`
from Redis, in a backend fenced on their lease (`kvstore.redis_metadata`): a commit refused
because the lease moved on while a call was under way fails that call UNAVAILABLE "no longer
the leader", and the master stands by at once.

gRPC health: the overall service "" stays SERVING while the process is up (liveness: a standby
is healthy), "pantry.v1.KVMaster" is SERVING only while this master leads (NOT_SERVING on a
standby), so a probe of that name finds the leader."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2

from kvstore.config import MasterConfig
from kvstore.errors import NotLeaderError
from kvstore.leader import Leadership
from kvstore.master import Master
from kvstore.master_link import STANDBY_PREFIX
from kvstore.redis_metadata import RedisBackend
from pantry.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVMaster"].full_name
# How a master whose fenced commit was refused answers the call that made it (UNAVAILABLE: a
# MasterLink retries it on the other masters).
NOT_LEADER = "no longer the leader"
LEADER, STANDBY = "leader", "standby"


class MasterRole:
    def __init__(self, config: MasterConfig, master: Master | None) -> None:
        """`master`: the one to serve; None for a master that must win the leader lease first
        (`leadership` set before serving), which builds its own when elected."""
        self.config = config
        self._master = master
        self.leadership: Leadership | None = None
        # The fenced Redis backend of the master we lead with (None: not elected, or memory).
        self._backend: RedisBackend | None = None
        # The address this master serves on (set once its port is bound): the leader's own.
        self.address = ""
        # Set by start_master: the KVMaster service's health follows `leading()`.
        self.health: health.HealthServicer | None = None
        self._health_serving: bool | None = None

    @property
    def master(self) -> Master:
        assert self._master is not None, "only a leading master serves calls"
        return self._master

    def leading(self) -> bool:
        return self._master is not None and (self.leadership is None
                                             or self.leadership.leading())

    def role(self) -> str:
        return LEADER if self.leading() else STANDBY

    def check_leading(self, context: grpc.ServicerContext) -> None:
        if not self.leading():
            leader = None if self.leadership is None else self.leadership.leader_address()
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          STANDBY_PREFIX + leader if leader else
                          "standby; no leader yet (the lease is being taken over)")

    def refuse(self, error: NotLeaderError, context: grpc.ServicerContext) -> None:
        """The call's commit was refused: stand by, and fail the call UNAVAILABLE."""
        self.lost(error)
        context.abort(grpc.StatusCode.UNAVAILABLE,
                      f"{NOT_LEADER}: the leader lease moved on while this call was served; "
                      "nothing of it was stored, try the leader")

    def take_over(self) -> None:
        """Elected: rebuild the pool's state from Redis, in a backend fenced on our lease. A
        master deposed earlier drops what it held without committing it (the new leader's
        records are the truth now)."""
        assert self.leadership is not None, "only an elected master takes over"
        if self._backend is not None:
            self._backend.depose()  # a call still running on the old master writes nothing
        self._backend = RedisBackend(self.config.metadata, fence=self.leadership.fence)
        self._master = Master(self.config, backend=self._backend)

    def step_down(self) -> None:
        if self._backend is not None:
            self._backend.depose()
        log.warning("standing by: no longer serving the pool")
        self.sync_health()

    def lost(self, error: NotLeaderError) -> None:
        """A fenced commit was refused: stop serving at once (the lease thread then stands by
        as for any lost lease)."""
        log.warning("%s; standing by", error)
        if self.leadership is not None:
            self.leadership.lost()
        self.sync_health()

    def sync_health(self) -> None:
        """KVMaster's health to what `leading()` says now (set only when it changed, so health
        watchers hear of changes only)."""
        serving = self.leading()
        if self.health is None or serving == self._health_serving:
            return
        self._health_serving = serving
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING if serving
                        else health_pb2.HealthCheckResponse.NOT_SERVING)
