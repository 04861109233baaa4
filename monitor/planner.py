"""The pure planning step: (exchange snapshot, database rows, fills, mids, now) -> actions.

Nothing here does I/O. The runner gathers the inputs, calls ``plan_account``, and a separate
step applies the actions (or, under --dry-run, only prints them).
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from decimal import Context, Decimal
from typing import Any, Sequence

from monitor.clock import from_ms, to_ms
from monitor.fills import Cycle, RowCycles, funding_between, row_cycles, segment_cycles
from monitor.models import Account, AccountSnapshot, ExchangePosition, Fill, FundingPayment, PositionRow, dex_of

# Action types. The first four change the table; close_order asks the exchange to close; the
# others are reported so a person can see why nothing happened to a row.
DISCOVER = "discover"
UPDATE = "update"
CLOSE = "close"
CLOSE_ORDER = "close_order"
SETTLE_CLOSE = "settle_close"
TRACK_BEST = "track_best"
MARK_MISSING = "mark_missing"  # the first run that finds a row's position gone without a closing fill
# An unexplained close needs the window of missing time AND this many runs that read the row's dex and found it
# gone: a stale mark (or a mark from before an outage of the account's reads) and one more empty answer that its
# confirming read repeated cannot close a position that is still open.
MIN_MISSING_READS = 3
# A missing row's clock paused because its perp dex was not read this run: the time a row has been missing counts
# only over runs that read its dex (the gap is added to its mark when the dex is read again), so a mark from
# before a gap cannot close it as unexplained too early, and a dex read only now and then still gets there.
PAUSE_MISSING = "pause_missing"
WAIT = "wait"

_EXACT = Context(prec=120)  # sums of exchange decimals: exact

# ``dir`` of a fill that ends a position for a reason of the exchange's own (reference §2.4): auto-deleveraging
# (the profitable side forced out against a liquidated account) and a settlement (delisting / outcome markets).
ADL_DIRECTION = "Auto-Deleveraging"
SETTLEMENT_DIRECTION = "Settlement"


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
    funding: Decimal | None = None  # a close: the funding of the row's cycle (+ received, - paid)
    net_pnl: Decimal | None = None  # a close: realized_pnl - fees + funding
    # a close with figures: the span whose funding is the row's, (from, until] in ms; None: no funding to read
    funding_window: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in _ACTION_FIELDS:  # what asdict() gave, without its cost (a cold start reports thousands)
            value = getattr(self, key)
            if value is None or value == {} or key == "funding_window":
                continue
            if isinstance(value, (dict, list)):
                value = deepcopy(value)
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
                    f" fees {self.fees} funding {self.funding} net {self.net_pnl}")
        if self.type == CLOSE_ORDER:
            return f"close on exchange {who}{row} ({self.reason}) {self.side} {self.size} at mid {self.price}"
        if self.type == SETTLE_CLOSE:
            return f"settle unfinished close {who}{row}"
        if self.type == TRACK_BEST:
            return f"trailing stop {who}{row} best price -> {self.price}"
        if self.type == MARK_MISSING:
            return f"mark {who}{row} missing from the exchange (no closing fill yet)"
        if self.type == PAUSE_MISSING:
            return f"pause the missing clock of {who}{row}: {self.reason}"
        if self.type == "close_sent":
            outcome = self.metadata.get("outcome")
            return f"close order sent {who}{row} ({self.reason}): {outcome}, filled {self.size} at {self.price}"
        if self.type == "cancel_order":
            return f"cancel order {self.metadata.get('oid')} {who}{row}: {self.reason}"
        return f"wait {who}{row}: {self.reason}"


_ACTION_FIELDS = tuple(f.name for f in fields(Action))


@dataclass
class AccountPlan:
    account: Account
    actions: list[Action] = field(default_factory=list)
    seen_ids: list[int] = field(default_factory=list)  # rows confirmed unchanged: only last_seen_at moves

    @property
    def changes(self) -> list[Action]:
        return [a for a in self.actions if a.type in (DISCOVER, UPDATE, CLOSE, TRACK_BEST, MARK_MISSING,
                                                      PAUSE_MISSING)]


def needs_fills(snapshot: AccountSnapshot, rows: Sequence[PositionRow], recently_closed: Sequence[PositionRow],
                now: datetime, settings: PlanSettings, *, mids: dict[str, Decimal] | None = None,
                account_max_hold: int | None = None, verify_rules: bool = True) -> int | None:
    """The start (ms) of the fills window this account's plan needs, or None when it needs none.

    A row's cycle is checked against fills whenever the snapshot differs from the row (gone, other side,
    other size, other entry price), before an exit rule may send an order (``verify_rules``: a close and
    re-open between two runs must never be closed by the old row's rule), and when a coin reappears right
    after the monitor closed it (to tell a real re-open from a stale snapshot).
    """
    starts: list[datetime] = []
    for row in rows:
        if not snapshot.covers(row.coin):
            continue  # its dex was not read: nothing is known about it this run
        position = snapshot.positions.get(row.coin)
        if position is None:
            if now - row.opened_at >= settings.close_grace or row.status == "closing":
                starts.append(row.opened_at - lookback(row, settings))
        elif (position.side != row.side or position.size != row.size
              or (position.entry_price is not None and position.entry_price != row.entry_price)):
            starts.append(row.opened_at - lookback(row, settings))
        elif verify_rules and row.status in ("open", "closing") and exit_rule(row, (mids or {}).get(row.coin), now,
                                                                 account_max_hold)[0] is not None:
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
    verify_rules: bool = True,
    fills_from_ms: int | None = None,
) -> AccountPlan:
    """Decide what to do for one account. ``fills`` is None when none were read (or the read failed);
    with ``fills_truncated`` they are the part of the window the exchange still keeps (the most recent).
    ``fills_from_ms`` is where the read began: a row whose window starts earlier is judged without fills
    (a part of its history would give it wrong figures); ``needs_fills`` covers every row that needs them."""
    plan = AccountPlan(account)
    address = account.address
    rows_by_coin = {row.coin: row for row in rows}
    adopted: set[str] = set()

    # Past the exchange's history the fills begin at the oldest one still kept: only rows that opened
    # before it are truncated; a younger row's cycle is in reach (only part of its lead-in may not be).
    reach_from = min((f.time_ms for f in fills), default=None) if fills_truncated and fills else None
    for row in rows:
        if not snapshot.covers(row.coin):
            # Its perp dex was not read this run (not watched, not its turn, or the read failed): never
            # "missing", never closed, no rule acted on. The row stays exactly as it is.
            plan.actions.append(Action(WAIT, address, row.coin, position_id=row.id,
                                       reason=f"its perp dex {dex_of(row.coin)!r} was not read this run",
                                       metadata={"dex_unread": dex_of(row.coin)}))
            if _missing_since(row) is not None and _missing_paused_at(row) is None:
                # Missing time counts only over runs that read the row's dex: the clock stops here, and the
                # gap is left out when the dex is read again and the row is still gone.
                plan.actions.append(Action(PAUSE_MISSING, address, row.coin, position_id=row.id, closed_at=now,
                                           reason="its perp dex was not read this run; the time it has been"
                                                  " missing stops counting until the dex is read again"))
            continue
        position = snapshot.positions.get(row.coin)
        window_start = to_ms(row.opened_at - lookback(row, settings))
        covered = fills_from_ms is None or window_start >= fills_from_ms
        row_truncated = fills_truncated and covered and (reach_from is None or to_ms(row.opened_at) < reach_from)
        now_at = _signed(position)  # the tie-break of a last millisecond that chains either way
        cycles = row_cycles_of(fills, row, address, settings, now_at) if covered and fills is not None else None
        own = cycles.own if cycles is not None else None
        if cycles is not None and row_truncated and fills:
            reach = segment_cycles(fills, row.coin, account=address, end_position=now_at)
            if reach and (reach[0].start_known or reach[0].side != row.side):
                # The oldest fills in reach start from flat or from the other side: the row's own cycle
                # ended before them, out of the exchange's history. Close it (no figures to be had) and
                # adopt what is open now; never act on that with the row's rules.
                actions = _ended_out_of_reach(address, row, reach, position, now)
                adopted.update(a.coin for a in actions if a.type == DISCOVER)
                plan.actions.extend(actions)
                continue
        if cycles is not None and own is not None and own.ended and not own.broken:
            actions = _cycle_ended(address, row, cycles, position, now, row_truncated)
            adopted.update(a.coin for a in actions if a.type == DISCOVER)
            plan.actions.extend(actions)
        elif own is not None and own.broken:
            plan.actions.append(Action(WAIT, address, row.coin, position_id=row.id,
                                       reason="its fills do not add up (some missing), retry next run"))
        else:
            row_fills = fills if covered else None
            if position is None:
                plan.actions.extend(_vanished(address, row, now, settings, row_fills, fills_error, row_truncated))
            elif position.side != row.side:
                plan.actions.append(_flip_unproven(address, row, row_fills, fills_error))
            else:
                plan.actions.extend(_still_open(address, account, row, position, now, row_fills, fills_error, own,
                                                row_truncated, mids, plan, settings, verify_rules))

    recent_by_coin: dict[str, PositionRow] = {}
    for row in recently_closed:
        recent_by_coin.setdefault(row.coin, row)
    for coin, position in sorted(snapshot.positions.items()):
        if coin in rows_by_coin or coin in adopted:
            continue
        recent = recent_by_coin.get(coin)
        if recent is not None and recent.closed_at is not None:
            reopened_at = _reopened_after(fills, coin, position.side, to_ms(recent.closed_at), address)
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


def row_cycles_of(fills: Sequence[Fill], row: PositionRow, address: str, settings: PlanSettings,
                  end_position: Decimal | None = None) -> RowCycles:
    """The row's own cycle and the later ones, from the fills of its window (the one model every decision uses).
    ``end_position``: the coin's signed position in the snapshot, where known (``fills.segment_cycles``)."""
    return row_cycles(fills, coin=row.coin, side=row.side, opened_ms=to_ms(row.opened_at), account=address,
                      lookback_ms=int(lookback(row, settings).total_seconds() * 1000),
                      adopted=row.source == "discovered", end_position=end_position)


def _signed(position: ExchangePosition | None) -> Decimal:
    """A snapshot's position as a signed size (flat: 0), as fills' startPosition counts it."""
    return Decimal(0) if position is None else position.size if position.side == "long" else -position.size


def close_reason(row: PositionRow, own: Cycle, address: str) -> str:
    """Why the row's cycle ended: a liquidation of this account (market or backstop), auto-deleveraging or a
    settlement (the fill that ended it says so), this row's own close order (its rule), a flip, else external."""
    if own.liquidated:
        return "liquidation"
    if own.end_direction == ADL_DIRECTION:
        return "adl"
    if own.end_direction == SETTLEMENT_DIRECTION:
        return "settlement"
    if own.end_cloid is not None and own.end_cloid in _row_cloids(row, address):
        return claimed_rule(row)
    if ended_by_own_order(row, own):
        return claimed_rule(row)
    if own.flipped:
        return "flipped"
    return "external"


def _row_cloids(row: PositionRow, address: str) -> set[str]:
    from monitor.exchange import close_cloid  # a pure hash; the module's I/O is not touched

    ids = {close_cloid(address, row.id, attempt).lower() for attempt in range(1, row.close_attempts + 1)}
    if row.close_cloid:
        ids.add(row.close_cloid.lower())
    return ids


def row_order_ids(row: PositionRow) -> set[int]:
    """The exchange order ids of the row's own close orders (recorded from their answers: HIP-3 closes carry
    no cloid, so their fills are known by oid)."""
    oids = row.metadata.get("close_oids")
    return {o for o in oids if isinstance(o, int) and not isinstance(o, bool)} if isinstance(oids, list) else set()


def ended_by_own_order(row: PositionRow, own: Cycle) -> bool:
    """Whether the fill that ended a HIP-3 row's cycle was its own close order (sent without a cloid): by the
    oid recorded from the order's answer, or, when that answer was lost, by time: a fill of no cloid, not a
    liquidation, inside the claimed order's life (claim to expiresAfter). The time rule can take an outside
    close in those few seconds for ours (the label only; the figures are the cycle's either way)."""
    if own.end_oid is None or not dex_of(row.coin):
        return False
    if own.end_oid in row_order_ids(row):
        return True
    if (row.status != "closing" or own.end_cloid is not None or own.end_liquidation or own.end_ms is None
            or row.close_started_at is None or row.close_expires_at is None):
        return False
    return to_ms(row.close_started_at) - 1000 <= own.end_ms <= to_ms(row.close_expires_at) + 1000


def cycle_close(address: str, row: PositionRow, own: Cycle, now: datetime, *, truncated: bool = False,
                reason: str | None = None) -> Action:
    """The CLOSE of a row whose cycle ended, with that cycle's own figures."""
    closed_at, extra = _close_time(row, own.figures(), now)
    metadata: dict[str, Any] = {"fills": own.fill_count, **extra}
    if own.gap:
        # Fills are missing inside the cycle: it ended (a fill took it to zero), but its figures would be
        # wrong. Closed without them, and said so.
        return Action(CLOSE, address, row.coin, position_id=row.id, side=row.side, size=row.size,
                      reason=reason or close_reason(row, own, address), exit_price=None, realized_pnl=None,
                      fees=None, closed_at=closed_at, metadata={**metadata, "unexplained": True, "fills_gap": True})
    if not own.start_known:
        metadata["opening_fills_missing"] = True  # older than the exchange keeps: fees cover what is there
        if truncated:
            metadata["fills_truncated"] = True
    return Action(CLOSE, address, row.coin, position_id=row.id, side=row.side, size=row.size,
                  reason=reason or close_reason(row, own, address), exit_price=own.exit_price,
                  realized_pnl=own.realized_pnl, fees=own.fees, closed_at=closed_at, metadata=metadata,
                  funding_window=funding_window(row, own))


def funding_window(row: PositionRow, own: Cycle) -> tuple[int, int] | None:
    """The span (from, until] in ms whose funding payments are the row's: from its cycle's opening fill (or,
    when that fill is out of the window read, from the row's open, the span its fees cover too) to the fill
    that ended it. None when there is no such span (its close preceded the row's adoption)."""
    if own.end_ms is None:
        return None
    start = own.start_ms if own.start_known else to_ms(row.opened_at)
    if own.end_ms <= start and not own.start_known:
        return None
    return (start, own.end_ms)


def with_funding(actions: Sequence[Action], payments: Sequence[FundingPayment] | None,
                 error: str | None = None) -> list[Action]:
    """The closes among ``actions`` with their funding and net P&L (pure: ``payments`` were read before).

    ``payments`` is the account's ``userFunding`` over every close's window, or None when it could not be
    read (``error`` says why): then the close is written without funding and net P&L (NULL, never a zero
    that was not read) and ``metadata.funding_unread`` says why; the close itself never waits for funding.
    """
    out: list[Action] = []
    for action in actions:
        if action.type != CLOSE or action.realized_pnl is None or action.fees is None:
            out.append(action)
            continue
        if action.funding_window is None:
            out.append(replace(action, metadata={**action.metadata, "funding_unknown": True}))
            continue
        if payments is None:
            out.append(replace(action, metadata={**action.metadata,
                                                 "funding_unread": error or "userFunding not read"}))
            continue
        if dex_of(action.coin) and not any(p.coin == action.coin for p in payments):
            # Whether userFunding covers HIP-3 dexes is UNCONFIRMED (reference §2.12, §9.4): no payment of this
            # coin may mean none was made or none is reported. NULL, never a zero that may not be true.
            out.append(replace(action, metadata={**action.metadata, "funding_unknown": True,
                                                 "funding_unconfirmed_hip3": True}))
            continue
        funding = funding_between(payments, action.coin, *action.funding_window)
        net = _EXACT.add(_EXACT.subtract(action.realized_pnl, action.fees), funding)
        out.append(replace(action, funding=funding, net_pnl=net))
    return out


def funding_span(actions: Sequence[Action]) -> tuple[int, int] | None:
    """The one userFunding window (ms, inclusive) that covers every close's funding window, or None: no close
    needs funding (closes without figures have none)."""
    windows = [a.funding_window for a in actions
               if a.type == CLOSE and a.funding_window is not None and a.realized_pnl is not None
               and a.fees is not None]
    if not windows:
        return None
    return (min(w[0] for w in windows) + 1, max(w[1] for w in windows))


def _cycle_ended(address: str, row: PositionRow, cycles: RowCycles, position: ExchangePosition | None,
                 now: datetime, truncated: bool) -> list[Action]:
    """The row's cycle ended: close it with its own figures; a position open now is a later cycle, a new row."""
    own = cycles.own
    assert own is not None
    close = cycle_close(address, row, own, now, truncated=truncated)
    # What the close's follow-up may cancel (applying._followup, closing.close_bound_ms) is decided from the
    # fills, not from what else is planned (a snapshot that lags the fills plans a wait, not a discover):
    orders: dict[str, Any] = {}
    if own.flipped:  # the fill that ended it opened the next position: their orders cannot be told apart
        orders["cycle_flipped"] = True
    if cycles.later:
        orders["next_cycle_at"] = from_ms(cycles.later[0].start_ms).isoformat()
        if position is None and all(c.ended and not c.broken for c in cycles.later):
            # Positions opened and closed after the row's own, between two runs, belong to no row, but the
            # coin is flat now (snapshot and fills agree), so the reduce-only orders they left are as
            # orphaned as the row's own: the follow-up cancels up to the last of their closes.
            orders["later_cycles_closed_at"] = from_ms(max(c.end_ms or 0 for c in cycles.later)).isoformat()
    if orders:
        close = replace(close, metadata={**close.metadata, **orders})
    actions = [close]
    latest = cycles.latest
    if position is None:
        return actions
    if latest is None or latest is own or latest.ended or latest.broken or latest.side != position.side:
        actions.append(Action(WAIT, address, row.coin, position_id=row.id,
                              reason="on the exchange again, but no fill shows that position opening yet"))
        return actions
    link = "flipped_from" if latest.opened_by_flip and latest is cycles.later[0] else "reopened_after"
    actions.append(Action(DISCOVER, address, row.coin, side=position.side, size=position.size,
                          entry_price=position.entry_price, opened_at=from_ms(latest.start_ms),
                          metadata={link: row.id}))
    return actions


def _ended_out_of_reach(address: str, row: PositionRow, reach: list[Cycle], position: ExchangePosition | None,
                        now: datetime) -> list[Action]:
    first = reach[0]
    actions = [Action(CLOSE, address, row.coin, position_id=row.id, side=row.side, size=row.size,
                      reason="external", exit_price=None, realized_pnl=None, fees=None,
                      closed_at=max(row.opened_at, min(now, from_ms(first.start_ms))),
                      metadata={"unexplained": True, "fills_truncated": True,
                                "closed_before": from_ms(first.start_ms).isoformat()})]
    latest = reach[-1]
    if (position is not None and not latest.ended and not latest.broken and latest.side == position.side
            and latest.start_known):
        actions.append(Action(DISCOVER, address, row.coin, side=position.side, size=position.size,
                              entry_price=position.entry_price, opened_at=from_ms(latest.start_ms),
                              metadata={"reopened_after": row.id}))
    elif position is not None:
        actions.append(Action(WAIT, address, row.coin, position_id=row.id,
                              reason="on the exchange again, but no fill in reach shows that position opening"))
    return actions


def _reopened_after(fills: Sequence[Fill] | None, coin: str, side: str, closed_ms: int,
                    address: str) -> datetime | None:
    """When the position open now on ``side`` started, if a fill after ``closed_ms`` opened it (None: no such fill)."""
    if not fills:
        return None
    cycles = segment_cycles((f for f in fills if f.time_ms >= closed_ms), coin, account=address)
    if not cycles:
        return None
    latest = cycles[-1]
    if latest.ended or latest.broken or latest.side != side or not latest.start_known:
        return None
    return from_ms(latest.start_ms)


def _vanished(address: str, row: PositionRow, now: datetime, settings: PlanSettings,
              fills: Sequence[Fill] | None, fills_error: str | None, fills_truncated: bool = False) -> list[Action]:
    """Gone from the exchange, and no fill shows the row's cycle ending (yet)."""
    if row.status != "closing" and now - row.opened_at < settings.close_grace:
        return [Action(WAIT, address, row.coin, position_id=row.id,
                       reason="not on the exchange yet, but opened moments ago (grace period)")]
    if fills is None and not fills_truncated:
        return [Action(WAIT, address, row.coin, position_id=row.id,
                       reason=(f"gone from the exchange; fills unreadable ({fills_error or 'not read'}),"
                               " retry next run"))]
    # Gone, and no fill explains it (yet). Close without figures only after it has been seen missing
    # for the whole window, counted from the first run that saw it missing (not from the last
    # sighting: an outage or failed reads must not shorten the wait).
    missing_since = _missing_since(row)
    if missing_since is None:
        return [Action(MARK_MISSING, address, row.coin, position_id=row.id, closed_at=now,
                       reason="gone from the exchange but no fill shows the close yet; confirming in later runs",
                       metadata={"missing_reads": 1})]
    reads = _missing_reads(row) + 1  # the runs that read its dex and found it gone, this one included
    paused_at = _missing_paused_at(row)
    if paused_at is not None:
        # Its dex went unread for a while: that gap does not count. The mark moves on by the gap (and the
        # pause ends), so only the time over runs that read the dex adds up to the window.
        missing_since = min(now, missing_since + max(now - paused_at, timedelta(0)))
    if now - missing_since >= settings.unexplained_close_after and reads >= MIN_MISSING_READS:
        extra = {"fills_truncated": True} if fills_truncated else {}
        return [Action(CLOSE, address, row.coin, position_id=row.id, side=row.side, size=row.size,
                       reason="external", exit_price=None, realized_pnl=None, fees=None, closed_at=now,
                       metadata={"unexplained": True, "missing_since": missing_since.isoformat(),
                                 "missing_reads": reads, **extra})]
    # Still waiting: the mark (moved on by an unread gap) and the count of reads that found it gone are kept.
    return [Action(MARK_MISSING, address, row.coin, position_id=row.id, closed_at=missing_since,
                   reason=(f"gone from the exchange since {missing_since:%H:%M:%S} ({reads} reads) but no fill shows"
                           " the close yet"), metadata={"missing_reads": reads})]


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


def _missing_reads(row: PositionRow) -> int:
    """How many runs that read the row's dex found it gone since its mark (a mark without a count: one)."""
    count = row.metadata.get("missing_reads")
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1


def _metadata_moment(row: PositionRow, key: str) -> datetime | None:
    """A moment the row's metadata keeps as ISO text (``missing_since``, ``missing_paused_at``); None if absent
    or unreadable."""
    text = row.metadata.get(key)
    try:
        return datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _missing_paused_at(row: PositionRow) -> datetime | None:
    return _metadata_moment(row, "missing_paused_at")


def _missing_since(row: PositionRow) -> datetime | None:
    return _metadata_moment(row, "missing_since")


def claimed_rule(row: PositionRow) -> str:
    """The rule a row's close order was claimed for ("requested" when none was recorded)."""
    return row.close_rule or "requested"


def _flip_unproven(address: str, row: PositionRow, fills: Sequence[Fill] | None, fills_error: str | None) -> Action:
    if fills is None:
        return Action(WAIT, address, row.coin, position_id=row.id,
                      reason=f"flipped on the exchange; fills unreadable ({fills_error or 'not read'}), retry next run")
    # A stale snapshot, or fills that lag: never close without the closing fill.
    return Action(WAIT, address, row.coin, position_id=row.id,
                  reason="on the other side on the exchange, but no fill shows this side closing yet")


def _still_open(address: str, account: Account, row: PositionRow, position: ExchangePosition, now: datetime,
                fills: Sequence[Fill] | None, fills_error: str | None, own: Cycle | None, truncated: bool,
                mids: dict[str, Decimal] | None, plan: AccountPlan, settings: PlanSettings,
                verify_rules: bool) -> list[Action]:
    """The position is on the exchange on the row's side and (where fills were read) is the row's own cycle."""
    actions: list[Action] = []
    changed = position.size != row.size or (position.entry_price is not None
                                            and position.entry_price != row.entry_price)
    if changed and fills is None:
        # Without fills a close and re-open cannot be told from a resize: keep the row as it is (the
        # difference stays, so the next run reads fills again) and send nothing for it.
        return [Action(WAIT, address, row.coin, position_id=row.id,
                       reason=(f"size or entry changed; fills unreadable ({fills_error or 'not read'}),"
                               " verify next run"))]
    # the cycle's figures so far, when they are all there (past the history its start is out of reach)
    whole = own if own is not None and own.complete and (own.start_known or not truncated) else None
    if changed:
        actions.append(Action(UPDATE, address, row.coin, position_id=row.id, side=row.side, size=position.size,
                              previous_size=row.size, entry_price=position.entry_price,
                              realized_pnl=whole.realized_pnl if whole is not None else None,
                              fees=whole.fees if whole is not None else None))
    else:
        plan.seen_ids.append(row.id)
    mid = (mids or {}).get(row.coin)
    if row.status == "closing":
        # If its close order turns out never placed (or cancelled, or expired), the rule that still fires
        # sends a new one in this run; only when the fills checked the position is still this row's.
        rule = exit_rule(row, mid, now, account.max_hold_seconds)[0]
        then = rule if rule is not None and mid is not None and (not verify_rules or fills is not None) else None
        actions.append(Action(SETTLE_CLOSE, address, row.coin, position_id=row.id, side=row.side,
                              size=position.size, reason=claimed_rule(row), price=mid if then else None,
                              metadata={"then": then} if then else {}))
        return actions
    rule, best = exit_rule(row, mid, now, account.max_hold_seconds)
    if best is not None and best != row.best_price:
        actions.append(Action(TRACK_BEST, address, row.coin, position_id=row.id, price=best))
    if rule is not None:
        if verify_rules and fills is None:
            actions.append(Action(WAIT, address, row.coin, position_id=row.id, reason=(
                f"{rule} fired, but fills ({fills_error or 'not read'}) could not show the position is still this"
                " row's; nothing sent, retry next run")))
        else:
            # Sized to the larger of the snapshot and the fills (a snapshot can lag a position that grew);
            # a reduce-only order is capped at the position by the exchange, so it never over-closes.
            size = position.size
            if own is not None and not own.ended and own.complete and own.size > size:
                size = own.size
            actions.append(Action(CLOSE_ORDER, address, row.coin, position_id=row.id, side=row.side,
                                  size=size, reason=rule, price=mid))
    return actions


def exit_rule(row: PositionRow, mid: Decimal | None, now: datetime,
              account_max_hold: int | None) -> tuple[str | None, Decimal | None]:
    """Which exit rule fires for this row at this mid, and the trailing best price.

    The first that fires of: requested, stop_loss, take_profit, trailing_stop, max_hold."""
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
