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
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any, Mapping, Sequence

from monitor.errors import UsageError
from monitor.models import AccountSnapshot, dex_of
from monitor.rules import parse_decimal

BALANCED, IMBALANCED, UNKNOWN = "balanced", "imbalanced", "unknown"
URGENT_FACTOR = Decimal(10)  # |net| beyond this many tolerances is urgent (alerted at once)
IMBALANCE_KIND, URGENT_KIND, STALE_KIND = "hedge_imbalance", "hedge_imbalance_urgent", "hedge_external_stale"
UNKNOWN_KIND = "hedge_unknown"
NOT_LISTED = "coin not listed"
PRECISION = 200  # digits for the sums: a net is exact, never rounded to the default context's 28 digits


def format_decimal(value: Decimal) -> str:
    """A Decimal as plain, exact text: no exponent (``0E-27`` is ``0``), no trailing zeros, no ``-0``."""
    if not value.is_finite():
        return str(value)
    if value == 0:
        return "0"
    with localcontext() as ctx:
        ctx.prec = max(PRECISION, len(value.as_tuple().digits))
        return format(value.normalize(), "f")

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
class TableLeg:
    """An account leg outside this run's accounts (another shard's, or not named by ``--account``), as the
    monitor's own table has it: the signed sizes of its open rows by coin, and its last successful read."""

    read_at: datetime | None
    sizes: Mapping[str, Decimal] = field(default_factory=dict)
    doubts: Mapping[str, str] = field(default_factory=dict)  # coin -> why its rows may not be the exchange's now
    seen_at: Mapping[str, datetime] = field(default_factory=dict)  # coin -> the oldest last_seen_at of its rows


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
    alerted_elsewhere: bool = False  # unknown only for reasons with alerts of their own (stale venue, failed read)

    @property
    def urgent(self) -> bool:
        """|net| beyond 10x the tolerance (a group with tolerance 0 has no urgent level: any imbalance would be)."""
        if self.status != IMBALANCED or self.net is None or self.tolerance <= 0:
            return False
        with localcontext() as exact:
            exact.prec = PRECISION
            return abs(self.net) > URGENT_FACTOR * self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "coin": self.coin, "net": None if self.net is None else format_decimal(self.net),
                "status": self.status, "tolerance": format_decimal(self.tolerance), "reason": self.reason}

    def describe(self) -> str:
        if self.status == UNKNOWN:
            return f"hedge {self.name} {self.coin}: unknown ({self.reason})"
        assert self.net is not None
        return (f"hedge {self.name} {self.coin}: net {format_decimal(self.net)} (tolerance"
                f" {format_decimal(self.tolerance)}) {self.status}")

    def alert_text(self) -> str:
        level = " (more than 10x its tolerance)" if self.urgent else ""
        assert self.net is not None
        return (f"hedge group {self.name} ({self.coin}) is imbalanced: net {format_decimal(self.net)}, tolerance"
                f" {format_decimal(self.tolerance)}{level}")

    def unknown_text(self) -> str:
        return f"hedge group {self.name} ({self.coin}) has been unknown for a while: {self.reason}"


def evaluate(groups: Sequence[HedgeGroup], snapshots: Mapping[int, AccountSnapshot], unread: Mapping[int, str],
             now: datetime, external_stale: timedelta, table: Mapping[int, TableLeg] | None = None,
             listed: Mapping[str, frozenset[str]] | None = None) -> list[HedgeResult]:
    """Every group's net from this run's snapshots (by account id) and its external legs.

    ``unread`` says why an account has no snapshot (its read failed, it was deferred, ...); an account in
    neither was not read by this run at all. ``table`` holds the legs outside this run's accounts (another
    shard's) as the monitor's table has them: counted while their last successful read is no older than
    ``external_stale``. ``listed`` maps a perp dex whose meta the run has cached to its coin names: a group whose
    coin is not among them is unknown ("coin not listed"), never balanced on legs that all read 0."""
    return [_evaluate(g, snapshots, unread, now, external_stale, table or {}, listed or {}) for g in groups]


def _evaluate(group: HedgeGroup, snapshots: Mapping[int, AccountSnapshot], unread: Mapping[int, str],
              now: datetime, external_stale: timedelta, table: Mapping[int, TableLeg],
              listed: Mapping[str, frozenset[str]]) -> HedgeResult:
    with localcontext() as ctx:
        ctx.prec = PRECISION
        return _evaluate_exact(group, snapshots, unread, now, external_stale, table, listed)


def _evaluate_exact(group: HedgeGroup, snapshots: Mapping[int, AccountSnapshot], unread: Mapping[int, str],
                    now: datetime, external_stale: timedelta, table: Mapping[int, TableLeg],
                    listed: Mapping[str, frozenset[str]]) -> HedgeResult:
    net = Decimal(0)
    legs: list[dict[str, Any]] = []
    unknown: list[str] = []
    failed_reads = 0
    dex = dex_of(group.coin)
    if dex in listed and group.coin not in listed[dex]:
        unknown.append(f"{NOT_LISTED} on {'perp dex ' + dex if dex else 'the main perp dex'} (exchange meta)")
    for leg in group.legs:
        entry: dict[str, Any] = {"account": leg.address, "ratio": str(leg.ratio)}
        snapshot = snapshots.get(leg.account_id)
        outside = table.get(leg.account_id) if snapshot is None and leg.account_id not in unread else None
        why: str | None = None
        size = Decimal(0)
        if not leg.account_active:
            why = "account not watched (disabled)"
        elif outside is not None:
            age = None if outside.read_at is None else now - outside.read_at
            if age is None or age > external_stale:
                when = "never read" if age is None else f"last read {int(age.total_seconds())}s ago"
                why = (f"outside this run's accounts and stale in the table ({when}, older than"
                       f" MONITOR_HEDGE_EXTERNAL_STALE)")
            elif dex_of(group.coin):
                # account_health says when the account was read, not when this HIP-3 dex was: a row the
                # other run could not confirm (or a position it did not see) cannot be told from a fresh one.
                why = "outside this run's accounts, and the table does not say when its HIP-3 dex was read"
            elif group.coin in outside.doubts:
                why = f"outside this run's accounts: {outside.doubts[group.coin]}"
            elif group.coin in outside.seen_at and now - outside.seen_at[group.coin] > external_stale:
                confirmed = int((now - outside.seen_at[group.coin]).total_seconds())
                why = f"outside this run's accounts: its row was last confirmed {confirmed}s ago"
            else:
                size = outside.sizes.get(group.coin, Decimal(0))
                entry["source"] = "table"
        elif snapshot is None:
            why = unread.get(leg.account_id, "account not read this run")
            failed_reads += leg.account_id in unread and why.startswith("account read failed")
        elif not snapshot.covers(group.coin):
            why = "its perp dex was not read this run"
        else:
            position = snapshot.positions.get(group.coin)
            size = Decimal(0) if position is None else (position.size if position.side == "long" else -position.size)
        if why is not None:
            entry.update(size=None, contribution=None, known=False, reason=why)
            unknown.append(f"{leg.address}: {why}")
        else:
            contribution = size * leg.ratio
            net += contribution
            entry.update(size=format_decimal(size), contribution=format_decimal(contribution), known=True)
        legs.append(entry)
    stale: list[str] = []
    for ext in group.externals:
        age = now - ext.updated_at
        is_stale = age > external_stale
        legs.append({"venue": ext.venue, "size": str(ext.size),
                     "contribution": None if is_stale else format_decimal(ext.size),
                     "updated_at": ext.updated_at.isoformat(), "known": not is_stale,
                     **({"reason": f"not updated for {int(age.total_seconds())}s"} if is_stale else {})})
        if is_stale:
            stale.append(ext.venue)
        else:
            net += ext.size
    if not group.legs and not group.externals:
        unknown.append("the group has no legs")
    covered = len(unknown) == failed_reads
    if stale:
        unknown.append(f"external leg(s) {', '.join(stale)} older than {int(external_stale.total_seconds())}s")
    if unknown:
        return HedgeResult(group.id, group.name, group.coin, group.tolerance, UNKNOWN, None, legs,
                           reason="; ".join(unknown), stale_venues=tuple(stale), alerted_elsewhere=covered)
    status = IMBALANCED if abs(net) > group.tolerance else BALANCED
    return HedgeResult(group.id, group.name, group.coin, group.tolerance, status, net, legs)


def verdict_outdated(group: HedgeGroup, last: Mapping[str, Any]) -> bool:
    """Whether a recorded verdict (a ``hedge_results`` row) was computed on another definition of the group than
    its current one: other account legs or ratios, other external venues or sizes, another tolerance."""
    def same(a: Any, b: Any) -> bool:
        try:
            return Decimal(str(a)) == Decimal(str(b))
        except (InvalidOperation, ValueError):
            return False

    recorded = [leg for leg in last.get("legs") or [] if isinstance(leg, Mapping)]
    accounts = {leg.get("account"): leg.get("ratio") for leg in recorded if leg.get("account")}
    venues = {leg.get("venue"): leg.get("size") for leg in recorded if leg.get("venue")}
    if set(accounts) != {leg.address for leg in group.legs} or set(venues) != {e.venue for e in group.externals}:
        return True
    if not all(same(accounts[leg.address], leg.ratio) for leg in group.legs):
        return True
    if not all(same(venues[e.venue], e.size) for e in group.externals):
        return True
    tolerance = last.get("tolerance")
    return tolerance is not None and not same(tolerance, group.tolerance)


def listed_coins(meta: Mapping[str, Any] | None, dex: str = "") -> frozenset[str]:
    """The coin names of a dex's meta answer (its ``universe``), as the exchange spells them; on a HIP-3 dex a bare
    name (whether its meta prefixes them is unconfirmed) is taken as that dex's coin, as ``exchange.hip3_assets``
    does."""
    universe = meta.get("universe") if isinstance(meta, Mapping) else None
    if not isinstance(universe, list):
        return frozenset()
    names = (u["name"] for u in universe if isinstance(u, Mapping) and isinstance(u.get("name"), str))
    return frozenset(name if not dex or ":" in name else f"{dex}:{name}" for name in names)


def in_scope(group: HedgeGroup, selected: set[int] | None) -> bool:
    """Whether a run over the ``selected`` accounts (None: every active account) judges this group: a run narrowed by
    ``--account`` or ``--shard`` judges the groups with at least one leg among its accounts (the legs outside them
    are taken from the monitor's table, ``outside_legs``), and a group with no account leg (only external legs) is
    judged by every run."""
    if selected is None or not group.legs:
        return True
    return any(leg.account_id in selected for leg in group.legs)


def outside_legs(groups: Sequence[HedgeGroup], selected: set[int] | None) -> dict[int, set[str]]:
    """The watched accounts (by id) that are legs of judged groups but outside this run's accounts, each with
    the coins wanted: read from the table (one SELECT), never from the exchange."""
    wanted: dict[int, set[str]] = {}
    if selected is None:
        return wanted
    for group in groups:
        for leg in group.legs:
            if leg.account_active and leg.account_id not in selected:
                wanted.setdefault(leg.account_id, set()).add(group.coin)
    return wanted


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


def parse_tolerance(text: str) -> Decimal:
    value = parse_decimal(text, "--tolerance")
    if value < 0:
        raise UsageError(f"--tolerance: must be 0 or more, got {text.strip()}")
    return value


def parse_ratio(text: str) -> Decimal:
    value = parse_decimal(text, "--ratio")
    if value == 0:
        raise UsageError("--ratio: must not be 0 (remove the leg instead)")
    return value


def parse_size(text: str) -> Decimal:
    return parse_decimal(text, "--size")
