"""The origin side of calls: ``Handle`` forwards a call and receives its answer.

``forward`` posts the expected receive for the response on a fresh tag, then sends the
request; ``result()`` drives progress until the call finishes (the Engine's drivers wait on
its state instead). A result too large for a message is pulled through bulk and acknowledged.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from petasus import na
from petasus.bulk import READ_ONLY, WRITE_ONLY, Bulk, RemoteBulk, Transfer

from . import header as hd
from . import overflow as ov
from . import state as st
from .errors import Canceled, EncodeError, NoSuchRPC, PeerError, RemoteError, RPCError, RPCTimeout
from .overflow import ACK_BIT, TAG_MASK, Landing, segments
from .procs import proc_for
from .registry import RPC
from .scalars import bound_to
from .target import Target, pull_refusal

log = logging.getLogger("petasus.hg.rpc")

_REQ, _RESP = hd.REQUEST, hd.RESPONSE
_ID, _PROTO = hd.IDENTIFIER, hd.PROTOCOL
_FORWARDED = st.FORWARDED
_ORIGIN = st.ORIGIN
_STR = proc_for(str)


class Context(Protocol):
    """What a call needs from its context (a ``context.Context``): the plugin, the clock and
    timers, the driver it waits through, the overflow budget, and the target that sends
    acknowledgements."""

    na: na.Plugin
    stats: dict[str, int]
    clock: Callable[[], float]
    landing: Landing
    bulk_allow: Callable[[str], bool] | None
    max_unexpected: int
    driver: na.BlockingDriver
    target: Target
    _tags: Iterator[int]
    _bufs: list[memoryview]

    def _take_buffer(self) -> memoryview: ...

    def _arm(self, entry: Any, deadline: float, span: float | None = None) -> None: ...


class Handle:
    """One call from the origin. Forward, then wait (``result()``), or get a callback."""

    __slots__ = ("_exposure", "_flow", "_overflow", "_pull", "_recv", "addr", "callback",
                 "context", "deadline", "error", "rpc", "state", "tag", "timeout", "value",
                 "waiter")

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
        self._exposure: ov.Overflow | None = None  # its state: the answer is its ack
        self._pull: Transfer | None = None  # the target's output, being pulled
        self._flow: ov.Overflow | None = None  # that pull's state
        self.waiter: Any = None  # the future an asyncio caller awaits (engine.acall)

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
        new = _ORIGIN.get((self.state, "forward"))
        if new is None:
            new = st.next_state(_ORIGIN, "origin", self.state, "forward")
        ctx, rpc = self.context, self.rpc
        flags = hd.NO_RESPONSE if rpc.one_way else 0
        try:
            fused = rpc.req_fused
            if fused is not None:
                payload = fused.pack(_ID, _PROTO, rpc.id, flags, 0, *args)
            else:
                parts = rpc.in_proc.parts(args)
                size = sum(map(len, parts)) + _REQ.size
                if size > ctx.max_unexpected:
                    payload = self._expose_input(parts, flags)
                else:
                    payload = hd.gather(_REQ.pack(_ID, _PROTO, rpc.id, flags, 0), parts, size)
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
                ctx._arm(self, self.deadline, timeout)
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
        self._exposure = ov.Overflow(ov.EXPOSER)
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
            limit = float("inf") if timeout is None else ctx.clock() + timeout
            own = self.deadline or float("inf")  # the call's own timeout, if forwarded unarmed
            finished = ctx.driver.wait_until(lambda: self.state != _FORWARDED, min(limit, own),
                                            self.expire if own <= limit else None)
            if not finished and self.state == _FORWARDED:
                raise TimeoutError(f"result: {self!r} still pending after {timeout} s")
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
                out = rpc.out_proc
                value = (bound_to(out, view[_RESP.size:], self.addr, self.context.bulk_allow)
                         if out.handles else out.loads(view[_RESP.size:]))
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
        refused = pull_refusal(remote, self.addr, ctx.na, "pull the result")
        flow = self._flow = ov.Overflow(ov.ORIGIN, ctx.landing)
        if ov.Action.PULL not in flow.begin(size, refused, peer=self.addr):
            ctx.target.send_ack(self.addr, tag | ACK_BIT)
            self._finish("error", None, RPCError(rpc.name, self.addr.uri,
                                                 f"result of {size} B {flow.reason}"))
            return
        ctx.stats["overflows"] += 1
        lease = ctx.landing.take(size, remote.wire.sizes if self.rpc.out_proc.adopts else (),
                                 ctx.clock())

        def give_up(why: str) -> None:
            """Refused before a byte moved: keep nothing, tell the target it may let go."""
            ctx.target.let_go(lease, False)
            flow.handle("failed")  # gives the budget back
            ctx.target.send_ack(self.addr, tag | ACK_BIT)
            self._finish("error", None, RPCError(rpc.name, self.addr.uri, why))

        try:
            local = Bulk(ctx.na, lease.segments, WRITE_ONLY, eager=False)
        except Exception as exc:  # the landing could not be registered
            give_up(f"the result cannot land: {exc}")
            return

        def pulled(transfer: Transfer) -> None:
            local.close()
            self._pull = None
            try:
                for action in flow.handle("failed" if transfer.error is not None else "pulled"):
                    if action is ov.Action.ACK:
                        ctx.target.send_ack(self.addr, tag | ACK_BIT)  # the target may let go
                    elif self.state != _FORWARDED:
                        return  # timed out or canceled meanwhile
                    elif action is ov.Action.FAIL:
                        self._finish("error", None, self._transport_error(transfer.error))  # type: ignore[arg-type]
                    elif action is ov.Action.DELIVER:
                        try:
                            value = lease.decode(lambda view, table: bound_to(
                                rpc.out_proc, view, self.addr, ctx.bulk_allow, table))
                        except Exception as exc:
                            self._finish("error", None, RPCError(rpc.name, self.addr.uri,
                                                                 f"malformed response: {exc}"))
                            return
                        self._finish("response", value, None)
            finally:
                # The transfer is over, whatever its outcome.
                ctx.target.let_go(lease, transfer.error is None)

        try:
            transfer = local.pull_from(remote, addr=self.addr, callback=pulled)
        except (ValueError, na.NAError) as exc:
            local.close()
            give_up(f"the result cannot be pulled: {exc}")
            return
        if not transfer.done:
            self._pull = transfer

    def _transport_error(self, error: BaseException) -> BaseException:
        if isinstance(error, na.Canceled):
            return Canceled(self.rpc.name, self.addr.uri, str(error))
        if isinstance(error, na.NAError):
            return PeerError(self.rpc.name, self.addr.uri, error.cause)
        return error

    def _finish(self, event: str, value: Any, error: BaseException | None) -> None:
        new = _ORIGIN.get((self.state, event))  # the table's common case, looked up inline
        if new is None:
            new = st.next_state(_ORIGIN, "origin", self.state, event)
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
            if self._pull is not None and self._flow is not None and \
                    ov.Action.CANCEL_PULL in self._flow.handle("cancel"):
                self._pull.cancel()
        if self._overflow is not None and self._exposure is not None and \
                ov.Action.RELEASE in self._exposure.handle("acked"):
            # The call's answer (or its end) acknowledges the exposed input.
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
