"""One run: take the lock, read every account, plan, apply (or print), report.

This module orchestrates; SQL lives in ``database``, HTTP in ``exchange``, the decisions in
``planner``, the apply phase in ``applying`` (batched fenced transactions): one account's fault never
aborts another's, and a run whose lock was taken over writes nothing more.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

from monitor import planner
from monitor.applying import AppliedAccount, apply_plans
from monitor.clock import Clock, to_ms
from monitor.config import Settings
from monitor.database import Database, connect, embedded_database_url
from monitor.errors import (
    EXIT_ACCOUNT_FAILED,
    EXIT_LOCK_HELD,
    EXIT_OK,
    DatabaseError,
    DatabaseUnavailable,
    Fenced,
    UsageError,
)
from monitor.closing import CloseContext, Closer, followup_json
from monitor.exit_budget import CACHE_TTL, ExitReserve, exit_reserve, signer_address
from monitor.exchange import (BudgetExhausted, Exchange, FillsCache, FillsTruncated, ReadFailed, RequestCounter,
                              WeightBudget)
from monitor.lock import LocalRunLock, PostgresRunLock, RunLock, machine_identity, process_start_time
from monitor.models import Account, AccountSnapshot, PositionRow
from monitor.planner import AccountPlan, Action, PlanSettings

log = logging.getLogger(__name__)

RATE_LIMIT_BACKOFF = 0.5  # seconds before the first retry of a 429; doubled each time


@dataclass
class RunReport:
    run_id: str
    dry_run: bool
    epoch: int | None = None
    discovered: int = 0
    updated: int = 0
    closed: int = 0
    conflicts: int = 0
    close_orders_sent: int = 0
    would_close: int = 0
    accounts_ok: int = 0
    accounts_failed: int = 0
    accounts_deferred: int = 0
    exit_reserved: int = 0
    exit_starved: int = 0
    actions: list[Action] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    deferred_accounts: list[str] = field(default_factory=list)
    held_by_other_runs: list[dict[str, Any]] = field(default_factory=list)  # deferred: claimed by a live run
    notes: list[str] = field(default_factory=list)
    followups: list[dict[str, Any]] = field(default_factory=list)  # follow-ups worked (or listed) this run
    overrun: bool = False
    fenced: bool = False
    requests: int = 0
    api_weight: int = 0
    sql_statements: int = 0
    duration_seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        if self.fenced:
            return EXIT_LOCK_HELD
        return EXIT_ACCOUNT_FAILED if self.accounts_failed else EXIT_OK

    @property
    def changed(self) -> bool:
        return bool(self.discovered or self.updated or self.closed or self.close_orders_sent or self.failures
                    or self.exit_starved)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "epoch": self.epoch,
            "discovered": self.discovered,
            "updated": self.updated,
            "closed": self.closed,
            "conflicts": self.conflicts,
            "close_orders_sent": self.close_orders_sent,
            "would_close": self.would_close,
            "accounts_ok": self.accounts_ok,
            "accounts_failed": self.accounts_failed,
            "accounts_deferred": self.accounts_deferred,
            "exit_reserved": self.exit_reserved,
            "exit_starved": self.exit_starved,
            "failures": self.failures,
            "deferred_accounts": self.deferred_accounts,
            "held_by_other_runs": self.held_by_other_runs,
            "notes": self.notes,
            "followups": self.followups,
            "overrun": self.overrun,
            "requests": self.requests,
            "api_weight": self.api_weight,
            "sql_statements": self.sql_statements,
            "duration_seconds": round(self.duration_seconds, 3),
            "exit_code": self.exit_code,
            "actions": [a.to_json() for a in self.actions],
        }

    def summary_line(self) -> str:
        parts = [f"{self.discovered} discovered", f"{self.updated} updated", f"{self.closed} closed"]
        if self.close_orders_sent:
            parts.append(f"{self.close_orders_sent} close orders sent")
        if self.would_close:
            parts.append(f"{self.would_close} would close on the exchange")
        if self.conflicts:
            parts.append(f"{self.conflicts} already handled by another writer")
        if self.exit_starved:
            parts.append(f"{self.exit_starved} with exit work starved of API weight")
        accounts = f"{self.accounts_ok} accounts read"
        if self.accounts_failed:
            accounts += f", {self.accounts_failed} failed"
        if self.accounts_deferred:
            accounts += f", {self.accounts_deferred} deferred"
        head = "dry run (nothing written or sent): " if self.dry_run else ""
        tail = " (overran its deadline)" if self.overrun else ""
        return f"{head}{', '.join(parts)}; {accounts}{tail}"


def database_url(settings: Settings) -> tuple[str, bool]:
    """The database URL to use, and whether it is the embedded server."""
    if settings.database_url:
        return settings.database_url, False
    return embedded_database_url(settings.data_dir), True


def open_database(settings: Settings) -> tuple[Database, bool]:
    url, embedded = database_url(settings)
    return Database(connect(url), lease_name=settings.lease_name), embedded


def make_lock(settings: Settings) -> RunLock:
    if settings.lock_backend == "postgres":
        url, _ = database_url(settings)
        lease_name = settings.lease_name
        return PostgresRunLock(lambda: Database(connect(url), lease_name=lease_name),
                               stale_after=settings.lock_stale_after, host=settings.host_id)
    return LocalRunLock(settings.effective_lock_file, stale_after=settings.lock_stale_after,
                        database_factory=lambda: open_database(settings)[0])


def in_shard(address: str, shard: tuple[int, int] | None) -> bool:
    """Stable assignment of an account to shard K of N (a hash of its address, not Python's hash())."""
    if shard is None:
        return True
    k, n = shard
    digest = hashlib.sha256(address.lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") % n == k - 1


def plan_settings(settings: Settings) -> PlanSettings:
    return PlanSettings(
        close_grace=timedelta(seconds=settings.close_grace_seconds),
        reopen_guard=timedelta(seconds=settings.reopen_guard_seconds),
    )


class Run:
    """A single run of the monitor. ``execute`` returns the report; it raises only for run-wide faults."""

    def __init__(self, settings: Settings, *, dry_run: bool = False, addresses: Sequence[str] = (),
                 clock: Clock | None = None,
                 exchange_factory: Callable[[RequestCounter, "WeightBudget"], Exchange] | None = None) -> None:
        self.settings = settings
        self.dry_run = dry_run
        self.addresses = list(addresses)
        self.clock = clock or Clock()
        self.fills_cache = FillsCache()  # an account's fills, read again after a close order, cost one request
        self.exchange_factory = exchange_factory or (
            lambda counter, budget: Exchange(settings.hl_api_url, timeout=settings.http_timeout, counter=counter,
                                             before_request=budget.take, fills_cache=self.fills_cache))
        self.lock = make_lock(settings)
        self.report = RunReport(run_id=self.lock.run_id, dry_run=dry_run)
        self.db: Database | None = None
        self.started = self.clock.monotonic()
        self.epoch: int | None = None
        self.ok_ids: list[int] = []
        self.crashed: int | None = None  # the exit code of a run stopped by an exception
        self.failed_ids: dict[int, str] = {}
        self.claimed = False  # whether this run claimed accounts (released at the end)
        self.reserve = ExitReserve()  # the weight held back for this run's exit work
        self.progress: Callable[[int, int], None] | None = None
        self.on_locked: Callable[[], object] | None = None  # e.g. the dead-man's-switch "start" ping
        self.followups: dict[int, list[Any]] = {}  # pending follow-ups by account id (see _process)

    # -- the run ----------------------------------------------------------------------------

    def execute(self) -> RunReport:
        # The lock comes first. With the PostgreSQL backend the lock lives in the database, so the
        # database (and its schema) must be reachable before it can be taken.
        if isinstance(self.lock, PostgresRunLock):
            self._open_database()
            try:
                self.lock.acquire()
            except BaseException:
                self._close_database()
                raise
        else:
            self.lock.acquire()
        try:
            if self.on_locked is not None:
                self.on_locked()
            if self.lock.took_over:
                self.report.notes.append(self.lock.took_over)
            if self.db is None:
                self._open_database()
            self._start_epoch()
            self.db.start_run(run_id=self.report.run_id, host=self.settings.host_id, pid=os.getpid(),
                              epoch=self.epoch, dry_run=self.dry_run)
            self._process()
        except Fenced as exc:
            self.report.fenced = True
            self.report.notes.append(exc.message)
        except BaseException as exc:
            # Recorded in the run history as what it is, never as a success.
            self.crashed = getattr(exc, "exit_code", 70)
            self.report.notes.append(f"run stopped: {getattr(exc, 'message', type(exc).__name__)}")
            raise
        finally:
            self.report.duration_seconds = self.clock.monotonic() - self.started
            self._close_database()
            self.lock.release()
        return self.report

    def _open_database(self) -> None:
        db, embedded = open_database(self.settings)
        self.db = db
        try:
            if embedded:
                db.migrate()  # the embedded default keeps itself current
            else:
                db.require_current_schema()
        except BaseException:
            self._close_database()
            raise

    def _record(self) -> None:
        """Run history and per-account read health, before the connection closes."""
        db, report = self.db, self.report
        if db is None or self.epoch is None:
            return
        counts = {"discovered": report.discovered, "updated": report.updated, "closed": report.closed,
                  "conflicts": report.conflicts, "close_orders_sent": report.close_orders_sent,
                  "would_close": report.would_close, "deferred": report.accounts_deferred,
                  "api_weight": report.api_weight}
        if not self.dry_run and not report.fenced:
            # Fenced, and before the lock is released: a superseded run must not overwrite the read
            # health its successor recorded. Its own monitor_runs row below is written regardless.
            try:
                with db.fenced(self.epoch):
                    db.record_account_health(self.ok_ids, self.failed_ids)
            except Fenced as exc:
                report.fenced = True
                report.notes.append(f"account health not recorded: {exc.message}")
            except (DatabaseUnavailable, DatabaseError) as exc:
                log.warning("could not record account health: %s", getattr(exc, "message", type(exc).__name__))
        try:
            if self.crashed is not None or report.fenced:
                summary = report.notes[-1] if report.notes else None
            else:
                summary = "; ".join(f"{f['account']}: {f['reason']}" for f in report.failures[:3]) or None
            if self.claimed:
                db.release_claims()
            db.finish_run(run_id=report.run_id, counts=counts, accounts_failed=report.accounts_failed,
                          exit_code=report.exit_code if self.crashed is None else self.crashed,
                          error_summary=summary)
        except (DatabaseUnavailable, DatabaseError) as exc:
            # History is worth keeping but never worth failing a run that did its work.
            log.warning("could not record the run's history: %s", getattr(exc, "message", type(exc).__name__))

    def _close_database(self) -> None:
        if self.db is not None:
            self._record()
            self.report.sql_statements = self.db.statements
            self.db.close()
            self.db = None

    def _start_epoch(self) -> None:
        db = self.db
        assert db is not None
        if isinstance(self.lock, PostgresRunLock):
            epoch = self.lock.epoch
            db.run_id, db.epoch = self.lock.run_id, epoch
        else:
            start = process_start_time(os.getpid())
            epoch = db.advance_epoch(run_id=self.lock.run_id, host=self.settings.host_id, pid=os.getpid(),
                                     start=None if start is None else str(start),
                                     stale_after=self.settings.lock_stale_after, machine=machine_identity())
        self.epoch = epoch
        self.report.epoch = epoch

    def _accounts(self) -> list[Account]:
        assert self.db is not None
        if not self.addresses:
            return [a for a in self.db.list_accounts(active_only=True) if in_shard(a.address, self.settings.shard)]
        found = self.db.list_accounts(addresses=self.addresses)
        missing = sorted(set(self.addresses) - {a.address for a in found})
        if missing:
            raise UsageError(f"not a watched account: {missing[0]} (add it with `position-monitor accounts add`)")
        return [a for a in found if a.active] or found

    def past_deadline(self) -> bool:
        return self.clock.monotonic() - self.started >= self.settings.deadline_seconds

    def _process(self) -> None:
        assert self.db is not None
        accounts = self._accounts()
        if not accounts:
            return  # a no-op run touches neither the exchange nor the SDK
        accounts = self._claim(accounts)
        if not accounts:
            return
        now = self.clock.now()
        ids = [a.id for a in accounts]
        rows_by_account = self.db.open_rows_by_account(ids)
        recent_by_account = self.db.recently_closed_by_account(
            ids, now - timedelta(seconds=self.settings.reopen_guard_seconds))
        last_reads = self.db.last_good_reads(ids)
        if self.dry_run or self.settings.secret_key:  # without a key nothing could work them
            self.followups = self.db.pending_followups(ids)
        self.budget = WeightBudget(self.settings.weight_budget)
        counter = RequestCounter()
        exchange = self.exchange_factory(counter, self.budget)
        try:
            mids = self._read_mids(exchange, accounts, rows_by_account)
            # Exit work first: what it will cost is held back before the reads spend the budget.
            self.reserve = self._reserve_exit_work(accounts, rows_by_account, mids, now)
            accounts = self._by_urgency(accounts, rows_by_account, last_reads, self.reserve.urgent_accounts)
            settings = plan_settings(self.settings)
            results = self._read_all(accounts, rows_by_account, recent_by_account, settings, mids, counter)
            self.budget.open_reserve()  # the closes draw from it, and from whatever the reads left
            self._apply_all(results, exchange, mids)
            self._keep_followup_alerts(accounts)
        finally:
            self.report.requests = counter.requests
            self.report.api_weight = counter.weight

    def _keep_followup_alerts(self, accounts: list[Account]) -> None:
        """A follow-up past MONITOR_MAX_CLOSE_FAILURES that this run did not get to (its account deferred
        or unread) keeps its alert: it is reported as it stands, not silently resolved."""
        worked = {f["id"] for f in self.report.followups}
        by_id = {a.id: a for a in accounts}
        for account_id, pending in self.followups.items():
            for followup in pending:
                if followup.id not in worked and followup.attempts >= self.settings.max_close_failures:
                    self.report.followups.append(followup_json(by_id[account_id], followup, "pending", alert=True,
                                                               reason="not worked this run"))

    def _claim(self, accounts: list[Account]) -> list[Account]:
        """Claim every account of the run in one statement, before anything is read; an account another
        live run holds (whatever its lock or shard) is deferred, naming that run."""
        assert self.db is not None
        self.claimed = True
        won = self.db.claim_accounts([a.id for a in accounts], stale_after=self.settings.lock_stale_after)
        held = [a for a in accounts if a.id not in won]
        if held:
            holders = self.db.claim_holders([a.id for a in held])
            by_holder: dict[tuple[Any, ...], int] = {}
            for account in held:
                h = holders.get(account.id, {})
                self.report.held_by_other_runs.append({"account": account.address, "run_id": h.get("run_id"),
                                                       "lease": h.get("lease"), "epoch": h.get("epoch")})
                key = (h.get("run_id"), h.get("lease"), h.get("epoch"))
                by_holder[key] = by_holder.get(key, 0) + 1
            self.report.deferred_accounts.extend(a.address for a in held)
            self.report.accounts_deferred += len(held)
            for (run_id, lease, epoch), count in by_holder.items():
                self.report.notes.append(f"{count} account(s) claimed by another run (run {run_id}, lock {lease},"
                                         f" epoch {epoch}): deferred to the next run")
        return [a for a in accounts if a.id in won]

    def _with_claim(self, checked: "ClaimCheckedDatabase", account: Account, work: Callable[[], object]) -> None:
        """Closer work for one account: its writes check the account's claim; a spent budget is reported."""
        checked.account_id = account.id
        try:
            work()
        except BudgetExhausted as exc:
            self._exit_starved(f"{account.address}: exit work starved of weight ({exc});"
                               " closes wait for the next run")
        finally:
            checked.account_id = None

    def _reserve_exit_work(self, accounts: list[Account], rows_by_account: dict[int, list[PositionRow]],
                           mids: dict[str, Any], now: Any) -> ExitReserve:
        """Hold back from the reads the weight this run's exit work needs (see monitor/exit_budget.py)."""
        assert self.db is not None
        can_send = self.settings.secret_key is not None and not self.dry_run
        pending = {account_id: len(items) for account_id, items in self.followups.items()}
        estimate = exit_reserve(accounts, rows_by_account, mids, now, budget=self.settings.weight_budget,
                                can_send=can_send, pending_cancels=pending)
        if can_send and estimate.firing:  # only then is the cache worth a look: a quiet run costs no SQL
            signer = signer_address(self.settings.secret_key)
            roles = self.db.cached_roles(signer, CACHE_TTL)
            key = roles.get(signer)
            master = None if key is None else key[1] if key[0] == "agent" else signer
            estimate = exit_reserve(accounts, rows_by_account, mids, now, budget=self.settings.weight_budget,
                                    can_send=can_send, meta_cached=self.db.cached_meta("", CACHE_TTL) is not None,
                                    key_master=master, cached_accounts=set(roles), pending_cancels=pending)
        estimate.weight = self.budget.hold(estimate.weight)
        self.report.exit_reserved = estimate.weight
        if estimate.weight:
            log.info(estimate.describe())
        return estimate

    @staticmethod
    def _by_urgency(accounts: list[Account], rows_by_account: dict[int, list[PositionRow]],
                    last_reads: dict[int, Any], exit_work: Any = frozenset()) -> list[Account]:
        """Most urgent first: exit work this run (a rule firing, a close to settle), then rows with exit
        rules, then open rows, then the least recently read."""
        def rank(account: Account) -> tuple[int, float]:
            rows = rows_by_account.get(account.id, [])
            ruled = any(r.stop_loss_price is not None or r.take_profit_price is not None
                        or r.trailing_stop_pct is not None or r.close_requested_at is not None
                        or r.status == "closing" for r in rows)
            last = last_reads.get(account.id)
            return (-1 if account.id in exit_work else 0 if ruled else 1 if rows else 2,
                    last.timestamp() if last else 0.0)
        return sorted(accounts, key=rank)

    def _read_all(self, accounts: list[Account], rows_by_account: dict[int, list[PositionRow]],
                  recent_by_account: dict[int, list[PositionRow]], settings: PlanSettings,
                  mids: dict[str, Any], counter: RequestCounter) -> list["AccountResult"]:
        """Read and plan every account, up to ``read_parallelism`` at a time (one HTTP session per worker)."""
        local = threading.local()

        def work(account: Account) -> AccountResult:
            if self.lock.compromised.is_set() or self.past_deadline():
                return AccountResult(account, deferred="deadline")
            exchange = getattr(local, "exchange", None)
            if exchange is None:
                exchange = local.exchange = self.exchange_factory(counter, self.budget)
            with self.budget.urgent(account.id in self.reserve.urgent_accounts):  # its reads are in the reserve
                return self._plan_one(exchange, account, rows_by_account.get(account.id, []),
                                      recent_by_account.get(account.id, []), settings, mids)

        results: list[AccountResult] = []
        workers = max(1, min(self.settings.read_parallelism, len(accounts)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read") as pool:
            for index, result in enumerate(pool.map(work, accounts)):
                results.append(result)
                if self.progress is not None:
                    self.progress(index + 1, len(accounts))
        return results

    def _apply_all(self, results: list["AccountResult"], exchange: Exchange, mids: dict[str, Any]) -> None:
        """Apply the plans one account at a time, on this thread's single database connection."""
        assert self.db is not None
        checked = ClaimCheckedDatabase(self.db)
        closer = Closer(CloseContext(
            db=checked, epoch=self.epoch, exchange=exchange, clock=self.clock, secret_key=self.settings.secret_key,
            dry_run=self.dry_run, slippage=self.settings.close_slippage, max_failures=self.settings.max_close_failures,
            seconds_left=lambda: self.settings.deadline_seconds - (self.clock.monotonic() - self.started),
            mids=mids, report=self.report, lock_lost=self.lock.compromised.is_set,
            plan_settings=plan_settings(self.settings)))
        seen_ids: list[int] = []
        deferred: list[str] = []
        later: list[tuple[Account, list[Action], dict[str, int | None], Any, list[Any]]] = []
        applied: dict[int, AppliedAccount] = {}
        if not self.dry_run and not self.lock.compromised.is_set():
            # Every plan's changes at once, in a few batched transactions (monitor/applying.py).
            plans = [r.plan for r in results if not r.deferred and r.plan is not None and r.plan.changes]
            applied = {outcome.account.id: outcome for outcome in apply_plans(
                self.db, self.epoch, plans, now=self.clock.now(), record_followups=bool(self.settings.secret_key))}
        for result in results:
            account = result.account
            if result.deferred:
                deferred.append(account.address)
                continue
            if result.failure is not None:
                self._fail(account, result.failure)
            if result.plan is None:
                continue
            if result.failure is None:
                self.report.accounts_ok += 1
                self.ok_ids.append(account.id)
            plan = result.plan
            self.report.actions.extend(plan.actions)
            seen_ids.extend(plan.seen_ids)
            closed = self._applied(applied.pop(account.id)) if account.id in applied else []
            if self.lock.compromised.is_set():
                for outcome in applied.values():  # written before the loss was seen: counted all the same
                    self._applied(outcome)
                self.report.fenced = True
                self.report.notes.append("lock lost (taken over or cleared): stopping without writing more")
                break
            if self.dry_run:
                self._count_planned(plan)
                closed = [a for a in plan.actions if a.type == planner.CLOSE]
            # Orders left by a closed position: not for a coin that flipped (its new position's orders
            # stay), and only orders placed before the close (see Closer._cancel_orphans).
            # (a re-open after a close keeps only its own orders: those placed after the close)
            reopened = {a.coin for a in plan.actions if a.type == planner.DISCOVER and "flipped_from" in a.metadata}
            closed_coins = {a.coin: to_ms(a.closed_at) if a.closed_at else None
                            for a in closed if a.coin not in reopened}
            fired = [a for a in plan.actions if a.type == planner.CLOSE_ORDER]
            settles = [a for a in plan.actions if a.type == planner.SETTLE_CLOSE]
            if not (self.dry_run or self.settings.secret_key):
                closed_coins = {}  # no key: nothing could cancel orphaned orders, so do not read them
            pending = self.followups.get(account.id, [])  # retried every run until done or moot
            if fired:
                # Fired rules' orders go out first, every account's before any account's settling reads
                # and cancels, so the weight left is spent on the orders (their fills are read after).
                self._with_claim(checked, account, lambda: closer.send_orders(account, fired))
            if fired or settles or closed_coins or pending:
                later.append((account, settles, closed_coins, result.open_orders, pending))
        for account, settles, closed_coins, open_orders, pending in later:
            if self.lock.compromised.is_set():
                break
            self._with_claim(checked, account, lambda: closer.handle(
                account, settles, closed_coins, open_orders=open_orders, followups=pending))
        urgent = self.reserve.urgent_accounts
        for result in results:
            if result.deferred == "budget" and result.account.id in urgent:
                self._exit_starved(f"{result.account.address}: exit work starved: not read (weight budget spent)"
                                   " although an exit rule fires or a close is to settle; next run")
        if deferred:
            self.report.accounts_deferred += len(deferred)
            self.report.deferred_accounts.extend(deferred)
            why = "deadline" if self.past_deadline() else "weight budget"
            if why == "deadline":
                self.report.overrun = True
                self.report.notes.append(f"deadline reached: {len(deferred)} account(s) left for the next run")
            else:
                self.report.notes.append(f"weight budget ({self.settings.weight_budget}/run) spent:"
                                         f" {len(deferred)} account(s) deferred, least urgent first")
        if seen_ids and not self.dry_run and not self.report.fenced:
            with self.db.fenced(self.epoch):
                self.db.touch_seen(seen_ids, self.clock.now(), claimed_epoch=self.epoch)

    def _read_mids(self, exchange: Exchange, accounts: list[Account],
                   rows_by_account: dict[int, list[PositionRow]]) -> dict[str, Any]:
        """allMids, once per run, only when some open row has an exit rule (its order is priced off the mid)."""
        held_too_long = {a.id for a in accounts if a.max_hold_seconds is not None}
        if not any(r.stop_loss_price is not None or r.take_profit_price is not None or r.trailing_stop_pct is not None
                   or r.close_requested_at is not None or r.max_hold_seconds is not None
                   or (account_id in held_too_long)
                   for account_id, rows in rows_by_account.items() for r in rows):
            return {}
        try:
            return exchange.read_mids()
        except (ReadFailed, BudgetExhausted) as exc:
            self.report.notes.append(f"mid prices unreadable ({exc}); exit rules skipped this run")
            return {}

    def _exit_starved(self, note: str) -> None:
        """Exit work that could not get weight: a note, and the `exit_starved` alert (never a silent run)."""
        log.info(note)  # the note itself reaches stderr (and the alert); no second line
        self.report.exit_starved += 1
        self.report.notes.append(note)

    def _fail(self, account: Account, reason: str) -> None:
        log.warning("account %s: %s", account.address, reason)
        self.report.accounts_failed += 1
        self.report.failures.append({"account": account.address, "reason": reason})
        self.failed_ids[account.id] = reason[:200]

    def _plan_one(self, exchange: Exchange, account: Account, rows: list[PositionRow],
                  recent: list[PositionRow], settings: PlanSettings, mids: dict[str, Any]) -> "AccountResult":
        """Read one account and plan it (runs on a worker thread: touches no shared state but the budget)."""
        try:
            snapshot = self._read_positions(exchange, account.address)
            now = self.clock.now()
            if not snapshot.positions and any(now - r.opened_at >= settings.close_grace for r in rows):
                # An empty answer for an account with open rows: read once more before believing it.
                try:
                    snapshot = self._read_positions(exchange, account.address)
                except ReadFailed as exc:
                    return AccountResult(account, failure=f"confirming an empty account: {exc}")
            fills = None
            fills_error = None
            truncated = False
            verify_rules = self.dry_run or self.settings.secret_key is not None  # an order could be sent
            since = planner.needs_fills(snapshot, rows, recent, now, settings, mids=mids,
                                        account_max_hold=account.max_hold_seconds, verify_rules=verify_rules)
            if since is not None:
                try:
                    fills = exchange.read_fills(account.address, since)
                except FillsTruncated as exc:
                    fills, truncated, fills_error = exc.fills, True, str(exc)
                except ReadFailed as exc:
                    fills_error = str(exc)
        except ReadFailed as exc:
            return AccountResult(account, failure=str(exc))
        except BudgetExhausted:
            return AccountResult(account, deferred="budget")
        plan = planner.plan_account(account, snapshot, rows, now, settings, fills=fills, fills_error=fills_error,
                                    fills_truncated=truncated, recently_closed=recent, mids=mids,
                                    verify_rules=verify_rules, fills_from_ms=since)
        open_orders = None
        can_act = self.dry_run or self.settings.secret_key is not None  # list them, or cancel them
        if can_act and any(a.type == planner.CLOSE for a in plan.actions):
            # Orders a closed position may leave behind, read here in parallel rather than one by one later.
            try:
                open_orders = exchange.read_open_orders(account.address)
            except (ReadFailed, BudgetExhausted):
                open_orders = None  # the closer reads them itself, or notes it could not
        # A history longer than the exchange keeps is not a failure of this run: it will not get better.
        return AccountResult(account, plan=plan, failure=None if truncated else fills_error, open_orders=open_orders)

    def _read_positions(self, exchange: Exchange, address: str) -> Any:
        """clearinghouseState, retried on 429 with backoff while the deadline allows."""
        for attempt in range(3):
            try:
                return exchange.read_positions(address)
            except ReadFailed as exc:
                wait = RATE_LIMIT_BACKOFF * (2 ** attempt)
                if not exc.rate_limited or attempt == 2 or self.settings.deadline_seconds - (
                        self.clock.monotonic() - self.started) < wait + 1:
                    raise
                log.info("%s: rate limited, retrying in %.1fs", address, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _count_planned(self, plan: AccountPlan) -> None:
        for action in plan.actions:
            self._count(action.type)

    def _count(self, kind: str) -> None:
        if kind == planner.DISCOVER:
            self.report.discovered += 1
        elif kind == planner.UPDATE:
            self.report.updated += 1
        elif kind == planner.CLOSE:
            self.report.closed += 1

    def _applied(self, outcome: AppliedAccount) -> list[Action]:
        """Count what the apply phase did for one account; returns the close actions it applied."""
        account = outcome.account
        self.report.conflicts += outcome.conflicts
        if outcome.failure is not None:
            if account.id in self.ok_ids:
                self.ok_ids.remove(account.id)
                self.report.accounts_ok -= 1
            if account.id not in self.failed_ids:
                self._fail(account, outcome.failure)
            return []
        for action in outcome.applied:
            self._count(action.type)
        return [a for a in outcome.applied if a.type == planner.CLOSE]


class ClaimCheckedDatabase:
    """The run's Database as the closer sees it: each ``fenced()`` transaction also holds and checks this
    run's claim on the account being handled (``account_id``), so a run whose claim on that account was
    taken over writes nothing more for it. Everything else is the Database itself."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.account_id: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    @contextmanager
    def fenced(self, epoch: int) -> Iterator[None]:
        with self._db.fenced(epoch):
            if self.account_id is not None:
                self._db.require_claim(self.account_id, epoch)
            yield


@dataclass
class AccountResult:
    """What the read phase produced for one account."""

    account: Account
    plan: AccountPlan | None = None
    failure: str | None = None
    deferred: str | None = None
    open_orders: list[Any] | None = None
