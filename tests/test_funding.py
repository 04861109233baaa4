"""Funding and net P&L, and the exchange's own kinds of close (ADL, backstop liquidation, settlement): issue 12
items 4 and 5.

The parsing is checked on real recordings (testkit/hlsim/fixtures); the rest end to end: the real CLI,
PostgreSQL, the SDK and the simulator, whose funding ledger is the truth a row's figures are checked against.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

import psycopg
import pytest

from hlsim import fixtures
from monitor import planner
from monitor.fills import funding_between, parse_fills, parse_funding, segment_cycles
from monitor.models import ExchangeDataError, PositionRow
from tests.conftest import ALICE, cli, run_json

# ---- parsing, on the recordings ----------------------------------------------------------------


def test_user_funding_recording_parses_with_the_exchange_sign():
    payments = parse_funding(fixtures.response("userFunding.json"))
    assert len(payments) == 13
    by_coin = {p.coin: p for p in payments}
    # + received, - paid: a long pays a positive rate, a short receives it, a long receives a negative one
    assert by_coin["AVAX"].usdc == Decimal("-0.572915") and by_coin["AVAX"].szi > 0 and by_coin["AVAX"].rate > 0
    assert by_coin["ARB"].usdc == Decimal("2.694388") and by_coin["ARB"].szi < 0
    assert by_coin["APE"].usdc == Decimal("0.145796") and by_coin["APE"].rate < 0 < by_coin["APE"].szi
    assert all(isinstance(p.usdc, Decimal) for p in payments)
    t = by_coin["ARB"].time_ms
    assert funding_between(payments, "ARB", t - 1, t) == Decimal("2.694388")
    assert funding_between(payments, "ARB", t, t + 1) == 0  # (from, until]: a payment at the open is not its
    assert funding_between(payments + payments, "ARB", t - 1, t) == Decimal("2.694388")  # repeats once


@pytest.mark.parametrize("body", [
    {"error": "x"},
    [{"time": 1, "delta": {"coin": "BTC"}}],
    [{"time": 1, "hash": "0x", "delta": {"type": "funding", "coin": "BTC", "usdc": 1.5}}],  # a float: refused
    [{"time": 1, "hash": "0x", "delta": {"type": "deposit", "coin": "BTC", "usdc": "1"}}],
])
def test_a_bad_funding_answer_is_rejected_whole(body):
    with pytest.raises(ExchangeDataError):
        parse_funding(body)


def _row(coin: str, side: str, opened_ms: int) -> PositionRow:
    return PositionRow(id=1, account_id=1, coin=coin, side=side, size=Decimal(1), entry_price=None, status="open",
                       opened_at=datetime.fromtimestamp(opened_ms / 1000, tz=timezone.utc))


def test_adl_recording_is_an_adl_close_not_a_liquidation_of_the_account():
    doc = fixtures.load("userFills_adl.json")
    account = doc["request"]["user"]
    fills = parse_fills(doc["response"])
    own, = segment_cycles(fills, "AVAX", account=account)
    assert own.ended and own.side == "short" and not own.liquidated  # liquidatedUser is the HLP child
    assert own.end_direction == "Auto-Deleveraging" and own.realized_pnl == Decimal("194.275035")
    assert planner.close_reason(_row("AVAX", "short", fills[0].time_ms - 10_000), own, account) == "adl"


def test_market_liquidation_recording_is_a_liquidation_and_a_counterparty_fill_is_not():
    fills = parse_fills(fixtures.response("userFills_liquidation.json"))
    victim = fills[1].liquidation.liquidated_user
    hype = [c for c in segment_cycles(fills, "HYPE", account=victim) if c.ended]
    assert hype and all(c.liquidated for c in hype)
    assert planner.close_reason(_row("HYPE", "long", 0), hype[0], victim) == "liquidation"
    # the maker who filled someone else's liquidation: its fill names the victim, not the maker
    frame = fixtures.response("wsUserEvents_fill_liquidation_counterparty.json")
    maker = parse_fills(frame["data"]["fills"])
    cycle, = segment_cycles(maker, "BTC", account="0x" + "ab" * 20)
    assert not cycle.liquidated and not cycle.ended


def test_dust_conversion_recording_parses_and_leaves_perp_cycles_alone():
    fills = parse_fills(fixtures.response("userFills_dust_conversion.json"))
    dust = [f for f in fills if f.direction == "Spot Dust Conversion"]
    assert dust and dust[0].tid == 0 and set(dust[0].hash[2:]) == {"0"}
    jup = segment_cycles(fills, "JUP", account="0x" + "ab" * 20)
    assert [c.end_direction for c in jup] == [None]  # a Close Short that did not reach zero


def test_unreadable_funding_closes_with_null_and_says_why():
    close = planner.Action(planner.CLOSE, ALICE, "BTC", position_id=1, realized_pnl=Decimal("10"),
                           fees=Decimal("1.5"), funding_window=(100, 200))
    unread, = planner.with_funding([close], None, "userFunding: HTTP 500")
    assert unread.funding is None and unread.net_pnl is None
    assert unread.metadata["funding_unread"] == "userFunding: HTTP 500"
    payments = parse_funding([
        {"time": 150, "hash": "0x1", "delta": {"type": "funding", "coin": "BTC", "usdc": "-2.25"}},
        {"time": 100, "hash": "0x2", "delta": {"type": "funding", "coin": "BTC", "usdc": "9"}},  # at the open: not its
        {"time": 150, "hash": "0x3", "delta": {"type": "funding", "coin": "ETH", "usdc": "9"}},
    ])
    read, = planner.with_funding([close], payments)
    assert read.funding == Decimal("-2.25") and read.net_pnl == Decimal("6.25")
    # a close without figures needs no funding and reads none
    bare = planner.Action(planner.CLOSE, ALICE, "BTC", position_id=1, metadata={"unexplained": True})
    assert planner.funding_span([bare]) is None and planner.with_funding([bare], None, "x") == [bare]


# ---- end to end ---------------------------------------------------------------------------------


def rows(database_url, coin):
    with psycopg.connect(database_url) as conn:
        cur = conn.execute("SELECT * FROM positions WHERE coin = %s ORDER BY id", (coin,))
        names = [c.name for c in cur.description]
        return [dict(zip(names, r)) for r in cur]


def table(database_url):
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT * FROM positions ORDER BY id").fetchall()


def funding_reads(sim):
    return sum(1 for r in sim.requests_log() if r["type"] == "userFunding")


def ledger_sum(sim, coin, after_ms, until_ms):
    return sum((Decimal(e["delta"]["usdc"]) for e in sim.funding_ledger(ALICE, coin)
                if after_ms < e["time"] <= until_ms), Decimal(0))


def step(sim):
    sim.advance_time(5)  # the next event in a later millisecond; the simulator's clock stays near the monitor's


def start(env, sim, coin="BTC", szi="1", px="30000"):
    opening = sim.open_position(ALICE, coin, szi, px)
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(env)
    step(sim)
    return opening


def test_funding_paid_and_received_over_a_cycle_is_written_once_at_the_close(env, sim, database_url):
    start(env, sim)
    sim.open_position(ALICE, "ETH", "-2", "1900")  # another coin's funding is not this row's
    step(sim)
    sim.pay_funding(ALICE, "BTC", usdc="-3.5")
    step(sim)
    sim.pay_funding(ALICE, "ETH", usdc="7")
    sim.pay_funding(ALICE, "BTC", rate="-0.0001", px="30000")  # a long receives a negative rate: +3
    step(sim)
    sim.pay_funding(ALICE, "BTC", usdc="1.25")
    step(sim)
    quiet = funding_reads(sim)
    run_json(env)
    assert funding_reads(sim) == quiet  # funding is read only when a row closes
    sim.close_external(ALICE, "BTC", "31000")
    step(sim)
    run_json(env)
    assert funding_reads(sim) == quiet + 1

    row, = rows(database_url, "BTC")
    assert row["status"] == "closed" and row["close_reason"] == "external"
    assert row["funding"] == Decimal("0.75")  # -3.5 + 3 + 1.25
    assert row["realized_pnl"] == Decimal("1000")  # gross closedPnl, as before
    assert row["net_pnl"] == row["realized_pnl"] - row["fees"] + row["funding"]
    eth, = rows(database_url, "ETH")
    assert eth["funding"] is None and eth["net_pnl"] is None  # still open

    before = rows(database_url, "BTC")
    sim.pay_funding(ALICE, "ETH", usdc="5")  # life goes on; the closed row never changes again
    run_json(env)
    assert rows(database_url, "BTC") == before and funding_reads(sim) == quiet + 1

    listed = json.loads(cli(env, "positions", "list", "--status", "closed", "--json").stdout)
    assert listed[0]["funding"] == "0.75" and Decimal(listed[0]["net_pnl"]) == row["net_pnl"]
    text = cli(env, "positions", "list", "--status", "closed").stdout
    assert "funding" in text.splitlines()[0] and "net_pnl" in text.splitlines()[0]


def test_funding_of_an_earlier_cycle_of_the_coin_is_not_counted(env, sim, database_url):
    start(env, sim)
    sim.pay_funding(ALICE, "BTC", usdc="-4")  # the first position's, moments before it closes
    step(sim)
    sim.close_external(ALICE, "BTC", "30500")
    step(sim)
    sim.open_position(ALICE, "BTC", "2", "30600")  # re-opened before the next run
    step(sim)
    sim.pay_funding(ALICE, "BTC", usdc="-6")
    step(sim)
    run_json(env)
    first, second = rows(database_url, "BTC")
    assert first["status"] == "closed" and first["funding"] == Decimal("-4")
    assert second["status"] == "open" and second["metadata"] == {"reopened_after": first["id"]}
    sim.pay_funding(ALICE, "BTC", usdc="2.5")
    step(sim)
    sim.close_external(ALICE, "BTC", "30700")
    step(sim)
    run_json(env)
    first, second = rows(database_url, "BTC")
    assert second["status"] == "closed" and second["funding"] == Decimal("-3.5")  # -6 + 2.5, not the -4
    assert second["net_pnl"] == second["realized_pnl"] - second["fees"] + Decimal("-3.5")
    assert first["funding"] == Decimal("-4")


def test_unreadable_funding_closes_the_row_with_null_funding_and_a_note(env, sim, database_url):
    start(env, sim)
    sim.pay_funding(ALICE, "BTC", usdc="-4")
    step(sim)
    sim.close_external(ALICE, "BTC", "30500")
    sim.add_fault("500", path="info", type="userFunding", count=None)
    run_json(env)
    row, = rows(database_url, "BTC")
    assert row["status"] == "closed" and row["realized_pnl"] == Decimal("500") and row["fees"] > 0
    assert row["funding"] is None and row["net_pnl"] is None  # never a zero that was not read
    assert "userFunding" in row["metadata"]["funding_unread"]
    sim.clear_faults()
    before = table(database_url)
    run_json(env)
    assert table(database_url) == before  # written once: the close is not redone


def test_adl_is_closed_as_adl_with_its_funding(env, sim, database_url):
    start(env, sim, "ETH", "-2", "1900")
    sim.pay_funding(ALICE, "ETH", usdc="1.5")
    step(sim)
    adl = sim.adl(ALICE, "ETH", px="1800")
    assert adl[0]["dir"] == "Auto-Deleveraging" and adl[0]["fee"] == "0.0"
    assert adl[0]["liquidation"]["method"] == "backstop" and adl[0]["liquidation"]["liquidatedUser"] != ALICE
    run_json(env)
    row, = rows(database_url, "ETH")
    assert row["status"] == "closed" and row["close_reason"] == "adl"
    assert row["exit_price"] == Decimal("1800") and row["realized_pnl"] == Decimal("200")
    assert row["funding"] == Decimal("1.5")


def test_backstop_liquidation_is_a_liquidation(env, sim, database_url):
    start(env, sim, "SOL", "10", "20")
    sim.pay_funding(ALICE, "SOL", usdc="-0.25")
    step(sim)
    liq = sim.liquidate(ALICE, "SOL", "15", method="backstop")
    assert liq[0]["dir"] == "Liquidated Cross Long" and liq[0]["fee"] == "0.0"
    run_json(env)
    row, = rows(database_url, "SOL")
    assert row["status"] == "closed" and row["close_reason"] == "liquidation"
    assert row["funding"] == Decimal("-0.25") and row["net_pnl"] == row["realized_pnl"] - row["fees"] - Decimal("0.25")


def test_settlement_fill_closes_the_row_as_settlement(env, sim, database_url):
    start(env, sim, "AVAX", "5", "14")
    sim.settle(ALICE, "AVAX", px="12")
    run_json(env)
    row, = rows(database_url, "AVAX")
    assert row["status"] == "closed" and row["close_reason"] == "settlement"
    assert row["exit_price"] == Decimal("12") and row["funding"] == 0


def test_a_close_by_the_monitor_itself_gets_the_same_figures(keyed, sim, database_url):
    start(keyed, sim, "SOL", "10", "20")
    sim.pay_funding(ALICE, "SOL", usdc="-0.4")
    step(sim)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE positions SET stop_loss_price = 19 WHERE coin = 'SOL'")
    sim.set_mid("SOL", "18")
    report = run_json(keyed)
    assert report["close_orders_sent"] == 1
    row, = rows(database_url, "SOL")
    assert row["status"] == "closed" and row["close_reason"] == "stop_loss"
    assert row["funding"] == Decimal("-0.4")
    assert row["net_pnl"] == row["realized_pnl"] - row["fees"] + Decimal("-0.4")
    opened = int(row["opened_at"].timestamp() * 1000)
    assert row["funding"] == ledger_sum(sim, "SOL", opened - 120_000, int(row["closed_at"].timestamp() * 1000))


def test_user_funding_is_read_in_pages_of_500_through_the_sdk(sim):
    from monitor.exchange import Exchange, ReadFailed

    sim.open_position(ALICE, "BTC", "1", "30000")
    now = sim.now_ms()
    for i in range(1203):
        sim.pay_funding(ALICE, "BTC", usdc="-0.01", ts=now - 10_000_000 + i * 1000)
    exchange = Exchange(sim.url, timeout=5)
    payments = exchange.read_funding(ALICE, now - 10_000_000, now)
    assert len(payments) == 1203 and sum(p.usdc for p in payments) == Decimal("-12.03")
    assert exchange.counter.by_type["userFunding"] == 3  # 500 + 500 (+1 repeated at the boundary) + the rest
    pages = [r for r in sim.requests_log() if r["type"] == "userFunding"]
    assert [r["weight"] for r in pages] == [45, 45, 30]  # 20 + 1 per 20 items (reference §5)
    for _ in range(501):  # more than a page in one millisecond: never a partial sum
        sim.pay_funding(ALICE, "BTC", usdc="-0.01", ts=now + 5)
    with pytest.raises(ReadFailed):
        exchange.read_funding(ALICE, now + 5, now + 5)
    sim.add_fault("malformed", path="info", type="userFunding")
    with pytest.raises(ReadFailed):
        exchange.read_funding(ALICE, now - 10_000_000, now)
