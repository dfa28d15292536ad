"""What is wrong right now, and since when: the one place every part of the appliance reports trouble.

A part (the feed, REST, MQTT, storage, history, the models) reports a condition per subject (a
product, a file, or none): :meth:`Conditions.problem` with a stable message ("Coinbase unreachable"),
and details that may change on every retry (the last error, the next attempt), or :meth:`Conditions.ok`.
Only a change of state is logged: one WARNING when a problem starts or its message changes, one INFO
when it clears, never a line per retry. ``/health`` lists every current problem with its start, and
the incidents (trouble that was dealt with, such as a corrupt file replaced) since the process began.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Problem:
    component: str  # "coinbase", "mqtt", "storage", "history", "models", ...
    subject: str | None  # a product, a file, ... (None: the component as a whole)
    message: str  # one sentence a person can act on
    since: float  # wall-clock time it started
    detail: dict[str, Any] = field(default_factory=dict)  # what changes between retries


INCIDENTS_KEPT = 20


class Conditions:
    def __init__(self) -> None:
        self._problems: dict[tuple[str, str | None], Problem] = {}
        self._incidents: deque[Problem] = deque(maxlen=INCIDENTS_KEPT)

    def problem(self, component: str, message: str, *, subject: str | None = None, **detail: Any) -> None:
        """Report that something is wrong; logs only when it starts or its message changes."""
        key = (component, subject)
        old = self._problems.get(key)
        if old is not None and old.message == message:
            self._problems[key] = Problem(component, subject, message, old.since, detail)
            return
        self._problems[key] = Problem(component, subject, message, time.time(), detail)
        log.warning(message, extra={"component": component, **({"subject": subject} if subject else {}),
                                    **detail})  # fmt: skip

    def ok(self, component: str, *, subject: str | None = None) -> None:
        """Report that it works (again); logs once if there was a problem."""
        old = self._problems.pop((component, subject), None)
        if old is not None:
            log.info(
                f"{component} recovered",
                extra={"component": component, **({"subject": subject} if subject else {}),
                       "was": old.message, "after_s": round(time.time() - old.since, 1)},
            )  # fmt: skip

    def of(self, component: str, subject: str | None = None) -> Problem | None:
        return self._problems.get((component, subject))

    def current(self) -> list[Problem]:
        """Every current problem, oldest first."""
        return sorted(self._problems.values(), key=lambda p: p.since)

    def incident(self, component: str, message: str, **detail: Any) -> None:
        """Something went wrong and was dealt with, but someone should know (data lost, a file moved)."""
        self._incidents.append(Problem(component, None, message, time.time(), detail))
        log.warning(message, extra={"component": component, **detail})

    def incidents(self) -> list[Problem]:
        """The latest incidents, oldest first."""
        return list(self._incidents)
