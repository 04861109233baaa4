"""Positions as the exchange's own cycles, end to end: the real CLI, PostgreSQL, SDK and the simulator.

Each test is a trading pattern that the monitor got wrong before rows were tied to one cycle of fills
(issue 10, "Why"): it fails on that code.
"""

from __future__ import annotations

from decimal import Decimal

import psycopg
import pytest

from tests.conftest import ALICE, cli, run_json


def rows(database_url, coin):
    with psycopg.connect(database_url) as conn:
        cur = conn.execute("SELECT * FROM positions WHERE coin = %s ORDER BY id", (coin,))
        names = [c.name for c in cur.description]
        return [dict(zip(names, r)) for r in cur]


def set_row(database_url, coin, **columns):
    assignments = ", ".join(f"{k} = %s" for k in columns)
    with psycopg.connect(database_url) as conn:
        conn.execute(f"UPDATE positions SET {assignments} WHERE coin = %s AND closed_at IS NULL",
                     (*columns.values(), coin))


def monitor_orders(sim):
    return [o for o in sim.orders(ALICE) if o.get("cloid")]


@pytest.mark.parametrize("size,entry", [("1", "30000"), ("2", "29500")], ids=["same-size-and-entry", "other-size"])
def test_a_close_and_reopen_between_runs_is_two_rows_and_the_old_rule_never_touches_the_new_one(
        keyed, sim, database_url, size, entry):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    set_row(database_url, "BTC", take_profit_price=Decimal("31000"), trailing_stop_pct=Decimal("5"),
            best_price=Decimal("30000"))
    stop = sim.add_trigger_order(ALICE, "BTC", "A", "1", "29000", "sl")  # the first position's stop order

    sim.close_external(ALICE, "BTC", "32000")  # the first position: +2000 at 32000 ...
    sim.advance_time(5)
    sim.open_position(ALICE, "BTC", size, entry)  # ... and a new one, before the next run
    sim.set_mid("BTC", "31500")  # the old row's take profit would fire
    report = run_json(keyed)

    assert monitor_orders(sim) == []  # the new position was not closed by the old row's rule
    first, second = rows(database_url, "BTC")
    closes = [f for f in sim.fills(ALICE) if f["coin"] == "BTC" and f["dir"] == "Close Long"]
    assert first["status"] == "closed" and first["close_reason"] == "external"
    assert first["exit_price"] == Decimal("32000") and first["realized_pnl"] == Decimal(closes[0]["closedPnl"])
    assert first["realized_pnl"] == Decimal("2000")
    opening = [f for f in sim.fills(ALICE) if f["coin"] == "BTC" and f["dir"] == "Open Long"]
    assert first["fees"] == Decimal(opening[0]["fee"]) + Decimal(closes[0]["fee"])
    assert second["status"] == "open" and second["source"] == "discovered"
    assert second["size"] == Decimal(size) and second["entry_price"] == Decimal(entry)
    assert int(second["opened_at"].timestamp() * 1000) == opening[1]["time"]  # its own first fill
    assert second["take_profit_price"] is None and second["best_price"] is None
    assert second["metadata"] == {"reopened_after": first["id"]}
    assert report["closed"] == 1 and report["discovered"] == 1
    assert stop not in {o["oid"] for o in sim.orders(ALICE, open_only=True)}  # the old stop is cancelled


def test_a_position_that_grew_while_its_close_order_was_in_flight_stays_open_with_the_rule_armed(
        keyed, sim, database_url):
    sim.open_position(ALICE, "SOL", "10", "20")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    set_row(database_url, "SOL", stop_loss_price=Decimal("19"))
    sim.set_mid("SOL", "18")
    # the position grows to 15 after the run read 10, just before its close order lands
    sim.add_request_hook(lambda *_: sim.resize(ALICE, "SOL", "15", "20"), path="exchange", type="order", user=ALICE)
    first = run_json(keyed)
    assert first["close_orders_sent"] == 1
    row, = rows(database_url, "SOL")
    assert row["status"] == "open" and row["size"] == Decimal("5")  # the true rest, not 'closing' forever
    assert sim.position(ALICE, "SOL")["szi"] in ("5", "5.0", "5.00")
    second = run_json(keyed)  # the rule is still armed: the rest is closed
    assert second["close_orders_sent"] == 1
    row, = rows(database_url, "SOL")
    assert row["status"] == "closed" and row["close_reason"] == "stop_loss"
    assert sim.position(ALICE, "SOL") is None
    fills = [f for f in sim.fills(ALICE) if f["coin"] == "SOL"]
    assert row["realized_pnl"] == sum(Decimal(f["closedPnl"]) for f in fills)
    assert row["fees"] == sum(Decimal(f["fee"]) for f in fills)


def test_a_reduce_only_order_capped_at_the_position_keeps_the_rule_as_reason(keyed, sim, database_url):
    sim.open_position(ALICE, "SOL", "10", "20")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    set_row(database_url, "SOL", stop_loss_price=Decimal("19"))
    sim.add_fault("stale", user=ALICE, count=None)  # the snapshot keeps showing 10 ...
    sim.resize(ALICE, "SOL", "4", "20")  # ... while the user reduced it to 4
    sim.set_mid("SOL", "18")
    report = run_json(keyed)
    sent, = [a for a in report["actions"] if a["type"] == "close_sent"]
    assert sent["metadata"]["outcome"] == "partial"  # the exchange capped the reduce-only order at 4
    row, = rows(database_url, "SOL")
    assert row["status"] == "closed" and row["close_reason"] == "stop_loss"
    assert sim.position(ALICE, "SOL") is None


@pytest.fixture
def busy_account(sim):
    """ALICE holds ETH long 1, then trades SOL 10,500 times: more than the exchange's 10,000-fill
    history lies between the ETH row's open and now."""

    def make(database_url, env):
        sim.open_position(ALICE, "ETH", "1", "2000")
        assert cli(env, "accounts", "add", ALICE).returncode == 0
        run_json(env)
        sim.open_position(ALICE, "SOL", "1", "20")
        for n in range(10_500):
            sim.resize(ALICE, "SOL", "2" if n % 2 == 0 else "1", "20")
    return make


def test_a_flip_on_an_account_past_the_fill_history_is_closed_from_the_recent_fills(env, sim, database_url,
                                                                                     busy_account):
    busy_account(database_url, env)
    sim.flip(ALICE, "ETH", "-1", "2100")  # long 1 -> short 1: +100 on the long
    report = run_json(env)
    old, new = rows(database_url, "ETH")
    assert old["status"] == "closed" and old["close_reason"] == "flipped"
    assert old["exit_price"] == Decimal("2100") and old["realized_pnl"] == Decimal("100")
    assert old["metadata"]["fills_truncated"] is True and old["metadata"]["opening_fills_missing"] is True
    assert new["status"] == "open" and new["side"] == "short" and new["metadata"] == {"flipped_from": old["id"]}
    assert report["closed"] == 1


def test_a_window_just_under_the_history_is_read_whole(sim):
    """9,999 fills: complete (not truncated), read back from now in pages shorter than the limit."""
    from monitor.exchange import Exchange

    sim.open_position(ALICE, "SOL", "1", "20")
    start = sim.now_ms()
    for n in range(9_998):
        sim.resize(ALICE, "SOL", "2" if n % 2 == 0 else "1", "20")
    fills = Exchange(sim.url, timeout=5).read_fills(ALICE, start - 1000)
    assert len(fills) == 9_999
    assert len({(f.time_ms, f.oid) for f in fills}) == 9_999


def test_a_user_flip_closed_before_the_next_run_is_labelled_flipped(env, sim, database_url):
    sim.open_position(ALICE, "ETH", "1", "2000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(env)
    sim.flip(ALICE, "ETH", "-1", "2100")  # long -> short in one fill ...
    sim.close_external(ALICE, "ETH", "2050")  # ... and the short closed too, before the next run
    run_json(env)
    row, = rows(database_url, "ETH")
    assert row["status"] == "closed" and row["close_reason"] == "flipped"
    assert row["exit_price"] == Decimal("2100") and row["realized_pnl"] == Decimal("100")


def test_a_reduction_then_an_increase_between_runs_updates_the_interim_pnl(env, sim, database_url):
    sim.open_position(ALICE, "ETH", "2", "2000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(env)
    sim.resize(ALICE, "ETH", "1", "2100")  # +100 realized ...
    sim.resize(ALICE, "ETH", "2", "2200")  # ... and back to 2: the size is what it was
    run_json(env)
    row, = rows(database_url, "ETH")
    fills = [f for f in sim.fills(ALICE) if f["coin"] == "ETH"]
    assert row["status"] == "open" and row["size"] == Decimal("2")
    assert row["entry_price"] == Decimal(sim.position(ALICE, "ETH")["entryPx"])
    assert row["realized_pnl"] == Decimal("100") and row["fees"] == sum(Decimal(f["fee"]) for f in fills)


def test_a_close_order_is_sized_to_the_fills_when_the_snapshot_lags_a_growth(keyed, sim, database_url):
    sim.open_position(ALICE, "SOL", "10", "20")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    set_row(database_url, "SOL", stop_loss_price=Decimal("19"))
    sim.add_fault("stale", user=ALICE, count=None)  # the snapshot keeps showing 10 ...
    sim.resize(ALICE, "SOL", "15", "20")  # ... while the fills show it grew to 15
    sim.set_mid("SOL", "18")
    report = run_json(keyed)
    sent, = [a for a in report["actions"] if a["type"] == "close_sent"]
    assert Decimal(sent["size"]) == Decimal("15")  # the whole position in one order
    row, = rows(database_url, "SOL")
    assert row["status"] == "closed" and row["close_reason"] == "stop_loss" and sim.position(ALICE, "SOL") is None


def test_a_second_fills_read_of_an_account_in_one_run_costs_one_request_and_sees_new_fills(sim):
    from monitor.exchange import Exchange, FillsCache

    sim.set_clock_offset(-180_000)  # a burst of 3,000 fills three minutes ago (more than a page) ...
    sim.open_position(ALICE, "SOL", "1", "20")
    start = sim.now_ms()
    for n in range(3000):
        sim.resize(ALICE, "SOL", "2" if n % 2 == 0 else "1", "20")
    sim.set_clock_offset(0)
    exchange = Exchange(sim.url, timeout=5, fills_cache=FillsCache())
    first = exchange.read_fills(ALICE, start - 1000)
    sim.close_external(ALICE, "SOL", "21")  # the close order's fill, after the first read
    sim.reset_log()
    second = exchange.read_fills(ALICE, start - 1000)
    assert len(sim.requests_log(type="userFillsByTime")) == 1
    assert len(second) == len(first) + 1 and second[-1].end_position == 0


@pytest.mark.parametrize("coin", ["BTC", "xyz:TSLA"])
def test_a_position_opened_and_closed_between_two_runs_leaves_no_stop_behind(keyed, sim, database_url, coin):
    """Chaos seed 20261360: the row's position closes, a second one opens, gets a stop and closes before the
    next run. The second belongs to no row, but its reduce-only stop is an orphan like the first one's: the
    close's follow-up must cancel up to the second close, not only up to the row's own (the old bound left
    that stop on the book, where it would close the user's next position)."""
    if coin == "BTC":
        sim.open_position(ALICE, coin, "1", "30000")
        open_again = lambda: sim.open_position(ALICE, coin, "1", "30500")  # noqa: E731
    else:
        sim.open_hip3_position(ALICE, coin, "1", "250")
        open_again = lambda: sim.open_hip3_position(ALICE, coin, "1", "255")  # noqa: E731
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    first_stop = sim.add_trigger_order(ALICE, coin, "A", "1", "200" if coin != "BTC" else "29000", "sl")
    sim.close_external(ALICE, coin, "260" if coin != "BTC" else "31000")
    sim.advance_time(5)
    open_again()
    second_stop = sim.add_trigger_order(ALICE, coin, "A", "1", "210" if coin != "BTC" else "29500", "sl")
    sim.advance_time(5)
    sim.close_external(ALICE, coin, "262" if coin != "BTC" else "31200")

    report = run_json(keyed)

    row, = rows(database_url, coin)  # the second position is part of no row (it was never seen open)
    assert row["status"] == "closed" and row["close_reason"] == "external"
    closes = [f for f in sim.fills(ALICE) if f["coin"] == coin and f["dir"] == "Close Long"]
    assert row["exit_price"] == Decimal(closes[0]["px"])  # its own cycle's figures, not the second's
    assert row["metadata"]["later_cycles_closed_at"]
    still_open = {o["oid"] for o in sim.orders(ALICE, open_only=True)}
    assert first_stop not in still_open and second_stop not in still_open
    cancelled = {a["metadata"]["oid"] for a in report["actions"] if a["type"] == "cancel_order"}
    assert {first_stop, second_stop} <= cancelled
