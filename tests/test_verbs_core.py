"""The verbs plugin's sans-I/O core, everywhere (no pyverbs, no device): every wire format
round-tripped with hypothesis and fed hostile bytes, the credit protocol simulated between two
ends under arbitrary schedules, and the pure rules (access flags, splitting, the hybrid
choice, completion statuses, slot pools, the registration cache, the diagnosis of what is
missing)."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petasus import na
from petasus.na import verbs
from petasus.na.verbs import _protocol as p
from petasus.na.verbs import _wire as w

MAX_BODY = 1000
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


# -- frames --------------------------------------------------------------------------------------
@settings(deadline=None)  # no timed assertions: the test hosts are shared
@given(st.sampled_from([w.UNEXPECTED, w.EXPECTED]), u32, u32, u32, st.binary(max_size=MAX_BODY))
def test_message_frames_round_trip(kind: int, tag: int, ad: int, ac: int, body: bytes) -> None:
    data = w.encode_header(kind, tag, ad, ac) + body
    frame = w.decode_frame(data, MAX_BODY)
    assert (frame.kind, frame.tag, frame.acked_data, frame.acked_ctrl) == (kind, tag, ad, ac)
    assert data[frame.body:] == body


@settings(deadline=None)  # no timed assertions: the test hosts are shared
@given(st.sampled_from([w.GET_REQ, w.PUT_REQ]), u32, u32, u64, u64, u64,
       st.integers(0, MAX_BODY))
def test_rma_requests_round_trip(kind: int, ad: int, ac: int, rma_id: int, key: int, off: int,
                                 length: int) -> None:
    data = w.encode_rma_req(kind, ad, ac, rma_id, key, off, length)
    if kind == w.PUT_REQ:
        data += bytes(length)
    frame = w.decode_frame(data, MAX_BODY)
    assert (frame.rma_id, frame.key, frame.offset, frame.length) == (rma_id, key, off, length)
    assert len(data) - frame.body == (length if kind == w.PUT_REQ else 0)


@settings(deadline=None)  # no timed assertions: the test hosts are shared
@given(u64, st.integers(0, 255), st.binary(max_size=MAX_BODY))
def test_rma_replies_round_trip(rma_id: int, status: int, body: bytes) -> None:
    frame = w.decode_frame(w.encode_rma_rep(w.GET_REP, 1, 2, rma_id, status) + body, MAX_BODY)
    assert (frame.kind, frame.rma_id, frame.status, frame.length) == (w.GET_REP, rma_id, status,
                                                                       len(body))
    put = w.decode_frame(w.encode_rma_rep(w.PUT_REP, 1, 2, rma_id, status), MAX_BODY)
    assert (put.rma_id, put.status) == (rma_id, status)


def test_every_truncation_of_a_request_is_refused() -> None:
    for kind in (w.GET_REQ, w.PUT_REQ):
        data = w.encode_rma_req(kind, 0, 0, 7, 9, 11, 40) + (bytes(40) if kind == w.PUT_REQ
                                                            else b"")
        for cut in range(len(data)):
            with pytest.raises(w.WireError):
                w.decode_frame(data[:cut], MAX_BODY)
        with pytest.raises(w.WireError):
            w.decode_frame(data + b"x", MAX_BODY)  # a put's data must match its length


def test_frames_that_break_the_format_are_refused() -> None:
    good = w.encode_header(w.UNEXPECTED, 1, 0, 0)
    cases = {
        "version": bytes([9]) + good[1:],
        "kind": good[:1] + bytes([0]) + good[2:],
        "unknown kind": good[:1] + bytes([99]) + good[2:],
        "a credit frame with a payload": w.encode_header(w.CREDIT, 0, 0, 0) + b"x",
        "a put reply with data": w.encode_rma_rep(w.PUT_REP, 0, 0, 1, 0) + b"x",
        "a payload past the maximum": good + bytes(MAX_BODY + 1),
        "a get past the maximum": w.encode_rma_req(w.GET_REQ, 0, 0, 1, 1, 0, MAX_BODY + 1),
    }
    for what, data in cases.items():
        with pytest.raises(w.WireError):
            w.decode_frame(data, MAX_BODY)
            pytest.fail(f"{what} was accepted")


@settings(deadline=None)  # no timed assertions: the test hosts are shared
@given(st.binary(max_size=80))
def test_any_bytes_decode_to_a_frame_or_a_wire_error(data: bytes) -> None:
    try:
        frame = w.decode_frame(data, MAX_BODY)
    except w.WireError:
        return
    assert frame.kind in w.KINDS and frame.body <= len(data)


# -- the out-of-band stream ----------------------------------------------------------------------
hellos = st.builds(
    w.Hello, st.just(w.ACCEPT), st.integers(1, 5), st.integers(0, 0xFFFF),
    st.integers(1, (1 << 24) - 1), st.integers(0, (1 << 24) - 1), st.integers(1, 255),
    st.binary(min_size=16, max_size=16), st.integers(1, 0xFFFF), st.integers(1, 0xFFFF),
    u32, st.text(max_size=40))


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[w.Hello | w.Retire]:
    reader, out, pos, i = w.OobReader(), [], 0, 0
    while pos < len(data):
        step = max(1, cuts[i % len(cuts)]) if cuts else len(data)
        out += reader.feed(data[pos:pos + step])
        pos += step
        i += 1
    return out


@settings(deadline=None)  # no timed assertions: the test hosts are shared
@given(hellos, st.lists(u32.map(lambda q: q & 0xFFFFFF), max_size=3),
       st.lists(st.integers(1, 7), max_size=20))
def test_hello_and_retires_arrive_whole_in_any_pieces(hello: w.Hello, retired: list[int],
                                                       cuts: list[int]) -> None:
    data = w.encode_hello(hello) + b"".join(w.encode_retire(q) for q in retired)
    expect = [hello, *(w.Retire(q) for q in retired)]
    assert feed_in_pieces(data, cuts) == expect
    assert feed_in_pieces(data, [1]) == expect


def test_a_refusal_carries_its_reason() -> None:
    refusal = w.Hello(w.REFUSE, 0, 0, 0, 0, 1, bytes(16), 0, 0, 0, "refused: SRQ full")
    assert w.OobReader().feed(w.encode_hello(refusal)) == [refusal]


def test_hostile_hellos_are_wire_errors() -> None:
    good = w.encode_hello(w.Hello(w.ACCEPT, 3, 1, 5, 6, 1, bytes(16), 4, 1, 100, "verbs://d"))
    body = bytearray(good[2:])
    bad = {
        "magic": b"XXXX" + bytes(body[4:]),
        "qpn 0": bytes(body[:10]) + (0).to_bytes(4, "little") + bytes(body[14:]),
        "psn past 24 bits": bytes(body[:14]) + (1 << 24).to_bytes(4, "little") + bytes(body[18:]),
        "status": bytes(body[:5]) + b"\x07" + bytes(body[6:]),
        "uri length": bytes(body[:-11]) + b"\xff\x00" + bytes(body[-9:]),
    }
    for what, raw in bad.items():
        with pytest.raises(w.WireError):
            w.OobReader().feed(len(raw).to_bytes(2, "little") + raw)
            pytest.fail(f"a hello with a bad {what} was accepted")
    with pytest.raises(w.WireError):
        w.OobReader().feed(b"\xff\xff")  # a record longer than any hello


@settings(deadline=None)  # no timed assertions: the test hosts are shared
@given(st.binary(max_size=120))
def test_any_stream_gives_records_or_a_wire_error(data: bytes) -> None:
    try:
        records = w.OobReader().feed(data)
    except w.WireError:
        return
    assert all(isinstance(r, w.Hello | w.Retire) for r in records)


@settings(deadline=None)  # no timed assertions: the test hosts are shared
@given(st.binary(min_size=16, max_size=16))
def test_gids_round_trip(raw: bytes) -> None:
    text = w.gid_from_bytes(raw)
    assert len(text.split(":")) == 8 and w.gid_to_bytes(text) == raw


def test_bad_gids() -> None:
    for text in ("", "fe80::1", "zz" * 16, "0" * 30):
        with pytest.raises(w.WireError):
            w.gid_to_bytes(text)
    with pytest.raises(w.WireError):
        w.gid_from_bytes(b"short")


# -- URIs ----------------------------------------------------------------------------------------
def test_uris() -> None:
    assert w.parse_uri("verbs://mlx5_0:2/10.0.0.1:7000") == w.VerbsUri("mlx5_0", 2, "10.0.0.1",
                                                                        7000)
    assert w.parse_uri("verbs://rxe0") == w.VerbsUri("rxe0", 1, "127.0.0.1", 0)
    assert str(w.parse_uri("verbs://mlx5_1/[::1]:9")) == "verbs://mlx5_1:1/[::1]:9"
    for bad in ("verbs://", "tcp://1.2.3.4:5", "verbs://d:0/h:1", "verbs://d:1/h:70000",
                "verbs://d/h", "verbs://d/[zz]:1"):
        with pytest.raises(ValueError):
            w.parse_uri(bad)


@settings(deadline=None)  # no timed assertions: the test hosts are shared
@given(st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True), st.integers(1, 255),
       st.ip_addresses().map(str), st.integers(0, 65535))
def test_uris_round_trip(device: str, port: int, host: str, tcp: int) -> None:
    uri = w.VerbsUri(device, port, host, tcp)
    assert w.parse_uri(str(uri)) == uri


# -- access, splitting, the hybrid choice, completion statuses -----------------------------------
def test_na_rights_map_to_ibv_flags_exactly() -> None:
    lw, rw, rr = p.IBV_ACCESS_LOCAL_WRITE, p.IBV_ACCESS_REMOTE_WRITE, p.IBV_ACCESS_REMOTE_READ
    assert p.access_flags(na.Access.READ_ONLY, False) == rr
    assert p.access_flags(na.Access.READ_ONLY, True) == rr | lw
    assert p.access_flags(na.Access.WRITE_ONLY, True) == rw | lw
    assert p.access_flags(na.Access.READ_WRITE, True) == rr | rw | lw
    with pytest.raises(ValueError):
        p.access_flags(na.Access.WRITE_ONLY, False)


@settings(deadline=None)  # no timed assertions: the test hosts are shared
@given(st.one_of(st.tuples(st.integers(0, 5000), st.integers(1, 5000)),
                 st.tuples(st.integers(0, 1 << 34), st.integers(1 << 24, 1 << 31))))
def test_split_covers_the_range_in_order(case: tuple[int, int]) -> None:
    length, chunk = case
    pieces = p.split(length, chunk)
    assert sum(n for _, n in pieces) == length
    assert all(0 < n <= chunk for _, n in pieces)
    ends = [off + n for off, n in pieces]
    assert [off for off, _ in pieces] == [0, *ends][:len(pieces)]  # contiguous, in order


def test_the_hybrid_switch_point() -> None:
    assert p.TWO_SIDED_MAX == 32 * 1024
    assert p.two_sided(32 * 1024, p.TWO_SIDED_MAX) and not p.two_sided(32 * 1024 + 1,
                                                                        p.TWO_SIDED_MAX)
    assert not p.two_sided(1, 0)  # two_sided_max=0: everything one-sided


def test_completion_statuses_become_the_right_errors() -> None:
    access = p.wc_error(10, "get", "verbs://d:1/h:1")
    assert isinstance(access, na.AccessError) and "verbs://d:1/h:1" in str(access)
    for reason in ("unknown key", "out of bounds", "access rights", "IBV_WC_REM_ACCESS_ERR"):
        assert reason in str(access)  # the NIC does not say which; the suite matches each
    for status in (12, 13):
        assert isinstance(p.wc_error(status, "put", "x"), na.PeerError)
    assert isinstance(p.wc_error(9, "put", "x"), na.ProtocolError)
    local = p.wc_error(4, "put", "x")
    assert type(local) is na.NAError and "IBV_WC_LOC_PROT_ERR" in str(local)
    assert "status 99" in str(p.wc_error(99, "put", "x"))


# -- credits ---------------------------------------------------------------------------------------
class End:
    """One side of a simulated connection: messages to send, frames in its slots."""

    def __init__(self, data: int, ctrl: int, n: int, name: str) -> None:
        self.credits = p.Credits((data, ctrl), (data, ctrl))
        self.grant = (data, ctrl)
        self.todo = deque(f"{name}{i}" for i in range(n))
        self.got: list[str] = []
        self.slots: deque[int] = deque()  # kinds of frames received, not yet freed
        self.used = [0, 0]


def _send(src: End, wire: deque, kind: int, msg: str | None) -> None:
    wire.append((kind, *src.credits.on_send(kind), msg))


def _deliver(dst: End, wire: deque) -> None:
    kind, ad, ac, msg = wire.popleft()
    dst.credits.on_receive(kind, ad, ac)
    i = kind == w.CREDIT
    dst.used[i] += 1
    assert dst.used[i] <= dst.grant[i], "a frame arrived with no free slot for it"
    dst.slots.append(kind)
    if msg is not None:
        dst.got.append(msg)


def _free(end: End) -> None:
    kind = end.slots.popleft()
    end.used[kind == w.CREDIT] -= 1
    end.credits.on_freed(kind)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 25), st.integers(0, 25),
       st.lists(st.integers(0, 9), max_size=400))
def test_credits_never_overrun_and_never_deadlock(data: int, ctrl: int, na_: int, nb: int,
                                                  schedule: list[int]) -> None:
    a, b = End(data, ctrl, na_, "a"), End(data, ctrl, nb, "b")
    ab: deque = deque()
    ba: deque = deque()
    sides = ((a, b, ab), (b, a, ba))
    for step in schedule:  # an adversarial interleaving, back-pressure included
        src, _dst, wire = sides[step & 1]
        action = step >> 1
        if action == 0 and src.todo and src.credits.can_send(w.UNEXPECTED):
            _send(src, wire, w.UNEXPECTED, src.todo.popleft())
        elif action == 1 and wire:
            _deliver(sides[1 - (step & 1)][0], wire)
        elif action == 2 and src.slots:
            _free(src)
        elif action == 3 and src.credits.credit_due():
            _send(src, wire, w.CREDIT, None)
        elif action == 4:
            src.credits.withheld = not src.credits.withheld
    for end in (a, b):  # then the driver's own rules: free, send, credit when due, deliver
        end.credits.withheld = False
    for _ in range(10 * (na_ + nb + 10)):
        for src, dst, wire in sides:
            while src.slots:
                _free(src)
            while src.todo and src.credits.can_send(w.UNEXPECTED):
                _send(src, wire, w.UNEXPECTED, src.todo.popleft())
            if src.credits.credit_due():
                _send(src, wire, w.CREDIT, None)
            while wire:
                _deliver(dst, wire)
        if not (a.todo or b.todo or ab or ba):
            break
    assert b.got == [f"a{i}" for i in range(na_)] and a.got == [f"b{i}" for i in range(nb)]


def test_a_peer_that_sends_past_its_grant_is_caught() -> None:
    credits = p.Credits((4, 1), (2, 1))
    credits.on_receive(w.UNEXPECTED, 0, 0)
    credits.on_receive(w.UNEXPECTED, 0, 0)
    with pytest.raises(p.CreditError, match="past its grant"):
        credits.on_receive(w.UNEXPECTED, 0, 0)
    credits.on_freed(w.UNEXPECTED)
    credits.on_send(w.UNEXPECTED)  # advertises the freed slot
    credits.on_receive(w.UNEXPECTED, 0, 0)  # so now one more fits


def test_a_peer_that_acknowledges_unsent_frames_is_caught() -> None:
    credits = p.Credits((4, 1), (4, 1))
    credits.on_send(w.UNEXPECTED)
    with pytest.raises(p.CreditError, match="acknowledged 2"):
        credits.on_receive(w.UNEXPECTED, 2, 0)


def test_withheld_credits_are_not_advertised() -> None:
    credits = p.Credits((4, 1), (4, 1))
    for _ in range(4):
        credits.on_receive(w.UNEXPECTED, 0, 0)
        credits.on_freed(w.UNEXPECTED)
    credits.withheld = True
    assert not credits.credit_due() and credits.on_send(w.UNEXPECTED) == (0, 0)
    credits.withheld = False
    assert credits.credit_due() and credits.on_send(w.CREDIT) == (4, 0)


def test_the_send_queue_keeps_order_and_limits() -> None:
    credits = p.Credits((1, 1), (1, 1))
    sq = p.SendQueue(credits, depth=2)
    frame, rdma, later = p.Out(w.UNEXPECTED, "m"), p.Out(0, "r"), p.Out(w.EXPECTED, "e")
    for out in (frame, rdma, later):
        sq.push(out)
    assert sq.pop_ready(lambda: False) is None  # no send slot for the frame at the head
    got = sq.pop_ready(lambda: True)
    assert got is frame
    credits.on_send(w.UNEXPECTED)
    assert sq.pop_ready(lambda: True) is rdma  # RDMA needs no credit
    assert sq.pop_ready(lambda: True) is None  # depth 2 reached
    sq.done()
    assert sq.pop_ready(lambda: True) is None  # no credit left for "e": it waits, in order
    credits.on_receive(w.UNEXPECTED, 1, 0)
    assert sq.pop_ready(lambda: True) is later


# -- pools and the registration cache ------------------------------------------------------------
def test_slot_pool() -> None:
    pool = p.SlotPool(100, 3)
    assert pool.take() is None
    assert list(pool.grow()) == [0, 1, 2] and list(pool.grow()) == [3, 4, 5]
    taken = [pool.take() for _ in range(6)]
    assert sorted(taken) == list(range(6)) and pool.take() is None  # type: ignore[type-var]
    assert pool.where(4) == (1, 100)
    pool.give(4)
    with pytest.raises(ValueError):
        pool.give(4)
    with pytest.raises(ValueError):
        pool.give(6)
    assert pool.take() == 4


def test_receive_budget_reuses_slots_before_posting_more() -> None:
    budget = p.ReceiveBudget(100)
    assert budget.reserve(34) == 34 and budget.reserve(34) == 34
    budget.release(34)
    assert budget.reserve(34) == 0  # an old connection's slots are still posted
    with pytest.raises(ValueError, match="no room for 34"):
        budget.reserve(34)
    with pytest.raises(ValueError):
        budget.release(99)


def test_registration_cache_shares_and_releases() -> None:
    released: list[str] = []
    made = iter(("r1", "r2", "r3"))
    cache: p.RegCache[str] = p.RegCache(released.append)
    assert cache.acquire(0x1000, 64, 5, lambda: next(made)) == "r1"
    assert cache.acquire(0x1000, 64, 5, lambda: next(made)) == "r1"  # same buffer and rights
    assert cache.acquire(0x1000, 64, 4, lambda: next(made)) == "r2"  # other rights: its own
    assert cache.hits == 1 and len(cache) == 2
    cache.release(0x1000, 64, 5)
    assert released == []
    cache.release(0x1000, 64, 5)
    assert released == ["r1"]  # with its last handle, never kept for reuse
    with pytest.raises(ValueError):
        cache.release(0x1000, 64, 5)
    cache.clear()
    assert released == ["r1", "r2"] and len(cache) == 0


# -- what is missing ------------------------------------------------------------------------------
def test_the_diagnosis_says_what_is_missing_and_how_to_get_it() -> None:
    no_pyverbs = verbs.diagnose(ImportError("No module named 'pyverbs'"), [], None, None)
    assert no_pyverbs is not None
    for hint in ("pyverbs cannot be imported", "apt-get install python3-pyverbs",
                 "scripts/setup.sh", "rdma-core >= 59"):
        assert hint in no_pyverbs
    no_device = verbs.diagnose(None, [], None, "mlx5_0")
    assert no_device is not None
    assert "/sys/class/infiniband" in no_device and "rdma link add rxe0 type rxe" in no_device
    broken = verbs.diagnose(None, ["mlx5_0"], RuntimeError("Failed to get devices list"), None)
    assert broken is not None and "ibverbs-providers" in broken and "mlx5_0" in broken
    assert "ibverbs-providers" in str(verbs.diagnose(None, ["mlx5_0"], [], None))
    other = verbs.diagnose(None, ["mlx5_0"], ["mlx5_0", "mlx5_1"], "mlx5_9")
    assert other is not None and "'mlx5_9'" in other and "mlx5_0, mlx5_1" in other
    assert verbs.diagnose(None, ["mlx5_0"], ["mlx5_0"], "mlx5_0") is None
