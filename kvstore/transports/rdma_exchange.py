"""What the two ends of an RDMA connection exchange, and the bookkeeping that needs no device.

A queue pair's endpoint (QPN, PSN, LID, GID, MTU) with its checks and its protobuf form (the
node's `KVNode.RdmaConnect` carries it), the queue pair attributes that connect to a peer, the
table of registered memory regions, and how (offset, length) ops become rounds of one-sided
work requests through a staging region. kvstore.transports.rdma runs them on a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.errors import KVStoreError
from kvstore.transports import TransportError
from pantry.v1 import kvstore_pb2 as pb

GID_BYTES = 16
PORT = 1
# Work requests in flight on one queue pair (its send queue depth and the CQ's size).
MAX_SEND_WR = 256
# enum ibv_mtu: 1 = 256 bytes ... 5 = 4096 bytes.
MTU_RANGE = range(1, 6)
# RC settings as ibv_rc_pingpong and rdma-core's tests use them.
_TIMEOUT, _RETRY_CNT, _RNR_RETRY, _MIN_RNR_TIMER, _RD_ATOMIC = 14, 7, 7, 12, 1


class RdmaError(KVStoreError):
    """An RDMA endpoint or registration is unusable (bad peer info, no device, verbs failed)."""


@dataclass(frozen=True)
class Endpoint:
    """One side of an RC queue pair, as the other side needs it."""

    qpn: int
    psn: int
    lid: int
    gid: bytes
    mtu: int

    def __post_init__(self) -> None:
        for name, value, bits in (("qpn", self.qpn, 24), ("psn", self.psn, 24),
                                  ("lid", self.lid, 16)):
            if not 0 <= value < 1 << bits:
                raise RdmaError(f"rdma endpoint {name} must fit in {bits} bits, got {value}")
        if len(self.gid) != GID_BYTES:
            raise RdmaError(f"rdma endpoint gid must be {GID_BYTES} bytes, got {len(self.gid)}")
        if self.mtu not in MTU_RANGE:
            raise RdmaError(f"rdma endpoint mtu must be an ibv_mtu in 1..5, got {self.mtu}")
        if self.qpn == 0:
            raise RdmaError("rdma endpoint qpn 0 is the subnet management QP, not a peer's")

    @property
    def gid_text(self) -> str:
        """The GID as pyverbs spells it: eight colon-separated groups of four hex digits."""
        h = self.gid.hex()
        return ":".join(h[i : i + 4] for i in range(0, 32, 4))


@dataclass(frozen=True)
class RemoteSegment:
    """Where a node's segment is registered: what one-sided ops address."""

    addr: int
    rkey: int
    length: int

    def address_of(self, offset: int, length: int) -> int:
        if offset < 0 or length < 0 or offset + length > self.length:
            raise TransportError(f"range [{offset}, {offset + length}) outside segment of "
                                 f"{self.length} bytes")
        return self.addr + offset


def gid_from_text(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.replace(":", ""))
    except ValueError:
        raw = b""
    if len(raw) != GID_BYTES:
        raise RdmaError(f"a GID is {GID_BYTES} bytes in 8 groups of 4 hex digits, got {text!r}")
    return raw


def endpoint_to_proto(ep: Endpoint) -> pb.RdmaEndpoint:
    return pb.RdmaEndpoint(qpn=ep.qpn, psn=ep.psn, lid=ep.lid, gid=ep.gid, mtu=ep.mtu)


def endpoint_from_proto(msg: pb.RdmaEndpoint) -> Endpoint:
    return Endpoint(msg.qpn, msg.psn, msg.lid, bytes(msg.gid), msg.mtu)


def connect_response(node: Endpoint, seg: RemoteSegment) -> pb.RdmaConnectResponse:
    return pb.RdmaConnectResponse(node=endpoint_to_proto(node), addr=seg.addr, rkey=seg.rkey,
                                  length=seg.length)


def segment_from_proto(msg: pb.RdmaConnectResponse) -> RemoteSegment:
    return RemoteSegment(msg.addr, msg.rkey, msg.length)


def qp_attr(local: Endpoint, remote: Endpoint, sgid_index: int, port: int = PORT) -> Any:
    """The attributes that take an RC queue pair from INIT through RTR to RTS, connected to
    `remote`: path MTU is the smaller of both ends', received PSNs start at the remote's."""
    from pyverbs.addr import GID as VerbsGid
    from pyverbs.addr import AHAttr, GlobalRoute
    from pyverbs.qp import QPAttr

    gid = VerbsGid()
    gid.gid = remote.gid_text
    attr = QPAttr(port_num=port)
    attr.path_mtu = min(local.mtu, remote.mtu)
    attr.dest_qp_num = remote.qpn
    attr.rq_psn = remote.psn
    attr.sq_psn = local.psn
    attr.max_dest_rd_atomic = _RD_ATOMIC
    attr.max_rd_atomic = _RD_ATOMIC
    attr.min_rnr_timer = _MIN_RNR_TIMER
    attr.timeout = _TIMEOUT
    attr.retry_cnt = _RETRY_CNT
    attr.rnr_retry = _RNR_RETRY
    attr.ah_attr = AHAttr(port_num=port, is_global=1, dlid=remote.lid,
                          gr=GlobalRoute(dgid=gid, sgid_index=sgid_index))
    return attr


@dataclass(frozen=True)
class Region:
    """A registered memory region: its address range and keys (the MR itself in `handle`)."""

    name: str
    addr: int
    length: int
    lkey: int
    rkey: int
    handle: Any = None


class MrTable:
    """The memory regions one side has registered, by name; ranges never overlap, so a local
    buffer address maps to exactly one lkey."""

    def __init__(self) -> None:
        self._by_name: dict[str, Region] = {}

    def add(self, region: Region) -> None:
        if region.name in self._by_name:
            raise RdmaError(f"a region named {region.name!r} is registered already")
        if region.length <= 0:
            raise RdmaError(f"region {region.name!r} has no bytes")
        for other in self._by_name.values():
            if region.addr < other.addr + other.length and other.addr < region.addr + region.length:
                raise RdmaError(f"region {region.name!r} overlaps {other.name!r}")
        self._by_name[region.name] = region

    def remove(self, name: str) -> Region:
        return self._by_name.pop(name)

    def get(self, name: str) -> Region:
        return self._by_name[name]

    def covering(self, addr: int, length: int) -> Region:
        for r in self._by_name.values():
            if r.addr <= addr and addr + length <= r.addr + r.length:
                return r
        raise RdmaError(f"[{addr:#x}, {addr + length:#x}) is in no registered region")

    def __len__(self) -> int:
        return len(self._by_name)


@dataclass(frozen=True)
class WorkRequest:
    """One one-sided op: `length` bytes between local `local_addr` and the node's
    `remote_addr`; `op` is the index of the caller's op it serves."""

    op: int
    local_addr: int
    remote_addr: int
    length: int


def plan(ops: Sequence[tuple[int, int]], stage: Region, remote: RemoteSegment,
         max_wrs: int = MAX_SEND_WR) -> list[list[WorkRequest]]:
    """Rounds of work requests for (offset, length) ops through the staging region: each
    round fits in it (an op larger than the stage is split over rounds) and posts at most
    `max_wrs` requests. Ops are laid out back to back, in order, from the stage's start."""
    rounds: list[list[WorkRequest]] = []
    current: list[WorkRequest] = []
    used = 0
    for i, (offset, length) in enumerate(ops):
        remote.address_of(offset, length)
        done = 0
        while done < length:
            if used == stage.length or len(current) == max_wrs:
                rounds.append(current)
                current, used = [], 0
            n = min(length - done, stage.length - used)
            current.append(WorkRequest(i, stage.addr + used, remote.addr + offset + done, n))
            used += n
            done += n
    if current:
        rounds.append(current)
    return rounds


def gather(parts: Sequence[memoryview], at: int, dst: memoryview) -> None:
    """Fill `dst` with the parts' bytes, read as one buffer, from byte `at` on (a write's
    slice into the stage)."""
    pos = done = 0
    for p in parts:
        lo, hi = max(at, pos), min(at + dst.nbytes, pos + p.nbytes)
        if lo < hi:
            dst[done : done + hi - lo] = p[lo - pos : hi - pos]
            done += hi - lo
        pos += p.nbytes
    assert done == dst.nbytes, "the parts hold every byte the slice asks for"


def scatter(views: Sequence[memoryview], at: int, src: memoryview) -> None:
    """Copy `src` into the views, read as one buffer, from byte `at` on (a read's slice out
    of the stage)."""
    pos = 0
    for v in views:
        lo, hi = max(at, pos), min(at + src.nbytes, pos + v.nbytes)
        if lo < hi:
            v[lo - pos : hi - pos] = src[lo - at : hi - at]
        pos += v.nbytes
