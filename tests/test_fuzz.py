"""Fuzzing every parser of exchange payloads, and the configuration, with hypothesis.

The contract under test (monitor/exchange.py, monitor/fills.py, monitor/models.py): a body from the
exchange either parses into a typed value or raises ``ExchangeDataError``; never another exception,
and never a quiet partial answer (a dict without ``assetPositions`` is not an empty account, a list
with one bad element is refused whole). ``interpret_order_response`` never raises: every body is an
``OrderOutcome``. Configuration: any text in any ``MONITOR_*`` variable gives ``Settings`` or a
``ConfigError`` whose message is one line naming the variable.

The product bugs these properties found (untyped open-order fields, odd order answers, 4xx bodies
that are JSON but not objects, NaN slippage, unparseable URLs, ~unknownuser paths, multi-line
key-file errors) were fixed; their regression tests stay below next to the general properties.
"""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from monitor.config import ENVIRONMENT_VARIABLES, Settings, load_settings
from monitor.errors import ConfigError
from monitor.exchange import (
    OpenOrder,
    OrderOutcome,
    ReadFailed,
    interpret_order_response,
    parse_clearinghouse_state,
    parse_mids,
    parse_open_orders,
)
from monitor.fills import CloseFigures, close_figures, parse_fills
from monitor.models import AccountSnapshot, ExchangeDataError, ExchangePosition, Fill, Liquidation

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "0x" + "ab" * 20
PARSER_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Properties whose inputs are whole generated bodies (costlier to draw): fewer examples, same shapes.
BODY_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------
# Strategies

_DECIMAL_TEXT = re.compile(r"^-?[0-9]{1,30}(\.[0-9]{1,30})?$")


def is_wire_decimal(value: Any) -> bool:
    """What models.parse_decimal documents as acceptable: a JSON integer, or plain decimal text."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and bool(_DECIMAL_TEXT.match(value))


def is_coin(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64


def is_plain_coin(value: Any) -> bool:
    """A coin name every parser must accept (no control characters, which a parser may refuse)."""
    return is_coin(value) and not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value)


# Keys the parsers look at, so random objects reach their branches.
INTERESTING_KEYS = [
    "assetPositions", "position", "coin", "szi", "entryPx", "time", "error", "type", "oid", "children",
    "reduceOnly", "isTrigger", "orderType", "cloid", "status", "response", "data", "statuses", "filled",
    "totalSz", "avgPx", "resting", "px", "sz", "side", "startPosition", "dir", "closedPnl", "fee", "hash",
    "tid", "crossed", "feeToken", "liquidation", "liquidatedUser", "markPx", "method", "BTC", "ETH",
]

_digits = "0123456789"
valid_decimal_text = st.builds(
    lambda negative, whole, fraction: ("-" if negative else "") + whole + ("." + fraction if fraction else ""),
    st.booleans(), st.text(_digits, min_size=1, max_size=30), st.text(_digits, max_size=30))
valid_decimal = st.one_of(valid_decimal_text, st.integers(min_value=-(10**40), max_value=10**40))
positive_decimal = st.one_of(
    st.builds(lambda whole, fraction: f"{whole}.{fraction}" if fraction else str(whole),
              st.integers(min_value=1, max_value=10**12), st.text(_digits, max_size=8)),
    st.builds(lambda zeros, digit: "0." + "0" * zeros + str(digit), st.integers(0, 7), st.integers(1, 9)),
    st.integers(min_value=1, max_value=10**30),
)
exponent_text = st.builds(lambda m, e, c: f"{m}{c}{e}", st.integers(-999, 999), st.integers(-400, 400),
                          st.sampled_from(["e", "E", "e+", "E-"]))
odd_number_text = st.sampled_from([
    "", " ", "-", "+1", " 1", "1 ", "1.", ".5", "-.5", "1.2.3", "--1", "0x1f", "1_000", "NaN", "nan", "-NaN",
    "sNaN", "Infinity", "-Infinity", "inf", "1e3", "1E-3", "\u0661\u0662", "\uff11", "9" * 31, "0." + "1" * 31,
    "1,5", "½", "١.٥", "1e", "e1", "0e0", "∞",
])
number_like = st.one_of(
    valid_decimal,
    st.floats(allow_nan=True, allow_infinity=True),
    exponent_text,
    odd_number_text,
    st.booleans(),
    st.none(),
    st.text(max_size=12),
)
bad_number = number_like.filter(lambda v: not is_wire_decimal(v))
_coin_chars = st.characters(blacklist_categories=("Cs", "Cc"))  # real coin names have no control characters
coin_text = st.one_of(st.sampled_from(["BTC", "ETH", "kPEPE", "@107", "x'); DROP TABLE positions;--"]),
                      st.text(_coin_chars, min_size=1, max_size=10), st.text(_coin_chars, min_size=60, max_size=64))
bad_coin = st.one_of(
    st.just(""),
    st.text(min_size=65, max_size=80),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**60), max_value=10**60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    number_like,
)
json_keys = st.one_of(st.sampled_from(INTERESTING_KEYS), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(json_keys, children, max_size=5),
    ),
    max_leaves=24,
)


light_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda children: st.lists(children, max_size=2) | st.dictionaries(st.text(max_size=4), children, max_size=2),
    max_leaves=4,
)


def junk_fields(reserved: set[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Extra, unknown fields (nested junk) that must be ignored."""
    return st.dictionaries(st.text(max_size=8).filter(lambda k: k not in reserved), light_json, max_size=2)


# --------------------------------------------------------------------------------------------------
# clearinghouseState


def check_snapshot(snapshot: Any) -> None:
    assert isinstance(snapshot, AccountSnapshot)
    assert snapshot.address == ADDRESS
    assert snapshot.server_time_ms is None or (type(snapshot.server_time_ms) is int)
    for coin, position in snapshot.positions.items():
        assert isinstance(position, ExchangePosition) and position.coin == coin and is_coin(coin)
        assert position.side in ("long", "short")
        assert isinstance(position.size, Decimal) and position.size.is_finite() and position.size > 0
        assert position.entry_price is None or (isinstance(position.entry_price, Decimal)
                                                and position.entry_price.is_finite())


@PARSER_SETTINGS
@given(body=json_values)
@example(body={})
@example(body={"marginSummary": {"accountValue": "100.0"}, "time": 1})
@example(body={"error": "bad user"})
@example(body={"assetPositions": None})
@example(body={"assetPositions": {"0": {"position": {"coin": "BTC", "szi": "1"}}}})
@example(body={"assetPositions": [{"position": {"coin": "BTC", "szi": "1"}}, 7]})
@example(body=[])
def test_clearinghouse_any_json_is_a_snapshot_or_exchange_data_error(body: Any) -> None:
    try:
        snapshot = parse_clearinghouse_state(body, ADDRESS)
    except ExchangeDataError:
        return
    check_snapshot(snapshot)
    # A body that parsed has the shape we rely on, item by item: never a quiet partial or empty answer.
    assert isinstance(body, dict) and isinstance(body.get("assetPositions"), list)
    listed = 0
    for item in body["assetPositions"]:
        assert isinstance(item, dict) and isinstance(item.get("position"), dict)
        raw = item["position"]
        assert is_coin(raw.get("coin")) and is_wire_decimal(raw.get("szi"))
        assert raw.get("entryPx") is None or is_wire_decimal(raw["entryPx"])
        listed += Decimal(raw["szi"]) != 0
    assert len(snapshot.positions) == listed


@st.composite
def clearinghouse_bodies(draw: Any) -> tuple[dict[str, Any], dict[str, tuple[str, Decimal, Decimal | None]]]:
    """A valid body (with unknown fields and zero-size entries) and the positions it must give."""
    coins = draw(st.lists(coin_text, unique=True, max_size=6))
    items: list[dict[str, Any]] = []
    expected: dict[str, tuple[str, Decimal, Decimal | None]] = {}
    for coin in coins:
        szi = draw(st.one_of(valid_decimal, st.sampled_from(["0", "0.0", "-0", 0])))
        position: dict[str, Any] = {"coin": coin, "szi": szi}
        entry = draw(st.none() | valid_decimal)
        if entry is not None or draw(st.booleans()):
            position["entryPx"] = entry
        position.update(draw(junk_fields({"coin", "szi", "entryPx"})))
        item: dict[str, Any] = {"position": position, "type": "oneWay"}
        item.update(draw(junk_fields({"position"})))
        items.append(item)
        size = Decimal(szi)
        if size != 0:
            expected[coin] = ("long" if size > 0 else "short", abs(size), None if entry is None else Decimal(entry))
    body: dict[str, Any] = {"assetPositions": items}
    body.update(draw(junk_fields({"assetPositions", "time", "error"})))
    server_time = draw(st.none() | st.integers(min_value=0, max_value=2**63))
    if server_time is not None:
        body["time"] = server_time
    return body, expected


@BODY_SETTINGS
@given(case=clearinghouse_bodies())
def test_clearinghouse_valid_bodies_round_trip_exactly(case: Any) -> None:
    body, expected = case
    snapshot = parse_clearinghouse_state(json.loads(json.dumps(body)), ADDRESS)
    check_snapshot(snapshot)
    got = {c: (p.side, p.size, p.entry_price) for c, p in snapshot.positions.items()}
    assert got == expected
    assert snapshot.server_time_ms == body.get("time")


def _corrupt_position(draw: Any, item: dict[str, Any]) -> Any:
    """One way to make an assetPositions element bad."""
    position = dict(item["position"])
    how = draw(st.sampled_from(["not_object", "no_position", "position_not_object", "coin", "no_coin",
                                "szi", "no_szi", "entry"]))
    if how == "not_object":
        return draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=2)))
    if how == "no_position":
        return {k: v for k, v in item.items() if k != "position"}
    if how == "position_not_object":
        return dict(item, position=draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=2))))
    if how == "coin":
        position["coin"] = draw(bad_coin)
    elif how == "no_coin":
        position.pop("coin")
    elif how == "szi":
        position["szi"] = draw(bad_number)
    elif how == "no_szi":
        position.pop("szi")
    else:
        position["entryPx"] = draw(bad_number.filter(lambda v: v is not None))
    return dict(item, position=position)


@BODY_SETTINGS
@given(data=st.data())
def test_clearinghouse_one_bad_element_refuses_the_whole_body(data: Any) -> None:
    body, _ = data.draw(clearinghouse_bodies())
    body["assetPositions"].append({"position": {"coin": "ZZZ-SURE", "szi": "1"}})  # at least one element
    index = data.draw(st.integers(0, len(body["assetPositions"]) - 1))
    body["assetPositions"][index] = _corrupt_position(data.draw, body["assetPositions"][index])
    with pytest.raises(ExchangeDataError):
        parse_clearinghouse_state(body, ADDRESS)


@PARSER_SETTINGS
@given(extra=junk_fields({"assetPositions"}), value=st.one_of(st.none(), json_scalars,
                                                               st.dictionaries(json_keys, json_values, max_size=3)))
@example(extra={}, value=None)
@example(extra={"marginSummary": {"accountValue": "0.0"}, "time": 1}, value=None)
@example(extra={"error": "User does not exist"}, value=None)
def test_clearinghouse_without_an_asset_positions_list_is_never_an_empty_account(extra: Any, value: Any) -> None:
    body = dict(extra)
    if value is not None:
        body["assetPositions"] = value  # present but not a list
    with pytest.raises(ExchangeDataError):
        parse_clearinghouse_state(body, ADDRESS)


@PARSER_SETTINGS
@given(number=st.one_of(st.floats(allow_nan=True, allow_infinity=True), exponent_text), field=st.sampled_from(
    ["szi", "entryPx"]))
def test_clearinghouse_floats_and_exponents_are_refused(number: Any, field: str) -> None:
    body = {"assetPositions": [{"position": {"coin": "BTC", "szi": "1", "entryPx": "30000", field: number}}]}
    with pytest.raises(ExchangeDataError):
        parse_clearinghouse_state(body, ADDRESS)


@PARSER_SETTINGS
@given(bad_time=st.one_of(st.floats(), st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=1)))
def test_clearinghouse_time_must_be_an_integer(bad_time: Any) -> None:
    body = {"assetPositions": [], "time": bad_time}
    with pytest.raises(ExchangeDataError):
        parse_clearinghouse_state(body, ADDRESS)


def test_clearinghouse_a_coin_listed_twice_is_refused() -> None:
    body = {"assetPositions": [{"position": {"coin": "BTC", "szi": "1"}}, {"position": {"coin": "BTC", "szi": "-2"}}]}
    with pytest.raises(ExchangeDataError):
        parse_clearinghouse_state(body, ADDRESS)


# --------------------------------------------------------------------------------------------------
# fills

REQUIRED_FILL_FIELDS = ("coin", "px", "sz", "side", "time", "startPosition", "dir", "closedPnl", "fee", "hash", "oid")


@st.composite
def fill_items(draw: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "coin": draw(coin_text),
        "px": draw(positive_decimal),
        "sz": draw(positive_decimal),
        "side": draw(st.sampled_from(["B", "A"])),
        "time": draw(st.integers(min_value=0, max_value=2**62)),
        "startPosition": draw(valid_decimal),
        "dir": draw(st.text(max_size=20)),
        "closedPnl": draw(valid_decimal),
        "fee": draw(valid_decimal),
        "hash": draw(st.text(max_size=66)),
        "oid": draw(st.integers()),
    }
    optional = {
        "tid": st.none() | st.integers(),
        "cloid": st.none() | st.text(max_size=34),
        "crossed": st.none() | st.booleans(),
        "feeToken": st.none() | st.text(max_size=6),
        "liquidation": st.none() | st.fixed_dictionaries({}, optional={
            "liquidatedUser": st.none() | st.text(max_size=42),
            "markPx": st.none() | valid_decimal,
            "method": st.none() | st.text(max_size=8),
        }),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            item[key] = draw(strategy)
    item.update(draw(junk_fields(set(REQUIRED_FILL_FIELDS) | set(optional))))
    return item


def check_fill(fill: Any, item: dict[str, Any]) -> None:
    assert isinstance(fill, Fill)
    assert fill.coin == item["coin"] and fill.side == item["side"] and fill.time_ms == item["time"]
    for attr, key in (("price", "px"), ("size", "sz"), ("start_position", "startPosition"),
                      ("closed_pnl", "closedPnl"), ("fee", "fee")):
        value = getattr(fill, attr)
        assert isinstance(value, Decimal) and value == Decimal(item[key])
    assert fill.price > 0 and fill.size > 0
    assert fill.hash == item["hash"] and fill.oid == item["oid"] and fill.direction == item["dir"]
    assert fill.tid == item.get("tid") and fill.cloid == item.get("cloid") and fill.crossed == item.get("crossed")
    assert fill.fee_token == item.get("feeToken")
    liquidation = item.get("liquidation")
    if liquidation is None:
        assert fill.liquidation is None
    else:
        assert isinstance(fill.liquidation, Liquidation)
        assert fill.liquidation.liquidated_user == liquidation.get("liquidatedUser")
        mark = liquidation.get("markPx")
        assert fill.liquidation.mark_price == (None if mark is None else Decimal(mark))


@PARSER_SETTINGS
@given(body=json_values)
@example(body={"error": "bad"})
@example(body={})
@example(body=[{}])
def test_fills_any_json_is_a_list_of_fills_or_exchange_data_error(body: Any) -> None:
    try:
        fills = parse_fills(body)
    except ExchangeDataError:
        return
    assert isinstance(body, list) and isinstance(fills, list) and len(fills) == len(body)
    for fill, item in zip(fills, body):
        check_fill(fill, item)


@BODY_SETTINGS
@given(items=st.lists(fill_items(), max_size=5))
def test_fills_valid_bodies_round_trip(items: list[dict[str, Any]]) -> None:
    fills = parse_fills(json.loads(json.dumps(items)))
    assert len(fills) == len(items)
    for fill, item in zip(fills, items):
        check_fill(fill, item)


_BAD_FILL_VALUES: dict[str, Any] = {
    "coin": bad_coin,
    "px": st.one_of(bad_number, st.sampled_from(["0", "-1", "0.0", 0, -5])),
    "sz": st.one_of(bad_number, st.sampled_from(["0", "-1", "0.0", 0, -5])),
    "side": json_scalars.filter(lambda v: v not in ("B", "A")),
    "time": st.one_of(st.floats(), st.text(max_size=4), st.booleans(), st.none(), st.integers(max_value=-1)),
    "startPosition": bad_number,
    "dir": st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.text(), max_size=1)),
    "closedPnl": bad_number,
    "fee": bad_number,
    "hash": st.one_of(st.integers(), st.floats(), st.booleans(), st.none()),
    "oid": st.one_of(st.floats(), st.text(max_size=4), st.booleans(), st.none()),
    "tid": st.one_of(st.floats(), st.text(max_size=4), st.booleans()),
    "cloid": st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.text(), max_size=1)),
    "crossed": st.one_of(st.integers(), st.text(max_size=5), st.floats()),
    "feeToken": st.one_of(st.integers(), st.floats(), st.booleans()),
    "liquidation": st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=1),
                             st.fixed_dictionaries({"markPx": bad_number.filter(lambda v: v is not None)}),
                             st.fixed_dictionaries({"liquidatedUser": st.integers() | st.booleans()}),
                             st.fixed_dictionaries({"method": st.integers() | st.floats()})),
}


@BODY_SETTINGS
@given(data=st.data())
def test_fills_one_bad_element_refuses_the_whole_list(data: Any) -> None:
    items = data.draw(st.lists(fill_items(), min_size=1, max_size=5))
    index = data.draw(st.integers(0, len(items) - 1))
    how = data.draw(st.sampled_from(["not_object", "missing"] + sorted(_BAD_FILL_VALUES)))
    if how == "not_object":
        items[index] = data.draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=2)))
    elif how == "missing":
        items[index].pop(data.draw(st.sampled_from(REQUIRED_FILL_FIELDS)))
    else:
        items[index][how] = data.draw(_BAD_FILL_VALUES[how])
    with pytest.raises(ExchangeDataError):
        parse_fills(items)


@PARSER_SETTINGS
@given(body=st.dictionaries(json_keys, json_values, max_size=4))
def test_fills_an_object_is_never_an_empty_history(body: Any) -> None:
    with pytest.raises(ExchangeDataError):
        parse_fills(body)


@BODY_SETTINGS
@given(items=st.lists(fill_items(), max_size=6), coin=st.sampled_from(["BTC", "ETH"]), side=st.sampled_from(
    ["long", "short"]), since=st.integers(0, 2**62))
def test_close_figures_on_any_parsed_fills_is_figures_or_exchange_data_error(items: Any, coin: str, side: str,
                                                                             since: int) -> None:
    for item in items[: len(items) // 2]:
        item["coin"] = coin  # make some of them count
    fills = parse_fills(items)
    try:
        figures = close_figures(fills, coin=coin, side=side, since_ms=since, account=ADDRESS)
    except ExchangeDataError:
        return
    assert isinstance(figures, CloseFigures)
    assert figures.closed_size >= 0 and figures.fill_count >= 0
    assert figures.flat == (figures.closed_at_ms is not None)


@st.composite
def position_walks(draw: Any) -> list[Decimal]:
    """Successive positions of one coin (the first is 0), each step a fill of non-zero size."""
    steps = draw(st.lists(st.integers(-50, 50).filter(lambda n: n != 0), min_size=1, max_size=10))
    positions = [Decimal(0)]
    for step in steps:
        positions.append(positions[-1] + Decimal(step) / 10)
    return positions


@PARSER_SETTINGS
@given(walk=position_walks(), side=st.sampled_from(["long", "short"]))
def test_close_figures_follow_a_complete_history_exactly(walk: list[Decimal], side: str) -> None:
    """Fills that chain (one per millisecond): flat exactly when the walk closes or flips the position."""
    items = []
    for n, (before, after) in enumerate(zip(walk, walk[1:])):
        delta = after - before
        items.append({"coin": "BTC", "px": "100", "sz": str(abs(delta)), "side": "B" if delta > 0 else "A",
                      "time": 1000 + n, "startPosition": str(before), "dir": "x", "closedPnl": "0", "fee": "0.01",
                      "hash": f"0x{n}", "oid": n, "tid": n})
    figures = close_figures(parse_fills(items), coin="BTC", side=side, since_ms=0, account=ADDRESS)
    sign = 1 if side == "long" else -1
    expected_close = None
    started = False
    for n, (before, after) in enumerate(zip(walk, walk[1:])):
        if before * sign > 0:
            started = True
        if started and after * sign <= 0:
            expected_close = 1000 + n
            break
        if after * sign > 0:
            started = True
    assert figures.closed_at_ms == expected_close
    assert figures.flat == (expected_close is not None)


# --------------------------------------------------------------------------------------------------
# allMids


@PARSER_SETTINGS
@given(body=json_values)
@example(body={"error": "x"})
@example(body={"BTC": 30000.5, "ETH": "1e3", "SOL": "26.5"})
@example(body=[])
def test_mids_any_json_is_prices_or_exchange_data_error(body: Any) -> None:
    try:
        mids = parse_mids(body)
    except ExchangeDataError:
        assert not isinstance(body, dict) or "error" in body
        return
    assert isinstance(body, dict) and "error" not in body
    assert isinstance(mids, dict)
    for coin, price in mids.items():
        assert coin in body and is_coin(coin) and isinstance(price, Decimal) and price == Decimal(body[coin])
    # Every well-formed, positive entry is kept; odd entries and zero or negative prices are skipped.
    for coin, price in body.items():
        if is_plain_coin(coin) and is_wire_decimal(price) and Decimal(price) > 0:
            assert mids[coin] == Decimal(price)
        elif not is_coin(coin) or not is_wire_decimal(price) or Decimal(price) <= 0:
            assert coin not in mids


@PARSER_SETTINGS
@given(good=st.dictionaries(coin_text.filter(lambda c: c != "error"), valid_decimal, max_size=5),
       bad=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda c: c != "error"), bad_number, max_size=3))
def test_mids_odd_entries_do_not_spoil_the_others(good: dict[str, Any], bad: dict[str, Any]) -> None:
    body = {**bad, **good}
    mids = parse_mids(json.loads(json.dumps(body, allow_nan=True)))
    assert mids == {coin: Decimal(price) for coin, price in good.items() if Decimal(price) > 0}


# --------------------------------------------------------------------------------------------------
# frontendOpenOrders


def check_open_orders(orders: Any) -> None:
    assert isinstance(orders, list)
    oids = [o.oid for o in orders]
    assert oids == sorted(set(oids))
    for order in orders:
        assert isinstance(order, OpenOrder) and type(order.oid) is int and is_coin(order.coin)
        assert type(order.reduce_only) is bool and type(order.is_trigger) is bool
        assert type(order.is_position_tpsl) is bool and (order.parent_oid is None or type(order.parent_oid) is int)


def _walk_orders(items: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    stack = list(items)
    while stack:
        item = stack.pop()
        out.append(item)
        children = item.get("children") or []
        if isinstance(children, list):
            stack.extend(children)
    return out


@PARSER_SETTINGS
@given(body=json_values)
@example(body={"error": "x"})
@example(body=[{"coin": "BTC", "oid": 1, "children": [{"coin": "BTC", "oid": "2"}]}])
def test_open_orders_any_json_is_a_list_or_exchange_data_error(body: Any) -> None:
    try:
        orders = parse_open_orders(body)
    except ExchangeDataError:
        return
    check_open_orders(orders)
    assert isinstance(body, list)
    everything = _walk_orders(body)
    assert {o.oid for o in orders} == {item["oid"] for item in everything}


@st.composite
def open_order_items(draw: Any, depth: int = 0) -> dict[str, Any]:
    item: dict[str, Any] = {
        "coin": draw(coin_text),
        "oid": draw(st.integers(min_value=0, max_value=40)),  # small: duplicates (children repeat parents) happen
        "reduceOnly": draw(st.booleans()),
        "isTrigger": draw(st.booleans()),
        "isPositionTpsl": draw(st.booleans()),
        "orderType": draw(st.sampled_from(["Limit", "Stop Market", "Take Profit Market", "Stop Limit"])),
        "cloid": draw(st.none() | st.integers(0, 2**128 - 1).map(lambda n: f"0x{n:032x}")),
        "limitPx": draw(valid_decimal_text), "sz": draw(valid_decimal_text), "side": draw(st.sampled_from("AB")),
        "timestamp": draw(st.integers(0, 2**45)), "triggerCondition": "N/A", "tif": None,
    }
    item.update(draw(junk_fields(set(item) | {"children"})))
    if depth < 1:
        item["children"] = draw(st.lists(open_order_items(depth + 1), max_size=2))
    else:
        item["children"] = []
    return item


@BODY_SETTINGS
@given(items=st.lists(open_order_items(), max_size=4))
def test_open_orders_valid_bodies_flatten_and_dedupe(items: list[dict[str, Any]]) -> None:
    orders = parse_open_orders(json.loads(json.dumps(items)))
    check_open_orders(orders)
    everything = _walk_orders(items)
    assert {o.oid for o in orders} == {item["oid"] for item in everything}
    for order in orders:
        assert any(replace(order, parent_oid=None) == OpenOrder(
                       coin=i["coin"], oid=i["oid"], reduce_only=i["reduceOnly"], is_trigger=i["isTrigger"],
                       order_type=i["orderType"], cloid=i["cloid"], timestamp_ms=i.get("timestamp"),
                       is_position_tpsl=i["isPositionTpsl"])
                   for i in everything if i["oid"] == order.oid)
        # parent_oid: an order some ``children`` list holds names one such parent (children repeat parents)
        parents = {p["oid"] for p in everything for c in p.get("children") or [] if c["oid"] == order.oid
                   and p["oid"] != order.oid}
        assert order.parent_oid in parents if parents else order.parent_oid is None


@BODY_SETTINGS
@given(data=st.data())
def test_open_orders_one_bad_order_anywhere_refuses_the_whole_list(data: Any) -> None:
    items = data.draw(st.lists(open_order_items(), min_size=1, max_size=4))
    everything = _walk_orders(items)
    target = data.draw(st.sampled_from(everything))
    how = data.draw(st.sampled_from(["oid", "no_oid", "coin", "no_coin", "child_not_object"]))
    if how == "oid":
        target["oid"] = data.draw(st.one_of(st.floats(), st.text(max_size=4), st.booleans(), st.none(),
                                            st.lists(st.integers(), max_size=1)))
    elif how == "no_oid":
        target.pop("oid")
    elif how == "coin":
        target["coin"] = data.draw(bad_coin)
    elif how == "no_coin":
        target.pop("coin")
    else:
        target["children"] = list(target.get("children") or []) + [data.draw(json_scalars)]
    with pytest.raises(ExchangeDataError):
        parse_open_orders(items)


@PARSER_SETTINGS
@given(body=st.dictionaries(json_keys, json_values, max_size=4))
def test_open_orders_an_object_is_never_an_empty_order_list(body: Any) -> None:
    with pytest.raises(ExchangeDataError):
        parse_open_orders(body)


_GOOD_ORDER = {"coin": "BTC", "oid": 7, "reduceOnly": False, "isTrigger": False, "orderType": "Limit",
               "cloid": None, "children": []}


@pytest.mark.parametrize("change", [
    pytest.param({"reduceOnly": "false"}, id="reduceOnly-string"),
    pytest.param({"reduceOnly": 1}, id="reduceOnly-int"),
    pytest.param({"isTrigger": "false"}, id="isTrigger-string"),
    pytest.param({"isPositionTpsl": "true"}, id="isPositionTpsl-string"),
    pytest.param({"reduceOnly": None}, id="reduceOnly-null"),
    pytest.param({"orderType": {"limit": 1}}, id="orderType-object"),
    pytest.param({"cloid": 12345}, id="cloid-int"),
    pytest.param({"children": {"coin": "BTC", "oid": 8, "reduceOnly": True}}, id="children-object"),
    pytest.param({"children": "junk"}, id="children-string"),
])
def test_open_orders_fields_of_the_wrong_type_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ExchangeDataError):
        parse_open_orders([dict(_GOOD_ORDER, **change)])


# --------------------------------------------------------------------------------------------------
# interpret_order_response

OUTCOME_KINDS = {"filled", "partial", "no_position", "rejected", "unknown"}


def check_outcome(outcome: Any, requested: Decimal) -> None:
    assert isinstance(outcome, OrderOutcome) and outcome.kind in OUTCOME_KINDS
    assert isinstance(outcome.filled_size, Decimal)
    if outcome.kind == "filled":
        assert outcome.filled_size >= requested and isinstance(outcome.average_price, Decimal)
    elif outcome.kind == "partial":
        assert outcome.filled_size < requested and isinstance(outcome.average_price, Decimal)
    else:
        assert outcome.filled_size == 0 and outcome.error is not None and isinstance(outcome.error, str)


@st.composite
def order_answers(draw: Any) -> Any:
    """Bodies shaped like /exchange order answers, with junk in every slot."""
    status = draw(st.one_of(
        st.fixed_dictionaries({"filled": st.one_of(
            st.fixed_dictionaries({}, optional={"totalSz": number_like, "avgPx": number_like, "oid": json_scalars,
                                                "cloid": json_scalars}),
            json_values)}),
        st.fixed_dictionaries({"error": json_scalars}),
        st.fixed_dictionaries({"resting": json_values}),
        json_values,
    ))
    statuses = draw(st.one_of(st.lists(st.just(status), max_size=2), json_values))
    data = draw(st.one_of(st.fixed_dictionaries({"statuses": st.just(statuses)}), json_values))
    response = draw(st.one_of(st.fixed_dictionaries({"type": st.just("order"), "data": st.just(data)}), json_values))
    return draw(st.one_of(st.fixed_dictionaries({"status": st.sampled_from(["ok", "err", "OK"]),
                                                 "response": st.just(response)}),
                          json_values))


@PARSER_SETTINGS
@given(body=st.one_of(order_answers(), json_values), requested=positive_decimal)
def test_interpret_order_response_any_body_is_an_outcome(body: Any, requested: Any) -> None:
    requested = Decimal(requested)
    check_outcome(interpret_order_response(body, requested), requested)


@pytest.mark.parametrize("body", [
    pytest.param({"status": "ok", "response": {"type": "order", "data": {"statuses": {"0": "x"}}}},
                 id="statuses-object"),
    pytest.param({"status": "ok", "response": {"type": "order", "data": {"statuses": 5}}}, id="statuses-number"),
    pytest.param({"status": "ok", "response": {"type": "order", "data": {"statuses": [{"filled": 5}]}}},
                 id="filled-number"),
    pytest.param({"status": "ok", "response": {"type": "order", "data": {"statuses": [{"filled": None}]}}},
                 id="filled-null"),
])
def test_interpret_order_response_never_raises_on_odd_statuses(body: Any) -> None:
    outcome = interpret_order_response(body, Decimal("1"))
    assert outcome.kind == "unknown"


def test_interpret_order_response_valid_answers() -> None:
    def ok(status: Any) -> dict[str, Any]:
        return {"status": "ok", "response": {"type": "order", "data": {"statuses": [status]}}}

    one = Decimal("1")
    filled = ok({"filled": {"totalSz": "1.0", "avgPx": "30000", "oid": 1}})
    assert interpret_order_response(filled, one).kind == "filled"
    partial = interpret_order_response(ok({"filled": {"totalSz": "0.4", "avgPx": "30000", "oid": 1}}), one)
    assert partial.kind == "partial" and partial.filled_size == Decimal("0.4")
    assert interpret_order_response(ok({"filled": {"totalSz": 1.0, "avgPx": "1"}}), one).kind == "unknown"
    assert interpret_order_response(
        ok({"error": "Reduce only order would increase position. asset=0"}), one).kind == "no_position"
    assert interpret_order_response(ok({"error": "Order has invalid price."}), one).kind == "rejected"
    assert interpret_order_response(ok({"resting": {"oid": 5}}), one).kind == "rejected"
    assert interpret_order_response({"status": "err", "response": "Action already expired"}, one).kind == "rejected"
    assert interpret_order_response(ok("weird"), one).kind == "unknown"
    assert interpret_order_response({"status": "ok", "response": {"data": {"statuses": []}}}, one).kind == "unknown"
    assert interpret_order_response(None, one).kind == "unknown"


def test_a_non_json_order_answer_is_unknown_not_rejected() -> None:
    body = {"error": "Could not parse JSON: <html><body>Bad Gateway</body></html>"}
    assert interpret_order_response(body, Decimal("1")).kind == "unknown"


# --------------------------------------------------------------------------------------------------
# The same bodies over HTTP, through the real SDK and Exchange._post (simulator faults)


@pytest.fixture(scope="module")
def module_sim() -> Any:
    from hlsim import start

    server = start()
    server.open_position(ADDRESS, "BTC", "1", "30000")
    try:
        yield server
    finally:
        server.stop()


http_bodies = st.one_of(
    st.text(max_size=40),
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.sampled_from(['{"code": 1}', '{"code": 1, "msg": "x"}', '{"msg": "x"}', "null", "", "<html>502</html>",
                     '{"error": "x"}', '{"assetPositions": []', '{"assetPositions": []}']),
)


@SMALL_SETTINGS
@given(status=st.sampled_from([200, 400, 401, 403, 404, 418, 422, 429, 500, 502, 503, 504]), text=http_bodies)
def test_any_http_answer_to_a_read_is_a_snapshot_or_read_failed(module_sim: Any, status: int, text: str) -> None:
    from monitor.exchange import Exchange

    if status == 200:
        module_sim.add_fault("malformed", path="info", type="clearinghouseState", body=text)
    else:
        module_sim.add_fault("500", path="info", type="clearinghouseState", status=status, body=text)
    try:
        snapshot = Exchange(module_sim.url, timeout=5).read_positions(ADDRESS)
    except ReadFailed:
        return
    finally:
        module_sim.clear_faults()
    assert status == 200
    check_snapshot(snapshot)


@pytest.mark.parametrize("body", ['"forbidden"', "[1, 2]", "5"])
def test_a_4xx_answer_with_a_non_object_json_body_is_a_failed_read(module_sim: Any, body: str) -> None:
    from monitor.exchange import Exchange

    module_sim.add_fault("500", path="info", type="clearinghouseState", status=403, body=body)
    try:
        with pytest.raises(ReadFailed):
            Exchange(module_sim.url, timeout=5).read_positions(ADDRESS)
    finally:
        module_sim.clear_faults()


# --------------------------------------------------------------------------------------------------
# Configuration

KEY_MESSAGE = "MONITOR_HL_SECRET_KEY: expected a 32-byte hex private key (64 hex digits)"

# Environment values cannot hold NUL (execve) or lone surrogates.
env_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
interesting_env_values = st.sampled_from([
    "0", "0.0", "-0", "-1", "1", "1.5", "300", "301", "86400", "86401", "1e309", "-1e309", "1e-400", "nan", "NaN",
    "inf", "-inf", "Infinity", "0.05", "0.5", "0.4999", "1_0", "0x10", "١٢", "true", "yes", "", " ", "\t", "\n",
    "http://", "https://", "http://x", "https://api.hyperliquid.xyz/", "http://:80", "http://[", "http://[::1]:80",
    "ftp://x", "file:///etc/passwd", "postgresql://", "postgres://u:p@h/d", "mysql://x", "host=/tmp dbname=x",
    "~", "~/x", "~root/x", "/", ".", "..", "/dev/null", "/proc/self/environ", "DEBUG", "Info", "json", "TEXT",
    "local", "postgres", "redis", "0x" + "a" * 64, "a" * 64, "0x" + "g" * 64, "0x" + "a" * 63, "0X" + "a" * 64,
    "~no-such-user-pm/x", "http://[x]/", "https://a\uff03b/", "sNaN", "-nan", "/nonexistent/a\nb", "1/4", "0/0",
])
env_values = st.one_of(
    st.text(env_chars, max_size=40),
    interesting_env_values,
    st.builds(lambda a, b: a + b, interesting_env_values, st.text(env_chars, max_size=8)),
    st.builds(lambda a, b: a + b, st.text(env_chars, max_size=4), interesting_env_values),
)


def check_settings(value: Any) -> None:
    assert isinstance(value, Settings)
    assert isinstance(value.hl_api_url, str) and value.hl_api_url.lower().startswith(("http://", "https://"))
    assert isinstance(value.data_dir, Path)
    assert value.lock_file is None or isinstance(value.lock_file, Path)
    for name in ("lock_stale_after", "close_grace_seconds", "reopen_guard_seconds", "http_timeout"):
        number = getattr(value, name)
        assert isinstance(number, float) and number == number and 0 <= number < float("inf"), name
    assert value.lock_stale_after > 0 and value.http_timeout > 0
    assert isinstance(value.max_close_failures, int) and value.max_close_failures >= 1
    assert isinstance(value.alert_after_runs, int) and value.alert_after_runs >= 1
    assert isinstance(value.close_slippage, Decimal) and Decimal(0) < value.close_slippage < Decimal("0.5")
    assert value.lock_backend in ("local", "postgres") and value.log_format in ("text", "json")
    assert value.log_level in ("debug", "info", "warning", "error")
    assert value.secret_key is None or re.fullmatch(r"0x[0-9a-f]{64}", value.secret_key)
    assert value.secret_key is None or value.secret_key[2:] not in repr(value)
    assert value.perp_dexes is None or all(d and ":" not in d and "," not in d for d in value.perp_dexes)


def check_config_error(error: ConfigError, variable: str, text: str) -> None:
    message = error.message
    assert isinstance(message, str) and message.strip()
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, message
    assert variable in message, message
    if variable == "MONITOR_HL_SECRET_KEY":
        assert message == KEY_MESSAGE  # never echoes the value: it may be a real key with a typo


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(variable=st.sampled_from(sorted(ENVIRONMENT_VARIABLES)), text=env_values)
def test_every_variable_with_any_text_is_settings_or_a_one_line_config_error(variable: str, text: str) -> None:
    try:
        value = load_settings(environ={variable: text})
    except ConfigError as error:
        check_config_error(error, variable, text)
        return
    check_settings(value)


@pytest.mark.parametrize("variable", sorted(ENVIRONMENT_VARIABLES))
def test_the_fuzz_reaches_every_variable(variable: str) -> None:
    """Each variable's parser is really wired: an obviously bad value is refused, naming it."""
    bad = {"MONITOR_DATABASE_URL": "mysql://x", "MONITOR_HL_API_URL": "ftp://x", "MONITOR_DATA_DIR": " ",
           "MONITOR_LOCK_FILE": " ", "MONITOR_LOCK_STALE_AFTER": "soon", "MONITOR_LOCK_BACKEND": "redis",
           "MONITOR_LOG_LEVEL": "loud", "MONITOR_LOG_FORMAT": "xml", "MONITOR_CLOSE_GRACE": "-1",
           "MONITOR_REOPEN_GUARD": "x", "MONITOR_HTTP_TIMEOUT": "301", "MONITOR_MAX_CLOSE_FAILURES": "0",
           "MONITOR_CLOSE_SLIPPAGE": "0.5", "MONITOR_HL_SECRET_KEY": "0x1234", "MONITOR_METRICS_FILE": " ",
           "MONITOR_PING_URL": "x", "MONITOR_ALERT_WEBHOOK": "mailto:a@b", "MONITOR_ALERT_AFTER_RUNS": "-3",
           "MONITOR_HL_SECRET_KEY_FILE": "/nonexistent/key", "MONITOR_WEIGHT_BUDGET": "5",
           "MONITOR_READ_PARALLELISM": "65", "MONITOR_SHARD": "3/2", "MONITOR_PERP_DEXES": "xyz,,flx",
           "MONITOR_HEDGE_EXTERNAL_STALE": "0"}
    if variable == "MONITOR_HOST_ID":
        assert load_settings(environ={variable: "  "}).host_id  # any text is a host id; blank: the hostname
        return
    if variable not in bad:
        pytest.fail(f"{variable}: a new variable: add an obviously bad value for it to this test")
    with pytest.raises(ConfigError) as info:
        # the key file is read only by a command that signs (docs/design.md, "Keys")
        load_settings(environ={variable: bad[variable]}).with_signing_key()
    check_config_error(info.value, variable, bad[variable])


@settings(max_examples=100, deadline=None)
@given(text=st.text(string.hexdigits + "xX \t", max_size=70))
def test_secret_key_text_is_never_echoed(text: str) -> None:
    try:
        value = load_settings(environ={"MONITOR_HL_SECRET_KEY": text})
    except ConfigError as error:
        assert error.message == KEY_MESSAGE
        return
    assert value.secret_key is None or value.secret_key.lower().endswith(text.strip()[-64:].lower())


@pytest.mark.parametrize("text", ["nan", "NaN", "sNaN", "-nan"])
def test_close_slippage_nan_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="MONITOR_CLOSE_SLIPPAGE"):
        load_settings(environ={"MONITOR_CLOSE_SLIPPAGE": text})


@pytest.mark.parametrize("variable, text", [
    ("MONITOR_HL_API_URL", "http://["),
    ("MONITOR_PING_URL", "http://[x]/"),
    ("MONITOR_ALERT_WEBHOOK", "https://a\uff03b/"),
])
def test_unparseable_urls_are_a_config_error(variable: str, text: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ={variable: text})


@pytest.mark.parametrize("variable", ["MONITOR_DATA_DIR", "MONITOR_LOCK_FILE", "MONITOR_METRICS_FILE",
                                      "MONITOR_HL_SECRET_KEY_FILE"])
def test_unknown_home_directory_is_a_config_error(variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(environ={variable: "~no-such-user-pm/x"})


def test_secret_key_file_error_is_one_line_whatever_the_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"MONITOR_HL_SECRET_KEY_FILE": "/nonexistent/a\nb"}).with_signing_key()
    assert len(info.value.message.splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# Configuration through the real CLI


def _cli(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], env=environ, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    environ.update({"MONITOR_DATA_DIR": str(tmp_path / "data"),
                    "MONITOR_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",  # a valid config: exit 69 fast
                    "PYTHONDONTWRITEBYTECODE": "1"})
    return environ


_bad_cli_values = st.one_of(
    st.tuples(st.sampled_from(["MONITOR_LOCK_STALE_AFTER", "MONITOR_HTTP_TIMEOUT", "MONITOR_CLOSE_GRACE",
                               "MONITOR_MAX_CLOSE_FAILURES", "MONITOR_ALERT_AFTER_RUNS"]),
              st.text(string.ascii_letters + " \n\t'\"", min_size=1, max_size=12).filter(lambda t: t.strip())),
    st.tuples(st.sampled_from(["MONITOR_LOG_LEVEL", "MONITOR_LOG_FORMAT", "MONITOR_LOCK_BACKEND"]),
              st.text(string.ascii_letters, min_size=1, max_size=8).filter(
                  lambda t: t.lower() not in {"debug", "info", "warning", "error", "text", "json", "local",
                                              "postgres"})),
    st.tuples(st.just("MONITOR_HL_API_URL"), st.text(string.ascii_letters + ":/.", max_size=12).map(
        lambda t: "ftp://" + t)),
    st.tuples(st.just("MONITOR_HL_SECRET_KEY"), st.text("0123456789abcdef", min_size=8, max_size=63)),
)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_bad_cli_values)
def test_cli_bad_environment_value_is_exit_78_and_one_line(bare_env: dict[str, str], case: tuple[str, str]) -> None:
    variable, value = case
    result = _cli(dict(bare_env, **{variable: value}), "run")
    assert result.returncode == 78, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and variable in lines[0], result.stderr
    assert result.stdout == ""
    if variable == "MONITOR_HL_SECRET_KEY":
        assert value not in result.stderr


def test_cli_bad_flag_is_click_usage_exit_2_without_traceback(bare_env: dict[str, str]) -> None:
    result = _cli(bare_env, "--log-level", "loud", "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = result.stderr.splitlines()  # one line, like every fault (it was click's usage block)
    assert len(errors) == 1 and errors[0].startswith("position-monitor: ") and "--log-level" in errors[0]
    result = _cli(bare_env, "run", "--account", "not-an-address")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "not an address" in result.stderr


def test_cli_nan_slippage_is_exit_78(bare_env: dict[str, str]) -> None:
    result = _cli(dict(bare_env, MONITOR_CLOSE_SLIPPAGE="nan"), "run")
    assert result.returncode == 78 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_coin_name_the_database_cannot_store_is_an_invalid_answer() -> None:
    body = {"assetPositions": [{"position": {"coin": "A\x00B", "szi": "1"}}]}
    with pytest.raises(ExchangeDataError):
        parse_clearinghouse_state(body, ADDRESS)
