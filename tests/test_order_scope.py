"""Issue 12, items 6 and 7: which orders a gone position leaves to cancel (never one that is not reduce-only), and
the 1,000-open-orders rule that refuses reduce-only closes (real CLI, real PostgreSQL, the SDK, the simulator).

Sources: reference §2.6 (frontendOpenOrders fields; the recordings frontendOpenOrders*.json), §5.3 (the rule, from
the docs; its error text is UNCONFIRMED, so it is matched by several fragments, see exchange.OPEN_ORDER_LIMIT_ERRORS).
"""

from __future__ import annotations

import copy
import json
import urllib.request
from decimal import Decimal

import psycopg
import pytest

from monitor.exchange import OpenOrder, is_open_order_limit_error, order_kind, orphaned_orders, parse_open_orders
from monitor.models import ExchangeDataError
from tests.conftest import ALICE, cli, fixture_response, run_json


def order(oid, *, coin="BTC", reduce_only=True, is_trigger=True, position_tpsl=False, ts=1000, parent=None,
          order_type="Stop Market"):
    return OpenOrder(coin=coin, oid=oid, reduce_only=reduce_only, is_trigger=is_trigger, order_type=order_type,
                     cloid=None, timestamp_ms=ts, is_position_tpsl=position_tpsl, parent_oid=parent)


# ---- the decision, pure ------------------------------------------------------------------------------------

def test_only_reduce_only_orders_of_the_coin_placed_by_the_close_are_orphans():
    orders = [
        order(1),  # a fixed-size reduce-only stop: cancelled
        order(2, position_tpsl=True, order_type="Take Profit Market"),  # a position TP: cancelled
        order(3, is_trigger=False, order_type="Limit"),  # a reduce-only limit: cancelled
        order(4, reduce_only=False),  # a stop-entry trigger: it would open a position, never cancelled
        order(5, reduce_only=False, is_trigger=False, order_type="Limit"),  # a resting entry: never
        order(6, reduce_only=False, position_tpsl=True),  # contradictory flags: not reduce-only, so kept
        order(7, coin="ETH"),  # another coin: kept
        order(8, ts=2001),  # placed after the close: a newer position's, kept
    ]
    assert [o.oid for o in orphaned_orders(orders, "BTC", 2000)] == [1, 2, 3]
    assert [o.oid for o in orphaned_orders(orders, "BTC", None)] == [1, 2, 3, 8]
    assert [order_kind(o) for o in orders[:5]] == ["reduce_only_trigger", "position_tpsl", "reduce_only", "trigger",
                                                    "limit"]


def test_tpsl_children_of_a_resting_entry_order_are_kept_as_recorded():
    # The recording: a resting Limit buy (not reduce-only) whose TP and SL children are listed both inside its
    # ``children`` and at the top level. They wait for that entry; they do not belong to a gone position.
    orders = parse_open_orders(fixture_response("frontendOpenOrders.json"))
    by_oid = {o.oid: o for o in orders}
    assert by_oid[3184595906].parent_oid == by_oid[3184595907].parent_oid == 3184595905
    assert by_oid[3184595906].reduce_only and not by_oid[3184595905].reduce_only
    assert orphaned_orders(orders, "INJ", None) == []
    # The same TP/SL once the entry is gone (it filled: the children stand alone) are the position's: cancelled.
    alone = [o for o in fixture_response("frontendOpenOrders.json") if o["oid"] != 3184595905]
    assert [o.oid for o in orphaned_orders(parse_open_orders(alone), "INJ", None)] == [3184595906, 3184595907]


# The one order of the recording frontendOpenOrders_hip3.json (shared fixtures; ccxt/ccxt @ 0117dcb, a resting
# HIP-3 limit order), verbatim.
HIP3_RECORDED = [{"coin": "flx:CRCL", "side": "B", "limitPx": "70.0", "sz": "0.14", "oid": 251733169011,
                  "timestamp": 1764346344235, "triggerCondition": "N/A", "isTrigger": False, "triggerPx": "0.0",
                  "children": [], "isPositionTpsl": False, "reduceOnly": False, "orderType": "Limit",
                  "origSz": "0.14", "tif": "Gtc", "cloid": None}]


def test_the_hip3_recording_parses_and_its_resting_limit_is_never_an_orphan():
    orders = parse_open_orders(HIP3_RECORDED)
    assert [(o.coin, o.reduce_only, o.is_trigger, o.is_position_tpsl) for o in orders] == [
        ("flx:CRCL", False, False, False)]
    assert orphaned_orders(orders, "flx:CRCL", None) == []


def test_an_answer_without_reduce_only_is_a_failed_read_not_no_orders():
    body = copy.deepcopy(fixture_response("frontendOpenOrders.json"))
    del body[0]["reduceOnly"]
    with pytest.raises(ExchangeDataError):
        parse_open_orders(body)


@pytest.mark.parametrize("text, expected", [
    ("Rejected due to exceeding the open order limit. asset=0", True),  # [TS] text of tooManyOpenOrdersRejected
    ("tooManyOpenOrdersRejected", True),  # the order status itself
    ("Too many open orders. asset=3", True),
    ("Order would exceed max open orders", True),
    ("Too many cumulative requests sent (97460 > 97456) for cumulative volume traded $87457.46.", False),
    ("Reduce only order would increase position. asset=0", False),
    ("Insufficient margin to place order. asset=3", False),
    (None, False),
])
def test_the_open_order_limit_rejection_is_recognised_defensively(text, expected):
    assert is_open_order_limit_error(text) is expected


# ---- end to end: orphan scope ------------------------------------------------------------------------------

def setup(env, sim, coin="BTC"):
    sim.open_position(ALICE, coin, "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(env)


def user_orders(sim):
    """Four orders of the user on BTC: two the close leaves behind, two the user's own entries."""
    return {
        "tp": sim.add_trigger_order(ALICE, "BTC", "A", "0.5", "33000", "tp"),  # fixed-size reduce-only TP
        "position_sl": sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl", position_tpsl=True),
        "stop_entry": sim.add_trigger_order(ALICE, "BTC", "B", "1", "31000", "sl", reduce_only=False),
        "limit_buy": sim.add_limit_order(ALICE, "BTC", "B", "1", "25000"),
    }


def open_oids(sim):
    return sorted(o["oid"] for o in sim.orders(ALICE, open_only=True))


def info(sim, body):
    request = urllib.request.Request(sim.url + "/info", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_the_simulator_lists_the_fields_as_the_recording_does(keyed, sim):
    setup(keyed, sim)
    oids = user_orders(sim)
    listed = {o["oid"]: o for o in info(sim, {"type": "frontendOpenOrders", "user": ALICE})}
    recorded = fixture_response("frontendOpenOrders.json")[0]
    for item in listed.values():
        assert set(item) >= set(recorded)
        assert all(type(item[k]) is type(recorded[k]) for k in ("reduceOnly", "isTrigger", "isPositionTpsl"))
    assert listed[oids["position_sl"]]["isPositionTpsl"] is True and listed[oids["tp"]]["isPositionTpsl"] is False
    assert listed[oids["stop_entry"]]["reduceOnly"] is False and listed[oids["stop_entry"]]["isTrigger"] is True
    assert listed[oids["stop_entry"]]["orderType"] == "Stop Market"
    assert listed[oids["limit_buy"]]["orderType"] == "Limit" and listed[oids["limit_buy"]]["tif"] == "Gtc"


def test_after_a_close_only_reduce_only_orders_and_position_tpsl_are_cancelled(keyed, sim):
    setup(keyed, sim)
    oids = user_orders(sim)
    sim.close_external(ALICE, "BTC", "30500")

    dry = run_json(keyed, "--dry-run")  # lists what it would cancel (Closer._cancel_orphans)
    assert sorted(a["metadata"]["oid"] for a in dry["actions"] if a["type"] == "cancel_order") == sorted(
        [oids["tp"], oids["position_sl"]])

    report = run_json(keyed)  # cancels them (the durable follow-up)
    assert report["closed"] == 1
    cancels = {a["metadata"]["oid"]: a for a in report["actions"] if a["type"] == "cancel_order"}
    assert sorted(cancels) == sorted([oids["tp"], oids["position_sl"]])
    assert cancels[oids["position_sl"]]["metadata"]["order_kind"] == "position_tpsl"
    # The user's stop-entry trigger and resting limit buy are still on the book, and stay there.
    assert open_oids(sim) == sorted([oids["stop_entry"], oids["limit_buy"]])
    assert report["followups"][0]["status"] == "done"
    run_json(keyed)
    assert open_oids(sim) == sorted([oids["stop_entry"], oids["limit_buy"]])


# ---- end to end: the 1,000-open-orders rule --------------------------------------------------------------------

def set_row(database_url, coin, **columns):
    assignments = ", ".join(f"{k} = %s" for k in columns)
    with psycopg.connect(database_url) as conn:
        conn.execute(f"UPDATE positions SET {assignments} WHERE coin = %s AND closed_at IS NULL",
                     (*columns.values(), coin))


def row(database_url, coin):
    with psycopg.connect(database_url) as conn:
        cur = conn.execute("SELECT * FROM positions WHERE coin = %s ORDER BY id DESC LIMIT 1", (coin,))
        return dict(zip([c.name for c in cur.description], cur.fetchone()))


def orders_sent(sim):
    return [r for r in sim.requests_log() if r["path"].endswith("/exchange") and r.get("type") == "order"]


def fire_stop(sim, database_url):
    sim.set_mid("BTC", "29000")
    set_row(database_url, "BTC", stop_loss_price=Decimal("29500"))


def blocked_alerts(report):
    return [a for a in report["alerts"] if a["kind"] == "close_blocked_open_orders"]


def test_a_close_refused_by_the_open_order_limit_cancels_the_coins_reduce_only_orders_and_closes_in_that_run(
        keyed, sim, database_url):
    setup(keyed, sim)
    oids = user_orders(sim)  # 4 open orders
    eth_limit = sim.add_limit_order(ALICE, "ETH", "B", "1", "1000")  # another coin's entry order: 5 open
    sim.set_config(open_order_limit=4)  # as 1,000 on the exchange: a reduce-only order with >= 4 others is refused
    fire_stop(sim, database_url)
    sim.reset_log()

    report = run_json(keyed)

    # The first close order is refused; the alert names the reason; this coin's own reduce-only orders are
    # cancelled (3 open orders left), and the close goes out once more and fills, in this run.
    [alert] = blocked_alerts(report)
    assert alert["key"] == f"close_blocked_open_orders:{row(database_url, 'BTC')['id']}"
    assert "open order limit" in alert["text"] and "1,000" in alert["text"] and "cancelled 2" in alert["text"]
    assert alert["text"].startswith(ALICE)  # the first address in the text scopes the alert to its account
    assert len(orders_sent(sim)) == 2 and report["close_orders_sent"] == 2
    closed = row(database_url, "BTC")
    assert closed["status"] == "closed" and closed["close_reason"] == "stop_loss"
    assert sim.position(ALICE, "BTC") is None
    cancelled = sorted(a["metadata"]["oid"] for a in report["actions"] if a["type"] == "cancel_order"
                       and a["reason"].startswith("open-order limit"))
    assert cancelled == sorted([oids["tp"], oids["position_sl"]])
    # Never an order that is not reduce-only: the stop-entry, the BTC limit buy and the ETH limit stay.
    assert open_oids(sim) == sorted([oids["stop_entry"], oids["limit_buy"], eth_limit])
    with psycopg.connect(database_url) as conn:
        statuses = [r[0] for r in conn.execute(
            "SELECT event FROM position_events WHERE position_id = %s ORDER BY id", (closed["id"],))]
    assert statuses[-6:] == ["closing_claimed", "close_failed", "closing_claimed", "closed", "followup_recorded",
                             "followup_moot"]  # the TP/SL were cancelled before the close: nothing left to cancel


def test_with_nothing_reduce_only_to_cancel_the_close_waits_for_the_next_run_without_looping(
        keyed, sim, database_url):
    setup(keyed, sim)
    entries = [sim.add_limit_order(ALICE, "BTC", "B", "1", str(20000 + i)) for i in range(3)]
    stop_entry = sim.add_trigger_order(ALICE, "BTC", "B", "1", "31000", "sl", reduce_only=False)
    sim.set_config(open_order_limit=4)
    fire_stop(sim, database_url)
    sim.reset_log()

    first = run_json(keyed)
    [alert] = blocked_alerts(first)
    assert "none of its BTC orders is reduce-only" in alert["text"]
    assert len(orders_sent(sim)) == 1  # one order, no retry: nothing was cancelled
    assert row(database_url, "BTC")["status"] == "open"
    assert open_oids(sim) == sorted([*entries, stop_entry])  # nothing cancelled

    sim.reset_log()
    second = run_json(keyed)  # the rule still fires: one order again, refused again, still nothing cancelled
    assert len(orders_sent(sim)) == 1 and blocked_alerts(second)
    assert open_oids(sim) == sorted([*entries, stop_entry])

    sim.cancel_order(ALICE, entries[0])  # the user frees a slot (3 open orders)
    third = run_json(keyed)
    assert not blocked_alerts(third) and third["closed"] == 1
    assert row(database_url, "BTC")["close_reason"] == "stop_loss"
    assert open_oids(sim) == sorted([*entries[1:], stop_entry])


def test_a_retry_refused_again_is_not_retried_in_that_run(keyed, sim, database_url):
    setup(keyed, sim)
    entries = [sim.add_limit_order(ALICE, "ETH", "B", "1", str(1000 + i)) for i in range(4)]
    tp = sim.add_trigger_order(ALICE, "BTC", "A", "1", "33000", "tp")
    sim.set_config(open_order_limit=4)
    fire_stop(sim, database_url)
    sim.reset_log()

    report = run_json(keyed)
    texts = [a["text"] for a in blocked_alerts(report)]
    assert len(orders_sent(sim)) == 2  # the order, one retry after cancelling the TP, and no more
    assert any("the retry was refused too" in t for t in texts)
    assert tp not in open_oids(sim) and open_oids(sim) == sorted(entries)
    assert row(database_url, "BTC")["status"] == "open"


# ---- at the exchange's own scale: 1,000 open orders -------------------------------------------------------------

def entries(sim, n, coin="ETH"):
    """``n`` resting limit buys of the user (entries, not reduce-only), far below the mid."""
    return [sim.add_limit_order(ALICE, coin, "B", "0.01", str(1000 + i)) for i in range(n)]


def test_at_1000_open_orders_the_fallback_frees_the_place_and_closes_in_that_run(keyed, sim, database_url):
    setup(keyed, sim)
    resting = entries(sim, 999)
    tp = sim.add_trigger_order(ALICE, "BTC", "A", "0.5", "33000", "tp")
    sl = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl", position_tpsl=True)  # 1,001 open orders
    fire_stop(sim, database_url)  # the simulator's limit is the exchange's: 1,000
    sim.reset_log()

    report = run_json(keyed)
    [alert] = blocked_alerts(report)
    assert "cancelled 2 of 2 reduce-only BTC order(s) (the account had 1001 open orders)" in alert["text"]
    assert len(orders_sent(sim)) == 2 and row(database_url, "BTC")["close_reason"] == "stop_loss"
    assert open_oids(sim) == sorted(resting)  # the 999 entries are all still there
    assert tp not in open_oids(sim) and sl not in open_oids(sim)


def test_when_cancelling_cannot_free_the_place_no_stop_is_stripped(keyed, sim, database_url):
    setup(keyed, sim)
    resting = entries(sim, 1000)
    sl = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl", position_tpsl=True)
    fire_stop(sim, database_url)
    sim.reset_log()

    report = run_json(keyed)
    [alert] = blocked_alerts(report)
    assert "1000 would be left, still at the limit: nothing cancelled" in alert["text"]
    assert len(orders_sent(sim)) == 1  # no retry
    assert open_oids(sim) == sorted([*resting, sl])  # the position keeps its stop loss on the exchange
    assert row(database_url, "BTC")["status"] == "open"


def test_the_fallback_is_paid_from_the_weight_budget_or_left_for_the_next_run(keyed, sim, database_url):
    setup(keyed, sim)
    others = entries(sim, 3)
    tp = sim.add_trigger_order(ALICE, "BTC", "A", "1", "33000", "tp")
    sim.set_config(open_order_limit=4)
    fire_stop(sim, database_url)
    sim.reset_log()
    # Enough for the account's read (25: its fills read's per-item part included), meta (20) and the key's userRole
    # (60) and the order (1); not for open orders.
    report = run_json(dict(keyed, MONITOR_WEIGHT_BUDGET="106"), expect=None)
    [alert] = blocked_alerts(report)
    assert "open orders not read (weight budget" in alert["text"] and "frontendOpenOrders needs 20" in alert["text"]
    assert [r.get("type") for r in sim.requests_log()].count("frontendOpenOrders") == 0
    assert len(orders_sent(sim)) == 1 and report["api_weight"] <= 106
    assert open_oids(sim) == sorted([*others, tp]) and row(database_url, "BTC")["status"] == "open"

    report = run_json(keyed)  # the next run, with its weight: the fallback, and the close
    assert row(database_url, "BTC")["close_reason"] == "stop_loss"
    assert open_oids(sim) == sorted(others)


# ---- the rule counts the account's open orders on every perp dex (red-team F1) ------------------------------------

def test_orders_on_a_hip3_dex_count_so_a_stop_is_not_stripped_when_cancelling_cannot_free_the_place(
        keyed, sim, database_url):
    """The 1,000 counts the account's open orders across all its perp dexes: 1,000 entries resting on a HIP-3 dex
    and one stop loss on BTC. The first dex alone shows 1 order (cancelling the stop would seem to free the place);
    counted with the HIP-3 dex's, 1,000 would be left: the stop stays, and no second order is sent."""
    sim.add_perp_dex("xyz")
    sim.add_coin("xyz:TSLA", sz_decimals=2, mid="250")
    setup(keyed, sim)
    resting = [sim.add_limit_order(ALICE, "xyz:TSLA", "B", "0.01", str(100 + i % 50)) for i in range(1000)]
    sl = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl", position_tpsl=True)
    fire_stop(sim, database_url)
    sim.reset_log()

    report = run_json(keyed)
    assert sl in open_oids(sim) and len(open_oids(sim)) == len(resting) + 1  # the position keeps its stop
    assert len(orders_sent(sim)) == 1  # no retry: it would be refused again
    [alert] = blocked_alerts(report)
    assert "the account has 1001 open orders on 2 perp dexes" in alert["text"]
    assert "1000 would be left, still at the limit: nothing cancelled" in alert["text"]
    assert row(database_url, "BTC")["status"] == "open"


def test_an_unreadable_other_dex_makes_the_count_unknown_and_nothing_is_cancelled(keyed, sim, database_url):
    sim.add_perp_dex("xyz")
    sim.add_coin("xyz:TSLA", sz_decimals=2, mid="250")
    setup(keyed, sim)
    entries_xyz = [sim.add_limit_order(ALICE, "xyz:TSLA", "B", "0.01", str(100 + i)) for i in range(3)]
    tp = sim.add_trigger_order(ALICE, "BTC", "A", "1", "33000", "tp")
    sim.set_config(open_order_limit=4)  # 4 open orders: the close is refused
    fire_stop(sim, database_url)
    sim.add_fault("500", path="info", type="frontendOpenOrders", count=None, dex="xyz")
    sim.reset_log()

    report = run_json(keyed)
    assert open_oids(sim) == sorted([*entries_xyz, tp])  # the TP stays: cancelling it might free nothing
    assert len(orders_sent(sim)) == 1
    [alert] = blocked_alerts(report)
    assert "the open orders of dex xyz are unreadable" in alert["text"] and "nothing cancelled" in alert["text"]
    assert row(database_url, "BTC")["status"] == "open"

    sim.clear_faults()  # counted now: 4 on two dexes, 3 left without the TP: it is cancelled and the close fills
    report = run_json(keyed)
    assert "(the account had 4 open orders on 2 perp dexes)" in blocked_alerts(report)[0]["text"]
    assert row(database_url, "BTC")["close_reason"] == "stop_loss"
    assert open_oids(sim) == sorted(entries_xyz)


# ---- the follow-up's bound is decided from the fills (red team on 8058c72) -----------------------------------


def test_a_stop_placed_while_a_between_runs_position_was_open_is_kept_for_the_position_open_now(keyed, sim):
    """The row's position closes, a second one opens and closes, a third is open now. A reduce-only stop placed
    while the second was open (a TP/SL of a resting entry that filled later, with its first timestamp) may be the
    third's: with a position open now the bound stays at the row's own close, and the stop stays."""
    setup(keyed, sim)
    sim.close_external(ALICE, "BTC", "30500")
    sim.advance_time(5000)
    sim.open_position(ALICE, "BTC", "1", "30600")
    sim.advance_time(5000)
    stop_for_third = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl")
    sim.advance_time(5000)
    sim.close_external(ALICE, "BTC", "30700")
    sim.advance_time(5000)
    sim.open_position(ALICE, "BTC", "1", "30800")
    report = run_json(keyed)
    assert [a for a in report["actions"] if a["type"] == "close"]
    assert sim.position(ALICE, "BTC") is not None
    assert stop_for_third in open_oids(sim)


def test_a_flip_seen_through_a_lagging_snapshot_leaves_the_new_sides_stop_alone(keyed, sim):
    """The row's long flips to a short, whose stop is placed in the flip's millisecond; the snapshot still shows
    the long. The plan is a wait, not a discover, so the old guards (which looked for the discover) did not apply
    and the follow-up cancelled the live short's stop. The flip is now read from the fills: no follow-up."""
    setup(keyed, sim)
    sim.advance_time(5000)
    fills = sim.flip(ALICE, "BTC", "-1", "30500")
    sim.set_time(max(int(f["time"]) for f in fills))
    stop_of_short = sim.add_trigger_order(ALICE, "BTC", "B", "1", "32000", "sl")
    sim.add_fault("stale", user=ALICE, k=2, count=None)
    report = run_json(keyed)
    assert [a["reason"] for a in report["actions"] if a["type"] == "close"] == ["flipped"]
    assert Decimal(sim.position(ALICE, "BTC")["szi"]) == Decimal("-1")
    assert stop_of_short in open_oids(sim)


def test_with_the_first_dex_only_the_open_order_count_still_asks_every_dex(keyed, sim, database_url):
    """Red team R3: with MONITOR_PERP_DEXES="" the 1,000-order fallback counted the first dex's orders only, saw
    room after cancelling the coin's stop, cancelled it, and the close was refused again (the HIP-3 dex's orders
    count too). The run now asks perpDexs when the rule is met, and counts every dex: nothing is cancelled."""
    sim.add_perp_dex("xyz")
    sim.add_coin("xyz:TSLA", sz_decimals=2, mid="250")
    setup(keyed, sim)
    for i in range(1000):
        sim.add_limit_order(ALICE, "xyz:TSLA", "B", "0.01", str(100 + i % 50))
    stop = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl", position_tpsl=True)
    fire_stop(sim, database_url)
    report = run_json(dict(keyed, MONITOR_PERP_DEXES=""))
    assert sim.position(ALICE, "BTC") is not None
    assert stop in open_oids(sim)  # not stripped for nothing
    [alert] = blocked_alerts(report)
    assert "1000 would be left, still at the limit: nothing cancelled" in alert["text"]
