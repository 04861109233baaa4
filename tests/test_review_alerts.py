"""Review of alert liveness: each test fails on the code before its fix (commit c514d5c).

Pure tests of ``decide_alerts`` / ``alert_scope`` / ``held_conditions`` for the logic; end to end (the real CLI,
PostgreSQL and the simulator) where the alert state crosses runs.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg

from monitor.notify import AlertState, decide_alerts
from monitor.operations import alert_scope, held_conditions
from monitor.report import RunReport
from monitor.runner import in_shard
from tests.conftest import ALICE, cli, run_json

BOB = "0x" + "b2" * 20
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def _insert(url: str, key: str, kind: str, message: str, *, active: bool = True, streak: int = 3) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO monitor_alerts (key, kind, streak, active, message, first_seen_at, last_seen_at,"
                     " last_sent_at) VALUES (%s, %s, %s, %s, %s, now(), now(), now())",
                     (key, kind, streak, active, message))


def _alert(url: str, key: str) -> tuple[int, bool] | None:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT streak, active FROM monitor_alerts WHERE key = %s", (key,)).fetchone()
    return None if row is None else (row[0], row[1])


# ---- L1. an escalation is sent once per activation ----------------------------------------------------


def test_an_imbalance_oscillating_around_the_urgent_boundary_escalates_once():
    states: dict[str, AlertState] = {}
    sent = []
    for i in range(8):
        kind = "hedge_imbalance_urgent" if i % 2 == 0 else "hedge_imbalance"
        states, to_send, to_resolve = decide_alerts(
            states, {"hedge_imbalance:g": (kind, f"g imbalanced ({kind})")}, NOW + timedelta(minutes=i),
            threshold_runs=3, resend_after=timedelta(hours=1))
        sent += to_send
        assert not to_resolve
        assert states["hedge_imbalance:g"].kind == "hedge_imbalance_urgent"  # never downgraded while active
    assert len(sent) == 1
    # resolved: the kind starts over, and a new activation may escalate again
    states, _, resolved = decide_alerts(states, {}, NOW + timedelta(minutes=9), threshold_runs=3,
                                        resend_after=timedelta(hours=1))
    assert resolved and not states["hedge_imbalance:g"].active
    states, to_send, _ = decide_alerts(states, {"hedge_imbalance:g": ("hedge_imbalance", "x")},
                                       NOW + timedelta(minutes=10), threshold_runs=1, resend_after=None)
    assert states["hedge_imbalance:g"].kind == "hedge_imbalance" and to_send
    states, to_send, _ = decide_alerts(states, {"hedge_imbalance:g": ("hedge_imbalance_urgent", "y")},
                                       NOW + timedelta(minutes=11), threshold_runs=1, resend_after=None)
    assert to_send == [("hedge_imbalance:g", "y")]


# ---- L3. an account a run did not read keeps its alerts -----------------------------------------------


def test_alert_scope_holds_the_account_alerts_of_accounts_deferred_or_held():
    report = RunReport(run_id="r", dry_run=False, deferred_accounts=[ALICE])  # budget, deadline or another's claim
    owns = alert_scope(report, [ALICE, BOB])
    for state in (AlertState(f"account_failed:{ALICE}", "account_failed"),
                  AlertState("close_failed:7", "close_failed", message=f"close of {ALICE} BTC rejected"),
                  AlertState("close_blocked_open_orders:7", "close_blocked_open_orders", message=f"{ALICE} BTC"),
                  AlertState("followup_failed:3", "followup_failed", message=f"follow-up #3 (cancel, {ALICE} BTC)")):
        assert not owns(state), state.key
    assert owns(AlertState(f"account_failed:{BOB}", "account_failed"))


def _claim_elsewhere(url: str):
    from monitor.database import Database

    db = Database.open(url, lease_name="run:shard-1-of-2")
    db.advance_epoch(run_id="other-run", host="h", pid=1, start=None, stale_after=300)
    return db


def test_account_failed_streak_survives_a_run_that_found_the_account_claimed_elsewhere(env, sim, database_url):
    env = dict(env, MONITOR_ALERT_AFTER_RUNS="2", MONITOR_LOCK_BACKEND="postgres")
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    sim.add_fault("500", path="info", type="clearinghouseState", user=ALICE, count=None)
    run_json(env, expect=1)
    assert _alert(database_url, f"account_failed:{ALICE}") == (1, False)
    other = _claim_elsewhere(database_url)
    try:
        [account_id] = [a.id for a in other.list_accounts()]
        assert other.claim_accounts([account_id], stale_after=300) == {account_id}
        held = run_json(env)  # ALICE deferred: claimed by a live run
        assert held["deferred_accounts"] == [ALICE]
        assert _alert(database_url, f"account_failed:{ALICE}") == (1, False)  # neither counted nor reset
        other.release_claims()
    finally:
        other.close()
    run_json(env, expect=1)
    assert _alert(database_url, f"account_failed:{ALICE}") == (2, True)  # the second failed read in a row alerts


# ---- L4. keys no run owns -------------------------------------------------------------------------------


def test_alert_scope_of_a_sharded_run_takes_orphaned_run_wide_keys_and_disabled_accounts():
    report = RunReport(run_id="r", dry_run=False, shard="shard-1-of-3", scope_addresses=[ALICE])
    owns = alert_scope(report, [ALICE])
    assert owns(AlertState("run_overran:shard-1-of-3", "run_overran"))
    assert not owns(AlertState("run_overran:shard-2-of-3", "run_overran"))  # a live shard's
    assert owns(AlertState("run_overran", "run_overran"))  # from before sharding
    assert owns(AlertState("conflicts:shard-2-of-2", "conflicts"))  # from before the count changed
    assert owns(AlertState("rows_unwatched:xyz:shard-1-of-2", "rows_unwatched"))
    assert owns(AlertState(f"account_failed:{BOB}", "account_failed"))  # BOB not active: every run's
    assert not alert_scope(report, [ALICE, BOB])(AlertState(f"account_failed:{BOB}", "account_failed"))


def test_sharded_runs_resolve_keys_no_run_owns(env, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(BOB, "BTC", "1", "30000")
    for address in (ALICE, BOB):
        assert cli(env, "accounts", "add", address).returncode == 0
    assert cli(env, "accounts", "disable", BOB).returncode == 0
    _insert(database_url, "conflicts", "conflicts", "2 change(s) already made by another writer")
    _insert(database_url, "run_overran:shard-2-of-2", "run_overran", "a run reached its deadline")
    _insert(database_url, f"account_failed:{BOB}", "account_failed", f"account {BOB} failed: 500")
    k = 1 if in_shard(ALICE, (1, 3)) else 2 if in_shard(ALICE, (2, 3)) else 3
    run_json(env, "--shard", f"{k}/3")
    assert _alert(database_url, "conflicts") == (0, False)
    assert _alert(database_url, "run_overran:shard-2-of-2") == (0, False)
    assert _alert(database_url, f"account_failed:{BOB}") == (0, False)


# ---- L5. key_unreadable resolves only when a run read the key -----------------------------------------


def test_key_unreadable_is_held_unless_the_key_was_read():
    quiet = RunReport(run_id="r", dry_run=False)
    assert "key_unreadable" in held_conditions(quiet)  # never read, or key_if_readable failed
    assert "key_unreadable" not in held_conditions(RunReport(run_id="r", dry_run=False, key_read=True))
    assert "key_unreadable" not in held_conditions(RunReport(run_id="r", dry_run=False, key_error="unreadable"))
    sharded = RunReport(run_id="r", dry_run=False, shard="shard-1-of-2")
    assert "key_unreadable:shard-1-of-2" in held_conditions(sharded)


def test_a_quiet_run_does_not_resolve_key_unreadable(keyed, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    _insert(database_url, "key_unreadable", "key_unreadable", "the key file could not be read", streak=1)
    run_json(keyed)  # nothing to sign: the key is not read
    assert _alert(database_url, "key_unreadable") == (1, True)


# ---- L6. a one-account run leaves the cron run's run-wide keys alone ---------------------------------


def test_a_run_narrowed_by_account_owns_no_run_wide_keys():
    report = RunReport(run_id="r", dry_run=False, scope_addresses=[ALICE])
    owns = alert_scope(report, [ALICE, BOB], accounts_named=True)
    for kind in ("conflicts", "rows_unwatched", "clock_offset", "key_unreadable", "exit_starved", "run_overran"):
        assert not owns(AlertState(kind, kind)), kind
    assert owns(AlertState("lock_busy", "lock_busy")) and owns(AlertState("lock_stale_holder", "lock_stale_holder"))
    assert owns(AlertState(f"account_failed:{ALICE}", "account_failed"))


def test_a_manual_one_account_run_does_not_resolve_the_cron_runs_alerts(env, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    keys = {"rows_unwatched:xyz": "rows_unwatched", "conflicts": "conflicts", "clock_offset": "clock_offset",
            "exit_starved": "exit_starved"}
    for key, kind in keys.items():
        _insert(database_url, key, kind, f"{kind} seen by the cron run")
    run_json(env, "--account", ALICE)
    assert {key: _alert(database_url, key) for key in keys} == dict.fromkeys(keys, (3, True))
    run_json(env)  # the cron run owns them: none seen, all resolved
    assert {key: _alert(database_url, key) for key in keys} == dict.fromkeys(keys, (0, False))


def test_a_group_unknown_for_a_reason_that_alerts_elsewhere_holds_its_hedge_unknown_alert():
    """Red team L2: shard 2 (its leg's read failed: unknown, covered by account_failed) resolved hedge_unknown
    while shard 1 (the same leg stale in the table) was building it: the streak went 1, 0, 1... It is held."""
    from decimal import Decimal

    from monitor.hedges import UNKNOWN, HedgeResult
    from monitor.operations import held_conditions
    from monitor.report import RunReport

    report = RunReport(dry_run=False, run_id="r", epoch=1)
    report.key_read = True
    report.hedges = [HedgeResult(1, "g", "BTC", Decimal("0.1"), UNKNOWN, None, [], reason="read failed",
                                 alerted_elsewhere=True),
                     HedgeResult(2, "h", "BTC", Decimal("0.1"), UNKNOWN, None, [], reason="no legs")]
    held = held_conditions(report)
    assert "hedge_unknown:g" in held and "hedge_unknown:h" not in held
