"""Rate-limit budget, parallel reads, 429 backoff and sharding, with the real CLI and simulator."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal

import psycopg

from tests.conftest import ROOT, cli, run_json


def addresses(n: int) -> list[str]:
    return ["0x" + f"{i:040x}" for i in range(1, n + 1)]


def watch(env, sim, accounts, coin="BTC"):
    for address in accounts:
        sim.open_position(address, coin, "1", "30000")
        assert cli(env, "accounts", "add", address).returncode == 0


def test_steady_state_costs_two_weight_per_account_and_no_metadata(env, sim):
    accounts = addresses(20)
    watch(env, sim, accounts)
    run_json(env)
    sim.reset_log()
    report = run_json(env)
    log = sim.requests_log()
    assert {entry["type"] for entry in log} == {"clearinghouseState"}
    assert len(log) == 20 and sum(entry["weight"] for entry in log) == 40
    assert report["api_weight"] == 40 and report["requests"] == 20


def test_steady_state_sql_does_not_grow_with_accounts_or_positions(env, sim):
    few, many = addresses(30)[:3], addresses(30)[3:]
    watch(env, sim, few)
    run_json(env)
    small = run_json(env)["sql_statements"]
    for address in many:
        for coin in ("BTC", "ETH", "SOL"):
            sim.open_position(address, coin, "1", "100")
        assert cli(env, "accounts", "add", address).returncode == 0
    run_json(env)
    large = run_json(env)["sql_statements"]
    assert large == small, (small, large)  # 3 accounts x 1 position vs 30 accounts, 84 positions
    assert large <= 17  # 15, one for the cached perp dex list (HIP-3), one for the hedge groups (issue 14)


def test_a_budget_too_small_reads_the_urgent_first_and_defers_the_rest(env, sim, database_url):
    accounts = addresses(10)
    watch(env, sim, accounts)
    run_json(env)
    urgent = accounts[-1]
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE positions p SET stop_loss_price = 1 FROM accounts a"
                     " WHERE a.id = p.account_id AND a.address = %s", (urgent,))
    sim.reset_log()
    report = run_json(dict(env, MONITOR_WEIGHT_BUDGET="12"))  # allMids (2) + five account reads (2 each)
    assert sum(entry["weight"] for entry in sim.requests_log()) <= 12
    assert report["accounts_ok"] == 5 and report["accounts_deferred"] == 5
    assert urgent not in report["deferred_accounts"]
    assert any("weight budget" in note for note in report["notes"])
    assert report["exit_code"] == 0  # deferred is not failed


def test_a_429_is_retried_with_backoff(env, sim):
    accounts = addresses(3)
    watch(env, sim, accounts)
    sim.reset_log()  # `accounts add` asked userRole
    sim.add_fault("429", path="info", type="clearinghouseState", user=accounts[0], count=1)
    report = run_json(env)
    assert report["accounts_ok"] == 3 and report["discovered"] == 3
    statuses = [e["status"] for e in sim.requests_log() if e["user"] == accounts[0]]
    assert statuses[:2] == [429, 200]


def test_shards_split_the_accounts_disjointly_and_run_side_by_side(env, sim, database_url):
    accounts = addresses(12)
    watch(env, sim, accounts)
    procs = [subprocess.Popen([sys.executable, "-m", "monitor", "run", "--json", "--shard", f"{k}/3"], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (1, 2, 3)]
    import json

    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    assert sum(r["discovered"] for r in reports) == 12
    seen = [a["account"] for r in reports for a in r["actions"]]
    assert sorted(seen) == sorted(accounts)
    assert len({r["epoch"] for r in reports}) >= 1
    with psycopg.connect(database_url) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM monitor_lease")}
    assert names == {"run:shard-1-of-3", "run:shard-2-of-3", "run:shard-3-of-3"}
    bad = cli(env, "run", "--shard", "4/3")  # a bad flag: usage (2); MONITOR_SHARD=4/3 is configuration (78)
    assert bad.returncode == 2 and "K/N" in bad.stderr
    bad = cli(dict(env, MONITOR_SHARD="4/3"), "run")
    assert bad.returncode == 78 and "MONITOR_SHARD" in bad.stderr


def test_parallel_reads_give_the_same_table_as_sequential(env, sim, database_url):
    accounts = addresses(30)
    for n, address in enumerate(accounts):
        sim.open_position(address, "ETH", str(n + 1), "1900")
        assert cli(env, "accounts", "add", address).returncode == 0
    run_json(dict(env, MONITOR_READ_PARALLELISM="16"))
    with psycopg.connect(database_url) as conn:
        sizes = sorted(row[0] for row in conn.execute("SELECT size FROM positions WHERE closed_at IS NULL"))
    assert sizes == [Decimal(n + 1) for n in range(30)]
