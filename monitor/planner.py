"""The pure planning step: (exchange snapshot, database rows, fills, mids, now) -> actions.

Nothing here does I/O. The runner gathers the inputs, calls ``plan_account``, and a separate
step applies the actions (or, under --dry-run, only prints them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Sequence

from monitor.clock import from_ms, to_ms
from monitor.fills import row_close_figures
from monitor.models import Account, AccountSnapshot, ExchangeDataError, ExchangePosition, Fill, PositionRow

# Action types. The first four change the table; close_order asks the exchange to close; the
# others are reported so a person can see why nothing happened to a row.
DISCOVER = "discover"
UPDATE = "update"
CLOSE = "close"
CLOSE_ORDER = "close_order"
SETTLE_CLOSE = "settle_close"
TRACK_BEST = "track_best"
MARK_MISSING = "mark_missing"  # the first run that finds a row's position gone without a closing fill
WAIT = "wait"

CLOSE_RULES = ("requested", "stop_loss", "take_profit", "trailing_stop", "max_hold")


@dataclass(frozen=True)
class PlanSettings:
    close_grace: timedelta = timedelta(seconds=60)
    reopen_guard: timedelta = timedelta(seconds=120)
    unexplained_close_after: timedelta = timedelta(seconds=900)


@dataclass(frozen=True)
class Action:
    type: str
    account: str
    coin: str
    position_id: int | None = None
    side: str | None = None
    size: Decimal | None = None
    previous_size: Decimal | None = None
    entry_price: Decimal | None = None
    reason: str | None = None
    exit_price: Decimal | None = None
    realized_pnl: Decimal | None = None
    fees: Decimal | None = None
    closed_at: datetime | None = None
    opened_at: datetime | None = None
    price: Decimal | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value is None or value == {}:
                continue
            if isinstance(value, Decimal):
                value = str(value)
            elif isinstance(value, datetime):
                value = value.isoformat()
            out[key] = value
        return out

    def describe(self) -> str:
        who = f"{self.account[:8]}…{self.account[-4:]} {self.coin}"
        row = f" #{self.position_id}" if self.position_id is not None else ""
        if self.type == DISCOVER:
            return f"discover {who} {self.side} {self.size} @ {self.entry_price}"
        if self.type == UPDATE:
            return f"update {who}{row} size {self.previous_size} -> {self.size} entry {self.entry_price}"
        if self.type == CLOSE:
            return (f"close {who}{row} ({self.reason}) exit {self.exit_price} pnl {self.realized_pnl}"
                    f" fees {self.fees}")
        if self.type == CLOSE_ORDER:
            return f"close on exchange {who}{row} ({self.reason}) {self.side} {self.size} at mid {self.price}"
        if self.type == SETTLE_CLOSE:
            return f"settle unfinished close {who}{row}"
        if self.type == TRACK_BEST:
            return f"trailing stop {who}{row} best price -> {self.price}"
        if self.type == MARK_MISSING:
            return f"mark {who}{row} missing from the exchange (no closing fill yet)"
        return f"wait {who}{row}: {self.reason}"


@dataclass
class AccountPlan:
    account: Account
    actions: list[Action] = field(default_factory=list)
    seen_ids: list[int] = field(default_factory=list)  # rows confirmed unchanged: only last_seen_at moves

    @property
    def changes(self) -> list[Action]:
        return [a for a in self.actions if a.type in (DISCOVER, UPDATE, CLOSE, TRACK_BEST, MARK_MISSING)]


def needs_fills(snapshot: AccountSnapshot, rows: Sequence[PositionRow], recently_closed: Sequence[PositionRow],
                now: datetime, settings: PlanSettings) -> int | None:
    """The start (ms) of the fills window this account's plan needs, or None when it needs none.

    Fills are read only when a row vanished, shrank or flipped, or a coin reappears right after
    the monitor closed it (to tell a real re-open from a stale snapshot).
    """
    starts: list[datetime] = []
    for row in rows:
        position = snapshot.positions.get(row.coin)
        if position is None:
            if now - row.opened_at >= settings.close_grace or row.status == "closing":
                starts.append(row.opened_at - lookback(row, settings))
        elif position.side != row.side or position.size < row.size:
            starts.append(row.opened_at - lookback(row, settings))
    open_coins = {row.coin for row in rows}
    for row in recently_closed:
        if row.coin in snapshot.positions and row.coin not in open_coins and row.closed_at is not None:
            starts.append(row.closed_at)
    if not starts:
        return None
    return to_ms(min(starts))


def plan_account(
    account: Account,
    snapshot: AccountSnapshot,
    rows: Sequence[PositionRow],
    now: datetime,
    settings: PlanSettings,
    *,
    fills: Sequence[Fill] | None = None,
    fills_error: str | None = None,
    fills_truncated: bool = False,
    recently_closed: Sequence[PositionRow] = (),
    mids: dict[str, Decimal] | None = None,
) -> AccountPlan:
    """Decide what to do for one account. ``fills`` is None when none were read (or the read failed)."""
    plan = AccountPlan(account)
    address = account.address
    rows_by_coin = {row.coin: row for row in rows}

    for row in rows:
        position = snapshot.positions.get(row.coin)
        if position is None:
            plan.actions.extend(_vanished(address, row, now, settings, fills, fills_error, fills_truncated))
        elif position.side != row.side:
            plan.actions.extend(_flipped(address, row, position, now, fills, fills_error, settings))
        else:
            plan.actions.extend(_still_open(address, account, row, position, now, fills, mids, plan, settings))

    recent_by_coin: dict[str, PositionRow] = {}
    for row in recently_closed:
        recent_by_coin.setdefault(row.coin, row)
    for coin, position in sorted(snapshot.positions.items()):
        if coin in rows_by_coin:
            continue
        recent = recent_by_coin.get(coin)
        if recent is not None and recent.closed_at is not None:
            reopened_at = _reopened_after(fills, coin, position.side, to_ms(recent.closed_at))
            if reopened_at is None:
                plan.actions.append(Action(WAIT, address, coin, position_id=recent.id,
                                           reason="closed moments ago; snapshot may be stale (no fill re-opened it)"))
                continue
            opened_at = reopened_at
        else:
            opened_at = now
        plan.actions.append(Action(DISCOVER, address, coin, side=position.side, size=position.size,
                                   entry_price=position.entry_price, opened_at=opened_at))
    return plan


def lookback(row: PositionRow, settings: PlanSettings) -> timedelta:
    """How far before its open a row's fills window starts: a second of clock slack, or for a row adopted
    from a snapshot the stale-read window, since that snapshot may have shown a position already closed."""
    return settings.reopen_guard if row.source == "discovered" else timedelta(seconds=1)


def _figures(fills: Sequence[Fill], row: PositionRow, address: str, settings: PlanSettings) -> Any:
    """The row's close figures from its own window of fills, or None when they do not chain (some missing)."""
    try:
        return row_close_figures(fills, coin=row.coin, side=row.side, opened_ms=to_ms(row.opened_at),
                                 account=address, lookback_ms=int(lookback(row, settings).total_seconds() * 1000))
    except ExchangeDataError:
        return None


def _reopened_after(fills: Sequence[Fill] | None, coin: str, side: str, closed_ms: int) -> datetime | None:
    """When a fill after ``closed_ms`` opened ``coin`` again on ``side`` (None: no such fill)."""
    for fill in fills or ():
        if fill.coin != coin or fill.time_ms < closed_ms:
            continue
        after = fill.end_position
        if (side == "long" and fill.start_position <= 0 < after) or (side == "short" and fill.start_position >= 0 > after):
            return from_ms(fill.time_ms)
    return None


def _explain(address: str, row: PositionRow, fills: Sequence[Fill] | None, fills_error: str | None,
             what: str, settings: PlanSettings) -> Any:
    """The row's close figures from fills, or a WAIT action saying why they cannot be had yet."""
    if fills is None:
        return Action(WAIT, address, row.coin, position_id=row.id,
                      reason=f"{what}; fills unreadable ({fills_error or 'not read'}), retry next run")
    figures = _figures(fills, row, address, settings)
    if figures is None:
        return Action(WAIT, address, row.coin, position_id=row.id,
                      reason=f"{what}; its fills do not add up (some missing), retry next run")
    return figures


def _vanished(address: str, row: PositionRow, now: datetime, settings: PlanSettings,
              fills: Sequence[Fill] | None, fills_error: str | None, fills_truncated: bool = False) -> list[Action]:
    if row.status != "closing" and now - row.opened_at < settings.close_grace:
        return [Action(WAIT, address, row.coin, position_id=row.id,
                       reason="not on the exchange yet, but opened moments ago (grace period)")]
    if not fills_truncated:
        figures = _explain(address, row, fills, fills_error, "gone from the exchange", settings)
        if isinstance(figures, Action):
            return [figures]
        if figures.flat:
            if figures.liquidated:
                reason = "liquidation"
            elif row.status == "closing" and row.close_cloid and _closed_by_cloid(fills or (), row):
                reason = _rule_of(row)
            else:
                reason = "external"
            closed_at, extra = _close_time(row, figures, now)
            return [Action(CLOSE, address, row.coin, position_id=row.id, side=row.side, size=row.size,
                           reason=reason, exit_price=figures.exit_price, realized_pnl=figures.realized_pnl,
                           fees=figures.fees, closed_at=closed_at, metadata={"fills": figures.fill_count, **extra})]
    # Gone, and no fill explains it (yet). Close without figures only after it has been seen missing
    # for the whole window, counted from the first run that saw it missing (not from the last
    # sighting: an outage or failed reads must not shorten the wait).
    missing_since = _missing_since(row)
    if missing_since is None:
        return [Action(MARK_MISSING, address, row.coin, position_id=row.id, closed_at=now,
                       reason="gone from the exchange but no fill shows the close yet; confirming in later runs")]
    if now - missing_since >= settings.unexplained_close_after:
        extra = {"fills_truncated": True} if fills_truncated else {}
        return [Action(CLOSE, address, row.coin, position_id=row.id, side=row.side, size=row.size,
                       reason="external", exit_price=None, realized_pnl=None, fees=None, closed_at=now,
                       metadata={"unexplained": True, "missing_since": missing_since.isoformat(), **extra})]
    return [Action(WAIT, address, row.coin, position_id=row.id,
                   reason=f"gone from the exchange since {missing_since:%H:%M:%S} but no fill shows the close yet")]


def _close_time(row: PositionRow, figures: Any, now: datetime) -> tuple[datetime, dict[str, Any]]:
    """When the row closed: its closing fill's time, but never before the row's own open. A row adopted
    from a stale snapshot can be explained by a close that preceded it; that fill's time is kept in
    metadata, and closed_at stays >= opened_at for whoever reads the table."""
    if not figures.closed_at_ms:
        return now, {}
    fill_time = from_ms(figures.closed_at_ms)
    if fill_time >= row.opened_at:
        return fill_time, {}
    return row.opened_at, {"close_fill_at": fill_time.isoformat(), "closed_before_adoption": True}


def _missing_since(row: PositionRow) -> datetime | None:
    text = row.metadata.get("missing_since")
    try:
        return datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _rule_of(row: PositionRow) -> str:
    return row.close_rule or "requested"


def _closed_by_cloid(fills: Sequence[Fill], row: PositionRow) -> bool:
    return any(f.cloid == row.close_cloid for f in fills if f.coin == row.coin)


def _flipped(address: str, row: PositionRow, position: ExchangePosition, now: datetime,
             fills: Sequence[Fill] | None, fills_error: str | None, settings: PlanSettings) -> list[Action]:
    figures = _explain(address, row, fills, fills_error, "flipped on the exchange", settings)
    if isinstance(figures, Action):
        return [figures]
    if not figures.flat:  # a stale snapshot, or fills that lag: never close without the closing fill
        return [Action(WAIT, address, row.coin, position_id=row.id,
                       reason="on the other side on the exchange, but no fill shows this side closing yet")]
    closed_at, _ = _close_time(row, figures, now)
    reason = "liquidation" if figures.liquidated else "flipped"
    return [
        Action(CLOSE, address, row.coin, position_id=row.id, side=row.side, size=row.size, reason=reason,
               exit_price=figures.exit_price, realized_pnl=figures.realized_pnl, fees=figures.fees,
               closed_at=closed_at, metadata={"fills": figures.fill_count}),
        Action(DISCOVER, address, row.coin, side=position.side, size=position.size,
               entry_price=position.entry_price, opened_at=closed_at, metadata={"flipped_from": row.id}),
    ]


def _still_open(address: str, account: Account, row: PositionRow, position: ExchangePosition, now: datetime,
                fills: Sequence[Fill] | None, mids: dict[str, Decimal] | None, plan: AccountPlan,
                settings: PlanSettings) -> list[Action]:
    actions: list[Action] = []
    if position.size != row.size or position.entry_price != row.entry_price:
        realized = fees = None
        if position.size < row.size and fills is not None:
            partial = _figures(fills, row, address, settings)
            if partial is not None:
                realized, fees = partial.realized_pnl, partial.fees
        actions.append(Action(UPDATE, address, row.coin, position_id=row.id, side=row.side, size=position.size,
                              previous_size=row.size, entry_price=position.entry_price,
                              realized_pnl=realized, fees=fees))
    else:
        plan.seen_ids.append(row.id)
    if row.status == "closing":
        actions.append(Action(SETTLE_CLOSE, address, row.coin, position_id=row.id, side=row.side,
                              size=position.size, reason=_rule_of(row)))
        return actions
    mid = (mids or {}).get(row.coin)
    rule, best = exit_rule(row, mid, now, account.max_hold_seconds)
    if best is not None and best != row.best_price:
        actions.append(Action(TRACK_BEST, address, row.coin, position_id=row.id, price=best))
    if rule is not None:
        actions.append(Action(CLOSE_ORDER, address, row.coin, position_id=row.id, side=row.side,
                              size=position.size, reason=rule, price=mid))
    return actions


def exit_rule(row: PositionRow, mid: Decimal | None, now: datetime,
              account_max_hold: int | None) -> tuple[str | None, Decimal | None]:
    """Which exit rule fires for this row at this mid (first of CLOSE_RULES), and the trailing best price."""
    long = row.side == "long"
    best = None
    if row.trailing_stop_pct is not None and mid is not None:
        previous = row.best_price if row.best_price is not None else (row.entry_price or mid)
        best = max(previous, mid) if long else min(previous, mid)
    if row.close_requested_at is not None:
        return "requested", best
    if mid is not None:
        if row.stop_loss_price is not None and (mid <= row.stop_loss_price if long else mid >= row.stop_loss_price):
            return "stop_loss", best
        if row.take_profit_price is not None and (
            mid >= row.take_profit_price if long else mid <= row.take_profit_price
        ):
            return "take_profit", best
        if best is not None and row.trailing_stop_pct is not None:
            factor = row.trailing_stop_pct / Decimal(100)
            if (long and mid <= best * (1 - factor)) or (not long and mid >= best * (1 + factor)):
                return "trailing_stop", best
    max_hold = row.max_hold_seconds or account_max_hold
    if max_hold is not None and now - row.opened_at >= timedelta(seconds=max_hold):
        return "max_hold", best
    return None, best
