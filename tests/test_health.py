"""Conditions: one log line per change of state, not per retry; current problems with their start."""

import logging

import pytest

from appliance.health import Conditions


def test_a_problem_logs_once_until_it_changes_or_clears(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.health")
    health = Conditions()
    for attempt in range(5):  # five retries of the same outage
        health.problem("coinbase", "Coinbase unreachable", host="ws-feed.exchange.coinbase.com",
                       attempt=attempt)  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == ["Coinbase unreachable"]
    problem = health.of("coinbase")
    assert problem is not None
    assert problem.detail == {"host": "ws-feed.exchange.coinbase.com", "attempt": 4}  # the latest details
    first_since = problem.since
    health.problem("coinbase", "Coinbase refused the subscription")
    assert caplog.records[-1].levelno == logging.WARNING
    assert health.current()[0].since >= first_since
    health.ok("coinbase")
    health.ok("coinbase")  # already fine: nothing more to say
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING, logging.INFO]
    assert caplog.records[-1].was == "Coinbase refused the subscription"  # type: ignore[attr-defined]
    assert health.current() == []


def test_subjects_are_separate_conditions() -> None:
    health = Conditions()
    health.problem("history", "back-fill failing", subject="BTC-USD")
    health.problem("history", "back-fill failing", subject="ETH-USD")
    health.ok("history", subject="BTC-USD")
    assert [(p.component, p.subject) for p in health.current()] == [("history", "ETH-USD")]
    assert health.of("history", "BTC-USD") is None
