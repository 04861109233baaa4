"""The batched apply phase (monitor/applying.py, issue 11 item 4), against the real PostgreSQL:

- open rows inserted many at a time, still through the partial unique index: a coin another writer
  opened first is a conflict, the others are inserted, and only they get a `discovered` event;
- updates and closes many at a time, each guarded by `closed_at IS NULL`: a row another writer closed
  meanwhile is a conflict, with no event and no second close;
- one account whose plan makes the database fail fails alone: the others of its batch are applied;
- a cold start of 50 accounts x 10 positions costs a handful of statements, not one per row and event;
- the driver's errors reach callers as the project's own (DatabaseError, DatabaseUnavailable).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from monitor import planner
from monitor.applying import apply_plans
from monitor.clock import to_ms
from monitor.database import Database
from monitor.errors import ClaimLost, DatabaseError
from monitor.planner import AccountPlan, Action

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def addresses(n: int) -> list[str]:
    return ["0x" + f"{i + 0xb00:040x}" for i in range(n)]


@pytest.fixture
def run(database_url):
    """A run's connection: it holds the lease (local-lock style) and will claim its accounts."""
    database = Database.open(database_url, lease_name="run")
    database.advance_epoch(run_id=f"run-{time.monotonic_ns()}", host="h", pid=1, start=None, stale_after=300)
    yield database
    database.close()


def accounts(db, run, n):
    found = [db.add_account(a, None)[0] for a in addresses(n)]
    assert run.claim_accounts([a.id for a in found], stale_after=300) == {a.id for a in found}
    return found


def discover(account, coin, size="1", **metadata):
    return Action(planner.DISCOVER, account.address, coin, side="long", size=Decimal(size),
                  entry_price=Decimal("100.5"), opened_at=NOW - timedelta(minutes=5), metadata=metadata)


def open_row(db, account, coin, size="1"):
    return db.insert_discovered(account_id=account.id, coin=coin, side="long", size=Decimal(size),
                                entry_price=Decimal("100"), opened_at=NOW - timedelta(hours=1), now=NOW)


def close(account, coin, position_id, reason="closed_externally", **metadata):
    return Action(planner.CLOSE, account.address, coin, position_id=position_id, side="long", size=Decimal(1),
                  reason=reason, exit_price=Decimal("101.25"), realized_pnl=Decimal("1.25"), fees=Decimal("0.01"),
                  closed_at=NOW - timedelta(seconds=30), metadata=metadata)


def events(db, run_id=None):
    rows = db._execute("SELECT position_id, event, from_status, to_status, reason, details, run_id"
                       " FROM position_events ORDER BY id").fetchall()
    return [r for r in rows if run_id is None or r[6] == run_id]


def test_batch_insert_reports_the_coin_another_writer_opened_first_as_a_conflict(db, run):
    alice, bob = accounts(db, run, 2)
    theirs = open_row(db, alice, "BTC", "3")  # another writer's open row (its own event)
    plans = [AccountPlan(alice, [discover(alice, "BTC"), discover(alice, "ETH", "2.50")]),
             AccountPlan(bob, [discover(bob, "BTC", "0.001")])]

    result = apply_plans(run, run.epoch, plans, now=NOW, record_followups=True)

    assert [(r.account.id, [a.coin for a in r.applied], r.conflicts, r.failure) for r in result] == [
        (alice.id, ["ETH"], 1, None), (bob.id, ["BTC"], 0, None)]
    rows = {(r["address"], r["coin"]): r for r in db.list_positions(status="open")}
    assert set(rows) == {(alice.address, "BTC"), (alice.address, "ETH"), (bob.address, "BTC")}
    assert rows[(alice.address, "BTC")]["id"] == theirs and rows[(alice.address, "BTC")]["size"] == 3  # untouched
    eth = rows[(alice.address, "ETH")]
    assert (eth["size"], eth["entry_price"], eth["side"], eth["status"]) == (Decimal("2.50"), Decimal("100.5"),
                                                                             "long", "open")
    mine = events(db, run.run_id)
    assert sorted(e[0] for e in mine) == sorted([eth["id"], rows[(bob.address, "BTC")]["id"]])  # inserted only
    by_id = {e[0]: e for e in mine}
    assert by_id[eth["id"]][1:6] == ("discovered", None, "open", "discovered",
                                     {"side": "long", "size": "2.50", "entry": "100.5"})
    assert [e[1] for e in events(db) if e[0] == theirs] == ["discovered"]  # the other writer's, alone


def test_batch_update_and_close_leave_a_row_another_writer_closed_alone(db, run):
    alice, bob = accounts(db, run, 2)
    btc, eth, bob_btc = open_row(db, alice, "BTC"), open_row(db, alice, "ETH"), open_row(db, bob, "BTC")
    db.run_id = "another-writer"
    assert db.close_position(eth, closed_at=NOW - timedelta(minutes=1), reason="closed_by_other", exit_price=None,
                             realized_pnl=None, fees=None)
    update = Action(planner.UPDATE, alice.address, "BTC", position_id=btc, side="long", size=Decimal("1.5"),
                    previous_size=Decimal(1), entry_price=Decimal("100.2"), realized_pnl=Decimal("0.3"))
    plans = [AccountPlan(alice, [update, close(alice, "ETH", eth)]),
             AccountPlan(bob, [close(bob, "BTC", bob_btc, note="x")])]

    result = apply_plans(run, run.epoch, plans, now=NOW, record_followups=False)

    assert [([a.type for a in r.applied], r.conflicts, r.failure) for r in result] == [
        (["update"], 1, None), (["close"], 0, None)]
    row = db.position(btc)
    assert (row.size, row.entry_price, row.realized_pnl, row.closed_at) == (Decimal("1.5"), Decimal("100.2"),
                                                                            Decimal("0.3"), None)
    assert row.last_seen_at == NOW
    closed = db.list_positions(status="closed")
    assert {r["id"]: r["close_reason"] for r in closed} == {eth: "closed_by_other", bob_btc: "closed_externally"}
    assert [e[1] for e in events(db) if e[0] == eth] == ["discovered", "closed"]  # no second close, no event
    (bob_closed,) = [r for r in closed if r["id"] == bob_btc]
    assert (bob_closed["exit_price"], bob_closed["realized_pnl"], bob_closed["fees"]) == (
        Decimal("101.25"), Decimal("1.25"), Decimal("0.01"))
    assert bob_closed["metadata"]["note"] == "x"
    mine = {(e[0], e[1]): e for e in events(db, run.run_id)}
    assert set(mine) == {(btc, "resized"), (bob_btc, "closed")}
    assert mine[(btc, "resized")][5] == {"from_size": "1", "to_size": "1.5", "entry": "100.2", "realized_pnl": "0.3",
                                         "fees": None}
    assert mine[(bob_btc, "closed")][2:6] == ("open", "closed", "closed_externally",
                                             {"exit_price": "101.25", "realized_pnl": "1.25", "fees": "0.01",
                                              "funding": None, "net_pnl": None, "note": "x"})

    # The same plans again: every change is now a conflict (or nothing to do), and nothing is written.
    before = db.positions_table_dump(), events(db)
    again = apply_plans(run, run.epoch, plans[1:], now=NOW, record_followups=False)
    assert (again[0].applied, again[0].conflicts) == ([], 1)
    assert (db.positions_table_dump(), events(db)) == before


def test_an_account_whose_plan_makes_the_database_fail_fails_alone(db, run):
    alice, bob, carol = accounts(db, run, 3)
    carol_btc = open_row(db, carol, "BTC")
    plans = [AccountPlan(alice, [discover(alice, "ETH")]),
             AccountPlan(bob, [discover(bob, "SOL"), discover(bob, "BTC", "0")]),  # size > 0 is a CHECK
             AccountPlan(carol, [close(carol, "BTC", carol_btc)])]

    result = apply_plans(run, run.epoch, plans, now=NOW, record_followups=False)

    assert [r.account.id for r in result] == [alice.id, bob.id, carol.id]
    ok_alice, failed_bob, ok_carol = result
    assert [a.coin for a in ok_alice.applied] == ["ETH"] and ok_alice.failure is None
    assert [a.type for a in ok_carol.applied] == ["close"] and ok_carol.failure is None
    assert failed_bob.applied == [] and failed_bob.conflicts == 0
    assert failed_bob.failure.startswith("database write failed: CheckViolation: ")
    assert db.list_positions(status="open", address=bob.address) == []  # all or nothing for bob
    assert [r["coin"] for r in db.list_positions(status="open", address=alice.address)] == ["ETH"]
    assert db.position(carol_btc).closed_at is not None
    assert run.list_accounts()  # the connection is usable after the failed batch


def test_a_flip_closes_then_reopens_the_coin_and_a_close_records_its_followup(db, run):
    alice, bob = accounts(db, run, 2)
    flipped, gone = open_row(db, alice, "BTC"), open_row(db, bob, "ETH")
    flip_close = close(alice, "BTC", flipped, reason="flipped")
    reopen = Action(planner.DISCOVER, alice.address, "BTC", side="short", size=Decimal(2), entry_price=Decimal(99),
                    opened_at=NOW, metadata={"flipped_from": flipped})
    bob_close = close(bob, "ETH", gone, close_fill_at=(NOW - timedelta(seconds=40)).isoformat())
    bob_reopen = Action(planner.DISCOVER, bob.address, "ETH", side="long", size=Decimal(1), entry_price=Decimal(1),
                        opened_at=NOW - timedelta(seconds=40), metadata={"reopened_after": gone})
    plans = [AccountPlan(alice, [flip_close, reopen]), AccountPlan(bob, [bob_close, bob_reopen])]

    result = apply_plans(run, run.epoch, plans, now=NOW, record_followups=True)

    assert [[a.type for a in r.applied] for r in result] == [["close", "discover"], ["close", "discover"]]
    assert [r.conflicts for r in result] == [0, 0]
    (new_btc,) = db.list_positions(status="open", address=alice.address)
    assert (new_btc["side"], new_btc["metadata"]) == ("short", {"flipped_from": flipped})
    followups = run.pending_followups([alice.id, bob.id])
    assert alice.id not in followups  # a flip records nothing
    (bob_followup,) = followups[bob.id]
    # re-opened in the close's own millisecond: the bound moves one millisecond back
    assert (bob_followup.coin, bob_followup.position_id, bob_followup.not_after_ms) == (
        "ETH", gone, to_ms(NOW - timedelta(seconds=40)) - 1)
    recorded = [e for e in events(db, run.run_id) if e[1] == "followup_recorded"]
    assert [(e[0], e[4], e[5]) for e in recorded] == [
        (gone, "cancel_orphans", {"followup_id": bob_followup.id, "coin": "ETH",
                                  "not_after_ms": bob_followup.not_after_ms})]


def test_a_lost_claim_stops_the_batch_before_it_writes(db, run):
    alice, bob = accounts(db, run, 2)
    db._execute("UPDATE account_claims SET released_at = now() WHERE account_id = %s", (bob.id,))
    plans = [AccountPlan(alice, [discover(alice, "BTC")]), AccountPlan(bob, [discover(bob, "BTC")])]
    with pytest.raises(ClaimLost, match=f"account {bob.id}"):
        apply_plans(run, run.epoch, plans, now=NOW, record_followups=False)
    assert db.list_positions(status="all") == []


def test_a_cold_start_of_50_accounts_costs_a_handful_of_statements(db, run):
    found = accounts(db, run, 50)
    coins = [f"C{j}" for j in range(10)]
    plans = [AccountPlan(a, [discover(a, coin, str(j + 1)) for j, coin in enumerate(coins)]) for a in found]
    before = run.statements

    result = apply_plans(run, run.epoch, plans, now=NOW, record_followups=True)

    spent = run.statements - before
    assert spent <= 5, spent  # the lease check, the claims check, one INSERT (its events in the same statement)
    assert sum(len(r.applied) for r in result) == 500 and not any(r.conflicts or r.failure for r in result)
    assert len(db.list_positions(status="open")) == 500
    assert len(events(db, run.run_id)) == 500

    # 10% resized and 5% closed: a handful more, not one per row.
    rows = db.list_positions(status="open")
    changes: dict[int, list[Action]] = {}
    by_address = {a.address: a for a in found}
    for index, row in enumerate(rows):
        account = by_address[row["address"]]
        if index % 20 == 0:
            changes.setdefault(account.id, []).append(close(account, row["coin"], row["id"]))
        elif index % 10 == 1:
            changes.setdefault(account.id, []).append(Action(
                planner.UPDATE, account.address, row["coin"], position_id=row["id"], side="long",
                size=row["size"] + 1, previous_size=row["size"], entry_price=row["entry_price"]))
    plans = [AccountPlan(a, changes[a.id]) for a in found if a.id in changes]
    before = run.statements
    result = apply_plans(run, run.epoch, plans, now=NOW, record_followups=True)
    spent = run.statements - before
    assert spent <= 6, spent  # lease, claims, closes, their follow-ups, updates
    assert sum(len(r.applied) for r in result) == 75


def test_the_drivers_errors_reach_callers_as_the_projects_own(db):
    with pytest.raises(DatabaseError, match="DivisionByZero") as caught:
        db._execute("SELECT 1 / 0")
    assert caught.value.exit_code == 70 and caught.value.kind == "DivisionByZero"
    with pytest.raises(DatabaseError, match="UniqueViolation"), db._transaction():
        db._execute("INSERT INTO accounts (address) VALUES (%s)", (addresses(1)[0],))
        db._execute("INSERT INTO accounts (address) VALUES (%s)", (addresses(1)[0],))
    assert db.list_accounts() == []  # rolled back, and the connection still works
