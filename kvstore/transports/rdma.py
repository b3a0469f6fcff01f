"""RDMA transport: one-sided RDMA READ and WRITE on a node's registered segment, via pyverbs.

The node registers its whole segment once (one memory region, remote read and write) when it
starts on a machine with an RDMA device. A client on another host with a device of its own
connects a reliable-connected queue pair to one of the node's through the node's gRPC
(`KVNode.RdmaConnect`: its queue pair number, first PSN, LID, GID and MTU for the node's, plus
the segment's address, rkey and length); from then on every read and write is posted by the
client alone and the node's CPU does nothing. The client copies through one registered staging
buffer of `batch_bytes` (a caller's memory is not registered on the fly: a registration cache
goes stale when the caller frees and reuses addresses).

Like shared memory, one-sided writes bypass the node's write-grant check: the rkey goes only
to callers holding the pool's service token (RdmaConnect is behind the token interceptor),
and every read is still verified by the object's header (key, layout, length, checksum), so
bytes a stale writer leaves in a reused slot are refused, never returned. The node's epoch is
checked once, at connect; a client drops its transport when the node registers again.

Everything that needs no device (the endpoint's encoding and checks, the queue pair
attributes, the table of registered regions, how ops are split into work requests) is plain
code tested anywhere; the verbs themselves run only where `ibv_devices` lists a device.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import grpc

from kvstore.auth import open_channel
from kvstore.grants import WriteGrant
from kvstore.transports import Landed, ReadInto, TransportError, WriteData, parts_of
from kvstore.transports.rdma_exchange import (
    MAX_SEND_WR,
    PORT,
    Endpoint,
    MrTable,
    RdmaError,
    Region,
    RemoteSegment,
    WorkRequest,
    endpoint_from_proto,
    endpoint_to_proto,
    gather,
    gid_from_text,
    plan,
    qp_attr,
    scatter,
    segment_from_proto,
)
from pantry.v1 import kvstore_pb2 as pb
from pantry.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Queue pairs one node keeps for its clients; past this the least recently connected goes.
MAX_NODE_QPS = 1024


class RdmaUnavailable(RdmaError):
    """This end or the node has no RDMA device: use another transport."""


def rdma_devices() -> list[str]:
    """Names of the RDMA devices here; [] without pyverbs or a device (never raises)."""
    try:
        import pyverbs.device as d
    except ImportError:
        return []
    try:
        return [dev.name.decode() for dev in d.get_device_list()]
    except Exception:  # pyverbs raises PyverbsRDMAError when the list cannot be read at all
        return []


def _address(view: memoryview) -> int:
    """The address of a writable buffer's first byte (the ctypes view is dropped at once so the
    buffer's owner can still be closed)."""
    c = (ctypes.c_char * max(1, view.nbytes)).from_buffer(view)
    try:
        return ctypes.addressof(c)
    finally:
        del c


# ---- verbs: only where a device exists ----------------------------------------------------------


class _Verbs:
    """A device context, protection domain, CQ and the port's address for one side."""

    def __init__(self, device: str | None = None) -> None:
        devices = rdma_devices()
        if not devices:
            raise RdmaUnavailable("no RDMA device here (ibv_devices lists none)")
        import pyverbs.enums as e
        from pyverbs.device import Context
        from pyverbs.pd import PD

        self.e = e
        self.name = device or devices[0]
        try:
            self.ctx = Context(name=self.name)
            self.pd = PD(self.ctx)
            port = self.ctx.query_port(PORT)
            self.lid = port.lid
            self.mtu = port.active_mtu
            self.link_ethernet = port.link_layer == e.IBV_LINK_LAYER_ETHERNET
            self.gid_index = self._gid_index(port.gid_tbl_len)
            self.gid = gid_from_text(self.ctx.query_gid(PORT, self.gid_index).gid)
        except Exception as ex:
            raise RdmaUnavailable(f"RDMA device {self.name} unusable: {ex}") from ex

    def _gid_index(self, table_len: int) -> int:
        """On RoCE the first RoCE v2 GID (routable), else the first non-zero one."""
        if not self.link_ethernet:
            return 0
        first = None
        for i in range(table_len):
            if self.ctx.query_gid(PORT, i).gid.replace("0", "").replace(":", "") == "":
                continue
            first = i if first is None else first
            if self.ctx.query_gid_type(PORT, i) == self.e.IBV_GID_TYPE_SYSFS_ROCE_V2:
                return i
        return 0 if first is None else first

    def new_qp(self) -> tuple[Any, Any, Endpoint]:
        from pyverbs.cq import CQ
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr

        cq = CQ(self.ctx, MAX_SEND_WR, None, None, 0)
        init = QPInitAttr(qp_type=self.e.IBV_QPT_RC, scq=cq, rcq=cq,
                          cap=QPCap(max_send_wr=MAX_SEND_WR, max_recv_wr=1, max_send_sge=1,
                                    max_recv_sge=1))
        attr = QPAttr(port_num=PORT)
        attr.qp_access_flags = (self.e.IBV_ACCESS_LOCAL_WRITE | self.e.IBV_ACCESS_REMOTE_READ
                                | self.e.IBV_ACCESS_REMOTE_WRITE)
        qp = QP(self.pd, init, attr)  # left in INIT: RTR needs the peer
        return qp, cq, Endpoint(qp.qp_num, secrets.randbits(24), self.lid, self.gid, self.mtu)

    def register(self, name: str, addr: int | None, length: int) -> Region:
        from pyverbs.mr import MR

        access = (self.e.IBV_ACCESS_LOCAL_WRITE | self.e.IBV_ACCESS_REMOTE_READ
                  | self.e.IBV_ACCESS_REMOTE_WRITE)
        mr = MR(self.pd, length, access) if addr is None else MR(self.pd, length, access, addr)
        return Region(name, mr.buf, length, mr.lkey, mr.rkey, mr)

    def close(self) -> None:
        self.pd.close()
        self.ctx.close()


class RdmaServer:
    """The node's side: its segment registered once, a queue pair per connected client."""

    def __init__(self, segment: memoryview, device: str | None = None) -> None:
        self._verbs = _Verbs(device)
        self.regions = MrTable()
        try:
            self.regions.add(self._verbs.register("segment", _address(segment), segment.nbytes))
        except Exception as ex:
            self._verbs.close()
            why = f"cannot register the segment on {self._verbs.name}: {ex}"
            raise RdmaUnavailable(why) from ex
        self._qps: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        return self._verbs.name

    @property
    def segment(self) -> RemoteSegment:
        r = self.regions.get("segment")
        return RemoteSegment(r.addr, r.rkey, r.length)

    def accept(self, client: Endpoint) -> Endpoint:
        """A queue pair of the node's connected to the client's; the node's endpoint."""
        with self._lock:
            qp, cq, mine = self._verbs.new_qp()
            try:
                qp.to_rts(qp_attr(mine, client, self._verbs.gid_index))
            except Exception as ex:
                qp.close()
                cq.close()
                raise RdmaError(f"cannot connect to the client's queue pair: {ex}") from ex
            self._qps[mine.qpn] = (qp, cq)
            while len(self._qps) > MAX_NODE_QPS:
                _, (old_qp, old_cq) = self._qps.popitem(last=False)
                old_qp.close()
                old_cq.close()
            return mine

    def close(self) -> None:
        with self._lock:
            for qp, cq in self._qps.values():
                qp.close()
                cq.close()
            self._qps.clear()
            self.regions.remove("segment").handle.close()
            self._verbs.close()


class RdmaTransport:
    """The client's side: one queue pair to one node, one registered staging buffer."""

    name = "rdma"

    def __init__(self, address: str, epoch: int, token: str, timeout_s: float,
                 stage_bytes: int, device: str | None = None) -> None:
        self._verbs = _Verbs(device)
        self._timeout = timeout_s
        self._lock = threading.Lock()
        # After a failed or timed-out round, completions of it may still come: the queue pair
        # is not used again (the client drops the transport on the error and opens another).
        self._broken: str | None = None
        self.regions = MrTable()
        try:
            self._qp, self._cq, mine = self._verbs.new_qp()
            channel = open_channel(address, token, 1 << 20)
            try:
                resp = pb_grpc.KVNodeStub(channel).RdmaConnect(
                    pb.RdmaConnectRequest(client=endpoint_to_proto(mine), epoch=epoch),
                    timeout=timeout_s)
            finally:
                channel.close()
            self._remote = segment_from_proto(resp)
            self._qp.to_rts(qp_attr(mine, endpoint_from_proto(resp.node),
                                    self._verbs.gid_index))
            self.regions.add(self._verbs.register("stage", None, stage_bytes))
        except grpc.RpcError as ex:
            self._verbs.close()
            raise RdmaUnavailable(f"node {address} refused RDMA: {ex.details()}") from ex
        except Exception as ex:
            self._verbs.close()
            raise RdmaUnavailable(f"RDMA to node {address} failed: {ex}") from ex
        stage = self.regions.get("stage")
        self._stage = memoryview((ctypes.c_char * stage.length).from_address(stage.addr)).cast("B")

    def _run(self, opcode: int, rnd: list[WorkRequest]) -> None:
        """Post one round and wait for every completion."""
        from pyverbs.wr import SGE, SendWR

        if self._broken is not None:
            raise TransportError(f"rdma queue pair unusable after an earlier {self._broken}")
        self._broken = "round that did not finish"
        stage = self.regions.get("stage")
        for i, wr in enumerate(rnd):
            req = SendWR(wr_id=i, opcode=opcode, num_sge=1,
                         sg=[SGE(wr.local_addr, wr.length, stage.lkey)],
                         send_flags=self._verbs.e.IBV_SEND_SIGNALED)
            req.set_wr_rdma(rkey=self._remote.rkey, addr=wr.remote_addr)
            self._qp.post_send(req)
        deadline = time.monotonic() + self._timeout
        left = len(rnd)
        while left:
            n, wcs = self._cq.poll(num_entries=left)
            for wc in wcs[:n]:
                if wc.status != self._verbs.e.IBV_WC_SUCCESS:
                    self._broken = f"completion status {wc.status}"
                    raise TransportError(f"rdma op failed with completion status {wc.status}")
            left -= n
            if left and time.monotonic() > deadline:
                self._broken = "timeout"
                raise TransportError(f"rdma ops timed out after {self._timeout} s")
        self._broken = None

    def _staged(self, wr: WorkRequest) -> memoryview:
        """The bytes of the stage that `wr` moves."""
        at = wr.local_addr - self.regions.get("stage").addr
        return self._stage[at : at + wr.length]

    def write(self, ops: Sequence[tuple[WriteGrant, WriteData]]) -> None:
        parts = [parts_of(d) for _, d in ops]
        with self._lock:
            stage = self.regions.get("stage")
            for rnd in plan([(g.offset, g.length) for g, _ in ops], stage, self._remote):
                for wr in rnd:
                    at = wr.remote_addr - self._remote.addr - ops[wr.op][0].offset
                    gather(parts[wr.op], at, self._staged(wr))
                self._run(self._verbs.e.IBV_WR_RDMA_WRITE, rnd)

    def read(self, ops: Sequence[tuple[int, int]]) -> list[bytes]:
        out = [bytearray(n) for _, n in ops]
        self.read_into([(off, [memoryview(b)]) for (off, _), b in zip(ops, out, strict=True)])
        return [bytes(b) for b in out]

    def read_into(self, ops: Sequence[ReadInto], landed: Landed | None = None) -> None:
        sized = [(off, sum(v.nbytes for v in views)) for off, views in ops]
        with self._lock:
            stage = self.regions.get("stage")
            for rnd in plan(sized, stage, self._remote):
                self._run(self._verbs.e.IBV_WR_RDMA_READ, rnd)
                for wr in rnd:
                    at = wr.remote_addr - self._remote.addr - ops[wr.op][0]
                    scatter(ops[wr.op][1], at, self._staged(wr))
        if landed is not None:  # an op may span rounds: told once all of them are in
            for i in range(len(ops)):
                landed(i)

    def close(self) -> None:
        with self._lock:
            self._stage.release()
            self._qp.close()
            self._cq.close()
            self.regions.remove("stage").handle.close()
            self._verbs.close()


def open_rdma_server(segment: memoryview) -> RdmaServer | None:
    """The node's RDMA side over its segment when this host has a device, else None (a device
    that fails to open is logged, and the node serves tcp and grpc as before)."""
    if not rdma_devices():
        return None
    try:
        server = RdmaServer(segment)
    except RdmaError as e:
        log.warning("RDMA device present but unusable (%s); serving without rdma", e)
        return None
    log.info("rdma: segment of %d bytes registered on %s", segment.nbytes, server.device)
    return server


@functools.cache
def has_rdma_device() -> bool:
    """Whether this host has an RDMA device (asked once per process: a client asks for every
    node it opens a transport to)."""
    return bool(rdma_devices())
