"""Durable follow-ups: the orders a closed position leaves behind are cancelled even when the read or the
cancel fails, or the run dies, between the close and the cancel (real CLI, real PostgreSQL, simulator).

Each test first checks the exchange (the stranded order is gone / kept), which fails on the code before
follow-ups existed, then the follow-up row and the audit trail.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from decimal import Decimal

import psycopg

from tests.conftest import ALICE, ROOT, cli, run_json


def setup(env, sim, coin="BTC"):
    sim.open_position(ALICE, coin, "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(env)


def open_oids(sim, coin="BTC"):
    return sorted(o["oid"] for o in sim.orders(ALICE, open_only=True) if o["coin"] == coin)


def query(database_url, sql, params=()):
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(sql, params)
        return [dict(zip([c.name for c in cur.description], r)) for r in cur.fetchall()]


def followups(database_url):
    return query(database_url, "SELECT * FROM followups ORDER BY id")


def events(database_url, position_id):
    return [e["event"] for e in query(database_url, "SELECT event FROM position_events WHERE position_id = %s"
                                      " ORDER BY id", (position_id,))]


def closed_row(database_url, coin="BTC"):
    rows = query(database_url, "SELECT * FROM positions WHERE coin = %s AND closed_at IS NOT NULL ORDER BY id DESC",
                 (coin,))
    return rows[0] if rows else None


def info_requests(sim, kind):
    return [r for r in sim.requests_log() if r.get("type") == kind]


def test_open_orders_unreadable_after_a_close_the_next_run_cancels_the_stranded_stop(keyed, sim, database_url):
    setup(keyed, sim)
    stop = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl")
    sim.close_external(ALICE, "BTC", "30500")
    sim.add_fault("500", path="info", type="frontendOpenOrders", count=None)
    first = run_json(keyed)
    assert first["closed"] == 1 and first["exit_code"] == 0
    assert open_oids(sim) == [stop]  # could not be read, so not cancelled
    sim.clear_faults()

    second = run_json(keyed)  # nothing else happens on this account: the follow-up alone brings the run here
    assert open_oids(sim) == []
    cancels = [a for a in second["actions"] if a["type"] == "cancel_order"]
    assert [a["metadata"]["oid"] for a in cancels] == [stop]

    [followup] = followups(database_url)
    position = closed_row(database_url)
    assert (followup["status"], followup["attempts"], followup["kind"]) == ("done", 1, "cancel_orphans")
    assert followup["position_id"] == position["id"] and followup["done_at"] is not None
    assert "frontendOpenOrders" in followup["last_error"]
    assert first["followups"][0]["status"] == "pending" and first["followups"][0]["attempts"] == 1
    assert second["followups"][0]["status"] == "done"
    assert events(database_url, position["id"])[-4:] == ["closed", "followup_recorded", "followup_failed",
                                                         "orders_cancelled"]
    # Steady state: nothing pending, so open orders are not read at all.
    sim.reset_log()
    third = run_json(keyed)
    assert info_requests(sim, "frontendOpenOrders") == [] and third["followups"] == []


def test_a_failed_cancel_is_retried_next_run(keyed, sim, database_url):
    setup(keyed, sim)
    stop = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl")
    take = sim.add_trigger_order(ALICE, "BTC", "A", "1", "33000", "tp")
    sim.close_external(ALICE, "BTC", "30500")
    sim.add_fault("500", path="exchange", type="cancel", count=1)
    first = run_json(keyed)
    assert first["closed"] == 1
    assert open_oids(sim)  # a cancel failed: at least one order is still on the book
    second = run_json(keyed)
    assert open_oids(sim) == []
    assert sorted(a["metadata"]["oid"] for a in first["actions"] + second["actions"]
                  if a["type"] == "cancel_order" and a["reason"] == "position gone") == sorted([stop, take])

    [followup] = followups(database_url)
    assert (followup["status"], followup["attempts"]) == ("done", 1)
    assert "cancel failed" in followup["last_error"] and "HTTP 500" in followup["last_error"]


def test_a_close_sent_by_an_exit_rule_records_its_follow_up_in_the_same_transaction(keyed, sim, database_url):
    setup(keyed, sim)
    take = sim.add_trigger_order(ALICE, "BTC", "A", "1", "33000", "tp")  # the user's own TP, left behind
    sim.set_mid("BTC", "29000")
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE positions SET stop_loss_price = %s WHERE coin = 'BTC'", (Decimal("29500"),))
    sim.add_fault("500", path="info", type="frontendOpenOrders", count=None)
    first = run_json(keyed)
    assert first["close_orders_sent"] == 1
    assert closed_row(database_url)["close_reason"] == "stop_loss"
    assert open_oids(sim) == [take]
    sim.clear_faults()
    run_json(keyed)
    assert open_oids(sim) == []
    [followup] = followups(database_url)
    assert (followup["status"], followup["attempts"]) == ("done", 1)
    assert events(database_url, followup["position_id"])[-4:] == ["closed", "followup_recorded",
                                                                   "followup_failed", "orders_cancelled"]
    closed_event, recorded = query(database_url, "SELECT run_id, created_at FROM position_events"
                                   " WHERE position_id = %s AND event IN ('closed', 'followup_recorded') ORDER BY id",
                                   (followup["position_id"],))
    assert closed_event == recorded  # one transaction: the same run and the same now()


def test_the_follow_up_survives_a_sigkill_between_the_close_and_the_cancel(keyed, sim, database_url):
    setup(keyed, sim)
    stop = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl")
    sim.close_external(ALICE, "BTC", "30500")
    # The cancel never gets an answer (nor is it applied) while the run waits for it.
    sim.add_fault("hang", path="exchange", type="cancel", count=1, seconds=120)
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--json"],
                            env=dict(keyed, MONITOR_HTTP_TIMEOUT="60"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while closed_row(database_url) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert closed_row(database_url) is not None  # the close is committed ...
    proc.send_signal(signal.SIGKILL)  # ... and the run dies before any cancel landed
    proc.wait(timeout=10)
    assert open_oids(sim) == [stop]
    sim.clear_faults()

    report = run_json(keyed)
    assert open_oids(sim) == []
    assert [a["metadata"]["oid"] for a in report["actions"] if a["type"] == "cancel_order"] == [stop]
    [followup] = followups(database_url)
    assert followup["status"] == "done" and followup["attempts"] == 0


def test_attempts_are_counted_and_alert_after_max_failures_then_resolve(keyed, sim, database_url):
    env = dict(keyed, MONITOR_MAX_CLOSE_FAILURES="2")
    setup(env, sim)
    stop = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl")
    sim.close_external(ALICE, "BTC", "30500")
    sim.add_fault("500", path="info", type="frontendOpenOrders", count=None)
    first, second = run_json(env), run_json(env)
    assert open_oids(sim) == [stop]
    [f1], [f2] = first["followups"], second["followups"]
    assert (f1["attempts"], f1["alert"], f2["attempts"], f2["alert"]) == (1, False, 2, True)
    key = f"followup_failed:{f2['id']}"
    alerts = {a["key"]: a for a in query(database_url, "SELECT * FROM monitor_alerts")}
    assert alerts[key]["active"] and alerts[key]["kind"] == "followup_failed"

    status = json.loads(cli(env, "status", "--json").stdout)
    [shown] = status["followups"]
    assert (shown["id"], shown["status"], shown["attempts"], shown["coin"]) == (f2["id"], "pending", 2, "BTC")
    assert "frontendOpenOrders" in shown["last_error"]
    assert any(a["key"] == key for a in status["alerts"])
    text = cli(env, "status").stdout
    assert "Follow-ups: 1 pending" in text and "cancel_orphans" in text

    sim.add_fault("500", path="info", type="clearinghouseState", count=None)
    unread = run_json(env, expect=1)  # the account is not read this run: its follow-up waits, the alert stays
    assert [(f["id"], f["alert"], f["attempts"]) for f in unread["followups"]] == [(f2["id"], True, 2)]
    alerts = {a["key"]: a for a in query(database_url, "SELECT * FROM monitor_alerts")}
    assert alerts[key]["active"] and alerts[key]["resolved_at"] is None

    sim.clear_faults()
    third = run_json(env)
    assert open_oids(sim) == []
    assert third["followups"][0]["status"] == "done"
    alerts = {a["key"]: a for a in query(database_url, "SELECT * FROM monitor_alerts")}
    assert not alerts[key]["active"] and alerts[key]["resolved_at"] is not None
    status = json.loads(cli(env, "status", "--json").stdout)
    assert [(f["id"], f["status"]) for f in status["followups"]] == [(f2["id"], "done")]


def test_a_new_positions_orders_are_kept(keyed, sim, database_url):
    setup(keyed, sim)
    old_stop = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl")
    sim.close_external(ALICE, "BTC", "30500")
    sim.add_fault("500", path="info", type="frontendOpenOrders", count=None)
    assert run_json(keyed)["closed"] == 1
    sim.clear_faults()
    time.sleep(0.05)  # the re-open is strictly after the close
    sim.open_position(ALICE, "BTC", "2", "31000")  # the user re-opens the coin, with its own stop
    new_stop = sim.add_trigger_order(ALICE, "BTC", "A", "2", "29000", "sl")
    new_limit = sim.add_limit_order(ALICE, "BTC", "A", "2", "35000", reduce_only=True)

    report = run_json(keyed)
    assert report["discovered"] == 1
    assert open_oids(sim) == sorted([new_stop, new_limit])  # only the closed position's stop went
    assert [a["metadata"]["oid"] for a in report["actions"] if a["type"] == "cancel_order"] == [old_stop]
    [followup] = followups(database_url)
    assert followup["status"] == "done"


def test_nothing_left_to_cancel_makes_the_follow_up_moot(keyed, sim, database_url):
    setup(keyed, sim)
    stop = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl")
    sim.close_external(ALICE, "BTC", "30500")
    sim.add_fault("500", path="info", type="frontendOpenOrders", count=None)
    run_json(keyed)
    sim.clear_faults()
    sim.cancel_order(ALICE, stop)  # the user cancelled it by hand meanwhile
    report = run_json(keyed)
    assert [a for a in report["actions"] if a["type"] == "cancel_order"] == []
    [followup] = followups(database_url)
    assert followup["status"] == "moot"
    assert events(database_url, followup["position_id"])[-1] == "followup_moot"


def test_dry_run_lists_pending_follow_ups_and_writes_nothing(keyed, sim, database_url):
    setup(keyed, sim)
    stop = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl")
    sim.close_external(ALICE, "BTC", "30500")
    sim.add_fault("500", path="info", type="frontendOpenOrders", count=None)
    run_json(keyed)
    sim.clear_faults()
    tables = "SELECT (SELECT json_agg(f ORDER BY id) FROM followups f), (SELECT count(*) FROM position_events)"
    before = query(database_url, tables)
    sim.reset_log()

    dry = run_json(keyed, "--dry-run")
    assert query(database_url, tables) == before
    assert open_oids(sim) == [stop]
    [listed] = dry["followups"]
    assert (listed["coin"], listed["status"], listed["attempts"]) == ("BTC", "pending", 1)
    assert [a["metadata"]["oid"] for a in dry["actions"] if a["type"] == "cancel_order"] == [stop]
    assert any(n.startswith(f"pending follow-up #{listed['id']}") for n in dry["notes"])
    assert [a for a in sim.requests_log() if a["path"].endswith("/exchange")] == []


def test_a_flip_records_no_follow_up_and_keeps_the_new_positions_orders(keyed, sim, database_url):
    setup(keyed, sim)
    sim.flip(ALICE, "BTC", "-1", "30500")  # one fill takes the long through zero to a short
    short_stop = sim.add_trigger_order(ALICE, "BTC", "B", "1", "32000", "sl")
    report = run_json(keyed)
    assert [a["reason"] for a in report["actions"] if a["type"] == "close"] == ["flipped"]
    assert report["discovered"] == 1
    assert followups(database_url) == []
    assert short_stop in open_oids(sim)
    assert [a for a in report["actions"] if a["type"] == "cancel_order"] == []


def test_a_key_not_yet_approved_leaves_the_follow_up_pending_and_cancels_once_approved(env, sim, database_url):
    from eth_account import Account as EthAccount

    key = EthAccount.create()  # userRole answers "missing" until ALICE approves it
    keyed = dict(env, MONITOR_HL_SECRET_KEY=key.key.hex())
    setup(keyed, sim)
    stop = sim.add_trigger_order(ALICE, "BTC", "A", "1", "28000", "sl")
    sim.close_external(ALICE, "BTC", "30500")
    first = run_json(keyed)
    assert first["closed"] == 1 and open_oids(sim) == [stop]  # nothing can be cancelled yet
    second = run_json(keyed)
    [followup] = followups(database_url)
    assert (followup["status"], followup["attempts"]) == ("pending", 0)  # waiting for the key, not given up
    assert second["followups"][0]["status"] == "pending"
    assert [a["key"] for a in second["alerts"]] == [f"exit_blocked:{ALICE}"]  # and said so: not a silent wait
    # One that had failed often enough to alert keeps its alert while it waits (not resolved as if worked).
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE followups SET attempts = 5")
    assert run_json(keyed)["followups"][0]["alert"] is True

    sim.approve_agent(ALICE, key.address)
    run_json(keyed)  # the key's refusal is asked again before the reads: it acts in this run
    assert open_oids(sim) == []
    assert followups(database_url)[0]["status"] == "done"
