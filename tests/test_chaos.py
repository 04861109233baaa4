"""The chaos runner (scripts/chaos.py) in a short form, its invariant checker, and what it found.

``make chaos ROUNDS=N`` is the long form; here a few rounds run in the default suite against the
session's PostgreSQL, and the checker is shown to catch each kind of violation it claims to catch
(a checker that never fires would prove nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from decimal import Decimal
from typing import Any

import eth_account
import psycopg
import pytest

from tests.conftest import ROOT, cli, run_json

CHAOS = ROOT / "scripts" / "chaos.py"
ALICE = "0x" + "a1" * 20


def load_chaos() -> Any:
    spec = importlib.util.spec_from_file_location("chaos_runner", CHAOS)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["chaos_runner"] = module
    spec.loader.exec_module(module)
    return module


def test_a_short_chaos_run_keeps_every_invariant(pg_server_url):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(CHAOS), "--rounds", "6", "--seed", "20261121",
         "--database-url", pg_server_url, "--time-limit", "45"],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    elapsed = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    assert re.search(r"^violations: 0\b", out, re.M), out[-3000:]
    rounds = int(re.search(r"^rounds: (\d+)", out, re.M).group(1))
    assert rounds >= 3, out[-2000:]
    faults = int(re.search(r"^faults injected by kind: .*\(total (\d+)\)", out, re.M).group(1))
    runs = int(re.search(r"^monitor runs started: (\d+)", out, re.M).group(1))
    assert faults >= rounds and runs > rounds, out[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert elapsed < 150


def test_a_close_to_settle_on_a_busy_account_is_settled_from_the_fills_already_read(pg_server_url):
    """Chaos seed 20267146: a close order filled on an account past 10,000 fills while its position grew; the
    row stayed 'closing' for good. Each run's read phase spent the weight on that account's fill pages, and
    the settle's own read of the same fills found none left (exit_starved, run after run). The settle now uses
    the fills the read phase got when they were read after the order could last land."""
    result = subprocess.run(
        [sys.executable, str(CHAOS), "--rounds", "1", "--seed", "20267146", "--database-url", pg_server_url],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0 and re.search(r"^violations: 0\b", result.stdout, re.M), result.stdout[-3000:]


def test_fired_rules_the_key_cannot_send_do_not_starve_a_busy_accounts_reads(pg_server_url):
    """Chaos seed 20268095: rules firing on accounts the key cannot act for held a close's weight each, every run
    (only answers that let the key act were cached), and the key's own busy account (past 10,000 fills, HIP-3
    dexes) was deferred run after run for want of weight. A refusal is now cached too and holds nothing."""
    result = subprocess.run(
        [sys.executable, str(CHAOS), "--rounds", "1", "--seed", "20268095", "--database-url", pg_server_url],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0 and re.search(r"^violations: 0\b", result.stdout, re.M), result.stdout[-3000:]


# --------------------------------------------------------------------------------------------------
# The checker catches what it claims to catch


@pytest.fixture
def chaos_round(pg_server_url, template_db, sim, tmp_path):
    chaos = load_chaos()
    args = argparse.Namespace(verbose=False)
    key = eth_account.Account.from_key(b"\x11" * 32)
    stats = chaos.Stats()
    rnd = chaos.Round(0, 1, args, chaos.Postgres(pg_server_url), template_db, sim, key, tmp_path, stats)
    rnd.accounts = chaos.ACCOUNTS[:2]
    rnd.agent_account = rnd.accounts[0]
    rnd.sub_account = False
    sim.approve_agent(rnd.agent_account, key.address)
    with psycopg.connect(rnd.url, autocommit=True) as conn:
        for address in rnd.accounts:
            conn.execute("INSERT INTO accounts (address) VALUES (%s)", (address,))
    sim.open_position(rnd.accounts[0], "BTC", "0.5", "30000")
    sim.open_position(rnd.accounts[0], "ETH", "-2", "1900")
    sim.open_position(rnd.accounts[1], "SOL", "10", "20")
    report = rnd.clean_run("setup")
    assert report is not None and report["discovered"] == 3, rnd.violations
    try:
        yield rnd
    finally:
        rnd.cleanup(keep=False)


def invariants(rnd: Any) -> set[str]:
    return {text.split(" ", 1)[0] for text, _ in rnd.violations}


def test_checker_is_quiet_on_a_consistent_state(chaos_round):
    chaos_round.sim.close_external(chaos_round.accounts[0], "ETH", "1800")
    report = chaos_round.clean_run("clean")
    chaos_round.check(report)
    assert chaos_round.violations == []


def test_checker_catches_a_fired_rule_refused_in_silence_or_for_an_account_the_key_controls(chaos_round):
    with psycopg.connect(chaos_round.url, autocommit=True) as conn:
        sol = conn.execute("SELECT id FROM positions WHERE coin = 'SOL'").fetchone()[0]  # accounts[1]: not the key's
        conn.execute("UPDATE positions SET stop_loss_price = %s WHERE id = %s",
                     (Decimal(chaos_round.sim.mids()["SOL"]) + 1, sol))  # a long's stop above the mid: fires
    report = chaos_round.clean_run("clean")
    assert report is not None and report["would_close"] == 1 and report["close_orders_sent"] == 0, report["notes"]
    chaos_round.check_blocked_rules_alert(report)
    assert chaos_round.violations == [] and chaos_round.stats.checks["(vi)"] == 1
    chaos_round.check_blocked_rules_alert(dict(report, alerts=[]))  # the same refusal, no alert: silent
    assert invariants(chaos_round) == {"(vi)"} and "no exit_blocked alert" in chaos_round.violations[0][0]
    chaos_round.violations.clear()
    chaos_round.sub_account = True  # as if accounts[1] were the key's sub-account: refused wrongly
    chaos_round.check_blocked_rules_alert(report)
    assert invariants(chaos_round) == {"(vi)"} and "refused" in chaos_round.violations[0][0]


def test_checker_catches_a_false_close_and_a_row_that_no_longer_matches(chaos_round):
    with psycopg.connect(chaos_round.url, autocommit=True) as conn:
        row_id = conn.execute("SELECT id FROM positions WHERE coin = 'BTC'").fetchone()[0]
        conn.execute("UPDATE positions SET status = 'closed', closed_at = now(), close_reason = 'external'"
                     " WHERE id = %s", (row_id,))  # BTC is still open on the exchange
        conn.execute("INSERT INTO position_events (position_id, run_id, epoch, event) VALUES (%s, 'x', 99, 'closed')",
                     (row_id,))
    chaos_round.check({"exit_code": 0})
    found = invariants(chaos_round)
    assert {"(ii)", "(iii)"} <= found, chaos_round.violations


def test_checker_catches_a_write_from_a_superseded_epoch_and_a_double_pnl(chaos_round):
    with psycopg.connect(chaos_round.url, autocommit=True) as conn:
        row_id = conn.execute("SELECT id FROM positions WHERE coin = 'SOL'").fetchone()[0]
        epoch = conn.execute("SELECT max(epoch) FROM position_events").fetchone()[0]
        conn.execute("UPDATE monitor_lease SET epoch = epoch + 1")
        conn.execute("INSERT INTO position_events (position_id, run_id, epoch, event)"
                     " VALUES (%s, 'new', %s, 'resized')",
                     (row_id, epoch + 1))
        conn.execute("INSERT INTO position_events (position_id, run_id, epoch, event) VALUES (%s, 'old', %s, 'closed')",
                     (row_id, epoch))  # the superseded run writes after the new holder did
    chaos_round.check({"exit_code": 0})
    texts = " | ".join(text for text, _ in chaos_round.violations)
    assert "(v) event" in texts and "'closed' events" in texts, texts


def test_checker_catches_a_close_order_on_the_wrong_account(chaos_round):
    from monitor.exchange import close_cloid

    with psycopg.connect(chaos_round.url) as conn:
        row_id = conn.execute("SELECT id FROM positions WHERE coin = 'SOL'").fetchone()[0]
    cloid = close_cloid(chaos_round.accounts[1], row_id, 1)
    chaos_round.sim.add_limit_order(chaos_round.accounts[0], "SOL", "A", "1", "1000", cloid=cloid)
    chaos_round.check({"exit_code": 0})
    assert any("was placed on" in text for text, _ in chaos_round.violations), chaos_round.violations


def test_cycles_split_a_crossing_fill_pro_rata():
    chaos = load_chaos()

    def fill(side, sz, px, start, pnl, fee, t):
        return {"coin": "ETH", "side": side, "sz": sz, "px": px, "startPosition": start, "closedPnl": pnl,
                "fee": fee, "time": t, "oid": t}

    fills = [fill("B", "2", "100", "0", "0", "0.2", 1),         # opens long 2
             fill("B", "1", "130", "2", "0", "0.1", 2),         # adds: long 3 @ 110
             fill("A", "1", "120", "3", "10", "0.3", 3),        # reduces to 2
             fill("A", "5", "140", "2", "60", "1.0", 4),        # long 2 -> short 3: 2/5 of it closes
             fill("B", "3", "150", "-3", "-30", "0.6", 5)]      # the short returns to zero
    long, short = chaos.cycles_of(fills, "ETH")
    assert (long.sign, long.start_ms, long.end_ms) == (1, 1, 4)
    assert long.exit_price == (Decimal(120) + 2 * Decimal(140)) / 3  # 1 at 120 and the closing 2 at 140
    assert (long.pnl, long.fees) == (Decimal(70), Decimal("0.2") + Decimal("0.1") + Decimal("0.3") + Decimal("0.4"))
    assert (short.sign, short.start_ms, short.end_ms) == (-1, 4, 5)
    assert (short.exit_price, short.pnl, short.fees) == (Decimal(150), Decimal(-30), Decimal("0.6") + Decimal("0.6"))


def test_checker_catches_figures_that_are_not_the_rows_own_cycle(chaos_round):
    chaos_round.sim.close_external(chaos_round.accounts[0], "ETH", "1800")
    report = chaos_round.clean_run("clean")
    with psycopg.connect(chaos_round.url, autocommit=True) as conn:
        conn.execute("UPDATE positions SET realized_pnl = realized_pnl + 1 WHERE coin = 'ETH'")
    chaos_round.check(report)
    assert "(ix)" in invariants(chaos_round), chaos_round.violations  # (iv) checks the figures too


def test_checker_catches_an_order_sent_for_a_position_opened_after_its_row(chaos_round):
    from monitor.exchange import close_cloid

    rnd, alice = chaos_round, chaos_round.accounts[0]
    rnd.sim.close_external(alice, "BTC", "30500")
    rnd.sim.open_position(alice, "BTC", "0.5", "30000")  # the same size and entry: the table cannot tell
    time.sleep(0.5)  # then a run starts
    with psycopg.connect(rnd.url, autocommit=True) as conn:
        row_id = conn.execute("SELECT id FROM positions WHERE coin = 'BTC'").fetchone()[0]
        conn.execute("INSERT INTO monitor_runs (run_id, host, pid, epoch) VALUES ('late', 'h', 1, 1)")
        cloid = close_cloid(alice, row_id, 1)
        conn.execute("INSERT INTO position_events (position_id, run_id, epoch, event, details)"
                     " VALUES (%s, 'late', 1, 'closing_claimed', %s)", (row_id, json.dumps({"cloid": cloid})))
    rnd.sim.add_limit_order(alice, "BTC", "A", "0.5", "1", reduce_only=True, cloid=cloid)  # the rule's close
    rnd.check({"exit_code": 0})
    assert any(text.startswith("(x) close order " + cloid) for text, _ in rnd.violations), rnd.violations


def test_checker_catches_a_stop_left_behind_and_a_fired_rule_never_sent(chaos_round):
    rnd, alice = chaos_round, chaos_round.accounts[0]
    fired = rnd.fired_rules()
    assert fired == {}
    oid = rnd.sim.add_trigger_order(alice, "ETH", "B", "2", "2500", "sl")
    rnd.sim.close_external(alice, "ETH", "1800")
    with psycopg.connect(rnd.url, autocommit=True) as conn:
        # a run recorded the close, and its follow-up (cancel the stop) was lost
        conn.execute("UPDATE positions SET status = 'closed', closed_at = now(), close_reason = 'external'"
                     " WHERE coin = 'ETH'")
        conn.execute("UPDATE positions SET close_requested_at = now() WHERE coin = 'BTC'")
    fired = rnd.fired_rules()
    assert [v[1:] for v in fired.values()] == [("BTC", "requested")]
    rnd.check_rules_sent(fired, {"exit_code": 0, "notes": []}, "a run that sent nothing", started_ms=0)
    rnd.check({"exit_code": 0})
    texts = " | ".join(text for text, _ in rnd.violations)
    assert "(vi) row" in texts and f"(viii) {alice} ETH" in texts and str(oid) in texts, texts


def test_checker_catches_a_row_left_closing_after_its_order_expired(chaos_round):
    rnd = chaos_round
    with psycopg.connect(rnd.url, autocommit=True) as conn:
        conn.execute("UPDATE positions SET status = 'closing', close_cloid = '0x' || repeat('ab', 16),"
                     " close_started_at = now() - interval '20 seconds' WHERE coin = 'SOL'")
    rnd.clean_runs.append((rnd.sim.now_ms(), {"exit_code": 0}))  # a run that began after the expiry, and left it
    rnd.check_closing_settled()
    assert invariants(rnd) == {"(vii)"}, rnd.violations


# --------------------------------------------------------------------------------------------------
# What the chaos runner found (fixed; kept as regression tests)


def test_a_position_closed_behind_a_stale_snapshot_is_not_left_open(env, sim, db):
    result = cli(env, "accounts", "add", ALICE)
    assert result.returncode == 0, result.stderr
    sim.open_position(ALICE, "BTC", "1", "30000")
    run_json(env)
    sim.open_position(ALICE, "ETH", "2", "1900")
    sim.add_fault("stale", user=ALICE, count=1)  # the next answer is frozen now: ETH still open
    sim.close_external(ALICE, "ETH", "1950")
    time.sleep(1.5)  # the next run starts more than the monitor's 1 s of fill-window slack after the close
    assert run_json(env)["discovered"] == 1  # from the stale answer

    run_json(env)  # a fresh answer: ETH is gone, and its fills say so

    rows = {r["coin"]: r for r in db.list_positions(status="all")}
    assert rows["ETH"]["closed_at"] is not None, "ETH is still open in the table, long after it closed"
    assert rows["ETH"]["exit_price"] == 1950


def test_a_flip_is_closed_with_the_flip_fills_figures_even_when_fills_lag(env, sim, db):
    result = cli(env, "accounts", "add", ALICE)
    assert result.returncode == 0, result.stderr
    sim.open_position(ALICE, "ETH", "2", "1800")
    run_json(env)
    sim.add_fault("stale", path="info", type="userFillsByTime", user=ALICE, count=None)  # fills frozen now
    sim.flip(ALICE, "ETH", "-3", "1900")
    run_json(env, expect=None)  # the snapshot shows the short; the fills do not show the flip yet
    sim.clear_faults()

    run_json(env)

    (closed,) = db.list_positions(status="closed")
    assert closed["close_reason"] == "flipped"
    assert closed["exit_price"] == 1900 and closed["realized_pnl"] == 200  # 2 * (1900 - 1800)
    (now_open,) = db.list_positions(status="open")
    assert (now_open["side"], now_open["size"]) == ("short", 3)


def test_the_figures_check_starts_a_window_at_the_rows_opening_fill_not_its_millisecond():
    """Chaos seed 20269209 (a checker fault): a short closed and re-opened in one millisecond on a busy account;
    the re-opened row's figures were checked against the fills from that millisecond on, so the cycle before
    it (its three closing fills first) was taken for the row's and its right figures reported as wrong."""
    chaos = load_chaos()
    from monitor.fills import close_figures, parse_fills

    def fill(time_ms, side, sz, px, start, direction, pnl, fee, tid):
        return {"coin": "SOL", "time": time_ms, "side": side, "sz": sz, "px": px, "startPosition": start,
                "dir": direction, "closedPnl": pnl, "fee": fee, "tid": tid, "oid": tid, "hash": f"0x{tid:064x}",
                "crossed": True, "feeToken": "USDC"}

    fills = [fill(557116, "A", "3.0", "26.25084", "0.0", "Open Short", "0.0", "0.035439", 1),
             fill(557400, "B", "1.0", "27.31148", "-3.0", "Close Short", "-1.06064", "0.01229", 2),
             fill(557400, "B", "1.0", "27.31148", "-2.0", "Close Short", "-1.06064", "0.01229", 3),
             fill(557400, "B", "1.0", "27.31148", "-1.0", "Close Short", "-1.06064", "0.01229", 4),
             fill(557400, "A", "4.0", "27.04632", "0.0", "Open Short", "0.0", "0.048683", 5),
             fill(559413, "B", "4.0", "25.98568", "-4.0", "Close Short", "4.24256", "0.046774", 6)]
    row = (7, "0x" + "c1" * 20, "SOL", "short")
    ahead = chaos.Round.ended_before_opening(fills, row, 557400)
    assert ahead == {1, 2, 3}
    kept = parse_fills([f for k, f in enumerate(fills) if k not in ahead])
    figures = close_figures(kept, coin="SOL", side="short", since_ms=557400, account=row[1])
    assert (figures.exit_price, figures.realized_pnl, figures.fees) == (
        Decimal("25.98568"), Decimal("4.24256"), Decimal("0.095457"))  # what the monitor wrote: right
    assert chaos.Round.ended_before_opening(fills, row, 557116) == set()  # the first cycle: nothing before it
