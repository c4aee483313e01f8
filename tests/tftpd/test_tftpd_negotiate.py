"""Option negotiation (pure): only asked options are answered, values clamped to the RFCs."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tftpd.session import TransferPolicy, negotiate

POLICY = TransferPolicy(blksize_max=1468, windowsize_max=64, retransmit_timeout=0.5)


def test_no_options_no_oack() -> None:
    neg = negotiate({}, POLICY, tsize=100)
    assert (neg.blksize, neg.windowsize, neg.oack) == (512, 1, {})


def test_uefi_probe() -> None:
    neg = negotiate({"tsize": "0", "blksize": "1468"}, POLICY, tsize=12345)
    assert neg.oack == {"tsize": "12345", "blksize": "1468"}
    assert list(neg.oack) == ["tsize", "blksize"]  # the client's order


def test_clamps_and_ignores() -> None:
    neg = negotiate({"blksize": "65464", "windowsize": "65535", "timeout": "5", "x": "1"},
                    POLICY, tsize=0)
    assert neg.oack == {"blksize": "1468", "windowsize": "64", "timeout": "5"}
    assert (neg.blksize, neg.windowsize, neg.timeout) == (1468, 64, 5.0)
    for bad in ({"blksize": "7"}, {"blksize": "abc"}, {"blksize": "-1"}, {"timeout": "0"},
                {"timeout": "256"}, {"windowsize": "0"}, {"tsize": "x"}, {"blksize": ""}):
        neg = negotiate(bad, POLICY, tsize=1)
        assert neg.oack == {}, bad
        assert (neg.blksize, neg.windowsize) == (512, 1)


def test_a_timeout_above_the_operators_limit_is_declined_not_lowered() -> None:
    """RFC 2349: the server may decline the option, not answer another value.  Declined, the
    transfer runs on our own interval, so a spoofed request with timeout=255 cannot hold a
    slot for its retries times 255 s."""
    for value, answered in (("30", True), ("31", False), ("255", False)):
        neg = negotiate({"timeout": value, "blksize": "1024"}, POLICY, tsize=0)
        assert ("timeout" in neg.oack) is answered, value
        assert neg.timeout == (float(value) if answered else POLICY.retransmit_timeout)
        assert neg.oack["blksize"] == "1024"  # the other options are answered as before
    wide = TransferPolicy(timeout_max=255)
    assert negotiate({"timeout": "255"}, wide, tsize=0).oack == {"timeout": "255"}


def test_mtu_cap() -> None:
    neg = negotiate({"blksize": "9000"}, TransferPolicy(blksize_max=65464), tsize=0,
                    blksize_cap=1472)
    assert neg.blksize == 1472


# Pure code, but on a loaded shared machine (a parallel suite, appliances booting) drawing an
# example has taken two seconds: neither a per-example deadline nor the generation-speed
# health check says anything about negotiate(), so neither may fail the test.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["blksize", "tsize", "timeout", "windowsize", "foo"]),
                       st.one_of(st.integers(-5, 100000).map(str), st.text(max_size=6))))
def test_never_answers_unasked_and_stays_in_range(options: dict[str, str]) -> None:
    neg = negotiate(options, POLICY, tsize=42)
    assert set(neg.oack) <= set(options) - {"foo"}
    assert 8 <= neg.blksize <= 1468
    assert 1 <= neg.windowsize <= 64
    if "blksize" in neg.oack:
        assert int(neg.oack["blksize"]) == neg.blksize
    if "tsize" in neg.oack:
        assert neg.oack["tsize"] == "42"
    if "timeout" in neg.oack:
        assert 1 <= int(neg.oack["timeout"]) <= POLICY.timeout_max
