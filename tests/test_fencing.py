"""Lock and fencing edges (issue 10, item 7), proven with real processes and the real PostgreSQL:

- a lease released by `lock clear --force` fences its old holder at once (both backends);
- a holder whose stamp has no process-start token is never SIGKILLed;
- two machines sharing a host name / MONITOR_HOST_ID never judge each other dead from the local /proc;
- a superseded run does not overwrite account_health or alert state; its own monitor_runs row records its end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import cli, run_json
from tests.test_lock import ALICE, setup_account, start, wait_for_holder

TOKEN = "cd" * 16


def query(database_url, sql, *params):
    with psycopg.connect(database_url) as conn:
        return conn.execute(sql, params).fetchall()


def run_row(database_url, run_id):
    (row,) = query(database_url, "SELECT exit_code, error_summary, finished_at FROM monitor_runs WHERE run_id = %s",
                   run_id)
    return row


# ---- 1. `lock clear --force` fences the old holder at once ---------------------------------------

@pytest.mark.parametrize("backend", ["local", "postgres"])
def test_lock_clear_force_fences_the_old_holder_at_once(env, sim, database_url, backend):
    setup_account(env, sim, ("BTC", "1", "30000"))
    # stale 120 s: the holder's heartbeat (every 15 s) cannot be what stops it in this test
    env = dict(env, MONITOR_LOCK_BACKEND=backend, MONITOR_LOCK_STALE_AFTER="120", MONITOR_HTTP_TIMEOUT="60")
    sim.hold_requests()
    holder = start(env)
    try:
        wait_for_holder(database_url, holder.pid)
        sim.wait_for_held_requests(1)  # its read is in flight: it will want to insert the BTC row
        began = time.monotonic()
        forced = cli(env, "lock", "clear", "--force")
        assert forced.returncode == 0 and f"pid {holder.pid}" in forced.stdout, forced.stderr
        (released,) = query(database_url, "SELECT released_at IS NOT NULL FROM monitor_lease WHERE name = 'run'")
        assert released == (True,)  # the local backend marks the lease row released too
    finally:
        sim.release_requests()
    out, err = holder.communicate(timeout=60)
    assert holder.returncode == 75, (out, err)
    report = json.loads(out)
    if time.monotonic() - began < 14:  # within one heartbeat: only the fenced transaction can have stopped it
        assert any("released under this run" in note for note in report["notes"]), report["notes"]
    assert query(database_url, "SELECT count(*) FROM positions") == [(0,)]  # not one write after the clear
    assert query(database_url, "SELECT count(*) FROM account_health") == [(0,)]
    exit_code, summary, finished = run_row(database_url, report["run_id"])
    assert exit_code == 75 and finished is not None and "released" in summary  # its own row says how it ended

    # the next run takes the lock and does the work
    after = run_json(env)
    assert after["discovered"] == 1


@pytest.mark.parametrize("backend", ["local", "postgres"])
def test_a_normal_run_makes_its_last_writes_before_it_releases_its_lease(env, sim, database_url, backend):
    setup_account(env, sim, ("BTC", "1", "30000"))
    env = dict(env, MONITOR_LOCK_BACKEND=backend, MONITOR_ALERT_AFTER_RUNS="1")
    sim.add_fault("500", path="info", type="clearinghouseState", user=ALICE, count=None)
    report = run_json(env, expect=1)
    assert report["accounts_failed"] == 1
    exit_code, summary, _ = run_row(database_url, report["run_id"])
    assert exit_code == 1 and "HTTP 500" in summary
    assert query(database_url, "SELECT consecutive_failures, last_error LIKE '%%HTTP 500%%' FROM account_health"
                 ) == [(1, True)]
    # its alerts are decided after it let go of the lease, and still recorded (no other run since)
    assert query(database_url, "SELECT key, streak, active FROM monitor_alerts WHERE kind = 'account_failed'"
                 ) == [(f"account_failed:{ALICE}", 1, True)]
    if backend == "postgres":
        assert query(database_url, "SELECT released_at IS NOT NULL FROM monitor_lease") == [(True,)]


# ---- 2. never SIGKILL a holder whose stamp has no process-start token -----------------------------

def _marker(path: Path, *, pid: int, host: str, start: int | None, age: float, machine: str | None,
            side: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"filelock/2\npid={pid}\nhost={host}\nmode=lease\ntoken={TOKEN}\nduration=300.0\n"
                    + (f"start={start}\n" if start is not None else ""))
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    if side:
        Path(f"{path}.holder.json").write_text(json.dumps({
            "run_id": "r" * 32, "token": TOKEN, "pid": pid, "host": "h", "machine": machine,
            "started_at": "2026-01-01T00:00:00+00:00", "stale_after": 300.0}))


@pytest.fixture
def victim():
    """A live process on this host that a wrong judgement would SIGKILL (a recycled pid, or another machine's)."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_silent_holder_without_a_start_token_is_taken_over_but_never_killed(env, sim, victim):
    from filelock._identity import host_name

    from monitor.lock import machine_identity

    setup_account(env, sim, ("BTC", "1", "30000"))
    # same host, same machine (its side file says so), silent past the stale limit, but no start token:
    # the live pid may be a recycled one
    _marker(Path(env["MONITOR_LOCK_FILE"]), pid=victim.pid, host=host_name(), start=None, age=400,
            machine=machine_identity())
    report = run_json(dict(env, MONITOR_LOCK_STALE_AFTER="300"))
    time.sleep(0.2)
    assert victim.poll() is None  # alive: never killed
    assert report["discovered"] == 1  # but the stale lock was taken over (fenced by the epoch)
    assert any("took the lock over" in n and "no process-start token" in n for n in report["notes"]), report["notes"]


# ---- 3. a shared host name / MONITOR_HOST_ID is not the same machine ------------------------------

@pytest.mark.parametrize("machine", ["other-machine-id/other-boot-id", None])
def test_a_local_holder_on_another_machine_with_our_host_name_is_never_killed(env, sim, victim, machine):
    from filelock._identity import host_name, process_start_token

    setup_account(env, sim, ("BTC", "1", "30000"))
    lock_path = Path(env["MONITOR_LOCK_FILE"])
    # a live pid with the very start token the stamp records: on this machine it would be the holder
    def stamp():
        _marker(lock_path, pid=victim.pid, host=host_name(), start=process_start_token(victim.pid), age=400,
                machine=machine, side=machine is not None)

    stamp()
    report = run_json(dict(env, MONITOR_LOCK_STALE_AFTER="300"))
    time.sleep(0.2)
    assert victim.poll() is None  # not killed
    assert report["discovered"] == 1  # the stale lock was still taken over
    assert any("not provably on this machine" in note for note in report["notes"]), report["notes"]

    stamp()
    status = json.loads(cli(env, "lock", "status", "--json").stdout)
    assert status["holder"]["pid"] == victim.pid
    assert status["holder"]["machine"] == machine and status["holder"]["alive"] is None  # not judged from /proc


def test_a_local_holder_on_this_machine_is_still_stopped_when_silent(env, sim, victim):
    from filelock._identity import host_name, process_start_token

    from monitor.lock import machine_identity

    setup_account(env, sim, ("BTC", "1", "30000"))
    _marker(Path(env["MONITOR_LOCK_FILE"]), pid=victim.pid, host=host_name(),
            start=process_start_token(victim.pid), age=400, machine=machine_identity())
    status = json.loads(cli(env, "lock", "status", "--json").stdout)
    assert status["holder"]["alive"] is True and status["holder"]["machine"] == machine_identity()
    report = run_json(dict(env, MONITOR_LOCK_STALE_AFTER="300"))
    assert report["discovered"] == 1
    assert victim.wait(timeout=10) == -signal.SIGKILL  # the one-host policy is unchanged


def _seed_lease(database_url, *, host, pid, machine):
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO monitor_lease (name, epoch, holder_run_id, holder_host, holder_pid, holder_start,"
            " holder_machine, acquired_at, heartbeat_at, expires_at)"
            " VALUES ('run', 5, 'other-run', %s, %s, NULL, %s, now(), now(), now() + interval '300 seconds')",
            (host, pid, machine))


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("machine", ["other-machine-id/other-boot-id", None])
def test_a_postgres_holder_with_our_host_id_on_another_machine_is_not_judged_dead(env, sim, database_url, machine):
    setup_account(env, sim, ("BTC", "1", "30000"))
    env = dict(env, MONITOR_LOCK_BACKEND="postgres", MONITOR_HOST_ID="shared-id")
    # its pid is not in our /proc, but it is another machine's pid (or unknown): the lease stays its own
    _seed_lease(database_url, host="shared-id", pid=_dead_pid(), machine=machine)
    blocked = cli(env, "run")
    assert blocked.returncode == 75 and "another run holds the lease" in blocked.stderr, blocked.stderr
    assert query(database_url, "SELECT epoch, holder_run_id FROM monitor_lease") == [(5, "other-run")]
    status = json.loads(cli(env, "lock", "status", "--json").stdout)
    assert status["held"] and status["holder"]["machine"] == machine and status["holder"]["host"] == "shared-id"
    text = cli(env, "lock", "status").stdout
    assert (f"machine {machine}," if machine else "machine unrecorded,") in text, text


def test_a_postgres_holder_with_our_host_id_and_machine_is_taken_over_once_dead(env, sim, database_url):
    from monitor.lock import machine_identity

    setup_account(env, sim, ("BTC", "1", "30000"))
    env = dict(env, MONITOR_LOCK_BACKEND="postgres", MONITOR_HOST_ID="shared-id")
    _seed_lease(database_url, host="shared-id", pid=_dead_pid(), machine=machine_identity())
    report = run_json(env)
    assert report["discovered"] == 1 and report["epoch"] == 6
    assert any("took the lease over from dead pid" in note for note in report["notes"])
    assert query(database_url, "SELECT holder_machine FROM monitor_lease") == [(machine_identity(),)]


# ---- 4. a superseded run leaves account_health and alerts to its successor -------------------------

def test_a_superseded_run_does_not_overwrite_its_successors_health_or_alerts(env, sim, database_url):
    setup_account(env, sim, ("BTC", "1", "30000"))
    env = dict(env, MONITOR_LOCK_BACKEND="postgres", MONITOR_LOCK_STALE_AFTER="3", MONITOR_HTTP_TIMEOUT="30",
               MONITOR_ALERT_AFTER_RUNS="1")
    host_a, host_b = dict(env, MONITOR_HOST_ID="host-a"), dict(env, MONITOR_HOST_ID="host-b")
    run_json(host_b)  # the BTC row exists
    sim.hold_requests()
    first = start(host_a)
    wait_for_holder(database_url, first.pid)
    sim.wait_for_held_requests(1)
    first.send_signal(signal.SIGSTOP)
    sim.release_requests()  # its read succeeds while it is stopped; it sees the answer on SIGCONT
    assert sim.wait_until_idle()
    time.sleep(4)  # its lease expires

    fault = sim.add_fault("500", path="info", type="clearinghouseState", user=ALICE, count=None)
    second = run_json(host_b, expect=1)  # the successor: the account fails now
    assert second["accounts_failed"] == 1
    sim.clear_faults(fault)
    health = query(database_url, "SELECT last_good_read_at, last_failure_at, consecutive_failures, last_error"
                                 " FROM account_health")
    assert health[0][2] == 1
    alerts = query(database_url, "SELECT key, streak, active FROM monitor_alerts WHERE kind = 'account_failed'")
    assert alerts == [(f"account_failed:{ALICE}", 1, True)]

    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 75, (out, err)
    report = json.loads(out)
    # its read was good, but it must not say so over its successor's failure...
    assert query(database_url, "SELECT last_good_read_at, last_failure_at, consecutive_failures, last_error"
                               " FROM account_health") == health
    # ...nor resolve the successor's active alert; it records only the alert about itself
    assert query(database_url, "SELECT key, streak, active FROM monitor_alerts WHERE kind = 'account_failed'"
                 ) == alerts
    assert query(database_url, "SELECT streak FROM monitor_alerts WHERE key = 'lock_stale_holder'") == [(1,)]
    # its own run-history row records how it ended
    exit_code, summary, finished = run_row(database_url, report["run_id"])
    assert exit_code == 75 and finished is not None and summary


def test_lock_clear_refuses_a_fresh_holder_it_cannot_verify_unless_forced(env):
    lock_path = Path(env["MONITOR_LOCK_FILE"])
    _marker(lock_path, pid=4242, host="other-host.example", start=None, age=10, machine=None, side=False)
    refused = cli(env, "lock", "clear")
    assert refused.returncode == 75 and "cannot be verified" in refused.stderr, refused.stderr
    assert lock_path.exists()
    forced = cli(env, "lock", "clear", "--force")
    assert forced.returncode == 0 and "pid 4242" in forced.stdout
    assert not lock_path.exists()
    # a stamp silent past the stale limit is a holder that went away: cleared without --force
    _marker(lock_path, pid=4242, host="other-host.example", start=None, age=400, machine=None, side=False)
    cleared = cli(dict(env, MONITOR_LOCK_STALE_AFTER="300"), "lock", "clear")
    assert cleared.returncode == 0 and not lock_path.exists(), cleared.stderr


def test_machine_identity_is_the_machine_id_and_the_boot_id_of_this_kernel():
    from monitor.lock import machine_identity

    def read(path):
        try:
            return Path(path).read_text().strip() or "-"
        except OSError:
            return "-"

    expected = f"{read('/etc/machine-id')}/{read('/proc/sys/kernel/random/boot_id')}"
    identity = machine_identity()
    if expected == "-/-":
        assert identity is None
    else:
        assert identity is not None and identity.split("/pidns-")[0] == expected
        assert identity == machine_identity()  # stable within a boot
