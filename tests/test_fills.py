"""Tests for monitor.fills: parsing, ordering and close figures, checked against real recorded fills."""

from __future__ import annotations

import copy
from collections import defaultdict
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlsim import fixtures
from monitor.fills import (
    CloseFigures,
    close_figures,
    dedupe_fills,
    flat_points,
    is_liquidation_of,
    parse_fills,
    segment_cycles,
)
from monitor.models import ExchangeDataError, Fill

ACCOUNT = "0xb7b6f3cea3f66bf525f5d8f965f6dbf6d9b017b2"  # the account the recording is of
OTHER = "0x31ca8395cf837de08b24da3f660e77761dfb974b"
ME = "0x5e9ee1089755c3435139848e47e6635505d5a13a"
ME_CHECKSUMMED = "0x5E9EE1089755C3435139848E47E6635505D5A13A"


def load_raw() -> list[dict[str, Any]]:
    return fixtures.response("userFills.json")


@pytest.fixture(scope="module")
def raw() -> list[dict[str, Any]]:
    return load_raw()


@pytest.fixture(scope="module")
def fills(raw: list[dict[str, Any]]) -> list[Fill]:
    return parse_fills(raw)


def D(text: str) -> Decimal:
    return Decimal(text)


# --------------------------------------------------------------------------------------------
# A small independent model of the recording, written from the raw JSON dicts (not from Fill):
# the recorded list is newest first by time, but within one millisecond it lists fills in the order
# they happened, so (time, list index) sorts it oldest first. A self-trade shows up as two adjacent
# fills with the same hash/px/sz/startPosition and opposite sides ("wash legs").


def chronological(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    indexed = sorted(range(len(raw)), key=lambda i: (raw[i]["time"], i))
    return [raw[i] for i in indexed]


def wash_leg_ids(seq: list[dict[str, Any]]) -> set[int]:
    legs: set[int] = set()
    for a, b in zip(seq, seq[1:]):
        if (
            a["time"] == b["time"]
            and a["hash"] == b["hash"]
            and a["px"] == b["px"]
            and a["sz"] == b["sz"]
            and a["startPosition"] == b["startPosition"]
            and a["side"] != b["side"]
        ):
            legs.add(id(a))
            legs.add(id(b))
    return legs


def after(f: dict[str, Any]) -> Decimal:
    return D(f["startPosition"]) + (D(f["sz"]) if f["side"] == "B" else -D(f["sz"]))


def naive_zero_crossings(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in raw if after(f) == 0]


def expected_for(raw: list[dict[str, Any]], zero: dict[str, Any]) -> dict[str, Any]:
    """Walk one coin's fills back from a zero crossing to where that position was opened."""
    seq = [f for f in chronological(raw) if f["coin"] == zero["coin"]]
    washes = wash_leg_ids(seq)
    end = next(n for n, f in enumerate(seq) if f is zero)
    sign = 1 if D(zero["startPosition"]) > 0 else -1
    side = "long" if sign == 1 else "short"
    # Opening: the last real fill before the zero crossing that did not start on `side`.
    opener = None
    for n in range(end - 1, -1, -1):
        f = seq[n]
        if id(f) not in washes and D(f["startPosition"]) * sign <= 0:
            opener = n
            break
    first = 0 if opener is None else opener
    body = seq[first + (0 if opener is None else 1) : end + 1]
    value = Decimal(0)
    size = Decimal(0)
    pnl = Decimal(0)
    for f in body:
        assert D(f["startPosition"]) * sign > 0  # the position is open on `side` throughout
        pnl += D(f["closedPnl"])  # opening fills carry "0.0"; wash legs carry real closedPnl
        reducing = (f["side"] == "A") if sign == 1 else (f["side"] == "B")
        if reducing and id(f) not in washes:
            part = min(D(f["sz"]), abs(D(f["startPosition"])))
            value += D(f["px"]) * part
            size += part
    return {
        "side": side,
        "since": seq[first]["time"],
        "exit": value / size,
        "size": size,
        "pnl": pnl,
        "count": len(body) + (0 if opener is None else 1),
    }


# --------------------------------------------------------------------------------------------
# Parsing the recording


def test_parse_recorded_fills(fills: list[Fill]) -> None:
    assert len(fills) == 500
    assert fills[0].price == Decimal("1.3189")
    assert fills[0].coin == "SUI" and fills[0].side == "A" and fills[0].time_ms == 1683245884863
    for f in fills:
        for value in (f.price, f.size, f.start_position, f.closed_pnl, f.fee):
            assert type(value) is Decimal
        assert f.tid is None and f.fee_token is None and f.liquidation is None
        assert f.fee == 0
    assert len({f.identity for f in fills}) == 500


def test_recording_has_16_naive_zero_crossings_one_of_them_a_self_trade(raw: list[dict[str, Any]]) -> None:
    zeros = naive_zero_crossings(raw)
    assert len(zeros) == 16
    self_trade = [z for z in zeros if z["time"] == 1683245670463]
    assert len(self_trade) == 1
    (z,) = self_trade
    # The other leg: same hash/px/sz/startPosition, the account's own resting sell.
    partner = [f for f in raw if f["hash"] == z["hash"] and f is not z]
    assert len(partner) == 1
    assert partner[0]["side"] == "A" and partner[0]["startPosition"] == z["startPosition"] == "-1842.2"
    assert partner[0]["sz"] == z["sz"] and partner[0]["px"] == z["px"]


def test_flat_points_are_the_15_real_closes(raw: list[dict[str, Any]], fills: list[Fill]) -> None:
    coins = sorted({f.coin for f in fills})
    points = [p for c in coins for p in flat_points(fills, c)]
    assert len(points) == 15
    real = {(z["coin"], z["time"], z["oid"]) for z in naive_zero_crossings(raw) if z["time"] != 1683245670463}
    assert {(p.coin, p.time_ms, p.oid) for p in points} == real
    assert all(p.end_position == 0 for p in points)
    # Every coin was closed once, in the last minute of the recording.
    assert sorted(p.coin for p in points) == coins
    assert flat_points(fills, "NOPE") == []


def test_each_real_close_matches_an_independent_computation(
    raw: list[dict[str, Any]], fills: list[Fill]
) -> None:
    zeros = [z for z in naive_zero_crossings(raw) if z["time"] != 1683245670463]
    assert len(zeros) == 15
    for z in zeros:
        exp = expected_for(raw, z)
        got = close_figures(
            fills,
            coin=z["coin"],
            side=exp["side"],
            since_ms=exp["since"],
            until_ms=z["time"],
            account=ACCOUNT,
        )
        assert got.flat is True, z["coin"]
        assert got.closed_at_ms == z["time"]
        assert got.last_fill_ms == z["time"]
        assert got.exit_price == exp["exit"], z["coin"]
        assert got.closed_size == exp["size"], z["coin"]
        assert got.realized_pnl == exp["pnl"], z["coin"]
        assert got.fees == 0
        assert got.liquidated is False
        assert got.fill_count == exp["count"], z["coin"]
        # Without an upper bound the answer is the same: the close stops the walk.
        assert (
            close_figures(fills, coin=z["coin"], side=exp["side"], since_ms=exp["since"], account=ACCOUNT)
            == got
        )


# Worked by hand from userFills.json (index in the recorded list, dir, side, startPosition, sz @ px, closedPnl).
HAND_CHECKED = [
    # APE: the long was opened by a flip, #47 "Short > Long" B -37.1 +37.9 @3.7785 (closedPnl -0.011501 is the
    # short's), then #17 "Close Long" A 0.8 -0.8 @3.7727 closedPnl -0.00464. Window from the flip.
    ("APE", "long", 1683245822722, 1683245880034, D("3.7727"), D("0.8"), D("-0.00464"), 2),
    # BNB: long 0.522 held before the recording; #254 Open Long B +0.51 @323.75; closes
    # #208 A 1.032 -0.247 @323.8 (0.022477), #18 A 0.785 -0.544 @323.68 (-0.025024),
    # #19 A 0.241 -0.241 @323.52 (-0.045067). 79.9786 + 176.08192 + 77.96832 = 334.02884 over 1.032.
    ("BNB", "long", 1683245704879, 1683245878612, D("334.02884") / D("1.032"), D("1.032"), D("-0.047614"), 4),
    # DOGE: #53 "Short > Long" B -857 +1827 (opens long 970), #44 Open Long +48372 -> 49342,
    # #6 Close Long A -45986 @0.078255 (-3.21902), #7 A -3356 @0.078216 (-0.2517).
    # 45986*0.078255 = 3598.634430, 3356*0.078216 = 262.492896; sum 3861.127326 over 49342.
    (
        "DOGE",
        "long",
        1683245808535,
        1683245883209,
        D("3861.127326") / D("49342"),
        D("49342"),
        D("-3.47072"),
        4,
    ),
    # ETH: short -12.0879 held before the recording, 11 Close Short fills, the last 7 in one millisecond
    # (1683245874661) chaining -11.7891 -> -11.7203 -> ... -> -0.9962 -> 0. Σ px*sz = 22772.80279 over 12.0879;
    # closedPnl -0.18424 -0.253344 -0.119436 -0.14017 -0.083248 -8.185364 -12.63158 -20.895126 -15.144745
    # -17.99025 -8.925952 = -84.553455.
    (
        "ETH",
        "short",
        1683245563576,
        1683245874661,
        D("22772.80279") / D("12.0879"),
        D("12.0879"),
        D("-84.553455"),
        11,
    ),
    # LTC: #255 "Long > Short" A 1.16 -1.64 opens short -0.48; at 1683245720909 a self-trade: #193 "Short > Long"
    # B -0.48 +1.57 @88.395 (closedPnl 0.0048) with #194 "Open Short" A -0.48 -1.57 @88.395 -- the position
    # stays -0.48, entry reset; #177 Open Short -2.49; #56 Close Short B -2.97 +1.71 @88.384 (-0.009918);
    # #40 Open Short -1.47; #13 B -2.73 +2.03 @88.385 (-0.004466); #14 B -0.7 +0.7 @88.43 (-0.03241).
    # 151.13664 + 179.42155 + 61.901 = 392.45919 over 4.44; pnl 0.0048-0.009918-0.004466-0.03241 = -0.041994.
    ("LTC", "short", 1683245704662, 1683245881682, D("392.45919") / D("4.44"), D("4.44"), D("-0.041994"), 8),
]


@pytest.mark.parametrize("coin,side,since,closed_at,exit_price,size,pnl,count", HAND_CHECKED)
def test_hand_checked_closes(
    fills: list[Fill],
    coin: str,
    side: str,
    since: int,
    closed_at: int,
    exit_price: Decimal,
    size: Decimal,
    pnl: Decimal,
    count: int,
) -> None:
    got = close_figures(fills, coin=coin, side=side, since_ms=since, account=ACCOUNT)  # type: ignore[arg-type]
    assert got == CloseFigures(
        exit_price=exit_price,
        closed_size=size,
        realized_pnl=pnl,
        fees=Decimal(0),
        closed_at_ms=closed_at,
        flat=True,
        liquidated=False,
        fill_count=count,
        last_fill_ms=closed_at,
    )


def test_self_trade_leg_that_reaches_zero_is_not_a_close(fills: list[Fill]) -> None:
    # SUI short at 1683245670463: #362 "Close Short" B -1842.2 +1842.2 (alone it reads as flat) and
    # #363 "Open Short" A -1842.2 -1842.2, same hash: the short is still -1842.2 afterwards.
    got = close_figures(
        fills, coin="SUI", side="short", since_ms=1683245670463, until_ms=1683245670463, account=ACCOUNT
    )
    assert got.flat is False and got.closed_at_ms is None
    assert got.exit_price is None and got.closed_size == 0
    assert got.realized_pnl == D("5.5266")  # the exchange realized it (the entry price was reset)
    assert got.fill_count == 2


def test_flip_in_recording_closes_the_short_and_ignores_the_other_side(fills: list[Fill]) -> None:
    # SUI at 1683245658969 (one millisecond, in order): self-trade at -129.1 (#382 B 92.2, #383 A 92.2),
    # #384 "Short > Long" B -129.1 +148.6 @1.3246 closedPnl -0.009037 (closes the short, opens long 19.5),
    # self-trade at 19.5 (#385 B 1346.2 "Open Long", #386 A 1346.2 "Long > Short" closedPnl 0.000195),
    # #387 "Long > Short" A 19.5 -2202.5 @1.325 closedPnl 0.0 (closes the long).
    short = close_figures(
        fills, coin="SUI", side="short", since_ms=1683245658969, until_ms=1683245658969, account=ACCOUNT
    )
    assert short.flat is True and short.closed_at_ms == 1683245658969
    assert short.exit_price == D("1.3246") and short.closed_size == D("129.1")
    assert short.realized_pnl == D("0.019362") + D("-0.009037")  # the wash's Close Short leg + the flip
    assert short.fill_count == 3
    long = close_figures(
        fills, coin="SUI", side="long", since_ms=1683245658969, until_ms=1683245658969, account=ACCOUNT
    )
    assert long.flat is True and long.closed_at_ms == 1683245658969
    assert long.exit_price == D("1.325") and long.closed_size == D("19.5")
    assert long.realized_pnl == D("0.000195")  # the flip that opened it carries the short's PnL, not counted
    assert long.fill_count == 4  # opening flip, the two wash legs, the closing flip


# --------------------------------------------------------------------------------------------
# Ordering and dedupe


def per_coin_steps(ordered: list[Fill]) -> dict[str, list[tuple[Any, ...]]]:
    """Each coin's sequence of position changes; the two legs of a self-trade as one unordered step.

    Self-trades that follow each other at one position in one millisecond leave no trace of their order,
    so they are compared as a set.
    """
    out: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for coin, steps in _steps(ordered).items():
        for step in steps:
            prev = out[coin][-1] if out[coin] else None
            if step[0] == "wash" and prev is not None and prev[0] == "washes" and prev[1] == step[1]:
                out[coin][-1] = ("washes", prev[1], prev[2] | {step[2]})
            elif step[0] == "wash":
                out[coin].append(("washes", step[1], frozenset({step[2]})))
            else:
                out[coin].append(step)
    return out


def _steps(ordered: list[Fill]) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    n = 0
    while n < len(ordered):
        f = ordered[n]
        nxt = ordered[n + 1] if n + 1 < len(ordered) else None
        if (
            nxt is not None
            and nxt.coin == f.coin
            and nxt.time_ms == f.time_ms
            and nxt.hash == f.hash
            and nxt.price == f.price
            and nxt.size == f.size
            and nxt.start_position == f.start_position
            and nxt.side != f.side
        ):
            out[f.coin].append(("wash", (f.time_ms, f.start_position), frozenset({f.identity, nxt.identity})))
            n += 2
        else:
            out[f.coin].append(("fill", f.identity))
            n += 1
    return out


def test_dedupe_orders_recording_oldest_first_and_chains(fills: list[Fill]) -> None:
    ordered = dedupe_fills(fills)
    assert len(ordered) == 500
    assert [f.time_ms for f in ordered] == sorted(f.time_ms for f in fills)
    assert ordered[0].time_ms == 1683245555699 and ordered[-1].time_ms == 1683245884863
    breaks = []
    position: dict[str, Decimal] = {}
    steps = _steps(ordered)
    assert sum(len(v) for v in steps.values()) == 500 - 83  # 83 self-trades
    by_identity = {f.identity: f for f in fills}
    for coin, seq in steps.items():
        for kind, *_, key in seq:
            legs = [by_identity[k] for k in key] if kind == "wash" else [by_identity[key]]
            start = legs[0].start_position
            if coin in position and position[coin] != start:
                breaks.append((coin, legs[0].time_ms))
            position[coin] = start if kind == "wash" else legs[0].end_position
    # The only break: the oldest fill (#499) is the taker leg of a self-trade whose other leg fell past
    # the 500-fill cut-off.
    assert breaks == [("SUI", 1683245556146)]
    # Within 1683245874661 the ETH fills follow each other (recorded order is kept there).
    eth = [f for f in ordered if f.coin == "ETH" and f.time_ms == 1683245874661]
    assert [f.start_position for f in eth] == [
        D(x) for x in ("-11.7891", "-11.7203", "-9.3199", "-6.7629", "-4.6692", "-3.1127", "-0.9962")
    ]


def test_dedupe_ignores_input_order(fills: list[Fill]) -> None:
    reference = per_coin_steps(dedupe_fills(fills))
    assert per_coin_steps(dedupe_fills(list(reversed(fills)))) == reference
    # Oldest-first by time but with each millisecond reversed (worst case for a "keep input order" sort).
    flipped = sorted(reversed(fills), key=lambda f: f.time_ms)  # noqa: C414 - the reversal is the point (stable sort)
    assert per_coin_steps(dedupe_fills(flipped)) == reference


def test_dedupe_drops_duplicated_page_boundaries(fills: list[Fill]) -> None:
    # userFillsByTime pagination: next startTime = last returned time, inclusive, so the whole boundary
    # millisecond comes back again. Pages here are oldest first, as userFillsByTime returns them.
    oldest_first = dedupe_fills(fills)
    t1 = oldest_first[150].time_ms
    t2 = oldest_first[330].time_ms
    page1 = [f for f in oldest_first if f.time_ms <= t1]
    page2 = [f for f in oldest_first if t1 <= f.time_ms <= t2]
    page3 = [f for f in oldest_first if f.time_ms >= t2]
    combined = page1 + page2 + page3
    assert len(combined) > 500
    assert dedupe_fills(combined) == oldest_first
    # Equal fills parsed twice from JSON are equal values, so they dedupe as well.
    again = parse_fills(load_raw()[:40])
    assert len(dedupe_fills(again + fills)) == 500


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_dedupe_property_any_overlapping_pages_any_order(data: st.DataObject) -> None:
    fills = FILLS_FOR_PROPERTY
    reference = per_coin_steps(dedupe_fills(fills))
    cuts = sorted(data.draw(st.lists(st.integers(0, 499), min_size=1, max_size=5)))
    pages: list[list[Fill]] = []
    start = 0
    for cut in cuts + [499]:
        # Every page repeats the last fill of the previous one (inclusive startTime).
        pages.append(list(fills[max(0, start - 1) : cut + 1]))
        start = cut + 1
    pages = data.draw(st.permutations(pages))
    stream = [f for page in pages for f in page]
    ordered = dedupe_fills(stream)
    assert len(ordered) == 500
    assert per_coin_steps(ordered) == reference


FILLS_FOR_PROPERTY = parse_fills(load_raw())


def test_dedupe_by_tid_when_given() -> None:
    a = fill(time=1, tid=7, hash="0xaa")
    b = fill(time=1, tid=7, hash="0xbb")  # same trade id, another hash: still one fill
    c = fill(time=1, tid=8, hash="0xaa")
    assert dedupe_fills([a, b, c]) == [a, c]


# --------------------------------------------------------------------------------------------
# Synthetic fills


def raw_fill(
    *,
    coin: str = "ETH",
    px: str = "100",
    sz: str = "1",
    side: str = "B",
    time: int = 1_000,
    start: str = "0",
    dir: str = "Open Long",
    pnl: str = "0.0",
    fee: str = "0.0",
    hash: str | None = None,
    oid: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    item = {
        "coin": coin,
        "px": px,
        "sz": sz,
        "side": side,
        "time": time,
        "startPosition": start,
        "dir": dir,
        "closedPnl": pnl,
        "fee": fee,
        "hash": hash if hash is not None else f"0x{time:064x}",
        "oid": oid if oid is not None else time,
        "crossed": True,
    }
    item.update(extra)
    return item


def fill(**kw: Any) -> Fill:
    return parse_fills([raw_fill(**kw)])[0]


def long_life(close_liquidation: dict[str, Any] | None = None, close_dir: str = "Close Long") -> list[Fill]:
    """Long 10 ETH: open 6 + 4, reduce 4 at 110, close 6 at 120 (newest first, like userFills)."""
    extra = {} if close_liquidation is None else {"liquidation": close_liquidation}
    rows = [
        raw_fill(time=1000, side="B", start="0", sz="6", px="100", fee="0.3"),
        raw_fill(time=1100, side="B", start="6", sz="4", px="105", fee="0.2"),
        raw_fill(time=2000, side="A", start="10", sz="4", px="110", dir="Close Long", pnl="20", fee="0.22"),
        raw_fill(
            time=3000, side="A", start="6", sz="6", px="120", dir=close_dir, pnl="90", fee="0.36", **extra
        ),
    ]
    return parse_fills(list(reversed(rows)))


def test_partial_reduction_then_close_totals_both() -> None:
    got = close_figures(long_life(), coin="ETH", side="long", since_ms=0, account=ME)
    assert got == CloseFigures(
        exit_price=(D("110") * 4 + D("120") * 6) / 10,  # 116
        closed_size=D("10"),
        realized_pnl=D("110"),
        fees=D("0.3") + D("0.2") + D("0.22") + D("0.36"),  # opening fees included
        closed_at_ms=3000,
        flat=True,
        liquidated=False,
        fill_count=4,
        last_fill_ms=3000,
    )
    assert got.exit_price == D("116")


def test_not_flat_yet_gives_partial_figures_and_no_close_time() -> None:
    got = close_figures(long_life(), coin="ETH", side="long", since_ms=0, until_ms=2999, account=ME)
    assert got.flat is False and got.closed_at_ms is None
    assert got.exit_price == D("110") and got.closed_size == D("4") and got.realized_pnl == D("20")
    assert got.fees == D("0.72") and got.fill_count == 3 and got.last_fill_ms == 2000
    # Window that starts after the reduction: only the close.
    late = close_figures(long_life(), coin="ETH", side="long", since_ms=2001, account=ME)
    assert late.exit_price == D("120") and late.realized_pnl == D("90") and late.fees == D("0.36")
    assert late.fill_count == 1 and late.closed_at_ms == 3000


def test_no_fills_and_no_reductions() -> None:
    empty = close_figures([], coin="ETH", side="long", since_ms=0, account=ME)
    assert empty == CloseFigures(None, D(0), D(0), D(0), None, False, False, 0, None)
    opened = close_figures(long_life(), coin="ETH", side="long", since_ms=0, until_ms=1500, account=ME)
    assert opened.exit_price is None and opened.closed_size == 0 and opened.fees == D("0.5")
    assert opened.fill_count == 2 and opened.last_fill_ms == 1100 and opened.flat is False
    other_coin = close_figures(long_life(), coin="BTC", side="long", since_ms=0, account=ME)
    assert other_coin.fill_count == 0


def test_flip_fills_count_pro_rata() -> None:
    rows = [
        raw_fill(time=1000, side="B", start="0", sz="2", px="100", fee="0.1"),
        # Long 2 -> short 3 in one fill: closes 2 (closedPnl covers those), opens 3.
        raw_fill(time=2000, side="A", start="2", sz="5", px="110", dir="Long > Short", pnl="20", fee="0.5"),
        raw_fill(time=3000, side="B", start="-3", sz="3", px="90", dir="Close Short", pnl="60", fee="0.27"),
    ]
    fills = parse_fills(rows)
    long = close_figures(fills, coin="ETH", side="long", since_ms=0, account=ME)
    assert long.exit_price == D("110") and long.closed_size == D("2")
    assert long.realized_pnl == D("20")
    assert long.fees == D("0.1") + D("0.5") * 2 / 5  # 0.3
    assert long.closed_at_ms == 2000 and long.flat and long.fill_count == 2
    short = close_figures(fills, coin="ETH", side="short", since_ms=0, account=ME)
    # The opening long fill belongs to an older position; the flip opens the short (3 of 5: fee share 0.3,
    # its closedPnl is the long's).
    assert short.exit_price == D("90") and short.closed_size == D("3")
    assert short.realized_pnl == D("60")
    assert short.fees == D("0.5") * 3 / 5 + D("0.27")  # 0.57
    assert short.closed_at_ms == 3000 and short.fill_count == 2


def test_short_flip_to_long() -> None:
    rows = [
        raw_fill(time=1000, side="A", start="0", sz="4", px="50", dir="Open Short", fee="0.04"),
        raw_fill(time=2000, side="B", start="-4", sz="10", px="40", dir="Short > Long", pnl="40", fee="0.1"),
    ]
    got = close_figures(parse_fills(rows), coin="ETH", side="short", since_ms=0, account=ME)
    assert got.exit_price == D("40") and got.closed_size == D("4") and got.realized_pnl == D("40")
    assert got.fees == D("0.04") + D("0.04") and got.closed_at_ms == 2000


def test_older_opposite_position_is_ignored_and_only_first_close_counts() -> None:
    rows = [
        # an older short, closed
        raw_fill(time=1000, side="B", start="-5", sz="5", px="99", dir="Close Short", pnl="5", fee="1"),
        # the long we care about
        raw_fill(time=2000, side="B", start="0", sz="3", px="100", fee="0.03"),
        raw_fill(time=3000, side="A", start="3", sz="3", px="103", dir="Close Long", pnl="9", fee="0.03"),
        # a later long in the same coin: not this position
        raw_fill(time=4000, side="B", start="0", sz="1", px="104", fee="0.01"),
        raw_fill(time=5000, side="A", start="1", sz="1", px="200", dir="Close Long", pnl="96", fee="0.01"),
    ]
    got = close_figures(parse_fills(rows), coin="ETH", side="long", since_ms=0, account=ME)
    assert got.exit_price == D("103") and got.realized_pnl == D("9") and got.fees == D("0.06")
    assert got.closed_at_ms == 3000 and got.fill_count == 2 and got.last_fill_ms == 3000


def test_same_millisecond_fills_are_ordered_by_position() -> None:
    # Three fills of one order in one millisecond, given in the "wrong" order; the close is the last in chain.
    rows = [
        raw_fill(time=5, side="A", start="1", sz="1", px="98", dir="Close Long", pnl="-2", hash="0x1", oid=9),
        raw_fill(time=5, side="A", start="3", sz="2", px="99", dir="Close Long", pnl="-2", hash="0x1", oid=9),
        raw_fill(time=1, side="B", start="0", sz="3", px="100", hash="0x0", oid=1),
    ]
    fills = parse_fills(rows)
    assert [f.start_position for f in dedupe_fills(fills)] == [D("0"), D("3"), D("1")]
    got = close_figures(fills, coin="ETH", side="long", since_ms=0, account=ME)
    assert got.exit_price == (D("99") * 2 + D("98")) / 3 and got.realized_pnl == D("-4") and got.flat


def test_missing_fills_are_an_error_not_a_quiet_answer() -> None:
    rows = [
        raw_fill(time=1000, side="B", start="0", sz="3", px="100"),
        # the close of the long and the opening of a short are missing: the next fill starts short
        raw_fill(time=3000, side="B", start="-2", sz="2", px="90", dir="Close Short", pnl="2"),
    ]
    with pytest.raises(ExchangeDataError, match="fills are missing"):
        close_figures(parse_fills(rows), coin="ETH", side="long", since_ms=0, account=ME)


def test_bad_side_argument() -> None:
    with pytest.raises(ValueError):
        close_figures([], coin="ETH", side="up", since_ms=0, account=ME)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Liquidation


def test_liquidation_of_this_account() -> None:
    liq = {"liquidatedUser": ME_CHECKSUMMED, "markPx": "99.5", "method": "market"}
    got = close_figures(
        long_life(liq, "Liquidated Cross Long"), coin="ETH", side="long", since_ms=0, account=ME
    )
    assert got.liquidated is True and got.flat is True
    # Address compare is case-insensitive both ways.
    assert close_figures(
        long_life(liq), coin="ETH", side="long", since_ms=0, account=ME_CHECKSUMMED
    ).liquidated


def test_liquidation_of_someone_else() -> None:
    # A counterparty's liquidation filled against us: same object, liquidatedUser is them.
    liq = {"liquidatedUser": OTHER, "markPx": "99.5", "method": "market"}
    assert close_figures(long_life(liq), coin="ETH", side="long", since_ms=0, account=ME).liquidated is False
    # Even with a "Liquidated" dir (the HLP liquidator's backstop fills): liquidatedUser decides.
    got = close_figures(
        long_life(liq, "Liquidated Cross Long"), coin="ETH", side="long", since_ms=0, account=ME
    )
    assert got.liquidated is False


def test_liquidation_without_liquidated_user_falls_back_to_dir() -> None:
    no_user = {"markPx": "99.5", "method": "backstop"}
    assert close_figures(
        long_life(no_user, "Liquidated Isolated Long"), coin="ETH", side="long", since_ms=0, account=ME
    ).liquidated
    assert not close_figures(
        long_life(no_user, "Close Long"), coin="ETH", side="long", since_ms=0, account=ME
    ).liquidated
    assert close_figures(
        long_life(None, "Liquidated Cross Long"), coin="ETH", side="long", since_ms=0, account=ME
    ).liquidated


def test_is_liquidation_of() -> None:
    mine = fill(
        side="A",
        start="1",
        dir="Close Long",
        liquidation={"liquidatedUser": ME, "markPx": "1", "method": "market"},
    )
    theirs = fill(side="A", start="1", dir="Close Long", liquidation={"liquidatedUser": OTHER})
    assert is_liquidation_of(mine, ME) and is_liquidation_of(mine, ME_CHECKSUMMED)
    assert not is_liquidation_of(theirs, ME) and is_liquidation_of(theirs, OTHER.upper().replace("0X", "0x"))
    assert not is_liquidation_of(fill(side="A", start="1", dir="Close Long"), ME)


def test_liquidation_on_an_opening_fill_does_not_mark_the_close() -> None:
    rows = [
        raw_fill(time=1000, side="B", start="0", sz="1", liquidation={"liquidatedUser": ME}),
        raw_fill(time=2000, side="A", start="1", sz="1", dir="Close Long", pnl="1"),
    ]
    assert (
        close_figures(parse_fills(rows), coin="ETH", side="long", since_ms=0, account=ME).liquidated is False
    )


# --------------------------------------------------------------------------------------------
# parse_fills validation


def good() -> dict[str, Any]:
    return copy.deepcopy(load_raw()[0])


def with_change(**changes: Any) -> list[dict[str, Any]]:
    item = good()
    item.update(changes)
    return [good(), item]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"response": []}, id="dict"),
        pytest.param({"error": "rate limited"}, id="error-object"),
        pytest.param(None, id="null"),
        pytest.param("[]", id="string"),
        pytest.param([good(), "fill"], id="element-not-object"),
        pytest.param([good(), None], id="element-null"),
        pytest.param(with_change(px=1.5), id="px-float"),
        pytest.param(with_change(px="1e5"), id="px-exponent"),
        pytest.param(with_change(px="NaN"), id="px-nan"),
        pytest.param(with_change(px="Infinity"), id="px-inf"),
        pytest.param(with_change(px="0"), id="px-zero"),
        pytest.param(with_change(sz="-1"), id="sz-negative"),
        pytest.param(with_change(sz=True), id="sz-bool"),
        pytest.param(with_change(fee=0.0), id="fee-float"),
        pytest.param(with_change(closedPnl=None), id="closedPnl-null"),
        pytest.param(with_change(startPosition="1,5"), id="startPosition-comma"),
        pytest.param(with_change(side="X"), id="side-X"),
        pytest.param(with_change(side="b"), id="side-lowercase"),
        pytest.param(with_change(time="123"), id="time-string"),
        pytest.param(with_change(time=1.5), id="time-float"),
        pytest.param(with_change(oid="5"), id="oid-string"),
        pytest.param(with_change(dir=None), id="dir-null"),
        pytest.param(with_change(hash=5), id="hash-int"),
        pytest.param(with_change(coin=""), id="coin-empty"),
        pytest.param(with_change(tid="5"), id="tid-string"),
        pytest.param(with_change(cloid=5), id="cloid-int"),
        pytest.param(with_change(crossed="true"), id="crossed-string"),
        pytest.param(with_change(feeToken=1), id="feeToken-int"),
        pytest.param(with_change(liquidation="yes"), id="liquidation-string"),
        pytest.param(with_change(liquidation={"markPx": 1.5}), id="liquidation-markPx-float"),
        pytest.param(with_change(liquidation={"liquidatedUser": 5}), id="liquidation-user-int"),
    ],
)
def test_parse_rejects(body: Any) -> None:
    with pytest.raises(ExchangeDataError):
        parse_fills(body)


@pytest.mark.parametrize(
    "field", ["coin", "px", "sz", "side", "time", "startPosition", "dir", "closedPnl", "fee", "hash", "oid"]
)
def test_parse_rejects_missing_required_field(field: str) -> None:
    item = good()
    del item[field]
    with pytest.raises(ExchangeDataError, match=field):
        parse_fills([good(), item])


def test_parse_rejects_whole_body_for_one_bad_element() -> None:
    body = load_raw()
    body[250] = dict(body[250], px=float(body[250]["px"]))
    with pytest.raises(ExchangeDataError, match=r"fill\[250\]\.px"):
        parse_fills(body)


def test_parse_error_object_message() -> None:
    with pytest.raises(ExchangeDataError, match="error"):
        parse_fills({"error": "bad user"})


def test_parse_accepts_current_shape_with_optional_and_unknown_fields() -> None:
    item = good()
    item.update(
        tid=118906512037719,
        feeToken="USDC",
        cloid="0x00000000000000000000000000000001",
        builderFee="0.01",
        twapId=None,
        somethingNew={"nested": [1, 2]},
        liquidation={"liquidatedUser": ME, "markPx": "1.3188", "method": "market"},
    )
    (f,) = parse_fills([item])
    assert (
        f.tid == 118906512037719 and f.fee_token == "USDC" and f.cloid == "0x00000000000000000000000000000001"
    )
    assert f.liquidation is not None
    assert f.liquidation.liquidated_user == ME and f.liquidation.mark_price == D("1.3188")
    assert f.liquidation.method == "market"
    assert f.identity == ("tid", "SUI", f.time_ms, f.oid, 118906512037719, f.side)
    # Nulls for optional fields mean "not given".
    item.update(tid=None, cloid=None, feeToken=None, crossed=None, liquidation=None)
    (g,) = parse_fills([item])
    assert (
        g.tid is None
        and g.cloid is None
        and g.fee_token is None
        and g.crossed is None
        and g.liquidation is None
    )
    # liquidation with only some keys
    item.update(liquidation={})
    (h,) = parse_fills([item])
    assert (
        h.liquidation is not None
        and h.liquidation.liquidated_user is None
        and h.liquidation.mark_price is None
    )


def test_parse_empty_list_and_integer_amounts() -> None:
    assert parse_fills([]) == []
    (f,) = parse_fills([raw_fill(px=100, sz=2, fee=0, pnl=0, start=0)])  # JSON integers are exact
    assert f.price == D(100) and type(f.price) is Decimal


def test_parse_keeps_negative_fee_and_signed_values() -> None:
    (f,) = parse_fills([raw_fill(fee="-0.0012", start="-3.5", pnl="-1.25", side="A", dir="Open Short")])
    assert f.fee == D("-0.0012") and f.start_position == D("-3.5") and f.closed_pnl == D("-1.25")
    assert f.end_position == D("-4.5")


def test_same_millisecond_round_trip_follows_the_previous_position() -> None:
    # Long 5; then in one millisecond A 2 (5 -> 3) and B 2 (3 -> 5), given newest first. Positions alone
    # form a cycle; the position before the millisecond says where it starts.
    rows = [
        raw_fill(time=7, side="B", start="3", sz="2", px="101", dir="Open Long", hash="0x2", oid=2),
        raw_fill(time=7, side="A", start="5", sz="2", px="102", dir="Close Long", pnl="4", hash="0x3", oid=3),
        raw_fill(time=1, side="B", start="0", sz="5", px="100", hash="0x1", oid=1),
    ]
    ordered = dedupe_fills(parse_fills(rows))
    assert [(f.start_position, f.end_position) for f in ordered] == [(D(0), D(5)), (D(5), D(3)), (D(3), D(5))]


# --------------------------------------------------------------------------------------------
# Cycles: the one model of positions


def test_cycles_split_at_flat_and_at_a_flip_fill_pro_rata() -> None:

    fills = parse_fills([
        raw_fill(time=1000, side="B", start="0", sz="2", px="100", fee="0.2"),
        raw_fill(time=2000, side="A", start="2", sz="2", px="110", dir="Close Long", pnl="20", fee="0.4"),
        raw_fill(time=3000, side="B", start="0", sz="1", px="120", fee="0.1"),
        raw_fill(time=4000, side="A", start="1", sz="4", px="100", dir="Long > Short", pnl="-20", fee="0.8"),
        raw_fill(time=5000, side="B", start="-3", sz="1", px="90", dir="Close Short", pnl="10", fee="0.2"),
    ])
    first, second, third = segment_cycles(reversed(fills), "ETH", account=ME)
    assert (first.side, first.start_ms, first.end_ms, first.flipped) == ("long", 1000, 2000, False)
    assert (first.exit_price, first.realized_pnl, first.fees) == (D("110"), D("20"), D("0.6"))
    assert (second.side, second.start_ms, second.end_ms, second.flipped) == ("long", 3000, 4000, True)
    assert (second.exit_price, second.closed_size, second.realized_pnl) == (D("100"), D("1"), D("-20"))
    assert second.fees == D("0.1") + D("0.2")  # its own opening fee and a quarter of the flip fill's
    assert (third.side, third.start_ms, third.opened_by_flip, third.ended, third.size) == (
        "short", 4000, True, False, D("2"))
    assert third.fees == D("0.6") + D("0.2") and third.realized_pnl == D("10")
    assert all(c.complete and c.start_known for c in (first, second, third))


def test_cycles_same_millisecond_close_and_reopen_are_two_cycles_in_position_order() -> None:
    from monitor.fills import segment_cycles

    fills = parse_fills([  # listed out of order within the millisecond
        raw_fill(time=2000, side="B", start="0", sz="3", px="101", fee="0.3", oid=3),
        raw_fill(time=1000, side="B", start="0", sz="1", px="100", fee="0.1", oid=1),
        raw_fill(time=2000, side="A", start="1", sz="1", px="101", dir="Close Long", pnl="1", fee="0.1", oid=2),
    ])
    first, second = segment_cycles(fills, "ETH", account=ME)
    assert (first.end_ms, first.realized_pnl, first.exit_price) == (2000, D("1"), D("101"))
    assert (second.start_ms, second.size, second.ended) == (2000, D("3"), False)


def test_self_trade_legs_sharing_a_tid_are_two_fills_and_no_close() -> None:
    from monitor.fills import segment_cycles

    legs = parse_fills([
        raw_fill(time=1000, side="B", start="0", sz="2", px="100", fee="0.2", tid=1),
        raw_fill(time=2000, side="A", start="2", sz="2", px="105", dir="Close Long", pnl="10", fee="0.1",
                 hash="0x" + "ee" * 32, oid=21, tid=777, crossed=True),
        raw_fill(time=2000, side="B", start="2", sz="2", px="105", dir="Open Long", fee="0.05",
                 hash="0x" + "ee" * 32, oid=22, tid=777, crossed=False),
    ])
    assert len(dedupe_fills(legs)) == 3  # the shared tid does not merge the two legs
    cycle, = segment_cycles(legs, "ETH", account=ME)
    assert not cycle.ended and cycle.size == D("2")
    assert cycle.realized_pnl == D("10") and cycle.fees == D("0.35") and cycle.closed_size == 0


def test_a_liquidation_ends_its_cycle_as_liquidated_and_the_next_one_is_clean() -> None:
    from monitor.fills import segment_cycles

    fills = parse_fills([
        raw_fill(time=1000, side="B", start="0", sz="1", px="100"),
        raw_fill(time=2000, side="A", start="1", sz="1", px="80", dir="Close Long", pnl="-20",
                 liquidation={"liquidatedUser": ME, "markPx": "80", "method": "market"}),
        raw_fill(time=3000, side="B", start="0", sz="1", px="81"),
    ])
    liquidated, reopened = segment_cycles(fills, "ETH", account=ME)
    assert liquidated.liquidated and liquidated.ended and not reopened.liquidated


def test_cycles_from_overlapping_pages_and_a_start_before_the_window() -> None:
    from monitor.fills import segment_cycles

    raw = [raw_fill(time=1000 + n, side="A", start=str(10 - n), sz="1", px="100", dir="Close Long", pnl="1",
                    fee="0.01") for n in range(10)]
    pages = parse_fills(raw[:6]) + parse_fills(raw[5:])  # the boundary fill comes back on the next page
    cycle, = segment_cycles(pages, "ETH", account=ME)
    assert not cycle.start_known and cycle.ended and cycle.fill_count == 10
    assert cycle.closed_size == D("10") and cycle.realized_pnl == D("10") and cycle.fees == D("0.10")


def test_a_missing_fill_breaks_the_cycle_instead_of_closing_it() -> None:
    from monitor.fills import row_cycles, segment_cycles

    fills = parse_fills([
        raw_fill(time=1000, side="B", start="0", sz="2", px="100"),
        # the fill that reduced 2 -> 0 is missing; a new long starts from flat
        raw_fill(time=3000, side="B", start="0", sz="1", px="120"),
    ])
    broken, new = segment_cycles(fills, "ETH", account=ME)
    assert broken.broken and not broken.ended and not new.broken
    own = row_cycles(fills, coin="ETH", side="long", opened_ms=1000, account=ME).own
    assert own == broken  # the row's cycle cannot be closed from these fills


def test_row_cycles_skip_an_older_cycle_closed_before_the_row_opened() -> None:
    from monitor.fills import row_cycles

    fills = parse_fills([
        raw_fill(time=500, side="B", start="0", sz="1", px="100"),
        raw_fill(time=900, side="A", start="1", sz="1", px="110", dir="Close Long", pnl="10"),
        raw_fill(time=5000, side="B", start="0", sz="2", px="120"),  # the row's own position, filled late
    ])
    platform = row_cycles(fills, coin="ETH", side="long", opened_ms=1200, account=ME, lookback_ms=1000)
    assert platform.own is not None and platform.own.start_ms == 5000 and platform.later == ()
    adopted = row_cycles(fills, coin="ETH", side="long", opened_ms=1200, account=ME, lookback_ms=1000, adopted=True)
    assert adopted.own is not None and adopted.own.end_ms == 900  # a stale snapshot showed the old one
    assert [c.start_ms for c in adopted.later] == [5000]


def test_a_close_and_reopen_in_the_first_millisecond_in_reach_is_ordered_by_the_next_fill():
    """Chaos seed 20266090: the opening fill out of reach, the first fills in reach a close (2.5 -> 0, two parts)
    and a re-open (0 -> 2.5) in one millisecond, then an add (2.5 -> 6). Both orders of that millisecond chain
    (nothing is known before it); given newest first with the millisecond reversed, the re-open was put first
    and its fee counted in the closed cycle. The next millisecond's start (2.5) says the close came first."""
    raw = [raw_fill(time=2_000, side="B", start="2.5", sz="3.5", px="14.45", fee="0.0227"),
           raw_fill(time=1_000, side="B", start="0.0", sz="2.5", px="14.59", fee="0.0164"),
           raw_fill(time=1_000, side="A", start="1.25", sz="1.25", px="14.45", dir="Close Long", fee="0.0081"),
           raw_fill(time=1_000, side="A", start="2.5", sz="1.25", px="14.45", dir="Close Long", fee="0.0081")]
    ordered = dedupe_fills(parse_fills(raw))
    assert [(f.start_position, f.time_ms) for f in ordered] == [
        (D("2.5"), 1_000), (D("1.25"), 1_000), (D("0.0"), 1_000), (D("2.5"), 2_000)]


@pytest.mark.parametrize("reversed_millisecond", [False, True])
def test_a_close_and_reopen_as_the_latest_millisecond_is_ordered_by_the_position_now(reversed_millisecond):
    """The same millisecond as seed 20266090's, but as the last fills (nothing before it in reach, nothing after):
    no next millisecond says where it ended, and the answer's order within it is not documented. The snapshot's
    position (2.5 long, read before the fills) says the close came first; without it the input order decided,
    and the re-open's fee went into the closed cycle while the new position looked flat."""
    close = [raw_fill(time=1_000, side="A", start="2.5", sz="1.25", px="14.45", dir="Close Long", fee="0.0081",
                      pnl="0.1"),
             raw_fill(time=1_000, side="A", start="1.25", sz="1.25", px="14.45", dir="Close Long", fee="0.0081",
                      pnl="0.1")]
    reopen = [raw_fill(time=1_000, side="B", start="0.0", sz="2.5", px="14.59", fee="0.0164")]
    raw = reopen + close if reversed_millisecond else close + reopen
    fills = parse_fills(raw)
    cycles = segment_cycles(fills, "ETH", account=ME, end_position=D("2.5"))
    assert [(c.ended, c.fees) for c in cycles] == [(True, D("0.0162")), (False, D("0.0164"))]
    assert cycles[-1].size == D("2.5")
