"""The worker pipe's framing (one encoder, one sans-IO decoder for both ends)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfsroot.framing import MAX_FRAME, FrameDecoder, FrameError, encode

values = st.recursive(st.none() | st.integers() | st.binary(max_size=300) | st.text(max_size=50),
                      lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner),
                      max_leaves=20)


@given(st.lists(values, max_size=8), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_any_split_of_the_stream_gives_the_same_values(items: list, cuts: list[int]) -> None:
    stream = b"".join(encode(v) for v in items)
    d = FrameDecoder()
    out = []
    at, i = 0, 0
    while at < len(stream):
        step = cuts[i % len(cuts)]
        d.feed(stream[at:at + step])
        at += step
        i += 1
        while d:
            out.append(d.pop())
    assert out == items


def test_end_of_stream() -> None:
    d = FrameDecoder()
    with pytest.raises(EOFError):
        d.feed(b"")
    d.feed(encode("x")[:3])
    with pytest.raises(FrameError):
        d.feed(b"")


def test_absurd_length_is_an_error_not_an_allocation() -> None:
    d = FrameDecoder()
    with pytest.raises(FrameError):
        d.feed((MAX_FRAME + 1).to_bytes(4, "big") + os.urandom(8))
