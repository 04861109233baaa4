"""The chaos runner (scripts/chaos.py) in a short form, its invariant checker, and what it found.

``make chaos ROUNDS=N`` is the long form; here a few rounds run in the default suite against the
session's PostgreSQL, and the checker is shown to catch each kind of violation it claims to catch
(a checker that never fires would prove nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import time
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
        conn.execute("INSERT INTO position_events (position_id, run_id, epoch, event) VALUES (%s, 'new', %s, 'resized')",
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
