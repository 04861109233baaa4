"""Fills: parse them, put them in order, and work out how a position was closed. No I/O here.

Everything is ``Decimal``; nothing here turns a price, size, PnL or fee into a float.

Two facts about the exchange's fill lists that the code below relies on (both seen in the recorded
``userFills`` answer in ``tests/fixtures/hyperliquid/userFills.json``):

* The list is newest first, but fills that share a millisecond are listed in the order they
  happened (oldest first). ``userFillsByTime`` is oldest first. So fills are sorted by time, and
  within a millisecond they are put in the order in which each fill's ``startPosition`` follows on
  from the previous fill's position after it (``end_position``).
* A self-trade (the account's taker order matched against its own resting order) comes back as two
  fills with the same hash, price and size and opposite sides, both reporting the same
  ``startPosition``. Such a pair leaves the position as it was, although one leg, read alone, looks
  like a "Close Short" that takes the position to zero (the recorded data has one: SUI at
  1683245670463) or a flip ("Long > Short"). A pair is treated as one *wash* step: the position is
  unchanged, its legs' closedPnl and fees count (the exchange resets the entry price, so the
  closedPnl is real), but it never closes the position and its size is not exit volume.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, DivisionByZero, InvalidOperation, Overflow
from typing import Any, Literal

from monitor.models import (
    ExchangeDataError,
    Fill,
    Liquidation,
    parse_coin,
    parse_decimal,
    parse_int,
)

__all__ = [
    "CloseFigures",
    "close_figures",
    "dedupe_fills",
    "flat_points",
    "is_liquidation_of",
    "parse_fills",
]

_ZERO = Decimal(0)
# Sums and products are exact at this precision for any size/price the exchange writes (at most
# 30+30 digits each, see models._DECIMAL_TEXT). Divisions give 28 significant digits, the same as
# Python's default decimal context, whatever context the caller has set.
_EXACT = Context(prec=120, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow])
_DIVIDE = Context(prec=28, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow])


# --------------------------------------------------------------------------------------------
# Parsing


def _optional(item: dict[str, Any], key: str) -> Any:
    """An optional field: absent and JSON null both mean "not given"."""
    return item.get(key)


def _parse_liquidation(value: Any, what: str) -> Liquidation:
    if not isinstance(value, dict):
        raise ExchangeDataError(f"{what}: expected an object, got {value!r:.60}")
    user = value.get("liquidatedUser")
    if user is not None and not isinstance(user, str):
        raise ExchangeDataError(f"{what}.liquidatedUser: expected a string, got {user!r:.60}")
    mark = value.get("markPx")
    method = value.get("method")
    if method is not None and not isinstance(method, str):
        raise ExchangeDataError(f"{what}.method: expected a string, got {method!r:.60}")
    return Liquidation(
        liquidated_user=user,
        mark_price=None if mark is None else parse_decimal(mark, f"{what}.markPx"),
        method=method,
    )


def _parse_fill(item: Any, index: int) -> Fill:
    where = f"fill[{index}]"
    if not isinstance(item, dict):
        raise ExchangeDataError(f"{where}: expected an object, got {type(item).__name__}")
    for key in (
        "coin",
        "px",
        "sz",
        "side",
        "time",
        "startPosition",
        "dir",
        "closedPnl",
        "fee",
        "hash",
        "oid",
    ):
        if key not in item:
            raise ExchangeDataError(f"{where}: missing field {key!r}")

    price = parse_decimal(item["px"], f"{where}.px")
    size = parse_decimal(item["sz"], f"{where}.sz")
    if price <= 0:
        raise ExchangeDataError(f"{where}.px: expected a positive price, got {item['px']!r:.60}")
    if size <= 0:
        raise ExchangeDataError(f"{where}.sz: expected a positive size, got {item['sz']!r:.60}")
    side = item["side"]
    if side not in ("B", "A"):
        raise ExchangeDataError(f"{where}.side: expected 'B' or 'A', got {side!r:.60}")
    time_ms = parse_int(item["time"], f"{where}.time")
    if time_ms < 0:
        raise ExchangeDataError(f"{where}.time: negative time {time_ms}")
    direction = item["dir"]
    if not isinstance(direction, str):
        raise ExchangeDataError(f"{where}.dir: expected a string, got {direction!r:.60}")
    tx_hash = item["hash"]
    if not isinstance(tx_hash, str):
        raise ExchangeDataError(f"{where}.hash: expected a string, got {tx_hash!r:.60}")

    tid = _optional(item, "tid")
    if tid is not None:
        tid = parse_int(tid, f"{where}.tid")
    cloid = _optional(item, "cloid")
    if cloid is not None and not isinstance(cloid, str):
        raise ExchangeDataError(f"{where}.cloid: expected a string or null, got {cloid!r:.60}")
    crossed = _optional(item, "crossed")
    if crossed is not None and not isinstance(crossed, bool):
        raise ExchangeDataError(f"{where}.crossed: expected true/false, got {crossed!r:.60}")
    fee_token = _optional(item, "feeToken")
    if fee_token is not None and not isinstance(fee_token, str):
        raise ExchangeDataError(f"{where}.feeToken: expected a string, got {fee_token!r:.60}")
    liquidation = _optional(item, "liquidation")
    if liquidation is not None:
        liquidation = _parse_liquidation(liquidation, f"{where}.liquidation")

    return Fill(
        coin=parse_coin(item["coin"], f"{where}.coin"),
        price=price,
        size=size,
        side=side,
        time_ms=time_ms,
        start_position=parse_decimal(item["startPosition"], f"{where}.startPosition"),
        direction=direction,
        closed_pnl=parse_decimal(item["closedPnl"], f"{where}.closedPnl"),
        fee=parse_decimal(item["fee"], f"{where}.fee"),
        hash=tx_hash,
        oid=parse_int(item["oid"], f"{where}.oid"),
        tid=tid,
        cloid=cloid,
        crossed=crossed,
        fee_token=fee_token,
        liquidation=liquidation,
    )


def parse_fills(raw: object) -> list[Fill]:
    """Validate a userFills / userFillsByTime body (a JSON list) and return its fills in list order.

    All or nothing: one bad element rejects the whole body with ``ExchangeDataError``, so a partial
    list is never taken for the account's full history. Unknown extra fields are ignored.
    """
    if not isinstance(raw, list):
        if isinstance(raw, dict) and "error" in raw:
            raise ExchangeDataError(f"fills: the exchange answered with an error: {raw['error']!r:.80}")
        raise ExchangeDataError(f"fills: expected a list, got {type(raw).__name__}")
    return [_parse_fill(item, index) for index, item in enumerate(raw)]


# --------------------------------------------------------------------------------------------
# Ordering


@dataclass(frozen=True)
class _Step:
    """One change of a coin's position: a single fill, or a self-trade pair (``wash``)."""

    legs: tuple[Fill, ...]
    wash: bool
    order: int  # position of the first leg in the input, for a stable fallback

    @property
    def start(self) -> Decimal:
        return self.legs[0].start_position

    @property
    def end(self) -> Decimal:
        return self.start if self.wash else self.legs[0].end_position


def _is_wash_pair(a: Fill, b: Fill) -> tuple[Fill, Fill] | None:
    """If ``a`` and ``b`` are the two legs of one self-trade, return them in the order they happened."""
    if a.side == b.side or a.hash != b.hash or a.price != b.price or a.size != b.size:
        return None
    if a.crossed is not None and b.crossed is not None and a.crossed == b.crossed:
        return None  # a self-trade has one taker leg and one maker leg
    if a.start_position == b.start_position:  # how the recorded data reports them
        return (a, b)
    if a.end_position == b.start_position:  # in case legs are ever reported one after the other
        return (a, b)
    if b.end_position == a.start_position:
        return (b, a)
    return None


def _steps_of_millisecond(fills: Sequence[tuple[int, Fill]]) -> list[_Step]:
    """Group one coin's fills of one millisecond into steps (pairing self-trade legs)."""
    steps: list[_Step] = []
    open_legs: dict[tuple[str, Decimal, Decimal], list[tuple[int, Fill]]] = {}
    paired: set[int] = set()
    for order, fill in fills:
        key = (fill.hash, fill.price, fill.size)
        candidates = open_legs.setdefault(key, [])
        for n, (other_order, other) in enumerate(candidates):
            legs = _is_wash_pair(other, fill)
            if legs is not None:
                del candidates[n]
                paired.add(other_order)
                paired.add(order)
                steps.append(_Step(legs=legs, wash=True, order=other_order))
                break
        else:
            candidates.append((order, fill))
    for order, fill in fills:
        if order not in paired:
            steps.append(_Step(legs=(fill,), wash=False, order=order))
    steps.sort(key=lambda s: s.order)
    return steps


def _chain(steps: list[_Step], position_before: Decimal | None) -> tuple[list[_Step], Decimal | None]:
    """Order one coin's steps of one millisecond so each starts where the previous one ended.

    Returns the ordered steps and the position after them (None when it cannot be told). Where no
    such order is found the remaining steps keep their input order.
    """
    moves = [s for s in steps if not s.wash]
    if not moves:
        return steps, position_before
    if position_before is not None and any(s.start == position_before for s in moves):
        position = position_before
    else:
        # The first move is one whose start is no other move's end (else keep the input order).
        head = next((s for s in moves if not any(o is not s and o.end == s.start for o in moves)), moves[0])
        position = head.start
    remaining = list(steps)
    ordered: list[_Step] = []
    while remaining:
        washes = [s for s in remaining if s.wash and s.start == position]
        for s in washes:
            remaining.remove(s)
        ordered.extend(washes)
        following = next((s for s in remaining if not s.wash and s.start == position), None)
        if following is None:
            break
        remaining.remove(following)
        ordered.append(following)
        position = following.end
    if any(not s.wash for s in remaining):
        ordered.extend(remaining)
        last_move = [s for s in ordered if not s.wash][-1]
        return ordered, last_move.end
    ordered.extend(remaining)
    return ordered, position


def _ordered_steps(fills: Iterable[Fill]) -> list[_Step]:
    """Dedupe and put in chronological order, as steps (see ``_Step``)."""
    seen: set[tuple[Any, ...]] = set()
    by_time: dict[int, dict[str, list[tuple[int, Fill]]]] = {}
    for fill in fills:
        if not isinstance(fill, Fill):
            raise TypeError(f"expected a Fill, got {type(fill).__name__}")
        identity = fill.identity
        if identity in seen:
            continue
        seen.add(identity)
        by_time.setdefault(fill.time_ms, {}).setdefault(fill.coin, []).append((len(seen), fill))
    position: dict[str, Decimal | None] = {}
    out: list[_Step] = []
    for time_ms in sorted(by_time):
        for coin, coin_fills in by_time[time_ms].items():
            ordered, after = _chain(_steps_of_millisecond(coin_fills), position.get(coin))
            position[coin] = after
            out.extend(ordered)
    return out


def dedupe_fills(fills: Iterable[Fill]) -> list[Fill]:
    """Drop repeated fills (by ``Fill.identity``) and return the rest oldest first.

    Equal times are ordered so that each fill's ``start_position`` follows on from the previous
    fill's ``end_position`` of the same coin (the two legs of a self-trade stay together); where the
    fills do not chain, the input order is kept. The input may be newest first or oldest first.
    """
    return [leg for step in _ordered_steps(fills) for leg in step.legs]


def flat_points(fills: Iterable[Fill], coin: str) -> list[Fill]:
    """The fills after which ``coin``'s position is exactly zero, oldest first.

    A self-trade leg that only appears to reach zero (its other leg puts the position back) is not
    a flat point.
    """
    return [
        step.legs[0]
        for step in _ordered_steps(f for f in fills if f.coin == coin)
        if not step.wash and step.end == 0
    ]


# --------------------------------------------------------------------------------------------
# Close figures


def is_liquidation_of(fill: Fill, account: str) -> bool:
    """Whether this fill is part of a liquidation of ``account`` (not of a counterparty).

    ``liquidation.liquidatedUser`` decides when the exchange gives it (case-insensitive compare);
    without it, a ``dir`` starting with "Liquidated" on the account's own fill does.
    """
    liquidation = fill.liquidation
    if liquidation is not None and liquidation.liquidated_user is not None:
        return liquidation.liquidated_user.strip().lower() == account.strip().lower()
    return fill.direction.startswith("Liquidated")


@dataclass(frozen=True)
class CloseFigures:
    """How one position moved in a time window, up to and including the fill that closed it."""

    exit_price: Decimal | None  # size-weighted average price of the reducing part of the fills
    closed_size: Decimal  # total size by which the position was reduced
    realized_pnl: Decimal  # sum of closedPnl (gross of fees) of the position's fills
    fees: Decimal  # sum of fees of the position's fills, opening and closing (flip fills pro rata)
    closed_at_ms: int | None  # time of the fill that took the position to zero or through it
    flat: bool  # the position reached zero or flipped within the window
    liquidated: bool  # a reducing fill was a liquidation of this account
    fill_count: int  # fills counted for the position
    last_fill_ms: int | None  # time of the last of those


def close_figures(
    fills: Iterable[Fill],
    *,
    coin: str,
    side: Literal["long", "short"],
    since_ms: int,
    until_ms: int | None = None,
    account: str,
) -> CloseFigures:
    """Exit price, realized PnL, fees and close time of the ``side`` position in ``coin``.

    Looks at the fills of ``coin`` with ``since_ms <= time_ms`` (and ``<= until_ms``), deduped and
    oldest first, and follows the position through them:

    * fills before the position of ``side`` exists (starting flat or on the other side, and not
      taking the position to ``side``) belong to an older position and are skipped;
    * a fill that opens or adds to the position counts its fee (a flip fill that opens it: only the
      opened part's share of the fee, and not its closedPnl, which is the old position's);
    * a fill that reduces it (``start_position`` on ``side``, trading the other way) reduces by
      ``min(sz, |start_position|)`` at its price and counts its closedPnl and fee (a flip: the
      closed part's share of the fee);
    * a self-trade pair counts its closedPnl and fees but is no exit volume and never a close;
    * the first fill after which the position is zero or on the other side is the close: it is the
      last fill counted.

    Raises ``ExchangeDataError`` if, once the position is seen open, a later fill starts from a flat
    or opposite position (fills are missing, so the figures would be wrong).
    """
    if side not in ("long", "short"):
        raise ValueError(f"side must be 'long' or 'short', got {side!r}")
    sign = 1 if side == "long" else -1
    window = (
        f
        for f in fills
        if f.coin == coin and f.time_ms >= since_ms and (until_ms is None or f.time_ms <= until_ms)
    )

    exit_value = _ZERO  # sum of price * reduced size
    closed_size = _ZERO
    realized = _ZERO
    fees = _ZERO
    count = 0
    last_ms: int | None = None
    liquidated = False
    closed_at: int | None = None
    started = False

    for step in _ordered_steps(window):
        held = step.start * sign  # > 0: a position of `side` is open before this step
        if held <= 0 and started:
            raise ExchangeDataError(
                f"{coin}: fill at {step.legs[0].time_ms} starts from position {step.start} "
                f"while the {side} position was open; fills are missing"
            )
        if step.wash:
            if held <= 0:
                continue
            started = True
            for leg in step.legs:
                realized = _EXACT.add(realized, leg.closed_pnl)
                fees = _EXACT.add(fees, leg.fee)
                count += 1
                last_ms = leg.time_ms
            continue

        fill = step.legs[0]
        after = fill.end_position * sign
        if held <= 0:
            if after <= 0:
                continue  # an older position, or one on the other side
            started = True
            share = fill.fee if held == 0 else _DIVIDE.divide(_EXACT.multiply(fill.fee, after), fill.size)
            fees = _EXACT.add(fees, share)
            count += 1
            last_ms = fill.time_ms
            continue

        started = True
        count += 1
        last_ms = fill.time_ms
        if after > held:  # adds to the position
            fees = _EXACT.add(fees, fill.fee)
            continue
        reduced = min(fill.size, held)
        exit_value = _EXACT.add(exit_value, _EXACT.multiply(fill.price, reduced))
        closed_size = _EXACT.add(closed_size, reduced)
        realized = _EXACT.add(realized, fill.closed_pnl)
        if reduced == fill.size:
            fees = _EXACT.add(fees, fill.fee)
        else:
            fees = _EXACT.add(fees, _DIVIDE.divide(_EXACT.multiply(fill.fee, reduced), fill.size))
        if is_liquidation_of(fill, account):
            liquidated = True
        if after <= 0:
            closed_at = fill.time_ms
            break

    return CloseFigures(
        exit_price=_DIVIDE.divide(exit_value, closed_size) if closed_size > 0 else None,
        closed_size=closed_size,
        realized_pnl=realized,
        fees=fees,
        closed_at_ms=closed_at,
        flat=closed_at is not None,
        liquidated=liquidated,
        fill_count=count,
        last_fill_ms=last_ms,
    )


def row_close_figures(
    fills: Iterable[Fill],
    *,
    coin: str,
    side: Literal["long", "short"],
    opened_ms: int,
    account: str,
    lookback_ms: int = 1000,
) -> CloseFigures:
    """``close_figures`` for one database row opened (or first seen) at ``opened_ms``.

    The window starts ``lookback_ms`` before the row's open: a second for clock differences, more for a
    row adopted from a snapshot, which may describe a position that had already closed when the row was
    written. A step in that lead-in that left the position off ``side`` (flat, or on the other side)
    and was followed by a fill re-opening ``side`` ended an older position: its close belongs to the
    older row, so the window starts after it (otherwise a position closed and re-opened moments apart
    would hand its close, and its P&L, to the new row). A flat step that nothing re-opened is this
    row's own close.
    """
    steps = _ordered_steps(f for f in fills if f.coin == coin)
    horizon = opened_ms + lookback_ms
    on_side = (lambda p: p > 0) if side == "long" else (lambda p: p < 0)
    cut = 0
    for index, step in enumerate(steps):
        if step.legs[0].time_ms > opened_ms:
            break
        if step.wash or on_side(step.end):
            continue
        reopened = any(not later.wash and on_side(later.end) and not on_side(later.start)
                       and later.legs[0].time_ms <= horizon for later in steps[index + 1:])
        if reopened:
            cut = index + 1
    window = [leg for step in steps[cut:] for leg in step.legs]
    return close_figures(window, coin=coin, side=side, since_ms=opened_ms - lookback_ms, account=account)
