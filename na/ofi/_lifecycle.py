"""Opening and closing an ``OfiPlugin``'s endpoint: fi_getinfo and the fabric, domain, address
vector, CQ and endpoint; the posted receive pool; an shm endpoint's name; and their release,
which for shm waits on the endpoints of this process that may map it (``_local``)."""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
import select
from collections.abc import Callable
from typing import Any

from ..types import Addr
from . import _local
from ._common import (
    CQ_BATCH,
    PROVIDERS,
    RX_BUFFERS,
    SHAKE_KINDS,
    SHM_RX_SIZE,
    SHM_TICK_US,
    _doorbell,
    _fid,
    _Req,
    _s,
    _shm_region_exists,
    _strdup,
    log,
)
from ._fabric import ffi, lib
from ._handshake import TOKEN_SIZE, Handshake
from .errors import FabricError, check_rc, error_for


class Lifecycle:
    """Mixin of ``OfiPlugin`` (state is created in ``OfiPlugin.__init__``)."""

    # -- opening --------------------------------------------------------------------
    def _open(self, rest: str, listen: bool, rx_buffers: int | None, rma_chunk: int) -> None:
        prov = PROVIDERS[self.transport]
        hints = lib.fi_allocinfo()
        if hints == ffi.NULL:
            raise MemoryError("fi_allocinfo failed")
        try:
            hints.ep_attr.type = lib.FI_EP_RDM
            hints.caps = lib.FI_MSG | lib.FI_TAGGED | lib.FI_RMA
            hints.mode = lib.FI_CONTEXT | lib.FI_CONTEXT2
            hints.domain_attr.mr_mode = (lib.FI_MR_LOCAL | lib.FI_MR_VIRT_ADDR
                                         | lib.FI_MR_ALLOCATED | lib.FI_MR_PROV_KEY
                                         | lib.FI_MR_ENDPOINT)
            hints.domain_attr.threading = lib.FI_THREAD_DOMAIN
            # fi_freeinfo frees prov_name: it must come from libfabric's allocator.
            hints.fabric_attr.prov_name = _strdup(prov)
            node, service, flags = self._source(rest, listen)
            if self.transport == "shm":
                _local.sweep_once()
                name = f"fi_shm://{self._shm_name(rest, listen)}"
                hints.addr_format = lib.FI_ADDR_STR
                hints.src_addr = _strdup(name)
                hints.src_addrlen = len(name) + 1
            out = ffi.new("struct fi_info **")
            rc = lib.fi_getinfo(lib.petasus_fi_version(), node, service, flags, hints, out)
            if rc == -lib.FI_ENODATA:
                hint = (" (no RDMA device on this host?)" if self.transport == "verbs" else "")
                raise error_for(rc, "fi_getinfo", op="initialize", provider=prov,
                                node=_s(node), service=_s(service),
                                detail=f"no {prov} endpoint with FI_MSG|FI_TAGGED|FI_RMA{hint}")
            check_rc(rc, "fi_getinfo", op="initialize", provider=prov, node=_s(node),
                     service=_s(service))
        finally:
            lib.fi_freeinfo(hints)
        info = self._info = out[0]
        self.provider = ffi.string(info.fabric_attr.prov_name).decode()
        self._mr_mode = info.domain_attr.mr_mode
        self._key_size = info.domain_attr.mr_key_size
        self._rma_chunk = min(rma_chunk, info.ep_attr.max_msg_size)
        # Sends up to this size go by fi_tinject: the provider copies them at once and writes
        # no completion (tcp;ofi_rxm: 64 B, an eager RPC of a few numbers; shm: 4 KiB).
        self._inject = 0 if self._mr_mode & lib.FI_MR_LOCAL else int(info.tx_attr.inject_size)
        if self._max_msg + 256 > info.ep_attr.max_msg_size:
            raise ValueError(f"max_msg_size {self._max_msg} exceeds {self.provider}'s limit")
        if self._mr_mode & lib.FI_MR_RAW:
            raise FabricError("initialize", None, f"{self.provider} needs raw memory keys "
                              "(FI_MR_RAW), which petasus does not support")

        fabric = ffi.new("struct fid_fabric **")
        check_rc(lib.fi_fabric(info.fabric_attr, fabric, ffi.NULL), "fi_fabric", op="initialize")
        self._fabric = fabric[0]
        self._fids.append(self._fabric)
        domain = ffi.new("struct fid_domain **")
        check_rc(lib.fi_domain(self._fabric, info, domain, ffi.NULL), "fi_domain",
                 op="initialize")
        self._domain = domain[0]
        self._fids.append(self._domain)
        av_attr = ffi.new("struct fi_av_attr *")
        av_attr.type = lib.FI_AV_MAP
        av = ffi.new("struct fid_av **")
        check_rc(lib.fi_av_open(self._domain, av_attr, av, ffi.NULL), "fi_av_open",
                 op="initialize")
        self._av = av[0]
        self._fids.append(self._av)
        self._open_cq(info)
        ep = ffi.new("struct fid_ep **")
        rc = lib.fi_endpoint(self._domain, info, ep, ffi.NULL)
        if rc == -lib.FI_EADDRINUSE:
            # The same error as the socket plugins' bind(): the caller's, not the fabric's.
            raise OSError(errno.EADDRINUSE, f"cannot listen at {self.scheme}://{rest}: "
                          f"{error_for(rc, 'fi_endpoint', op='initialize')}")
        check_rc(rc, "fi_endpoint", op="initialize")
        self._ep = ep[0]
        self._fids.append(self._ep)
        check_rc(lib.fi_ep_bind(self._ep, _fid(self._av), 0), "fi_ep_bind", op="initialize",
                 what="av")
        check_rc(lib.fi_ep_bind(self._ep, _fid(self._cq_fid), lib.FI_SEND | lib.FI_RECV),
                 "fi_ep_bind", op="initialize", what="cq")
        check_rc(lib.fi_enable(self._ep), "fi_enable", op="initialize")
        size = ffi.new("size_t *", 256)
        name = ffi.new("char[]", 256)
        check_rc(lib.fi_getname(_fid(self._ep), name, size), "fi_getname", op="initialize")
        self._name = bytes(ffi.buffer(name, size[0]))
        if self.addr_format == lib.FI_ADDR_STR:
            self._name = self._name.rstrip(b"\0")
        if len(self._name) > 255:
            raise FabricError("initialize", None, f"address of {len(self._name)} B is too long")
        self._hdr = bytes((len(self._name),)) + self._name
        if self.transport == "shm":
            _local.opened(self._name, self)
            self._local = True
        self._shake = Handshake(self._auth_key, self._name, SHAKE_KINDS, self._shake_send,
                                self._established, self._shake_failed, self._auth_failed,
                                timeout=self._shake_timeout)
        if self._timer_fd >= 0 and self.transport == "shm":
            self._bell = _doorbell(self._name)
            self._poll_set.register(self._bell.fileno(), select.EPOLLIN)
        self._self_addr = Addr(self._uri_of(self._name), listen)
        self._peers[self._self_addr.uri] = self._self_addr
        self._by_name[self._name] = self._self_addr
        self._names[self._self_addr] = self._name
        self._self_addr.fabric_addr = self._insert(self._name, self._self_addr.uri)
        token = secrets.token_bytes(TOKEN_SIZE)
        self._established(self._self_addr, token, token)
        if rx_buffers is None:
            # shm: half its receive-request pool; the other half is for the tagged receives of
            # RMA data (posting all rx_attr.size entries makes the next fi_trecv FI_ENOMEM).
            pool = int(info.rx_attr.size)
            rx_buffers = pool // 2 if self.transport == "shm" else RX_BUFFERS
            if self.transport == "shm" and pool < SHM_RX_SIZE:
                log.warning("%s: shm's receive pool is %d, not %d (libfabric was initialized "
                            "before petasus set FI_SHM_RX_SIZE): bursts from several senders "
                            "may lose messages", self.scheme, pool, SHM_RX_SIZE)
        self._open_rx_pool(rx_buffers)

    def _shm_name(self, rest: str, listen: bool) -> str:
        """The shm region name to open: ``PID_RANDOM`` (fresh), or the one a listener asks for.

        A listener may name its address (to come back at the same one); a name whose region
        exists is in use, and refused here the way a bound port is (libfabric's shm would
        attach to the live region instead). shm appends ``:0:N`` to the name it is given.
        Names start with the owner's pid, which the liveness check reads, so a requested name
        must too.
        """
        if not (listen and rest):
            return f"{os.getpid()}_{secrets.token_hex(4)}"
        if not _shm_region_exists(f"fi_shm://{rest}".encode()):
            if "/" in rest or not rest.partition("_")[0].isdigit():
                raise ValueError(f"{self.scheme}://{rest}: an ofi+shm address is PID_NAME")
            # shm appends ":0:N" (its per-process endpoint count) to whatever name it is given.
            return re.sub(r"(:\d+:\d+)+$", "", rest)
        raise OSError(errno.EADDRINUSE, f"cannot listen at {self.scheme}://{rest}: the address "
                      f"is in use (its shared-memory region /dev/shm/{rest} exists)")

    def _open_cq(self, info: Any) -> None:
        cq_attr = ffi.new("struct fi_cq_attr *")
        cq_attr.format = lib.FI_CQ_FORMAT_TAGGED
        cq_attr.size = 0
        cq = ffi.new("struct fid_cq **")
        # shm's completions come from shared memory, which no descriptor signals.
        waits = ((lib.FI_WAIT_NONE,) if self.transport == "shm"
                 else (lib.FI_WAIT_FD, lib.FI_WAIT_NONE))
        for wait in waits:
            cq_attr.wait_obj = wait
            rc = lib.fi_cq_open(self._domain, cq_attr, cq, ffi.NULL)
            if rc == 0:
                break
        check_rc(rc, "fi_cq_open", op="initialize", wait_obj=int(cq_attr.wait_obj))
        self._cq_fid = cq[0]
        self._fids.append(self._cq_fid)
        self._cq_entries = ffi.new("struct fi_cq_tagged_entry[]", CQ_BATCH)
        self._cq_fids = ffi.new("struct fid *[1]", [_fid(self._cq_fid)])
        if cq_attr.wait_obj == lib.FI_WAIT_FD:
            fd = ffi.new("int *", -1)
            rc = lib.fi_control(_fid(self._cq_fid), lib.FI_GETWAIT, fd)
            if rc == 0 and fd[0] >= 0:
                self._wait_fd = fd[0]
                self._poll_set.register(self._wait_fd, select.EPOLLIN)
                return
        self._timer_fd = lib.petasus_timerfd(SHM_TICK_US)
        if self._timer_fd < 0:
            raise OSError(ffi.errno, f"timerfd_create: {os.strerror(ffi.errno)}")
        self._poll_set.register(self._timer_fd, select.EPOLLIN)

    def _open_rx_pool(self, n: int) -> None:
        self._slot = self._max_msg + 1 + 256
        # Private anonymous memory: pages are mapped on first touch, so shm's 4096-slot pool
        # (256 MiB of address space) costs about one page per slot a message has used.
        self._rx = mmap.mmap(-1, self._slot * n, flags=mmap.MAP_PRIVATE)
        self._rx_view = memoryview(self._rx)
        self._rx_c = ffi.from_buffer(self._rx)
        self._rx_desc = ffi.NULL
        if self._mr_mode & lib.FI_MR_LOCAL:
            self._rx_reg = self._mr_reg(self._rx_c, len(self._rx), lib.FI_RECV)
            self._rx_desc = self._rx_reg.desc
        self._slot_reqs: list[_Req | None] = [None] * n
        for i in range(n):
            self._submit_slot(i)

    def close(self) -> None:
        super().close()
        # Outside our lock: each endpoint told takes its own (two closing at once must not
        # wait on each other); once, however many threads close.
        with self._lock:
            tell, self._tell = self._tell, False
        if tell:
            _local.closing(self._name)

    def peer_closed(self, name: bytes) -> None:
        """An shm endpoint of this process that may map us has closed (ofi/_local.py). What
        it sent before is in our region: the next pass reads the CQ dry first, then fails
        what still waits for it and refuses new operations (``_check_peers``)."""
        with self._lock:
            addr = self._by_name.get(name)
            if not self._closed and addr is not None and addr is not self._self_addr:
                self._gone.add(addr)
                self._next_probe = 0.0
                os.eventfd_write(self._cq.wake_fd, 1)  # a sleeping progress: pass now

    def _release(self) -> None:
        """Close what was opened, newest first; safe on a half-opened instance. An shm
        endpoint's libfabric objects wait for the endpoints of this process that may map it
        (ofi/_local.py)."""
        free = self._take_fabric()
        if self._local:
            self._local = False
            self._tell = True
            _local.release(self._name, free)
        else:
            free()
        self._poll_set.close()
        self._cq.close()
        if self._bell is not None:
            self._bell.close()
        if self._timer_fd >= 0:
            os.close(self._timer_fd)
            self._timer_fd = -1
        self._backlog.clear()
        self._blocked.clear()
        self._held.clear()

    def _take_fabric(self) -> Callable[[], None]:
        """The libfabric objects, taken out of this instance (under its lock) into what closes
        them: run now, or later on another thread (ofi/_local.py), it shares nothing with the
        instance, and it keeps alive the memory the provider may still use until then (the
        receive pool, the buffers of requests in flight)."""
        mrs = [handle.record.mr for handle in self._regs.values()]
        self._regs.clear()
        rx_reg = getattr(self, "_rx_reg", None)
        if rx_reg is not None:
            mrs.append(rx_reg.mr)
        fids, self._fids = self._fids, []
        info, self._info = self._info, None
        kept = (list(self._reqs.values()), getattr(self, "_rx_c", None),
                getattr(self, "_rx", None))
        self._reqs.clear()
        scheme = self.scheme

        def free() -> None:
            for mr in mrs:
                lib.fi_close(_fid(mr))
            while fids:
                rc = lib.fi_close(_fid(fids.pop()))
                if rc:
                    log.warning("fi_close failed while closing %s: %s", scheme,
                                error_for(rc, "fi_close"))
            if info is not None:
                lib.fi_freeinfo(info)
            kept[0].clear()  # the provider is done with them
        return free
