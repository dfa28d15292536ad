"""One log line per key and interval, however many times it happens: floods stay readable at 3 a.m."""

from __future__ import annotations

import logging
import time


class ThrottledLog:
    """At most one line per key and interval, saying how many were suppressed: floods stay readable."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0) -> None:
        self._log, self._interval = logger, interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, **fields: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e9, 0))
        if now - last < self._interval:
            self._last[key] = (last, suppressed + 1)
            return
        self._last[key] = (now, 0)
        self._log.warning(msg, extra={**fields, "suppressed": suppressed} if suppressed else fields)
