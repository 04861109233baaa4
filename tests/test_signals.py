"""Signals and every exit path, proven with real processes (issue 13, items 1 and 2).

SIGTERM/SIGINT mid-read: the run stops within seconds with one line, is recorded (143/130), releases its
lock, pings failure and writes its metrics. A SIGKILLed run's row is marked crashed by the next run and
`status` never shows it running; `lock status` names a dead same-host holder as dead. Every exit path pings
and writes the metrics with the code it recorded, except a lock-busy start, which leaves the holder's
figures alone. A crash is exit 70 with one line.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest

from tests.conftest import ROOT, cli, run_json
from tests.test_notify import LoopbackServer

ALICE = "0x" + "a1" * 20
CHECK = "/ping/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278"


@pytest.fixture
def pings() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ops_env(env: dict[str, str], pings: LoopbackServer, tmp_path: Path) -> dict[str, str]:
    """The test's environment with a ping URL and a metrics file."""
    return dict(env, MONITOR_PING_URL=pings.url + CHECK, MONITOR_METRICS_FILE=str(tmp_path / "monitor.prom"))


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "monitor", "run", "--json", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def add_account(env: dict[str, str], sim: Any) -> None:
    sim.open_position(ALICE, "BTC", "1", "30000")
    result = cli(env, "accounts", "add", ALICE)
    assert result.returncode == 0, result.stderr


def runs(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT run_id, pid, finished_at, exit_code, error_summary FROM monitor_runs"
                            " ORDER BY started_at").fetchall()


def metric(path: Path, name: str) -> float | None:
    for line in path.read_text().splitlines():
        if line.startswith(f"position_monitor_{name} "):
            return float(line.split()[1])
    return None


def ping_paths(pings: LoopbackServer) -> list[str]:
    return [r["path"].split("?")[0].removeprefix(CHECK) for r in pings.recorder.requests]


def signalled_mid_read(env: dict[str, str], sim: Any, signum: int) -> tuple[int, float, str, str]:
    """Start a run, wait until its read is provably in flight (held by the simulator), signal it; the
    exit code, how long it took to exit after the signal, stdout and stderr."""
    sim.hold_requests()
    proc = start(dict(env, MONITOR_HTTP_TIMEOUT="60"))  # the read would hang for a minute
    try:
        sim.wait_for_held_requests(1, timeout=60)
        signalled = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(timeout=30)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
        sim.release_requests()
    out, err = proc.communicate()
    return code, took, out, err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_read_stops_the_run_recorded_pinged_metrics_lock_released(
        ops_env, sim, database_url, pings, tmp_path, signum, code):
    add_account(ops_env, sim)

    exit_code, took, out, err = signalled_mid_read(ops_env, sim, signum)

    assert exit_code == code, (exit_code, out, err)
    assert took < 5, took  # not after the read's 60 s timeout
    line, = err.strip().splitlines()  # one line, no traceback
    assert signal.Signals(signum).name in line and "Traceback" not in err, err
    report = json.loads(out)  # `run --json` prints its object on a signal too
    assert report["exit_code"] == code and signal.Signals(signum).name in report["error"]
    (run_id, _pid, finished_at, recorded, summary), = runs(database_url)
    assert run_id == report["run_id"] and finished_at is not None and recorded == code, summary
    assert ping_paths(pings) == ["/start", f"/{code}"]
    assert metric(tmp_path / "monitor.prom", "exit_code") == code
    assert metric(tmp_path / "monitor.prom", "lock_busy") == 0
    # The lock and the account's claim are released: the next run starts at once and does the work.
    began = time.monotonic()
    again = run_json(ops_env)
    assert time.monotonic() - began < 20 and again["discovered"] == 1


def test_sigterm_with_the_postgres_lease_releases_it(ops_env, sim, database_url):
    env = dict(ops_env, MONITOR_LOCK_BACKEND="postgres")
    add_account(env, sim)

    exit_code, _took, _out, err = signalled_mid_read(env, sim, signal.SIGTERM)

    assert exit_code == 143, err
    with psycopg.connect(database_url) as conn:
        released, = conn.execute("SELECT released_at FROM monitor_lease WHERE name = 'run'").fetchone()
    assert released is not None  # released, not left for the next run to take over from a dead pid
    again = run_json(env)
    assert not any("took the lease over" in note for note in again["notes"]), again["notes"]


def test_a_sigkilled_run_is_marked_crashed_by_the_next_and_never_shown_running(env, sim, database_url):
    env = dict(env, MONITOR_LOCK_BACKEND="postgres")
    add_account(env, sim)
    sim.hold_requests()
    proc = start(dict(env, MONITOR_HTTP_TIMEOUT="60"))
    try:
        sim.wait_for_held_requests(1, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        sim.release_requests()
    proc.communicate()

    # Before any run: `status` does not call it running, `lock status` names the dead pid.
    status = json.loads(cli(env, "status", "--json").stdout)
    assert status["runs"][0]["pid"] == proc.pid and status["runs"][0]["state"] == "crashed", status["runs"]
    text = cli(env, "status").stdout
    assert "running" not in text.split("Lock")[0], text
    lock = cli(env, "lock", "status")
    assert lock.returncode == 0 and f"dead (pid {proc.pid} on this host is gone" in lock.stdout, lock.stdout
    assert json.loads(cli(env, "lock", "status", "--json").stdout)["held"] is False

    run_json(env)

    (_dead_id, pid, finished_at, exit_code, summary), _next = runs(database_url)
    assert pid == proc.pid and finished_at is not None and exit_code is None, summary
    assert summary.startswith(f"crashed: process {proc.pid} is gone"), summary
    status = json.loads(cli(env, "status", "--json").stdout)
    assert [r["state"] for r in status["runs"]] == ["finished", "crashed"]


def test_a_live_run_is_shown_running_and_never_marked_crashed(env, sim, database_url):
    add_account(env, sim)
    sim.hold_requests()
    proc = start(dict(env, MONITOR_HTTP_TIMEOUT="60"))
    try:
        sim.wait_for_held_requests(1, timeout=60)
        status = json.loads(cli(env, "status", "--json").stdout)
        assert status["runs"][0]["state"] == "running"
        busy = cli(env, "run")  # finds the lock busy; must not mark the live run crashed
        assert busy.returncode == 75
    finally:
        sim.release_requests()
    assert proc.wait(timeout=60) == 0
    (_id, _pid, _finished, exit_code, summary), = runs(database_url)
    assert exit_code == 0 and summary is None


def test_lock_busy_leaves_the_holders_metrics_alone(ops_env, sim, pings, tmp_path):
    add_account(ops_env, sim)
    run_json(ops_env)  # the figures a later busy start must not overwrite
    prom = tmp_path / "monitor.prom"
    before = prom.read_text()
    assert metric(prom, "accounts_ok") == 1
    sim.hold_requests()
    holder = start(dict(ops_env, MONITOR_HTTP_TIMEOUT="60"))
    try:
        sim.wait_for_held_requests(1, timeout=60)
        pings.recorder.requests.clear()
        busy = cli(ops_env, "run", "--json")
        assert busy.returncode == 75, busy.stderr
        assert json.loads(busy.stdout)["exit_code"] == 75
        assert ping_paths(pings) == []  # the holder pings, not a skipped run
        after = prom.read_text()
        assert metric(prom, "accounts_ok") == 1 and metric(prom, "lock_busy") == 1
        assert after.replace("\nposition_monitor_lock_busy 1\n", "\nposition_monitor_lock_busy 0\n") == before
    finally:
        sim.release_requests()
    assert holder.wait(timeout=60) == 0
    assert metric(prom, "lock_busy") == 0 and metric(prom, "exit_code") == 0


def test_database_down_pings_69_and_writes_metrics(ops_env, sim, pings, tmp_path):
    add_account(ops_env, sim)
    env = dict(ops_env, MONITOR_LOCK_BACKEND="local",
               MONITOR_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    prom = tmp_path / "monitor.prom"

    result = cli(env, "run", "--json")

    assert result.returncode == 69, result.stderr
    line, = result.stderr.strip().splitlines()
    assert "database unavailable" in line
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 69 and "database unavailable" in payload["error"]
    assert ping_paths(pings) == ["/start", "/69"]
    assert metric(prom, "exit_code") == 69


def test_every_ordinary_exit_pings_and_writes_its_code(ops_env, sim, pings, tmp_path, database_url):
    prom = tmp_path / "monitor.prom"
    # 2 where a run started: an account that is not watched
    result = cli(ops_env, "run", "--json", "--account", "0x" + "b2" * 20)
    assert result.returncode == 2, result.stderr
    assert json.loads(result.stdout)["exit_code"] == 2
    assert ping_paths(pings)[-1] == "/2" and metric(prom, "exit_code") == 2
    # 78: the schema is behind (a migration recorded as never applied)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)")
    result = cli(ops_env, "run", "--json")
    assert result.returncode == 78, result.stderr
    assert json.loads(result.stdout)["exit_code"] == 78
    assert ping_paths(pings)[-1] == "/78" and metric(prom, "exit_code") == 78
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_crash_is_70_with_one_line_recorded_pinged_and_in_the_metrics(ops_env, sim, pings, tmp_path,
                                                                        database_url):
    add_account(ops_env, sim)
    # A bug inside the run: the planner raises (injected through a sitecustomize on the child's path).
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import monitor.planner as p\n"
        "def boom(*a, **k):\n    raise ZeroDivisionError('injected bug')\n"
        "p.plan_account = boom\n")
    env = dict(ops_env, PYTHONPATH=f"{hook}:{ROOT}")

    result = cli(env, "run", "--json")

    assert result.returncode == 70, result.stderr
    line, = result.stderr.strip().splitlines()
    assert line == "position-monitor: internal error: ZeroDivisionError: injected bug"
    assert json.loads(result.stdout)["exit_code"] == 70
    (_id, _pid, finished_at, recorded, _summary), = runs(database_url)
    assert finished_at is not None and recorded == 70
    assert ping_paths(pings) == ["/start", "/70"]
    assert metric(tmp_path / "monitor.prom", "exit_code") == 70
    # the traceback is there for whoever asks for it
    debug = cli(env, "--log-level", "debug", "run")
    assert debug.returncode == 70 and "Traceback" in debug.stderr


def test_a_second_signal_exits_at_once_and_the_next_run_is_not_blocked(ops_env, sim, pings, database_url):
    """The first signal only asks: a run inside its start ping (not a safe point) goes on to the next one.
    A second signal exits at once with one line; what it leaves is what a SIGKILL leaves, no more."""
    add_account(ops_env, sim)
    pings.recorder.hang = 30  # the start ping hangs (the pinger gives up after 5 s)
    proc = start(ops_env)
    try:
        deadline = time.monotonic() + 60
        while not pings.recorder.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ping_paths(pings) == ["/start"]
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still inside the ping: waits for its safe point
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
        pings.recorder.hang = 0
        pings.recorder.release.set()
    _out, err = proc.communicate()
    assert code == 143 and took < 2, (code, took, err)
    line, = err.strip().splitlines()
    assert line.startswith("position-monitor: second signal (SIGTERM): exiting at once"), err
    began = time.monotonic()
    again = run_json(ops_env)
    assert time.monotonic() - began < 20 and again["discovered"] == 1


def test_a_signal_during_apply_lets_the_batch_in_flight_commit_and_starts_no_other(env, sim, db, monkeypatch):
    """In-process, at the moment that matters: the signal arrives while the first batch's transaction is
    being written. That batch commits; the next batch never starts; the run is recorded 143 with it."""
    from monitor import applying, signals
    from monitor.config import load_settings
    from monitor.database import Database
    from monitor.errors import Terminated
    from monitor.runner import run_once

    bob = "0x" + "b0" * 20
    db.add_account(ALICE, "alice")
    db.add_account(bob, "bob")
    monkeypatch.setattr(applying, "BATCH_ACCOUNTS", 1)
    real = Database.insert_discovered_many
    monkeypatch.setattr(signals._state, "signum", None)

    def signalled_mid_write(self: Database, rows: Any, now: Any) -> Any:
        signals._handle(signal.SIGTERM, None)  # as the kernel would, between two statements of the batch
        return real(self, rows, now)

    monkeypatch.setattr(Database, "insert_discovered_many", signalled_mid_write)
    sim.open_position(ALICE, "BTC", "0.5", "30000")
    sim.open_position(bob, "ETH", "-2", "2000")
    try:
        with pytest.raises(Terminated) as stopped:
            run_once(load_settings(environ=env))
    finally:
        signals._state.signum = None
    assert stopped.value.exit_code == 143
    assert len(db.list_positions(status="open")) == 1  # the batch in flight committed, the next never began
    (recorded,) = db.recent_runs(1)
    assert recorded["exit_code"] == 143 and recorded["finished_at"] is not None
    assert recorded["counts"]["discovered"] == 1, recorded["counts"]


def test_an_unfinished_row_from_another_host_past_twice_the_stale_limit_is_shown_lost(env, database_url):
    """A pod SIGKILLed on another host cannot be judged from here; once it is past twice the stale limit
    (a run stops by its deadline, below it), `status` shows it lost, never running."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO monitor_runs (run_id, host, pid, started_at) VALUES"
                     " ('old', 'pod-7', 1, now() - interval '11 minutes'),"
                     " ('new', 'pod-8', 1, now() - interval '1 minute')")
    status = json.loads(cli(env, "status", "--json").stdout)
    assert {r["run_id"]: r["state"] for r in status["runs"]} == {"old": "lost", "new": "running"}
    text = cli(env, "status").stdout
    assert "lost" in text and text.count("running") == 1, text
