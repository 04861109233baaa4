"""Hedge groups (README, "Hedge groups"): legs across accounts and venues that must net to zero.

Pure: the definitions come from the database, the positions from the snapshots the run already read (a group
adds no exchange request), and ``evaluate`` decides each group's net and status. No SQL, no HTTP here; the
runner records the results (``Database.insert_hedge_results``) and the alerts are decided from the report.

A leg is known only when this run's snapshot of its account covers the group's coin (the account was read, and
for a HIP-3 coin such as ``xyz:TSLA`` its dex too). Any leg not known, or an external leg older than
``MONITOR_HEDGE_EXTERNAL_STALE``, makes the group ``unknown``: never ``balanced`` on what was not read.
Sizes, ratios, nets and tolerances are ``Decimal`` throughout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping, Sequence

from monitor.errors import UsageError
from monitor.models import AccountSnapshot

BALANCED, IMBALANCED, UNKNOWN = "balanced", "imbalanced", "unknown"
URGENT_FACTOR = Decimal(10)  # |net| beyond this many tolerances is urgent (alerted at once)
IMBALANCE_KIND, URGENT_KIND, STALE_KIND = "hedge_imbalance", "hedge_imbalance_urgent", "hedge_external_stale"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class HedgeLeg:
    """The group's coin on a watched account, counted as signed size x ratio."""

    account_id: int
    address: str
    ratio: Decimal
    account_active: bool = True


@dataclass(frozen=True)
class ExternalLeg:
    """A leg on a venue the monitor does not read: its signed size as last written, and when."""

    venue: str
    size: Decimal
    updated_at: datetime


@dataclass(frozen=True)
class HedgeGroup:
    id: int
    name: str
    coin: str
    tolerance: Decimal
    legs: tuple[HedgeLeg, ...] = ()
    externals: tuple[ExternalLeg, ...] = ()
    active: bool = True


@dataclass(frozen=True)
class HedgeResult:
    """One group's verdict in one run. ``net`` is None when the group is unknown."""

    group_id: int
    name: str
    coin: str
    tolerance: Decimal
    status: str
    net: Decimal | None
    legs: list[dict[str, Any]] = field(default_factory=list)  # each leg as counted (decimals as strings)
    reason: str | None = None  # why unknown
    stale_venues: tuple[str, ...] = ()

    @property
    def urgent(self) -> bool:
        """|net| beyond 10x the tolerance (a group with tolerance 0 has no urgent level: any imbalance would be)."""
        return (self.status == IMBALANCED and self.net is not None and self.tolerance > 0
                and abs(self.net) > URGENT_FACTOR * self.tolerance)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "coin": self.coin, "net": None if self.net is None else str(self.net),
                "status": self.status, "tolerance": str(self.tolerance), "reason": self.reason}

    def describe(self) -> str:
        if self.status == UNKNOWN:
            return f"hedge {self.name} {self.coin}: unknown ({self.reason})"
        return f"hedge {self.name} {self.coin}: net {self.net} (tolerance {self.tolerance}) {self.status}"

    def alert_text(self) -> str:
        level = " (more than 10x its tolerance)" if self.urgent else ""
        return (f"hedge group {self.name} ({self.coin}) is imbalanced: net {self.net}, tolerance"
                f" {self.tolerance}{level}")


def evaluate(groups: Sequence[HedgeGroup], snapshots: Mapping[int, AccountSnapshot], unread: Mapping[int, str],
             now: datetime, external_stale: timedelta) -> list[HedgeResult]:
    """Every group's net from this run's snapshots (by account id) and its external legs.

    ``unread`` says why an account has no snapshot (its read failed, it was deferred, ...); an account in
    neither was not read by this run at all."""
    return [_evaluate(g, snapshots, unread, now, external_stale) for g in groups]


def _evaluate(group: HedgeGroup, snapshots: Mapping[int, AccountSnapshot], unread: Mapping[int, str],
              now: datetime, external_stale: timedelta) -> HedgeResult:
    net = Decimal(0)
    legs: list[dict[str, Any]] = []
    unknown: list[str] = []
    for leg in group.legs:
        entry: dict[str, Any] = {"account": leg.address, "ratio": str(leg.ratio)}
        snapshot = snapshots.get(leg.account_id)
        why: str | None = None
        if not leg.account_active:
            why = "account not watched (disabled)"
        elif snapshot is None:
            why = unread.get(leg.account_id, "account not read this run")
        elif not snapshot.covers(group.coin):
            why = "its perp dex was not read this run"
        if why is not None:
            entry.update(size=None, contribution=None, known=False, reason=why)
            unknown.append(f"{leg.address}: {why}")
        else:
            assert snapshot is not None
            position = snapshot.positions.get(group.coin)
            size = Decimal(0) if position is None else (position.size if position.side == "long" else -position.size)
            contribution = size * leg.ratio
            net += contribution
            entry.update(size=str(size), contribution=str(contribution), known=True)
        legs.append(entry)
    stale: list[str] = []
    for ext in group.externals:
        age = now - ext.updated_at
        is_stale = age > external_stale
        legs.append({"venue": ext.venue, "size": str(ext.size), "contribution": None if is_stale else str(ext.size),
                     "updated_at": ext.updated_at.isoformat(), "known": not is_stale,
                     **({"reason": f"not updated for {int(age.total_seconds())}s"} if is_stale else {})})
        if is_stale:
            stale.append(ext.venue)
        else:
            net += ext.size
    if not group.legs and not group.externals:
        unknown.append("the group has no legs")
    if stale:
        unknown.append(f"external leg(s) {', '.join(stale)} older than {int(external_stale.total_seconds())}s")
    if unknown:
        return HedgeResult(group.id, group.name, group.coin, group.tolerance, UNKNOWN, None, legs,
                           reason="; ".join(unknown), stale_venues=tuple(stale))
    status = IMBALANCED if abs(net) > group.tolerance else BALANCED
    return HedgeResult(group.id, group.name, group.coin, group.tolerance, status, net, legs)


def in_scope(group: HedgeGroup, selected: set[int] | None) -> bool:
    """Whether a run over the ``selected`` accounts (None: every active account) judges this group: a run narrowed by
    ``--account`` or ``--shard`` judges only the groups all of whose legs it set out to read."""
    if selected is None:
        return True
    return bool(group.legs) and all(leg.account_id in selected for leg in group.legs)


# ---- what an operator types (exit 2 on bad input) ------------------------------------------------


def parse_name(text: str) -> str:
    name = text.strip()
    if not _NAME.match(name):
        raise UsageError(f"hedge group name: letters, digits, '_', '.', '-' (at most 64, starting with a letter or"
                         f" digit), got {text!r}")
    return name


def parse_coin(text: str, what: str = "--coin") -> str:
    coin = text.strip()
    if not coin or len(coin) > 64 or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in coin) or " " in coin:
        raise UsageError(f"{what}: a coin name such as BTC or xyz:TSLA, got {text!r}")
    return coin


def parse_venue(text: str) -> str:
    venue = text.strip()
    if not venue or len(venue) > 64 or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in venue):
        raise UsageError(f"--venue: a name of at most 64 characters, got {text!r}")
    return venue


def _decimal(text: str, what: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, ValueError):
        raise UsageError(f"{what}: not a number: {text!r}") from None
    if not value.is_finite():
        raise UsageError(f"{what}: not a finite number: {text!r}")
    return value


def parse_tolerance(text: str) -> Decimal:
    value = _decimal(text, "--tolerance")
    if value < 0:
        raise UsageError(f"--tolerance: must be 0 or more, got {text.strip()}")
    return value


def parse_ratio(text: str) -> Decimal:
    value = _decimal(text, "--ratio")
    if value == 0:
        raise UsageError("--ratio: must not be 0 (remove the leg instead)")
    return value


def parse_size(text: str) -> Decimal:
    return _decimal(text, "--size")
