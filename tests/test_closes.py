"""Closes exactly once: exit rules, orders on the exchange, crash recovery, stale reads, orphaned orders."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal

import psycopg
import pytest

from tests.conftest import ALICE, ROOT, cli, run_json


def orders_sent(sim):
    return [r for r in sim.requests_log() if r["path"].endswith("/exchange") and r.get("type") == "order"]


def setup(env, sim, coin="BTC", szi="1", px="30000"):
    sim.open_position(ALICE, coin, szi, px)
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(env)


def set_row(database_url, coin, **columns):
    assignments = ", ".join(f"{k} = %s" for k in columns)
    with psycopg.connect(database_url) as conn:
        conn.execute(f"UPDATE positions SET {assignments} WHERE coin = %s AND closed_at IS NULL",
                     (*columns.values(), coin))


def row(database_url, coin):
    with psycopg.connect(database_url) as conn:
        cur = conn.execute("SELECT * FROM positions WHERE coin = %s ORDER BY id DESC LIMIT 1", (coin,))
        return dict(zip([c.name for c in cur.description], cur.fetchone()))


def test_stop_loss_sends_exactly_one_order_over_three_runs(keyed, sim, database_url):
    setup(keyed, sim)
    sim.set_mid("BTC", "29000")
    set_row(database_url, "BTC", stop_loss_price=Decimal("29500"))
    sim.reset_log()

    reports = [run_json(keyed) for _ in range(3)]

    assert len(orders_sent(sim)) == 1
    assert reports[0]["close_orders_sent"] == 1 and reports[0]["closed"] == 1
    assert reports[1]["close_orders_sent"] == reports[2]["close_orders_sent"] == 0
    closed = row(database_url, "BTC")
    assert closed["status"] == "closed" and closed["close_reason"] == "stop_loss"
    assert closed["exit_price"] == Decimal("29000")  # the IOC filled at the mid
    assert closed["realized_pnl"] == Decimal("-1000")
    assert sim.position(ALICE, "BTC") is None


@pytest.mark.parametrize("rule, columns, mid", [
    ("take_profit", {"take_profit_price": Decimal("31000")}, "31500"),
    ("requested", {"close_requested_at": "now()"}, "30000"),
    ("max_hold", {"max_hold_seconds": 1}, "30000"),
])
def test_other_exit_rules_close_with_their_reason(keyed, sim, database_url, rule, columns, mid):
    setup(keyed, sim)
    sim.set_mid("BTC", mid)
    if rule == "requested":
        with psycopg.connect(database_url) as conn:
            conn.execute("UPDATE positions SET close_requested_at = now()")
    else:
        set_row(database_url, "BTC", **columns)
    time.sleep(1.1 if rule == "max_hold" else 0)
    report = run_json(keyed)
    assert report["close_orders_sent"] == 1
    assert row(database_url, "BTC")["close_reason"] == rule


def test_trailing_stop_tracks_the_best_price_then_fires(keyed, sim, database_url):
    setup(keyed, sim)
    set_row(database_url, "BTC", trailing_stop_pct=Decimal("5"))
    sim.set_mid("BTC", "32000")
    run_json(keyed)
    assert row(database_url, "BTC")["best_price"] == Decimal("32000")
    sim.set_mid("BTC", "30500")  # 4.7 % below the best: holds
    assert run_json(keyed)["close_orders_sent"] == 0
    sim.set_mid("BTC", "30300")  # 5.3 % below: fires
    assert run_json(keyed)["close_orders_sent"] == 1
    assert row(database_url, "BTC")["close_reason"] == "trailing_stop"


def test_without_a_key_exit_rules_report_would_close_and_send_nothing(env, sim, database_url):
    setup(env, sim)
    set_row(database_url, "BTC", stop_loss_price=Decimal("31000"))
    sim.reset_log()
    report = run_json(env)
    assert report["would_close"] == 1 and report["close_orders_sent"] == 0
    assert not orders_sent(sim)
    assert row(database_url, "BTC")["status"] == "open"


def test_dry_run_sends_nothing_even_with_a_key_and_rules_firing(keyed, sim, database_url):
    setup(keyed, sim)
    set_row(database_url, "BTC", stop_loss_price=Decimal("31000"))
    sim.reset_log()
    report = run_json(keyed, "--dry-run")
    assert report["would_close"] == 1
    assert not [r for r in sim.requests_log() if r["path"].endswith("/exchange")]
    assert row(database_url, "BTC")["status"] == "open"


def test_ten_concurrent_close_requests_then_runs_send_exactly_one_order(keyed, sim, database_url):
    setup(keyed, sim)
    position_id = row(database_url, "BTC")["id"]
    procs = [subprocess.Popen([sys.executable, "-m", "monitor", "close", str(position_id)], env=keyed, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(10)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 10
    assert sum("close requested" in out for out in outputs) == 1
    sim.reset_log()
    runs = [subprocess.Popen([sys.executable, "-m", "monitor", "run", "--json"], env=keyed, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in runs:
        proc.communicate(timeout=60)
    run_json(keyed)
    assert len(orders_sent(sim)) == 1
    assert row(database_url, "BTC")["close_reason"] == "requested"


def test_claiming_a_close_is_won_by_exactly_one_of_ten_connections(database_url, db):
    from monitor.database import Database

    account, _ = db.add_account(ALICE, None)
    db.conn.execute("INSERT INTO positions (account_id, coin, side, size) VALUES (%s, 'BTC', 'long', 1)", (account.id,))
    position_id = db.list_positions()[0]["id"]
    barrier = threading.Barrier(10)
    wins = []

    def claim(n):
        other = Database.open(database_url)
        try:
            barrier.wait()
            wins.append(other.claim_close(position_id, cloid=f"0x{n:032x}", rule="requested", attempts=0,
                                          now=datetime.now(timezone.utc)))
        finally:
            other.close()

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1 and wins.count(False) == 9


def test_exchange_already_flat_is_success_not_error(keyed, sim, database_url):
    setup(keyed, sim)
    set_row(database_url, "BTC", stop_loss_price=Decimal("31000"))
    sim.add_fault("stale", user=ALICE, count=None)  # the snapshot still shows BTC ...
    sim.add_fault("stale", user=ALICE, type="userFillsByTime", count=None)  # ... and so do the fills ...
    sim.close_external(ALICE, "BTC", "30100")  # ... but it was closed outside
    report = run_json(keyed)
    sent = [a for a in report["actions"] if a["type"] == "close_sent"]
    assert sent and sent[0]["metadata"]["outcome"] == "no_position"
    assert row(database_url, "BTC")["status"] == "open"  # no closing fill visible yet: back to open, no figures
    sim.clear_faults()
    run_json(keyed)
    closed = row(database_url, "BTC")
    assert closed["status"] == "closed" and closed["close_reason"] == "external"
    assert closed["exit_price"] == Decimal("30100")


def test_sigkill_between_order_and_db_write_sends_no_second_order(keyed, sim, database_url):
    setup(keyed, sim)
    set_row(database_url, "BTC", stop_loss_price=Decimal("31000"))
    sim.add_fault("drop_response", mode="hang", seconds=30)  # the order is applied; the answer never comes
    sim.reset_log()
    keyed_slow = dict(keyed, MONITOR_HTTP_TIMEOUT="30")
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--json"], env=keyed_slow, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while sim.position(ALICE, "BTC") is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # the order was applied; its answer hangs (the log records it only when answered)
    assert sim.position(ALICE, "BTC") is None
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert row(database_url, "BTC")["status"] == "closing"  # the claim was committed before sending
    sim.clear_faults()

    for _ in range(3):
        run_json(keyed)

    # Every order the exchange received (the request log records the hung one only when it answers).
    placed = [o for o in sim.orders(ALICE) if o.get("cloid")]  # the monitor's orders (the scripted open has none)
    assert len(placed) == 1, placed
    closed = row(database_url, "BTC")
    assert closed["status"] == "closed" and closed["close_reason"] == "stop_loss"


def test_an_order_that_never_arrived_is_settled_by_cloid_then_retried(keyed, sim, database_url):
    setup(keyed, sim)
    set_row(database_url, "BTC", stop_loss_price=Decimal("31000"))
    sim.add_fault("500", path="exchange", count=1)  # the order never reaches the book
    first = run_json(keyed)
    assert first["close_orders_sent"] == 1
    held = row(database_url, "BTC")
    assert held["status"] == "closing"
    second = run_json(keyed)  # within expiresAfter: nothing is sent again
    assert second["close_orders_sent"] == 0
    assert held["close_expires_at"] is not None and held["close_expires_at"] > held["close_started_at"]
    with psycopg.connect(database_url) as conn:  # an old claim time alone does not let the settler look
        conn.execute("UPDATE positions SET close_started_at = close_started_at - interval '30 seconds'")
    sim.reset_log()
    early = run_json(keyed)  # the order's own expiresAfter has not passed: it may still land
    assert early["close_orders_sent"] == 0 and row(database_url, "BTC")["status"] == "closing"
    assert not [r for r in sim.requests_log() if r["type"] == "orderStatus"]
    with psycopg.connect(database_url) as conn:  # let the order's expiresAfter pass
        conn.execute("UPDATE positions SET close_expires_at = close_expires_at - interval '30 seconds'")
    sim.reset_log()
    third = run_json(keyed)  # unknownOid -> released, and the rule that still fires sends a new cloid now
    assert third["close_orders_sent"] == 1  # in the same run, not the next (chaos 500, seed 20261583)
    fourth = run_json(keyed)
    assert fourth["close_orders_sent"] == 0
    closed = row(database_url, "BTC")
    assert closed["status"] == "closed" and closed["close_attempts"] == 2
    statuses = [r["type"] for r in sim.requests_log() if r["type"] == "orderStatus"]
    assert statuses


def test_liquidation_is_recorded_as_such(env, sim, database_url):
    setup(env, sim, "ETH", "3", "1900")
    sim.liquidate(ALICE, "ETH", "1700")
    report = run_json(env)
    assert report["closed"] == 1
    closed = row(database_url, "ETH")
    assert closed["close_reason"] == "liquidation" and closed["exit_price"] is not None


def test_stale_snapshot_after_a_close_creates_no_ghost(env, sim, db):
    setup(env, sim)
    sim.add_fault("stale", user=ALICE, count=None)  # frozen: BTC still open
    sim.close_external(ALICE, "BTC", "30500")
    sim.clear_faults()
    assert run_json(env)["closed"] == 1
    sim.add_fault("stale", user=ALICE, k=1, count=None)  # lags one change behind: shows BTC again
    report = run_json(env)
    assert report["discovered"] == 0
    assert not db.list_positions(status="open")
    sim.clear_faults()
    sim.open_position(ALICE, "BTC", "2", "30600")  # a real re-open is adopted (a fill proves it)
    assert run_json(env)["discovered"] == 1


def test_orphaned_trigger_orders_are_cancelled(keyed, sim, database_url):
    setup(keyed, sim)
    sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl")
    sim.add_trigger_order(ALICE, "BTC", "A", "1", "33000", "tp")
    sim.close_external(ALICE, "BTC", "30500")
    dry = run_json(keyed, "--dry-run")
    assert len([a for a in dry["actions"] if a["type"] == "cancel_order"]) == 2
    assert len(sim.orders(ALICE, open_only=True)) == 2
    report = run_json(keyed)
    cancels = [a for a in report["actions"] if a["type"] == "cancel_order"]
    assert len(cancels) == 2 and all(a["reason"] == "position gone" for a in cancels)
    assert sim.orders(ALICE, open_only=True) == []


def test_positions_reduced_partially_keep_the_rest_after_a_partial_fill(keyed, sim, database_url):
    setup(keyed, sim, "SOL", "10", "20")
    sim.set_mid("SOL", "20")
    sim.set_partial_fill_ratio("SOL", "0.4")
    set_row(database_url, "SOL", stop_loss_price=Decimal("25"))
    first = run_json(keyed)
    assert first["close_orders_sent"] == 1
    after = row(database_url, "SOL")
    assert after["status"] == "open" and after["size"] == Decimal("6")  # the true size, from the fills
    sim.set_partial_fill_ratio("SOL", None)
    second = run_json(keyed)  # the rule is still armed and fires again for the rest
    assert second["close_orders_sent"] == 1
    final = row(database_url, "SOL")
    assert final["status"] == "closed" and final["close_reason"] == "stop_loss"
    assert final["exit_price"] == Decimal("20")
