"""Which master leads: a lease key in the Redis that holds the pool's metadata.

Several `kvstore master` processes may share one Redis. The one holding the lease key serves;
the others are standbys that keep trying to take it. The key's value names its holder (a
unique id and the address it serves on, so a standby can point callers at the leader) and it
expires `ttl_s` after the last renewal. Taking it is `SET NX PX`; renewing and releasing are
compare-and-set scripts, so a master can only ever extend or drop its own lease.

Safety rests on time, not on the renewal thread being scheduled: `Leadership.leading()` is
True only until `renewal sent + ttl_s - margin`, and the lease cannot lapse before
`renewal sent + ttl_s`. A leader that cannot renew (Redis unreachable, the process paused)
stops serving before any standby can take over, so two leaders never serve at once.

That check is made when a call starts; a call paused after it (a GC pause, a stalled thread)
could still commit after the lease moved on. So every commit is fenced too: the metadata write
is a Redis script that applies it only while the lease key holds this master's value (`fence`),
and a refused commit makes the master stand down at once (`lost`).

Pure of gRPC: the master's servicer asks `leading()` on every call.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import cast

import redis

log = logging.getLogger(__name__)

LEASE_KEY = "pantry:kv:leader"

# KEYS[1] lease key, ARGV[1] our value, ARGV[2] ttl ms: extend it only while it is ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def new_master_id() -> str:
    """Unique per master run: a restarted master on the same address is another holder."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


class LeaderLease:
    """The lease key itself: one Redis round trip per call, no state beyond the holder's value.
    Every call raises redis.RedisError when Redis does not answer within `timeout_s`."""

    def __init__(self, url: str, master_id: str, address: str, ttl_s: float,
                 timeout_s: float) -> None:
        assert " " not in master_id, "the holder's value is '<id> <address>'"
        self.value = f"{master_id} {address}"
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it (or we already do: then renew it)."""
        if self._redis.set(LEASE_KEY, self.value, nx=True, px=self.ttl_ms):
            return True
        return self.renew()

    def renew(self) -> bool:
        """Extend the lease by the full TTL; False when it is not ours (lapsed, taken)."""
        return bool(self._renew(keys=[LEASE_KEY], args=[self.value, self.ttl_ms]))

    def release(self) -> bool:
        """Drop the lease if it is still ours, so a standby takes over at once."""
        return bool(self._release(keys=[LEASE_KEY], args=[self.value]))

    def holder(self) -> tuple[str | None, float]:
        """The address the current holder serves on (None when nobody holds the lease) and
        the seconds its lease has left (0 when none)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(LEASE_KEY)
        pipe.pttl(LEASE_KEY)
        value, pttl = cast(tuple[str | None, int], tuple(pipe.execute()))
        if not value:
            return None, 0.0
        return value.partition(" ")[2] or None, max(pttl, 0) / 1000

    def holder_address(self) -> str | None:
        return self.holder()[0]

    def close(self) -> None:
        self._redis.close()


class Leadership:
    """Keeps trying to hold `lease` in a background thread; `leading()` says whether to serve.

    `on_elected` runs in that thread after the lease is taken and before serving starts (the
    master rebuilds its state from Redis there); serving starts only after a renewal that
    follows it succeeded, so a slow rebuild never serves on a lease that may have lapsed.
    `on_deposed` runs when the lease is lost or could not be renewed in time."""

    def __init__(self, lease: LeaderLease, ttl_s: float, renew_s: float,
                 on_elected: Callable[[], None], on_deposed: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease = lease
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        # Serving stops this long before the lease can lapse: room for the clocks of two
        # machines to drift and for an operation under way to finish its commit.
        self.margin_s = renew_s / 2
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._clock = clock
        self._deadline = 0.0  # serve while clock() < this
        self._leader: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-master-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def leading(self) -> bool:
        return self._clock() < self._deadline

    @property
    def fence(self) -> tuple[str, str]:
        """(lease key, our value in it): the metadata backend commits only while it holds
        that value (`kvstore.redis_metadata`), so a write that was let in while we led but
        lands after the lease changed hands is refused."""
        return LEASE_KEY, self.lease.value

    def lost(self) -> None:
        """A fenced commit was refused: the lease is not ours. Stop serving now; the thread's
        next renewal finds it gone and calls `on_deposed`."""
        self._deadline = 0.0

    def leader_address(self) -> str | None:
        """The leader's address as last seen (our own while leading)."""
        return self._leader

    def _try(self, step: Callable[[], bool]) -> bool | None:
        """Run one lease step; on success, serving may go on until sent + ttl - margin. None
        when Redis did not answer (the lease may still be ours)."""
        sent = self._clock()
        try:
            ok = step()
        except redis.RedisError as e:
            log.warning("lease %s: redis did not answer (%s)", LEASE_KEY, e)
            return None
        if ok:
            self._deadline = sent + self.ttl_s - self.margin_s
        return ok

    def _run(self) -> None:
        held = False
        while not self._stop.is_set():
            if held:
                renewed = self._try(self.lease.renew)
                # Not ours any more: stop now. No answer: serve on only while it cannot
                # have lapsed, and keep trying.
                if renewed is False or (renewed is None and not self.leading()):
                    held = False
                    self._deadline = 0.0
                    self._leader = None  # not us any more; the next try sees who is
                    log.warning("lost the leader lease (%s); standing by",
                                "taken" if renewed is False else "not renewed in time")
                    self._on_deposed()
                    continue
                self._stop.wait(self.renew_s if renewed else self.renew_s / 4)
                continue
            if self._try(self.lease.acquire):
                self._deadline = 0.0  # not before the state is rebuilt and the lease renewed
                log.info("took the leader lease; loading the pool's metadata")
                try:
                    self._on_elected()
                except Exception:
                    log.exception("could not take over as leader; releasing the lease")
                    self._give_up()
                    self._stop.wait(self.renew_s)
                    continue
                if self._try(self.lease.renew):
                    held = True
                    self._leader = self.lease.value.partition(" ")[2]
                    log.info("leading the pool as %s", self._leader)
                    continue
                self._deadline = 0.0
                log.warning("lease lost while taking over; standing by")
                self._on_deposed()
                self._stop.wait(self.renew_s)
                continue
            # Try again as soon as the holder's lease can have lapsed, at most a renewal on.
            left = self._observe_leader()
            self._stop.wait(min(self.renew_s, left + 0.01))

    def _observe_leader(self) -> float:
        """Note who leads; the seconds its lease has left."""
        try:
            self._leader, left = self.lease.holder()
        except redis.RedisError:
            self._leader, left = None, self.renew_s
        return left

    def _give_up(self) -> None:
        self._deadline = 0.0
        try:
            self.lease.release()
        except redis.RedisError:
            pass  # it lapses on its own

    def stop(self, release: bool = True) -> None:
        """Stop campaigning; with `release`, drop a lease we hold so a standby takes over now
        (call it once the master's last changes are committed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.ttl_s + 5)
        if release and self._deadline:
            self._give_up()
        self._deadline = 0.0
        self.lease.close()
