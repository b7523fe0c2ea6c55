"""The Mercury-like core: ``Class`` (registry over an NA plugin), ``Context`` (progress, trigger,
timers, the target's posted receives) and ``Handle`` (one call, origin or target side).

A request is an unexpected NA message on a fresh tag: the 12-byte header, then the proc-encoded
input. The response is an expected message on the same tag, which the origin posts before it
sends. Procs of fixed size are fused with the header into one ``struct.Struct``, so a call such
as ``sum(int32, int32) -> int32`` costs one pack and one unpack on each side.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from petasus import na
from petasus.bulk import READ_ONLY, WRITE_ONLY, Bulk, RemoteBulk, Transfer

from . import header as hd
from . import state as st
from .errors import (
    Canceled,
    EncodeError,
    NoSuchRPC,
    RemoteError,
    RPCError,
    RPCTimeout,
)
from .overflow import ACK_BIT, TAG_MASK, Deadline, Landing, segments
from .procs import Proc, proc_for

log = logging.getLogger("petasus.hg.rpc")

_REQ, _RESP = hd.REQUEST, hd.RESPONSE
_ID, _PROTO = hd.IDENTIFIER, hd.PROTOCOL
_FORWARDED = st.FORWARDED
_STR = proc_for(str)
POSTED_REQUESTS = 64  # receives a listening context keeps posted: requests in flight per target
# The bytes all overflowing inputs and outputs being pulled may hold at once (Mercury takes
# the size from the peer uncapped); Engine(max_overflow=...) changes it.
MAX_OVERFLOW = 1 << 30
_ACK = hd.RESPONSE.pack(hd.IDENTIFIER, hd.PROTOCOL, hd.SUCCESS, 0, 0)


class PeerError(RPCError, ConnectionError):
    """The transport failed the call: the peer is unreachable or went away."""


class RPC:
    """One registered RPC: name, provider, procs, and on the target its handler."""

    __slots__ = ("handler", "id", "impl", "in_proc", "name", "one_way", "out_proc", "provider_id",
                 "req_fused", "resp_fused")

    def __init__(self, name: str, in_proc: Proc, out_proc: Proc, *, one_way: bool = False,
                 provider_id: int = 0, handler: Callable[[TargetHandle], None] | None = None,
                 impl: Callable[..., Any] | None = None) -> None:
        self.name = name
        self.provider_id = provider_id
        self.id = hd.rpc_id(name, provider_id)
        self.in_proc = in_proc
        self.out_proc = out_proc
        self.one_way = one_way
        self.handler = handler
        self.impl = impl
        self.req_fused = struct.Struct(_REQ.format + in_proc.fmt) if in_proc.flat else None
        self.resp_fused = struct.Struct(_RESP.format + out_proc.fmt) if out_proc.scalar else None

    def __repr__(self) -> str:
        kind = "one-way " if self.one_way else ""
        return f"<RPC {kind}{self.name} provider={self.provider_id} id=0x{self.id:016x}>"


class Class:
    """The registry of RPCs over one NA plugin instance (Mercury's hg_class)."""

    def __init__(self, plugin: na.Plugin, listening: bool) -> None:
        self.na = plugin
        self.listening = listening
        self.rpcs: dict[int, RPC] = {}

    def register(self, rpc: RPC) -> RPC:
        existing = self.rpcs.get(rpc.id)
        if existing is not None and existing.name != rpc.name:
            raise ValueError(f"register: {rpc.name!r} and {existing.name!r} hash to the same "
                             "RPC id; rename one")
        self.rpcs[rpc.id] = rpc
        return rpc

    def deregister(self, name: str, provider_id: int = 0) -> None:
        if self.rpcs.pop(hd.rpc_id(name, provider_id), None) is None:
            raise KeyError(f"deregister: no RPC {name!r} for provider {provider_id}")

    def registered(self, name: str, provider_id: int = 0) -> bool:
        return hd.rpc_id(name, provider_id) in self.rpcs


class Context:
    """Progress, trigger and timers for the handles of one Class (Mercury's hg_context)."""

    def __init__(self, hg: Class, *, clock: Callable[[], float] = time.monotonic,
                 posted: int = POSTED_REQUESTS, max_overflow: int = MAX_OVERFLOW,
                 overflow_timeout: float = 60.0) -> None:
        self.hg = hg
        self.na = hg.na
        self.clock = clock
        self.max_overflow = max_overflow
        self.landing = Landing(max_overflow)
        self.overflow_timeout = overflow_timeout  # bounds a pull, and the wait for an ack
        self.timer_hook: Callable[[float], Any] | None = None  # told of each armed deadline
        self._seq = itertools.count()
        self.max_unexpected = self.na.msg_get_max_unexpected_size()
        self.max_expected = self.na.msg_get_max_expected_size()
        self._tags = itertools.count(1)
        self._timers: list[tuple[float, int, Handle | Deadline]] = []
        self._timer_lock = threading.Lock()
        self._bufs: list[memoryview] = []  # response buffers, reused across calls
        self.closing = False  # set by the owner before it closes the plugin
        self.stats = dict.fromkeys(("sent", "received", "errors", "timeouts", "canceled",
                                    "remote_errors", "handler_errors", "overflows",
                                    "overflow_timeouts"), 0)
        if hg.listening:
            for _ in range(posted):
                self.na.msg_recv_unexpected(bytearray(self.max_unexpected), self._on_request)

    # -- driving ---------------------------------------------------------------------------------
    def progress(self, timeout: float = 0.0) -> bool:
        """Move bytes for up to ``timeout`` s and expire timed-out calls; True if work is ready."""
        timers = self._timers
        if timers:
            now = self.clock()
            if timers[0][0] <= now:
                self._expire(now)
                return True
            timeout = min(timeout, timers[0][0] - now)
            ready = self.na.progress(timeout)
            if timers and timers[0][0] <= self.clock():
                self._expire(self.clock())
                return True
            return ready
        return self.na.progress(timeout)

    def trigger(self, max_count: int = 1 << 30) -> int:
        return self.na.trigger(max_count)

    def create(self, addr: na.Addr, rpc: RPC) -> Handle:
        return Handle(self, addr, rpc)

    # -- timers -----------------------------------------------------------------------------------
    def _arm(self, entry: Handle | Deadline, deadline: float) -> None:
        with self._timer_lock:
            timers = self._timers
            if len(timers) > 4096:
                # Entries of calls that already finished stay until their deadline; drop them
                # in bulk so a high call rate with long timeouts cannot grow the heap unbounded.
                timers[:] = [t for t in timers if t[2].live and t[2].deadline == t[0]]
                heapq.heapify(timers)
            heapq.heappush(timers, (deadline, next(self._seq), entry))
        hook = self.timer_hook
        if hook is not None:
            hook(deadline)  # an event loop that drives progress must wake up for it

    def _expire(self, now: float) -> None:
        expired = []
        with self._timer_lock:
            timers = self._timers
            while timers and timers[0][0] <= now:
                deadline, _seq, entry = heapq.heappop(timers)
                if entry.live and entry.deadline == deadline:
                    expired.append(entry)
        for entry in expired:
            entry.expire()

    # -- origin side ------------------------------------------------------------------------------
    def _take_buffer(self) -> memoryview:
        bufs = self._bufs
        return bufs.pop() if bufs else memoryview(bytearray(self.max_expected))

    # -- target side ------------------------------------------------------------------------------
    def _on_request(self, op: na.Op) -> None:
        if op.error is not None or self.closing:
            return  # canceled at close, or arrived while the engine shuts down
        buf, n, source, tag = op.buffer, op.size, op.source, op.tag
        self.stats["received"] += 1
        rpc, answer, one_way, more, args, failure = None, True, 0, 0, (), None
        try:
            if n < 12:
                raise hd.HeaderError(f"request of {n} B is shorter than its header")
            ident, proto, rid, flags, _cookie = _REQ.unpack_from(buf)
            if ident != _ID or proto != _PROTO:
                raise hd.HeaderError(f"not a petasus request (identifier 0x{ident:02x}, "
                                     f"protocol {proto})")
            one_way, more = flags & hd.NO_RESPONSE, flags & hd.MORE_DATA
            answer = not one_way or more  # an overflowing one-way call waits for an ack
            rpc = self.hg.rpcs.get(rid)
            if rpc is not None:
                fused = rpc.req_fused
                if more:
                    args = RemoteBulk.from_bytes(buf[12:n])  # the input, to pull
                elif fused is not None and n == fused.size:
                    args = fused.unpack_from(buf)[5:]
                else:
                    args = rpc.in_proc.loads(buf[12:n])
        except hd.HeaderError as exc:
            failure = (hd.PROTOCOL_ERROR, "HeaderError", str(exc))
        except Exception as exc:  # any decoder failure (custom procs raise what they like)
            failure = (hd.DECODE_ERROR, type(exc).__name__, str(exc))
        # Decoded values own their bytes: the buffer takes the next request now, whatever
        # happens below.
        self.na.msg_recv_unexpected(buf, self._on_request)
        if failure is not None:
            what = rpc.name if rpc is not None else "request"
            log.warning("%s from %s: %s", what, source.uri, failure[2])  # type: ignore[union-attr]
            if answer:
                self._reply_error(source, tag, *failure)  # type: ignore[arg-type]
            return
        if rpc is None:
            if answer:
                name, provider = rid >> 16, rid & 0xFFFF
                self._reply_error(source, tag, hd.NO_SUCH_RPC, "NoSuchRPC",  # type: ignore[arg-type]
                                  f"no RPC with id 0x{rid:016x} (name hash 0x{name:012x}) "
                                  f"for provider {provider}")
            return
        if more:
            self._pull_input(rpc, source, tag, bool(one_way), args)  # type: ignore[arg-type]
        else:
            self._dispatch(rpc, source, tag, one_way, args)  # type: ignore[arg-type]

    def _dispatch(self, rpc: RPC, source: na.Addr, tag: int, one_way: int,
                  args: tuple[Any, ...]) -> None:
        impl = rpc.impl
        if impl is not None:
            # A plain function runs inline and answers with its return value: no handle.
            try:
                value = impl(*args)
            except Exception as exc:
                self._handler_failed(rpc, source, tag, one_way, exc)
                return
            if not one_way:
                self._respond(rpc, source, tag, value)
            return
        if rpc.handler is None:
            if not one_way:
                self._reply_error(source, tag, hd.NO_SUCH_RPC, "NoSuchRPC",
                                  f"{rpc.name} is declared here but has no handler")
            return
        handle = TargetHandle(self, source, tag, rpc, args, bool(one_way))
        try:
            rpc.handler(handle)
        except Exception as exc:
            if handle.state == st.RECEIVED:
                handle.state = st.RESPONDED
                self._handler_failed(rpc, source, tag, one_way, exc)
            else:
                log.exception("%s: handler raised after responding", rpc.name)

    # -- overflow: inputs and outputs larger than a message travel through bulk ------------------
    def _pull_input(self, rpc: RPC, source: na.Addr, tag: int, one_way: bool,
                    remote: RemoteBulk) -> None:
        """Pull an input that did not fit in the request, then run the handler. The handle
        is checked and the bytes budgeted before anything is allocated."""
        size = remote.size
        refused = self.landing.reserve(size)
        if refused is None:
            try:
                remote.resolve(self.na, "pull the input", source)
            except ValueError as exc:
                self.landing.release(size)
                refused = str(exc)
        if refused is not None:
            self._reply_error(source, tag, hd.OVERFLOW, "OverflowError",
                              f"{rpc.name}: input of {size} B {refused}")
            return
        self.stats["overflows"] += 1
        buf, dest = self.landing.take(size)
        local = Bulk(self.na, dest, WRITE_ONLY, eager=False)
        timer = Deadline(self.clock() + self.overflow_timeout, lambda: None)

        def pulled(transfer: Transfer) -> None:
            local.close()
            self.landing.release(size)
            timed_out = not timer.disarm()
            if self.closing:
                return
            if transfer.error is not None:
                why = (f"not pulled within {self.overflow_timeout:g} s" if timed_out
                       else f"pulling it failed: {transfer.error}")
                log.warning("%s: the input from %s was %s", rpc.name, source.uri, why)
                self._reply_error(source, tag, hd.OVERFLOW, type(transfer.error).__name__,
                                  f"{rpc.name}: the input was {why}")
                return
            if one_way:
                self._send_ack(source, tag)  # its answer: the origin may let go of the input
            try:
                args = rpc.in_proc.loads(dest)
            except Exception as exc:
                log.warning("%s from %s: %s", rpc.name, source.uri, exc)
                if not one_way:
                    self._reply_error(source, tag, hd.DECODE_ERROR, type(exc).__name__, str(exc))
                return
            finally:
                self.landing.give(buf)  # the transfer is over: nothing writes into it now
            self._dispatch(rpc, source, tag, int(one_way), args)

        transfer = local.pull_from(remote, addr=source, callback=pulled)
        if not transfer.done:
            def give_up() -> None:
                self.stats["overflow_timeouts"] += 1
                transfer.cancel()

            timer.on_expire = give_up
            self._arm(timer, timer.deadline)

    def _expose_output(self, source: na.Addr, tag: int, parts: list[Any]) -> None:
        """Answer with a handle to the encoded result; the origin pulls it and acknowledges.
        Without an acknowledgement the memory is withdrawn after ``overflow_timeout``."""
        exposed = Bulk(self.na, segments(parts), READ_ONLY, eager=False)
        try:
            head = _RESP.pack(_ID, _PROTO, hd.SUCCESS, hd.MORE_DATA, 0) + exposed.to_bytes()
            timer = Deadline(self.clock() + self.overflow_timeout, lambda: None)

            def acked(_op: na.Op) -> None:
                timer.disarm()
                exposed.close()

            ack = self.na.msg_recv_expected(source, bytearray(_RESP.size), tag | ACK_BIT, acked)
        except Exception:
            exposed.close()
            raise
        def withdraw() -> None:
            self.stats["overflow_timeouts"] += 1
            self.na.cancel(ack)  # its completion closes the handle

        timer.on_expire = withdraw
        self.stats["overflows"] += 1
        self._arm(timer, timer.deadline)
        self.na.msg_send_expected(source, head, tag)

    def _send_ack(self, peer: na.Addr, tag: int) -> None:
        if not self.closing:
            try:
                self.na.msg_send_expected(peer, _ACK, tag)
            except (RuntimeError, na.NAError):  # closed under us: nobody waits any more
                pass

    def _handler_failed(self, rpc: RPC, source: na.Addr, tag: int, one_way: int,
                        exc: BaseException) -> None:
        self.stats["handler_errors"] += 1
        log.error("%s: handler raised for %s", rpc.name, source.uri, exc_info=exc)
        if not one_way:
            self._reply_error(source, tag, hd.HANDLER_ERROR, type(exc).__name__, str(exc))

    def _respond(self, rpc: RPC, source: na.Addr, tag: int, value: Any) -> None:
        fused = rpc.resp_fused
        try:
            if fused is not None:
                payload = fused.pack(_ID, _PROTO, 0, 0, 0, value)
            else:
                parts = rpc.out_proc.parts(value)
                payload = None
                if sum(map(len, parts)) + _RESP.size <= self.max_expected:
                    payload = b"".join([_RESP.pack(_ID, _PROTO, 0, 0, 0), *parts])
        except Exception as exc:  # whatever the result's proc raises: answer, don't die
            self._handler_failed(rpc, source, tag, 0, EncodeError(
                f"{rpc.name}: cannot encode the result {_short(value)}: {exc}"))
            return
        if payload is None:
            try:
                self._expose_output(source, tag, parts)
            except Exception as exc:
                self._handler_failed(rpc, source, tag, 0, RuntimeError(
                    f"{rpc.name}: cannot expose the {sum(map(len, parts))} B result: {exc}"))
            return
        self.na.msg_send_expected(source, payload, tag)  # NA logs a peer lost before it arrives

    def _reply_error(self, source: na.Addr, tag: int, ret: int, kind: str, message: str) -> None:
        self.stats["errors"] += 1
        body = _STR.encode(kind[:200]) + _STR.encode(message[:2000])
        self.na.msg_send_expected(source, _RESP.pack(_ID, _PROTO, ret, 0, 0) + body, tag)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


class Handle:
    """One call from the origin. Forward, then wait (``result()``), or get a callback."""

    __slots__ = ("_overflow", "_pull", "_recv", "addr", "callback", "context", "deadline",
                 "error", "rpc", "state", "tag", "timeout", "value")

    def __init__(self, context: Context, addr: na.Addr, rpc: RPC) -> None:
        self.context = context
        self.addr = addr
        self.rpc = rpc
        self.state = st.CREATED
        self.tag = 0
        self.value: Any = None
        self.error: BaseException | None = None
        self.callback: Callable[[Handle], Any] | None = None
        self.deadline = 0.0
        self.timeout = 0.0
        self._recv: na.Op | None = None
        self._overflow: Bulk | None = None  # our input, exposed while the target pulls it
        self._pull: Transfer | None = None  # the target's output, being pulled

    def __repr__(self) -> str:
        return f"<Handle {self.rpc.name} to {self.addr.uri} {st.NAMES[self.state]}>"

    @property
    def done(self) -> bool:
        return self.state in st.FINISHED

    @property
    def live(self) -> bool:
        """Still waiting for its answer (what the context's timers look for)."""
        return self.state == _FORWARDED

    def forward(self, args: tuple[Any, ...], callback: Callable[[Handle], Any] | None = None,
                timeout: float | None = None, *, arm: bool = True) -> Handle:
        """Send the call. ``callback(handle)`` runs from ``trigger()`` once it has finished.

        ``timeout`` is enforced by the context's timers; a caller that waits in a loop of its
        own may pass ``arm=False`` and call ``expire()`` at the deadline instead.
        """
        new = st.next_state(st.ORIGIN, "origin", self.state, "forward")
        ctx, rpc = self.context, self.rpc
        flags = hd.NO_RESPONSE if rpc.one_way else 0
        try:
            fused = rpc.req_fused
            if fused is not None:
                payload = fused.pack(_ID, _PROTO, rpc.id, flags, 0, *args)
            else:
                parts = rpc.in_proc.parts(args)
                if sum(map(len, parts)) + _REQ.size > ctx.max_unexpected:
                    payload = self._expose_input(parts, flags)
                else:
                    payload = b"".join([_REQ.pack(_ID, _PROTO, rpc.id, flags, 0), *parts])
        except (struct.error, TypeError) as exc:
            raise EncodeError(f"{rpc.name}: cannot encode the arguments: {exc}") from None
        self.state = new  # type: ignore[assignment]
        self.callback = callback
        self.error = None
        self.value = None
        tag = self.tag = next(ctx._tags) & TAG_MASK
        plugin = ctx.na
        waits = not rpc.one_way or self._overflow is not None  # an overflow is acknowledged
        if waits:
            self._recv = plugin.msg_recv_expected(self.addr, ctx._take_buffer(), tag,
                                                  self._on_response)
        if timeout:
            self.timeout = timeout
            self.deadline = ctx.clock() + timeout
            if arm:
                ctx._arm(self, self.deadline)
        ctx.stats["sent"] += 1
        # A two-way call learns of a failed send from its receive, which NA fails along with
        # every other operation to a peer it cannot reach; only one-way calls watch the send.
        plugin.msg_send_unexpected(self.addr, payload, tag, None if waits else self._on_sent)
        return self

    def _expose_input(self, parts: list[Any], flags: int) -> bytes:
        """Overflow: the request carries a handle to the encoded input, which the target
        pulls before it runs the handler (Mercury's more-data path). Large values are exposed
        in place, as segments of their own; the small pieces between them are joined."""
        ctx = self.context
        if self._overflow is not None:
            self._overflow.close()
        exposed = Bulk(ctx.na, segments(parts), READ_ONLY, eager=False)
        ctx.stats["overflows"] += 1
        request = _REQ.pack(_ID, _PROTO, self.rpc.id, flags | hd.MORE_DATA, 0) + exposed.to_bytes()
        if len(request) > ctx.max_unexpected:
            exposed.close()
            raise ValueError(f"{self.rpc.name}: even the overflow request ({len(request)} B) "
                             f"exceeds the {ctx.max_unexpected} B message size")
        self._overflow = exposed
        return request

    def expire(self) -> None:
        """Finish the call as timed out (its deadline has passed)."""
        if self.state == _FORWARDED:
            self.context.stats["timeouts"] += 1
            self._finish("timeout", None, RPCTimeout(
                self.rpc.name, self.addr.uri,
                f"no response within {self.timeout:g} s (a late one will be dropped)"))

    def cancel(self) -> None:
        """Finish the call as canceled; a response that still arrives is dropped."""
        if self.state == _FORWARDED:
            self.context.stats["canceled"] += 1
            self._finish("cancel", None, Canceled(self.rpc.name, self.addr.uri, "canceled"))

    def result(self, timeout: float | None = None) -> Any:
        """Drive progress until the call finishes; return its value or raise its error."""
        ctx = self.context
        if self.state == _FORWARDED:
            deadline = None if timeout is None else ctx.clock() + timeout
            while self.state == _FORWARDED:
                now = ctx.clock()
                if self.deadline and now >= self.deadline:
                    self.expire()  # the call's own timeout, for calls forwarded unarmed
                    break
                if deadline is not None and now >= deadline:
                    raise TimeoutError(f"result: {self!r} still pending after {timeout} s")
                ctx.progress(0.1)
                ctx.trigger()
        if self.error is not None:
            raise self.error
        return self.value

    # -- completions ------------------------------------------------------------------------------
    def _on_sent(self, op: na.Op) -> None:
        if op.error is not None:
            self._finish("error", None, self._transport_error(op.error))
        elif self.rpc.one_way and self.state == _FORWARDED:
            self._finish("response", None, None)

    def _on_response(self, op: na.Op) -> None:
        buf = op.buffer  # the receive's own buffer: a re-forward may have posted another
        pool = self.context._bufs
        if op is not self._recv:
            pool.append(buf)  # a completion of an earlier forward of this handle
            return
        self._recv = None
        if op.error is not None:
            pool.append(buf)
            self._finish("error", None, self._transport_error(op.error))
            return
        if self.state != _FORWARDED:
            pool.append(buf)
            return
        rpc, n = self.rpc, op.size
        fused = rpc.resp_fused
        try:
            if fused is not None and n == fused.size:
                vals = fused.unpack_from(buf)
                if vals[0] == _ID and vals[1] == _PROTO and vals[2] == hd.SUCCESS:
                    pool.append(buf)
                    self._finish("response", vals[5], None)
                    return
            view = buf[:n]
            ret, flags = hd.decode_response(view)
            if ret == hd.SUCCESS and flags & hd.MORE_DATA:
                remote = RemoteBulk.from_bytes(view[_RESP.size:])
                pool.append(buf)
                self._pull_output(remote)
                return
            if ret == hd.SUCCESS:
                value = rpc.out_proc.loads(view[_RESP.size:])
                pool.append(buf)
                self._finish("response", value, None)
                return
            kind, pos = _STR.decode(view, _RESP.size)
            message, _pos = _STR.decode(view, pos)
        except Exception as exc:  # a custom proc may raise anything on hostile bytes
            pool.append(buf)
            self.context.stats["errors"] += 1
            self._finish("error", None, RPCError(rpc.name, self.addr.uri,
                                                 f"malformed response: {exc}"))
            return
        pool.append(buf)
        self.context.stats["remote_errors"] += 1
        if ret == hd.HANDLER_ERROR:
            error: BaseException = RemoteError(rpc.name, self.addr.uri, kind, message)
        elif ret == hd.NO_SUCH_RPC:
            error = NoSuchRPC(rpc.name, self.addr.uri,
                              f"no such RPC on the target (provider {rpc.provider_id}): {message}")
        else:
            error = RPCError(rpc.name, self.addr.uri,
                             f"{hd.RETURN_NAMES.get(ret, ret)}: {kind}: {message}")
        self._finish("error", None, error)

    def _pull_output(self, remote: RemoteBulk) -> None:
        """The result did not fit in a message: pull it, acknowledge, then decode it."""
        ctx, rpc, tag = self.context, self.rpc, self.tag
        size = remote.size
        refused = ctx.landing.reserve(size)
        if refused is None:
            try:
                remote.resolve(ctx.na, "pull the result", self.addr)
            except ValueError as exc:
                ctx.landing.release(size)
                refused = str(exc)
        if refused is not None:
            ctx._send_ack(self.addr, tag | ACK_BIT)
            self._finish("error", None, RPCError(rpc.name, self.addr.uri,
                                                 f"result of {size} B {refused}"))
            return
        ctx.stats["overflows"] += 1
        buf, dest = ctx.landing.take(size)
        local = Bulk(ctx.na, dest, WRITE_ONLY, eager=False)

        def pulled(transfer: Transfer) -> None:
            local.close()
            ctx.landing.release(size)
            self._pull = None
            ctx._send_ack(self.addr, tag | ACK_BIT)  # the target may withdraw its memory now
            if self.state != _FORWARDED:
                return
            if transfer.error is not None:
                self._finish("error", None, self._transport_error(transfer.error))
                return
            try:
                value = rpc.out_proc.loads(dest)
            except Exception as exc:
                self._finish("error", None, RPCError(rpc.name, self.addr.uri,
                                                     f"malformed response: {exc}"))
                return
            finally:
                ctx.landing.give(buf)
            self._finish("response", value, None)

        transfer = local.pull_from(remote, addr=self.addr, callback=pulled)
        if not transfer.done:
            self._pull = transfer

    def _transport_error(self, error: BaseException) -> BaseException:
        if isinstance(error, na.Canceled):
            return Canceled(self.rpc.name, self.addr.uri, str(error))
        if isinstance(error, na.NAError):
            return PeerError(self.rpc.name, self.addr.uri, error.cause)
        return error

    def _finish(self, event: str, value: Any, error: BaseException | None) -> None:
        new = st.next_state(st.ORIGIN, "origin", self.state, event)
        if new is None:
            return
        self.state = new
        self.value = value
        self.error = error
        if event in ("timeout", "cancel"):
            if self._recv is not None:
                # Withdraw the receive; its (canceled) completion returns the buffer to the pool.
                recv, self._recv = self._recv, None
                self.context.na.cancel(recv)
            if self._pull is not None:
                self._pull.cancel()
        if self._overflow is not None:
            overflow, self._overflow = self._overflow, None
            overflow.close()
        if error is not None and event not in ("timeout", "cancel"):
            self.context.stats["errors"] += 1
        callback = self.callback
        if callback is not None:
            try:
                callback(self)
            except Exception:  # a user's callback must not take the progress loop down
                log.exception("%s: the completion callback raised", self.rpc.name)


class TargetHandle:
    """The target's side of one call, for handlers that respond later (async, thread pool)."""

    __slots__ = ("args", "context", "one_way", "rpc", "source", "state", "tag")

    def __init__(self, context: Context, source: na.Addr, tag: int, rpc: RPC,
                 args: tuple[Any, ...], one_way: bool) -> None:
        self.context = context
        self.source = source
        self.tag = tag
        self.rpc = rpc
        self.args = args
        self.one_way = one_way
        self.state = st.RECEIVED

    def __repr__(self) -> str:
        return f"<TargetHandle {self.rpc.name} from {self.source.uri} {st.NAMES[self.state]}>"

    @property
    def input(self) -> tuple[Any, ...]:
        return self.args

    def respond(self, value: Any = None) -> None:
        self.state = st.next_state(st.TARGET, "target", self.state, "respond")  # type: ignore[assignment]
        if self.one_way:
            return
        self.context._respond(self.rpc, self.source, self.tag, value)

    def fail(self, exc: BaseException) -> None:
        """Answer with the exception (its type and message reach the caller as RemoteError)."""
        self.state = st.next_state(st.TARGET, "target", self.state, "respond")  # type: ignore[assignment]
        self.context._handler_failed(self.rpc, self.source, self.tag, int(self.one_way), exc)

