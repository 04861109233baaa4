"""Red-team findings on the issue-12 merges, each failing on the code before its fix."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from tests.conftest import ALICE


def test_a_bare_name_beside_prefixed_ones_is_never_taken_as_the_hip3_coins_mid() -> None:
    """allMids(dex="xyz") answering {"xyz:BTC": ..., "BTC": <the first dex's BTC>}: the bare BTC must not
    overwrite xyz:BTC's mid (a rule would fire, and an order be priced, off another market)."""
    from monitor.exchange import parse_mids

    assert parse_mids({"xyz:BTC": "100", "BTC": "60000"}, "xyz") == {"xyz:BTC": Decimal(100)}
    assert parse_mids({"BTC": "60000", "xyz:BTC": "100"}, "xyz") == {"xyz:BTC": Decimal(100)}
    assert parse_mids({"TSLA": "250"}, "xyz") == {"xyz:TSLA": Decimal(250)}  # no prefix anywhere: bare is ours


def test_an_order_the_budget_refuses_after_its_claim_releases_the_claim_at_once(db: Any, sim: Any,
                                                                                keyed: dict[str, str],
                                                                                monkeypatch: Any) -> None:
    """The order's weight is taken after the claim (just before signing): refused there, nothing was sent,
    so the row goes back to open now (close_not_placed) instead of waiting a run for the attempt to expire."""
    import monitor.exchange
    from monitor.config import load_settings
    from monitor.exchange import BudgetExhausted
    from monitor.runner import run_once

    settings = load_settings(environ=keyed)
    db.add_account(ALICE, None)
    sim.open_position(ALICE, "BTC", "1", "30000")
    run_once(settings)
    row = db.list_positions()[0]
    with db.conn.transaction():
        db.conn.execute("UPDATE positions SET stop_loss_price = %s WHERE id = %s", (Decimal("31000"), row["id"]))
    real_take = monitor.exchange.WeightBudget.take

    def take(self: Any, kind: str, weight: int) -> None:
        if kind == "exchange":
            raise BudgetExhausted(f"{kind} needs {weight}, 0 left (test)")
        real_take(self, kind, weight)

    monkeypatch.setattr(monitor.exchange.WeightBudget, "take", take)
    report = run_once(settings)
    assert report.close_orders_sent == 0 and report.exit_starved == 1
    after = db.position(row["id"])
    assert after is not None and after.status == "open" and after.close_cloid is None
    assert [e["event"] for e in db.position_events(row["id"])][-2:] == ["closing_claimed", "close_not_placed"]
    monkeypatch.undo()
    assert run_once(settings).close_orders_sent == 1  # the next run sends at once


def test_a_lease_whose_connection_died_is_let_go_without_an_error(db: Any, database_url: str) -> None:
    """pg_terminate_backend on the lease's own connection (chaos, seed 20261126): release() cannot release it
    (it lapses when stale) but must not raise, or the run's report never reaches `run --json` and the
    caller gets a stub without its epoch."""
    from monitor.database import Database, connect
    from monitor.lock import PostgresRunLock

    lock = PostgresRunLock(lambda: Database(connect(database_url)), stale_after=30, host="test-host")
    lock.acquire()
    assert lock._db is not None
    pid = lock._db.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    db.conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    lock.release()  # raised DatabaseUnavailable before the fix
