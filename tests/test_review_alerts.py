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
