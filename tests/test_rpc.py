"""RPC conformance: the same tests over every plugin, against a process and a thread."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import rpc_api as api
from conftest import TIMEOUT, RpcPeer, Spec
from rpc_peer import Gate

from petasus import hg, na

HERE = Path(__file__).parent


# -- calls ----------------------------------------------------------------------------------
def test_sum_blocking(rpc: RpcPeer) -> None:
    assert rpc.remote.sum(42, 23) == 65
    assert rpc.remote.sum(x=-5, y=2) == -3
    assert rpc.remote.sum.call(1, 2, timeout=5) == 3


def test_many_in_flight(rpc: RpcPeer) -> None:
    handles = [rpc.remote.sum.future(i, i) for i in range(200)]
    assert [rpc.engine.wait(h) for h in handles] == [2 * i for i in range(200)]


def test_asyncio_calls(rpc: RpcPeer) -> None:
    async def main() -> list[int]:
        return list(await asyncio.gather(*(rpc.remote.sum.async_(i, 1) for i in range(50))))

    assert asyncio.run(main()) == [i + 1 for i in range(50)]
    # The engine follows the application to a new loop once the old one is closed.
    assert asyncio.run(main()) == [i + 1 for i in range(50)]
    assert rpc.remote.sum(1, 2) == 3  # and blocking calls still work between loops


def test_lone_awaited_calls_one_after_another(rpc: RpcPeer) -> None:
    # One call at a time on an otherwise idle loop: the driver may wait in the task itself
    # (AsyncioDriver.inline) or through a future; values and errors are the same either way.
    async def main() -> list[int]:
        out = []
        for i in range(200):
            out.append(await rpc.remote.sum.async_(i, 2))
        with pytest.raises(hg.RemoteError, match="lone failure"):
            await rpc.remote.fail.async_("ValueError", "lone failure")
        return out

    assert asyncio.run(main()) == [i + 2 for i in range(200)]


def test_asyncio_timeout_and_cancel(rpc: RpcPeer) -> None:
    before = rpc.engine.statistics()

    async def main() -> None:
        with pytest.raises(hg.RPCTimeout, match="hold"):
            await rpc.remote.hold.async_(TIMEOUT, timeout=0.05)
        task = asyncio.ensure_future(rpc.remote.hold.async_(TIMEOUT))
        await asyncio.sleep(0)  # one yield: the task sends its call and awaits the answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = rpc.engine.statistics()
        assert stats["canceled"] == before["canceled"] + 1
        assert stats["timeouts"] == before["timeouts"] + 1
        assert await rpc.remote.sum.async_(2, 3) == 5
        await rpc.remote.release.async_(2)

    asyncio.run(main())


_TASK_ID: contextvars.ContextVar[int] = contextvars.ContextVar("task_id")


class CountingLoop(asyncio.SelectorEventLoop):
    """Counts the tasks' steps and wake-ups scheduled with ``call_soon`` (callbacks bound to
    a task)."""

    task_callbacks = 0

    def call_soon(self, callback: Any, *args: Any, context: Any = None) -> Any:
        if isinstance(getattr(callback, "__self__", None), asyncio.Task):
            self.task_callbacks += 1
        return super().call_soon(callback, *args, context=context)


def test_awaited_calls_wake_their_tasks_at_once_in_their_own_context(rpc: RpcPeer) -> None:
    """Sixteen tasks keep calls in flight: each resumes in its own context (a context
    variable it set), with its own results, and most wake-ups run in the driver's poll
    rather than through the loop's ready queue (hg/awaited.py ``settle``)."""
    calls = 16 * 40

    async def worker(k: int) -> list[int]:
        _TASK_ID.set(k)
        out = []
        for i in range(40):
            out.append(await rpc.remote.sum.async_(k, i))
            assert _TASK_ID.get() == k
        return out

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(worker(k) for k in range(16))))

    loop = CountingLoop()
    try:
        assert loop.run_until_complete(main()) == [[k + i for i in range(40)]
                                                   for k in range(16)]
    finally:
        loop.close()
    # Through a plain future each call's wake-up is a call_soon; here the tasks' first steps
    # are, and few wake-ups (those a completion outside the driver's poll made).
    assert loop.task_callbacks < calls / 4, f"{loop.task_callbacks} for {calls} calls"


def test_a_task_never_wakes_inside_a_callback_that_makes_a_blocking_call(rpc: RpcPeer) -> None:
    """A completion callback (run by the asyncio driver's trigger pass) that makes blocking
    calls drives progress itself; an awaited call that completes meanwhile must not resume
    its task inside the callback (which may hold a lock the task wants, or be half-way
    through its work), but after it."""
    inside: list[bool] = []
    seen: list[bool] = []

    def callback(_handle: Any) -> None:
        inside.append(True)
        try:
            rpc.remote.release(1)  # the held call's answer is on its way
            for i in range(20):    # ... and is read by one of these waits
                assert rpc.remote.sum(i, 1) == i + 1
        finally:
            inside.pop()

    async def held() -> None:
        assert await rpc.remote.hold.async_(TIMEOUT) >= 0
        seen.append(bool(inside))

    async def main() -> None:
        task = asyncio.ensure_future(held())
        await asyncio.sleep(0)  # its call is in flight
        sum_decl = rpc.remote.sum
        rpc.engine.forward(sum_decl.addr, sum_decl.rpc, (1, 2), TIMEOUT, callback)
        await asyncio.wait_for(task, TIMEOUT)

    asyncio.run(main())
    assert seen == [False]


def test_a_cancelled_task_among_woken_ones(rpc: RpcPeer) -> None:
    """A task cancelled while its call is in flight gets CancelledError; the tasks around it,
    woken in the same polls, get their answers, and a task that catches the cancellation
    goes on calling."""
    async def main() -> None:
        async def resilient() -> int:
            try:
                await rpc.remote.hold.async_(TIMEOUT)
            except asyncio.CancelledError:
                return int(await rpc.remote.sum.async_(20, 22))
            raise AssertionError("not cancelled")
        held = asyncio.ensure_future(rpc.remote.hold.async_(TIMEOUT))
        survivor = asyncio.ensure_future(resilient())
        # Answered after both holds on the one connection: the server has them, so the
        # release below is theirs (a call cancelled before it left is withdrawn, and a
        # release for it would answer a later test's hold at once).
        assert await rpc.remote.sum.async_(0, 0) == 0
        others = [asyncio.ensure_future(rpc.remote.sum.async_(i, 1)) for i in range(32)]
        await asyncio.sleep(0)  # their calls are in flight
        held.cancel()
        survivor.cancel()
        assert await asyncio.gather(*others) == [i + 1 for i in range(32)]
        with pytest.raises(asyncio.CancelledError):
            await held
        assert await survivor == 42
        await rpc.remote.release.async_(2)  # the holds the server still keeps

    asyncio.run(main())


def test_composite_types(rpc: RpcPeer) -> None:
    point = api.Point(1.5, -2.0, "p")
    text, count = rpc.remote.describe(point, ["a", "b"], {"z": 1.0, "y": 2.5}, 7)
    assert text == "p@(1.5,-2.0) a,b [('y', 2.5), ('z', 1.0)] 7" and count == 2
    assert rpc.remote.describe(point, [], {})[0].endswith("None")
    assert rpc.remote.flip(api.Fixed(5, 65535 - 1, 1.5, True)) == api.Fixed(-5, 65535, 3.0, False)
    value = {"k": [1, 2.5, None, "s", b"\x00\xff"], "n": {"deep": True}}
    assert rpc.remote.echo_any(value) == value
    blob = os.urandom(40_000)
    assert rpc.remote.echo_bytes(blob) == blob


# -- errors -----------------------------------------------------------------------------------
def test_remote_errors_carry_type_and_message(rpc: RpcPeer) -> None:
    with pytest.raises(hg.RemoteError) as info:
        rpc.remote.fail("KeyError", "missing thing")
    err = info.value
    assert err.remote_type == "KeyError" and "missing thing" in err.remote_message
    assert err.rpc == "fail" and err.peer == rpc.uri
    assert "Traceback" not in str(err)
    assert rpc.remote.sum(1, 1) == 2  # the server is unharmed


def test_unknown_rpc(rpc: RpcPeer) -> None:
    with pytest.raises(hg.NoSuchRPC, match="never_registered"):
        rpc.remote.never_registered(1)
    with pytest.raises(hg.NoSuchRPC, match="provider 3"):
        rpc.engine.lookup(rpc.uri, provider_id=3).sum(1, 2)


def test_decode_error_on_the_target(rpc: RpcPeer) -> None:
    # A client that declares sum with other types sends bytes the server cannot decode.
    @hg.declare(name="sum")
    def wrong(x: str) -> int: ...

    method = hg.RemoteMethod(rpc.remote, wrong)
    with pytest.raises(hg.RPCError, match="decode error"):
        method("not two int32s")
    assert rpc.remote.sum(2, 2) == 4


def test_hostile_input_and_bad_results_get_answers(rpc: RpcPeer) -> None:
    # A msgpack map whose key is an array decodes to an unhashable key on the server.
    with pytest.raises(hg.RPCError, match="decode error"):
        rpc.remote.echo_any({(1, 2): 5})
    with pytest.raises(hg.RemoteError, match="cannot encode the result"):
        rpc.remote.bad_result()
    assert rpc.remote.sum(1, 2) == 3  # the server is still serving


def test_a_handler_may_make_blocking_calls(rpc: RpcPeer) -> None:
    assert rpc.remote.relay(20, 22) == 42


def test_blocking_calls_from_executor_threads_beside_asyncio(rpc: RpcPeer) -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        calls = [rpc.remote.sum.async_(i, 1) for i in range(20)]
        calls += [loop.run_in_executor(None, rpc.remote.sum, i, 2) for i in range(5)]
        return list(await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT))

    assert asyncio.run(main()) == [i + 1 for i in range(20)] + [i + 2 for i in range(5)]


def test_no_timeout_means_none(spec: Spec, rpc: RpcPeer) -> None:
    with hg.Engine(spec.uri, timeout=None, **spec.options) as engine:
        engine.declare(api)
        assert engine.lookup(rpc.uri).sum(1, 2) == 3


def test_bad_arguments_fail_locally(rpc: RpcPeer) -> None:
    with pytest.raises(hg.EncodeError, match="sum"):
        rpc.remote.sum("one", 2)
    with pytest.raises(hg.EncodeError):
        rpc.remote.sum(2**31, 0)
    with pytest.raises(TypeError, match="sum"):
        rpc.remote.sum(1, 2, 3)
    with pytest.raises(AttributeError, match="not a declared RPC"):
        rpc.remote.nope  # noqa: B018


# -- one-way, providers, handler kinds --------------------------------------------------------
def test_one_way(rpc: RpcPeer) -> None:
    before = len(rpc.remote.notes())
    for i in range(5):
        assert rpc.remote.note(f"n{i}") is None
    # Requests from one client are served in order, so the query sees all five notes.
    assert rpc.remote.notes()[before:] == [f"n{i}" for i in range(5)]


def test_providers(rpc: RpcPeer) -> None:
    assert rpc.remote.whoami() == "provider 0"
    assert rpc.engine.lookup(rpc.uri, provider_id=7).whoami() == "provider 7"


def test_async_and_pooled_handlers(rpc: RpcPeer) -> None:
    assert rpc.remote.async_double(21) == 42
    assert rpc.remote.pooled_double(4) == 8
    # A slow pooled handler does not block other calls.
    slow = rpc.remote.hold.future(TIMEOUT)
    assert rpc.remote.sum(1, 2) == 3
    assert not slow.done  # the sum was answered while the pooled handler still ran
    rpc.remote.release()
    assert rpc.engine.wait(slow) == TIMEOUT


# -- timeouts, cancel, failures ---------------------------------------------------------------
def test_timeout_and_late_response_dropped(rpc: RpcPeer) -> None:
    with pytest.raises(hg.RPCTimeout, match="hold"):
        rpc.remote.hold.call(TIMEOUT, timeout=0.05)
    assert rpc.remote.sum(3, 4) == 7
    # The late reply (TIMEOUT) arrives while we wait for the next hold, and is dropped: that
    # call gets its own answer.
    second = rpc.remote.hold.future(TIMEOUT - 1)
    rpc.remote.release(2)
    assert rpc.engine.wait(second) == TIMEOUT - 1


def test_future_timeouts_are_enforced_by_wait_and_result(rpc: RpcPeer) -> None:
    for finish in (rpc.engine.wait, hg.Handle.result):
        handle = rpc.remote.hold.future(TIMEOUT, timeout=0.05)
        with pytest.raises(hg.RPCTimeout):
            finish(handle)
    rpc.remote.release(2)
    assert rpc.remote.sum(1, 2) == 3


def test_the_gate_gives_a_release_to_the_holds_already_waiting() -> None:
    """The peers' hold/release Gate: a token released while a hold waits is that hold's,
    even if a later hold gets the lock before the woken one runs (as on a busy host). Else the
    hold of a call that timed out (test_timeout_and_late_response_dropped) lost the token
    meant for it to the next test's hold, which answered at once: "DID NOT RAISE RPCTimeout"
    in test_future_timeouts_are_enforced_by_wait_and_result."""
    gate = Gate()
    granted: list[bool] = []
    first = threading.Thread(target=lambda: granted.append(gate.take(TIMEOUT)), daemon=True)
    first.start()
    assert gate.wait_holds(1, TIMEOUT)
    try:
        with gate._cond:  # the woken hold cannot run before we let go of the lock
            gate.release(1)
            assert not gate.take(0.05)  # a later hold, first to the lock: no token for it
        first.join(TIMEOUT)
        assert granted == [True]
        assert not first.is_alive()
    finally:
        gate.release(1)  # whatever happened, no hold is left waiting


def test_cancel(rpc: RpcPeer) -> None:
    handle = rpc.remote.hold.future(TIMEOUT)
    handle.cancel()
    with pytest.raises(hg.Canceled):
        handle.result()
    handle.cancel()  # idempotent
    assert rpc.remote.sum(5, 5) == 10
    rpc.remote.release()


def test_threads_share_one_engine(rpc: RpcPeer) -> None:
    results: dict[int, list[int]] = {}

    def worker(k: int) -> None:
        results[k] = [rpc.remote.sum(k, i) for i in range(100)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == {k: [k + i for i in range(100)] for k in range(4)}


def test_statistics(fresh_rpc: RpcPeer) -> None:
    # A fresh pair: no late answer of an earlier test's canceled call can land in the count.
    rpc = fresh_rpc
    rpc.remote.sum(1, 1)  # connected
    before = rpc.engine.statistics()
    rpc.remote.sum(1, 2)
    stats = rpc.engine.statistics()
    assert stats["sent"] == before["sent"] + 1
    assert stats["na"]["msgs_sent"] == before["na"]["msgs_sent"] + 1
    assert stats["na"]["msgs_received"] == before["na"]["msgs_received"] + 1


def test_server_killed_mid_call(spec: Spec) -> None:
    peer = RpcPeer(spec, "process")
    try:
        assert peer.remote.sum(1, 1) == 2
        handle = peer.remote.hold.future(TIMEOUT)
        peer.kill()
        with pytest.raises(hg.PeerError) as info:
            peer.engine.wait(handle)
        assert peer.uri in str(info.value)
        with pytest.raises(hg.PeerError):
            peer.remote.sum(1, 1)
    finally:
        peer.close()


def test_nobody_listening(spec: Spec) -> None:
    with hg.Engine(spec.uri, listen=True, **spec.options) as gone:
        uri = gone.uri
    with hg.Engine(spec.uri, **spec.options) as client:
        client.declare(api)
        with pytest.raises(hg.PeerError, match="could not connect"):
            client.lookup(uri).sum(1, 2)


def test_closed_engine_and_resource_warning(spec: Spec) -> None:
    engine = hg.Engine(spec.uri, **spec.options)
    engine.close()
    engine.declare(api)
    with pytest.raises(RuntimeError, match="closed"):
        engine.lookup(engine.uri if spec.uri.startswith("sm") else "tcp://127.0.0.1:9")
    with pytest.warns(ResourceWarning, match="not closed"):
        leaked = hg.Engine(spec.uri, **spec.options)
        leaked.__del__()
    leaked.close()


def test_raw_garbage_request_gets_an_error_reply(rpc: RpcPeer) -> None:
    """A request with a foreign header is answered with an error, never a hang or a crash."""
    plugin = rpc.engine.na
    addr = plugin.addr_lookup(rpc.uri)
    reply = bytearray(plugin.msg_get_max_expected_size())
    recv = plugin.msg_recv_expected(addr, reply, 999_999)
    send = plugin.msg_send_unexpected(addr, b"GET / HTTP/1.1\r\n\r\n", 999_999)
    na.wait(plugin, send, recv, timeout=TIMEOUT)
    assert reply[2] == hg.header.PROTOCOL_ERROR
    assert rpc.remote.sum(1, 2) == 3
