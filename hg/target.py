"""The target side of calls: decode a request, dispatch it, respond (Mercury's handler side).

A request is an unexpected NA message on a fresh tag: the 12-byte header (``header``), then
the proc-encoded input. The response is an expected message on the same tag, which the origin
posted before it sent. Inputs and outputs too large for a message travel through bulk
(``overflow``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from petasus import na
from petasus.bulk import READ_ONLY, WRITE_ONLY, Bulk, RemoteBulk, Stream

from . import adopt
from . import header as hd
from . import overflow as ov
from . import state as st
from .errors import EncodeError
from .overflow import ACK_BIT, Landing, Lease, segments
from .procs import proc_for
from .registry import RPC, Class
from .scalars import bound_to
from .timers import Deadline, Timers

log = logging.getLogger("petasus.hg.rpc")

_REQ, _RESP = hd.REQUEST, hd.RESPONSE
_ID, _PROTO = hd.IDENTIFIER, hd.PROTOCOL
_STR = proc_for(str)
_ACK = hd.RESPONSE.pack(hd.IDENTIFIER, hd.PROTOCOL, hd.SUCCESS, 0, 0)


class Context(Protocol):
    """What the target side needs from its context (a ``context.Context``)."""

    na: na.Plugin
    hg: Class
    stats: dict[str, int]
    landing: Landing
    clock: Callable[[], float]
    timers: Timers
    overflow_timeout: float
    max_expected: int
    closing: bool
    bulk_allow: Callable[[str], bool] | None


class Target:
    """Serves the requests a context receives; the plugin's receive callbacks land here."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.na = ctx.na
        self.rpcs = ctx.hg.rpcs
        self.stats = ctx.stats
        self.landing = ctx.landing
        self.clock = ctx.clock
        self.timers = ctx.timers
        self.overflow_timeout = ctx.overflow_timeout
        self.max_expected = ctx.max_expected
        self._trim: Deadline | None = None  # lets go of the landing pool's idle objects

    # -- target side ------------------------------------------------------------------------------
    def on_request(self, op: na.Op) -> None:
        if op.error is not None or self.ctx.closing:
            return  # canceled at close, or arrived while the engine shuts down
        buf, n, source, tag = op.buffer, op.size, op.source, op.tag
        self.stats["received"] += 1
        rpc, answer, one_way, more, args, failure = None, True, 0, 0, (), None
        try:
            rid, flags, _cookie = hd.decode_request(buf, n)
            one_way, more = flags & hd.NO_RESPONSE, flags & hd.MORE_DATA
            answer = not one_way or more  # an overflowing one-way call waits for an ack
            rpc = self.rpcs.get(rid)
            if rpc is not None:
                fused = rpc.req_fused
                if more:
                    args = RemoteBulk.from_bytes(buf[_REQ.size:n])  # the input, to pull
                elif fused is not None and n == fused.size:
                    args = fused.unpack_from(buf)[5:]
                elif rpc.in_proc.handles:
                    args = bound_to(rpc.in_proc, buf[_REQ.size:n], source, self.ctx.bulk_allow)
                else:
                    args = rpc.in_proc.loads(buf[_REQ.size:n])
        except hd.HeaderError as exc:
            failure = (hd.PROTOCOL_ERROR, "HeaderError", str(exc))
        except Exception as exc:  # any decoder failure (custom procs raise what they like)
            failure = (hd.DECODE_ERROR, type(exc).__name__, str(exc))
        # Decoded values own their bytes: the buffer takes the next request now, whatever
        # happens below.
        self.na.msg_recv_unexpected(buf, self.on_request)
        if failure is not None:
            what = rpc.name if rpc is not None else "request"
            log.warning("%s from %s: %s", what, source.uri, failure[2])  # type: ignore[union-attr]
            if answer:
                self.reply_error(source, tag, *failure)  # type: ignore[arg-type]
            return
        if rpc is None:
            if answer:
                name, provider = rid >> 16, rid & 0xFFFF
                self.reply_error(source, tag, hd.NO_SUCH_RPC, "NoSuchRPC",  # type: ignore[arg-type]
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
                self.handler_failed(rpc, source, tag, one_way, exc)
                return
            if not one_way:
                self.respond(rpc, source, tag, value)
            return
        if rpc.handler is None:
            if not one_way:
                self.reply_error(source, tag, hd.NO_SUCH_RPC, "NoSuchRPC",
                                  f"{rpc.name} is declared here but has no handler")
            return
        handle = TargetHandle(self, source, tag, rpc, args, bool(one_way))
        try:
            rpc.handler(handle)
        except Exception as exc:
            if handle.state == st.RECEIVED:
                handle.state = st.RESPONDED
                self.handler_failed(rpc, source, tag, one_way, exc)
            else:
                log.exception("%s: handler raised after responding", rpc.name)

    # -- overflow: inputs and outputs larger than a message travel through bulk ------------------
    def _pull_input(self, rpc: RPC, source: na.Addr, tag: int, one_way: bool,
                    remote: RemoteBulk) -> None:
        """Pull an input that did not fit in the request, then run the handler. The handle
        is checked, and the bytes budgeted against the peer's share (by the table), before
        anything is allocated; the pull comes in chunks so that a stall is told from a slow
        link, and is given up after ``overflow_timeout`` s without a chunk landing."""
        size, clock = remote.size, self.clock
        refused = pull_refusal(remote, source, self.na, "pull the input")
        flow = ov.Overflow(ov.TARGET_ONE_WAY if one_way else ov.TARGET, self.landing,
                           self.overflow_timeout)
        if ov.Action.PULL not in flow.begin(size, refused, peer=source, now=clock()):
            self.reply_error(source, tag, hd.OVERFLOW, "OverflowError",
                             f"{rpc.name}: input of {size} B {flow.reason}")
            return
        self.stats["overflows"] += 1
        lease = self.landing.take(size, remote.wire.sizes if rpc.in_proc.adopts else (), clock())
        try:
            local = Bulk(self.na, lease.segments, WRITE_ONLY, eager=False)
        except Exception as exc:  # the landing could not be registered: say so, keep nothing
            self.let_go(lease, False)
            if ov.Action.REPLY_ERROR in flow.handle("failed"):  # the budget goes back, too
                self.reply_error(source, tag, hd.OVERFLOW, type(exc).__name__,
                                 f"{rpc.name}: the input cannot land: {exc}")
            return
        timer = Deadline(0.0, lambda: None)

        def pulled(stream: Stream) -> None:
            timer.disarm()
            local.close()
            try:
                settle(stream.error)
            finally:
                # The pull is over: nothing writes into it now.
                self.let_go(lease, stream.error is None)

        def settle(error: BaseException | None) -> None:
            event = "closed" if self.ctx.closing else ("failed" if error is not None
                                                       else "pulled")
            for action in flow.handle(event):
                if action is ov.Action.REPLY_ERROR:
                    why = (f"stalled: no bytes moved for {self.overflow_timeout:g} s "
                           f"({stream.moved} of {size} B had)" if flow.timed_out
                           else f"could not be pulled: {error}")
                    log.warning("%s: the input from %s %s", rpc.name, source.uri, why)
                    self.reply_error(source, tag, hd.OVERFLOW, type(error).__name__,
                                     f"{rpc.name}: the input {why}")
                elif action is ov.Action.ACK:
                    self.send_ack(source, tag)  # its answer: the origin may let go of the input
                elif action is ov.Action.DISPATCH:
                    try:
                        args = lease.decode(lambda view, table: bound_to(
                            rpc.in_proc, view, source, self.ctx.bulk_allow, table))
                    except Exception as exc:
                        log.warning("%s from %s: %s", rpc.name, source.uri, exc)
                        if not one_way:
                            self.reply_error(source, tag, hd.DECODE_ERROR, type(exc).__name__,
                                             str(exc))
                        return
                    self._dispatch(rpc, source, tag, int(one_way), args)

        def check() -> None:
            actions = flow.expire(clock())
            if ov.Action.CANCEL_PULL in actions:
                self.stats["overflow_timeouts"] += 1
                stream.cancel()
            elif flow.deadline is not None and not stream.done:
                timer.live, timer.deadline = True, flow.deadline  # it moved: wait again
                self.timers.arm(timer, timer.deadline)

        def moved(n: int) -> None:
            self.stats["overflow_bytes"] += n
            flow.moved(clock())

        stream = Stream(local, remote, size, addr=source, callback=pulled, on_chunk=moved)
        try:
            stream.start()
        except (ValueError, na.NAError) as exc:  # refused before a byte moved
            local.close()
            self.let_go(lease, False)
            log.warning("%s: the input from %s cannot be pulled: %s", rpc.name, source.uri, exc)
            if ov.Action.REPLY_ERROR in flow.handle("failed"):  # the budget goes back, too
                self.reply_error(source, tag, hd.OVERFLOW, type(exc).__name__,
                                 f"{rpc.name}: the input cannot be pulled: {exc}")
            return
        if not stream.done and flow.deadline is not None:
            timer.on_expire = check
            timer.deadline = flow.deadline
            self.timers.arm(timer, timer.deadline)

    def _expose_output(self, rpc: RPC, source: na.Addr, tag: int, parts: list[Any]) -> None:
        """Answer with a handle to the encoded result; the origin pulls it and acknowledges.
        Without an acknowledgement the memory is withdrawn after ``overflow_timeout``.

        Results held for a peer that has not pulled them count against ``max_overflow`` and
        the peer's share of it, as inputs do (a separate account): a peer that calls for
        large results and never takes them holds at most its share (or one result, if that
        is larger), for at most ``overflow_timeout``, and is then told its result does not
        fit. The handler has run by then: the refusal loses its result, not its effects."""
        size = sum(map(len, parts))
        budget = self.ctx.exposed
        refused = budget.reserve(size, source, lone=True)
        if refused is not None:
            self.reply_error(source, tag, hd.OVERFLOW, "OverflowError",
                             f"{rpc.name}: the {size} B result is not sent: it {refused}, "
                             "counting results exposed to this peer and not yet taken")
            return
        try:
            exposed = Bulk(self.na, segments(parts), READ_ONLY, eager=False)
        except Exception:
            budget.release(size, source)
            raise
        flow = ov.Overflow(ov.EXPOSER)

        def close() -> None:
            exposed.close()
            budget.release(size, source)

        try:
            head = _RESP.pack(_ID, _PROTO, hd.SUCCESS, hd.MORE_DATA, 0) + exposed.to_bytes()
            timer = Deadline(self.clock() + self.overflow_timeout, lambda: None)

            def acked(_op: na.Op) -> None:
                timer.disarm()
                if ov.Action.RELEASE in flow.handle("acked"):
                    close()

            ack = self.na.msg_recv_expected(source, bytearray(_RESP.size), tag | ACK_BIT, acked)
        except Exception:
            close()
            raise

        def withdraw() -> None:
            self.stats["overflow_timeouts"] += 1
            if ov.Action.WITHDRAW in flow.handle("timeout"):
                self.na.cancel(ack)  # its completion ("acked") closes the handle

        timer.on_expire = withdraw
        self.stats["overflows"] += 1
        self.timers.arm(timer, timer.deadline)
        self.na.msg_send_expected(source, head, tag)

    def let_go(self, lease: Lease, complete: bool) -> None:
        """Give a landing back (``complete``: its pull finished, so the bytes objects it
        landed in may be recycled); what cannot be unmapped inside the completion that ends
        its pull is unmapped by the next progress pass, once the completion is over. Kept
        bytes objects are let go once idle (``adopt.POOL_IDLE``)."""
        now = self.clock()
        if not self.landing.give(lease, complete, now):
            self.timers.arm(Deadline(now, lambda: self.landing.sweep(final=True)), now)
        if complete and self._trim is None and len(self.landing.pool):
            self._trim = Deadline(now + adopt.POOL_IDLE, self._trim_pool)
            self.timers.arm(self._trim, self._trim.deadline)

    def _trim_pool(self) -> None:
        due = self.landing.pool.trim(self.clock())
        self._trim = None if due is None else Deadline(due, self._trim_pool)
        if self._trim is not None:
            self.timers.arm(self._trim, due)  # type: ignore[arg-type]

    def send_ack(self, peer: na.Addr, tag: int) -> None:
        if not self.ctx.closing:
            try:
                self.na.msg_send_expected(peer, _ACK, tag)
            except (RuntimeError, na.NAError):  # closed under us: nobody waits any more
                pass

    def handler_failed(self, rpc: RPC, source: na.Addr, tag: int, one_way: int,
                        exc: BaseException) -> None:
        self.stats["handler_errors"] += 1
        log.error("%s: handler raised for %s", rpc.name, source.uri, exc_info=exc)
        if not one_way:
            self.reply_error(source, tag, hd.HANDLER_ERROR, type(exc).__name__, str(exc))

    def respond(self, rpc: RPC, source: na.Addr, tag: int, value: Any) -> None:
        fused = rpc.resp_fused
        try:
            if fused is not None:
                payload = fused.pack(_ID, _PROTO, 0, 0, 0, value)
            else:
                parts = rpc.out_proc.parts(value)
                payload = None
                size = sum(map(len, parts)) + _RESP.size
                if size <= self.max_expected:
                    payload = hd.gather(_RESP.pack(_ID, _PROTO, 0, 0, 0), parts, size)
        except Exception as exc:  # whatever the result's proc raises: answer, don't die
            self.handler_failed(rpc, source, tag, 0, EncodeError(
                f"{rpc.name}: cannot encode the result {_short(value)}: {exc}"))
            return
        if payload is None:
            try:
                self._expose_output(rpc, source, tag, parts)
            except Exception as exc:
                self.handler_failed(rpc, source, tag, 0, RuntimeError(
                    f"{rpc.name}: cannot expose the {sum(map(len, parts))} B result: {exc}"))
            return
        self.na.msg_send_expected(source, payload, tag)  # NA logs a peer lost before it arrives

    def reply_error(self, source: na.Addr, tag: int, ret: int, kind: str, message: str) -> None:
        self.stats["errors"] += 1
        body = _STR.encode(kind[:200]) + _STR.encode(message[:2000])
        self.na.msg_send_expected(source, _RESP.pack(_ID, _PROTO, ret, 0, 0) + body, tag)


def pull_refusal(remote: RemoteBulk, peer: na.Addr, plugin: na.Plugin, what: str) -> str | None:
    """Why the overflow ``peer`` sent as ``remote`` cannot be pulled, or None: the handle is
    bound to ``peer`` (never a third party's memory), resolved, and must be readable.

    Both directions check the same way (a target pulling an input, an origin a result), and
    say why in the words the overflow's refusal carries to the peer.
    """
    try:
        remote.bind(peer)
        remote.resolve(plugin, what, None)
        if not remote.access & na.Access.READ_ONLY:
            return f"comes with a {remote.access.name} handle, which cannot be pulled"
    except (ValueError, na.NAError) as exc:
        return getattr(exc, "cause", None) or str(exc)
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


class TargetHandle:
    """The target's side of one call, for handlers that respond later (async, thread pool)."""

    __slots__ = ("args", "one_way", "rpc", "source", "state", "tag", "target")

    def __init__(self, target: Target, source: na.Addr, tag: int, rpc: RPC,
                 args: tuple[Any, ...], one_way: bool) -> None:
        self.target = target
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
        self.target.respond(self.rpc, self.source, self.tag, value)

    def fail(self, exc: BaseException) -> None:
        """Answer with the exception (its type and message reach the caller as RemoteError)."""
        self.state = st.next_state(st.TARGET, "target", self.state, "respond")  # type: ignore[assignment]
        self.target.handler_failed(self.rpc, self.source, self.tag, int(self.one_way), exc)
