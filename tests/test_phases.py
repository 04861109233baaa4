"""Each phase of a run, in-process, against the real PostgreSQL and the simulator (no subprocess).

The subprocess tests (test_reconcile, test_lock, ...) prove what a process does: its lock, its signals,
its exit codes. These prove what each phase returns for given inputs, which is how ``run_once`` reads.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from tests.conftest import ALICE, BOB


@pytest.fixture
def run(settings: Any) -> Any:
    """An open run (lock, database, epoch, history row), closed and recorded at the end of the test."""
    from monitor.clock import Clock
    from monitor.report import RunReport
    from monitor.runner import RunHooks, setup

    with setup(settings, dry_run=False, clock=Clock(), hooks=RunHooks(), exchange_factory=None) as context:
        yield context
        context.report = context.report or RunReport(run_id=context.run_id, dry_run=False, epoch=context.epoch)


def test_run_once_reads_as_its_phases(settings: Any, watched: list[Any], sim: Any, db: Any) -> None:
    from monitor.runner import run_once

    sim.open_position(ALICE, "BTC", "0.5", "30000")
    sim.open_position(BOB, "ETH", "-2", "2000")
    report = run_once(settings)
    assert (report.discovered, report.accounts_ok, report.exit_code) == (2, 2, 0)
    runs = db.recent_runs(1)
    assert runs[0]["exit_code"] == 0 and runs[0]["counts"]["discovered"] == 2


def test_inputs_claim_every_account_and_load_their_rows(run: Any, watched: list[Any], db: Any, sim: Any) -> None:
    from monitor.runner import load_inputs

    inputs = load_inputs(run, ())
    assert sorted(a.address for a in inputs.accounts) == sorted([ALICE, BOB])
    assert inputs.rows == {w.id: [] for w in watched} and inputs.held == {} and inputs.now is not None
    holders = db.claim_holders([a.id for a in watched])
    assert {h["run_id"] for h in holders.values()} == {run.run_id}


def test_inputs_of_an_unwatched_address_are_a_usage_error(run: Any, watched: list[Any]) -> None:
    from monitor.errors import UsageError
    from monitor.runner import load_inputs

    with pytest.raises(UsageError, match="not a watched account"):
        load_inputs(run, ["0x" + "cc" * 20])


def test_read_phase_plans_each_account_and_a_failed_read_is_a_failure(run: Any, watched: list[Any],
                                                                        sim: Any) -> None:
    from monitor import planner
    from monitor.runner import load_inputs, read_accounts

    sim.open_position(ALICE, "BTC", "0.5", "30000")
    sim.add_fault("500", path="info", type="clearinghouseState", user=BOB, count=None)
    inputs = load_inputs(run, ())
    reads = read_accounts(run, inputs)
    by_address = {r.account.address: r for r in reads.results}
    alice = by_address[ALICE]
    assert alice.failure is None and alice.plan is not None
    assert [(a.type, a.coin, a.size) for a in alice.plan.actions] == [(planner.DISCOVER, "BTC", Decimal("0.5"))]
    bob = by_address[BOB]
    assert bob.plan is None and bob.failure is not None and "500" in bob.failure
    assert reads.counter.requests >= 2  # one clearinghouseState per account at least


def test_apply_phase_writes_the_plans_and_counts_conflicts(run: Any, watched: list[Any], sim: Any,
                                                           db: Any) -> None:
    from monitor import planner
    from monitor.runner import apply_plans, load_inputs, read_accounts

    sim.open_position(ALICE, "BTC", "0.5", "30000")
    sim.open_position(BOB, "ETH", "1", "2000")
    reads = read_accounts(run, load_inputs(run, ()))
    # Another writer inserts Bob's row between this run's read and its apply.
    db.insert_discovered(account_id=watched[1].id, coin="ETH", side="long", size=Decimal("1"),
                         entry_price=Decimal("2000"), opened_at=run.clock.now(), now=run.clock.now())
    applied = apply_plans(run, reads)
    assert applied.counts.get(planner.DISCOVER) == 1 and applied.counts.get("conflicts") == 1
    assert applied.failures == {} and run.stopped is None
    open_rows = {(p["address"], p["coin"]) for p in db.list_positions()}
    assert open_rows == {(ALICE, "BTC"), (BOB, "ETH")}


def test_apply_phase_stops_writing_once_the_lock_is_lost(run: Any, watched: list[Any], sim: Any,
                                                         db: Any) -> None:
    from monitor.runner import LOCK_LOST, apply_plans, load_inputs, read_accounts

    sim.open_position(ALICE, "BTC", "0.5", "30000")
    reads = read_accounts(run, load_inputs(run, ()))
    run.lock.compromised.set()
    applied = apply_plans(run, reads)
    assert applied.counts == {} and run.stopped == LOCK_LOST
    assert db.list_positions() == []


def test_exit_phase_sends_a_fired_stop_and_the_report_counts_it(settings: Any, watched: list[Any], sim: Any,
                                                                 db: Any, keyed: dict[str, str]) -> None:
    from monitor.config import load_settings
    from monitor.runner import run_once

    with_key = load_settings(environ=keyed)
    sim.open_position(ALICE, "BTC", "1", "30000")
    run_once(with_key)
    row = db.list_positions()[0]
    with db.conn.transaction():
        db.conn.execute("UPDATE positions SET stop_loss_price = %s WHERE id = %s", (Decimal("31000"), row["id"]))
    report = run_once(with_key)
    assert report.close_orders_sent == 1
    assert [a.type for a in report.actions if a.type == "close_sent"] == ["close_sent"]


def test_build_report_names_accounts_held_by_another_run(run: Any, watched: list[Any], db: Any) -> None:
    from monitor.closing import CloseOutcome
    from monitor.runner import Applied, Inputs, Reads, build_report

    holder = {"run_id": "other", "lease": "run", "epoch": 7}
    inputs = Inputs(held={watched[0].id: (watched[0], holder)})
    report = build_report(run, inputs, Reads(), Applied(), CloseOutcome())
    assert report.accounts_deferred == 1 and report.deferred_accounts == [ALICE]
    assert report.held_by_other_runs == [{"account": ALICE, "run_id": "other", "lease": "run", "epoch": 7}]
    assert any("claimed by another run (run other" in n for n in report.notes)


def test_a_crash_is_recorded_with_the_code_the_process_exits_with(settings: Any, watched: list[Any],
                                                                   db: Any) -> None:
    from monitor.clock import Clock
    from monitor.errors import EXIT_SOFTWARE
    from monitor.runner import RunHooks, setup

    with pytest.raises(ZeroDivisionError), setup(settings, dry_run=False, clock=Clock(), hooks=RunHooks(),
                                                   exchange_factory=None):
        1 / 0  # noqa: B018 - a bug inside a phase
    assert db.recent_runs(1)[0]["exit_code"] == EXIT_SOFTWARE


def test_a_crash_exits_70_with_one_line(env: dict[str, str], monkeypatch: Any) -> None:
    """The CLI's side of the same promise: an unexpected exception is exit 70 (what the run recorded),
    one line; its traceback only in the log at debug level; never Python's exit 1."""
    from click.testing import CliRunner

    import monitor.operations
    from monitor.cli import cli

    def crash(*_args: Any, **_kwargs: Any) -> Any:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(monitor.operations, "execute_run", crash)
    result = CliRunner().invoke(cli, ["run"], env=env)
    assert result.exit_code == 70, result.output
    assert result.output == "position-monitor: internal error: ZeroDivisionError: boom\n"


def test_an_order_left_by_the_deadline_marks_the_run_overran(watched: list[Any], sim: Any, db: Any,
                                                              keyed: dict[str, str]) -> None:
    """A fired rule whose order the run had no time left to send is work left for the next run: the
    report says the run overran (alert run_overran), not only a note (chaos 500, seed 20263264)."""
    from monitor.config import load_settings
    from monitor.runner import run_once

    with_key = load_settings(environ=keyed)
    sim.open_position(ALICE, "BTC", "1", "30000")
    run_once(with_key)
    row = db.list_positions()[0]
    with db.conn.transaction():
        db.conn.execute("UPDATE positions SET stop_loss_price = %s WHERE id = %s", (Decimal("31000"), row["id"]))
    short = load_settings(environ=dict(keyed, MONITOR_LOCK_STALE_AFTER="2"))  # a 1.6 s deadline: no time to send
    report = run_once(short)
    assert report.close_orders_sent == 0 and any("deadline" in n for n in report.notes)
    assert report.overrun and report.to_json()["overrun"] is True
    assert run_once(with_key).close_orders_sent == 1  # and the next run sends it


@pytest.mark.parametrize("stopped", ["before_apply", "lock_lost_in_apply"])
def test_a_run_stopped_before_its_writes_does_not_record_those_accounts_as_freshly_read(
        run: Any, watched: list[Any], sim: Any, stopped: str) -> None:
    """Red team: a run stopped (a signal, a lost lock, a fault) before an account's changes were written counted
    that account as read OK, so account_health said "freshly read" while its rows still showed the old state;
    a hedge group judging that account from the table (another shard's run) then trusted stale rows. An account
    whose plan wrote nothing needed no write and stays OK."""
    from monitor.runner import _partial_report, apply_plans, load_inputs, read_accounts

    sim.open_position(ALICE, "BTC", "0.5", "30000")  # ALICE's plan has a change (a discovery), BOB's none
    run.inputs = load_inputs(run, ())
    run.reads = read_accounts(run, run.inputs)
    if stopped == "lock_lost_in_apply":
        run.lock.compromised.set()
        apply_plans(run, run.reads)
    report = _partial_report(run)
    assert report.ok_account_ids == [watched[1].id]  # BOB only: ALICE's discovery was never written
