"""Feed client behaviour that does not need a server: back-off and log throttling."""

import logging
import time

import pytest

from appliance.coinbase.feed import backoff_delay
from appliance.helpers.throttle import ThrottledLog


def test_backoff_grows_then_stays_capped_through_a_long_outage() -> None:
    early = max(backoff_delay(1, 30.0) for _ in range(200))
    assert early <= 0.5
    # A day of failed dials must not overflow (2**1100 is no float) and must stay under the cap.
    assert all(0 <= backoff_delay(n, 30.0) <= 30.0 for n in (10, 1023, 1100, 10**6))
    assert max(backoff_delay(10**6, 30.0) for _ in range(200)) > 15  # full jitter spans the range


def test_throttled_log_reports_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    throttled = ThrottledLog(logging.getLogger("t"), interval_s=0.2)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            throttled.warning("malformed", "feed frame rejected", reason="malformed")
        throttled.warning("duplicate", "feed frame rejected", reason="duplicate")
        assert len(caplog.records) == 2  # one line per reason per interval
        time.sleep(0.25)
        throttled.warning("malformed", "feed frame rejected", reason="malformed")
    assert caplog.records[-1].suppressed == 4  # type: ignore[attr-defined]
