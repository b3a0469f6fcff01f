"""The storage node's runtime: its segment and its membership (register + heartbeat).

Each registration gives the node an epoch and the key of that epoch's write grants; the node's
servers accept writes only under a valid grant of the current epoch and reads only for it."""

from __future__ import annotations

import logging
import os
import threading

import grpc

from kvstore.auth import load_token
from kvstore.config import REGISTER_MESSAGE_BYTES, NodeConfig, master_addresses
from kvstore.grants import WriteGrant, refusal
from kvstore.hostid import default_host_id
from kvstore.limits import check_key
from kvstore.master_link import MasterLink
from kvstore.metadata import DRAM, SSD, HeldObject, NodeInfo
from kvstore.segment import Segment
from kvstore.ssd_tier import SsdTier
from kvstore.tier_worker import TierWorker
from kvstore.wire import (
    held_to_proto,
    node_to_proto,
    tier_order_from_proto,
    tier_report_to_proto,
)
from pantry.common.errors import InvalidRequest
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_segments(config: NodeConfig) -> list[str]:
    """Unlink segments this node id left behind in a process that is gone (SIGKILL, OOM kill),
    or that had our pid: a node restarted in a container usually gets the same pid again, and
    its segment is created with O_EXCL. The paths removed."""
    prefix = f"pantry-kv-{config.node_id}-"
    removed = []
    try:
        names = os.listdir(config.shm_dir)
    except FileNotFoundError:
        return []
    for name in names:
        pid = name[len(prefix):]
        if not name.startswith(prefix) or not pid.isdigit():
            continue
        if int(pid) == os.getpid() or not _alive(int(pid)):
            path = os.path.join(config.shm_dir, name)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            log.warning("removed segment %s left by a node %s that is gone", path,
                        config.node_id)
            removed.append(path)
    return removed


def segment_path(config: NodeConfig, pid: int | None = None) -> str:
    """Where node `config.node_id` running as `pid` (default: this process) keeps its DRAM
    segment; a supervisor uses it to clean up after a node that could not."""
    pid = os.getpid() if pid is None else pid
    return os.path.join(config.shm_dir, f"pantry-kv-{config.node_id}-{pid}")


class StorageNode:
    """Owns the segment; `start_membership` registers with the master and keeps heartbeating."""

    def __init__(self, config: NodeConfig) -> None:
        master_addresses(config.master_address)  # a bad --master fails before anything starts
        self.config = config
        self.host_id = config.host_id or default_host_id()
        self.token = load_token(config.token_file)
        remove_stale_segments(config)
        # The SSD tier first: a directory another node holds fails the start before the segment
        # is created. Its files are re-indexed now and reported when the node registers.
        self.ssd = None if config.ssd_dir is None else SsdTier(
            config.ssd_dir, config.ssd_bytes, config.ssd_high_watermark,
            config.ssd_low_watermark, fsync=config.ssd_fsync)
        try:
            self.segment = Segment(segment_path(config), config.dram_bytes, config.prefault)
        except BaseException:
            if self.ssd is not None:
                self.ssd.close()
            raise
        # Executes the master's spill and promote orders (None: no SSD tier).
        self.tiering = None if self.ssd is None else TierWorker(self.segment, self.ssd)
        self.address = ""
        self.tcp_address = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._link: MasterLink | None = None
        # (epoch, grant key) of the current registration; (0, b"") while unregistered, which
        # refuses every write and read.
        self._registration: tuple[int, bytes] = (0, b"")
        self._registered_before = False
        self.adopted = 0  # objects the master took back at the last registration

    @property
    def segment_view(self) -> memoryview:
        return self.segment.view

    @property
    def limits(self) -> tuple[int, int, int]:
        """Largest object, most ops and most bytes one request may carry."""
        c = self.config
        return c.max_object_bytes, c.max_ops_per_request, c.request_bytes_limit

    @property
    def epoch(self) -> int:
        return self._registration[0]

    def write_refusal(self, grant: WriteGrant, nbytes: int) -> str | None:
        """Why a write of `nbytes` under `grant` is refused; None when it may go ahead."""
        epoch, key = self._registration
        return refusal(key, epoch, grant, nbytes)

    def read_refusal(self, epoch: int) -> str | None:
        if epoch != self.epoch:
            return (f"read for epoch {epoch}; node {self.config.node_id} is in epoch "
                    f"{self.epoch}")
        return None

    def read_tier(self, offset: int, length: int, key: str, tier: str) -> bytes:
        """The bytes of one read op: the segment's at [offset, offset + length), or with tier
        "ssd" the checked object of `key` from the SSD tier (b"": a miss, counted there)."""
        if tier in ("", DRAM):
            return self.segment.read(offset, length)
        if tier != SSD:
            raise InvalidRequest("ops.tier", f"{tier!r} is not a tier (use 'dram' or 'ssd')")
        check_key(key, "ops.key")
        got = None if self.ssd is None else self.ssd.read_into(key)
        return b"" if got is None else bytes(got)

    def read_ssd(self, key: str, length: int, buffer: memoryview) -> memoryview | None:
        """The checked object of `key` on the SSD tier, read into `buffer` (of `length` bytes,
        the object's size the reader was told): None for a miss, a file of another size
        included (the key was stored again since)."""
        if self.ssd is None or self.ssd.size_of(key) != length:
            return None
        return self.ssd.read_into(key, buffer)

    def info(self) -> NodeInfo:
        assert self.address, "address is known only once the node's server is bound"
        return NodeInfo(self.config.node_id, self.host_id, self.address, self.segment.path,
                        self.segment.size, self.tcp_address,
                        ssd_dir="" if self.ssd is None else self.ssd.directory,
                        ssd_bytes=0 if self.ssd is None else self.ssd.capacity_bytes)

    def start_membership(self, address: str) -> None:
        self.address = address
        # Several masters: the link follows the leader. With Redis metadata a new leader has
        # this node's record (epoch and grant key), so heartbeats go on in the same epoch.
        # Bounded by a heartbeat: the loop itself keeps retrying.
        self._link = MasterLink(self.config.master_address, self.token, REGISTER_MESSAGE_BYTES,
                                failover_s=self.config.heartbeat_s)
        stub = pb_grpc.KVMasterStub(self._link)
        self._thread = threading.Thread(target=self._run, args=(stub,), name="kv-node-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _register(self, stub: pb_grpc.KVMasterStub) -> bool:
        # Registering again (the master restarted or dropped us): report what the segment
        # holds, so the master serves it again. A fresh segment holds nothing: not scanned.
        held = self.segment.objects() if self._registered_before else []
        held += self._ssd_held()
        req = pb.RegisterNodeRequest(node=node_to_proto(self.info()),
                                     held=[held_to_proto(h) for h in held])
        self._registration = (0, b"")
        try:
            resp = stub.RegisterNode(req, timeout=self.config.heartbeat_s)
        except grpc.RpcError as e:
            log.info("master %s not answering yet (%s); retrying", self.config.master_address,
                     e.code())
            return False
        self.adopted = resp.adopted
        self._registered_before = True
        self._registration = (resp.epoch, resp.grant_key)
        if self.tiering is not None:
            self.tiering.new_epoch(resp.epoch)
        log.info("registered with master %s as %s, epoch %d; %d of %d held objects adopted",
                 self._link.current if self._link else "", self.config.node_id, resp.epoch,
                 resp.adopted, len(held))
        return True

    def _run(self, stub: pb_grpc.KVMasterStub) -> None:
        registered = False
        # Until registered, retry fast: launchers start master and nodes together.
        while not self._stop.is_set():
            if not registered:
                registered = self._register(stub)
                if not registered:
                    self._stop.wait(min(0.2, self.config.heartbeat_s))
                continue
            if self._stop.wait(self.config.heartbeat_s):
                break
            done, dropped = self.tiering.take_report() if self.tiering else ([], [])
            try:
                resp = stub.Heartbeat(pb.HeartbeatRequest(
                    node_id=self.config.node_id, epoch=self.epoch,
                    tiers=tier_report_to_proto(done, dropped)), timeout=self.config.heartbeat_s)
            except grpc.RpcError as e:
                log.warning("heartbeat failed: %s", e.code())
                if self.tiering is not None:
                    self.tiering.give_back(done, dropped)
                continue
            known = resp.known
            if known and self.tiering is not None:
                self.tiering.submit(self.epoch, [o for o in map(tier_order_from_proto,
                                                                resp.orders) if o is not None])
            if not known:
                # The master forgot us (restart or timeout): register again, with what we hold.
                log.warning("master does not know this node any more; re-registering")
                registered = False

    def _ssd_held(self) -> list[HeldObject]:
        """Every file of the SSD tier, for a registration (the full truth: what was dropped
        before it needs no report of its own, and results of the old epoch are void)."""
        if self.ssd is None or self.tiering is None:
            return []
        self.tiering.new_epoch(0)
        self.ssd.drain_dropped()
        return [HeldObject(key, 0, nbytes, SSD) for key, nbytes in self.ssd.held()]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._link is not None:
            self._link.close()
        if self.tiering is not None:
            self.tiering.close()
        if self.ssd is not None:
            self.ssd.close()
        self.segment.close()
