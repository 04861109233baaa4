"""Red-team (batched apply): a run stopped in the apply phase by a database fault (exit 69) is recorded
with what its phases did (runner.setup: "a run stopped by an exception is recorded with what it did").
Batches committed before the fault are in the table, but ``run.applied`` is only assigned when
``apply_plans`` returns, so monitor_runs says 0 discovered/closed, and the accounts whose changes were
rolled back get a good read recorded (account_health)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ALICE, BOB


def test_a_run_stopped_mid_apply_records_the_batches_it_committed(settings: Any, watched: list[Any], sim: Any,
                                                                  db: Any, monkeypatch: Any) -> None:
    from monitor import applying
    from monitor.database import Database
    from monitor.errors import DatabaseUnavailable
    from monitor.runner import run_once

    monkeypatch.setattr(applying, "BATCH_ACCOUNTS", 1)
    bob_id = next(a.id for a in watched if a.address == BOB)
    real = Database.insert_discovered_many

    def failing(self: Database, rows: Any, now: Any) -> Any:
        if any(r.account_id == bob_id for r in rows):  # e.g. a deadlock or lock timeout (mapped to 69)
            raise DatabaseUnavailable("database unavailable: deadlock detected")
        return real(self, rows, now)

    monkeypatch.setattr(Database, "insert_discovered_many", failing)
    sim.open_position(ALICE, "BTC", "0.5", "30000")
    sim.open_position(BOB, "ETH", "-2", "2000")
    with pytest.raises(DatabaseUnavailable):
        run_once(settings)
    assert [r["address"] for r in db.list_positions(status="open")] == [ALICE]  # alice's batch committed
    (recorded,) = db.recent_runs(1)
    assert recorded["exit_code"] == 69
    assert recorded["counts"]["discovered"] == 1, recorded["counts"]
