"""Review of issue 13's surfaces (keys read lazily, audit of `accounts set`, red-team findings), each test
failing on the code before its fix. Real PostgreSQL, the real CLI in subprocesses, the simulator."""

from __future__ import annotations

import json

import psycopg
from eth_account import Account as EthAccount

from tests.conftest import ALICE, cli

BOB = "0x" + "b2" * 20


def lines_of(result) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.splitlines()


# ---- 1. the key file is read only right before the first signature ------------------------------


def test_the_key_file_is_read_only_when_a_close_is_about_to_be_signed(env, sim, database_url, tmp_path):
    agent = EthAccount.create()
    secret = agent.key.hex()
    sim.approve_agent(ALICE, agent.address)
    key_file = tmp_path / "hl.key"
    environ = dict(env, MONITOR_HL_SECRET_KEY_FILE=str(key_file))
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(environ, "accounts", "add", ALICE).returncode == 0

    # No order to send: a missing key file is never opened (the old code refused the run at its start, 78).
    result = cli(environ, "run", "--json")
    assert result.returncode == 0 and lines_of(result) == [], result.stderr
    assert json.loads(result.stdout)["discovered"] == 1
    with psycopg.connect(database_url) as conn:
        pid = conn.execute("SELECT id FROM positions WHERE coin = 'BTC'").fetchone()[0]

    # A stop fires: the key file is read right before signing. Missing, a directory, or readable by the
    # group: one line naming the setting (never the key), exit 78, nothing sent, the rule stays armed.
    sim.set_mid("BTC", "29000")
    assert cli(environ, "positions", "set", str(pid), "--stop-loss", "29500").returncode == 0
    key_file.write_text(secret + "\n")
    key_file.chmod(0o640)
    for n, args in enumerate([("run",), ("run", "--json"), ("--log-format", "json", "run")]):
        result = cli(environ, *args)
        errors = lines_of(result)
        assert result.returncode == 78, (args, result.returncode, result.stdout, result.stderr)
        if n == 0:  # the urgent alert key_unreadable, the first time (its webhook text, also on stderr)
            alert = errors.pop(0)
            assert "key_unreadable" not in alert and "MONITOR_HL_SECRET_KEY_FILE" in alert and secret[2:] not in alert
        assert len(errors) == 1 and "MONITOR_HL_SECRET_KEY_FILE" in errors[0] and "chmod 600" in errors[0], errors
        assert f"close #{pid} BTC (stop_loss)" in errors[0], errors
        assert secret not in result.stdout + result.stderr and secret[2:] not in result.stdout + result.stderr
        if "--json" in args:
            report = json.loads(result.stdout)
            assert report["exit_code"] == 78 and report["close_orders_sent"] == 0 and report["would_close"] == 1
            assert [a["kind"] for a in report["alerts"]] == ["key_unreadable"]
        if "--log-format" in args:
            assert json.loads(errors[0])["event"] == "note"
    assert sim.position(ALICE, "BTC") is not None
    with psycopg.connect(database_url) as conn:
        status, stop = conn.execute("SELECT status, stop_loss_price FROM positions WHERE id = %s", (pid,)).fetchone()
        code, summary = conn.execute("SELECT exit_code, error_summary FROM monitor_runs"
                                     " ORDER BY started_at DESC LIMIT 1").fetchone()
    assert status == "open" and stop is not None
    assert code == 78 and "MONITOR_HL_SECRET_KEY_FILE" in summary
    key_file.unlink()
    assert "No such file" in lines_of(cli(environ, "run"))[0]

    # The key readable: the close goes out.
    key_file.write_text(secret + "\n")
    key_file.chmod(0o600)
    result = cli(environ, "run", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["close_orders_sent"] == 1 and report["closed"] == 1
    assert sim.position(ALICE, "BTC") is None


def test_read_only_commands_and_dry_runs_never_read_the_key_even_with_a_rule_firing(env, sim, database_url, tmp_path):
    environ = dict(env, MONITOR_HL_SECRET_KEY_FILE=str(tmp_path / "missing.key"))
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(environ, "accounts", "add", ALICE).returncode == 0
    assert cli(environ, "run").returncode == 0
    with psycopg.connect(database_url) as conn:
        pid = conn.execute("SELECT id FROM positions WHERE coin = 'BTC'").fetchone()[0]
    sim.set_mid("BTC", "29000")
    assert cli(environ, "positions", "set", str(pid), "--stop-loss", "29500").returncode == 0
    for args in [("run", "--dry-run"), ("status",), ("positions", "list"), ("positions", "history", str(pid)),
                 ("close", str(pid)), ("close", "--cancel", str(pid)), ("pnl",), ("lock", "status"),
                 ("db", "status"), ("accounts", "list")]:
        result = cli(environ, *args)
        assert result.returncode == 0 and "MONITOR_HL_SECRET_KEY_FILE" not in result.stderr, (args, result.stderr)


# ---- 2. `accounts set` (and add/disable) leave an audit record with old and new values ------------


def account_events(url: str) -> list[tuple[str, str | None, dict]]:
    with psycopg.connect(url) as conn:
        return [tuple(r) for r in conn.execute("SELECT event, reason, details FROM account_events ORDER BY id")]


def test_accounts_set_records_an_audit_event_with_old_and_new_values(env, database_url):
    assert cli(env, "accounts", "add", ALICE, "--label", "main").returncode == 0
    assert cli(env, "accounts", "set", ALICE, "--max-hold", "2d").returncode == 0
    assert cli(env, "accounts", "set", ALICE, "--max-hold", "2d").returncode == 0  # nothing new: no event
    assert cli(env, "accounts", "set", ALICE, "--max-hold", "90m").returncode == 0
    assert cli(env, "accounts", "set", ALICE, "--clear-max-hold").returncode == 0
    assert cli(env, "accounts", "disable", ALICE).returncode == 0
    assert cli(env, "accounts", "add", ALICE).returncode == 0  # re-activated
    assert account_events(database_url) == [
        ("account_added", "cli", {"label": {"old": None, "new": "main"}}),
        ("account_rules_set", "cli", {"max_hold_seconds": {"old": None, "new": 172800}}),
        ("account_rules_set", "cli", {"max_hold_seconds": {"old": 172800, "new": 5400}}),
        ("account_rules_set", "cli", {"max_hold_seconds": {"old": 5400, "new": None}}),
        ("account_disabled", "cli", {"active": {"old": True, "new": False}}),
        ("account_reactivated", "cli", {"active": {"old": False, "new": True}}),
    ]
    result = cli(env, "accounts", "history", ALICE, "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert [e["event"] for e in shown][:2] == ["account_added", "account_rules_set"]
    assert shown[1]["details"] == {"max_hold_seconds": {"old": None, "new": 172800}}
    table = cli(env, "accounts", "history", ALICE)
    assert table.returncode == 0 and "account_rules_set" in table.stdout
    result = cli(env, "accounts", "history", BOB)
    assert result.returncode == 2 and "not a watched account" in result.stderr and len(result.stderr.splitlines()) == 1
    # an unknown account writes nothing
    assert cli(env, "accounts", "set", BOB, "--max-hold", "1h").returncode == 2
    assert len(account_events(database_url)) == 6


# ---- 3. red team ---------------------------------------------------------------------------------


def one_line(result, code: int) -> str:
    lines = lines_of(result)
    assert result.returncode == code and len(lines) == 1, (result.returncode, result.stdout, result.stderr)
    return lines[0]


def test_huge_or_tiny_prices_are_usage_errors_not_database_errors(env, database_url):
    from tests.test_cli_rules import add_account, add_row, rules

    pid = add_row(database_url, add_account(database_url))
    # 1e999999 and 1e-20000 overflowed PostgreSQL's numeric: "database error", exit 70; 1E+400 was stored
    for args, text in [(("--stop-loss", "1e999999"), "too large"), (("--take-profit", "1e400"), "too large"),
                       (("--stop-loss", "1e-20000"), "decimal places"), (("--take-profit", "1000000000000000"),
                                                                          "too large"),
                       (("--trailing-stop", "1e-43"), "decimal places")]:
        line = one_line(cli(env, "positions", "set", str(pid), *args), 2)
        assert args[0] in line and text in line, line
    assert rules(database_url, pid)["take_profit_price"] is None
    assert cli(env, "positions", "set", str(pid), "--stop-loss", "0.000000000000000001",
               "--take-profit", "999999999999999.5").returncode == 0
    line = one_line(cli(env, "positions", "set", str(pid), "--max-hold", "3000000000s"), 2)
    assert "at most 2147483647 seconds" in line, line  # was "a duration like 90m", which it is


def test_a_bad_shard_flag_is_a_usage_error_and_a_bad_setting_is_78(env):
    for shard in ("0/4", "5/4", "1/0", "-1/2", "1/99999999999"):
        assert "--shard" in one_line(cli(env, "run", "--shard", shard), 2)  # was 78
    assert "MONITOR_SHARD" in one_line(cli(dict(env, MONITOR_SHARD="5/4"), "run"), 78)


def test_json_logs_cover_an_unknown_command_and_an_unreadable_env_file(env, tmp_path):
    for args, code in [(("nosuch",), 2), (("--env-file", str(tmp_path / "missing.env"), "status"), 78),
                       (("--env-file", str(tmp_path), "status"), 78), (("pnl", "--by"), 2)]:
        record = json.loads(one_line(cli(env, "--log-format", "json", *args), code))  # was plain text
        assert record["exit_code"] == code and record["level"] == "error", record


def test_an_option_missing_its_argument_points_at_its_own_commands_help(env):
    for args, where in [(("pnl", "--by"), "position-monitor pnl --help"),
                        (("positions", "set", "1", "--stop-loss"), "position-monitor positions set --help"),
                        (("status", "--runs"), "position-monitor status --help")]:
        assert f"(see '{where}')" in one_line(cli(env, *args), 2)  # was 'position-monitor --help'


def closed_pipe_run(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run the CLI with stdout a pipe nobody reads (its read end closed first, as `| head` leaves it)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "monitor", *args], env=env, cwd=ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


def test_a_reader_that_goes_away_is_no_internal_error(env, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    assert cli(env, "run").returncode == 0
    for args in [("status",), ("positions", "list", "--json"), ("accounts", "list")]:
        assert closed_pipe_run(env, *args) == (0, ""), args  # was "internal error: BrokenPipeError", 70
    sim.add_fault("500", path="info", type="clearinghouseState", user=ALICE, count=None)
    code, err = closed_pipe_run(env, "run", "--json")  # the run's own code, as recorded
    assert code == 1 and "internal error" not in err and "Traceback" not in err, err
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT exit_code FROM monitor_runs ORDER BY started_at DESC LIMIT 1").fetchone()[0] == 1


def test_lock_status_names_the_holders_run_id_and_sigterm_frees_it(env, sim, database_url):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    sim.hold_requests()
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--json"],
                            env=dict(env, MONITOR_HTTP_TIMEOUT="60"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        sim.wait_for_held_requests(1, timeout=60)
        shown = json.loads(cli(env, "lock", "status", "--json").stdout)
        with psycopg.connect(database_url) as conn:
            (run_id,), = conn.execute("SELECT run_id FROM monitor_runs WHERE finished_at IS NULL").fetchall()
        assert shown["held"] and shown["holder"]["run_id"] == run_id  # was the file lease's token
        assert f"run {run_id}" in cli(env, "lock", "status").stdout
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        assert proc.wait(timeout=30) == 143 and time.monotonic() - began < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        sim.release_requests()
    out, err = proc.communicate()
    assert json.loads(out)["exit_code"] == 143 and len(err.splitlines()) == 1 and "SIGTERM" in err
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT exit_code FROM monitor_runs WHERE run_id = %s", (run_id,)).fetchone()[0] == 143
    assert cli(env, "lock", "status").stdout.startswith("free")


def test_accounts_add_labels_are_one_line_and_a_changed_label_is_said(env, sim, database_url):
    for label in ("a\nb", "tab\there", "", " ", "x" * 201):
        assert "--label" in one_line(cli(env, "accounts", "add", ALICE, "--label", label), 2)  # "a\nb" was stored
    assert cli(env, "accounts", "add", ALICE, "--label", "main").stdout.strip() == f"added: {ALICE} (main)"
    result = cli(env, "accounts", "add", ALICE, "--label", "hedge")  # was "already watched (active)"
    assert result.stdout.strip() == f"already watched (active), label changed: {ALICE} (hedge)"
    assert cli(env, "accounts", "add", ALICE).stdout.strip() == f"already watched (active): {ALICE} (hedge)"
    assert account_events(database_url)[-1] == ("account_updated", "cli", {"label": {"old": "main", "new": "hedge"}})


def test_the_user_role_warning_of_accounts_add_is_a_json_line_under_json_logs(env, sim):
    sim.add_fault("500", path="info", type="userRole", count=None)
    result = cli(env, "--log-format", "json", "accounts", "add", BOB)
    assert result.returncode == 0, result.stderr
    record = json.loads(one_line(result, 0))  # was a plain "position-monitor: ..." line
    assert record["level"] == "warning" and record["account"] == BOB, record
    assert "could not ask the exchange" in record["message"], record


def test_the_recipes_give_a_stopping_run_the_time_the_readme_says_it_may_need():
    import yaml

    from monitor.config import Settings
    from tests.test_recipes import DEPLOY, read_unit, seconds

    # README, "Signals": a step in flight up to MONITOR_HTTP_TIMEOUT, then the failure ping (5 s at most).
    needed = Settings(host_id="test").http_timeout + 5
    service = read_unit(DEPLOY / "position-monitor.service")["Service"]
    assert seconds(service["TimeoutStopSec"]) > needed  # was 10: SIGKILL before the run recorded itself
    for name in ("k8s-cronjob.yaml", "k8s-cronjob-sharded.yaml"):
        doc = yaml.safe_load((DEPLOY / name).read_text())
        job = doc["spec"]["jobTemplate"]["spec"]
        grace = job["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > needed and job["activeDeadlineSeconds"] + grace < 300, name


def test_a_non_monitor_line_in_the_env_file_is_named_not_silently_dropped(env, tmp_path):
    env_file = tmp_path / "monitor.env"
    env_file.write_text("MONITOR_LOG_LEVEL=warning\nPGSSLMODE=verify-full\nexport PGPASSWORD='s3cr$t'\n")
    result = cli(env, "--env-file", str(env_file), "lock", "status")
    assert result.returncode == 0, result.stderr
    warnings = lines_of(result)
    assert len(warnings) == 2 and "PGPASSWORD" in warnings[0] and "PGSSLMODE" in warnings[1], warnings
    assert "s3cr" not in result.stderr and "verify-full" not in result.stderr  # names, never values
    result = cli(env, "--log-format", "json", "--env-file", str(env_file), "lock", "status")
    assert [json.loads(line)["event"] for line in lines_of(result)] == ["unknown_variable"] * 2


def test_an_unreadable_key_is_no_fault_of_a_run_whose_fired_rule_needs_no_order(env, sim, database_url, tmp_path):
    """Red team: a stop loss crosses, but the position was already closed on the exchange. The exit reserve's
    estimate read the key file and recorded the failure, so the run exited 78 and paged key_unreadable ("the exit
    rules stay armed") for a row it had just closed. Only a signature that is attempted fails the run now."""
    agent = EthAccount.create()
    sim.approve_agent(ALICE, agent.address)
    key_file = tmp_path / "hl.key"
    key_file.write_text(agent.key.hex() + "\n")
    key_file.chmod(0o640)  # readable by the group: refused whenever it is read
    environ = dict(env, MONITOR_HL_SECRET_KEY_FILE=str(key_file))
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(environ, "accounts", "add", ALICE).returncode == 0
    assert cli(environ, "run").returncode == 0
    with psycopg.connect(database_url) as conn:
        pid = conn.execute("SELECT id FROM positions WHERE coin = 'BTC'").fetchone()[0]
    assert cli(environ, "positions", "set", str(pid), "--stop-loss", "29500").returncode == 0
    sim.set_mid("BTC", "29000")
    sim.close_external(ALICE, "BTC")  # closed on the exchange already: nothing to sign this run

    result = cli(environ, "run", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert report["closed"] == 1 and report["close_orders_sent"] == 0 and report["exit_code"] == 0
    assert "key_unreadable" not in [a["kind"] for a in report["alerts"]]
