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


# An estimated offset from the exchange's clock beyond this raises the `clock_offset` alert (README, "Alerts").
# A constant, not a setting: the settle windows keep SETTLE_MARGIN_SECONDS (2 s) on top of expiresAfter, and an
# offset larger than that margin means the host's clock needs fixing (NTP), whatever the monitor compensates.
CLOCK_OFFSET_ALERT_MS = 2000


class ExchangeClock:
    """The exchange's clock as this run estimates it: the host's clock plus an offset.

    Hyperliquid judges ``expiresAfter`` (and nonces) by its own time (block time, reference §2.14/§3.3), not
    by this host's. Every ``clearinghouseState`` answer carries ``time`` (ms): one sample is ``time`` minus
    the local midpoint of its request (error at most half the round trip); the estimate is the median of
    this run's samples, so one slow answer cannot move it. Whether ``time`` is block time or the API
    server's wall clock is UNCONFIRMED; either way it is the closest the API offers. Fill times are past
    events and say nothing about "now", so they are not used. With no sample yet the offset is 0 (the
    host's clock). Thread-safe: the run's reader threads all feed one estimate.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        import threading

        self.clock = clock or Clock()
        self._samples: list[int] = []
        self._lock = threading.Lock()

    def local_ms(self) -> int:
        return self.clock.now_ms()

    def observe(self, server_ms: int, sent_ms: int, received_ms: int) -> None:
        if received_ms < sent_ms:
            return  # the host's clock stepped back during the request: no usable midpoint
        with self._lock:
            self._samples.append(server_ms - (sent_ms + received_ms) // 2)

    @property
    def samples(self) -> int:
        with self._lock:
            return len(self._samples)

    def offset_ms(self) -> int:
        """Exchange time minus host time, ms (the median of this run's samples; 0 without any)."""
        import statistics

        with self._lock:
            return int(statistics.median_low(self._samples)) if self._samples else 0

    def now_ms(self) -> int:
        return self.clock.now_ms() + self.offset_ms()

    def now(self) -> datetime:
        return from_ms(self.now_ms())
