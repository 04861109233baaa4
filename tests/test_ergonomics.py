"""Operators' edges (issue 13, items 3, 4, 5 (keys) and 9), through the real CLI in subprocesses:

- expected faults are one line and their documented exit code, never a traceback, on every command;
- ``--log-format json`` makes every stderr line one JSON object, the CLI's own lines included, one per fault;
- the key file is read only right before a run signs: status, positions, db, lock and run --dry-run never need it;
- ``--env-file``, the unknown-variable warning, tables that fit a terminal, ``db stop``, "re-activated".
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pm_testkit import with_database
from tests.conftest import ALICE, ROOT, cli

BOB = "0x" + "b2" * 20


def one_line(result, code: int) -> str:
    """The command failed with ``code``, one line on stderr, no traceback; that line."""
    lines = result.stderr.splitlines()
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    return lines[0]


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


# Every command, with arguments that would otherwise be valid.
COMMANDS = [
    ("run",), ("run", "--dry-run"), ("run", "--json"), ("status",), ("status", "--json"),
    ("accounts", "list"), ("accounts", "disable", ALICE), ("positions", "list"), ("positions", "history", "1"),
    ("close", "1"), ("db", "migrate"), ("db", "status"), ("lock", "status"), ("lock", "clear"),
]


# --------------------------------------------------------------------------------------------------
# Item 3: no tracebacks for expected faults


@pytest.mark.parametrize("url", ["garbage", "host=/tmp badopt=1", "postgresql://u:s3cr3t@[::1/db",
                                 "postgresql://u:s3cr3t@localhost/db?bogus=1"])
def test_a_malformed_database_url_is_one_line_and_78_on_every_command(env, url):
    environ = dict(env, MONITOR_DATABASE_URL=url)
    commands = COMMANDS if url == "garbage" else [("status",), ("db", "migrate"), ("run", "--dry-run")]
    for command in commands:
        line = one_line(cli(environ, *command), 78)
        assert line.startswith("position-monitor: MONITOR_DATABASE_URL: not a valid PostgreSQL URL"), (command, line)
        assert "s3cr3t" not in line
    line = one_line(cli(without(env, "MONITOR_DATABASE_URL"), "--database-url", url, "status"), 78)
    assert "--database-url" in line and "s3cr3t" not in line


def test_db_migrate_as_a_role_without_ddl_is_one_line(pg_server_url, database_url):
    role = f"pm_reader_{uuid.uuid4().hex[:8]}"
    empty = f"pm_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'CREATE DATABASE "{empty}"')
    try:
        with psycopg.connect(database_url, autocommit=True) as owner:
            owner.execute(f'GRANT SELECT ON schema_migrations TO "{role}"')
            owner.execute(f'REVOKE CREATE ON SCHEMA public FROM PUBLIC, "{role}"')
        base = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
        # a schema that is behind: the role may not create it (one line, exit 78, what to do)
        behind = make_conninfo(with_database(pg_server_url, empty), user=role)
        line = one_line(cli(dict(base, MONITOR_DATABASE_URL=behind), "db", "migrate"), 78)
        assert "may not change the schema" in line and "schema's owner" in line
        # a schema that is current needs no DDL: the least-privilege role may run it
        current = make_conninfo(database_url, user=role)
        result = cli(dict(base, MONITOR_DATABASE_URL=current), "db", "migrate")
        assert result.returncode == 0 and result.stdout.strip() == "schema is up to date", result.stderr
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{empty}" WITH (FORCE)')
            with psycopg.connect(database_url, autocommit=True) as owner:
                owner.execute(f'REVOKE ALL ON schema_migrations FROM "{role}"')
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.mark.parametrize("args", [
    ("status", "--runs", "-1"), ("status", "--runs", "0"), ("status", "--runs", "1000000000000"),
    ("close", "0"), ("close", "--", "-5"), ("close", "99999999999999999999"),
    ("positions", "history", "0"), ("positions", "history", "99999999999999999999"),
    ("run", "--account", "0x12"), ("--log-level", "loud", "status"), ("status", "--no-such-flag"),
])
def test_bad_numbers_and_flags_are_one_line_and_2(env, args):
    line = one_line(cli(env, *args), 2)
    assert line.startswith("position-monitor: ")


def test_unreadable_files_and_missing_directories_are_one_line(env, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (dict(env, MONITOR_LOCK_FILE=str(a_file / "run.lock")), ("run",), 78, "MONITOR_LOCK_FILE"),
        (dict(without(env, "MONITOR_DATABASE_URL"), MONITOR_DATA_DIR=str(a_file / "data")), ("status",), 78,
         "MONITOR_DATA_DIR"),
        (env, ("--env-file", str(tmp_path / "missing.env"), "status"), 78, "--env-file"),
        (env, ("--env-file", str(tmp_path), "status"), 78, "--env-file"),
    ]
    for environ, args, code, named in cases:
        assert named in one_line(cli(environ, *args), code), args
    # a database directory that is not there: 69, saying what failed (not only libpq's hint)
    line = one_line(cli(env, "--database-url", f"host={tmp_path / 'no-such-dir'} dbname=x", "status"), 69)
    assert "database unavailable: connection to server on socket" in line and "No such file" in line


# --------------------------------------------------------------------------------------------------
# Item 4: JSON logs all the way


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]  # fails on any line that is not one JSON object


def test_json_logs_all_the_way_one_line_per_fault(env, sim):
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    assert cli(env, "accounts", "add", BOB).returncode == 0
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.add_fault("500", path="info", type="clearinghouseState", user=BOB, count=None)
    environ = dict(env, MONITOR_LOG_FORMTA="json")  # a typo: warned about, as JSON
    result = cli(environ, "--log-format", "json", "--log-level", "info", "run")
    assert result.returncode == 1, result.stderr
    lines = json_lines(result.stderr)
    events = [entry.get("event") for entry in lines]
    assert events.count("account_failed") == 1  # once, not logged and echoed
    failed = next(entry for entry in lines if entry.get("event") == "account_failed")
    assert failed["account"] == BOB and failed["level"] == "warning"
    warning = next(entry for entry in lines if entry.get("event") == "unknown_variable")
    assert "MONITOR_LOG_FORMTA" in warning["message"] and "MONITOR_LOG_FORMAT" in warning["message"]
    started = next(entry for entry in lines if entry.get("event") == "run_started")
    finished = next(entry for entry in lines if entry.get("event") == "run_finished")
    assert started["level"] == finished["level"] == "info" and finished["exit_code"] == 1
    assert started["run_id"] == finished["run_id"] == failed["run_id"] != "-"
    assert events.index("run_started") < events.index("account_failed") < events.index("run_finished")

    # the CLI's own one-line faults are JSON too: a config error, a usage error, a bad global option
    for environ, args, code in [(dict(env, MONITOR_CLOSE_SLIPPAGE="nan"), ("status",), 78),
                                (env, ("status", "--runs", "-1"), 2), (env, ("--log-level", "loud", "status"), 2),
                                (dict(env, MONITOR_DATABASE_URL="garbage"), ("db", "status"), 78)]:
        result = cli(environ, "--log-format", "json", *args)
        assert result.returncode == code and "Traceback" not in result.stderr
        (entry,) = json_lines(result.stderr)
        assert entry["level"] == "error" and entry["exit_code"] == code and entry["message"]
    result = cli(dict(env, MONITOR_LOG_FORMAT="json", MONITOR_DATABASE_URL="garbage"), "status")
    (entry,) = json_lines(result.stderr)
    assert entry["exit_code"] == 78


def test_an_account_failure_is_one_line_in_text_too(env, sim):
    assert cli(env, "accounts", "add", BOB).returncode == 0
    sim.add_fault("500", path="info", type="clearinghouseState", user=BOB, count=None)
    for args in [("run",), ("run", "--json")]:
        result = cli(env, *args)
        assert result.returncode == 1
        assert [line for line in result.stderr.splitlines() if BOB in line] == [
            next(line for line in result.stderr.splitlines() if line.startswith(f"position-monitor: account {BOB}"))]


# --------------------------------------------------------------------------------------------------
# Item 5: keys only for sending


def unreadable_key_files(tmp_path: Path) -> list[Path]:
    """Key files no command but a sending run may need to read: a directory, a missing file, and (unless
    we are root, whom chmod does not stop) a 0000 file."""
    paths = [tmp_path / "a-directory", tmp_path / "missing.key"]
    paths[0].mkdir()
    if os.geteuid() != 0:
        locked = tmp_path / "locked.key"
        locked.write_text("0x" + "11" * 32)
        locked.chmod(0)
        paths.append(locked)
    return paths


def test_commands_that_never_sign_never_read_the_key(env, sim, tmp_path):
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    sim.open_position(ALICE, "BTC", "1", "30000")
    for key_file in unreadable_key_files(tmp_path):
        environ = dict(env, MONITOR_HL_SECRET_KEY_FILE=str(key_file))
        for args in [("status",), ("status", "--json"), ("positions", "list"), ("accounts", "list"),
                     ("db", "status"), ("db", "migrate"), ("lock", "status"), ("lock", "clear"),
                     ("run", "--dry-run"), ("run", "--dry-run", "--json")]:
            result = cli(environ, *args)
            assert result.returncode == 0, (key_file.name, args, result.stderr)
            assert "MONITOR_HL_SECRET_KEY_FILE" not in result.stderr
        # a run with nothing to sign does not read it either (tests/test_review_issue13.py: one that signs)
        result = cli(environ, "run")
        assert result.returncode == 0 and "MONITOR_HL_SECRET_KEY_FILE" not in result.stderr, result.stderr


# --------------------------------------------------------------------------------------------------
# Item 9: --env-file, unknown variables, tables, db stop, re-activated


def test_env_file_values_are_literal_and_the_environment_wins(env, tmp_path, database_url):
    conninfo = make_conninfo(database_url, application_name="pm env file")  # a libpq string with spaces
    env_file = tmp_path / "monitor.env"
    env_file.write_text(
        "# a comment, then a blank line\n\n"
        f"MONITOR_DATABASE_URL={conninfo}\n"
        "MONITOR_HOST_ID=web 1 $HOME & `id` ;co\n"
        "export MONITOR_LOG_FORMAT=text\n"
    )
    environ = without(env, "MONITOR_DATABASE_URL")
    result = cli(environ, "--env-file", str(env_file), "run", "--dry-run")
    assert result.returncode == 0, result.stderr
    status = json.loads(cli(environ, "--env-file", str(env_file), "status", "--json").stdout)
    assert status["runs"][0]["host"] == "web 1 $HOME & `id` ;co"
    # the environment wins over the file, a flag over both
    environ = dict(environ, MONITOR_HOST_ID="from-the-environment", MONITOR_LOG_FORMAT="json")
    assert cli(environ, "--env-file", str(env_file), "run", "--dry-run").returncode == 0
    status = json.loads(cli(environ, "--env-file", str(env_file), "status", "--json").stdout)
    assert status["runs"][0]["host"] == "from-the-environment"
    result = cli(environ, "--env-file", str(env_file), "--log-format", "text", "status", "--runs", "0")
    assert one_line(result, 2).startswith("position-monitor: ")


def test_an_env_file_line_that_does_not_parse_is_78_without_its_text(env, tmp_path):
    env_file = tmp_path / "monitor.env"
    env_file.write_text("MONITOR_LOG_LEVEL=info\nMONITOR_HL_SECRET_KEY='0xdeadbeefs3cr3t\n")
    line = one_line(cli(env, "--env-file", str(env_file), "status"), 78)
    assert "--env-file" in line and "line 2" in line and "s3cr3t" not in line
    env_file.write_text("MONITOR_LOG_LEVEL\n")
    assert "MONITOR_LOG_LEVEL" in one_line(cli(env, "--env-file", str(env_file), "status"), 78)


def test_an_unknown_monitor_variable_is_one_warning_naming_the_closest(env):
    result = cli(dict(env, MONITOR_DATABSE_URL="postgresql://u:s3cr3t@x/y", MONITOR_ZZZ="1"), "accounts", "list")
    assert result.returncode == 0
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "s3cr3t" not in result.stderr
    typo = next(line for line in lines if "MONITOR_DATABSE_URL" in line)
    assert typo.startswith("position-monitor: ") and "did you mean MONITOR_DATABASE_URL?" in typo
    assert "did you mean" not in next(line for line in lines if "MONITOR_ZZZ" in line)
    assert cli(env, "accounts", "list").stderr == ""  # the test suite's own variables are no typos


def test_accounts_add_on_a_disabled_account_says_re_activated(env):
    assert cli(env, "accounts", "add", ALICE).stdout.startswith("added: ")
    assert cli(env, "accounts", "add", ALICE).stdout.startswith("already watched (active): ")
    assert cli(env, "accounts", "disable", ALICE).returncode == 0
    result = cli(env, "accounts", "add", ALICE)
    assert result.returncode == 0 and result.stdout.startswith(f"re-activated: {ALICE}"), result.stdout


def on_a_terminal(env: dict[str, str], *args: str, columns: int = 80) -> str:
    """stdout of the real CLI on a pseudo-terminal ``columns`` wide."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "monitor", *args], env=dict(env, COLUMNS=str(columns)),
                            cwd=ROOT, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=60) == 0
    os.close(master)
    return output.decode().replace("\r\n", "\n")


def test_status_tables_fit_80_columns_on_a_terminal_and_wide_shows_everything(env, sim):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE, "--label", "the main trading account of the desk").returncode == 0
    assert cli(env, "accounts", "add", BOB).returncode == 0
    sim.add_fault("500", path="info", type="clearinghouseState", user=BOB, count=None)
    assert cli(env, "run").returncode == 1
    text = on_a_terminal(env, "status")
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "Last runs:" in text and "Accounts:" in text and "0xb2b2…b2b2" in text
    wide = on_a_terminal(env, "status", "--wide")
    assert max(len(line) for line in wide.splitlines()) > 80 and "consecutive_failures" in wide
    positions = on_a_terminal(env, "positions", "list")
    assert max(len(line) for line in positions.splitlines()) <= 80 and "--wide shows them" in positions
    assert "net_pnl" in on_a_terminal(env, "positions", "list", "--wide")
    piped = cli(env, "status").stdout  # not a terminal: as before, every column in full
    assert "consecutive_failures" in piped and "the main trading account of the desk" in piped


def test_db_stop_stops_the_embedded_server(env, tmp_path):
    data = tmp_path / "embedded"
    data.mkdir()
    for parent in [data, *data.parents]:  # the embedded server runs as its own user when we are root
        if parent == Path("/tmp") or parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o755)
    environ = dict(without(env, "MONITOR_DATABASE_URL"), MONITOR_DATA_DIR=str(data))
    result = cli(environ, "db", "stop")
    assert result.returncode == 0 and result.stdout.startswith("not running:"), result.stderr
    try:
        assert cli(environ, "accounts", "list", timeout=180).returncode == 0  # starts it; it keeps running
        assert (data / "pgdata" / "postmaster.pid").exists()
        result = cli(environ, "db", "stop")
        assert result.returncode == 0 and result.stdout.startswith("stopped:"), result.stderr
        assert not (data / "pgdata" / "postmaster.pid").exists()
        assert cli(environ, "db", "stop").stdout.startswith("not running:")
    finally:
        cli(environ, "db", "stop")
    assert one_line(cli(env, "db", "stop"), 2).endswith("only the embedded server is stopped here")


def test_a_crash_under_json_logs_is_one_json_line_with_its_traceback(env, monkeypatch):
    from click.testing import CliRunner

    import monitor.operations
    from monitor.cli import cli as command

    def crash(*_args, **_kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(monitor.operations, "execute_run", crash)
    result = CliRunner().invoke(command, ["--log-format", "json", "run"], env=env)
    assert result.exit_code == 70, result.output
    (entry,) = json_lines(result.output)
    assert entry["message"] == "internal error: ZeroDivisionError: boom" and entry["exit_code"] == 70
    assert "Traceback" in entry["traceback"] and "ZeroDivisionError" in entry["traceback"]
