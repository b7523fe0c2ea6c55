"""The handshake's crypto: proofs bind key, role, both nonces and the transcript."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from petasus.na import auth

KEY = b"k" * 32
CN, SN = b"c" * auth.NONCE_SIZE, b"s" * auth.NONCE_SIZE


def test_a_proof_verifies_only_for_its_role() -> None:
    mac = auth.proof(KEY, auth.CLIENT, CN, SN, b"tcp://a")
    assert auth.verify(KEY, auth.CLIENT, CN, SN, b"tcp://a", mac)
    # Reflected back as the server's proof, it fails.
    assert not auth.verify(KEY, auth.SERVER, CN, SN, b"tcp://a", mac)


@given(st.binary(min_size=auth.MIN_KEY_SIZE), st.binary(), st.integers(0, 255))
def test_any_changed_input_fails(key: bytes, transcript: bytes, flip: int) -> None:
    mac = auth.proof(key, auth.SERVER, CN, SN, transcript)
    assert auth.verify(key, auth.SERVER, CN, SN, transcript, mac)
    assert not auth.verify(key + b"x", auth.SERVER, CN, SN, transcript, mac)
    assert not auth.verify(key, auth.SERVER, SN, CN, transcript, mac)
    assert not auth.verify(key, auth.SERVER, CN, SN, transcript + b"x", mac)
    bad = bytearray(mac)
    bad[flip % len(bad)] ^= 1
    assert not auth.verify(key, auth.SERVER, CN, SN, transcript, bytes(bad))
    assert not auth.verify(key, auth.SERVER, CN, SN, transcript, mac[:-1])


def test_parts_are_length_prefixed() -> None:
    # Moving a byte from the transcript into a nonce is a different message.
    moved = auth.proof(KEY, auth.CLIENT, CN, SN + b"a", b"b")
    assert auth.proof(KEY, auth.CLIENT, CN, SN, b"ab") != moved


def test_keys_are_checked() -> None:
    assert auth.check_key(None) is None
    assert auth.check_key("x" * 16) == b"x" * 16
    with pytest.raises(ValueError, match="at least 16"):
        auth.check_key(b"short")
    with pytest.raises(TypeError, match="bytes or str"):
        auth.check_key(12345)  # type: ignore[arg-type]


def test_nonces_are_fresh_and_injectable() -> None:
    assert auth.new_nonce() != auth.new_nonce()
    assert auth.new_nonce(lambda n: b"\0" * n) == b"\0" * auth.NONCE_SIZE
