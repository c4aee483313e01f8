"""Lines about what clients send are bounded per kind, and what was left out is said."""

from __future__ import annotations

import logging

import pytest

from tftpd.logthrottle import LogThrottle


def test_a_burst_per_period_per_kind_then_a_count_of_what_was_left_out(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.logthrottle")
    caplog.set_level(logging.INFO, logger="test.logthrottle")
    t = LogThrottle(log, burst=3, period=1.0)
    written = [t.log("busy", 0.1 * i, logging.WARNING, "busy client=%s", i) for i in range(8)]
    assert written == [True] * 3 + [False] * 5
    assert t.log("malformed", 0.5, logging.INFO, "malformed %d", 1)  # another kind: its own
    assert t.log("busy", 1.2, logging.WARNING, "busy client=%s", 9)  # a new period
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["busy client=0", "busy client=1", "busy client=2", "malformed 1",
                     "busy client=9 (5 similar lines left out)"]
    assert t.log("busy", 1.3, logging.WARNING, "busy client=%s", 10)
    assert caplog.records[-1].getMessage() == "busy client=10"  # counted once only


def test_nothing_is_counted_for_a_level_that_is_not_logged() -> None:
    log = logging.getLogger("test.logthrottle.quiet")
    log.setLevel(logging.WARNING)
    t = LogThrottle(log, burst=1)
    assert not t.log("stray", 0.0, logging.INFO, "stray")
    assert t.log("stray", 0.0, logging.WARNING, "stray")
