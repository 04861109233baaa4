"""Fills: parse them, put them in order, and work out how a position was closed. No I/O here.

Everything is ``Decimal``; nothing here turns a price, size, PnL or fee into a float.

Two facts about the exchange's fill lists that the code below relies on (both seen in a recorded
mainnet ``userFills`` answer, 500 fills of one account):

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
from typing import Any, Literal, Mapping

from monitor.models import (
    ExchangeDataError,
    Fill,
    FundingPayment,
    Liquidation,
    parse_coin,
    parse_decimal,
    parse_int,
)

__all__ = [
    "CloseFigures",
    "Cycle",
    "RowCycles",
    "close_figures",
    "dedupe_fills",
    "flat_points",
    "funding_between",
    "is_liquidation_of",
    "parse_fills",
    "parse_funding",
    "row_cycles",
    "segment_cycles",
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


def _parse_funding(item: Any, index: int) -> FundingPayment:
    where = f"funding[{index}]"
    if not isinstance(item, dict):
        raise ExchangeDataError(f"{where}: expected an object, got {type(item).__name__}")
    delta = item.get("delta")
    if not isinstance(delta, dict):
        raise ExchangeDataError(f"{where}.delta: expected an object, got {delta!r:.60}")
    for key in ("coin", "usdc"):
        if key not in delta:
            raise ExchangeDataError(f"{where}.delta: missing field {key!r}")
    if "time" not in item:
        raise ExchangeDataError(f"{where}: missing field 'time'")
    kind = delta.get("type", "funding")
    if kind != "funding":
        raise ExchangeDataError(f"{where}.delta.type: expected 'funding', got {kind!r:.60}")
    tx_hash = item.get("hash", "")
    if not isinstance(tx_hash, str):
        raise ExchangeDataError(f"{where}.hash: expected a string, got {tx_hash!r:.60}")
    szi = delta.get("szi")
    rate = delta.get("fundingRate")
    return FundingPayment(
        coin=parse_coin(delta["coin"], f"{where}.delta.coin"),
        time_ms=parse_int(item["time"], f"{where}.time"),
        usdc=parse_decimal(delta["usdc"], f"{where}.delta.usdc"),
        szi=None if szi is None else parse_decimal(szi, f"{where}.delta.szi"),
        rate=None if rate is None else parse_decimal(rate, f"{where}.delta.fundingRate"),
        hash=tx_hash,
    )


def parse_funding(raw: object) -> list[FundingPayment]:
    """Validate a ``userFunding`` body (a JSON list) and return its payments in list order.

    All or nothing, like ``parse_fills``: one bad element rejects the whole body (a partial list would
    be a wrong sum, never "less funding"). ``usdc`` keeps the exchange's sign: + received, - paid.
    """
    if not isinstance(raw, list):
        if isinstance(raw, dict) and "error" in raw:
            raise ExchangeDataError(f"funding: the exchange answered with an error: {raw['error']!r:.80}")
        raise ExchangeDataError(f"funding: expected a list, got {type(raw).__name__}")
    return [_parse_funding(item, index) for index, item in enumerate(raw)]


def funding_between(payments: Iterable[FundingPayment], coin: str, after_ms: int, until_ms: int) -> Decimal:
    """The sum of ``coin``'s funding payments with ``after_ms < time <= until_ms`` (repeats counted once).

    A payment at the very millisecond a position opened was computed on the position before it (none, or
    the previous cycle's); one at the millisecond it closed belongs to it.
    """
    seen: set[tuple[Any, ...]] = set()
    total = _ZERO
    for payment in payments:
        if payment.coin != coin or not after_ms < payment.time_ms <= until_ms or payment.identity in seen:
            continue
        seen.add(payment.identity)
        total = _EXACT.add(total, payment.usdc)
    return total


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


def _chain_end(moves: list[_Step], start: Decimal) -> Decimal | None:
    """Where the position ends when ``moves`` are chained from ``start`` (None: they do not all chain)."""
    remaining, position = list(moves), start
    while remaining:
        following = next((s for s in remaining if s.start == position), None)
        if following is None:
            return None
        remaining.remove(following)
        position = following.end
    return position


def _chain(steps: list[_Step], position_before: Decimal | None,
           next_starts: frozenset[Decimal] = frozenset()) -> tuple[list[_Step], Decimal | None]:
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
        head = next((s for s in moves if not any(o is not s and o.end == s.start for o in moves)), None)
        if head is None:
            # Every start is another move's end (a close and a re-open in one millisecond, with nothing known
            # before it): any move could be first. The next millisecond's fills say where this one ended.
            head = next((s for s in moves if _chain_end(moves, s.start) in next_starts), moves[0])
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


def _ordered_steps(fills: Iterable[Fill], end_positions: Mapping[str, Decimal] | None = None) -> list[_Step]:
    """Dedupe and put in chronological order, as steps (see ``_Step``). ``end_positions``: where each coin's
    position is now (a snapshot read before the fills), the tie-break for an ambiguous last millisecond as the
    next millisecond's starts are for the others."""
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
    times = sorted(by_time)
    steps = {(t, coin): _steps_of_millisecond(coin_fills) for t in times for coin, coin_fills in by_time[t].items()}
    following: dict[tuple[int, str], frozenset[Decimal]] = {}  # the starts of a coin's next millisecond's moves
    after_it = {coin: frozenset({end}) for coin, end in (end_positions or {}).items()}
    for t in reversed(times):
        for coin in by_time[t]:
            following[(t, coin)] = after_it.get(coin, frozenset())
            after_it[coin] = frozenset(s.start for s in steps[(t, coin)] if not s.wash)
    for time_ms in times:
        for coin in by_time[time_ms]:
            ordered, after = _chain(steps[(time_ms, coin)], position.get(coin), following[(time_ms, coin)])
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


# A position the fills do not show at all: nothing reduced, nothing paid.
_NO_FIGURES = CloseFigures(exit_price=None, closed_size=_ZERO, realized_pnl=_ZERO, fees=_ZERO, closed_at_ms=None,
                           flat=False, liquidated=False, fill_count=0, last_fill_ms=None)


# --------------------------------------------------------------------------------------------
# Cycles: the one model of positions


@dataclass(frozen=True)
class Cycle:
    """One position of one coin as the exchange's fills tell it: from the fill that took the position off
    zero to the fill that took it back to zero or through zero (a flip fill ends one cycle and starts the
    next). Every figure the monitor writes for a row comes from exactly one cycle.
    """

    coin: str
    side: Literal["long", "short"]
    start_ms: int  # time of its opening fill (of the first fill seen, when ``start_known`` is False)
    start_known: bool  # the fill that took the position off zero is among the fills
    opened_by_flip: bool  # it started with a fill that crossed zero
    end_ms: int | None  # time of the fill that took it to zero or through it; None while it is open
    flipped: bool  # it ended with a fill that crossed zero (a new cycle on the other side began)
    broken: bool  # a later fill did not start where it left off: fills are missing, its end is unknown
    gap: bool  # fills are missing inside it (a fill started from another size on the same side)
    exit_price: Decimal | None
    closed_size: Decimal
    realized_pnl: Decimal
    fees: Decimal
    liquidated: bool
    fill_count: int
    last_fill_ms: int | None
    size: Decimal  # |position| after its last fill (0 once it ended)
    cloids: frozenset[str]  # client order ids of the fills that reduced it (lowercase)
    end_cloid: str | None = None  # client order id of the fill that ended it (lowercase)
    oids: frozenset[int] = frozenset()  # order ids of the fills that reduced it (HIP-3 closes carry no cloid)
    end_oid: int | None = None  # order id of the fill that ended it
    end_liquidation: bool = False  # the fill that ended it was a liquidation of this account
    end_direction: str | None = None  # ``dir`` of the fill that ended it ("Auto-Deleveraging", "Settlement", ...)

    @property
    def ended(self) -> bool:
        return self.end_ms is not None

    @property
    def complete(self) -> bool:
        """Its figures add up: no fill is missing inside it and, if open, none after it."""
        return not self.broken and not self.gap

    def figures(self) -> CloseFigures:
        return CloseFigures(
            exit_price=self.exit_price, closed_size=self.closed_size, realized_pnl=self.realized_pnl,
            fees=self.fees, closed_at_ms=self.end_ms, flat=self.ended, liquidated=self.liquidated,
            fill_count=self.fill_count, last_fill_ms=self.last_fill_ms)


class _CycleBuilder:
    def __init__(self, coin: str, side: Literal["long", "short"], time_ms: int, *, start_known: bool,
                 by_flip: bool = False) -> None:
        self.coin, self.side, self.start_ms = coin, side, time_ms
        self.start_known, self.by_flip = start_known, by_flip
        self.exit_value = _ZERO
        self.closed_size = _ZERO
        self.realized = _ZERO
        self.fees = _ZERO
        self.liquidated = False
        self.count = 0
        self.last_ms: int | None = None
        self.gap = False
        self.size = _ZERO
        self.cloids: set[str] = set()
        self.last_cloid: str | None = None
        self.oids: set[int] = set()
        self.last_oid: int | None = None
        self.last_liquidation = False
        self.last_direction: str | None = None

    def count_fill(self, fill: Fill, fee: Decimal) -> None:
        self.fees = _EXACT.add(self.fees, fee)
        self.count += 1
        self.last_ms = fill.time_ms

    def reduce(self, fill: Fill, reduced: Decimal, account: str) -> None:
        self.exit_value = _EXACT.add(self.exit_value, _EXACT.multiply(fill.price, reduced))
        self.closed_size = _EXACT.add(self.closed_size, reduced)
        self.realized = _EXACT.add(self.realized, fill.closed_pnl)
        fee = fill.fee if reduced == fill.size else _DIVIDE.divide(_EXACT.multiply(fill.fee, reduced), fill.size)
        self.count_fill(fill, fee)
        self.last_liquidation = is_liquidation_of(fill, account)
        if self.last_liquidation:
            self.liquidated = True
        self.last_oid = fill.oid
        self.oids.add(fill.oid)
        self.last_cloid = fill.cloid.lower() if fill.cloid else None
        self.last_direction = fill.direction
        if self.last_cloid:
            self.cloids.add(self.last_cloid)

    def build(self, *, end_ms: int | None = None, flipped: bool = False, broken: bool = False) -> Cycle:
        return Cycle(
            coin=self.coin, side=self.side, start_ms=self.start_ms, start_known=self.start_known,
            opened_by_flip=self.by_flip, end_ms=end_ms, flipped=flipped, broken=broken, gap=self.gap,
            exit_price=_DIVIDE.divide(self.exit_value, self.closed_size) if self.closed_size > 0 else None,
            closed_size=self.closed_size, realized_pnl=self.realized, fees=self.fees, liquidated=self.liquidated,
            fill_count=self.count, last_fill_ms=self.last_ms, size=_ZERO if end_ms is not None else self.size,
            cloids=frozenset(self.cloids), end_cloid=self.last_cloid if end_ms is not None else None,
            oids=frozenset(self.oids), end_oid=self.last_oid if end_ms is not None else None,
            end_liquidation=self.last_liquidation if end_ms is not None else False,
            end_direction=self.last_direction if end_ms is not None else None)


def _side_of(position: Decimal) -> Literal["long", "short"]:
    return "long" if position > 0 else "short"


def segment_cycles(fills: Iterable[Fill], coin: str, *, account: str,
                   end_position: Decimal | None = None) -> list[Cycle]:
    """Split ``coin``'s fills (any order, repeats allowed) into cycles, oldest first.

    * a cycle starts when the position leaves zero and ends when it returns to zero; a fill that crosses
      zero ends one cycle (its closing part, closedPnl and that share of the fee) and starts the next (the
      rest of its size and fee);
    * a self-trade pair changes no position: its closedPnl and fees count for the cycle it falls in, it is
      never exit volume and never a close;
    * fills that start from a position the previous fill did not leave mean fills are missing: on the same
      side the cycle is marked ``gap``; from zero or the other side it is ``broken`` (its end is unknown)
      and what follows is a new cycle;
    * the first fills may start from a position opened before them (``start_known`` False).
    """
    cycles: list[Cycle] = []
    current: _CycleBuilder | None = None
    position: Decimal | None = None
    ends = {coin: end_position} if end_position is not None else None  # (see _ordered_steps)
    for step in _ordered_steps((f for f in fills if f.coin == coin), ends):
        start = step.start
        if position is not None and start != position:
            if current is not None and start != 0 and (start > 0) == (position > 0):
                current.gap = True
            elif current is not None:
                cycles.append(current.build(broken=True))
                current = None
        first = step.legs[0]
        if current is None and start != 0:
            current = _CycleBuilder(coin, _side_of(start), first.time_ms, start_known=False)
        if step.wash:
            if current is not None:
                for leg in step.legs:
                    current.count_fill(leg, leg.fee)
                    current.realized = _EXACT.add(current.realized, leg.closed_pnl)
                current.size = abs(start)
            position = start
            continue
        end = first.end_position
        if start == 0:
            current = _CycleBuilder(coin, _side_of(end), first.time_ms, start_known=True)
            current.count_fill(first, first.fee)
        else:
            assert current is not None
            held = abs(start)
            if end != 0 and (end > 0) == (start > 0) and abs(end) > held:
                current.count_fill(first, first.fee)  # adds to the position
            else:
                current.reduce(first, min(first.size, held), account)
                if end == 0:
                    cycles.append(current.build(end_ms=first.time_ms))
                    current = None
                elif (end > 0) != (start > 0):
                    cycles.append(current.build(end_ms=first.time_ms, flipped=True))
                    current = _CycleBuilder(coin, _side_of(end), first.time_ms, start_known=True, by_flip=True)
                    current.count_fill(first, _DIVIDE.divide(_EXACT.multiply(first.fee, abs(end)), first.size))
        if current is not None:
            current.size = abs(end)
        position = end
    if current is not None:
        cycles.append(current.build())
    return cycles


def close_figures(
    fills: Iterable[Fill],
    *,
    coin: str,
    side: Literal["long", "short"],
    since_ms: int,
    until_ms: int | None = None,
    account: str,
) -> CloseFigures:
    """Exit price, realized PnL, fees and close time of the first ``side`` position in ``coin`` that the
    fills with ``since_ms <= time_ms (<= until_ms)`` show: the first ``side`` cycle of ``segment_cycles``.

    Fills of older positions (flat or on the other side before it) are not counted. Raises
    ``ExchangeDataError`` when fills are missing inside that position, so the figures would be wrong.
    """
    if side not in ("long", "short"):
        raise ValueError(f"side must be 'long' or 'short', got {side!r}")
    window = [f for f in fills
              if f.coin == coin and f.time_ms >= since_ms and (until_ms is None or f.time_ms <= until_ms)]
    for cycle in segment_cycles(window, coin, account=account):
        if cycle.side != side:
            continue
        if cycle.broken:
            raise ExchangeDataError(
                f"{coin}: a fill after {cycle.last_fill_ms} does not start where the {side} position was;"
                " fills are missing")
        return cycle.figures()
    return _NO_FIGURES


@dataclass(frozen=True)
class RowCycles:
    """A row's own cycle among the coin's cycles, and the cycles that came after it."""

    own: Cycle | None  # None: no fill of the row's position in the window (nothing happened to it)
    later: tuple[Cycle, ...]  # positions opened after the row's own one ended (each one a row of its own)

    @property
    def latest(self) -> Cycle | None:
        return self.later[-1] if self.later else self.own


def row_cycles(
    fills: Iterable[Fill],
    *,
    coin: str,
    side: Literal["long", "short"],
    opened_ms: int,
    account: str,
    lookback_ms: int = 1000,
    adopted: bool = False,
    end_position: Decimal | None = None,
) -> RowCycles:
    """Which cycle of ``coin`` is the row's (a row is exactly one cycle), and which came after it.

    The window starts ``lookback_ms`` before the row's open: a second for clock differences, more for a row
    adopted from a snapshot (``adopted``), which may describe a position that had already closed when the
    row was written. The row's cycle is the first ``side`` cycle in the window, except a cycle that ended
    before the row opened and was followed by another ``side`` cycle: that one was an older position (its
    close and P&L belong to an older row). For an adopted row only a re-open up to ``lookback_ms`` after its
    adoption shows that; otherwise a close that preceded the adoption is the row's own (the snapshot was
    stale). Cycles on either side after the row's own one are later positions.
    """
    window_start = opened_ms - lookback_ms
    horizon = opened_ms + lookback_ms
    cycles = [c for c in segment_cycles((f for f in fills if f.time_ms >= window_start), coin, account=account,
                                        end_position=end_position)
              if c.end_ms is None or c.end_ms >= window_start]
    own_index: int | None = None
    for index, cycle in enumerate(cycles):
        if cycle.side != side:
            continue
        if cycle.end_ms is not None and cycle.end_ms <= opened_ms:
            followers = [c for c in cycles[index + 1:] if c.side == side]
            if any((c.start_ms <= horizon) if adopted else True for c in followers):
                continue  # an older position, closed before this row opened
        own_index = index
        break
    if own_index is None:
        return RowCycles(own=None, later=())
    return RowCycles(own=cycles[own_index], later=tuple(cycles[own_index + 1:]))
