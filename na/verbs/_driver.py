"""The pyverbs half of the verbs plugin: device, protection domain, completion queue and its
channel, the shared receive queue, memory regions and RC queue pairs. One-to-one with the
verbs calls; every decision is in ``_protocol`` and ``plugin``.

Never run in this project's CI: the hosts have no RDMA device (see plugin.py for what ran).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import cffi
import pyverbs.enums as e
from pyverbs.addr import GID, AHAttr, GlobalRoute
from pyverbs.cq import CQ, CompChannel
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsError
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.srq import SRQ, SrqAttr, SrqInitAttr
from pyverbs.wr import SGE, RecvWR, SendWR

from .._pinning import pin as _pinned
from ..errors import NAError
from . import _protocol as p
from ._wire import Hello, gid_from_bytes, gid_to_bytes

_ffi = cffi.FFI()
log = logging.getLogger("petasus.na.verbs")

RECV_BIT = 1 << 63  # wr_id of a receive slot: RECV_BIT | slot
MIN_RNR_TIMER = 12  # 0.64 ms: the smallest wait that is not a busy loop on the wire
TIMEOUT = 14  # 4.096 us * 2**14 = 67 ms per transport retry, 7 retries: a dead peer in ~0.5 s
RETRY_CNT = 7
# Credits keep every send within a posted slot, so an RNR NAK means a slot was reposted late
# (the SRQ refills after the copy): a few retries cover that; infinite ones (7) would turn a
# credit bug into a silent stall instead of an error.
RNR_RETRY = 6
ROUTING_GID_ZERO = bytes(16)
# The QP allows remote reads and writes; each memory region's own flags then decide (the NIC
# checks both, so a region registered READ_ONLY refuses writes whatever the QP allows).
QP_ACCESS = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE


class VerbsError(NAError):
    """A verbs call failed: ``call`` names it, ``errno`` is rdma-core's error number (0 when
    pyverbs gave none). The one translation of pyverbs' exceptions (STYLE 8)."""

    def __init__(self, call: str, exc: BaseException) -> None:
        self.call = call
        self.errno = int(getattr(exc, "error_code", 0) or 0)
        name = os.strerror(self.errno) if self.errno > 0 else ""
        super().__init__(call, None, f"{exc}" + (f" ({name})" if name else ""))


@contextmanager
def translated(call: str) -> Iterator[None]:
    try:
        yield
    except PyverbsError as exc:
        raise VerbsError(call, exc) from exc


def _check_abi() -> None:
    """The core's constants are verbs.h's ABI; pyverbs must agree (it is generated from it)."""
    pairs = ((p.IBV_ACCESS_LOCAL_WRITE, e.IBV_ACCESS_LOCAL_WRITE),
             (p.IBV_ACCESS_REMOTE_WRITE, e.IBV_ACCESS_REMOTE_WRITE),
             (p.IBV_ACCESS_REMOTE_READ, e.IBV_ACCESS_REMOTE_READ),
             (p.WC_FLUSH, e.IBV_WC_WR_FLUSH_ERR), (10, e.IBV_WC_REM_ACCESS_ERR))
    if any(a != b for a, b in pairs):
        raise NAError("initialize", None, f"pyverbs' enums differ from verbs.h: {pairs}")


def pin(view: memoryview) -> tuple[Any, int]:
    """(holder, address) of ``view``'s bytes; the holder keeps the memory alive: a cffi view
    of the buffer's exporter (``na._pinning``), or the view itself for an exporter cffi cannot
    view (no cycle through cffi then)."""
    owner, addr = _pinned(_ffi, view)
    return (view if owner is None else owner), addr


def _comp_channel(ctx: Context) -> tuple[CompChannel, int]:
    """A completion channel and its descriptor.

    pyverbs 44 does not expose ``ibv_comp_channel.fd``; the channel's file is the one
    ``anon_inode:[infinibandevent]`` descriptor that appears while it is created (taken under
    the plugin's lock; another thread opening one at the same instant is refused below).
    """
    def events() -> set[int]:
        found = set()
        for name in os.listdir("/proc/self/fd"):
            try:
                if "infinibandevent" in os.readlink(f"/proc/self/fd/{name}"):
                    found.add(int(name))
            except OSError:
                continue
        return found

    before = events()
    channel = CompChannel(ctx)
    new = events() - before
    if len(new) != 1:
        channel.close()
        raise NAError("initialize", None, f"cannot tell the completion channel's descriptor "
                      f"(new event files: {sorted(new)})")
    fd = new.pop()
    # Non-blocking, as rdma-core's man page suggests for polled channels: a reader that finds
    # the event taken already (another thread saw the descriptor readable too) gets EAGAIN
    # instead of sleeping in ibv_get_cq_event with the plugin's lock held.
    os.set_blocking(fd, False)
    return channel, fd


@dataclass
class Limits:
    port_max_msg: int
    max_qp_wr: int
    max_srq_wr: int
    max_cqe: int
    max_rd_atom: int


class Device:
    """An opened device port with its PD, CQ (on a completion channel) and SRQ."""

    def __init__(self, name: str, port: int, gid_index: int, srq_size: int) -> None:
        _check_abi()
        self._objs: list[Any] = []
        self.port = port
        self.gid_index = gid_index
        with translated("ibv_open_device"):
            self.ctx = Context(name=name)
        self._objs.append(self.ctx)
        try:
            with translated("initialize"):
                self._open(port, gid_index, srq_size)
        except BaseException:
            self.close()
            raise

    def _open(self, port: int, gid_index: int, srq_size: int) -> None:
        attr = self.ctx.query_port(port)
        if attr.state != e.IBV_PORT_ACTIVE:
            raise NAError("initialize", None, f"port {port} of {self.ctx.name} is not active "
                          f"(state {attr.state}); is the link up?")
        dev = self.ctx.query_device()
        self.limits = Limits(int(attr.max_msg_sz), int(dev.max_qp_wr), int(dev.max_srq_wr),
                             int(dev.max_cqe), max(1, min(int(dev.max_qp_rd_atom), 16)))
        self.lid = int(attr.lid)
        self.mtu = int(attr.active_mtu)
        self.gid = gid_to_bytes(str(self.ctx.query_gid(port, gid_index).gid))
        self.sq_depth = min(p.SQ_DEPTH, self.limits.max_qp_wr)
        self.pd = PD(self.ctx)
        self._objs.append(self.pd)
        self.channel, self.fd = _comp_channel(self.ctx)
        self._objs.append(self.channel)
        self.srq_size = min(srq_size, self.limits.max_srq_wr)
        # Room for every completion that can be outstanding: each receive slot, and the send
        # queue of as many connections as the SRQ has slots for (CQ overrun is fatal).
        most = self.srq_size // (p.DATA_CREDITS + p.CTRL_CREDITS) + 1
        cqe = min(self.limits.max_cqe, self.srq_size + most * self.sq_depth)
        self.cq = CQ(self.ctx, cqe, None, self.channel, 0)
        self._objs.append(self.cq)
        self.srq = SRQ(self.pd, SrqInitAttr(SrqAttr(max_wr=self.srq_size, max_sge=1)))
        self._objs.append(self.srq)
        self.cq.req_notify()

    # -- memory ---------------------------------------------------------------------------------
    def register(self, addr: int, length: int, flags: int) -> MR:
        with translated("ibv_reg_mr"):
            return MR(self.pd, length, flags, address=addr)

    # -- queue pairs ----------------------------------------------------------------------------
    def new_qp(self) -> tuple[QP, int]:
        """An RC QP on the shared CQ and SRQ, in INIT, and the PSN it will start from."""
        cap = QPCap(max_send_wr=self.sq_depth, max_recv_wr=0, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, srq=self.srq,
                          cap=cap, sq_sig_all=1)
        attr = QPAttr(port_num=self.port)
        attr.qp_access_flags = QP_ACCESS
        with translated("ibv_create_qp"):
            return QP(self.pd, init, attr), random.getrandbits(24)

    def connect(self, qp: QP, psn: int, peer: Hello) -> None:
        """INIT -> RTR -> RTS towards the peer's QP."""
        with translated("ibv_modify_qp(RTS)"):
            qp.to_rts(rts_attr(self.port, self.gid_index, self.mtu, self.limits.max_rd_atom,
                               psn, peer))

    def fail_qp(self, qp: QP) -> None:
        """Move ``qp`` to ERR so that its posted work flushes (then it can be destroyed)."""
        attr = QPAttr(qp_state=e.IBV_QPS_ERR)
        try:
            qp.modify(attr, e.IBV_QP_STATE)
        except PyverbsError:
            pass  # already in error, or gone with the device: nothing left to flush

    # -- posting --------------------------------------------------------------------------------
    # (try/except rather than ``translated``: these run once per message)
    def post_recv(self, slot: int, addr: int, length: int, lkey: int) -> None:
        try:
            self.srq.post_recv(recv_wr(RECV_BIT | slot, addr, length, lkey))
        except PyverbsError as exc:
            raise VerbsError("ibv_post_srq_recv", exc) from exc

    def post_send(self, qp: QP, wr_id: int, addr: int, length: int, lkey: int) -> None:
        try:
            qp.post_send(send_wr(wr_id, e.IBV_WR_SEND, addr, length, lkey))
        except PyverbsError as exc:
            raise VerbsError("ibv_post_send", exc) from exc

    def post_rdma(self, qp: QP, wr_id: int, read: bool, addr: int, length: int, lkey: int,
                  remote: int, rkey: int) -> None:
        opcode = e.IBV_WR_RDMA_READ if read else e.IBV_WR_RDMA_WRITE
        try:
            qp.post_send(send_wr(wr_id, opcode, addr, length, lkey, remote, rkey))
        except PyverbsError as exc:
            raise VerbsError("ibv_post_send", exc) from exc

    # -- completions ----------------------------------------------------------------------------
    def poll(self, n: int) -> list[Any]:
        try:
            npolled, wcs = self.cq.poll(n)
        except PyverbsError as exc:
            raise VerbsError("ibv_poll_cq", exc) from exc
        return list(wcs[:npolled]) if npolled > 0 else []

    def arm(self) -> None:
        """Ask for an event on the channel at the next completion."""
        try:
            self.cq.req_notify()
        except PyverbsError as exc:
            raise VerbsError("ibv_req_notify_cq", exc) from exc

    def take_event(self) -> None:
        """Consume the channel's pending event, if it is still there, and acknowledge it."""
        try:
            self.channel.get_cq_event(self.cq)
        except PyverbsError:
            return  # EAGAIN: taken already
        self.cq.ack_events(1)

    def close_qp(self, qp: QP) -> None:
        try:
            qp.close()
        except PyverbsError as exc:
            log.warning("ibv_destroy_qp failed: %s", exc)

    def close(self) -> None:
        while self._objs:
            obj = self._objs.pop()
            try:
                obj.close()
            except PyverbsError:
                pass  # closing a parent below closes what is left


# -- work requests and attributes (plain pyverbs structs: tests build them without a device) --
def send_wr(wr_id: int, opcode: int, addr: int, length: int, lkey: int, remote: int = 0,
            rkey: int = 0) -> SendWR:
    """A signaled send work request of one SGE; RDMA ones carry the remote address and key."""
    wr = SendWR(wr_id=wr_id, opcode=opcode, num_sge=1, sg=[SGE(addr, length, lkey)],
                send_flags=e.IBV_SEND_SIGNALED)
    if opcode in (e.IBV_WR_RDMA_READ, e.IBV_WR_RDMA_WRITE):
        wr.set_wr_rdma(rkey, remote)
    return wr


def recv_wr(wr_id: int, addr: int, length: int, lkey: int) -> RecvWR:
    return RecvWR(wr_id=wr_id, num_sge=1, sg=[SGE(addr, length, lkey)])


def rts_attr(port: int, gid_index: int, mtu: int, max_rd_atom: int, psn: int,
             peer: Hello) -> QPAttr:
    """The attributes that take an RC QP to RTS towards ``peer``'s (ibv_rc_pingpong's recipe:
    path MTU the smaller of both, the peer's PSN as ours to expect, a GRH whenever the peer has
    a GID (RoCE always; InfiniBand across subnets))."""
    attr = QPAttr(port_num=port)
    attr.qp_access_flags = QP_ACCESS  # in case pyverbs passes through INIT again
    attr.path_mtu = min(mtu, peer.mtu)
    attr.dest_qp_num = peer.qpn
    attr.rq_psn = peer.psn
    attr.sq_psn = psn
    attr.max_dest_rd_atomic = max_rd_atom
    attr.max_rd_atomic = max_rd_atom
    attr.min_rnr_timer = MIN_RNR_TIMER
    attr.timeout = TIMEOUT
    attr.retry_cnt = RETRY_CNT
    attr.rnr_retry = RNR_RETRY
    if peer.gid != ROUTING_GID_ZERO:
        route = GlobalRoute(dgid=GID(gid_from_bytes(peer.gid)), sgid_index=gid_index)
        attr.ah_attr = AHAttr(port_num=port, is_global=1, gr=route, dlid=peer.lid)
    else:
        attr.ah_attr = AHAttr(port_num=port, is_global=0, dlid=peer.lid)
    return attr
