"""The clock a run decides by, and the millisecond conversions the exchange's timestamps need.

``runner.Run`` takes a ``Clock`` (tests may pass their own), hands it to the closer and its ``now`` to the planner, so
a run's decisions (rules, grace periods, expiries) read the time from one object. It is not the only
place the process reads the system clock: the CLI's displays and ``close`` requests, the lock's waits and
staleness checks, the operations wrapper's run timing and the exchange's fills windows call
``datetime.now``/``time`` directly, and the PostgreSQL lease is judged by the database's clock.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone


class Clock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
