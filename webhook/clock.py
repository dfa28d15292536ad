"""The webhook's sense of time: the wall clock, whether NTP has set it, and when a recreate may happen.

A Raspberry Pi has no real-time clock: until NTP syncs, the time can be far off. Everything that reads the
time goes through a ``Clock``, so tests can put the deployer at :59 instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import time as _time
from datetime import datetime, timedelta
from datetime import time as daytime
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

#: systemd-timesyncd touches this on every synchronisation (what time-sync.target waits for with it).
TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


class Clock(Protocol):
    def time(self) -> float: ...
    def synchronized(self) -> bool: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return _time.time()

    def synchronized(self) -> bool:
        """Whether an NTP client has set the clock: timesyncd's flag, else the kernel's own status.

        Inside the unit's sandbox adjtimex(2) is refused (``@clock``): with an NTP client other than
        timesyncd the clock then counts as unsynchronised, which only means no push is refused for its age.
        """
        if TIMESYNC_FLAG.exists():
            return True
        buf = ctypes.create_string_buffer(512)  # struct timex, modes 0: read only
        try:
            state = ctypes.CDLL(None).adjtimex(buf)
        except (OSError, AttributeError):
            return False
        return state not in (-1, TIME_ERROR)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class DeployWindow:
    """When the appliance may be recreated: outside the hourly quiet minutes, inside maintenance hours."""

    def __init__(
        self,
        quiet: tuple[int, int] | None = (58, 2),
        maintenance: tuple[daytime, daytime] | None = None,
        zone: str = "UTC",
    ) -> None:
        self.quiet = quiet
        self.maintenance = maintenance
        self.zone = ZoneInfo(zone)

    def opens_at(self, now: float) -> float:
        """``now`` if a recreate may happen now, else the first moment after it when one may."""
        start = t = datetime.fromtimestamp(now, self.zone)
        for _ in range(8):  # each step lands on an edge of one of the two windows; both agree within a few
            moved = self._after_quiet(self._into_maintenance(t))
            if moved == t:
                break
            t = moved
        return now if t == start else t.timestamp()

    def _after_quiet(self, t: datetime) -> datetime:
        if self.quiet is None:
            return t
        first, end = self.quiet
        m = t.minute
        inside = first <= m < end if first <= end else (m >= first or m < end)
        if not inside:
            return t
        hour = t.replace(minute=0, second=0, microsecond=0)
        return hour + timedelta(minutes=end) if m < end else hour + timedelta(hours=1, minutes=end)

    def _into_maintenance(self, t: datetime) -> datetime:
        if self.maintenance is None:
            return t
        start, end = self.maintenance
        now = t.timetz().replace(tzinfo=None)
        inside = start <= now < end if start <= end else (now >= start or now < end)
        if inside:
            return t
        day = t.date() if now < start else t.date() + timedelta(days=1)
        return datetime.combine(day, start, self.zone)
