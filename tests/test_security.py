"""Security properties, end to end: the real CLI, a real PostgreSQL, the real SDK against the simulator.

(a) the private key never appears in stdout, stderr, logs, files or the database;
(b) a key file readable by group or others is refused;
(c) SQL is parameterized: hostile coin names and labels round-trip as data;
(d) the lock path refuses symlinks;
(e) --dry-run sends zero signed actions, even with a key and exit rules firing;
(f) least privilege: deploy/grants.sql is executed as written and a full run works with only those grants.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import eth_account
import psycopg
import pytest
from psycopg import sql

from tests.conftest import ROOT, cli, run_json

ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20
GRANTS = ROOT / "deploy" / "grants.sql"


def add(env: dict[str, str], *addresses: str) -> None:
    for address in addresses:
        result = cli(env, "accounts", "add", address)
        assert result.returncode == 0, result.stderr


def execute(database_url: str, query: str, params: Any = None) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(query, params)


def account_id(database_url: str, address: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT id FROM accounts WHERE address = %s", (address,)).fetchone()[0]


def public_tables(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        " AND table_type = 'BASE TABLE' ORDER BY table_name")]


def dump_every_table(database_url: str) -> str:
    """Every row of every table, cast to text."""
    parts = []
    with psycopg.connect(database_url) as conn:
        for table in public_tables(conn):
            rows = conn.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))).fetchall()
            parts.append(table + "\n" + "\n".join(r[0] for r in rows))
    return "\n".join(parts)


def new_key() -> tuple[str, str]:
    """A fresh private key (hex, as eth_account prints it) and its address."""
    account = eth_account.Account.create()
    return account.key.hex(), account.address


def key_forms(secret: str) -> list[str]:
    body = secret.lower().removeprefix("0x")
    assert len(body) == 64
    return [body, "0x" + body]


def assert_no_key(text: str, secret: str, where: str) -> None:
    lowered = text.lower()
    for form in key_forms(secret):
        assert form not in lowered, f"the private key appears in {where}"


def files_under(path: Path) -> str:
    chunks = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        try:
            chunks.append(file.read_bytes().decode("utf-8", "replace"))
        except OSError:
            pass
    return "\n".join(chunks)


# --------------------------------------------------------------------------------------------------
# (a) the key never leaks


def test_the_private_key_never_appears_in_output_logs_files_or_the_database(env, sim, db, database_url, tmp_path):
    secret, agent = new_key()
    sim.approve_agent(ALICE, agent)
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(ALICE, "ETH", "-2", "1900")
    sim.open_position(BOB, "SOL", "10", "20")
    add(env, ALICE, BOB)
    env = dict(env, MONITOR_HL_SECRET_KEY=secret)
    outputs: list[str] = []

    def run(*args: str, expect: tuple[int, ...] = (0,), extra: dict[str, str] | None = None) -> dict[str, Any]:
        result = cli(dict(env, **(extra or {})), "--log-level", "debug", *args)
        outputs.extend([result.stdout, result.stderr])
        assert result.returncode in expect, (args, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr
        return json.loads(result.stdout) if "--json" in args else {}

    # 1. a normal run: discovers the three positions
    assert run("run", "--json")["discovered"] == 3

    # 2. a run with exchange faults: Bob's read fails (500), mids are malformed, the close order for
    #    Alice's ETH (stop loss fires) gets a 500 and an orphan-order read is rate limited
    execute(database_url, "UPDATE positions SET stop_loss_price = 1 WHERE coin = 'ETH'")  # short: mid >= 1
    sim.add_fault("500", path="info", type="clearinghouseState", user=BOB, count=None)
    sim.add_fault("malformed", path="info", type="allMids", count=1)
    faulty = run("run", "--json", expect=(1,))
    assert faulty["accounts_failed"] == 1 and faulty["notes"]
    sim.clear_faults()
    sim.add_fault("500", path="exchange", count=1)
    sim.add_fault("error_body", path="info", type="userFillsByTime", count=1)
    run("run", "--json", expect=(0, 1))
    sim.clear_faults()

    # 3. a run that closes on the exchange: Alice's BTC stop loss fires; a stranded trigger is cancelled
    sim.add_trigger_order(ALICE, "BTC", "A", "1", "25000", "sl")
    execute(database_url, "UPDATE positions SET stop_loss_price = 1000000 WHERE coin = 'BTC'")  # long: mid <= 1e6
    closing = run("run", "--json", extra={"MONITOR_LOG_FORMAT": "json"})
    assert closing["close_orders_sent"] >= 1
    closed = {r["coin"]: r for r in db.list_positions(status="closed")}
    assert closed["BTC"]["close_reason"] == "stop_loss" and sim.position(ALICE, "BTC") is None
    assert [r for r in sim.requests_log(path="exchange") if r["status"] == 200], "no signed action was sent"

    # 4. the other commands that print state
    for args in (["positions", "list", "--status", "all", "--json"], ["positions", "list", "--status", "all"],
                 ["accounts", "list", "--json"], ["lock", "status", "--json"], ["db", "status", "--json"]):
        run(*args)

    everything = "\n".join(outputs)
    log_lines = [line for line in everything.splitlines() if " run=" in line or line.startswith('{"time"')]
    assert log_lines, "no log line was written: the check would prove nothing about logs"
    assert_no_key(everything, secret, "stdout/stderr")
    assert_no_key(files_under(tmp_path), secret, "the files the monitor wrote (data dir, lock dir)")
    assert_no_key(dump_every_table(database_url), secret, "the database")


def test_an_invalid_key_is_exit_78_without_echoing_it(env):
    secret, _ = new_key()
    body = secret.lower().removeprefix("0x")
    for bad in (body[:40], "0x" + body[:63], body + "00", body[:63] + "g"):
        result = cli(dict(env, MONITOR_HL_SECRET_KEY=bad), "--log-level", "debug", "run")
        assert result.returncode == 78, result.stderr
        assert len(result.stderr.splitlines()) == 1 and "MONITOR_HL_SECRET_KEY" in result.stderr
        assert "Traceback" not in result.stderr
        for shown in (bad, bad.removeprefix("0x"), body[:16]):
            assert shown not in result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------
# (b) key file permissions


@pytest.mark.parametrize("mode, expected", [(0o640, 78), (0o604, 78), (0o660, 78), (0o600, 0), (0o400, 0)])
def test_a_key_file_readable_by_group_or_others_is_refused(env, sim, database_url, tmp_path, mode, expected):
    secret, agent = new_key()
    sim.approve_agent(ALICE, agent)
    sim.open_position(ALICE, "BTC", "1", "30000")
    add(env, ALICE)
    key_file = tmp_path / "hl.key"
    key_file.write_text(secret + "\n")
    key_file.chmod(mode)
    environ = dict(env, MONITOR_HL_SECRET_KEY_FILE=str(key_file), MONITOR_ALERT_AFTER_RUNS="1")
    environ.pop("MONITOR_HL_SECRET_KEY", None)
    assert cli(environ, "run").returncode == 0  # nothing to sign: the key file is not read
    execute(database_url, "UPDATE positions SET stop_loss_price = 40000")  # fires: the key is read to sign
    result = cli(environ, "run", "--json")
    assert result.returncode == expected, result.stderr
    assert "Traceback" not in result.stderr
    assert_no_key(result.stdout + result.stderr, secret, "output")
    if expected == 78:  # the error, and the urgent alert's text
        assert len(result.stderr.splitlines()) == 2
        assert "MONITOR_HL_SECRET_KEY_FILE" in result.stderr and "chmod 600" in result.stderr
        assert json.loads(result.stdout)["close_orders_sent"] == 0
    else:
        assert json.loads(result.stdout)["close_orders_sent"] == 1


# --------------------------------------------------------------------------------------------------
# (c) SQL is parameterized

HOSTILE_COINS = ["x'); DROP TABLE positions;--", "%s%(x)s{}\\'\"", "Ω'; SELECT pg_sleep(10);--"]


def test_hostile_coin_names_and_labels_round_trip_as_data(env, sim, db, database_url):
    for n, coin in enumerate(HOSTILE_COINS):
        sim.add_coin(coin, sz_decimals=2, mid="10")
        sim.open_position(ALICE, coin, str(n + 1), "10")
    label = "Robert'); DROP TABLE accounts;--"
    result = cli(env, "accounts", "add", ALICE, "--label", label)
    assert result.returncode == 0, result.stderr

    report = run_json(env)
    assert report["discovered"] == len(HOSTILE_COINS) and report["duration_seconds"] < 10

    rows = {r["coin"]: r for r in db.list_positions(status="open")}
    assert set(rows) == set(HOSTILE_COINS)
    for n, coin in enumerate(HOSTILE_COINS):
        assert rows[coin]["size"] == n + 1 and rows[coin]["side"] == "long"
    with psycopg.connect(database_url) as conn:
        for table in ("accounts", "positions", "position_events", "monitor_lease", "schema_migrations"):
            assert conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is not None, table
        assert conn.execute("SELECT label FROM accounts").fetchone()[0] == label
        assert conn.execute("SELECT count(*) FROM position_events WHERE event = 'discovered'").fetchone()[0] == 3

    listed = json.loads(cli(env, "positions", "list", "--json").stdout)
    assert sorted(r["coin"] for r in listed) == sorted(HOSTILE_COINS)
    assert run_json(env)["discovered"] == 0  # idempotent: the names match themselves on the next run

    sim.close_external(ALICE, HOSTILE_COINS[0], "12")
    assert run_json(env)["closed"] == 1
    (closed,) = db.list_positions(status="closed")
    assert closed["coin"] == HOSTILE_COINS[0] and closed["close_reason"] == "external"
    assert closed["exit_price"] == 12


# --------------------------------------------------------------------------------------------------
# (d) the lock path refuses symlinks


@pytest.mark.parametrize("which", ["run.lock", "run.lock.holder.json", "run.lock.gate"])
def test_a_symlinked_lock_path_is_refused(env, tmp_path, which):
    lock = Path(env["MONITOR_LOCK_FILE"])
    lock.parent.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "precious.txt"
    target.write_text("do not touch\n")
    (lock.parent / which).symlink_to(target)

    result = cli(env, "run")

    assert result.returncode == 78, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "MONITOR_LOCK_FILE" in result.stderr
    assert "symlink" in result.stderr and "Traceback" not in result.stderr
    assert target.read_text() == "do not touch\n"


def test_a_dangling_lock_symlink_creates_nothing(env, tmp_path):
    lock = Path(env["MONITOR_LOCK_FILE"])
    lock.parent.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "should-not-exist"
    lock.symlink_to(target)
    result = cli(env, "run")
    assert result.returncode == 78 and "symlink" in result.stderr
    assert not target.exists()


# --------------------------------------------------------------------------------------------------
# (e) dry run sends nothing signed


def test_dry_run_sends_zero_signed_actions_with_a_key_and_exit_rules_firing(env, sim, db, database_url):
    secret, agent = new_key()
    sim.approve_agent(ALICE, agent)
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(ALICE, "ETH", "-2", "1900")
    sim.open_position(ALICE, "SOL", "10", "20")
    add(env, ALICE)
    env = dict(env, MONITOR_HL_SECRET_KEY=secret)
    run_json(env)
    execute(database_url, "UPDATE positions SET stop_loss_price = 1000000 WHERE coin = 'BTC'")
    execute(database_url, "UPDATE positions SET close_requested_at = now() WHERE coin = 'ETH'")
    sim.add_trigger_order(ALICE, "SOL", "A", "10", "15", "sl")  # stranded once SOL is closed outside
    sim.close_external(ALICE, "SOL", "21")
    before = db.positions_table_dump()
    sim.reset_log()

    report = run_json(env, "--dry-run")

    assert report["dry_run"] is True and report["would_close"] == 2 and report["close_orders_sent"] == 0
    assert report["closed"] == 1  # planned: SOL
    assert any(a["type"] == "cancel_order" for a in report["actions"])
    assert sim.requests_log(path="exchange") == []
    assert db.positions_table_dump() == before
    assert sim.position(ALICE, "BTC") is not None and sim.position(ALICE, "ETH") is not None
    assert [o for o in sim.orders(ALICE, open_only=True) if o["coin"] == "SOL"]  # not cancelled


# --------------------------------------------------------------------------------------------------
# (f) least privilege


def as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.startswith("postgres"):
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"{quote(user)}:{quote(password)}@{host}"))
    return f"{url} user={user} password={password}"


def grants_sql(role: str) -> str:
    text = GRANTS.read_text()
    assert ':"monitor_role"' in text
    return text.replace(':"monitor_role"', sql.Identifier(role).as_string(None))


def sql_without_comments(text: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


@pytest.fixture
def app_role(database_url: str) -> Any:
    """A fresh login role with exactly the grants of deploy/grants.sql; dropped afterwards."""
    role = f"pm_app_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        try:
            admin.execute(grants_sql(role))  # the documented file, as written
        except BaseException:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
            raise
    try:
        yield role, as_user(database_url, role, password)
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_grants_file_names_every_table_of_the_schema(database_url):
    text = sql_without_comments(GRANTS.read_text())
    with psycopg.connect(database_url) as conn:
        tables = public_tables(conn)
    missing = [t for t in tables if not re.search(rf"\b{re.escape(t)}\b", text)]
    assert not missing, f"deploy/grants.sql does not mention {missing}: a new migration added tables"
    granted_delete = re.findall(r"GRANT\s+([^;]*?DELETE[^;]*?)\s+ON\s+TABLE\s+([^;]+?)\s+TO", text, re.S | re.I)
    assert granted_delete == []  # nothing is ever deleted
    assert not re.search(r"\b(ALL|TRUNCATE|CREATE|REFERENCES|TRIGGER|MAINTAIN)\b", text, re.I)


def test_a_full_run_works_as_a_role_with_only_the_documented_grants(env, sim, app_role, database_url):
    role, role_url = app_role
    secret, agent = new_key()
    sim.approve_agent(ALICE, agent)
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(ALICE, "ETH", "2", "1900")
    sim.open_position(BOB, "SOL", "-10", "20")
    env = dict(env, MONITOR_DATABASE_URL=role_url, MONITOR_HL_SECRET_KEY=secret)
    add(env, ALICE, BOB)  # accounts add, as the role

    assert run_json(env)["discovered"] == 3
    sim.resize(ALICE, "ETH", "1", "1950")
    sim.close_external(BOB, "SOL", "19")
    sim.add_trigger_order(ALICE, "BTC", "A", "1", "25000", "sl")
    with psycopg.connect(role_url, autocommit=True) as conn:  # the platform's own kind of write
        conn.execute("UPDATE positions SET stop_loss_price = 1000000 WHERE coin = 'BTC'")
    report = run_json(env)
    assert (report["updated"], report["closed"], report["close_orders_sent"]) == (1, 2, 1), report
    assert sim.position(ALICE, "BTC") is None
    assert run_json(env, expect=0)["closed"] == 0
    assert run_json(dict(env, MONITOR_LOCK_BACKEND="postgres"))["exit_code"] == 0  # the lease-row backend too
    for args in (["positions", "list", "--status", "all", "--json"], ["lock", "status", "--json"],
                 ["accounts", "disable", BOB], ["db", "status"]):
        result = cli(env, *args)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (args, result.stderr)

    with psycopg.connect(role_url, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == role
        closed = conn.execute("SELECT coin, close_reason FROM positions WHERE closed_at IS NOT NULL ORDER BY coin")
        assert closed.fetchall() == [("BTC", "stop_loss"), ("SOL", "external")]
        for statement in ("DELETE FROM positions", "DELETE FROM position_events", "DELETE FROM accounts",
                          "TRUNCATE positions", "DROP TABLE positions", "CREATE TABLE evil (x int)",
                          "ALTER TABLE positions ADD COLUMN evil int", "UPDATE schema_migrations SET name = 'x'",
                          "INSERT INTO schema_migrations (version, name) VALUES (999, 'x')",
                          "CREATE INDEX evil ON positions (coin)", "SELECT setval('positions_id_seq', 1)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)


def test_a_role_without_delete_can_run(env, sim, app_role, database_url):
    _, role_url = app_role
    sim.open_position(ALICE, "BTC", "1", "30000")
    env = dict(env, MONITOR_DATABASE_URL=role_url)
    add(env, ALICE)
    result = cli(env, "run", "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


# --------------------------------------------------------------------------------------------------
# A key may only move the accounts it is allowed to act for


def test_a_close_for_one_account_never_moves_another_accounts_position(env, sim, db, database_url):
    secret, agent = new_key()
    sim.add_sub_account(ALICE, BOB)  # Bob is Alice's sub-account; the key is Alice's agent
    sim.approve_agent(ALICE, agent)
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(BOB, "BTC", "2", "30000")
    add(env, ALICE, BOB)
    env = dict(env, MONITOR_HL_SECRET_KEY=secret)
    run_json(env)
    execute(database_url, "UPDATE positions SET close_requested_at = now() WHERE account_id = %s",
            (account_id(database_url, BOB),))

    run_json(env, expect=None)

    assert sim.position(ALICE, "BTC") is not None, "Alice's position was closed by an order meant for Bob"
    assert sim.position(ALICE, "BTC")["szi"] == "1.0"


@pytest.mark.parametrize("url", ["postgresql://monitor:S3cr3tPw9x@127.0.0.1:1/positions",
                                 "host=127.0.0.1 port=1 user=monitor password=S3cr3tPw9x dbname=positions"])
def test_the_database_password_is_never_echoed(env, url):
    result = cli(dict(env, MONITOR_DATABASE_URL=url), "--log-level", "debug", "run")
    assert result.returncode == 69 and "Traceback" not in result.stderr
    assert "S3cr3tPw9x" not in result.stdout + result.stderr
