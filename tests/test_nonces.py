"""Nonces unique per agent key across the processes of one host (reference §3.2: the exchange refuses a nonce
its signer used before; the SDK's nonce is the millisecond time, so two processes signing in one millisecond
collide). Real processes hammer one key's nonce source; a real close signs with it."""

from __future__ import annotations

import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import psycopg
from eth_account import Account as EthAccount

from tests.conftest import ALICE, ROOT, cli, run_json

HAMMER = """
import sys, time
from pathlib import Path
from monitor.lock import NonceSource
source = NonceSource(Path(sys.argv[1]))
start = float(sys.argv[2])
while time.time() < start:
    pass
print("\\n".join(str(source()) for _ in range(int(sys.argv[3]))))
"""


def test_processes_signing_with_one_key_at_once_get_distinct_increasing_nonces(tmp_path):
    path = tmp_path / "nonces" / "0xagent.nonce"
    start = time.time() + 2.0  # every process starts drawing in the same millisecond
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, str(path), str(start), "300"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    drawn = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        mine = [int(line) for line in out.split()]
        assert mine == sorted(mine) and len(set(mine)) == len(mine) == 300  # each process: strictly increasing
        drawn.extend(mine)
    assert len(set(drawn)) == len(drawn) == 1200  # no two processes ever got one nonce
    assert int(path.read_text()) == max(drawn)
    assert abs(min(drawn) - start * 1000) < 60_000  # still a millisecond time (the exchange's window: T-2d..T+1d)


def test_a_close_signs_with_the_keys_host_wide_nonce(env, sim, database_url):
    agent = EthAccount.create()
    sim.approve_agent(ALICE, agent.address)
    keyed = dict(env, MONITOR_HL_SECRET_KEY=agent.key.hex())
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    # Another process on this host signed with the key just now, a little ahead of this host's millisecond:
    nonce_file = Path(env["MONITOR_DATA_DIR"]) / "nonces" / f"{agent.address.lower()}.nonce"
    nonce_file.parent.mkdir(parents=True, exist_ok=True)
    taken = int(time.time() * 1000) + 60_000
    nonce_file.write_text(str(taken))
    sim.set_mid("BTC", "29000")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE positions SET stop_loss_price = %s WHERE coin = 'BTC'", (Decimal("29500"),))

    report = run_json(keyed)

    assert report["close_orders_sent"] == 1 and report["closed"] == 1, report["notes"]
    assert int(nonce_file.read_text()) == taken + 1  # the order's nonce came after it, not from the bare clock
