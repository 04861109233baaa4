#!/usr/bin/env python3
"""`make bench`: the real CLI against a real PostgreSQL and the loopback simulator, at N accounts x M positions.

For each N it measures a cold start (everything discovered), the median of several steady-state runs
(nothing changed), and a run after 10% of the positions were resized on the exchange (half shrunk, half
grown) and 5% closed outside the monitor (``--resized``, ``--closed``); also a no-op run (no accounts), a naive reference
(the SDK's default ``Info`` construction, one clearinghouseState per account, one SELECT and one
UPDATE per position, autocommit) and the same N with fewer positions per account, to show whether
the SQL statement count depends on the number of positions. The targets include the batched writes' (issue 11
item 4): a 500x10 cold start in <= 2.5 s and <= 200 SQL statements, the changed run in <= 2 SQL statements
per account it changed (accounts whose discover/update/close it reports; the weight budget defers the rest
to later runs), and the steady run within 1.25x its floor: ceil(N / MONITOR_READ_PARALLELISM) x latency,
plus the start-up a run costs anyway (the no-op run's median wall).

How each figure is taken:

* wall time: from outside the process (``time.perf_counter`` around spawn .. reaped), median of runs;
* HTTP requests and API weight: from the simulator's own request log, reset before each run (not the
  CLI's self-reported counters, which are shown only as a cross-check);
* SQL statements: the CLI's ``sql_statements`` from ``run --json``, cross-checked against the delta of
  ``pg_stat_database.xact_commit + xact_rollback`` of the run's database (read from another database after
  every backend of the run has left ``pg_stat_activity``, so the run's statistics have been flushed), or
  against ``pg_stat_statements`` calls when that extension is preloaded on the server;
* peak RSS: ``/usr/bin/time -f %M`` around each child (else a tiny Python parent reporting its
  ``RUSAGE_CHILDREN`` after its one child exits). Not ``os.wait4``/``RUSAGE_CHILDREN`` from this script: the
  latter is a running maximum over every child ever reaped, and on Linux a child's ``ru_maxrss`` also counts
  the image it was forked from before exec -- this script, simulator state and all.

The simulator runs in this process with TCP_NODELAY set on its sockets (it leaves Nagle's algorithm on,
which adds a ~40 ms delayed-ACK stall to every keep-alive request on loopback; ``--raw-simulator`` keeps it).
``--rev REV`` measures ``monitor/`` as committed at REV (``git archive`` into a temp dir) instead of the
working tree, so concurrent edits cannot change the code halfway through a benchmark (the in-process
simulator is the installed ``hlsim``, from testkit/, either way).

The script always exits 0 once it has measured (targets that fail print FAIL); it removes its databases,
its embedded PostgreSQL and its simulator on the way out.

    .venv/bin/python scripts/bench.py [--quick] [--accounts 100,500,2000] [--positions 10] [--runs 3]
                                      [--latency-ms 50] [--json-out FILE] [--database-url URL] [--rev REV]
                                      [--weight-budget W] [--hip3-at N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pm_testkit import ScratchServer, with_database

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT  # where the measured `monitor` package lives (the working tree, or a --rev export)

EXCHANGE_LIMIT_PER_MINUTE = 1200  # Hyperliquid's per-IP request weight per minute
DEFAULT_WEIGHT_BUDGET = 600  # the planned MONITOR_WEIGHT_BUDGET default, used only when the source has none
WEIGHT_CONSTANT_ALLOWED = 50  # "2 per account + a small constant"
FILLS_TYPES = ("userFills", "userFillsByTime")  # weigh 20 + 1 per 20 fills returned (the simulator's log has both)
# The HIP-3 scenarios (``run_hip3``): the same accounts and positions on the first dex, plus HIP3_DEXES deployed
# HIP-3 dexes and, on every HIP3_EVERY-th account, one position on the first of them. Their names end with this
# suffix, so the table shows weight per account with and without a HIP-3 dex in use side by side.
HIP3_SCENARIO_SUFFIX = " +HIP-3 dex"
HIP3_DEXES = ("xyz", "flx")  # listed by perpDexs, so every account's dexes are read (full) or swept (targeted)
HIP3_COIN = "xyz:TSLA"
HIP3_EVERY = 2  # every other account holds a HIP-3 position
# Settings this script sets itself (or that would send things somewhere real); other MONITOR_* pass through.
_OWN_ENV = {
    "MONITOR_DATABASE_URL", "MONITOR_HL_API_URL", "MONITOR_DATA_DIR", "MONITOR_LOCK_FILE", "MONITOR_CLOSE_GRACE",
    "MONITOR_TEST_DATABASE_URL", "MONITOR_HL_SECRET_KEY", "MONITOR_HL_SECRET_KEY_FILE", "MONITOR_PING_URL",
    "MONITOR_ALERT_WEBHOOK", "MONITOR_METRICS_FILE", "MONITOR_WEIGHT_BUDGET",
}


# ---- child processes -----------------------------------------------------------------------------

@dataclass
class Child:
    returncode: int
    stdout: str
    stderr: str
    wall: float
    maxrss_kb: int


_current_child: subprocess.Popen | None = None
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
# Without GNU time: a tiny Python parent whose RUSAGE_CHILDREN holds only the one child it ran.
_RSS_WRAPPER = ("import resource, subprocess, sys\n"
                "code = subprocess.call(sys.argv[2:])\n"
                "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
                "sys.exit(code if code >= 0 else 128 - code)\n")
RSS_METHOD = ("/usr/bin/time -f %M (GNU time forks the child itself)" if GNU_TIME else
              "a small Python parent's getrusage(RUSAGE_CHILDREN) after its one child exits")


def run_child(cmd: list[str], env: dict[str, str], timeout: float) -> Child:
    """Run ``cmd``; wall time from outside, and the child's peak RSS through a small intermediate parent.

    Not ``os.wait4`` from here: on Linux a child's ru_maxrss also counts the memory image it was forked
    from before exec, i.e. this script (simulator state included), so every child would look as big as us.
    """
    global _current_child
    with tempfile.NamedTemporaryFile(prefix="pm-bench-rss-", delete=False) as rss:
        rss_path = rss.name
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            if GNU_TIME:
                full = [GNU_TIME, "-f", "%M", "-o", rss_path, *cmd]
            else:
                full = [sys.executable, "-c", _RSS_WRAPPER, rss_path, *cmd]
            started = time.perf_counter()
            proc = subprocess.Popen(full, env=env, cwd=SOURCE, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            _current_child = proc
            timer = threading.Timer(timeout, _kill_group, (proc,))
            timer.daemon = True
            timer.start()
            try:
                proc.wait()
            finally:
                timer.cancel()
            wall = time.perf_counter() - started
            _current_child = None
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        maxrss = 0
        try:
            lines = Path(rss_path).read_text().split()
            maxrss = int(lines[-1]) if lines else 0
        except (OSError, ValueError):
            pass
        return Child(proc.returncode, stdout, stderr, wall, maxrss)
    finally:
        try:
            os.unlink(rss_path)
        except OSError:
            pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def kill_current_child() -> None:
    proc = _current_child
    if proc is not None and proc.returncode is None:
        _kill_group(proc)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


# ---- PostgreSQL ----------------------------------------------------------------------------------

class Postgres:
    """The server (embedded unless a URL is given), a statistics connection, and the bench databases."""

    def __init__(self, url: str | None) -> None:
        import psycopg

        self.server: Any = None
        self.created: list[str] = []
        if url:
            self.admin_url = url
            self.embedded = False
        else:
            self.server = ScratchServer("pm-bench-pg-")
            self.admin_url = self.server.url
            self.embedded = True
        self.conn = psycopg.connect(self.admin_url, autocommit=True)
        self.version = self.conn.execute("SHOW server_version").fetchone()[0]
        self.pgss = self._pg_stat_statements()

    def _pg_stat_statements(self) -> bool:
        try:
            preload = self.conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()[0] or ""
            if "pg_stat_statements" not in preload:
                return False
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self.conn.execute("SELECT count(*) FROM pg_stat_statements").fetchone()
            return True
        except Exception:  # noqa: BLE001 - not available: use pg_stat_database
            return False

    @property
    def sql_check_method(self) -> str:
        if self.pgss:
            return "pg_stat_statements (sum of calls in the run's database)"
        return "pg_stat_database xact_commit+xact_rollback delta (pg_stat_statements not preloaded)"

    def create_database(self, label: str) -> tuple[str, str]:
        name = f"pm_bench_{label}_{uuid.uuid4().hex[:6]}"
        self.conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return name, with_database(self.admin_url, name)

    def drop_database(self, name: str) -> None:
        try:
            self.conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:  # noqa: BLE001
            print(f"(could not drop {name}: {exc})", file=sys.stderr)
        if name in self.created:
            self.created.remove(name)

    def settle(self, name: str, limit: float = 10.0) -> None:
        """Wait until no backend is connected to ``name``: each one flushed its statistics before leaving."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            left = self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                                     (name,)).fetchone()[0]
            if left == 0:
                return
            time.sleep(0.02)

    def counter(self, name: str) -> int:
        """Transactions (or, with pg_stat_statements, statement calls) so far in database ``name``."""
        self.settle(name)
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        if self.pgss:
            row = self.conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)", (name,)).fetchone()
        else:
            row = self.conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                                    (name,)).fetchone()
        return int(row[0] or 0) if row else 0

    def close(self) -> None:
        for name in list(self.created):
            self.drop_database(name)
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass
        if self.server is not None:
            try:
                self.server.close()
            except Exception as exc:  # noqa: BLE001
                print(f"(could not stop the embedded PostgreSQL: {exc})", file=sys.stderr)


# ---- measurements --------------------------------------------------------------------------------

@dataclass
class RunResult:
    wall: float
    returncode: int
    maxrss_kb: int
    requests: int
    weight: int
    by_type: dict[str, int]
    max_window_weight: int
    fills_weight: int  # the part of ``weight`` spent on fills reads, per-item surcharge included
    sql_statements: int | None
    pg_counter: int
    report: dict[str, Any] | None
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        keep = ("discovered", "updated", "closed", "conflicts", "accounts_ok", "accounts_failed",
                "accounts_deferred", "overrun", "requests", "api_weight", "sql_statements", "duration_seconds",
                "exit_code", "notes")
        return {
            "wall_seconds": round(self.wall, 4), "returncode": self.returncode, "peak_rss_kb": self.maxrss_kb,
            "requests": self.requests, "api_weight": self.weight, "requests_by_type": self.by_type,
            "max_60s_window_weight": self.max_window_weight, "sql_statements": self.sql_statements,
            "fills_weight": self.fills_weight, "pg_counter_delta": self.pg_counter,
            "cli_report": {k: self.report.get(k) for k in keep} if self.report else None,
            "stderr_tail": self.stderr_tail, **self.extra,
        }


@dataclass
class Scenario:
    accounts: int
    positions: int
    name: str
    runs: list[RunResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)

    def _median(self, values: list[float | int | None]) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    @property
    def wall(self) -> float | None:
        return self._median([r.wall for r in self.runs])

    @property
    def requests(self) -> float | None:
        return self._median([r.requests for r in self.runs])

    @property
    def weight(self) -> float | None:
        return self._median([r.weight for r in self.runs])

    @property
    def fills_weight(self) -> float | None:
        return self._median([r.fills_weight for r in self.runs])

    @property
    def weight_per_read(self) -> float | None:
        """API weight per account the run got to (deferred accounts cost nothing and are not counted)."""
        read = self.accounts_read
        return self.weight / read if self.weight is not None and read else None

    @property
    def sql(self) -> float | None:
        return self._median([r.sql_statements for r in self.runs])

    @property
    def pg_counter(self) -> float | None:
        return self._median([r.pg_counter for r in self.runs])

    @property
    def changed_accounts(self) -> float | None:
        """Accounts with a discover, update or close in the run's report (the accounts it wrote for)."""
        return self._median([None if r.report is None else
                             len({a.get("account") for a in r.report.get("actions") or []
                                  if a.get("type") in ("discover", "update", "close")})
                             for r in self.runs])

    @property
    def accounts_read(self) -> float | None:
        """Accounts the run got to (ok + failed), from the CLI's report; the naive reference reads them all."""
        if self.name.startswith("naive"):
            return self._median([(r.report or {}).get("accounts") for r in self.runs])
        return self._median([None if r.report is None else
                             (r.report.get("accounts_ok") or 0) + (r.report.get("accounts_failed") or 0)
                             for r in self.runs])

    @property
    def deferred(self) -> int:
        return max(((r.report or {}).get("accounts_deferred") or 0 for r in self.runs), default=0)

    @property
    def rss_mb(self) -> float | None:
        values = [r.maxrss_kb for r in self.runs]
        return max(values) / 1024 if values else None

    @property
    def max_window(self) -> int:
        return max((r.max_window_weight for r in self.runs), default=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "accounts": self.accounts, "positions": self.positions, "scenario": self.name,
            "wall_seconds_median": self.wall, "requests": self.requests, "api_weight": self.weight,
            "weight_per_account": (self.weight / self.accounts) if self.weight is not None and self.accounts else None,
            "weight_per_account_read": self.weight_per_read, "fills_weight": self.fills_weight,
            "sql_statements": self.sql, "pg_counter_delta": self.pg_counter, "peak_rss_mb": self.rss_mb,
            "accounts_read": self.accounts_read, "accounts_deferred_max": self.deferred,
            "max_60s_window_weight": self.max_window, "expected": self.expected, "notes": self.notes,
            "runs": [r.to_json() for r in self.runs],
        }


def max_window_weight(entries: list[tuple[int, int]], window_ms: int = 60_000) -> int:
    """The largest total weight of requests that arrived within any ``window_ms`` span."""
    entries = sorted(entries)
    best = total = 0
    left = 0
    for right, (t, w) in enumerate(entries):
        total += w
        while entries[left][0] <= t - window_ms:
            total -= entries[left][1]
            left += 1
        best = max(best, total)
    return best


def address_for(label: str, index: int) -> str:
    return "0x" + hashlib.sha256(f"bench:{label}:{index}".encode()).hexdigest()[:40]


class Bench:
    def __init__(self, args: argparse.Namespace, pg: Postgres, sim: Any, workdir: Path) -> None:
        self.args = args
        self.pg = pg
        self.sim = sim
        self.workdir = workdir
        self.all_entries: list[tuple[int, int]] = []  # (arrival ms, weight) of every request of our runs
        self.passthrough = {k: v for k, v in os.environ.items() if k.startswith("MONITOR_") and k not in _OWN_ENV}

    # -- environment and runs ----------------------------------------------------------------------

    def env(self, db_url: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
        env.update(self.passthrough)
        env.update({
            "MONITOR_DATABASE_URL": db_url,
            "MONITOR_HL_API_URL": self.sim.url,
            "MONITOR_DATA_DIR": str(self.workdir / "data"),
            "MONITOR_LOCK_FILE": str(self.workdir / "lock" / "run.lock"),
            "MONITOR_CLOSE_GRACE": "0",
        })
        if self.args.weight_budget is not None:
            env["MONITOR_WEIGHT_BUDGET"] = str(self.args.weight_budget)
        return env

    def migrate(self, db_url: str) -> None:
        child = run_child([sys.executable, "-m", "monitor", "db", "migrate"], self.env(db_url), self.args.timeout)
        if child.returncode != 0:
            raise RuntimeError(f"`position-monitor db migrate` failed ({child.returncode}): {child.stderr.strip()[-400:]}")

    def measure(self, db_name: str, db_url: str, *, naive: bool = False) -> RunResult:
        self.sim.reset_log()
        before = self.pg.counter(db_name)
        if naive:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--naive-worker", "--database-url", db_url,
                   "--api-url", self.sim.url]
        else:
            cmd = [sys.executable, "-m", "monitor", "run", "--json"]
        child = run_child(cmd, self.env(db_url), self.args.timeout)
        log = self.sim.requests_log()
        after = self.pg.counter(db_name)
        entries = [(int(e["time"]), int(e["weight"])) for e in log]
        if not naive:
            self.all_entries.extend(entries)
        report = None
        try:
            report = json.loads(child.stdout.strip().splitlines()[-1]) if child.stdout.strip() else None
        except ValueError:
            report = None
        result = RunResult(
            wall=child.wall, returncode=child.returncode, maxrss_kb=child.maxrss_kb, requests=len(log),
            weight=sum(w for _, w in entries), by_type=dict(Counter(str(e["type"]) for e in log)),
            max_window_weight=max_window_weight(entries),
            fills_weight=sum(int(e["weight"]) for e in log if e["type"] in FILLS_TYPES),
            sql_statements=(report or {}).get("sql_statements"), pg_counter=after - before, report=report,
            stderr_tail=child.stderr.strip()[-600:] if child.returncode != 0 or report is None else "")
        return result

    def scenario(self, accounts: int, positions: int, name: str, db_name: str, db_url: str, runs: int, *,
                 naive: bool = False, expected: dict[str, int] | None = None) -> Scenario:
        sc = Scenario(accounts, positions, name, expected=dict(expected or {}))
        for index in range(runs):
            label = f"{accounts}x{positions} {name}" + (f" #{index + 1}" if runs > 1 else "")
            print(f"  .. {label}", end="", flush=True)
            result = self.measure(db_name, db_url, naive=naive)
            sc.runs.append(result)
            print(f": {result.wall:.2f}s, {result.requests} requests, weight {result.weight}, "
                  f"SQL {result.sql_statements if result.sql_statements is not None else '?'}, "
                  f"rss {result.maxrss_kb / 1024:.0f} MB, exit {result.returncode}", flush=True)
        self.check(sc)
        return sc

    def check(self, sc: Scenario) -> None:
        """Notes for anything that did not happen as the scenario intends."""
        for index, r in enumerate(sc.runs, 1):
            tag = f"run {index}: " if len(sc.runs) > 1 else ""
            if r.returncode != 0:
                sc.notes.append(f"{tag}exit {r.returncode}: {r.stderr_tail[-300:]}")
            if sc.name.startswith("naive"):
                if r.report and r.report.get("accounts") != sc.accounts:
                    sc.notes.append(f"{tag}naive read {r.report.get('accounts')} accounts")
                continue
            rep = r.report
            if rep is None:
                sc.notes.append(f"{tag}no JSON report on stdout")
                continue
            for key, want in sc.expected.items():
                if rep.get(key) != want:
                    sc.notes.append(f"{tag}{key} = {rep.get(key)}, expected {want}")
            for key in ("accounts_failed", "accounts_deferred"):
                if rep.get(key):
                    sc.notes.append(f"{tag}{key} = {rep.get(key)}")
            if rep.get("overrun"):
                sc.notes.append(f"{tag}the run overran its deadline")
            if rep.get("requests") is not None and rep.get("requests") != r.requests:
                sc.notes.append(f"{tag}CLI reports {rep.get('requests')} requests, the simulator served {r.requests}")
            if rep.get("api_weight") is not None and rep.get("api_weight") != r.weight:
                sc.notes.append(f"{tag}CLI reports weight {rep.get('api_weight')}, the simulator logged {r.weight}")

    # -- data ------------------------------------------------------------------------------------------

    def load_exchange(self, label: str, accounts: int, positions: int) -> tuple[list[str], list[tuple[str, str, int]]]:
        """N accounts x M positions, loaded into the simulator in one call; returns addresses and (addr, coin, szi)."""
        from hlsim import Simulator

        defaults = Simulator()
        universe = [u["name"] for u in defaults.meta()["universe"]]
        mids = defaults.mids()
        if positions > len(universe):
            raise SystemExit(f"--positions: at most {len(universe)} (coins in the simulator's universe)")
        addresses: list[str] = []
        held: list[tuple[str, str, int]] = []
        state: dict[str, Any] = {}
        for i in range(accounts):
            address = address_for(label, i)
            addresses.append(address)
            book = {}
            for j in range(positions):
                coin = universe[(i + j) % len(universe)]
                szi = (2 + (i * 7 + j) % 5) * (-1 if (i + j) % 3 == 0 else 1)
                book[coin] = {"szi": str(szi), "entryPx": mids.get(coin, "10")}
                held.append((address, coin, szi))
            state[address] = {"positions": book}
        self.sim.load({"accounts": state})
        return addresses, held

    def register(self, db_url: str, addresses: list[str]) -> None:
        import psycopg

        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("INSERT INTO accounts (address, label) SELECT a, 'bench' FROM unnest(%s::text[]) AS a",
                         (addresses,))

    def change(self, held: list[tuple[str, str, int]], resized: float, closed: float) -> dict[str, int]:
        """Resize ``resized`` of the positions (half shrunk, half grown) and close ``closed`` of them outside
        the monitor."""
        rng = random.Random(6)
        n_closed = round(len(held) * closed)
        n_resized = round(len(held) * resized)
        chosen = rng.sample(held, max(1, n_closed + n_resized))
        mids = self.sim.mids()
        done_closed = updated = 0
        for index, (address, coin, szi) in enumerate(chosen):
            if index < n_closed:
                self.sim.close_external(address, coin)
                done_closed += 1
            else:
                sign = 1 if szi > 0 else -1
                self.sim.resize(address, coin, str(szi - sign if index % 2 == 0 else szi + sign), mids[coin])
                updated += 1
        return {"closed": done_closed, "updated": updated, "discovered": 0}

    # -- the whole benchmark ---------------------------------------------------------------------------

    def run_size(self, accounts: int, positions: int, runs: int, *, naive_runs: int, change: bool) -> list[Scenario]:
        out: list[Scenario] = []
        started = time.monotonic()
        name, url = self.pg.create_database(f"{accounts}x{positions}")
        try:
            self.migrate(url)
            addresses, held = self.load_exchange(f"{accounts}x{positions}", accounts, positions)
            self.register(url, addresses)
            print(f"\n[{accounts} accounts x {positions} positions] set up in {time.monotonic() - started:.1f}s",
                  flush=True)
            out.append(self.scenario(accounts, positions, "cold start", name, url, 1,
                                     expected={"discovered": accounts * positions, "accounts_ok": accounts}))
            out.append(self.scenario(accounts, positions, "steady", name, url, runs,
                                     expected={"discovered": 0, "updated": 0, "closed": 0, "accounts_ok": accounts}))
            if naive_runs:
                out.append(self.scenario(accounts, positions, "naive steady", name, url, naive_runs, naive=True))
            if change:
                expected = self.change(held, self.args.resized, self.args.closed)
                out.append(self.scenario(accounts, positions, changed_name(self.args), name, url, 1,
                                         expected=expected))
        finally:
            self.pg.drop_database(name)
        return out

    def run_hip3(self, accounts: int, positions: int, runs: int) -> list[Scenario]:
        """Cold start and steady runs with HIP-3 dexes deployed and every HIP3_EVERY-th account holding a
        position on one: the weight and time of reading accounts' HIP-3 dexes (perpDexs, one clearinghouseState
        per dex read; the full or the targeted policy, whichever the budget gives)."""
        out: list[Scenario] = []
        started = time.monotonic()
        name, url = self.pg.create_database(f"{accounts}x{positions}hip3")
        try:
            self.migrate(url)
            addresses, _ = self.load_exchange(f"{accounts}x{positions}hip3", accounts, positions)
            for dex in HIP3_DEXES:
                self.sim.add_perp_dex(dex)
            held = 0
            for index, address in enumerate(addresses):
                if index % HIP3_EVERY == 0:
                    self.sim.open_hip3_position(address, HIP3_COIN, str(1 + index % 3), "250")
                    held += 1
            self.register(url, addresses)
            print(f"\n[{accounts} accounts x {positions} positions, {len(HIP3_DEXES)} HIP-3 dexes, {held} HIP-3"
                  f" positions] set up in {time.monotonic() - started:.1f}s", flush=True)
            # The cold start finds every HIP-3 position only when every dex of every account fits the budget;
            # otherwise the rotating sweep finds the rest within its bound. The steady runs begin once it has.
            cold = self.scenario(accounts, positions, "cold start" + HIP3_SCENARIO_SUFFIX, name, url, 1,
                                 expected={"accounts_ok": accounts})
            out.append(cold)
            found = sum(((r.report or {}).get("discovered") or 0) for r in cold.runs) - accounts * positions
            sweeping = 0
            while found < held and sweeping < 50:
                sweeping += 1
                found += (self.measure(name, url).report or {}).get("discovered") or 0
            cold.notes.append(f"{held} HIP-3 positions: {held - found} not found"
                              if found < held else
                              f"all {held} HIP-3 positions found by the cold start"
                              + (f" and {sweeping} more run(s) of the sweep (not timed)" if sweeping else ""))
            out.append(self.scenario(accounts, positions, "steady" + HIP3_SCENARIO_SUFFIX, name, url, runs,
                                     expected={"discovered": 0, "updated": 0, "closed": 0, "accounts_ok": accounts}))
        finally:
            self.pg.drop_database(name)
        return out

    def run_noop(self, runs: int) -> Scenario:
        name, url = self.pg.create_database("noop")
        try:
            self.migrate(url)
            self.sim.load({})
            print("\n[no accounts]", flush=True)
            return self.scenario(0, 0, "no-op", name, url, runs,
                                 expected={"discovered": 0, "accounts_ok": 0})
        finally:
            self.pg.drop_database(name)


# ---- the naive reference (run as a child of this script) -------------------------------------------

def naive_worker(database_url: str, api_url: str) -> int:
    """Sequential reads through the SDK's default Info construction; one SELECT + one UPDATE per position."""
    import psycopg
    from hyperliquid.info import Info

    info = Info(api_url, skip_ws=True)  # the SDK's default: fetches spotMeta and meta on construction
    statements = seen = 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        accounts = conn.execute("SELECT id, address FROM accounts WHERE active ORDER BY id").fetchall()
        statements += 1
        for account_id, address in accounts:
            state = info.user_state(address)
            for item in state.get("assetPositions", []):
                coin = item["position"]["coin"]
                row = conn.execute("SELECT id FROM positions WHERE account_id = %s AND coin = %s AND closed_at IS NULL",
                                   (account_id, coin)).fetchone()
                statements += 1
                if row is None:
                    continue  # the reference covers the steady state only
                conn.execute("UPDATE positions SET last_seen_at = now() WHERE id = %s", (row[0],))
                statements += 1
                seen += 1
    print(json.dumps({"sql_statements": statements, "accounts": len(accounts), "positions_seen": seen}))
    return 0


# ---- printing ------------------------------------------------------------------------------------

def fmt_num(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:.0f}" if isinstance(value, float) and value != int(value) else f"{int(value)}"
    return f"{value:.{digits}f}"


def print_table(scenarios: list[Scenario]) -> None:
    headers = ("accounts", "positions", "scenario", "wall s (median)", "requests", "API weight", "weight/account",
               "weight/acct read", "fills weight", "SQL statements", "peak RSS MB", "pg xacts", "accts read", "runs")
    rows = []
    for sc in scenarios:
        rows.append((
            str(sc.accounts), str(sc.positions), sc.name, fmt_num(sc.wall, 3), fmt_num(sc.requests),
            fmt_num(sc.weight),
            fmt_num(sc.weight / sc.accounts, 2) if sc.weight is not None and sc.accounts else "-",
            fmt_num(sc.weight_per_read, 2), fmt_num(sc.fills_weight),
            fmt_num(sc.sql), fmt_num(sc.rss_mb, 1), fmt_num(sc.pg_counter), fmt_num(sc.accounts_read),
            str(len(sc.runs)),
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    right = {0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print()
    print("Weight per account read (API weight / accounts the run got to; fills reads with their per-20-fills"
          " surcharge, from the simulator's log):")
    for sc in scenarios:
        if sc.weight_per_read is None or sc.name.startswith("naive"):
            continue
        fills = f"; fills {fmt_num(sc.fills_weight)} of it" if sc.fills_weight else ""
        print(f"  {sc.accounts} x {sc.positions} {sc.name}: {sc.weight_per_read:.2f}{fills}")
    if not any(sc.name.endswith(HIP3_SCENARIO_SUFFIX) for sc in scenarios):
        print("  with a HIP-3 dex in use: not measured (--hip3-at 0)")
    for sc in scenarios:
        plain = next((p for p in scenarios if sc.name.endswith(HIP3_SCENARIO_SUFFIX) and p.accounts == sc.accounts
                      and p.positions == sc.positions and p.name == sc.name[:-len(HIP3_SCENARIO_SUFFIX)]), None)
        if plain is not None and plain.weight_per_read and sc.weight_per_read and plain.wall and sc.wall:
            extra = sc.weight_per_read - plain.weight_per_read
            print(f"  {sc.accounts} x {sc.positions} {plain.name}: with a HIP-3 dex in use"
                  f" {sc.weight_per_read:.2f} weight per account read ({extra:+.2f}),"
                  f" {sc.wall:.2f} s ({sc.wall - plain.wall:+.2f} s) against {plain.weight_per_read:.2f} and"
                  f" {plain.wall:.2f} s without")


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except Exception:  # noqa: BLE001
            return ""

    return {"head": git("rev-parse", "--short", "HEAD").strip(),
            "dirty_monitor_files": [line[3:] for line in git("status", "--porcelain", "--", "monitor").splitlines()
                                    if line.strip()]}


def changed_name(args: argparse.Namespace) -> str:
    return f"{args.resized:.0%} resized, {args.closed:.0%} closed"


def find(scenarios: list[Scenario], accounts: int, positions: int, name: str) -> Scenario | None:
    for sc in scenarios:
        if sc.accounts == accounts and sc.positions == positions and sc.name == name:
            return sc
    return None


def targets(args: argparse.Namespace, scenarios: list[Scenario], sizes: list[int], naive_n: int | None,
            sql_n: int | None, all_window: int) -> list[dict[str, Any]]:
    M = args.positions
    results: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        results.append({"target": name, "result": "n/a" if ok is None else ("PASS" if ok else "FAIL"),
                        "detail": detail})

    ref_n = 500 if 500 in sizes else (naive_n or sizes[-1])
    steady_ref = find(scenarios, ref_n, M, "steady")
    note = "" if ref_n == 500 and M == 10 else f" (measured at {ref_n}x{M}, not 500x10)"
    if steady_ref and steady_ref.wall is not None:
        add("500x10 steady state <= 3 s wall", steady_ref.wall <= 3.0 if not note else None,
            f"{steady_ref.wall:.2f} s{note}")
    noop = find(scenarios, 0, 0, "no-op")
    if steady_ref and steady_ref.wall is not None and noop and noop.wall is not None:
        parallelism = args.read_parallelism
        floor = math.ceil(ref_n / parallelism) * args.latency_ms / 1000 + noop.wall
        add("500x10 steady <= 1.25 x floor (ceil(N / parallelism) x latency + start-up)",
            steady_ref.wall <= 1.25 * floor if not note else None,
            f"{steady_ref.wall:.2f} s = {steady_ref.wall / floor:.2f} x floor {floor:.2f} s (ceil({ref_n}/{parallelism})"
            f" x {args.latency_ms:g} ms + {noop.wall:.2f} s start-up, the no-op run){note}")
    cold_ref = find(scenarios, ref_n, M, "cold start")
    if cold_ref and cold_ref.wall is not None:
        ok = cold_ref.wall <= 2.5 and cold_ref.sql is not None and cold_ref.sql <= 200
        add("500x10 cold start <= 2.5 s wall and <= 200 SQL statements", ok if not note else None,
            f"{cold_ref.wall:.2f} s, {fmt_num(cold_ref.sql)} SQL statements{note}")
    changed_ref = find(scenarios, ref_n, M, changed_name(args))
    if changed_ref and changed_ref.sql is not None and changed_ref.changed_accounts:
        per = changed_ref.sql / changed_ref.changed_accounts
        deferred = f"; {changed_ref.deferred:.0f} accounts deferred by the weight budget" if changed_ref.deferred else ""
        add(f"500x10 after {changed_name(args)}: <= 2 SQL statements per changed account",
            per <= 2 if not note else None,
            f"{changed_ref.sql:.0f} SQL statements for {changed_ref.changed_accounts:.0f} accounts changed"
            f" ({per:.2f}/account, {changed_ref.wall:.2f} s){deferred}{note}")

    detail, ok = [], True
    for n in sizes:
        sc = find(scenarios, n, M, "steady")
        if sc and sc.weight is not None:
            extra = sc.weight - 2 * n
            ok = ok and 0 <= extra <= WEIGHT_CONSTANT_ALLOWED
            detail.append(f"N={n}: {sc.weight:.0f} = 2*{n} {'+' if extra >= 0 else '-'} {abs(extra):.0f}"
                          + (f" ({sc.deferred} accounts deferred)" if sc.deferred else ""))
    add(f"steady weight = 2 per account + constant (<= {WEIGHT_CONSTANT_ALLOWED})", ok if detail else None,
        "; ".join(detail))

    if sql_n is not None:
        a, b = find(scenarios, sql_n, M, "steady"), find(scenarios, sql_n, args.sql_check_positions, "steady")
        if a and b and a.sql is not None and b.sql is not None:
            ca, cb = find(scenarios, sql_n, M, "cold start"), find(scenarios, sql_n, args.sql_check_positions, "cold start")
            cold = (f"; cold start {fmt_num(ca.sql)} vs {fmt_num(cb.sql)} (per-position inserts)"
                    if ca and cb else "")
            add("steady SQL statements independent of positions", abs(a.sql - b.sql) <= 2,
                f"N={sql_n}: M={M}: {a.sql:.0f}, M={args.sql_check_positions}: {b.sql:.0f} "
                f"({a.sql / sql_n:.2f}/account){cold}")
    ours = [sc for sc in scenarios if not sc.name.startswith("naive") and sc.rss_mb is not None]
    if ours:
        worst = max(ours, key=lambda s: s.rss_mb or 0)
        add("peak RSS <= 150 MB", (worst.rss_mb or 0) <= 150,
            f"max {worst.rss_mb:.1f} MB ({worst.accounts}x{worst.positions} {worst.name})")
    noop = find(scenarios, 0, 0, "no-op")
    if noop and noop.wall is not None:
        add("no-op run <= 0.5 s", noop.wall <= 0.5, f"{noop.wall:.3f} s")
    if naive_n is not None:
        naive, mine = find(scenarios, naive_n, M, "naive steady"), find(scenarios, naive_n, M, "steady")
        if naive and mine and naive.wall and mine.wall:
            ratio = naive.wall / mine.wall
            where = "" if naive_n == 500 and M == 10 else f" (at {naive_n}x{M}, not 500x10)"
            add(">= 8x faster than naive at 500x10", ratio >= 8 if not where else None,
                f"naive {naive.wall:.2f} s / ours {mine.wall:.2f} s = {ratio:.1f}x{where}; naive SQL "
                f"{fmt_num(naive.sql if naive.sql is not None else None)}, naive weight {fmt_num(naive.weight)}")
    steady = [(n, find(scenarios, n, M, "steady")) for n in sizes]
    steady = [(n, s) for n, s in steady if s and s.wall is not None]
    if len(steady) >= 2:
        per = ", ".join(f"N={n}: {s.wall / n * 1000:.1f} ms/account, {s.requests / n:.2f} req/account, "
                        f"{s.sql / n if s.sql is not None else float('nan'):.2f} SQL/account" for n, s in steady)
        marginal = [((s2.wall - s1.wall) / (n2 - n1) * 1000, n1, n2)
                    for (n1, s1), (n2, s2) in zip(steady, steady[1:])]
        marg = ", ".join(f"{n1}->{n2}: {m:.1f} ms/account" for m, n1, n2 in marginal)
        deferred = [f"N={n}: {s.deferred} deferred" for n, s in steady if s.deferred]
        if deferred:
            marg += " (not every account was read: " + ", ".join(deferred) + ")"
        if len(marginal) >= 2:
            values = [m for m, _, _ in marginal]
            ok = max(values) <= 1.5 * max(min(values), 1e-6)
        else:
            (n1, s1), (n2, s2) = steady[0], steady[-1]
            ok = s2.wall / n2 <= s1.wall / n1 * 1.1
        add("linear growth (steady)", ok, f"{per}; marginal {marg}")
    per_run = max((sc.max_window for sc in scenarios if not sc.name.startswith("naive")), default=0)
    add(f"max API weight in any 60 s window <= {EXCHANGE_LIMIT_PER_MINUTE} (exchange limit)",
        per_run <= EXCHANGE_LIMIT_PER_MINUTE,
        f"max within one run {per_run}; back to back across all runs {all_window}")
    budget = args.weight_budget
    if budget is not None:
        add(f"max API weight in any 60 s window <= MONITOR_WEIGHT_BUDGET ({budget})", per_run <= budget,
            f"max within one run {per_run}")
    else:
        default, where = args.default_budget
        add(f"max API weight in any 60 s window <= {where} {default} (MONITOR_WEIGHT_BUDGET unset)",
            per_run <= default, f"max within one run {per_run}")
    return results


def runner_read_parallelism() -> int:
    """MONITOR_READ_PARALLELISM as the CLI runs will see it (passed through), else the source's default."""
    value = os.environ.get("MONITOR_READ_PARALLELISM", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        from monitor.config import Settings

        return int(getattr(Settings(), "read_parallelism", 16))
    except Exception:  # noqa: BLE001
        return 16


def runner_default_budget() -> tuple[int, str]:
    """The measured source's default MONITOR_WEIGHT_BUDGET, or the planned 600/minute when it has none."""
    try:
        from monitor.config import Settings

        value = getattr(Settings(), "weight_budget", None)
    except Exception:  # noqa: BLE001
        value = None
    if isinstance(value, int):
        return value, "the runner's default budget"
    return DEFAULT_WEIGHT_BUDGET, "the planned default budget (not in this source)"


def use_source(rev: str | None, workdir: Path) -> str:
    """Point the CLI runs at the working tree or at ``rev``'s monitor/ exported by git archive.

    The in-process simulator is the installed ``hlsim`` (testkit/) either way."""
    global SOURCE
    if rev is None:
        SOURCE = ROOT
    else:
        target = workdir / "src"
        target.mkdir()
        archive = subprocess.run(["git", "archive", "--format=tar", rev, "monitor"], cwd=ROOT,
                                 capture_output=True, timeout=60)
        if archive.returncode != 0:
            raise SystemExit(f"--rev {rev}: git archive failed: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True, timeout=60)
        SOURCE = target
    if "monitor" in sys.modules:
        raise SystemExit("internal error: monitor imported before its source was chosen")
    sys.path.insert(0, str(SOURCE))
    if rev is None:
        return f"source: the working tree {ROOT}"
    resolved = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return f"source: git rev {rev} ({resolved}) exported to a temp dir (the working tree's monitor/ is not used)"


def no_nagle(raw: bool) -> str:
    """Set TCP_NODELAY on the in-process simulator's connections (a class attribute, this process only).

    The simulator writes a response's headers and body in two send()s on a keep-alive connection; with
    Nagle's algorithm on, the body waits for the client's delayed ACK of the headers: ~40 ms per request
    on Linux loopback on top of the configured latency, which would swamp what is being measured.
    """
    import hlsim.server as simulator

    handler = getattr(simulator, "_Handler", None)
    if handler is None:
        return "simulator sockets: as the simulator sets them (no _Handler to adjust)"
    if getattr(handler, "disable_nagle_algorithm", False):
        return "simulator sockets: TCP_NODELAY already set by the simulator"
    if raw:
        return "simulator sockets: Nagle left on (--raw-simulator): each request also waits ~40 ms for a delayed ACK"
    handler.disable_nagle_algorithm = True
    return ("simulator sockets: TCP_NODELAY set by this script (the simulator leaves Nagle on, which adds a "
            "~40 ms delayed-ACK stall per keep-alive request; --raw-simulator to keep it)")


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", default=None, help='comma-separated N values (default "100,500,2000"; --quick "50,100")')
    p.add_argument("--positions", type=int, default=10, help="positions per account (default 10)")
    p.add_argument("--runs", type=int, default=None, help="steady-state (and no-op, naive) runs per size (default 3; --quick 2)")
    p.add_argument("--latency-ms", type=float, default=50.0, help="simulator latency per request (default 50)")
    p.add_argument("--quick", action="store_true", help="N=50,100 and 2 steady runs (a smoke test)")
    p.add_argument("--json-out", default=None, metavar="FILE", help="save every figure as JSON")
    p.add_argument("--database-url", default=None, metavar="URL",
                   help="a PostgreSQL server to create the bench databases on (default: MONITOR_TEST_DATABASE_URL, "
                        "else an embedded server)")
    p.add_argument("--naive-at", type=int, default=500, help="N for the naive reference (nearest measured N; default 500)")
    p.add_argument("--sql-check-positions", type=int, default=2,
                   help="also measure the naive-at N with this many positions per account (default 2)")
    p.add_argument("--resized", type=float, default=0.10,
                   help="fraction of positions resized before the changed run (default 0.10)")
    p.add_argument("--closed", type=float, default=0.05,
                   help="fraction of positions closed outside the monitor before the changed run (default 0.05)")
    p.add_argument("--weight-budget", type=int, default=None,
                   help="passed to the CLI as MONITOR_WEIGHT_BUDGET (default: that variable, if set)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a child run is killed")
    p.add_argument("--rev", default=None, metavar="REV",
                   help="measure `monitor` as committed at this git revision (exported with git archive to a temp "
                        "dir) instead of the working tree")
    p.add_argument("--raw-simulator", action="store_true",
                   help="leave Nagle's algorithm on in the simulator (adds ~40 ms of delayed-ACK stall per request)")
    p.add_argument("--hip3-at", type=int, default=500,
                   help="N for the HIP-3 scenarios (nearest measured N; default 500; 0: none)")
    p.add_argument("--naive-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--api-url", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.naive_worker:
        return args
    args.sizes = [int(x) for x in (args.accounts or ("50,100" if args.quick else "100,500,2000")).split(",") if x.strip()]
    if not args.sizes or min(args.sizes) < 1:
        p.error("--accounts: expected positive whole numbers, e.g. 100,500,2000")
    args.runs = args.runs or (2 if args.quick else 3)
    args.default_budget = (DEFAULT_WEIGHT_BUDGET, "the planned default budget")
    if args.weight_budget is None and os.environ.get("MONITOR_WEIGHT_BUDGET", "").strip():
        try:
            args.weight_budget = int(os.environ["MONITOR_WEIGHT_BUDGET"])
        except ValueError:
            p.error("MONITOR_WEIGHT_BUDGET: expected a whole number")
    if not (0 <= args.resized < 1 and 0 <= args.closed < 1 and 0 < args.resized + args.closed < 1):
        p.error("--resized, --closed: expected fractions between 0 and 1 (together above 0, below 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.naive_worker:
        return naive_worker(args.database_url, args.api_url)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    url = args.database_url or os.environ.get("MONITOR_TEST_DATABASE_URL") or None
    sizes = sorted(set(args.sizes))
    naive_n = min(sizes, key=lambda n: (abs(n - args.naive_at), n))
    sql_n = naive_n if args.sql_check_positions != args.positions else None
    workdir = Path(tempfile.mkdtemp(prefix="pm-bench-"))
    workdir.chmod(0o755)
    pg = sim = None
    nagle = source_note = ""
    scenarios: list[Scenario] = []
    started = time.monotonic()
    try:
        source_note = use_source(args.rev, workdir)
        args.default_budget = runner_default_budget()  # now, while the measured source is on sys.path
        args.read_parallelism = runner_read_parallelism()
        pg = Postgres(url)
        nagle = no_nagle(args.raw_simulator)
        from hlsim import start

        sim = start(latency_ms=args.latency_ms)
        git = git_state()
        print("position-monitor benchmark")
        print(f"  sizes {sizes} accounts x {args.positions} positions; {args.runs} steady runs; simulator latency "
              f"{args.latency_ms:g} ms/request; {os.cpu_count()} CPUs")
        print(f"  PostgreSQL {pg.version} ({'embedded' if pg.embedded else 'given URL'}); simulator {sim.url}")
        print(f"  {nagle}")
        print("  load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        print(f"  {source_note}")
        print(f"  git {git['head']}" + (f", monitor/ has uncommitted changes: {', '.join(git['dirty_monitor_files'])}"
                                         if git["dirty_monitor_files"] else ", monitor/ clean"))
        bench = Bench(args, pg, sim, workdir)
        if bench.passthrough or args.weight_budget is not None:
            shown = dict(bench.passthrough)
            if args.weight_budget is not None:
                shown["MONITOR_WEIGHT_BUDGET"] = str(args.weight_budget)
            print("  passed to the CLI: " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
        print("  wall: outside the process, median; requests/weight: simulator log; SQL: the CLI's sql_statements, "
              f"cross-check {pg.sql_check_method}; RSS: {RSS_METHOD}")

        scenarios.append(bench.run_noop(args.runs))
        for n in sizes:
            scenarios.extend(bench.run_size(n, args.positions, args.runs,
                                            naive_runs=args.runs if n == naive_n else 0, change=True))
        if sql_n is not None:
            scenarios.extend(bench.run_size(sql_n, args.sql_check_positions, args.runs, naive_runs=0, change=False))
        if args.hip3_at:
            hip3_n = min(sizes, key=lambda n: (abs(n - args.hip3_at), n))
            scenarios.extend(bench.run_hip3(hip3_n, args.positions, args.runs))
    except KeyboardInterrupt:
        print("\ninterrupted: reporting what was measured", file=sys.stderr)
    finally:
        kill_current_child()
        if sim is not None:
            sim.stop()
        if pg is not None:
            pg.close()
        shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - started
    load = os.getloadavg()
    print(f"\n== Results ({elapsed:.0f} s in all; simulator latency {args.latency_ms:g} ms; load average at the end "
          + " ".join(f"{x:.2f}" for x in load) + ")\n")
    print_table(scenarios)
    notes = [(sc, n) for sc in scenarios for n in sc.notes]
    if notes:
        print("\nNotes:")
        for sc, note in notes:
            print(f"  {sc.accounts}x{sc.positions} {sc.name}: {note}")
    print("\nRequests by type (median run):")
    for sc in scenarios:
        if sc.runs:
            mid = sorted(sc.runs, key=lambda r: r.wall)[len(sc.runs) // 2]
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(mid.by_type.items())) or "none"
            print(f"  {sc.accounts}x{sc.positions} {sc.name}: {kinds}")

    pgc = "pg_stat_statements calls" if pg is not None and pg.pgss else "pg_stat_database transactions"
    print(f"\n('SQL statements' is the CLI's own count; 'pg xacts' is {pgc} in the run's database: an autocommit "
          "statement is one, a BEGIN..COMMIT block is one however many statements it holds)")
    all_window = max_window_weight(bench.all_entries) if scenarios else 0
    results = targets(args, scenarios, sizes, naive_n, sql_n, all_window) if scenarios else []
    print("\n== Targets\n")
    for t in results:
        print(f"  {t['result']:<4}  {t['target']}: {t['detail']}")
    if args.json_out:
        payload = {
            "settings": {"sizes": sizes, "positions": args.positions, "runs": args.runs, "latency_ms": args.latency_ms,
                         "resized": args.resized, "closed": args.closed, "naive_at": naive_n, "sql_check_positions": args.sql_check_positions,
                         "weight_budget": args.weight_budget, "cpus": os.cpu_count()},
            "methods": {"wall": "perf_counter around spawn..reap, median", "requests": "simulator request log",
                        "sql_cross_check": pg.sql_check_method if pg else None,
                        "rss": RSS_METHOD},
            "simulator_sockets": nagle, "source": source_note, "git": git_state(), "elapsed_seconds": round(elapsed, 1), "load_average_at_end": load, "max_60s_window_all_runs": all_window,
            "scenarios": [sc.to_json() for sc in scenarios], "targets": results,
        }
        Path(args.json_out).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nfigures saved to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
