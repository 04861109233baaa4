"""Request weights as the exchange charges them: the base before a request, "+1 per 20 items returned" after a
fills answer (reference §5.1). The run's api_weight is the simulator's own count; the budget defers what the
surcharge leaves no weight for; the simulator's limiter counts the surcharge (real CLI, PostgreSQL, simulator)."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import psycopg
import pytest
from hyperliquid.info import Info
from hyperliquid.utils.error import ClientError

from monitor.exchange import BudgetExhausted, Exchange, FillsTruncated, RequestCounter, WeightBudget, item_surcharge
from tests.conftest import ALICE, cli, run_json

BOB = "0x" + "b0" * 20


def fills_entries(sim) -> list[dict]:
    return sim.requests_log(type="userFillsByTime")


def test_item_surcharge_is_one_per_20_items_rounded_up():
    assert item_surcharge("userFillsByTime", [{}] * 2000) == 100  # a full page weighs 120 in all
    assert item_surcharge("userFillsByTime", [{}] * 41) == 3
    assert item_surcharge("userFills", []) == 0
    assert item_surcharge("historicalOrders", [{}] * 20) == 1
    assert item_surcharge("clearinghouseState", [{}] * 100) == 0  # no per-item part
    assert item_surcharge("userFillsByTime", {"error": "x"}) == 0  # not a list answer


def test_budget_charges_the_surcharge_after_the_answer_and_then_refuses():
    budget = WeightBudget(60)
    budget.open_reserve()  # exit work (after the reads): the base is what must be affordable
    budget.take("userFillsByTime", 20)  # affordable before the request ...
    budget.charge("userFillsByTime", 50)  # ... the answer held 1,000 fills: spent anyway
    assert budget.spent == 70
    with pytest.raises(BudgetExhausted):
        budget.take("clearinghouseState", 2)


def test_a_surcharge_drawn_on_the_exit_reserve_comes_out_of_it():
    budget = WeightBudget(1000)
    budget.hold(100)
    with budget.urgent():
        budget.take("userFillsByTime", 20)
        budget.charge("userFillsByTime", 30)
    assert budget.reserved == 50 and budget.spent == 50


def test_exchange_counts_the_surcharge_of_a_busy_accounts_fills(sim):
    sim.add_fill_history(ALICE, "ETH", 1000)
    counter, budget = RequestCounter(), WeightBudget(1000)
    exchange = Exchange(sim.url, timeout=5, counter=counter, before_request=budget.take,
                        after_response=budget.charge)
    sim.reset_log()
    fills = exchange.read_fills(ALICE, 0)
    assert len(fills) == 1000
    assert counter.weight == budget.spent == sim.total_weight() == 20 + 50


def test_the_simulators_limiter_counts_the_surcharge(sim):
    sim.add_fill_history(ALICE, "ETH", 40)
    info = Info(sim.url, skip_ws=True, meta={"universe": []}, spot_meta={"universe": [], "tokens": []}, timeout=5)
    sim.reset_log()
    sim.set_config(ip_weight_limit=23)
    try:
        info.user_fills(ALICE)  # base 20 fits the minute; 40 fills add 2 once answered
        with pytest.raises(ClientError) as exc:
            info.user_state(ALICE)  # 22 + 2 > 23 (the base alone would have fitted: 20 + 2)
        assert exc.value.status_code == 429
    finally:
        sim.set_config(ip_weight_limit=None)


def set_stop(database_url: str, address: str, coin: str, stop: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE positions p SET stop_loss_price = %s FROM accounts a WHERE a.id = p.account_id"
                     " AND a.address = %s AND p.coin = %s AND p.closed_at IS NULL", (Decimal(stop), address, coin))


def test_a_busy_accounts_fills_read_is_charged_its_surcharge(env, sim):
    sim.open_position(ALICE, "SOL", "10", "20")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(env)  # the row is discovered
    sim.add_fill_history(ALICE, "ETH", 1200)  # a busy account: 1,200 fills inside the row's window ...
    sim.resize(ALICE, "SOL", "12", "20")  # ... and its position changed, so its fills are read
    sim.reset_log()

    report = run_json(env)

    assert report["updated"] == 1
    entries = fills_entries(sim)
    assert entries and all(e["status"] == 200 for e in entries)
    assert sum(e["weight"] for e in entries) >= 20 + 1201 // 20  # the simulator charged the page's items
    assert report["api_weight"] == sim.total_weight(), (report["api_weight"], sim.requests_log())
    assert report["requests"] == len(sim.requests_log())


def test_the_budget_defers_a_fills_read_whose_answer_could_take_the_run_past_it(env, sim, database_url):
    sim.open_position(ALICE, "SOL", "10", "20")
    sim.open_position(BOB, "SOL", "5", "20")
    for address in (ALICE, BOB):
        assert cli(env, "accounts", "add", address).returncode == 0
    run_json(env)
    set_stop(database_url, ALICE, "SOL", "1")  # never fires, but reads ALICE first (rows with exit rules)
    sim.add_fill_history(ALICE, "ETH", 1200)  # 1,201 fills to read: 20 + 61
    sim.resize(ALICE, "SOL", "12", "20")
    sim.reset_log()
    # allMids 2 + ALICE 2; her fills' base (20) fits in what is left of 100, a full page's surcharge (+100) does
    # not: the read would be charged 81 and take the run to 85, or with a busier account past 100.
    report = run_json(dict(env, MONITOR_WEIGHT_BUDGET="100", MONITOR_READ_PARALLELISM="1"), expect=None)

    assert report["deferred_accounts"] == [ALICE] and report["updated"] == 0
    assert sim.requests_log(type="userFillsByTime") == []
    assert [e["user"] for e in sim.requests_log(type="clearinghouseState")] == [ALICE, BOB]  # BOB still read
    assert report["api_weight"] == sim.total_weight() == 2 + 2 + 2 <= 100
    again = run_json(dict(env, MONITOR_WEIGHT_BUDGET="200", MONITOR_READ_PARALLELISM="1"))  # room for a page
    assert again["updated"] == 1 and again["deferred_accounts"] == []


def test_exit_work_is_charged_its_surcharge_past_the_budget_and_the_rest_waits():
    budget = WeightBudget(60)
    budget.hold(40)
    with budget.urgent():  # an account with exit work: checked on the base only
        budget.take("userFillsByTime", 20)
        budget.charge("userFillsByTime", 50)  # a busier account than the reserve planned for
    assert budget.spent == 70
    with pytest.raises(BudgetExhausted):
        budget.take("clearinghouseState", 2)


def test_parallel_reads_hold_the_worst_case_of_answers_in_flight():
    budget = WeightBudget(250)
    budget.take("userFillsByTime", 20)  # in flight on this thread: 20 spent, 100 held
    taken = threading.Event()

    def second() -> None:
        budget.take("userFillsByTime", 20)  # 120 + 120 <= 250: sent at once, 100 more held
        try:
            budget.take("userFillsByTime", 20)  # its own hold first let go, then 140 + 120 > 250: waits ...
        finally:
            taken.set()

    budget_thread = threading.Thread(target=second)
    budget_thread.start()
    assert not taken.wait(0.5)  # ... while the first answer is in flight
    assert budget.spent == 40
    budget.charge("userFillsByTime", 3)  # the first answer held 60 fills: its hold is let go
    budget_thread.join(5)
    assert taken.is_set() and budget.spent == 63 and budget.pending == 100


def test_a_read_the_budget_cannot_pay_even_with_nothing_in_flight_is_refused():
    budget = WeightBudget(110)
    with pytest.raises(BudgetExhausted):
        budget.take("userFillsByTime", 20)  # 20 + a full page's 100 > 110
    budget.take("clearinghouseState", 2)  # no items: its base is all it can cost


def test_a_fills_read_past_its_weight_cap_keeps_the_newest_fills(sim):
    # A busy account: 10,400 fills in a burst, then the close that matters. Reading the whole window would cost
    # more than a run can spend; the read stops at its cap with the most recent part, the close included.
    sim.open_position(ALICE, "SOL", "-12", "20")
    since = sim.now_ms() - 120_000
    time.sleep(0.05)
    sim.add_fill_history(ALICE, "ATOM", 10_400)
    sim.close_external(ALICE, "SOL", "21")
    exchange = Exchange(sim.url, timeout=5, fills_max_weight=500)
    sim.reset_log()
    with pytest.raises(FillsTruncated) as exc:
        exchange.read_fills(ALICE, since)
    assert exc.value.fills and exc.value.fills[-1].coin == "SOL" and exc.value.fills[-1].end_position == 0
    assert sim.total_weight() <= 500
    assert "userFills" in [e["type"] for e in sim.requests_log()]  # the newest 2,000 in one request
