"""One run, top to bottom in ``run_once`` (docs/design.md, "How a run works").

setup (lock, database, epoch, history) -> inputs -> read and plan -> apply -> exits -> report. Each phase
is a function from values to values; the report is built once, from their results. SQL lives in
``database``, HTTP in ``exchange``, the decisions in ``planner``, exchange writes in ``closing``. Every
write is fenced: one account's fault never aborts another's, and a run whose lock was taken over writes
nothing more (``RunContext.stopped``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

from monitor import applying, planner, signals
from monitor.clock import CLOCK_OFFSET_ALERT_MS, Clock, ExchangeClock, to_ms
from monitor.closing import CloseContext, CloseOutcome, Closer, KnownFills, attach_funding, followup_json
from monitor.config import Settings
from monitor.database import Database, Followup, connect, embedded_database_url
from monitor.dexes import DexReads, cursor_after, plan_dex_reads, reads_every_dex, watched_dexes
from monitor.errors import ConfigError, DatabaseError, DatabaseUnavailable, Fenced, UsageError, exit_code_for
from monitor.exchange import (
    FILLS_MAX_READ_SHARE,
    BudgetExhausted,
    Exchange,
    FillsCache,
    FillsTruncated,
    OpenOrder,
    ReadFailed,
    RequestCounter,
    WeightBudget,
)
from monitor.exit_budget import (
    CACHE_TTL,
    REFUSAL_CACHE_TTL,
    ExitReserve,
    blocked_by_roles,
    exit_reserve,
    signer_address,
)
from monitor.hedges import HedgeGroup, HedgeResult, in_scope, listed_coins, outside_legs
from monitor.hedges import evaluate as evaluate_hedges
from monitor.lock import (
    LocalRunLock,
    NonceSource,
    PostgresRunLock,
    RunLock,
    machine_identity,
    process_is,
    process_start_time,
)
from monitor.models import MAIN_DEX, Account, AccountSnapshot, PositionRow, dex_of, key_master
from monitor.planner import AccountPlan, Action, PlanSettings
from monitor.report import Alert, RunReport

log = logging.getLogger(__name__)

SIGNAL_POLL_SECONDS = 0.1  # how often the read phase's wait looks for a stop request
RATE_LIMIT_BACKOFF = 0.5  # seconds before the first retry of a 429; doubled each time
LOCK_LOST = "lock lost (taken over or cleared): stopping without writing more"

ExchangeFactory = Callable[[RequestCounter, WeightBudget], Exchange]


# ---- the run ------------------------------------------------------------------------------------


def run_once(settings: Settings, *, dry_run: bool = False, addresses: Sequence[str] = (),
             clock: Clock | None = None, hooks: RunHooks | None = None,
             exchange_factory: ExchangeFactory | None = None) -> RunReport:
    """One run of the monitor, as docs/design.md's "How a run works" tells it. Returns the report; raises only
    for run-wide faults (lock held, database down, a bug), after recording the run as what it is."""
    with setup(settings, dry_run=dry_run, clock=clock or Clock(), hooks=hooks or RunHooks(),
               exchange_factory=exchange_factory) as run:
        inputs = run.inputs = load_inputs(run, addresses)  # accounts claimed, their rows, pending follow-ups
        reads = run.reads = read_accounts(run, inputs)  # mids, the exit reserve, positions and fills, plans
        applied = run.applied = apply_plans(run, reads)  # the plans' changes, in fenced transactions
        exits = work_exits(run, inputs, reads, applied)  # fired rules' orders, settles, orphan cancels
        mark_seen(run, reads)  # last_seen_at of the rows the snapshot confirmed
        advance_sweep(run, reads, named=bool(addresses))  # the HIP-3 dex sweep's cursor, past what it read
        hedges = check_hedges(run, inputs, reads)  # hedge groups' nets from the snapshots read, recorded
        run.report = build_report(run, inputs, reads, applied, exits, hedges)
    assert run.report is not None
    return run.report


@dataclass
class RunHooks:
    """What the caller hears while a run goes: its id (before the lock), the lock taken, read progress."""

    on_start: Callable[[str], object] | None = None
    on_locked: Callable[[], object] | None = None
    progress: Callable[[int, int], None] | None = None
    # The run as recorded (its report and the exit code in monitor_runs), once its lock is released.
    on_finished: Callable[[RunReport, int], object] | None = None


@dataclass
class RunContext:
    """What setup fixed for the whole run. ``stopped`` says why the run must write nothing more."""

    settings: Settings
    dry_run: bool
    clock: Clock
    lock: RunLock
    db: Database
    epoch: int
    started: float  # clock.monotonic() when the run began
    exchange_factory: ExchangeFactory
    hooks: RunHooks
    stopped: str | None = None
    claimed: bool = False  # accounts were claimed (released when the run is recorded)
    scope_addresses: list[str] | None = None  # a narrowed run's accounts (--shard, --account), for its alerts
    report: RunReport | None = None
    # What the phases returned so far: a run stopped by an exception is recorded with what it did.
    inputs: Inputs | None = None
    reads: Reads | None = None
    applied: Applied | None = None
    exits: CloseOutcome | None = None
    exchange_clock: ExchangeClock | None = None  # the exchange's time, learnt from this run's reads

    @property
    def run_id(self) -> str:
        return self.lock.run_id

    key_error: str | None = None  # the key file could not be read when the run was about to sign (exit 78)

    @property
    def can_send(self) -> bool:
        """Orders and cancels may go out: a key (configured; a key file is not read yet), and not a dry run."""
        return self.settings.has_key and not self.dry_run

    @property
    def can_act(self) -> bool:
        """Exit work is worth planning: sent with a key, or listed by a dry run."""
        return self.dry_run or self.settings.has_key

    def signing_key(self) -> str:
        """The key, its file read on the first call only (right before the run's first signature, never in a
        run with nothing to sign). ConfigError, the same one every call, when it cannot be read: the
        close or cancel that needed it is not sent, and the run exits 78 (``RunReport.key_error``)."""
        if self.key_error is not None:
            raise ConfigError(self.key_error)  # read once: each close after the first fails the same way
        if self._key is None:
            try:
                self._key = self.settings.signing_key()
            except ConfigError as exc:
                self.key_error = exc.message
                raise
        return self._key

    def key_if_readable(self) -> str | None:
        """The key for planning only (the exit reserve's estimate): read like ``signing_key``, but a key that
        cannot be read is None here and no error of the run: the rule that fired may need no order after all
        (its position already closed), and only a signature that is attempted fails the run (exit 78)."""
        if self._key is None and self.key_error is None:
            try:
                self._key = self.settings.signing_key()
            except ConfigError:
                return None
        return self._key

    _key: str | None = field(default=None, repr=False)

    @property
    def key_was_read(self) -> bool:
        """The key was read successfully this run (``key_unreadable`` is judged only then)."""
        return self._key is not None

    def seconds_left(self) -> float:
        return self.settings.deadline_seconds - (self.clock.monotonic() - self.started)

    def past_deadline(self) -> bool:
        return self.seconds_left() <= 0

    def lock_lost(self) -> bool:
        return self.lock.compromised.is_set()

    def stop(self, why: str) -> None:
        if self.stopped is None:
            self.stopped = why

    def check_signal(self) -> None:
        """A safe point: nothing is half-written here, so a SIGTERM/SIGINT received stops the run
        (``signals.Terminated``, recorded by ``setup`` with 143/130)."""
        signals.check()


# ---- setup and history ---------------------------------------------------------------------------


@contextmanager
def setup(settings: Settings, *, dry_run: bool, clock: Clock, hooks: RunHooks,
          exchange_factory: ExchangeFactory | None) -> Iterator[RunContext]:
    """Lock, database, epoch and the run's history row; on the way out the history is finished (with the
    exit code the process will exit with), the database closed and the lock released."""
    lock = make_lock(settings)
    if hooks.on_start is not None:
        hooks.on_start(lock.run_id)
    started = clock.monotonic()
    db: Database | None = None
    if isinstance(lock, PostgresRunLock):
        # With the PostgreSQL backend the lock lives in the database: it must be reachable first.
        db = _open_database(settings)
        try:
            lock.acquire()
        except BaseException:
            db.close()
            raise
    else:
        lock.acquire()
    run: RunContext | None = None
    crashed: int | None = None
    yielded = False
    try:
        if hooks.on_locked is not None:
            hooks.on_locked()
        if db is None:
            db = _open_database(settings)
        epoch = _start_epoch(db, lock, settings)
        fills_cache = FillsCache()  # an account's fills, read again after a close order, cost one request
        exchange_clock = ExchangeClock(clock)  # every clearinghouseState answer's `time` is a sample
        run = RunContext(settings=settings, dry_run=dry_run, clock=clock, lock=lock, db=db, epoch=epoch,
                         started=started, hooks=hooks, exchange_clock=exchange_clock,
                         exchange_factory=exchange_factory or (
                             lambda counter, budget: Exchange(settings.hl_api_url, timeout=settings.http_timeout,
                                                              counter=counter, before_request=budget.take,
                                                              after_response=budget.charge,
                                                              fills_cache=fills_cache,
                                                              exchange_clock=exchange_clock,
                                                              fills_max_weight=settings.weight_budget
                                                              * FILLS_MAX_READ_SHARE[0] // FILLS_MAX_READ_SHARE[1])))
        unfinished = db.start_run(run_id=lock.run_id, host=settings.host_id, pid=os.getpid(), epoch=epoch,
                                  dry_run=dry_run, process_start=process_start_time(os.getpid()),
                                  machine=machine_identity())
        mark_crashed_runs(db, lock.run_id, unfinished)
        yielded = True
        yield run
    except Fenced as exc:  # taken over between phases: recorded as what it is (exit 75)
        if not yielded:  # before the run began: there is no report to return, so it propagates
            crashed = exit_code_for(exc)
            raise
        if run is not None:
            run.report = run.report or _partial_report(run)  # before stop(): its note is added once, below
            run.stop(exc.message)
            run.report.fenced = True
            run.report.notes.append(exc.message)
    except BaseException as exc:
        crashed = exit_code_for(exc)  # recorded as the code the process exits with
        if run is not None:
            run.report = run.report or _partial_report(run)
            run.report.notes.append(f"run stopped: {getattr(exc, 'message', type(exc).__name__)}")
            run.report.stopped_exit_code = crashed
        raise
    finally:
        try:
            if run is not None and run.report is not None:
                record_history(run, run.report, crashed)
                run.report.duration_seconds = clock.monotonic() - started
                run.report.sql_statements = run.db.statements
        finally:
            try:
                if db is not None:
                    db.close()
                lock.release()
            finally:  # the caller hears what the run did even when letting go of the lock failed
                if run is not None and run.report is not None and hooks.on_finished is not None:
                    hooks.on_finished(run.report, run.report.exit_code if crashed is None else crashed)


def mark_crashed_runs(db: Database, run_id: str, unfinished: Sequence[tuple[str, int, int]]) -> list[str]:
    """Finish the run rows left unfinished by processes provably gone: ``unfinished`` are those recorded on
    this host and machine (``Database.start_run``); each whose pid is dead or now another process (its start
    time differs) is marked crashed. The ids of the rows marked."""
    marked = []
    try:
        for other, pid, start in unfinished:
            if not process_is(pid, start) and db.mark_run_crashed(run_id=other, pid=pid, process_start=start,
                                                                  found_by=run_id):
                log.warning("run %s (pid %s) ended without recording itself: marked crashed", other, pid)
                marked.append(other)
    except (DatabaseUnavailable, DatabaseError) as exc:
        log.warning("could not mark crashed runs: %s", exc.message)
    return marked


def run_state(row: dict[str, Any], host: str, stale_after: float, now: datetime) -> str:
    """"running", "finished", "crashed" or "lost" for a monitor_runs row (``Database.recent_runs``). An
    unfinished row of this host and machine whose process is gone is "crashed" before any run marks it; one
    that cannot be judged from here (another host) but started more than twice the stale limit ago is
    "lost": a run stops by its deadline, below the stale limit, so it is dead or frozen and its lock
    expired (any write of it is fenced)."""
    if row.get("finished_at") is not None:
        crashed = row.get("exit_code") is None and str(row.get("error_summary") or "").startswith("crashed")
        return "crashed" if crashed else "finished"
    machine = machine_identity()
    if (row.get("host") == host and machine is not None and row.get("machine") == machine
            and row.get("process_start") is not None and not process_is(int(row["pid"]), int(row["process_start"]))):
        return "crashed"
    started = row.get("started_at")
    if isinstance(started, datetime) and (now - started).total_seconds() > 2 * stale_after:
        return "lost"
    return "running"


def _empty_report(run: RunContext) -> RunReport:
    return RunReport(run_id=run.run_id, dry_run=run.dry_run, epoch=run.epoch)


def _partial_report(run: RunContext) -> RunReport:
    """The report of a run stopped by an exception: what its phases did before it (writes, orders sent)."""
    reads = run.reads or Reads()
    # Stopped before the apply phase began: no plan with changes was written.
    applied = run.applied or Applied(unwritten={r.account.id for r in reads.results
                                                if r.plan is not None and r.plan.changes})
    try:
        return build_report(run, run.inputs or Inputs(), reads, applied, run.exits or CloseOutcome())
    except Exception:
        log.exception("could not build the stopped run's report")  # never mask what stopped the run
        return _empty_report(run)


def record_history(run: RunContext, report: RunReport, crashed: int | None) -> None:
    """Read health per account and the run's own monitor_runs row, before the connection closes."""
    db = run.db
    if not run.dry_run and not report.fenced:
        # Fenced, and before the lock is released: a superseded run must not overwrite the read
        # health its successor recorded. Its own monitor_runs row below is written regardless.
        try:
            with db.fenced(run.epoch):
                db.record_account_health(report.ok_account_ids, report.failed_account_ids)
        except Fenced as exc:
            report.fenced = True
            report.notes.append(f"account health not recorded: {exc.message}")
        except (DatabaseUnavailable, DatabaseError) as exc:
            log.warning("could not record account health: %s", exc.message)
    counts = {"discovered": report.discovered, "updated": report.updated, "closed": report.closed,
              "conflicts": report.conflicts, "close_orders_sent": report.close_orders_sent,
              "would_close": report.would_close, "deferred": report.accounts_deferred,
              "api_weight": report.api_weight}
    if crashed is not None or report.fenced:
        summary = report.notes[-1] if report.notes else None
    elif report.key_error is not None:
        summary = report.key_error
    else:
        summary = "; ".join(f"{f['account']}: {f['reason']}" for f in report.failures[:3]) or None
    try:
        if run.claimed:
            db.release_claims()
        db.finish_run(run_id=report.run_id, counts=counts, accounts_failed=report.accounts_failed,
                      exit_code=report.exit_code if crashed is None else crashed, error_summary=summary)
    except (DatabaseUnavailable, DatabaseError) as exc:
        # History is worth keeping but never worth failing a run that did its work.
        log.warning("could not record the run's history: %s", exc.message)


def database_url(settings: Settings) -> tuple[str, bool]:
    """The database URL to use, and whether it is the embedded server."""
    if settings.database_url:
        return settings.database_url, False
    return embedded_database_url(settings.data_dir), True


def open_database(settings: Settings) -> tuple[Database, bool]:
    url, embedded = database_url(settings)
    return Database(connect(url), lease_name=settings.lease_name), embedded


def _open_database(settings: Settings) -> Database:
    """The run's connection, its schema current (the embedded default keeps itself current)."""
    db, embedded = open_database(settings)
    try:
        if embedded:
            db.migrate()
        else:
            db.require_current_schema()
    except BaseException:
        db.close()
        raise
    return db


def make_lock(settings: Settings) -> RunLock:
    if settings.lock_backend == "postgres":
        url, _ = database_url(settings)
        lease_name = settings.lease_name
        return PostgresRunLock(lambda: Database(connect(url), lease_name=lease_name),
                               stale_after=settings.lock_stale_after, host=settings.host_id)
    return LocalRunLock(settings.effective_lock_file, stale_after=settings.lock_stale_after,
                        database_factory=lambda: open_database(settings)[0])


def _start_epoch(db: Database, lock: RunLock, settings: Settings) -> int:
    """The run's fencing epoch: the lease's (PostgreSQL backend), or advanced here (file lock)."""
    if isinstance(lock, PostgresRunLock):
        assert lock.epoch is not None  # acquired
        db.run_id, db.epoch = lock.run_id, lock.epoch
        return lock.epoch
    start = process_start_time(os.getpid())
    return db.advance_epoch(run_id=lock.run_id, host=settings.host_id, pid=os.getpid(),
                            start=None if start is None else str(start),
                            stale_after=settings.lock_stale_after, machine=machine_identity())


# ---- inputs --------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What the database says before anything is read: the accounts this run claimed and their rows."""

    accounts: list[Account] = field(default_factory=list)  # claimed by this run, most urgent first later
    held: dict[int, tuple[Account, dict[str, Any]]] = field(default_factory=dict)  # claimed by a live run
    rows: dict[int, list[PositionRow]] = field(default_factory=dict)
    recent: dict[int, list[PositionRow]] = field(default_factory=dict)  # closed within the reopen guard
    last_reads: dict[int, datetime] = field(default_factory=dict)
    followups: dict[int, list[Followup]] = field(default_factory=dict)  # pending, by account id
    now: datetime | None = None
    hedge_groups: list[HedgeGroup] = field(default_factory=list)  # active groups this run judges
    hedge_held: list[str] = field(default_factory=list)  # active groups outside this run's accounts
    hedge_scope: set[int] | None = None  # the accounts a narrowed run set out to read (None: every active one)


def load_inputs(run: RunContext, addresses: Sequence[str]) -> Inputs:
    """The accounts to read (claimed in one statement; one another live run holds is deferred, naming that
    run), their open and recently closed rows, their last good reads and their pending follow-ups."""
    run.check_signal()
    accounts = _accounts(run, addresses)
    groups = run.db.hedge_groups()  # one statement; a group adds no exchange request
    narrowed = bool(addresses) or run.settings.shard is not None
    scope = {a.id for a in accounts} if narrowed else None
    run.scope_addresses = [a.address for a in accounts] if narrowed else None
    judged = [g for g in groups if in_scope(g, scope)]
    held_groups = [g.name for g in groups if not in_scope(g, scope)]
    if not accounts:
        # a no-op run touches neither the exchange nor the SDK
        return Inputs(hedge_groups=judged, hedge_held=held_groups, hedge_scope=scope,
                      now=run.clock.now() if judged else None)
    db, now = run.db, run.clock.now()
    run.claimed = True
    won = db.claim_accounts([a.id for a in accounts], stale_after=run.settings.lock_stale_after)
    held = [a for a in accounts if a.id not in won]
    holders = db.claim_holders([a.id for a in held]) if held else {}
    ids = [a.id for a in accounts if a.id in won]
    if not ids:
        return Inputs(held={a.id: (a, holders.get(a.id, {})) for a in held}, now=now, hedge_groups=judged,
                      hedge_held=held_groups, hedge_scope=scope)
    return Inputs(
        hedge_groups=judged,
        hedge_held=held_groups,
        hedge_scope=scope,
        accounts=[a for a in accounts if a.id in won],
        held={a.id: (a, holders.get(a.id, {})) for a in held},
        rows=db.open_rows_by_account(ids),
        recent=db.recently_closed_by_account(ids, now - timedelta(seconds=run.settings.reopen_guard_seconds)),
        last_reads=db.last_good_reads(ids),
        followups=db.pending_followups(ids) if run.can_act else {},  # without a key nothing could work them
        now=now,
    )


def _accounts(run: RunContext, addresses: Sequence[str]) -> list[Account]:
    if not addresses:
        return [a for a in run.db.list_accounts(active_only=True) if in_shard(a.address, run.settings.shard)]
    found = run.db.list_accounts(addresses=addresses)
    missing = sorted(set(addresses) - {a.address for a in found})
    if missing:
        raise UsageError(f"not a watched account: {missing[0]} (add it with `position-monitor accounts add`)")
    return [a for a in found if a.active] or found


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


# ---- read and plan -------------------------------------------------------------------------------


@dataclass
class AccountRead:
    """What the read phase produced for one account."""

    account: Account
    plan: AccountPlan | None = None
    failure: str | None = None
    deferred: str | None = None  # "deadline" or "budget": not read this run
    open_orders: dict[str, list[OpenOrder]] | None = None  # by perp dex, read for the closes planned
    dexes_skipped: frozenset[str] = frozenset()  # HIP-3 dexes to read that found no weight (not read)
    snapshot: AccountSnapshot | None = None  # what the read found (its dexes_read say which dexes)
    # The fills the read phase got: an unfinished close of the account is settled from them rather than a second
    # read of the same window (Closer.known_fills).
    fills: KnownFills | None = None


@dataclass
class Reads:
    """The read phase's results, and the exchange session the exit work goes on with."""

    results: list[AccountRead] = field(default_factory=list)
    mids: dict[str, Decimal] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reserve: ExitReserve = field(default_factory=ExitReserve)
    exchange: Exchange | None = None
    counter: RequestCounter = field(default_factory=RequestCounter)
    dexes: DexReads = field(default_factory=DexReads)
    dex_list_unknown: bool = False  # perpDexs could not be had this run (only the first dex was read)
    sweep_cursor: int | None = None  # the HIP-3 dex sweep's cursor as stored before this run
    next_sweep_cursor: int | None = None  # and after it: past the accounts whose sweep read happened


def read_accounts(run: RunContext, inputs: Inputs) -> Reads:
    """Mid prices (when an exit rule needs them), the weight held back for exit work, then every account
    read and planned, most urgent first, up to ``read_parallelism`` at a time (one HTTP session each)."""
    if not inputs.accounts:
        return Reads()
    counter, budget = RequestCounter(), WeightBudget(run.settings.weight_budget)
    exchange = run.exchange_factory(counter, budget)
    reads = Reads(exchange=exchange, counter=counter)
    run.check_signal()
    listed = _perp_dexes(run, exchange, inputs, reads.notes)
    reads.dex_list_unknown = listed is None
    known = listed or [MAIN_DEX]
    watched, unknown = watched_dexes(known, run.settings.perp_dexes)
    if unknown:
        reads.notes.append(f"MONITOR_PERP_DEXES names dex(es) the exchange does not list: {', '.join(unknown)}")
    with signals.interruptible():  # a pure read: a signal breaks it off
        reads.mids = _read_mids(exchange, inputs, reads.notes, watched)
    assert inputs.now is not None
    reads.reserve = _reserve_exit_work(run, exchange, inputs, reads.mids, inputs.now, budget)
    read_weight = budget.limit - budget.reserved - budget.spent
    if watched and not reads_every_dex(len(inputs.accounts), len(watched), read_weight):
        reads.sweep_cursor = run.db.sweep_cursor(run.db.lease_name)  # one statement, only when a sweep is on
    reads.dexes = plan_dex_reads(inputs.accounts, inputs.rows, inputs.recent, known, watched,
                                 read_weight=read_weight, cursor=reads.sweep_cursor)
    if not reads.dexes.full:
        log.info(reads.dexes.describe())
    accounts = by_urgency(inputs.accounts, inputs.rows, inputs.last_reads, reads.reserve.urgent_accounts,
                          reads.dexes.sweep)
    settings = plan_settings(run.settings)
    local = threading.local()

    def work(account: Account) -> AccountRead:
        if run.lock_lost() or run.past_deadline() or signals.requested() is not None:
            return AccountRead(account, deferred="deadline")
        session = getattr(local, "exchange", None)
        if session is None:
            session = local.exchange = run.exchange_factory(counter, budget)
        with budget.urgent(account.id in reads.reserve.urgent_accounts):  # its reads are in the reserve
            return read_account(run, session, account, inputs.rows.get(account.id, []),
                                inputs.recent.get(account.id, []), settings, reads.mids,
                                dexes=reads.dexes.dexes_for(account.id),
                                from_fills=frozenset() if reads.dexes.full else frozenset(reads.dexes.watched),
                                can_order=account.id not in reads.reserve.blocked_accounts)

    workers = max(1, min(run.settings.read_parallelism, len(accounts)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read")
    try:
        futures = [pool.submit(work, account) for account in accounts]
        for index, future in enumerate(futures):
            result = _result_or_signal(run, future)
            reads.results.append(result)
            if result.failure is not None:
                # The CLI prints the one line for it (the report's failures); here only at debug.
                log.debug("account %s: %s", result.account.address, result.failure,
                          extra={"event": "account_failed", "account": result.account.address})
            if run.hooks.progress is not None:
                run.hooks.progress(index + 1, len(accounts))
    except BaseException:
        # Stopped (a signal) or a bug: reads still in flight are not waited for; their results are not used.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    budget.open_reserve()  # the exit work draws on it, and on whatever the reads left
    _sweep_done(reads)
    return reads


def _sweep_done(reads: Reads) -> None:
    """Where the HIP-3 dex sweep's cursor goes after this run's reads, and a note for the accounts of its turn
    whose sweep read did not happen (they keep their turn): deferred (budget, deadline), their positions
    unreadable, or a dex that found no weight. A failed read of one HIP-3 dex counts as read (it fails the
    account, and ``account_failed`` alerts), so one broken dex cannot hold the sweep forever; so does an account
    whose read failed altogether (its own alert says so): one broken account cannot hold every other account's
    sweep forever either."""
    if not reads.dexes.sweep_order:
        return
    done = {r.account.id for r in reads.results
            if r.deferred is None and (r.plan is not None or r.failure is not None) and not r.dexes_skipped}
    reads.next_sweep_cursor = cursor_after(reads.dexes, reads.sweep_cursor, done)
    skipped = [i for i in reads.dexes.sweep_order if i not in done]
    if skipped:
        reads.notes.append(f"perp dex sweep: {len(skipped)} of {len(reads.dexes.sweep_order)} account(s) of this"
                           " run's turn not swept (deferred, unreadable or out of weight); the sweep resumes"
                           " from the first of them next run")


def advance_sweep(run: RunContext, reads: Reads, *, named: bool) -> None:
    """Store the sweep's cursor (fenced), when it moved. Never from a dry run (it writes nothing) nor a run
    limited to named accounts (its turn is not the lock's)."""
    cursor = reads.next_sweep_cursor
    if cursor is None or cursor == reads.sweep_cursor or run.dry_run or named or run.stopped:
        return
    run.check_signal()
    if run.lock_lost():
        run.stop(LOCK_LOST)
        return
    try:
        with run.db.fenced(run.epoch):
            run.db.store_sweep_cursor(run.db.lease_name, cursor, run.epoch)
    except Fenced as exc:
        run.stop(exc.message)
    except DatabaseError as exc:  # the sweep re-reads this turn next run: a cost, never a loss
        reads.notes.append(f"perp dex sweep cursor not stored: {exc.message}")


def _result_or_signal(run: RunContext, future: Future[AccountRead]) -> AccountRead:
    """One account's read, waited for in short steps so that a SIGTERM/SIGINT stops the run at once
    rather than after the reads in flight (each bounded by MONITOR_HTTP_TIMEOUT)."""
    while True:
        run.check_signal()
        try:
            return future.result(timeout=SIGNAL_POLL_SECONDS)
        except FutureTimeout:
            continue


PERP_DEXS_CACHE_KEY = "#perpDexs"  # exchange_meta row holding the perpDexs answer ('#' is in no dex name)
PERP_DEXS_TTL = timedelta(minutes=10)  # a newly deployed dex is seen within this (2 weight a run on average)
PERP_DEXS_RETRY = timedelta(minutes=5)  # a row naming a dex the list lacks asks again at most this often


def _perp_dexes(run: RunContext, exchange: Exchange, inputs: Inputs, notes: list[str]) -> list[str] | None:
    """The perp dexes by perp_dex_index ("" first), from the database cache while fresh (and naming the dex of
    every open row, or asked within ``PERP_DEXS_RETRY``), else ``perpDexs`` (weight 20). Unknown (a failed read,
    nothing cached): None; only the first dex is read this run, and rows on HIP-3 dexes are left as they are.
    ``MONITOR_PERP_DEXES=""`` asks nothing."""
    if run.settings.perp_dexes == ():
        return [MAIN_DEX]
    cached = run.db.cached_meta(PERP_DEXS_CACHE_KEY, PERP_DEXS_TTL)
    names = cached.get("names") if isinstance(cached, dict) else None
    if isinstance(names, list) and names and names[0] == MAIN_DEX and all(isinstance(n, str) for n in names):
        row_dexes = {dex_of(r.coin) for rows in inputs.rows.values() for r in rows}
        wanted = row_dexes if run.settings.perp_dexes is None else row_dexes & set(run.settings.perp_dexes)
        if wanted <= set(names):
            return list(names)
        if run.db.cached_meta(PERP_DEXS_CACHE_KEY, PERP_DEXS_RETRY) is not None:
            return list(names)  # asked again lately: a dex that does not exist must not cost 20 every run
    try:
        with signals.interruptible():  # a pure read: a signal breaks it off
            names = exchange.read_perp_dexs()
    except (ReadFailed, BudgetExhausted) as exc:
        hip3_rows = sum(1 for rows in inputs.rows.values() for r in rows if dex_of(r.coin))
        notes.append(f"perp dexes unknown ({exc}): only the first dex is read this run"
                     + (f"; {hip3_rows} row(s) on HIP-3 dexes left as they are" if hip3_rows else ""))
        return None
    if not run.dry_run:
        run.db.store_meta(PERP_DEXS_CACHE_KEY, {"names": names})
    return names


def _dex_list_for_orders(run: RunContext, exchange: Exchange) -> list[str] | None:
    """Every perp dex, for the 1,000-open-orders count of a run that reads the first dex only
    (``MONITOR_PERP_DEXES=""``): orders on the others count all the same. From the cache while fresh, else
    ``perpDexs`` (weight 20); None when neither answers (the count is then unknown: nothing is cancelled)."""
    cached = run.db.cached_meta(PERP_DEXS_CACHE_KEY, PERP_DEXS_TTL)
    names = cached.get("names") if isinstance(cached, dict) else None
    if isinstance(names, list) and names and names[0] == MAIN_DEX and all(isinstance(n, str) for n in names):
        return list(names)
    try:
        names = exchange.read_perp_dexs()
    except (ReadFailed, BudgetExhausted):
        return None
    if not run.dry_run:
        run.db.store_meta(PERP_DEXS_CACHE_KEY, {"names": names})
    return list(names)


def _read_mids(exchange: Exchange, inputs: Inputs, notes: list[str],
               watched: Sequence[str] = ()) -> dict[str, Decimal]:
    """allMids, once per run per perp dex, only for dexes where some open row has an exit rule (its order is
    priced off the mid)."""
    held_too_long = {a.id for a in inputs.accounts if a.max_hold_seconds is not None}
    dexes = sorted({dex_of(r.coin) for account_id, rows in inputs.rows.items() for r in rows
                    if r.stop_loss_price is not None or r.take_profit_price is not None
                    or r.trailing_stop_pct is not None or r.close_requested_at is not None
                    or r.max_hold_seconds is not None or (account_id in held_too_long)})
    mids: dict[str, Decimal] = {}
    for dex in dexes:
        if dex != MAIN_DEX and dex not in watched:
            continue  # a dex not read this run: its rows' rules wait
        try:
            mids.update(exchange.read_mids(dex))
        except (ReadFailed, BudgetExhausted) as exc:
            where = "" if dex == MAIN_DEX else f" of dex {dex}"
            notes.append(f"mid prices{where} unreadable ({exc}); exit rules{where} skipped this run")
    return mids


def _reserve_exit_work(run: RunContext, exchange: Exchange, inputs: Inputs, mids: dict[str, Decimal], now: datetime,
                       budget: WeightBudget) -> ExitReserve:
    """Hold back from the reads the weight this run's exit work needs (see monitor/exit_budget.py)."""
    settings = run.settings
    pending = {account_id: len(items) for account_id, items in inputs.followups.items()}
    estimate = exit_reserve(inputs.accounts, inputs.rows, mids, now, budget=settings.weight_budget,
                            can_send=run.can_send, pending_cancels=pending)
    signing_key = None
    if run.can_send and (estimate.firing or pending) and run.key_error is None:
        # A rule fires (or orders are to be cancelled): the run is about to sign, so the key (file) is read now
        # (``signing_key``). Only then is the cache worth a look: a quiet run costs no SQL. A key that cannot be
        # read keeps the plain estimate; the close that needs it is refused, with the error, when it is about to
        # be signed.
        signing_key = run.key_if_readable()
    if signing_key is not None:
        signer = signer_address(signing_key)
        roles = run.db.cached_roles(signer, CACHE_TTL, REFUSAL_CACHE_TTL)
        key = roles.get(signer)
        if key is not None and key_master(signer, key) is None and not run.lock_lost():
            # The key itself was refused (not approved yet): asked again now, before the reads (one userRole,
            # 60), so a key approved since acts in this run; the accounts' own refusals wait out their cache.
            # The cache is then read again: which answers count depends on the master the key acts for.
            try:
                run.db.store_role(signer, signer, *exchange.user_role(signer))
                roles = run.db.cached_roles(signer, CACHE_TTL, REFUSAL_CACHE_TTL)
                key = roles.get(signer)
            except (ReadFailed, BudgetExhausted, DatabaseError) as exc:
                log.info("the key's role not asked again (%s); its cached refusal stands this run", exc)
        master = None if key is None else key_master(signer, key)
        # Accounts the cached answers say the key cannot act for: their fired rules hold no weight, their
        # cycles are not checked for an order, and the closer refuses them this run whatever it is told later.
        estimate = exit_reserve(inputs.accounts, inputs.rows, mids, now, budget=settings.weight_budget,
                                can_send=True, meta_cached=run.db.cached_meta("", CACHE_TTL) is not None,
                                key_master=master, cached_accounts=set(roles), pending_cancels=pending,
                                blocked_accounts=blocked_by_roles(inputs.accounts, roles, signer))
    estimate.weight = budget.hold(estimate.weight)
    if estimate.weight:
        log.info(estimate.describe())
    return estimate


def by_urgency(accounts: list[Account], rows_by_account: dict[int, list[PositionRow]],
               last_reads: dict[int, datetime], exit_work: set[int] | frozenset[int] = frozenset(),
               sweep: set[int] | frozenset[int] = frozenset()) -> list[Account]:
    """Most urgent first: exit work this run (a rule firing, a close to settle), then rows with exit
    rules, then open rows (and the accounts whose turn in the perp dex sweep this is), then the least
    recently read."""
    def rank(account: Account) -> tuple[int, float]:
        rows = rows_by_account.get(account.id, [])
        ruled = any(r.stop_loss_price is not None or r.take_profit_price is not None
                    or r.trailing_stop_pct is not None or r.close_requested_at is not None
                    or r.status == "closing" for r in rows)
        last = last_reads.get(account.id)
        return (-1 if account.id in exit_work else 0 if ruled else 1 if rows or account.id in sweep else 2,
                last.timestamp() if last else 0.0)
    return sorted(accounts, key=rank)


def read_account(run: RunContext, exchange: Exchange, account: Account, rows: list[PositionRow],
                 recent: list[PositionRow], settings: PlanSettings, mids: dict[str, Decimal], *,
                 dexes: frozenset[str] = frozenset(), from_fills: frozenset[str] = frozenset(),
                 can_order: bool = True) -> AccountRead:
    """Read one account and plan it (on a worker thread: touches no shared state but the budget). ``now`` is
    read once, after the positions: the plan and the writes it leads to use that one moment.

    The main dex is always read (its failure fails the account); each HIP-3 dex in ``dexes`` too, and those of
    ``from_fills`` the fills read here show the account trading on. A HIP-3 dex whose read fails (or finds no
    weight) is left out of the snapshot's ``dexes_read``: its rows are left as they are."""
    dex_problems: list[str] = []
    skipped: set[str] = set()
    try:
        main = _read_positions(run, exchange, account.address)
        now = run.clock.now()
        on_main = [r for r in rows if not dex_of(r.coin)]
        if not main.positions and any(now - r.opened_at >= settings.close_grace for r in on_main):
            # An empty answer for an account with open rows: read once more before believing it.
            try:
                main = _read_positions(run, exchange, account.address)
            except ReadFailed as exc:
                return AccountRead(account, failure=f"confirming an empty account: {exc}")
        snapshot = _with_dexes(run, exchange, account.address, main, dexes, rows, now, settings, dex_problems,
                               skipped)
        fills = None
        fills_error = None
        fills_read_ms = None
        truncated = False
        # An order could be sent (or listed): not for an account the key cannot act for (``can_order``)
        verify_rules = run.can_act and can_order
        since = planner.needs_fills(snapshot, rows, recent, now, settings, mids=mids,
                                    account_max_hold=account.max_hold_seconds, verify_rules=verify_rules)
        if since is not None:
            fills_read_ms = (run.exchange_clock or ExchangeClock(run.clock)).now_ms()
            try:
                fills = exchange.read_fills(account.address, since)
            except FillsTruncated as exc:
                fills, truncated, fills_error = exc.fills, True, str(exc)
            except ReadFailed as exc:
                fills_error = str(exc)
        if fills and from_fills:
            # userFills covers every dex: a dex the fills show, not read yet, is read now (targeted mode).
            shown = {dex_of(f.coin) for f in fills} & from_fills
            extra = frozenset(shown - snapshot.dexes_read)
            if extra:
                snapshot = _with_dexes(run, exchange, account.address, snapshot, extra, rows, now, settings,
                                       dex_problems, skipped)
    except ReadFailed as exc:
        return AccountRead(account, failure=str(exc))
    except BudgetExhausted:
        return AccountRead(account, deferred="budget")
    plan = planner.plan_account(account, snapshot, rows, now, settings, fills=fills, fills_error=fills_error,
                                fills_truncated=truncated, recently_closed=recent, mids=mids,
                                verify_rules=verify_rules, fills_from_ms=since)
    try:
        plan.actions = attach_funding(exchange, account.address, plan.actions)
    except BudgetExhausted:
        return AccountRead(account, deferred="budget")  # like any read of it: the whole account waits a run
    open_orders = None
    closed = {dex_of(a.coin) for a in plan.actions if a.type == planner.CLOSE}
    if run.can_act and closed:
        # Orders a closed position may leave behind, read here in parallel rather than one by one later.
        open_orders = {}
        for dex in sorted(closed):
            try:
                open_orders[dex] = exchange.read_open_orders(account.address, dex)
            except (ReadFailed, BudgetExhausted):
                pass  # the closer reads them itself, or notes it could not
    # A history longer than the exchange keeps is not a failure of this run: it will not get better.
    failure = None if truncated else fills_error
    if dex_problems:
        failure = "; ".join(([failure] if failure else []) + dex_problems)
    known = (KnownFills(fills, since, fills_read_ms, truncated)
             if fills is not None and since is not None and fills_read_ms is not None else None)
    return AccountRead(account, plan=plan, failure=failure, open_orders=open_orders, dexes_skipped=frozenset(skipped),
                       snapshot=snapshot, fills=known)


def _with_dexes(run: RunContext, exchange: Exchange, address: str, snapshot: AccountSnapshot,
                dexes: frozenset[str], rows: list[PositionRow], now: datetime, settings: PlanSettings,
                problems: list[str], skipped: set[str]) -> AccountSnapshot:
    """``snapshot`` with the positions of the HIP-3 ``dexes`` added (each confirmed like the main dex when it
    comes back empty while rows on it are past their grace). A dex that cannot be read is left out."""
    positions = dict(snapshot.positions)
    read = set(snapshot.dexes_read)
    for dex in sorted(dexes - snapshot.dexes_read):
        try:
            part = _read_positions(run, exchange, address, dex)
            if not part.positions and any(dex_of(r.coin) == dex and now - r.opened_at >= settings.close_grace
                                          for r in rows):
                part = _read_positions(run, exchange, address, dex)
        except ReadFailed as exc:
            problems.append(f"perp dex {dex}: {exc} (its rows left as they are)")
            continue
        except BudgetExhausted:
            skipped.add(dex)
            continue  # not read this run: its rows wait (the planner says so)
        positions.update(part.positions)
        read.add(dex)
    return AccountSnapshot(address=address, positions=positions, server_time_ms=snapshot.server_time_ms,
                           dexes_read=frozenset(read))


def _read_positions(run: RunContext, exchange: Exchange, address: str, dex: str = MAIN_DEX) -> AccountSnapshot:
    """clearinghouseState, retried on 429 with backoff while the deadline allows."""
    for attempt in range(3):
        try:
            return exchange.read_positions(address, dex) if dex else exchange.read_positions(address)
        except ReadFailed as exc:
            wait = RATE_LIMIT_BACKOFF * (2 ** attempt)
            if not exc.rate_limited or attempt == 2 or run.seconds_left() < wait + 1:
                raise
            log.info("%s: rate limited, retrying in %.1fs", address, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# ---- apply ---------------------------------------------------------------------------------------


COUNTED = (planner.DISCOVER, planner.UPDATE, planner.CLOSE)


@dataclass
class Applied:
    """The apply phase's results: what each account's plan changed (in a dry run: would change)."""

    closes: dict[int, list[Action]] = field(default_factory=dict)  # account id -> the closes applied
    counts: dict[str, int] = field(default_factory=dict)  # discover / update / close, and conflicts
    failures: dict[int, str] = field(default_factory=dict)  # account id -> why its writes failed
    # Accounts whose plan has changes that were not written (the run stopped before their batch): their read is
    # not recorded as a good one (a stale table must not look freshly confirmed, e.g. to a hedge group's leg).
    unwritten: set[int] = field(default_factory=set)

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n


def apply_plans(run: RunContext, reads: Reads) -> Applied:
    """Every plan's changes, batched (``monitor/applying.py``: a batch of accounts per fenced transaction,
    a statement per kind of change); a dry run counts them and writes nothing. One account's fault never
    aborts the others; a lost lock or fence stops the run writing."""
    applied = run.applied = Applied()  # a run stopped by a fault below is recorded with the batches it committed
    plans = [r.plan for r in reads.results if r.plan is not None]
    if run.dry_run:
        for plan in plans:
            for action in plan.actions:
                if action.type in COUNTED:
                    applied.count(action.type)
            applied.closes[plan.account.id] = [a for a in plan.actions if a.type == planner.CLOSE]
        return applied
    changing = [plan for plan in plans if plan.changes]  # nothing to write: no transaction at all
    applied.unwritten = {plan.account.id for plan in changing}
    now = run.clock.now()
    for start in range(0, len(changing), applying.BATCH_ACCOUNTS):
        run.check_signal()  # between batches: the one before has committed or rolled back
        if run.lock_lost():
            run.stop(LOCK_LOST)
        if run.stopped:
            break
        try:
            outcomes = applying.apply_plans(run.db, run.epoch, changing[start:start + applying.BATCH_ACCOUNTS],
                                            now=now, record_followups=run.settings.has_key)
        except Fenced as exc:
            run.stop(exc.message)
            break
        for outcome in outcomes:
            applied.unwritten.discard(outcome.account.id)
            if outcome.failure is not None:
                applied.failures[outcome.account.id] = outcome.failure
                continue
            for action in outcome.applied:
                if action.type in COUNTED:
                    applied.count(action.type)
            applied.count("conflicts", outcome.conflicts)
            applied.closes[outcome.account.id] = [a for a in outcome.applied if a.type == planner.CLOSE]
    return applied


# ---- exit work -----------------------------------------------------------------------------------


def work_exits(run: RunContext, inputs: Inputs, reads: Reads, applied: Applied) -> CloseOutcome:
    """Exit work: every fired rule's order first, across all accounts (so the weight left is spent on the
    orders), then per account the settles of orders sent, and the orders closed positions left behind."""
    if reads.exchange is None:
        return CloseOutcome()
    closer = Closer(CloseContext(
        db=run.db, epoch=run.epoch, exchange=reads.exchange, clock=run.clock,
        secret_key=None, load_key=run.signing_key if run.settings.has_key else None,
        dry_run=run.dry_run, slippage=run.settings.close_slippage,
        max_failures=run.settings.max_close_failures, seconds_left=run.seconds_left, mids=reads.mids,
        lock_lost=run.lock_lost, plan_settings=plan_settings(run.settings), exchange_clock=run.exchange_clock,
        nonces_for=partial(NonceSource.for_key, run.settings.data_dir),
        perp_dexes=reads.dexes.known, order_dexes=None if reads.dex_list_unknown else reads.dexes.known,
        order_dexes_lookup=(partial(_dex_list_for_orders, run, reads.exchange) if run.settings.perp_dexes == ()
                            else None),
        cannot_act={a.address: why for a in inputs.accounts
                    if (why := reads.reserve.blocked_accounts.get(a.id)) is not None}))
    done = run.exits = closer.done
    later: list[tuple[Account, list[Action], dict[str, int | None], dict[str, list[OpenOrder]] | None,
                      list[Followup]]] = []
    try:
        for result in reads.results:
            account, plan = result.account, result.plan
            if plan is None:
                continue
            run.check_signal()  # between accounts: no order half-sent, no write half-done
            if run.lock_lost():
                run.stop(LOCK_LOST)
            if run.stopped:
                break
            # Orders left by a closed position: not for a coin that flipped (its new position's orders
            # stay), and only orders placed before the close (see Closer._cancel_orphans).
            reopened = {a.coin for a in plan.actions if a.type == planner.DISCOVER and "flipped_from" in a.metadata}
            closed_coins = {a.coin: to_ms(a.closed_at) if a.closed_at else None
                            for a in applied.closes.get(account.id, []) if a.coin not in reopened}
            fired = [a for a in plan.actions if a.type == planner.CLOSE_ORDER]
            settles = [a for a in plan.actions if a.type == planner.SETTLE_CLOSE]
            if not run.can_act:
                closed_coins = {}  # no key: nothing could cancel orphaned orders, so do not read them
            pending = inputs.followups.get(account.id, [])  # retried every run until done or moot
            if fired:
                _with_claim(closer, account, partial(closer.send_orders, account, fired))
            if fired or settles or closed_coins or pending:
                later.append((account, settles, closed_coins, result.open_orders, pending))
                if settles and result.fills is not None:
                    closer.known_fills[account.address] = result.fills
        for account, settles, closed_coins, open_orders, pending in later:
            run.check_signal()
            if run.lock_lost():
                run.stop(LOCK_LOST)
            if run.stopped:
                break
            _with_claim(closer, account, partial(closer.handle, account, settles, closed_coins,
                                                 open_orders=open_orders, followups=pending))
    except Fenced as exc:
        run.stop(exc.message)
    for result in reads.results:
        if result.deferred == "budget" and result.account.id in reads.reserve.urgent_accounts:
            _exit_starved(done, f"{result.account.address}: exit work starved: not read (weight budget spent)"
                                " although an exit rule fires or a close is to settle; next run")
    _keep_followup_alerts(run, inputs, done)
    return done


def _with_claim(closer: Closer, account: Account, work: Callable[[], object]) -> None:
    """Closer work for one account: its writes check the account's claim; a spent budget is reported."""
    checked = closer.ctx.db
    checked.claim_checked = account.id
    try:
        work()
    except BudgetExhausted as exc:
        _exit_starved(closer.done, f"{account.address}: exit work starved of weight ({exc});"
                                   " closes wait for the next run")
    finally:
        checked.claim_checked = None


def _exit_starved(done: CloseOutcome, note: str) -> None:
    """Exit work that could not get weight: a note, and the `exit_starved` alert (never a silent run)."""
    log.info(note)  # the note itself reaches stderr (and the alert); no second line
    done.exit_starved += 1
    done.notes.append(note)


def _keep_followup_alerts(run: RunContext, inputs: Inputs, done: CloseOutcome) -> None:
    """A follow-up past MONITOR_MAX_CLOSE_FAILURES that this run did not get to (its account deferred
    or unread) keeps its alert: it is reported as it stands, not silently resolved."""
    worked = {f["id"] for f in done.followups}
    by_id = {a.id: a for a in inputs.accounts}
    for account_id, pending in inputs.followups.items():
        for followup in pending:
            if followup.id not in worked and followup.attempts >= run.settings.max_close_failures:
                done.followups.append(followup_json(by_id[account_id], followup, "pending", alert=True,
                                                    reason="not worked this run"))


def mark_seen(run: RunContext, reads: Reads) -> None:
    """last_seen_at of the rows each snapshot confirmed unchanged, in one fenced statement."""
    seen_ids = [i for r in reads.results if r.plan is not None for i in r.plan.seen_ids]
    run.check_signal()
    if run.lock_lost():
        run.stop(LOCK_LOST)
    if not seen_ids or run.dry_run or run.stopped:
        return
    try:
        with run.db.fenced(run.epoch):
            run.db.touch_seen(seen_ids, run.clock.now(), claimed_epoch=run.epoch)
    except Fenced as exc:
        run.stop(exc.message)


# ---- hedge groups ---------------------------------------------------------------------------------


def check_hedges(run: RunContext, inputs: Inputs, reads: Reads) -> list[HedgeResult]:
    """Every judged hedge group's net from the snapshots this run read (``monitor/hedges.py``, pure), then the
    verdicts recorded in one fenced statement whose row count is checked. A dry run computes them and writes
    nothing; a run that must write no more (its lock lost) still reports them."""
    if not inputs.hedge_groups:
        return []
    snapshots: dict[int, AccountSnapshot] = {}
    unread: dict[int, str] = {}
    for result in reads.results:
        if result.snapshot is not None:
            snapshots[result.account.id] = result.snapshot
        elif result.deferred:
            unread[result.account.id] = f"account not read this run ({result.deferred})"
        elif result.failure:
            unread[result.account.id] = f"account read failed: {result.failure}"
    for account, holder in inputs.held.values():
        unread[account.id] = f"account claimed by another run ({holder.get('run_id')})"
    now = inputs.now or run.clock.now()
    # Legs outside a narrowed run's accounts (another shard's) come from the monitor's table: one SELECT, and
    # only when such legs exist. The dexes' cached meta (never a request) says whether each coin is listed.
    wanted = outside_legs(inputs.hedge_groups, inputs.hedge_scope)
    table = run.db.hedge_table_legs(wanted) if wanted else {}
    metas = run.db.cached_metas({dex_of(g.coin) for g in inputs.hedge_groups}, CACHE_TTL)
    listed = {dex: listed_coins(meta, dex) for dex, meta in metas.items() if listed_coins(meta, dex)}
    results = evaluate_hedges(inputs.hedge_groups, snapshots, unread, now,
                              timedelta(seconds=run.settings.hedge_external_stale), table, listed)
    run.check_signal()
    if run.lock_lost():
        run.stop(LOCK_LOST)
    if run.dry_run or run.stopped:
        return results
    try:
        with run.db.fenced(run.epoch):
            written = run.db.insert_hedge_results(run_id=run.run_id, epoch=run.epoch, computed_at=now,
                                                  results=results)
            if written != len(results):
                raise DatabaseError("RowCount", f"hedge results: {written} of {len(results)} rows written")
    except Fenced as exc:
        run.stop(exc.message)
    except DatabaseError as exc:  # the verdicts are still reported (and alerted); only their history misses a run
        reads.notes.append(f"hedge results not recorded: {exc.message}")
    return results


# ---- the report ----------------------------------------------------------------------------------


def build_report(run: RunContext, inputs: Inputs, reads: Reads, applied: Applied, exits: CloseOutcome,
                 hedges: Sequence[HedgeResult] = ()) -> RunReport:
    """The run's report, built once from what every phase returned."""
    report = RunReport(run_id=run.run_id, dry_run=run.dry_run, epoch=run.epoch)
    report.hedges = list(hedges)
    report.hedges_held = list(inputs.hedge_held)
    report.shard = run.settings.shard_tag
    report.scope_addresses = run.scope_addresses
    if run.lock.took_over:
        report.notes.append(run.lock.took_over)
        report.alerts.append(Alert("lock_stale_holder", "lock_stale_holder", run.lock.took_over))
    _report_held(report, inputs)
    report.notes.extend(reads.notes)
    report.exit_reserved = reads.reserve.weight
    # Blocked accounts with exit work (a fired rule, follow-ups) the closer did not get to: alert held, not resolved.
    blocked_work = {row.account_id for rows in inputs.rows.values() for row in rows if row.id in reads.reserve.blocked}
    blocked_work |= {account_id for account_id in inputs.followups if account_id in reads.reserve.blocked_accounts}
    report.exit_blocked_held = [a.address for a in inputs.accounts
                                if a.id in blocked_work and a.address not in exits.exit_blocked]
    deferred: list[str] = []
    for result in reads.results:
        account = result.account
        if result.deferred:
            deferred.append(account.address)
            continue
        failure = result.failure or applied.failures.get(account.id)
        if failure is not None:
            report.accounts_failed += 1
            report.failures.append({"account": account.address, "reason": failure})
            report.failed_account_ids[account.id] = failure[:200]
        elif result.plan is not None and account.id not in applied.unwritten:
            report.accounts_ok += 1
            report.ok_account_ids.append(account.id)
        if result.plan is not None:
            report.actions.extend(result.plan.actions)
    report.discovered = applied.counts.get(planner.DISCOVER, 0)
    report.updated = applied.counts.get(planner.UPDATE, 0)
    report.closed = applied.counts.get(planner.CLOSE, 0) + exits.closed
    report.conflicts = applied.counts.get("conflicts", 0) + exits.conflicts
    report.close_orders_sent, report.would_close = exits.close_orders_sent, exits.would_close
    report.actions.extend(exits.actions)
    report.key_read = run.key_was_read
    if run.key_error is not None:  # the run was about to sign and could not read its key: exit 78
        blocked = exits.key_blocked
        shown = ", ".join(blocked[:3]) + (f" and {len(blocked) - 3} more" if len(blocked) > 3 else "")
        report.key_error = (f"{run.key_error}: nothing signed this run" + (f" ({shown} not sent)" if blocked else "")
                            + "; the exit rules stay armed")
        report.notes.append(report.key_error)
        report.alerts.append(Alert("key_unreadable", "key_unreadable", report.key_error))
    report.notes.extend(exits.notes)
    report.followups.extend(exits.followups)
    report.alerts.extend(exits.alerts)
    report.exit_starved = exits.exit_starved
    if exits.exit_starved:
        first = next((n for n in exits.notes if "exit work starved" in n), None)
        report.alerts.append(exit_starved_alert(exits.exit_starved, first))
    report.overrun = exits.postponed_at_deadline > 0  # an order left for the next run by the deadline
    if deferred:
        report.accounts_deferred += len(deferred)
        report.deferred_accounts.extend(deferred)
        if run.past_deadline():
            report.overrun = True
            report.notes.append(f"deadline reached: {len(deferred)} account(s) left for the next run")
        else:
            report.notes.append(f"weight budget ({run.settings.weight_budget}/run) spent:"
                                f" {len(deferred)} account(s) deferred, least urgent first")
    if run.stopped:
        report.fenced = True
        report.notes.append(run.stopped)
    report.requests, report.api_weight = reads.counter.requests, reads.counter.weight
    _report_clock_offset(run, report)
    report.alerts.extend(unread_dex_alerts(run.settings.perp_dexes, reads))
    return report


def unread_dex_alerts(setting: tuple[str, ...] | None, reads: Reads) -> list[Alert]:
    """``rows_unwatched:<dex>``: open rows of accounts read this run that waited because their perp dex was not
    read (not watched, not listed, the dex list unknown, or its reads failed or found no weight). Such rows are
    never closed or acted on, so a dex that stays unread must not leave them waiting in silence: the condition
    alerts once seen in MONITOR_ALERT_AFTER_RUNS runs in a row, and resolves when the dex is read again."""
    waiting: dict[str, list[int]] = {}
    for result in reads.results:
        for action in result.plan.actions if result.plan is not None else ():
            dex = action.metadata.get("dex_unread") if action.type == planner.WAIT else None
            if isinstance(dex, str) and action.position_id is not None:
                waiting.setdefault(dex, []).append(action.position_id)
    alerts = []
    for dex, ids in sorted(waiting.items()):
        if reads.dex_list_unknown:
            why = "the perp dex list (perpDexs) could not be read"
        elif setting == ():
            why = 'MONITOR_PERP_DEXES="" reads the first dex only'
        elif dex not in reads.dexes.known:
            why = "perpDexs does not list this dex"
        elif dex not in reads.dexes.watched:
            why = "MONITOR_PERP_DEXES does not name it"
        else:
            why = "its reads failed or found no weight"
        shown = ", ".join(f"#{i}" for i in sorted(ids)[:5]) + (", …" if len(ids) > 5 else "")
        alerts.append(Alert(f"rows_unwatched:{dex}", "rows_unwatched",
                            f"{len(ids)} open row(s) on perp dex {dex} ({shown}) wait unread: {why}; they are"
                            " never closed or acted on while their dex is not read"))
    return alerts


def _report_clock_offset(run: RunContext, report: RunReport) -> None:
    """The offset from the exchange's clock this run measured; beyond CLOCK_OFFSET_ALERT_MS, the alert."""
    if run.exchange_clock is None or not run.exchange_clock.samples:
        return
    offset = run.exchange_clock.offset_ms()
    report.clock_offset_ms = offset
    if abs(offset) > CLOCK_OFFSET_ALERT_MS:
        text = (f"this host's clock is {abs(offset) / 1000:.1f}s {'behind' if offset > 0 else 'ahead of'} the"
                f" exchange's (median of {run.exchange_clock.samples} clearinghouseState answers); orders and"
                " settle windows use the exchange's time, but fix the host's clock (NTP)")
        report.notes.append(text)
        report.alerts.append(Alert("clock_offset", "clock_offset", text))


def exit_starved_alert(count: int, first_note: str | None) -> Alert:
    return Alert("exit_starved", "exit_starved",
                 f"{count} account(s) with exit work (a fired rule's order, a close to settle, orders to cancel)"
                 " got no API weight this run" + (f" (first: {first_note})" if first_note else ""))


def _report_held(report: RunReport, inputs: Inputs) -> None:
    """Accounts another live run had claimed: deferred, naming that run."""
    by_holder: dict[tuple[Any, ...], int] = {}
    for account, holder in inputs.held.values():
        report.held_by_other_runs.append({"account": account.address, "run_id": holder.get("run_id"),
                                          "lease": holder.get("lease"), "epoch": holder.get("epoch")})
        key = (holder.get("run_id"), holder.get("lease"), holder.get("epoch"))
        by_holder[key] = by_holder.get(key, 0) + 1
        report.deferred_accounts.append(account.address)
        report.accounts_deferred += 1
    for (run_id, lease, epoch), count in by_holder.items():
        report.notes.append(f"{count} account(s) claimed by another run (run {run_id}, lock {lease},"
                            f" epoch {epoch}): deferred to the next run")
