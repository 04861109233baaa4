"""Exit rules set by hand: parsing and checking what an operator types (pure; no SQL, no HTTP).

Prices and percents are ``Decimal`` parsed from the text as typed (never through a float); durations
are ``90s``, ``90m``, ``4h``, ``2d`` or ``1w`` (a whole number and one unit), stored as seconds.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from monitor.errors import UsageError

RULES = ("stop-loss", "take-profit", "trailing-stop", "max-hold")
# rule name on the command line -> column of positions
RULE_COLUMNS = {"stop-loss": "stop_loss_price", "take-profit": "take_profit_price",
                "trailing-stop": "trailing_stop_pct", "max-hold": "max_hold_seconds"}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^([0-9]{1,12})([smhdw])$")  # range-checked after
MAX_HOLD_LIMIT = 2**31 - 1  # the column is an integer


# What a price or percent typed by hand may be: below 10**15 with at most 18 decimal places. Beyond that
# it is a typo (no market trades there), and PostgreSQL's numeric refuses the extremes (1e-20000 overflows
# it: the old code stored 1E+400 and failed on 1e999999 with a database error, exit 70).
MAX_INTEGER_DIGITS = 15
MAX_DECIMAL_PLACES = 18


def parse_decimal(text: str, what: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, ValueError):
        raise UsageError(f"{what}: not a number: {text!r}") from None
    if not value.is_finite():
        raise UsageError(f"{what}: not a finite number: {text!r}")
    shown = text.strip() if len(text.strip()) <= 40 else text.strip()[:40] + "…"
    if value != 0 and value.adjusted() >= MAX_INTEGER_DIGITS:
        raise UsageError(f"{what}: too large (at most {MAX_INTEGER_DIGITS} digits before the point), got {shown}")
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    while len(digits) > 1 and digits[-1] == 0:  # 1.500 has one decimal place, not three
        digits, exponent = digits[:-1], exponent + 1
    if exponent < -MAX_DECIMAL_PLACES:
        raise UsageError(f"{what}: at most {MAX_DECIMAL_PLACES} decimal places, got {shown}")
    return value


def parse_price(text: str, what: str) -> Decimal:
    value = parse_decimal(text, what)
    if value <= 0:
        raise UsageError(f"{what}: must be greater than 0, got {text.strip()}")
    return value


def parse_percent(text: str, what: str) -> Decimal:
    value = parse_decimal(text.strip().removesuffix("%"), what)
    if not 0 < value < 100:
        raise UsageError(f"{what}: a percent between 0 and 100 (exclusive), got {text.strip()}")
    return value


def parse_duration(text: str, what: str) -> int:
    """``90m`` -> 5400. Whole numbers with one unit of s, m, h, d, w; more than zero."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise UsageError(f"{what}: a duration like 90m, 4h or 2d, got {text!r}")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise UsageError(f"{what}: must be longer than 0, got {text.strip()}")
    if seconds > MAX_HOLD_LIMIT:
        raise UsageError(f"{what}: at most {MAX_HOLD_LIMIT} seconds (about 68 years), got {text.strip()}")
    return seconds


def format_duration(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    for unit in ("w", "d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def check_rules(side: str, values: dict[str, Any]) -> None:
    """The rules a row would have after a change, checked together (columns as keys).

    A long's stop loss is below its take profit; a short's is above it.
    """
    stop, take = values.get("stop_loss_price"), values.get("take_profit_price")
    if stop is not None and take is not None:
        if side == "long" and not stop < take:
            raise UsageError(f"a long's stop loss ({stop}) must be below its take profit ({take})")
        if side == "short" and not stop > take:
            raise UsageError(f"a short's stop loss ({stop}) must be above its take profit ({take})")


def parse_moment(text: str, what: str, now: datetime) -> datetime:
    """A point in time: an ISO date or date-time (UTC when no offset is given), or a duration ago (``7d``)."""
    raw = text.strip()
    if _DURATION.match(raw.lower()):
        return now - timedelta(seconds=parse_duration(raw, what))
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise UsageError(f"{what}: a date (2026-11-01), a date-time (2026-11-01T12:00, UTC unless an offset"
                         f" is given) or a duration ago (7d), got {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
