"""Every plugin passes the reusable conformance kit (``petasus.na.testing``), check by check."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import SPECS, Spec

from petasus import na
from petasus.na import testing


@pytest.mark.parametrize("check", testing.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id if isinstance(s, Spec) else str(s))
def test_the_kit(spec: Spec, check: Callable[[testing.Opener], None]) -> None:
    check(lambda listen: na.initialize(spec.uri, listen=listen, **spec.options))


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
