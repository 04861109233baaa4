"""Exit rules, close requests and P&L from the CLI (issue 13 items 5, 6 and 7), on a real PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from click.testing import CliRunner

from monitor.cli import cli as cli_group
from tests.conftest import ALICE, cli, run_json

BOB = "0x" + "b2" * 20
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def add_account(url: str, address: str = ALICE) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute("INSERT INTO accounts (address) VALUES (%s) RETURNING id", (address,)).fetchone()[0])


def add_row(url: str, account_id: int, coin: str = "BTC", side: str = "long", *, status: str = "open",
            opened_at: datetime = T0, closed_at: datetime | None = None, size: str = "1", entry: str = "30000",
            **figures: str | None) -> int:
    columns = ["account_id", "coin", "side", "size", "entry_price", "status", "opened_at", "closed_at", *figures]
    values = [account_id, coin, side, Decimal(size), Decimal(entry), status, opened_at, closed_at,
              *(None if v is None else Decimal(v) for v in figures.values())]
    with psycopg.connect(url) as conn:
        return int(conn.execute(
            f"INSERT INTO positions ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) RETURNING id",
            values).fetchone()[0])


def rules(url: str, position_id: int) -> dict:
    with psycopg.connect(url) as conn:
        cur = conn.execute("SELECT stop_loss_price, take_profit_price, trailing_stop_pct, max_hold_seconds,"
                           " best_price, close_requested_at, status FROM positions WHERE id = %s", (position_id,))
        return dict(zip([c.name for c in cur.description], cur.fetchone()))


def events(url: str, position_id: int) -> list[dict]:
    with psycopg.connect(url) as conn:
        cur = conn.execute("SELECT event, reason, details FROM position_events WHERE position_id = %s ORDER BY id",
                           (position_id,))
        return [dict(zip([c.name for c in cur.description], r)) for r in cur]


def one_line_error(result, code: int, text: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0] and "Traceback" not in result.stderr, result.stderr


# ---- positions set ---------------------------------------------------------------------------

def test_set_then_clear_each_rule_with_audit_events(env, database_url):
    pid = add_row(database_url, add_account(database_url), best_price="31000", trailing_stop_pct=None)
    result = cli(env, "positions", "set", str(pid), "--stop-loss", "29500.5", "--take-profit", "34000",
                 "--trailing-stop", "2.5", "--max-hold", "90m")
    assert result.returncode == 0, result.stderr
    assert "stop_loss_price none -> 29500.5" in result.stdout and "max_hold_seconds none -> 90m" in result.stdout
    row = rules(database_url, pid)
    assert row["stop_loss_price"] == Decimal("29500.5") and row["take_profit_price"] == Decimal("34000")
    assert row["trailing_stop_pct"] == Decimal("2.5") and row["max_hold_seconds"] == 5400
    assert row["best_price"] is None  # arming a trailing stop restarts its best price
    [event] = events(database_url, pid)
    assert event["event"] == "exit_rules_set"
    assert event["details"]["stop_loss_price"] == {"old": None, "new": "29500.5"}
    assert event["details"]["max_hold_seconds"] == {"old": None, "new": 5400}
    assert event["details"]["best_price"] == {"old": "31000", "new": None}

    assert cli(env, "positions", "set", str(pid), "--max-hold", "4h", "--trailing-stop", "3").returncode == 0
    assert rules(database_url, pid)["max_hold_seconds"] == 4 * 3600
    assert events(database_url, pid)[-1]["details"] == {"max_hold_seconds": {"old": 5400, "new": 14400},
                                                        "trailing_stop_pct": {"old": "2.5", "new": "3"}}

    result = cli(env, "positions", "set", str(pid), "--clear", "stop-loss", "--clear", "take-profit",
                 "--clear", "trailing-stop", "--clear", "max-hold", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["changed"]["stop_loss_price"] == {"old": "29500.5", "new": None}
    row = rules(database_url, pid)
    assert [row[k] for k in ("stop_loss_price", "take_profit_price", "trailing_stop_pct", "max_hold_seconds")] \
        == [None] * 4
    assert len(events(database_url, pid)) == 3
    assert cli(env, "positions", "set", str(pid), "--clear", "stop-loss").stdout.strip() == f"#{pid}: unchanged"
    assert len(events(database_url, pid)) == 3  # nothing changed, nothing recorded
    history = cli(env, "positions", "history", str(pid))
    assert history.stdout.count("exit_rules_set") == 3


@pytest.mark.parametrize("args, text", [
    (["--stop-loss", "0"], "--stop-loss: must be greater than 0"),
    (["--take-profit", "-5"], "--take-profit: must be greater than 0"),
    (["--stop-loss", "abc"], "--stop-loss: not a number"),
    (["--stop-loss", "nan"], "--stop-loss: not a finite number"),
    (["--trailing-stop", "0"], "--trailing-stop: a percent between 0 and 100"),
    (["--trailing-stop", "100"], "--trailing-stop: a percent between 0 and 100"),
    (["--max-hold", "90"], "--max-hold: a duration like 90m"),
    (["--max-hold", "0m"], "--max-hold: must be longer than 0"),
    (["--max-hold", "1.5h"], "--max-hold: a duration like 90m"),
    (["--stop-loss", "1", "--clear", "stop-loss"], "--stop-loss and --clear stop-loss together"),
    ([], "nothing to set"),
])
def test_bad_rules_are_refused_with_one_line_and_exit_2(args, text):
    result = CliRunner().invoke(cli_group, ["positions", "set", "7", *args], prog_name="position-monitor")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"position-monitor: {text}"), result.output


@pytest.mark.parametrize("side, args, text", [
    ("long", ["--stop-loss", "35000", "--take-profit", "34000"], "a long's stop loss (35000) must be below"),
    ("short", ["--stop-loss", "29000", "--take-profit", "31000"], "a short's stop loss (29000) must be above"),
])
def test_stop_and_take_profit_are_checked_against_the_side_and_the_row(env, database_url, side, args, text):
    pid = add_row(database_url, add_account(database_url), side=side)
    one_line_error(cli(env, "positions", "set", str(pid), *args), 2, text)
    # checked against what the row already has, too
    assert cli(env, "positions", "set", str(pid), "--take-profit", args[3]).returncode == 0
    one_line_error(cli(env, "positions", "set", str(pid), "--stop-loss", args[1]), 2, text.split(" must")[0])
    assert rules(database_url, pid)["stop_loss_price"] is None
    assert len(events(database_url, pid)) == 1


@pytest.mark.parametrize("status", ["closing", "closed"])
def test_a_row_closing_or_closed_is_refused_with_exit_1(env, database_url, status):
    pid = add_row(database_url, add_account(database_url), status=status,
                  closed_at=T0 + timedelta(hours=1) if status == "closed" else None)
    one_line_error(cli(env, "positions", "set", str(pid), "--stop-loss", "100"), 1, f"#{pid}: already {status}")
    assert rules(database_url, pid)["stop_loss_price"] is None and events(database_url, pid) == []
    one_line_error(cli(env, "positions", "set", "999999", "--stop-loss", "100"), 2, "no position #999999")


def test_a_stop_set_from_the_cli_fires_in_a_real_run(keyed, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    with psycopg.connect(database_url) as conn:
        pid = conn.execute("SELECT id FROM positions WHERE coin = 'BTC'").fetchone()[0]
    sim.set_mid("BTC", "29000")
    assert cli(keyed, "positions", "set", str(pid), "--stop-loss", "29500").returncode == 0
    report = run_json(keyed)
    assert report["close_orders_sent"] == 1 and report["closed"] == 1
    with psycopg.connect(database_url) as conn:
        status, reason = conn.execute("SELECT status, close_reason FROM positions WHERE id = %s", (pid,)).fetchone()
    assert (status, reason) == ("closed", "stop_loss") and sim.position(ALICE, "BTC") is None


def test_a_rule_cleared_after_the_plan_read_it_is_not_claimed(db, database_url):
    pid = add_row(database_url, add_account(database_url), stop_loss_price="29500")
    seen = db.position(pid)
    db.set_exit_rules(pid, {"stop_loss_price": None})
    claimed = db.claim_close(pid, cloid="0x" + "1" * 32, rule="stop_loss", now=T0, attempts=seen.close_attempts,
                             rules={"stop_loss_price": seen.stop_loss_price, "close_requested_at": None})
    assert not claimed and rules(database_url, pid)["status"] == "open"


def test_account_max_hold_is_set_and_cleared(env, database_url):
    add_account(database_url)
    result = cli(env, "accounts", "set", ALICE, "--max-hold", "2d")
    assert result.returncode == 0 and result.stdout.strip() == f"{ALICE}: max hold none -> 2d", result.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT max_hold_seconds FROM accounts").fetchone()[0] == 172800
    assert cli(env, "accounts", "set", ALICE, "--clear-max-hold").stdout.strip() == f"{ALICE}: max hold 2d -> none"
    one_line_error(cli(env, "accounts", "set", BOB, "--max-hold", "1h"), 2, "not a watched account")
    one_line_error(cli(env, "accounts", "set", ALICE), 2, "give one of --max-hold")
    one_line_error(cli(env, "accounts", "set", ALICE, "--max-hold", "soon"), 2, "--max-hold: a duration")


# ---- close and close --cancel ----------------------------------------------------------------

def test_close_without_a_key_says_so_and_cancel_withdraws_it(env, database_url):
    pid = add_row(database_url, add_account(database_url))
    result = cli(env, "close", str(pid))
    assert result.returncode == 0
    assert "no key is configured" in result.stdout and "closes it on the exchange" not in result.stdout
    assert rules(database_url, pid)["close_requested_at"] is not None
    result = cli(env, "close", "--cancel", str(pid))
    assert result.returncode == 0 and result.stdout.strip() == f"close request for #{pid} withdrawn"
    assert rules(database_url, pid)["close_requested_at"] is None
    assert [e["event"] for e in events(database_url, pid)] == ["close_requested", "close_request_withdrawn"]
    assert events(database_url, pid)[1]["details"]["close_requested_at"]["new"] is None
    assert cli(env, "close", "--cancel", str(pid)).stdout.strip() == f"#{pid}: no close request to withdraw"
    assert len(events(database_url, pid)) == 2


def test_close_with_a_key_says_the_next_run_closes_it(keyed, database_url):
    pid = add_row(database_url, add_account(database_url))
    assert "the next run closes it" in cli(keyed, "close", str(pid)).stdout


@pytest.mark.parametrize("status", ["closing", "closed"])
def test_cancel_is_refused_once_the_close_is_claimed(env, database_url, status):
    pid = add_row(database_url, add_account(database_url), status=status,
                  closed_at=T0 if status == "closed" else None)
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE positions SET close_requested_at = now() WHERE id = %s", (pid,))
    one_line_error(cli(env, "close", "--cancel", str(pid)), 1, f"#{pid}: already {status}")
    assert rules(database_url, pid)["close_requested_at"] is not None
    one_line_error(cli(env, "close", "--cancel", "999999"), 2, "no position #999999")


def test_a_withdrawn_request_sends_nothing(keyed, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    with psycopg.connect(database_url) as conn:
        pid = conn.execute("SELECT id FROM positions WHERE coin = 'BTC'").fetchone()[0]
    assert cli(keyed, "close", str(pid)).returncode == 0
    assert cli(keyed, "close", "--cancel", str(pid)).returncode == 0
    assert run_json(keyed)["close_orders_sent"] == 0 and sim.position(ALICE, "BTC") is not None
