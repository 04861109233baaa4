"""Red-team findings on the run_once rewrite (963ac5c), each failing on that commit: what the Run class it
replaced (f35c735) did, and the rewrite must do too."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from tests.conftest import ALICE, BOB


def test_a_nul_in_a_failure_reason_does_not_crash_the_run(settings: Any, watched: list[Any], sim: Any,
                                                          db: Any, monkeypatch: Any) -> None:
    """Old _record caught psycopg.Error around the health and history writes (a warning; the run's exit
    code stands). New record_history catches (DatabaseUnavailable, DatabaseError), and nothing raises
    DatabaseError: a psycopg.DataError (here: a NUL byte from the exchange's error text) escapes setup's
    finally, the run crashes (70) after its work, its claims are not released and no alerts are sent."""
    from monitor.runner import run_once

    sim.open_position(ALICE, "BTC", "0.5", "30000")
    import monitor.exchange

    real_post = monitor.exchange.Exchange._post

    def post(self: Any, what: str, payload: dict[str, Any], weight: int) -> Any:
        if what == "clearinghouseState" and payload.get("user") == BOB:
            real_post(self, what, payload, weight)  # spend the request as the real one would
            return {"error": "upstream said: bad\x00 byte", "time": 1}  # an error body with another key
        return real_post(self, what, payload, weight)

    # The simulator cannot serve a NUL inside JSON text; the exchange could (a JSON \\u0000 escape).
    monkeypatch.setattr(monitor.exchange.Exchange, "_post", post)
    report = run_once(settings)  # 963ac5c: raises psycopg.DataError (NUL in the failure reason) here
    assert "bad\\x00 byte" in report.failures[0]["reason"], report.failures  # escaped, one printable line
    assert report.accounts_failed == 1 and report.exit_code == 1
    assert db.claim_holders([w.id for w in watched]) == {}  # claims released


def test_lock_lost_during_exit_work_stops_the_run(settings: Any, watched: list[Any], sim: Any, db: Any,
                                                  keyed: dict[str, str], monkeypatch: Any) -> None:
    """Old: the lock found lost at the next account of the (interleaved) apply/send loop set fenced,
    noted "lock lost", skipped touch_seen and account health, and exited 75. New: work_exits only skips
    the remaining accounts (`continue`/`break`) without run.stop(): mark_seen and the health record still
    write (the DB fence passes while the lease row's epoch is unchanged) and the run exits 0."""
    from monitor.closing import Closer
    from monitor.config import load_settings
    from monitor.runner import LOCK_LOST, run_once

    with_key = load_settings(environ=keyed)
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(BOB, "ETH", "1", "2000")
    sim.open_position(BOB, "SOL", "1", "100")  # stays confirmed: a seen row for mark_seen
    run_once(with_key)
    rows = {r["coin"]: r for r in db.list_positions()}
    with db.conn.transaction():
        for coin, stop in (("BTC", "31000"), ("ETH", "2100")):
            db.conn.execute("UPDATE positions SET stop_loss_price = %s WHERE id = %s",
                            (Decimal(stop), rows[coin]["id"]))
        db.conn.execute("UPDATE positions SET last_seen_at = now() - interval '1 day'")
    sent: list[str] = []
    original = Closer.send_orders

    def lose_lock(closer: Any) -> None:
        owner = closer.ctx.lock_lost.__self__  # new: the RunContext; old (f35c735): the lock's Event
        (owner.lock.compromised if hasattr(owner, "lock") else owner).set()

    def send_then_lose_lock(self: Any, account: Any, fired: Any) -> Any:
        sent.append(account.address)
        result = original(self, account, fired)
        lose_lock(self)  # the heartbeat notices the loss while this account's order goes out
        return result

    monkeypatch.setattr(Closer, "send_orders", send_then_lose_lock)
    report = run_once(with_key)
    assert len(sent) == 1  # the second account's order is not sent (old and new agree)
    assert report.fenced and report.exit_code == 75 and LOCK_LOST in report.notes
    sol = next(r for r in db.list_positions() if r["coin"] == "SOL")
    assert sol["last_seen_at"] is not None and (db.conn.execute("SELECT now() - %s > interval '1 hour'",
                                                                (sol["last_seen_at"],)).fetchone()[0])


def test_a_crash_after_writes_records_what_the_run_wrote(settings: Any, watched: list[Any], sim: Any, db: Any,
                                                         monkeypatch: Any) -> None:
    """Old: a crash kept the report built so far; monitor_runs got its counts (rows written, orders sent)
    and account_health the accounts read. New: setup replaces it with _empty_report (all zeros, no ids)."""
    import monitor.database

    sim.open_position(ALICE, "BTC", "0.5", "30000")
    sim.open_position(BOB, "ETH", "1", "2000")
    from monitor.runner import run_once

    run_once(settings)
    sim.resize(ALICE, "BTC", "0.7", "30000")  # a resize: written by the apply phase
    with db.conn.transaction():
        db.conn.execute("DELETE FROM account_health")

    def touch_seen(*_args: Any, **_kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug after the apply phase")

    monkeypatch.setattr(monitor.database.Database, "touch_seen", touch_seen)
    with pytest.raises(ZeroDivisionError):
        run_once(settings)
    assert db.list_positions()[0]["size"] == Decimal("0.7")  # the resize was committed
    last = db.recent_runs(1)[0]
    assert last["exit_code"] == 70
    assert last["counts"]["updated"] == 1  # new: 0


def test_fenced_before_setup_yields_is_not_turned_into_generator_didnt_yield(settings: Any, watched: list[Any],
                                                                            db: Any, monkeypatch: Any) -> None:
    """Latent (nothing raises Fenced before the yield today): setup's `except Fenced` does not re-raise, so a
    Fenced before `yield run` makes contextmanager raise RuntimeError("generator didn't yield") - exit 70 -
    after record_history already wrote exit 75 (or, with run still None, nothing at all)."""
    import monitor.database
    from monitor.errors import Fenced
    from monitor.runner import run_once

    def start_run(*_args: Any, **_kwargs: Any) -> None:
        raise Fenced("lock was taken over (test)")

    monkeypatch.setattr(monitor.database.Database, "start_run", start_run)
    with pytest.raises(Fenced):  # new: RuntimeError: generator didn't yield (exit 70)
        run_once(settings)
    assert all(r["exit_code"] in (None, 75) for r in db.recent_runs(1))  # never recorded as anything but 75
