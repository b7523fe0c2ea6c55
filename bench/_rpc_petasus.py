"""petasus's low-level blocking clients for the RPC benchmark: handles forwarded with a
completion callback (Mercury's HG_Forward with a callback), the pattern that keeps N calls in
flight with the least work per call on the blocking side of the API. Kept apart from
``rpc.py`` so the test suite can run them without the benchmark peers installed.

Each call carries the engine's timeout, as a user's would: the callback path arms a context
timer per call (the blocking ``remote.sum()`` and ``future()`` paths enforce theirs in the
wait instead), and that cost is part of what is measured.
"""

from __future__ import annotations

from _drive import args, check, now_ns

from petasus import hg

TIMEOUT = 5.0  # seconds past the measurement a wait may take before the run fails


def callback_window(engine: hg.Engine, method: hg.RemoteMethod, conc: int,
                    seconds: float) -> list[int]:
    """The low-level window: ``conc`` handles, each forwarded again from its own completion
    callback (which runs from trigger(), on the thread that drives progress), while this
    thread waits until the last one is done."""
    ctx, addr, rpc, timeout = engine.context, method.addr, method.rpc, engine.timeout
    latencies: list[int] = []
    errors: list[BaseException] = []
    end = now_ns() + int(seconds * 1e9)
    state = [conc, conc]  # the next call's number, the handles still running

    def start(k: int) -> None:
        sent = [k, now_ns()]  # this handle's call number and send time

        def done(handle: hg.Handle) -> None:
            t = now_ns()
            try:
                if handle.error is not None:
                    raise handle.error
                check(handle.value, sent[0])
            except BaseException as exc:  # reported by the waiting thread
                errors.append(exc)
                state[1] -= 1
                return
            latencies.append(t - sent[1])
            if t < end:
                i = sent[0] = state[0]
                state[0] = i + 1
                sent[1] = t
                handle.forward(args(i), done, timeout)
            else:
                state[1] -= 1

        ctx.create(addr, rpc).forward(args(k), done, timeout)

    for k in range(conc):
        start(k)
    if not engine.wait_until(lambda: state[1] == 0, seconds + TIMEOUT):
        raise RuntimeError("callback window: calls still running after the deadline")
    if errors:
        raise errors[0]
    return latencies


def callback_burst(engine: hg.Engine, method: hg.RemoteMethod, conc: int,
                   seconds: float) -> list[int]:
    """``conc`` calls forwarded with a completion callback, waited for together."""
    ctx, addr, rpc, timeout = engine.context, method.addr, method.rpc, engine.timeout
    latencies: list[int] = []
    errors: list[BaseException] = []
    end = now_ns() + int(seconds * 1e9)
    left = [0]
    t0 = [0]
    handles = [ctx.create(addr, rpc) for _ in range(conc)]

    def done(handle: hg.Handle) -> None:
        latencies.append(now_ns() - t0[0])
        left[0] -= 1
        if handle.error is not None:
            errors.append(handle.error)

    n = 0
    while now_ns() < end:
        t0[0] = now_ns()
        left[0] = conc
        for k, handle in enumerate(handles):
            handle.forward(args(n + k), done, timeout)
        if not engine.wait_until(lambda: left[0] == 0, TIMEOUT):
            raise RuntimeError("callback burst: calls still running after the deadline")
        if errors:
            raise errors[0]
        for k, handle in enumerate(handles):
            check(handle.value, n + k)
        n += conc
    return latencies
