"""End to end: the real CLI, a real PostgreSQL, the real SDK against the loopback simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from decimal import Decimal

import psycopg
import pytest

from tests.conftest import FIXTURE_ACCOUNT, ROOT, cli, fixture_response, run_json

ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20


def add(env, *addresses):
    for address in addresses:
        result = cli(env, "accounts", "add", address)
        assert result.returncode == 0, result.stderr


def open_rows(db, address=None):
    return db.list_positions(status="open", address=address)


def dump(database_url):
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT * FROM positions ORDER BY id").fetchall()


def test_discovers_the_recorded_twelve_position_account_exactly(env, sim, db):
    recorded = fixture_response("clearinghouseState.json")
    sim.seed_from_clearinghouse(FIXTURE_ACCOUNT, recorded)
    add(env, FIXTURE_ACCOUNT)

    report = run_json(env)

    assert report["discovered"] == 12
    assert report["accounts_failed"] == 0
    rows = {r["coin"]: r for r in open_rows(db)}
    expected = {p["position"]["coin"]: p["position"] for p in recorded["assetPositions"]}
    assert set(rows) == set(expected)
    for coin, position in expected.items():
        szi = Decimal(position["szi"])
        assert rows[coin]["side"] == ("long" if szi > 0 else "short")
        assert rows[coin]["size"] == abs(szi)  # numeric column, Decimal in Python: exact
        assert rows[coin]["entry_price"] == Decimal(position["entryPx"])
        assert rows[coin]["source"] == "discovered"
    assert sum(r["side"] == "long" for r in rows.values()) == 7


def test_second_run_is_idempotent(env, sim, db, database_url):
    sim.open_position(ALICE, "BTC", "0.5", "30000")
    sim.open_position(ALICE, "ETH", "-2", "1900")
    add(env, ALICE)
    first = run_json(env)
    assert first["discovered"] == 2
    before = [(r["id"], r["coin"], r["size"], r["entry_price"], r["status"]) for r in open_rows(db)]

    second = run_json(env)

    assert (second["discovered"], second["updated"], second["closed"]) == (0, 0, 0)
    after = [(r["id"], r["coin"], r["size"], r["entry_price"], r["status"]) for r in open_rows(db)]
    assert after == before


def test_resize_updates_and_external_close_is_explained_from_fills(env, sim, db):
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(ALICE, "SOL", "-10", "20")
    add(env, ALICE)
    run_json(env)

    sim.resize(ALICE, "BTC", "0.4", "31000")  # a partial close of 0.6 at 31000
    sim.close_external(ALICE, "SOL", "18")  # a short closed below entry: profit
    report = run_json(env)

    assert report["updated"] == 1 and report["closed"] == 1
    btc = {r["coin"]: r for r in open_rows(db)}["BTC"]
    assert btc["size"] == Decimal("0.4")
    assert btc["realized_pnl"] == Decimal("600")  # 0.6 * (31000 - 30000), gross of fees
    closed = {r["coin"]: r for r in db.list_positions(status="closed")}
    sol = closed["SOL"]
    assert sol["exit_price"] == Decimal("18")
    assert sol["realized_pnl"] == Decimal("20")  # 10 * (20 - 18)
    assert sol["close_reason"] == "external"
    assert sol["fees"] > 0

    sim.close_external(ALICE, "BTC", "32000")
    final = run_json(env)
    assert final["closed"] == 1
    btc = {r["coin"]: r for r in db.list_positions(status="closed")}["BTC"]
    assert btc["realized_pnl"] == Decimal("600") + Decimal("0.4") * Decimal("2000")  # the partial counted once


def test_flip_closes_the_old_row_and_opens_a_new_one(env, sim, db):
    sim.open_position(ALICE, "ETH", "2", "1800")
    add(env, ALICE)
    run_json(env)

    sim.flip(ALICE, "ETH", "-3", "1900")
    report = run_json(env)

    assert report["closed"] == 1 and report["discovered"] == 1
    closed = db.list_positions(status="closed")
    assert closed[0]["close_reason"] == "flipped" and closed[0]["exit_price"] == Decimal("1900")
    assert closed[0]["realized_pnl"] == Decimal("200")
    now_open = open_rows(db)
    assert [(r["coin"], r["side"], r["size"]) for r in now_open] == [("ETH", "short", Decimal("3"))]


@pytest.mark.parametrize("fault, args", [
    ("429", {}),
    ("500", {}),
    ("hang", {"seconds": 6}),
    ("malformed", {}),
    ("error_body", {}),
    ("missing_field", {}),
])
def test_a_failed_read_closes_nothing_and_other_accounts_still_run(env, sim, db, database_url, fault, args):
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(BOB, "ETH", "1", "1900")
    add(env, ALICE, BOB)
    run_json(env)
    sim.close_external(BOB, "ETH", "2000")
    sim.add_fault(fault, path="info", type="clearinghouseState", user=ALICE, count=None, **args)
    before = [r for r in dump(database_url) if r[1] == 1]  # Alice's rows

    report = run_json(env, expect=1)

    assert report["accounts_failed"] == 1
    assert report["failures"][0]["account"] == ALICE
    assert report["closed"] == 1  # Bob's close still happened
    assert [r for r in dump(database_url) if r[1] == 1] == before


def test_an_empty_answer_is_confirmed_before_anything_is_closed(env, sim, db):
    sim.open_position(ALICE, "BTC", "1", "30000")
    add(env, ALICE)
    run_json(env)

    sim.add_fault("empty", user=ALICE, count=1)  # one empty answer, then the truth
    report = run_json(env)
    assert report["closed"] == 0 and len(open_rows(db)) == 1

    sim.add_fault("empty", user=ALICE, count=None)  # empty every time, but no fill closed it
    report = run_json(env)
    assert report["closed"] == 0 and len(open_rows(db)) == 1
    assert any(a["type"] == "mark_missing" for a in report["actions"])  # the unexplained wait starts


def test_dry_run_writes_nothing_and_sends_nothing(env, sim, db, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(ALICE, "ETH", "1", "1900")
    add(env, ALICE)
    run_json(env)
    sim.close_external(ALICE, "BTC", "31000")
    sim.open_position(ALICE, "SOL", "5", "20")
    sim.resize(ALICE, "ETH", "2", "1950")
    before = dump(database_url)
    sim.reset_log()

    report = run_json(env, "--dry-run")

    assert report["dry_run"] is True
    assert (report["discovered"], report["updated"], report["closed"]) == (1, 1, 1)
    assert dump(database_url) == before
    assert not [r for r in sim.requests_log() if r["path"].endswith("/exchange")]
    human = cli(env, "run", "--dry-run")
    assert "dry run" in human.stdout and "discover" in human.stdout


def test_young_rows_are_not_closed_within_the_grace_period(env, sim, db):
    sim.open_position(ALICE, "BTC", "1", "30000")
    add(env, ALICE)
    account_id = db.list_accounts()[0].id
    with db.conn.transaction():
        db.conn.execute("INSERT INTO positions (account_id, coin, side, size, entry_price)"
                        " VALUES (%s, 'DOGE', 'long', 100, 0.1)",
                        (account_id,))
    env = dict(env, MONITOR_CLOSE_GRACE="60")
    report = run_json(env)
    assert report["closed"] == 0
    assert {r["coin"] for r in open_rows(db)} == {"BTC", "DOGE"}


def test_twenty_processes_at_once_one_works_the_rest_exit_75(env, sim, db):
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(ALICE, "ETH", "1", "1900")
    add(env, ALICE)
    sim.hold_requests()  # the winner's read waits until every other starter has given up
    env = dict(env, MONITOR_HTTP_TIMEOUT="120")
    procs = [subprocess.Popen([sys.executable, "-m", "monitor", "run", "--json"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(20)]
    from tests.test_lock import wait_all_but_one

    wait_all_but_one(procs)
    sim.release_requests()
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0] + [75] * 19, results
    for code, _, err in results:
        if code == 75:
            assert "another run holds the lock" in err and "pid" in err
            assert "Traceback" not in err
    rows = open_rows(db)
    assert sorted(r["coin"] for r in rows) == ["BTC", "ETH"]


def test_concurrent_insert_by_another_connection_is_a_conflict_not_a_duplicate(env, sim, db, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    add(env, ALICE)
    account_id = db.list_accounts()[0].id
    other = psycopg.connect(database_url)
    other.execute("INSERT INTO positions (account_id, coin, side, size, entry_price, source)"
                  " VALUES (%s, 'BTC', 'long', 1, 30000, 'platform')", (account_id,))  # not committed yet
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--json"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with psycopg.connect(database_url, autocommit=True) as watcher:  # until the monitor's INSERT waits on our row
        deadline = time.monotonic() + 60
        while not watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'position-monitor' AND wait_event_type = 'Lock'").fetchone()[0]:
            assert proc.poll() is None and time.monotonic() < deadline, "the monitor never waited on the row"
            time.sleep(0.02)
    other.commit()
    other.close()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["conflicts"] == 1 and report["discovered"] == 0
    rows = open_rows(db)
    assert len(rows) == 1 and rows[0]["source"] == "platform"


def test_a_lock_left_by_a_dead_process_is_taken_over(env, tmp_path):
    lock_path = env["MONITOR_LOCK_FILE"]
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from filelock import SoftFileLease\n"
        f"lease = SoftFileLease({lock_path!r}, lease_duration=300.0, heartbeat_interval=15.0)\n"
        "lease.acquire()\n"
        "print('held', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.wait(timeout=10)
    assert os.path.exists(lock_path)

    result = cli(env, "run", "--json")

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name, value", [
    ("MONITOR_LOCK_STALE_AFTER", "soon"),
    ("MONITOR_LOCK_STALE_AFTER", "-5"),
    ("MONITOR_HL_API_URL", "ftp://example"),
    ("MONITOR_LOG_LEVEL", "loud"),
    ("MONITOR_LOCK_BACKEND", "redis"),
    ("MONITOR_HL_SECRET_KEY", "0x1234"),
    ("MONITOR_CLOSE_GRACE", "x"),
])
def test_bad_configuration_is_one_line_and_exit_78(env, name, value):
    result = cli(dict(env, **{name: value}), "run")
    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0]
    if name == "MONITOR_HL_SECRET_KEY":
        assert value not in result.stderr


def test_database_unreachable_is_exit_69(env):
    result = cli(dict(env, MONITOR_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none"), "run")
    assert result.returncode == 69
    assert "database unavailable" in result.stderr and "Traceback" not in result.stderr


def test_schema_behind_is_exit_78_and_db_migrate_fixes_it(env, pg_server_url):
    import uuid

    from tests.conftest import with_database

    name = f"pm_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    env = dict(env, MONITOR_DATABASE_URL=with_database(pg_server_url, name))
    result = cli(env, "run")
    assert result.returncode == 78 and "db migrate" in result.stderr
    procs = [subprocess.Popen([sys.executable, "-m", "monitor", "db", "migrate"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    assert sum("applied:" in out for out, _ in outputs) == 1
    assert cli(env, "run").returncode == 0


def test_unknown_account_flag_is_a_usage_error(env):
    result = cli(env, "run", "--account", ALICE)
    assert result.returncode == 2 and "not a watched account" in result.stderr


def test_help_and_version_everywhere():
    for args in (["--help"], ["run", "--help"], ["accounts", "add", "--help"], ["positions", "list", "--help"],
                 ["db", "migrate", "--help"], ["lock", "status", "--help"], ["--version"]):
        result = subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.strip()
