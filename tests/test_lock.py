"""The run lock, proven with real processes: simultaneous starters, SIGKILL, SIGSTOP, other hosts, fencing."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT, cli, run_json

ALICE = "0x" + "a1" * 20


def start(env, *args):
    return subprocess.Popen([sys.executable, "-m", "monitor", "run", "--json", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lease(database_url):
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT epoch, holder_pid, holder_host, holder_run_id FROM monitor_lease"
                           " WHERE name = 'run'").fetchone()
    return row


def wait_for_holder(database_url, pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = lease(database_url)
        if row is not None and row[1] == pid:
            return row
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} never took the lease")


def snapshot(database_url):
    with psycopg.connect(database_url) as conn:
        positions = conn.execute("SELECT * FROM positions ORDER BY id").fetchall()
        events = conn.execute(
            "SELECT id, position_id, run_id, epoch, event FROM position_events ORDER BY id").fetchall()
    return positions, events


def setup_account(env, sim, *positions):
    for coin, szi, px in positions:
        sim.open_position(ALICE, coin, szi, px)
    assert cli(env, "accounts", "add", ALICE).returncode == 0


def wait_all_but_one(procs, timeout=180.0):
    """Wait until every process but one has exited (the one holding the lock, kept busy by the simulator)."""
    deadline = time.monotonic() + timeout
    while sum(p.poll() is None for p in procs) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)


def test_fifty_simultaneous_starters_exactly_one_runs(env, sim, database_url):
    setup_account(env, sim, ("BTC", "1", "30000"), ("ETH", "2", "1900"))
    sim.hold_requests()  # the winner's read waits until every other starter has given up
    env = dict(env, MONITOR_HTTP_TIMEOUT="120")
    procs = [start(env) for _ in range(50)]
    wait_all_but_one(procs)
    sim.release_requests()
    results = [(p.wait(timeout=180), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = [code for code, _, _ in results]
    assert codes.count(0) == 1 and codes.count(75) == 49, codes
    winner = procs[codes.index(0)]
    for code, _out, err in results:
        if code == 75:
            line, = err.strip().splitlines()
            # every loser names the winner, even one that looked while the stamp was being written
            assert "another run holds the lock" in line, line
            assert f"pid {winner.pid}," in line and re.search(r"age \d+s", line), line
    with psycopg.connect(database_url) as conn:
        dupes = conn.execute("SELECT account_id, coin, count(*) FROM positions WHERE closed_at IS NULL"
                             " GROUP BY 1, 2 HAVING count(*) > 1").fetchall()
        assert dupes == []
        assert conn.execute("SELECT count(*) FROM positions").fetchone()[0] == 2


def test_sigkilled_holder_does_not_block_the_next_run(env, sim, database_url):
    setup_account(env, sim, ("BTC", "1", "30000"))
    sim.hold_requests()  # the holder stays inside its run until we kill it
    holder = start(dict(env, MONITOR_HTTP_TIMEOUT="60"))
    wait_for_holder(database_url, holder.pid)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    sim.release_requests()

    began = time.monotonic()
    report = run_json(env)

    assert time.monotonic() - began < 15  # at once, not after the stale limit (300 s)
    assert report["discovered"] == 1


def _write_marker(path: Path, *, pid: int, host: str, age: float, stale_after: float = 300.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"filelock/2\npid={pid}\nhost={host}\nmode=lease\ntoken={'ab' * 16}\n"
                    f"duration={stale_after!r}\nstart=12345\n")
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def test_a_loser_that_looks_while_the_stamp_is_being_written_still_names_the_holder(tmp_path):
    """filelock creates the marker (O_EXCL) and writes the stamp just after; the winner writes its side
    file after that. A loser looking in between must wait for the stamp, not say "pid None"."""
    import threading

    from monitor.errors import LockHeld
    from monitor.lock import LocalRunLock

    path = tmp_path / "run.lock"
    holder = LocalRunLock(path, stale_after=300)
    holder.acquire()
    try:
        stamp, side = path.read_bytes(), holder.side_file.read_bytes()
        path.write_bytes(b"")  # as between O_EXCL and the stamp write
        holder.side_file.unlink()  # as before the winner's side file
        threading.Timer(0.3, lambda: (path.write_bytes(stamp), holder.side_file.write_bytes(side))).start()
        with pytest.raises(LockHeld) as raised:
            LocalRunLock(path, stale_after=300).acquire()
        message = str(raised.value)
        assert f"pid {os.getpid()}," in message and re.search(r"age \d+s", message), message
    finally:
        holder.release()


def _judge_while(event: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """A contender judges a silent-looking holder; while it judges (its clock read) the holder lets go,
    or lets go and a third run takes the lock. Run in a child process: a wrong judgement here would
    SIGKILL the process that holds the fresh marker, which is the child itself."""
    script = f"""
import sys, time
from pathlib import Path
from monitor.errors import LockHeld
from monitor.lock import LocalRunLock

path = Path({str(tmp_path / "run.lock")!r})
holder = LocalRunLock(path, stale_after=300)
holder.acquire()
third = LocalRunLock(path, stale_after=300)
calls = []

def clock():
    calls.append(1)
    if len(calls) == 1:  # the contender's first clock read is its staleness judgement
        holder.release()
        if {event!r} == "replaced":
            time.sleep(0.01)  # a different mtime for the new marker
            third.acquire()
        return time.time() + 1000  # the old marker looks silent for 1000 s
    return time.time()

contender = LocalRunLock(path, stale_after=300, now=clock)
try:
    contender.acquire()
    print("acquired", contender.took_over)
except LockHeld as exc:
    print("held:", exc)
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_a_holder_that_lets_go_while_a_contender_judges_it_leaves_the_lock_to_the_contender(tmp_path):
    result = _judge_while("released", tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("acquired None"), result.stdout  # taken as free, not "took over"


def test_a_marker_replaced_while_a_contender_judges_it_is_not_broken_nor_its_holder_killed(tmp_path):
    result = _judge_while("replaced", tmp_path)
    assert result.returncode == 0, (result.returncode, result.stderr)  # -9 would be the new holder killed
    assert result.stdout.startswith("held: another run holds the lock"), result.stdout + result.stderr


def test_lock_from_another_host_blocks_until_stale_then_is_taken_over(env, sim):
    setup_account(env, sim, ("BTC", "1", "30000"))
    lock_path = Path(env["MONITOR_LOCK_FILE"])
    env = dict(env, MONITOR_LOCK_STALE_AFTER="300")

    _write_marker(lock_path, pid=4242, host="other-host.example", age=10)
    blocked = cli(env, "run", "--json")
    assert blocked.returncode == 75
    assert "pid 4242" in blocked.stderr and "other-host.example" in blocked.stderr
    status = cli(env, "lock", "status", "--json")
    holder = json.loads(status.stdout)["holder"]
    assert holder["pid"] == 4242 and holder["host"] == "other-host.example"

    _write_marker(lock_path, pid=4242, host="other-host.example", age=301)
    report = run_json(env)
    assert report["discovered"] == 1
    assert any("other-host.example" in note and "took the lock over" in note for note in report["notes"])


def test_lock_stamped_with_a_dead_pid_on_this_host_is_taken_over_at_once(env, sim):
    setup_account(env, sim, ("BTC", "1", "30000"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from filelock._identity import host_name

    _write_marker(Path(env["MONITOR_LOCK_FILE"]), pid=dead.pid, host=host_name(), age=1)
    report = run_json(env)
    assert report["discovered"] == 1


def test_sigstopped_local_holder_is_stopped_and_cannot_write_after_sigcont(env, sim, database_url):
    setup_account(env, sim, ("BTC", "1", "30000"), ("ETH", "1", "1900"))
    env = dict(env, MONITOR_LOCK_STALE_AFTER="3", MONITOR_HTTP_TIMEOUT="20")
    run_json(env)  # both rows exist
    sim.resize(ALICE, "BTC", "2", "30500")
    sim.hold_requests()
    first = start(env)
    wait_for_holder(database_url, first.pid)
    first.send_signal(signal.SIGSTOP)
    time.sleep(4)  # past the stale limit: its heartbeat has stopped
    sim.release_requests()

    second = run_json(env)
    assert second["updated"] == 1
    assert any("took the lock over" in note for note in second["notes"])
    after_second = snapshot(database_url)
    epoch_after_second = lease(database_url)[0]

    first.send_signal(signal.SIGCONT)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL  # the policy on one host: a silent holder is stopped
    assert snapshot(database_url) == after_second
    assert lease(database_url)[0] == epoch_after_second


def test_sigstopped_holder_on_another_host_is_fenced_by_the_postgres_lease(env, sim, database_url):
    setup_account(env, sim, ("BTC", "1", "30000"))
    env = dict(env, MONITOR_LOCK_BACKEND="postgres", MONITOR_LOCK_STALE_AFTER="3", MONITOR_HTTP_TIMEOUT="30")
    host_a = dict(env, MONITOR_HOST_ID="host-a")
    host_b = dict(env, MONITOR_HOST_ID="host-b")
    run_json(host_b)  # the BTC row exists, size 1
    sim.resize(ALICE, "BTC", "2", "30500")
    sim.hold_requests()
    first = start(host_a)  # will read size 2 and want to write it
    wait_for_holder(database_url, first.pid)
    sim.wait_for_held_requests(1)  # its read is in flight
    first.send_signal(signal.SIGSTOP)
    time.sleep(4)  # its lease expires: no heartbeat while stopped
    sim.release_requests()  # answered while it is stopped: it will see size 2 on SIGCONT

    second = run_json(host_b)  # takes the expired lease (a new epoch) and applies size 2
    assert second["updated"] == 1
    sim.resize(ALICE, "BTC", "5", "31000")
    third = run_json(host_b)
    assert third["updated"] == 1  # size 5 now; a late write of size 2 from the first run would regress it
    after = snapshot(database_url)
    epoch = lease(database_url)[0]

    first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 75, (out, err)
    report = json.loads(out)
    assert any("taken over" in note or "lock lost" in note for note in report["notes"]), report["notes"]
    assert snapshot(database_url) == after
    assert lease(database_url)[0] == epoch
    assert not [e for e in after[1] if e[2] == report["run_id"]]


def test_postgres_lease_blocks_a_second_host_while_held(env, sim, database_url):
    setup_account(env, sim, ("BTC", "1", "30000"))
    env = dict(env, MONITOR_LOCK_BACKEND="postgres", MONITOR_LOCK_STALE_AFTER="60", MONITOR_HTTP_TIMEOUT="20")
    sim.hold_requests()
    first = start(dict(env, MONITOR_HOST_ID="host-a"))
    try:
        wait_for_holder(database_url, first.pid)
        blocked = cli(dict(env, MONITOR_HOST_ID="host-b"), "run")
        assert blocked.returncode == 75 and "host-a" in blocked.stderr
        status = json.loads(cli(env, "lock", "status", "--json").stdout)
        assert status["backend"] == "postgres" and status["holder"]["host"] == "host-a" and status["epoch"] >= 1
    finally:
        sim.release_requests()
    assert first.wait(timeout=60) == 0


def test_lock_status_and_clear(env, sim, database_url):
    setup_account(env, sim, ("BTC", "1", "30000"))
    sim.hold_requests()  # the holder stays inside its run until released
    env = dict(env, MONITOR_HTTP_TIMEOUT="60")
    holder = start(env)
    wait_for_holder(database_url, holder.pid)
    status = json.loads(cli(env, "lock", "status", "--json").stdout)
    assert status["held"] and status["holder"]["pid"] == holder.pid and status["backend"] == "local"
    assert status["holder"]["heartbeat_at"] and status["epoch"] >= 1
    refused = cli(env, "lock", "clear")
    assert refused.returncode == 75 and "alive" in refused.stderr
    holder.send_signal(signal.SIGSTOP)
    try:
        forced = cli(env, "lock", "clear", "--force")
        assert forced.returncode == 0 and f"pid {holder.pid}" in forced.stdout
        assert json.loads(cli(env, "lock", "status", "--json").stdout)["holder"] is None
    finally:
        holder.send_signal(signal.SIGCONT)
        sim.release_requests()
        holder.wait(timeout=60)


@pytest.mark.parametrize("bad", ["/etc/hostname/run.lock", "symlink"])
def test_unusable_lock_path_is_exit_78(env, tmp_path, bad):
    if bad == "symlink":
        target = tmp_path / "elsewhere"
        target.write_text("")
        link = tmp_path / "lockdir" / "run.lock"
        link.parent.mkdir()
        link.symlink_to(target)
        bad = str(link)
    result = cli(dict(env, MONITOR_LOCK_FILE=bad), "run")
    assert result.returncode == 78, result.stderr
    assert "MONITOR_LOCK_FILE" in result.stderr and "Traceback" not in result.stderr


def test_a_run_past_its_deadline_defers_work_and_says_so(env, sim):
    accounts = ["0x" + f"{i:02x}" * 20 for i in range(1, 7)]
    for address in accounts:
        sim.open_position(address, "BTC", "1", "30000")
        assert cli(env, "accounts", "add", address).returncode == 0
    sim.set_latency(700)
    env = dict(env, MONITOR_LOCK_STALE_AFTER="2", MONITOR_READ_PARALLELISM="1")  # deadline 1.6 s
    report = run_json(env)
    assert report["overrun"] is True and report["accounts_deferred"] > 0
    assert report["accounts_ok"] + report["accounts_deferred"] == len(accounts)
    assert any("deadline" in note for note in report["notes"])


def _contend(env, database_url, rng, contenders, tally):
    procs = [start(env) for _ in range(contenders)]
    time.sleep(rng.uniform(0, 0.6))
    for proc in procs:
        roll = rng.random()
        if roll < 0.2:
            proc.send_signal(signal.SIGKILL)
            tally["SIGKILL"] = tally.get("SIGKILL", 0) + 1
        elif roll < 0.35:
            proc.send_signal(signal.SIGSTOP)
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGCONT)
            tally["SIGSTOP"] = tally.get("SIGSTOP", 0) + 1
    for proc in procs:
        code = proc.wait(timeout=120)
        tally[f"exit {code}"] = tally.get(f"exit {code}", 0) + 1
        proc.stdout.close()
        proc.stderr.close()


def _epochs_have_one_writer(database_url):
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT epoch, count(DISTINCT run_id) FROM position_events GROUP BY epoch"
                            " HAVING count(DISTINCT run_id) > 1").fetchall()


def _random_contention(env, sim, database_url, rounds, seed):
    rng = random.Random(seed)
    coins = ["BTC", "ETH", "SOL"]
    for coin in coins:
        sim.open_position(ALICE, coin, "1", "100")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    env = dict(env, MONITOR_LOCK_STALE_AFTER="2", MONITOR_HTTP_TIMEOUT="2")
    sim.set_latency(150)
    sizes = dict.fromkeys(coins, 1)
    tally: dict[str, int] = {}
    for _ in range(rounds):
        coin = rng.choice(coins)
        sizes[coin] = rng.choice([n for n in range(1, 51) if n != sizes[coin]])
        sim.resize(ALICE, coin, str(sizes[coin]), str(rng.randint(90, 110)))
        contenders = rng.randint(2, 10)
        tally["processes"] = tally.get("processes", 0) + contenders
        _contend(env, database_url, rng, contenders, tally)
    assert _epochs_have_one_writer(database_url) == []
    with psycopg.connect(database_url) as conn:
        events, epochs = conn.execute("SELECT count(*), count(DISTINCT epoch) FROM position_events").fetchone()
        runs_per_epoch = conn.execute("SELECT max(n) FROM (SELECT count(*) AS n FROM monitor_runs"
                                      " GROUP BY epoch) t").fetchone()[0]
    assert events > 0 and runs_per_epoch == 1  # not even a run that wrote nothing shares an epoch
    print(f"\n{rounds} rounds: {sorted(tally.items())}; {events} audit rows written in {epochs} epochs,"
          f" 0 epochs with two writers")


def test_random_start_kill_stop_never_two_writers_in_one_epoch_short(env, sim, database_url):
    _random_contention(env, sim, database_url, rounds=15, seed=7)


@pytest.mark.slow
def test_random_start_kill_stop_never_two_writers_in_one_epoch_200_rounds(env, sim, database_url):
    _random_contention(env, sim, database_url, rounds=200, seed=2026)


def test_the_database_refuses_a_superseded_epoch(database_url):
    from monitor.database import Database
    from monitor.errors import Fenced

    old, new = Database.open(database_url), Database.open(database_url)
    try:
        first = old.advance_epoch(run_id="old", host="h", pid=1, start=None, stale_after=60)
        with old.fenced(first):
            account, _ = old.add_account("0x" + "c3" * 20, None)
        second = new.advance_epoch(run_id="new", host="h", pid=2, start=None, stale_after=60)
        assert second == first + 1
        with pytest.raises(Fenced), old.fenced(first):
            old.add_account("0x" + "d4" * 20, None)
        assert [a.address for a in new.list_accounts()] == [account.address]
    finally:
        old.close()
        new.close()


def test_a_new_holder_waits_for_the_old_holders_transaction_then_fences_it(database_url):
    import threading

    from monitor.database import Database
    from monitor.errors import Fenced

    old, new = Database.open(database_url), Database.open(database_url)
    try:
        first = old.advance_epoch(run_id="old", host="h", pid=1, start=None, stale_after=60)
        advanced = threading.Event()
        with old.fenced(first):
            thread = threading.Thread(target=lambda: (new.advance_epoch(run_id="new", host="h", pid=2, start=None,
                                                                        stale_after=60), advanced.set()))
            thread.start()
            time.sleep(0.5)
            assert not advanced.is_set()  # blocked behind the old holder's FOR SHARE
            old.add_account("0x" + "e5" * 20, None)  # this write commits within the old epoch
        thread.join(timeout=10)
        assert advanced.is_set()
        with pytest.raises(Fenced), old.fenced(first):
            pass
    finally:
        old.close()
        new.close()
