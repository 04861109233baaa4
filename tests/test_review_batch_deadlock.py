"""Red-team (batched apply): a platform transaction that touches rows of two accounts must not deadlock
the apply phase. Per-account transactions (before the batch) never held one account's row while waiting
for another's; a batch does (closes first, then updates), and the deadlock it loses surfaces as
DatabaseUnavailable: the whole run stops with exit 69 "database unavailable", every change of the batch
and of every later batch left for the next run."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import psycopg

from monitor import planner
from monitor.applying import apply_plans
from monitor.planner import AccountPlan, Action
from tests.test_applying import NOW, accounts, close, open_row, run  # noqa: F401


def _waiting_on_lock(db, pid: int) -> bool:
    row = db._execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock"


def test_a_platform_transaction_over_two_accounts_does_not_deadlock_the_apply_phase(db, run, database_url):
    alice, bob = accounts(db, run, 2)
    alice_btc, bob_eth = open_row(db, alice, "BTC"), open_row(db, bob, "ETH")
    resize = Action(planner.UPDATE, bob.address, "ETH", position_id=bob_eth, side="long", size=Decimal("2"),
                    previous_size=Decimal("1"), entry_price=Decimal("100"))
    plans = [AccountPlan(alice, [close(alice, "BTC", alice_btc)]), AccountPlan(bob, [resize])]

    platform = psycopg.connect(database_url)  # the trading app: one transaction over two accounts' rows
    platform.execute("SET deadlock_timeout = '20s'")  # let the monitor's backend be the one that detects it
    platform.execute("UPDATE positions SET stop_loss_price = 90 WHERE id = %s", (bob_eth,))

    outcome: dict[str, object] = {}

    def apply() -> None:
        try:
            outcome["result"] = apply_plans(run, run.epoch, plans, now=NOW, record_followups=False)
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc

    worker = threading.Thread(target=apply)
    worker.start()
    deadline = time.monotonic() + 10
    while not _waiting_on_lock(db, run.conn.info.backend_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    platform.execute("UPDATE positions SET stop_loss_price = 90 WHERE id = %s", (alice_btc,))
    platform.commit()
    platform.close()
    worker.join(30)

    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert [([a.type for a in r.applied], r.failure) for r in result] == [(["close"], None), (["update"], None)]
    assert db.position(alice_btc).closed_at is not None
    assert db.position(bob_eth).size == Decimal("2")


def test_a_row_another_writer_keeps_locked_fails_its_account_alone_not_the_run(db, run, database_url):
    """applying.py: "a batch that fails with anything but a fenced lock, a lost claim or a lost database is
    rolled back and applied again one account per transaction". A lock timeout (or a deadlock, a statement
    timeout) is none of those: the connection is fine. database._translated maps every OperationalError
    subclass (LockNotAvailable, DeadlockDetected, QueryCanceled, ...) to DatabaseUnavailable, so the batch
    is not retried: the other accounts' changes are rolled back and the run exits 69."""
    alice, bob, carol = accounts(db, run, 3)
    alice_btc, bob_eth, carol_sol = open_row(db, alice, "BTC"), open_row(db, bob, "ETH"), open_row(db, carol, "SOL")
    run._execute("SET lock_timeout = '300ms'")  # the production 15 s, shortened
    platform = psycopg.connect(database_url)  # a long transaction of the trading app on bob's row
    platform.execute("UPDATE positions SET stop_loss_price = 90 WHERE id = %s", (bob_eth,))
    try:
        plans = [AccountPlan(alice, [close(alice, "BTC", alice_btc)]),
                 AccountPlan(bob, [close(bob, "ETH", bob_eth)]),
                 AccountPlan(carol, [close(carol, "SOL", carol_sol)])]
        result = apply_plans(run, run.epoch, plans, now=NOW, record_followups=False)
    finally:
        platform.rollback()
        platform.close()
    assert [([a.type for a in r.applied], r.failure is None) for r in result] == [
        (["close"], True), ([], False), (["close"], True)]
    assert db.position(alice_btc).closed_at is not None and db.position(carol_sol).closed_at is not None
    assert db.position(bob_eth).closed_at is None


def test_a_writer_holding_many_accounts_rows_costs_two_lock_waits_then_the_rest_wait_a_run(db, run, database_url):
    """The one-by-one retry after a busy batch is bounded (applying.BUSY_RETRIES): a writer holding many
    accounts' rows costs two lock waits, not one per account of the batch (100 x 15 s)."""
    from monitor.applying import BUSY_RETRIES

    people = accounts(db, run, 4)
    rows = [open_row(db, person, "BTC") for person in people]
    run._execute("SET lock_timeout = '300ms'")
    platform = psycopg.connect(database_url)  # the trading app holds the first three accounts' rows
    platform.execute("UPDATE positions SET stop_loss_price = 90 WHERE id = ANY(%s)", (rows[:3],))
    try:
        plans = [AccountPlan(p, [close(p, "BTC", row)]) for p, row in zip(people, rows)]
        started = time.monotonic()
        result = apply_plans(run, run.epoch, plans, now=NOW, record_followups=False)
        spent = time.monotonic() - started
    finally:
        platform.rollback()
        platform.close()
    assert BUSY_RETRIES == 2 and all(r.failure is not None and not r.applied for r in result)
    assert "not tried" in (result[2].failure or "") and "not tried" in (result[3].failure or "")
    assert spent < 3 * 0.3 + 1  # the batch's wait and two retries' waits, no more
    assert all(db.position(row).closed_at is None for row in rows)  # nothing written: every close next run
