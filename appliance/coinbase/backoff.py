"""Retry spacing shared by the feed's reconnects and REST's retries."""

from __future__ import annotations

import random


def backoff_delay(failures: int, cap_s: float, base_s: float = 0.25) -> float:
    """Exponential back-off with full jitter; bounded however long the outage lasts."""
    return random.uniform(0, min(cap_s, base_s * 2 ** min(failures, 32)))
