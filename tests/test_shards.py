"""No two runs touch one account at once, whatever --shard (or lock backend) each was started with.

Each run reaches the one simulator through its own HTTP front, which records which run sent each
request and holds that run's reads on its own gate, so the tests know who read what and can keep
every run inside its read phase until all of them have started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from hlsim.server import _HTTPServer
from tests.conftest import ROOT, cli, run_json


def addresses(n: int) -> list[str]:
    return ["0x" + f"{i:040x}" for i in range(1, n + 1)]


class Front:
    """Another HTTP front on the same simulator: logs (tag, type, user) of each request as it arrives and
    holds the tag's requests while its gate is closed."""

    def __init__(self, server: Any, tag: str, log: list[tuple[str, str | None, str | None]],
                 lock: threading.Lock) -> None:
        self.sim, self.tag, self.log, self.lock = server.sim, tag, log, lock
        self.gate = threading.Event()
        self.httpd = _HTTPServer(("127.0.0.1", 0), self)  # type: ignore[arg-type]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def handle(self, path: str, raw: bytes) -> Any:
        try:
            body = json.loads(raw or b"{}")
            typ, user = body.get("type"), (body.get("user") or "").lower() or None
        except (ValueError, AttributeError):
            typ = user = None
        with self.lock:
            self.log.append((self.tag, typ, user))
        self.gate.wait(120)
        return self.sim.handle(path, raw)

    def arrived(self) -> int:
        with self.lock:
            return sum(1 for tag, _, _ in self.log if tag == self.tag)

    def stop(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.close_all_connections()
        self.httpd.server_close()


@pytest.fixture
def fronts(sim):
    log: list[tuple[str, str | None, str | None]] = []
    lock = threading.Lock()
    made: dict[str, Front] = {}

    def make(tag: str) -> Front:
        made[tag] = Front(sim, tag, log, lock)
        return made[tag]

    make.log = log  # type: ignore[attr-defined]
    yield make
    for front in made.values():
        front.stop()


def start(env: dict[str, str], front: Front, *args: str, **extra: str) -> subprocess.Popen:
    env = dict(env, MONITOR_HL_API_URL=front.url, MONITOR_HTTP_TIMEOUT="60", **extra)
    return subprocess.Popen([sys.executable, "-m", "monitor", "run", "--json", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def hold_until_all_started(procs: dict[str, subprocess.Popen], fronts: dict[str, Front], timeout: float = 90) -> None:
    """Every run has either finished (nothing to read) or has a read waiting at its gate: all of them
    are past the point where they chose their accounts, and none has finished its reads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(procs[t].poll() is not None or fronts[t].arrived() > 0 for t in procs):
            return
        time.sleep(0.05)
    raise AssertionError("the runs did not all start within the timeout")


def finish(procs: dict[str, subprocess.Popen], fronts: dict[str, Front]) -> dict[str, tuple[int, dict, str]]:
    for front in fronts.values():
        front.gate.set()
    results = {}
    for tag, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[tag] = (proc.returncode, json.loads(out) if out.strip() else {}, err)
    return results


def events_by_account(database_url: str, event: str) -> dict[str, set[str]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT a.address, e.run_id FROM position_events e JOIN positions p ON p.id = e.position_id"
                            " JOIN accounts a ON a.id = p.account_id WHERE e.event = %s", (event,)).fetchall()
    found: dict[str, set[str]] = defaultdict(set)
    for address, run_id in rows:
        found[address].add(run_id)
    return found


def check_round(accounts, results, log, database_url, event, writers):
    """Each account's positions were read by exactly one run, and its events written by that run only."""
    readers: dict[str, list[str]] = defaultdict(list)
    for tag, typ, user in log:
        if typ == "clearinghouseState":
            readers[user].append(tag)
    twice = {a: tags for a, tags in readers.items() if len(tags) > 1}
    assert not twice, f"accounts read by more than one run in one round: {twice}"
    assert sorted(readers) == sorted(accounts)  # and every account was read by someone
    run_ids = {tag: report.get("run_id") for tag, (_, report, _) in results.items()}
    written = events_by_account(database_url, event)
    for address in writers:
        assert written[address] == {run_ids[readers[address][0]]}, (address, written[address], readers[address])
    for tag, (code, report, err) in results.items():
        assert code == 0, (tag, code, err)
        assert report["conflicts"] == 0
        # what a run left to others is deferred, each naming the live run holding it
        held = report["held_by_other_runs"]
        assert sorted(h["account"] for h in held) == sorted(report["deferred_accounts"])
        assert report["accounts_deferred"] == len(held)
        others = {rid for t, rid in run_ids.items() if t != tag}
        assert all(h["run_id"] in others and h["lease"].startswith("run") for h in held), held
        if held:
            assert any("claimed by another run" in note for note in report["notes"]), report["notes"]
    assert sum(r["accounts_ok"] for _, r, _ in results.values()) == len(accounts)
    return readers


def test_plain_and_differently_sharded_runs_never_touch_one_account_at_once(env, sim, fronts, database_url):
    from monitor.runner import in_shard

    accounts = addresses(16)
    half, third = {a for a in accounts if in_shard(a, (1, 2))}, {a for a in accounts if in_shard(a, (1, 3))}
    assert half & third and half - third and third - half  # the layouts overlap, each also alone
    for address in accounts:
        sim.open_position(address, "BTC", "1", "30000")
        assert cli(env, "accounts", "add", address).returncode == 0

    # Round 1: discovery, local lock backend; --shard 1/2, --shard 1/3 and a plain run at once.
    front = {tag: fronts(tag) for tag in ("half", "third", "plain")}
    procs = {"half": start(env, front["half"], "--shard", "1/2"),
             "third": start(env, front["third"], "--shard", "1/3"),
             "plain": start(env, front["plain"])}
    hold_until_all_started(procs, front)
    results = finish(procs, front)
    check_round(accounts, results, fronts.log, database_url, "discovered", accounts)
    assert sum(r["discovered"] for _, r, _ in results.values()) == 16

    # Round 2: every position resized; the plain run on the PostgreSQL lease, a dry run claiming too.
    for address in accounts:
        sim.resize(address, "BTC", "2", "30100")
    fronts.log.clear()
    front = {tag: fronts(f"{tag}-2") for tag in ("half", "third", "plain", "dry")}
    for tag, f in front.items():
        f.tag = tag
    procs = {"half": start(env, front["half"], "--shard", "1/2"),
             "third": start(env, front["third"], "--shard", "1/3"),
             "plain": start(env, front["plain"], MONITOR_LOCK_BACKEND="postgres"),
             "dry": start(env, front["dry"], "--dry-run", "--shard", "2/3")}
    hold_until_all_started(procs, front)
    results = finish(procs, front)
    dry_id = results["dry"][1]["run_id"]
    readers = check_round(accounts, results, fronts.log, database_url, "resized", [])
    dry_read = [a for a, tags in readers.items() if tags == ["dry"]]
    written = events_by_account(database_url, "resized")
    for address in accounts:
        if address in dry_read:
            assert address not in written  # the dry run read it, claimed it, and wrote nothing
        else:
            assert len(written[address]) == 1 and dry_id not in written[address]
    with psycopg.connect(database_url) as conn:
        sizes = dict(conn.execute("SELECT a.address, p.size FROM positions p JOIN accounts a ON a.id = p.account_id"
                                  " WHERE p.closed_at IS NULL").fetchall())
        open_claims = conn.execute("SELECT count(*) FROM account_claims WHERE released_at IS NULL").fetchone()[0]
    assert {a for a, s in sizes.items() if s == Decimal("2")} == set(accounts) - set(dry_read)
    assert open_claims == 0  # every run released what it claimed


def test_a_run_whose_claim_was_taken_over_writes_nothing_for_the_account(env, sim, fronts, database_url):
    accounts = addresses(3)
    for address in accounts:
        sim.open_position(address, "BTC", "1", "30000")
        assert cli(env, "accounts", "add", address).returncode == 0
    run_json(env)
    for address in accounts:
        sim.resize(address, "BTC", "2", "30000")
    slow, fast = fronts("slow"), fronts("fast")
    fast.gate.set()
    a = start(env, slow)  # a plain run, held inside its reads
    deadline = time.monotonic() + 60
    while slow.arrived() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.arrived() == 3
    with psycopg.connect(database_url, autocommit=True) as conn:
        # as if the slow run had outlived its stale limit: its claims expire
        if conn.execute("SELECT to_regclass('account_claims') IS NOT NULL").fetchone()[0]:
            conn.execute("UPDATE account_claims SET expires_at = now() - interval '1 second'"
                         " WHERE released_at IS NULL")
    b = run_json(dict(env, MONITOR_HL_API_URL=fast.url), "--shard", "1/1")  # another lock: takes the claims over
    assert b["updated"] == 3 and b["accounts_deferred"] == 0
    for address in accounts:
        sim.resize(address, "BTC", "3", "30000")
    slow.gate.set()
    out, err = a.communicate(timeout=120)
    report = json.loads(out)
    assert a.returncode == 75, (a.returncode, err)
    assert report["updated"] == 0 and any("claim" in n and "taken over" in n for n in report["notes"]), report["notes"]
    with psycopg.connect(database_url) as conn:
        written = conn.execute("SELECT count(*) FROM position_events WHERE run_id = %s", (report["run_id"],)).fetchone()
        sizes = {r[0] for r in conn.execute("SELECT size FROM positions WHERE closed_at IS NULL")}
    assert written[0] == 0 and sizes == {Decimal("2")}  # only the claim holder's resize
    assert run_json(env)["updated"] == 3  # the next run catches up


# ---- the claim rules, on a real PostgreSQL --------------------------------------------------------------


def _holder(url: str, lease: str, host: str = "h"):
    from monitor.database import Database

    db = Database.open(url, lease_name=lease)
    db.advance_epoch(run_id=f"{lease}-{time.monotonic_ns()}", host=host, pid=1, start=None, stale_after=300)
    return db


def test_claims_are_taken_only_when_released_expired_or_their_lease_moved_on(db, database_url):
    from monitor.errors import ClaimLost

    ids = [db.add_account(a, None)[0].id for a in addresses(3)]
    plain, shard = _holder(database_url, "run"), _holder(database_url, "run:shard-1-of-2")
    try:
        assert plain.claim_accounts(ids[:2], stale_after=300) == set(ids[:2])
        assert shard.claim_accounts(ids, stale_after=300) == {ids[2]}  # a live claim is never taken
        holders = shard.claim_holders(ids[:2])
        assert {h["run_id"] for h in holders.values()} == {plain.run_id} and holders[ids[0]]["lease"] == "run"
        with plain.fenced(plain.epoch):
            plain.require_claim(ids[0], plain.epoch)
        with pytest.raises(ClaimLost), shard.fenced(shard.epoch):
            shard.require_claim(ids[0], shard.epoch)

        # expired: taken by another lease; the old holder's checks fail from then on
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE account_claims SET expires_at = now() - interval '1 second' WHERE account_id = %s",
                         (ids[0],))
        assert shard.claim_accounts(ids[:2], stale_after=300) == {ids[0]}
        with pytest.raises(ClaimLost, match=shard.run_id), plain.fenced(plain.epoch):
            plain.require_claim(ids[0], plain.epoch)

        # the lease's epoch moved on (a new plain run took the lock): that run's claims are free
        successor = _holder(database_url, "run")
        try:
            assert shard.claim_accounts(ids[:2], stale_after=300) == set(ids[:2])  # its own, and the freed one
            # released: free at once
            assert shard.release_claims() == 3
            assert successor.claim_accounts(ids, stale_after=300) == set(ids)
        finally:
            successor.close()
    finally:
        plain.close()
        shard.close()


def test_taking_a_claim_waits_for_the_holders_write_in_flight(db, database_url):
    from monitor.errors import ClaimLost

    account = db.add_account(addresses(1)[0], None)[0].id
    old, new = _holder(database_url, "run"), _holder(database_url, "run:shard-1-of-3")
    try:
        assert old.claim_accounts([account], stale_after=0.2) == {account}
        time.sleep(0.3)  # expired
        won: list[set[int]] = []
        with old.fenced(old.epoch):
            old.require_claim(account, old.epoch)  # holds the claim row FOR SHARE
            taker = threading.Thread(target=lambda: won.append(new.claim_accounts([account], stale_after=300)))
            taker.start()
            taker.join(0.7)
            assert taker.is_alive() and won == []  # waits for the write in flight
        taker.join(10)
        assert won == [{account}]
        with pytest.raises(ClaimLost), old.fenced(old.epoch):
            old.require_claim(account, old.epoch)
    finally:
        old.close()
        new.close()


def test_touch_seen_skips_accounts_no_longer_claimed(db, database_url):
    from datetime import datetime, timezone

    ids = [db.add_account(a, None)[0].id for a in addresses(2)]
    now = datetime.now(timezone.utc)
    rows = [db.insert_discovered(account_id=i, coin="BTC", side="long", size=Decimal(1), entry_price=Decimal(1),
                                 opened_at=now, now=now) for i in ids]
    run = _holder(database_url, "run")
    try:
        assert run.claim_accounts(ids[:1], stale_after=300) == {ids[0]}
        with run.fenced(run.epoch):
            assert run.touch_seen(rows, now, claimed_epoch=run.epoch) == 1  # only the claimed account's row
    finally:
        run.close()


def test_the_closers_transactions_check_the_claim_of_the_account_being_handled(db, database_url):
    from monitor.errors import ClaimLost

    mine, theirs = [db.add_account(a, None)[0].id for a in addresses(2)]
    run, other = _holder(database_url, "run"), _holder(database_url, "run:shard-2-of-2")
    try:
        assert run.claim_accounts([mine], stale_after=300) == {mine}
        assert other.claim_accounts([theirs], stale_after=300) == {theirs}
        run.claim_checked = mine  # what the runner sets while the closer works for an account
        with run.fenced(run.epoch):
            assert run.lease_name == "run"
        run.claim_checked = theirs
        with pytest.raises(ClaimLost, match=other.run_id), run.fenced(run.epoch):
            pass
    finally:
        run.close()
        other.close()
