"""Every plugin passes the reusable conformance kit (``petasus.na.testing``), check by check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import SPECS, Spec

from petasus import na
from petasus.na import testing


@pytest.mark.parametrize("check", testing.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id if isinstance(s, Spec) else str(s))
def test_the_kit(spec: Spec, check: Callable[[testing.Opener], None]) -> None:
    def open_plugin(listen: bool) -> na.Plugin:
        return na.initialize(spec.uri, listen=listen, **spec.options)

    if check is testing.check_rma_order_as_promised:
        with open_plugin(False) as plugin:
            if not getattr(plugin, "rma_ordered", False):
                pytest.skip(f"{spec.id} promises no RMA order (rma_ordered is False)")
    check(open_plugin)


def test_the_kit_catches_a_plugin_that_accepts_a_bad_tag() -> None:
    # The kit must be able to fail: a tcp plugin whose expected receive forgets the tag check
    # (what tcp and sm did before) is caught.
    def lenient(plugin: na.Plugin) -> na.Plugin:
        original = plugin.msg_recv_expected

        def recv_expected(addr: na.Addr, buf: object, tag: int,
                          callback: object = None) -> na.Op:
            return original(addr, buf, tag & 0xFFFFFFFF, callback)  # type: ignore[arg-type]

        plugin.msg_recv_expected = recv_expected  # type: ignore[method-assign]
        return plugin

    with pytest.raises(testing.ConformanceError, match=r"msg_recv_expected\(tag=-1\): accepted"):
        testing.check_tags_outside_u32_are_refused(
            lambda listen: lenient(na.initialize("tcp://127.0.0.1:0", listen=listen)))


def test_the_kit_catches_a_plugin_that_breaks_its_rma_order() -> None:
    # An sm plugin that holds each put back until the op after it has started, while still
    # claiming rma_ordered, is caught: the order check can fail. (sm, whose copies read
    # memory when they run: a tcp get's answer is read as it leaves, so a put that
    # overtook it would often still be seen.)
    def overtaking(plugin: na.Plugin) -> na.Plugin:
        put, get = plugin.put, plugin.get
        held: list[tuple[_Later, tuple[Any, ...]]] = []

        def reordering_put(*args: Any) -> na.Op:
            later = _Later()
            held.append((later, args))
            return later  # type: ignore[return-value]

        def reordering_get(*args: Any) -> na.Op:
            op = get(*args)
            for later, put_args in held:
                later.op = put(*put_args)
            held.clear()
            return op

        plugin.put = reordering_put  # type: ignore[method-assign]
        plugin.get = reordering_get  # type: ignore[method-assign]
        return plugin

    with pytest.raises(testing.ConformanceError, match="overtook the put ahead of it"):
        testing.check_rma_order_as_promised(
            lambda listen: overtaking(na.initialize("sm://", listen=listen)))


class _Later:
    """A put's op, for the reordering plugin above: the put starts only after the next get."""

    op: na.Op | None = None

    @property
    def done(self) -> bool:
        return self.op is not None and self.op.done

    def result(self) -> object:
        assert self.op is not None, "the put never started"
        return self.op.result()
