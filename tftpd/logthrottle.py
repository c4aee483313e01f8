"""Log lines about what clients send, bounded so that a flood cannot fill the log.

Every refused or ignored datagram must reach the operator (nothing a client sent is dropped
silently), but one log line per datagram lets a spoofed flood -- free to its sender -- write
the disk full and drown the lines that matter.  So each kind of line (``key``: "busy",
"malformed", ...) is written for the first ``burst`` datagrams of every ``period`` seconds;
the rest are counted, and the next line of that kind says how many were left out.  Pure
bookkeeping: the caller gives the time.
"""

from __future__ import annotations

import logging


class LogThrottle:
    """At most ``burst`` lines per kind and ``period``; the suppressed ones counted."""

    def __init__(self, log: logging.Logger, burst: int = 10, period: float = 1.0) -> None:
        self._log = log
        self._burst = burst
        self._period = period
        #: kind -> (start of its period, lines written in it, lines left out since the last)
        self._state: dict[str, tuple[float, int, int]] = {}

    def log(self, key: str, now: float, level: int, msg: str, *args: object) -> bool:
        """Write ``msg % args`` at ``level`` unless ``key``'s lines are over their rate;
        True if written.  A written line ends with ``(N similar lines left out)`` when the
        previous ones of its kind were."""
        if not self._log.isEnabledFor(level):
            return False
        start, written, left_out = self._state.get(key, (now, 0, 0))
        if now - start >= self._period:
            start, written = now, 0
        if written >= self._burst:
            self._state[key] = (start, written, left_out + 1)
            return False
        self._state[key] = (start, written + 1, 0)
        if left_out:
            msg += " (%d similar lines left out)"
            args = (*args, left_out)
        self._log.log(level, msg, *args)
        return True
