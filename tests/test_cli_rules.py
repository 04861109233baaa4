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


# ---- P&L -------------------------------------------------------------------------------------

def pnl_rows(url: str) -> dict[str, int]:
    alice, bob = add_account(url, ALICE), add_account(url, BOB)
    day1, day2 = datetime(2026, 11, 1, 13, 0, tzinfo=timezone.utc), datetime(2026, 11, 2, 10, 0, tzinfo=timezone.utc)
    return {
        "early": add_row(url, alice, "BTC", status="closed", opened_at=T0 - timedelta(days=20),
                         closed_at=T0 - timedelta(days=12), realized_pnl="1000", fees="1", funding="0", net_pnl="999"),
        "btc": add_row(url, alice, "BTC", status="closed", closed_at=day1, realized_pnl="100.5", fees="1.25",
                       funding="-0.5", net_pnl="98.75"),
        "eth": add_row(url, alice, "ETH", "short", status="closed", closed_at=day2, realized_pnl="-40",
                       fees="0.75", funding=None, net_pnl=None),
        "bob": add_row(url, bob, "BTC", status="closed", closed_at=day2.replace(hour=23, minute=59, second=59),
                       realized_pnl="10.10", fees="0.1", funding="0.2", net_pnl="10.2"),
        "open": add_row(url, bob, "SOL", opened_at=day2, size="10", entry="150.5"),
    }


def money(group: dict, **expected: str) -> None:
    for key, value in expected.items():
        assert isinstance(group[key], str) and Decimal(group[key]) == Decimal(value), (key, group[key], value)


def test_pnl_sums_by_account_coin_and_day_exactly(env, database_url):
    pnl_rows(database_url)
    since = ("--since", "2026-11-01")

    by_account = json.loads(cli(env, "pnl", "--by", "account", *since, "--json").stdout)
    alice, bob = by_account["groups"]
    assert (alice["account"], alice["closes"], alice["wins"], alice["losses"]) == (ALICE, 2, 1, 1)
    money(alice, realized_pnl="60.5", fees="2.00", funding="-0.5", net_pnl="98.75")
    assert alice["funding_unread"] == 1
    assert (bob["account"], bob["closes"], bob["wins"], bob["losses"]) == (BOB, 1, 1, 0)
    money(bob, realized_pnl="10.10", fees="0.1", funding="0.2", net_pnl="10.2")
    total = by_account["total"]
    assert total["closes"] == 3
    money(total, realized_pnl="70.60", fees="2.10", funding="-0.3", net_pnl="108.95")

    by_coin = json.loads(cli(env, "pnl", "--by", "coin", *since, "--json").stdout)["groups"]
    assert [(g["coin"], g["closes"]) for g in by_coin] == [("BTC", 2), ("ETH", 1)]
    money(by_coin[0], realized_pnl="110.60", fees="1.35", funding="-0.3", net_pnl="108.95")
    money(by_coin[1], realized_pnl="-40", fees="0.75", funding="0", net_pnl="0")

    by_day = json.loads(cli(env, "pnl", "--by", "day", *since, "--until", "2026-11-03", "--json").stdout)["groups"]
    assert [(g["day"], g["closes"]) for g in by_day] == [("2026-11-01", 1), ("2026-11-02", 2)]
    money(by_day[1], realized_pnl="-29.90", fees="0.85", funding="0.2", net_pnl="10.2")

    everything = json.loads(cli(env, "pnl", "--json").stdout)
    assert everything["groups"] == [] and everything["total"]["closes"] == 4
    money(everything["total"], realized_pnl="1070.60", net_pnl="1107.95")
    only_bob = json.loads(cli(env, "pnl", "--account", BOB, "--json").stdout)["total"]
    money(only_bob, realized_pnl="10.10")

    text = cli(env, "pnl", "--by", "coin", *since)
    assert text.returncode == 0 and text.stdout.splitlines()[0].split()[:3] == ["coin", "closes", "wins"]
    assert "total: closes 3, wins 2, losses 1, realized_pnl 70.60, fees 2.10, funding -0.3, net_pnl 108.95" \
        in text.stdout and "(1 close(s) without funding read)" in text.stdout


def test_pnl_with_nothing_closed_is_zero(env, database_url):
    add_account(database_url)
    result = json.loads(cli(env, "pnl", "--json").stdout)
    assert result["total"]["closes"] == 0 and result["total"]["net_pnl"] == "0"


@pytest.mark.parametrize("args, text", [
    (["pnl", "--since", "last tuesday"], "--since: a date"),
    (["pnl", "--since", "2026-11-02", "--until", "2026-11-01"], "must be before --until"),
    (["positions", "list", "--until", "yesterday"], "--until: a date"),
])
def test_bad_windows_are_one_line_and_exit_2(args, text):
    result = CliRunner().invoke(cli_group, args, prog_name="position-monitor")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and text in lines[0], result.output


def test_positions_list_since_until_limit_and_columns(env, database_url):
    ids = pnl_rows(database_url)
    listed = json.loads(cli(env, "positions", "list", "--status", "closed", "--since", "2026-11-01",
                            "--until", "2026-11-02T12:00", "--json").stdout)
    assert [r["id"] for r in listed] == [ids["btc"], ids["eth"]]
    assert listed[0]["net_pnl"] == "98.75" and listed[0]["closed_at"].startswith("2026-11-01T13:00")
    newest = json.loads(cli(env, "positions", "list", "--status", "all", "--limit", "2", "--json").stdout)
    assert [r["id"] for r in newest] == [ids["bob"], ids["open"]]
    text = cli(env, "positions", "list", "--status", "closed", "--limit", "1").stdout.splitlines()
    header = text[0].split()
    assert header.index("opened") < header.index("closed") < header.index("net_pnl")
    assert "2026-11-01 12:00" in text[2] and "2026-11-02 23:59" in text[2] and "10.2" in text[2]


# ---- metrics and the dashboard ---------------------------------------------------------------

def test_metrics_carry_realized_pnl_fees_and_open_notional_per_account(env, sim, database_url, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    sim.open_position(ALICE, "BTC", "2", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    alice = 1
    add_row(database_url, alice, "ETH", status="closed", opened_at=T0 - timedelta(days=3),
            closed_at=T0 - timedelta(days=2), realized_pnl="100.5", fees="1.25", funding="0", net_pnl="99.25")
    add_row(database_url, alice, "ETH", status="closed", opened_at=T0 - timedelta(days=2),
            closed_at=T0 - timedelta(days=1), realized_pnl="-40.25", fees="0.5", funding=None, net_pnl=None)
    path = tmp_path / "position_monitor.prom"
    assert cli(env, "run", "--metrics-file", str(path)).returncode == 0
    text = path.read_text()
    assert f'position_monitor_realized_pnl_total{{account="{ALICE}"}} 60.25' in text
    assert f'position_monitor_fees_total{{account="{ALICE}"}} 1.75' in text
    assert "# TYPE position_monitor_fees_total counter" in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("position_monitor_open_notional", (("account", ALICE),))] == 60000
    assert samples[("position_monitor_realized_pnl_total", (("account", ALICE),))] == 60.25


def emitted_metric_names() -> set[str]:
    from monitor.notify import RunMetrics, render_metrics

    text = render_metrics(RunMetrics(
        run_started=1.0, run_finished=2.0, last_success=2.0, counters={"discovered": 1},
        open_positions_by_account={ALICE: 1},
        money_by_account={ALICE: {"realized_pnl": Decimal("1.5"), "fees": Decimal("0.1"),
                                  "open_notional": Decimal("3")}},
        hedges=[("basis", "BTC", "imbalanced", Decimal("0.5")), ("cex", "ETH", "unknown", None)]))
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_the_dashboard_queries_only_metrics_the_writer_emits():
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queried = {name for e in exprs for name in re.findall(r"position_monitor_[a-z_]+", e)}
    emitted = emitted_metric_names()
    assert queried <= emitted, queried - emitted
    # the documented families it is meant to show are all there
    assert {"position_monitor_last_success_timestamp_seconds", "position_monitor_run_duration_seconds",
            "position_monitor_exit_code", "position_monitor_accounts_failed", "position_monitor_open_positions",
            "position_monitor_realized_pnl_total", "position_monitor_fees_total", "position_monitor_open_notional",
            "position_monitor_api_weight", "position_monitor_hedge_net", "position_monitor_hedge_imbalanced"} <= queried
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_emitted_metric_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert {name for name in emitted_metric_names() if f"`{name}" not in readme} == set()


@pytest.mark.parametrize("moment", ["before_reread", "before_claim"])
def test_a_stop_cleared_while_a_run_is_about_to_close_sends_nothing(keyed, sim, database_url, monkeypatch, moment):
    """The CLI's change lands after the plan read the row: before the run re-reads it, or between that
    re-read and the claim. Either way no order is sent and the row stays open."""
    from monitor.config import load_settings
    from monitor.database import Database
    from monitor.operations import execute_run

    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    with psycopg.connect(database_url) as conn:
        pid = conn.execute("SELECT id FROM positions WHERE coin = 'BTC'").fetchone()[0]
    assert cli(keyed, "positions", "set", str(pid), "--stop-loss", "29500").returncode == 0
    sim.set_mid("BTC", "29000")
    sim.reset_log()

    def clear_stop() -> None:
        other = Database.open(database_url)
        try:
            other.set_exit_rules(pid, {"stop_loss_price": None})
        finally:
            other.close()

    target = "position" if moment == "before_reread" else "claim_close"
    original = getattr(Database, target)

    def wrapped(self, position_id, *args, **kwargs):
        if position_id == pid:
            clear_stop()
        return original(self, position_id, *args, **kwargs)

    monkeypatch.setattr(Database, target, wrapped)
    report = execute_run(load_settings(environ=keyed), dry_run=False, addresses=[])
    assert report.close_orders_sent == 0
    assert not [r for r in sim.requests_log() if r["path"].endswith("/exchange") and r.get("type") == "order"]
    assert rules(database_url, pid)["status"] == "open" and sim.position(ALICE, "BTC") is not None
    assert "closing_claimed" not in [e["event"] for e in events(database_url, pid)]
