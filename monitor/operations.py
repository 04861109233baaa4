"""What happens around a run for the people operating it: dead-man's-switch pings, alerts, metrics.

None of this may fail a run: every fault here is logged as one warning line and ignored.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Collection, Sequence

from monitor import signals
from monitor.config import Settings
from monitor.errors import (
    EXIT_DB_UNAVAILABLE,
    EXIT_LOCK_HELD,
    Fenced,
    LockHeld,
    MonitorError,
    UsageError,
    exit_code_for,
)
from monitor.hedges import IMBALANCE_KIND, IMBALANCED, STALE_KIND, UNKNOWN, UNKNOWN_KIND, URGENT_KIND, listed_coins
from monitor.models import dex_of
from monitor.notify import (
    AlertState,
    Pinger,
    RunMetrics,
    alert_text,
    decide_alerts,
    mark_lock_busy,
    send_webhook,
    write_metrics_file,
)
from monitor.report import RunReport
from monitor.runner import RunHooks, open_database, run_once

log = logging.getLogger(__name__)

ALERT_RESEND_AFTER = timedelta(hours=1)


@dataclass(frozen=True)
class AccountRole:
    """Who an address is on the exchange, for ``accounts add`` (userRole, reference §2.11)."""

    role: str | None  # "user", "subAccount", "vault", "missing", ...; None: the exchange could not be asked
    linked: str | None = None  # a sub-account's master
    warning: str | None = None  # one line for stderr

    @property
    def label(self) -> str | None:
        """How the account is labelled for its role: sub-accounts and vaults are, ordinary accounts not."""
        if self.role == "vault":
            return "vault"
        if self.role == "subAccount":
            return f"sub-account of {self.linked}" if self.linked else "sub-account"
        return None


def account_role(settings: Settings, address: str) -> AccountRole:
    """Ask the exchange who ``address`` is before it is watched (one userRole request, weight 60).

    An agent (API) wallet's own account is always empty (reference §1, §2.11), so watching it would show
    nothing forever and close every platform row of it as unexplained: it is refused (UsageError, exit 2),
    naming its master account. When the exchange cannot answer (timeout, 5xx, 429, an odd body) the account is
    still added, with a one-line warning: a failed read says nothing about the address."""
    from monitor.exchange import Exchange, ReadFailed

    try:
        role, linked = Exchange(settings.hl_api_url, timeout=settings.http_timeout).user_role(address)
    except ReadFailed as exc:
        return AccountRole(None, warning=f"warning: could not ask the exchange who {address} is ({exc.reason});"
                                         " added without that check")
    if role == "agent":
        master = linked or "an unknown master account"
        raise UsageError(f"{address} is an agent (API) wallet of {master}, which holds no positions of its own;"
                         f" watch its master account {master} instead")
    return AccountRole(role, linked)


@dataclass(frozen=True)
class CoinListing:
    """Whether a coin is listed on its perp dex, for ``hedge create`` (meta of that dex, reference §2)."""

    listed: bool | None  # None: the exchange could not be asked
    meta: dict[str, Any] | None = None  # the dex's meta as read (for the cache)
    warning: str | None = None  # one line for stderr


def coin_listing(settings: Settings, coin: str) -> CoinListing:
    """Ask the exchange whether ``coin`` is listed on its perp dex (one meta request of that dex, weight 20).

    A coin not in the dex's universe is refused (UsageError, exit 2): a misspelled coin (``btc``, ``BTCC``) would
    read 0 on every leg and make the group ``balanced`` forever. Names are case-sensitive (``kPEPE`` is listed),
    so nothing is folded; a name differing only in case is suggested. When the exchange cannot answer the group is
    still created, with a one-line warning (the run then marks it unknown if a cached meta lacks the coin)."""
    from monitor.exchange import Exchange, ReadFailed

    dex = dex_of(coin)
    try:
        meta = Exchange(settings.hl_api_url, timeout=settings.http_timeout).read_meta(dex)
    except ReadFailed as exc:
        where = f"perp dex {dex}" if dex else "the main perp dex"
        return CoinListing(None, warning=f"warning: could not ask the exchange whether {coin} is listed on {where}"
                                         f" ({exc.reason}); created without that check")
    names = listed_coins(meta, dex)
    if coin in names:
        return CoinListing(True, meta)
    alike = sorted(n for n in names if n.lower() == coin.lower())
    hint = f" (did you mean {alike[0]}? names are case-sensitive)" if alike else ""
    where = f"perp dex {dex}" if dex else "the main perp dex"
    raise UsageError(f"--coin: {coin} is not listed on {where}{hint}")


def execute_run(settings: Settings, *, dry_run: bool, addresses: Sequence[str],
                progress: Callable[[int, int], None] | None = None,
                on_start: Callable[[str], object] | None = None) -> RunReport:
    """A run with its pings, alerts and metrics, on every way out (docs/operations.md, "Operating it").

    A run that raises (69, 70, 75, 78, 2, a signal's 143/130) is pinged with its code and written to the
    metrics as the code it recorded, then the exception propagates with the run's report attached
    (``run_report``, for ``run --json``). The one exception: a start that found the lock busy neither
    pings (the holder does) nor overwrites the holder's figures (only ``lock_busy`` is set).
    SIGTERM/SIGINT stop the run at its next safe point (``monitor.signals``)."""
    pinger: Pinger | None = None
    locked = False
    finished: list[tuple[RunReport, int]] = []

    def started_run(run_id: str) -> None:
        nonlocal pinger
        pinger = Pinger(settings.ping_url, run_id=run_id)
        if on_start is not None:
            on_start(run_id)

    def got_lock() -> None:
        nonlocal locked
        locked = True
        if pinger is not None and not dry_run:
            pinger.start()

    hooks = RunHooks(on_start=started_run, progress=progress, on_locked=got_lock,
                     on_finished=lambda report, code: finished.append((report, code)))
    started = time.time()
    with signals.handling():
        try:
            report = run_once(settings, dry_run=dry_run, addresses=addresses, hooks=hooks)
        except BaseException as exc:
            code = exit_code_for(exc)
            busy = isinstance(exc, LockHeld) and not locked
            run_id = (pinger.run_id or "") if pinger is not None else ""
            stopped = finished[0][0] if finished and not busy else RunReport(run_id=run_id, dry_run=dry_run)
            stopped.stopped_exit_code, stopped.error = code, _error_text(exc)
            if busy:
                # A skipped run is not a failed one: no ping (the holder pings), but a streak may alert;
                # the metrics keep the holder's figures, only lock_busy is set.
                if not dry_run:
                    busy_key = shard_key("lock_busy", "lock_busy", settings.shard_tag)
                    _alerts(settings, {busy_key: ("lock_busy", f"run lock busy: {stopped.error}")},
                            only=(busy_key,))
                _mark_lock_busy(settings)
            else:
                if not finished:  # stopped before its history row was written
                    stopped.notes.append(f"run stopped: {stopped.error}")
                if pinger is not None and not dry_run:
                    pinger.finish(code, body=f"exit {code}: {stopped.error}")
                # the database is known down (69): the metrics go without its figures, and no second line
                _metrics(settings, stopped, started, lock_busy=False, with_database=code != EXIT_DB_UNAVAILABLE)
            setattr(exc, "run_report", stopped)  # noqa: B010 - any exception, a bug's included
            raise
        if not dry_run:
            assert pinger is not None
            pinger.finish(report.exit_code, body=report.summary_line())
            observed = observed_conditions(report)
            if report.fenced:
                # A superseded run decides only the alert about itself; the rest is its successor's state.
                stale_key = shard_key("lock_stale_holder", "lock_stale_holder", report.shard)
                _alerts(settings, {k: v for k, v in observed.items() if k == stale_key}, only=(stale_key,))
            else:
                _alerts(settings, observed, epoch=report.epoch, hold=held_conditions(report),
                        owns_for=lambda active: alert_scope(report, active, accounts_named=bool(addresses)))
        _metrics(settings, report, started, lock_busy=report.exit_code == EXIT_LOCK_HELD)
    return report


def _error_text(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        return message
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"internal error: {type(exc).__name__}: {exc}"


class _NoDatabase(Exception):
    """The metrics are written without the database's figures (it is known to be down)."""


def _mark_lock_busy(settings: Settings) -> None:
    if settings.metrics_file is None:
        return
    try:
        mark_lock_busy(settings.metrics_file)
    except OSError as exc:
        log.warning("metrics file %s not updated: %s", settings.metrics_file, exc.strerror or exc)


def observed_conditions(report: RunReport) -> dict[str, tuple[str, str]]:
    """The alert conditions this run saw, by key (see README, "Alerts")."""
    seen: dict[str, tuple[str, str]] = {}
    for failure in report.failures:
        seen[f"account_failed:{failure['account']}"] = (
            "account_failed", f"account {failure['account']} failed: {failure['reason']}")
    if report.overrun:
        seen["run_overran"] = ("run_overran", "a run reached its deadline (near the stale limit) and deferred work")
    if report.conflicts:
        seen["conflicts"] = ("conflicts", f"{report.conflicts} change(s) already made by another writer"
                                          " (another process writing positions?)")
    for alert in report.alerts:  # typed by the phase that saw it: close_failed, exit_starved, lock_stale_holder
        seen[alert.key] = (alert.kind, alert.text)
    for followup in report.followups:
        if followup.get("alert"):
            seen[f"followup_failed:{followup['id']}"] = (
                "followup_failed", f"follow-up #{followup['id']} ({followup['kind']}, {followup['account']}"
                                   f" {followup['coin']}) failed {followup['attempts']} times: {followup['error']}")
    for action in report.actions:
        if action.type == "close" and action.reason == "liquidation":
            seen[f"liquidation:{action.account}:{action.coin}"] = (
                "liquidation", f"{action.account} {action.coin} was liquidated (exit {action.exit_price})")
    for hedge in report.hedges:
        if hedge.status == UNKNOWN and not hedge.alerted_elsewhere:  # a stale venue or a failed read alerts already
            seen[f"{UNKNOWN_KIND}:{hedge.name}"] = (UNKNOWN_KIND, hedge.unknown_text())
        if hedge.status == IMBALANCED:
            seen[f"hedge_imbalance:{hedge.name}"] = (URGENT_KIND if hedge.urgent else IMBALANCE_KIND,
                                                     hedge.alert_text())
        if hedge.stale_venues:
            seen[f"hedge_external_stale:{hedge.name}"] = (
                STALE_KIND, f"hedge group {hedge.name} ({hedge.coin}) is unknown: external leg(s)"
                            f" {', '.join(hedge.stale_venues)} not updated within MONITOR_HEDGE_EXTERNAL_STALE")
    if report.fenced:
        seen["lock_stale_holder"] = ("lock_stale_holder", "this run's lock was taken over while it ran")
    if report.shard is None:
        return seen
    return {shard_key(key, kind, report.shard): (kind, text) for key, (kind, text) in seen.items()}


# Alert kinds about the run as a whole: a sharded run's keys carry its shard (``run_overran:shard-1-of-2``), so
# shards never count or resolve each other's; an unsharded run's keep their plain names.
RUN_WIDE_KINDS = frozenset({"run_overran", "conflicts", "exit_starved", "key_unreadable", "lock_busy",
                            "lock_stale_holder", "clock_offset", "rows_unwatched"})
# Alert kinds about one account: its address is in the key (account_failed, liquidation) or in the text.
_ACCOUNT_IN_KEY = frozenset({"account_failed", "liquidation", "exit_blocked"})
_ACCOUNT_IN_TEXT = frozenset({"close_failed", "close_blocked_open_orders", "followup_failed"})
_SHARD_SUFFIX = re.compile(r":shard-\d+-of-(\d+)$")
# Run-wide kinds about the run lock: a run narrowed by --account shares the cron run's lock, so it keeps them.
_LOCK_KINDS = frozenset({"lock_busy", "lock_stale_holder"})
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def shard_key(key: str, kind: str, shard: str | None) -> str:
    """The alert key a run uses: a run-wide kind's key gets ``:<shard>`` appended under ``--shard``."""
    return f"{key}:{shard}" if shard is not None and kind in RUN_WIDE_KINDS else key


def alert_scope(report: RunReport, active: Collection[str] | None = None, *,
                accounts_named: bool = False) -> Callable[[AlertState], bool]:
    """Whether a stored alert is this run's to count and resolve (README, "Alerts").

    Run-wide kinds: an unsharded run owns the plain keys; a sharded run the keys carrying its shard, plus the
    keys no shard of its N owns (plain ones, left from before sharding; ``:shard-K-of-M`` ones of another M,
    left from before the shard count changed). A run narrowed by ``--account`` (``accounts_named``) owns none
    but the lock's (``lock_busy``, ``lock_stale_holder``: it shares the run lock): the cron run's conditions are
    not a one-account run's to resolve. Account kinds: an account's alerts only when that account is among the
    run's accounts (every account for a run not narrowed by --shard/--account), and never for an account this
    run deferred (budget, deadline) or found claimed by another run: it did not read it. The alerts of an
    account that is not active (``active``, when given) are every run's. The rest (hedge groups:
    ``held_conditions``) always."""
    scope = None if report.scope_addresses is None else {a.lower() for a in report.scope_addresses}
    deferred = {a.lower() for a in report.deferred_accounts}
    watched = None if active is None else {a.lower() for a in active}
    own_count = None if report.shard is None else report.shard.rsplit("-of-", 1)[1]

    def owns(state: AlertState) -> bool:
        if state.kind in RUN_WIDE_KINDS:
            if accounts_named and state.kind not in _LOCK_KINDS:
                return False
            match = _SHARD_SUFFIX.search(state.key)
            if report.shard is None:
                return match is None
            return match is None or match.group(0) == f":{report.shard}" or match.group(1) != own_count
        if state.kind in _ACCOUNT_IN_KEY:
            found = _ADDRESS.search(state.key)
        elif state.kind in _ACCOUNT_IN_TEXT:
            found = _ADDRESS.search(state.message)
        else:
            return True
        if found is None:
            return True
        account = found.group(0).lower()
        if watched is not None and account not in watched:
            return True  # disabled (or removed): no run reads it, so every run may resolve it
        if account in deferred:
            return False
        return scope is None or account in scope

    return owns


def held_conditions(report: RunReport) -> set[str]:
    """Alert keys this run says nothing about, left exactly as they are (streak, active): the imbalance of a hedge
    group whose status is unknown (a leg not read, an external leg stale) is neither seen nor resolved, and the
    hedge alerts of groups outside this run's accounts (``--account``, ``--shard``) belong to the runs that judge
    them. ``key_unreadable`` is judged only by a run that read the key: one that never needed it (a quiet run)
    or whose planning read failed without a signature attempted holds it; a run that read it resolves it.
    ``exit_blocked`` of an account whose fired rule the run did not get to (its read failed, ...) is held too."""
    held = {f"hedge_imbalance:{h.name}" for h in report.hedges if h.status == UNKNOWN}
    # Unknown for a reason that alerts on its own (a failed read, a stale venue leg): this run says nothing
    # about hedge_unknown either (another shard may be building it from the table's staleness).
    held |= {f"{UNKNOWN_KIND}:{h.name}" for h in report.hedges if h.status == UNKNOWN and h.alerted_elsewhere}
    if not report.key_read and report.key_error is None:
        held.add(shard_key("key_unreadable", "key_unreadable", report.shard))
    for name in report.hedges_held:
        held |= {f"hedge_imbalance:{name}", f"hedge_external_stale:{name}", f"{UNKNOWN_KIND}:{name}"}
    held |= {f"exit_blocked:{address}" for address in report.exit_blocked_held}
    return held


def _alerts(settings: Settings, observed: dict[str, tuple[str, str]], only: Sequence[str] | None = None,
            epoch: int | None = None, hold: Collection[str] = (),
            owns: Callable[[AlertState], bool] | None = None,
            owns_for: Callable[[Collection[str]], Callable[[AlertState], bool]] | None = None) -> None:
    """Count and resolve this run's alerts. A key held (``hold``) or not this run's (``owns``; ``owns_for`` builds
    it from the active accounts' addresses) is left exactly as stored, whether observed or not."""
    try:
        db, _ = open_database(settings)
    except MonitorError as exc:
        log.warning("alerts not evaluated: %s", exc.message)
        return
    try:
        if db.pending_migrations():
            return
        with db.alerts_locked(epoch):
            previous = {row[0]: AlertState(*row) for row in db.load_alerts()}
            if owns_for is not None:
                owns = owns_for([a.address for a in db.list_accounts(active_only=True)])
            considered = {k: v for k, v in previous.items()
                          if (only is None or k in only) and k not in hold and (owns is None or owns(v))}
            observed = {k: (kind, text) for k, (kind, text) in observed.items() if k not in hold and (
                owns is None or owns(previous.get(k) or AlertState(key=k, kind=kind, message=text)))}
            now = datetime.now(timezone.utc)
            states, to_send, to_resolve = decide_alerts(considered, observed, now,
                                                        threshold_runs=settings.alert_after_runs,
                                                        resend_after=ALERT_RESEND_AFTER)
            untouched = [k for k in previous if k not in considered]
            db.save_alerts(list(states.values()), keep_keys=list(states) + untouched)
        text = alert_text(to_send, to_resolve)
        if text:
            # A skipped (lock-busy) run keeps its one line on stderr; the alert still goes to the webhook.
            log.log(logging.INFO if only is not None else logging.WARNING, text.replace("\n", " | "))
            if settings.alert_webhook:
                send_webhook(settings.alert_webhook, text)
    except Fenced as exc:
        log.warning("alerts not recorded: %s; the run that took it decides them", exc.message)
    except MonitorError as exc:  # DatabaseError and DatabaseUnavailable included
        log.warning("alerts not recorded: %s", exc.message)
    finally:
        db.close()


def _metrics(settings: Settings, report: RunReport | None, started: float, *, lock_busy: bool,
             with_database: bool = True) -> None:
    if settings.metrics_file is None:
        return
    finished = time.time()
    last_success = None
    open_by_account: dict[str, int] = {}
    money: dict[str, dict[str, Decimal]] = {}
    try:
        if not with_database:
            raise _NoDatabase
        db, _ = open_database(settings)
        try:
            if not db.pending_migrations():
                moment = db.last_success_at()
                last_success = moment.timestamp() if moment else None
                open_by_account = db.open_counts_by_address()
                money = db.account_money()
        finally:
            db.close()
    except _NoDatabase:
        pass
    except MonitorError as exc:  # DatabaseError and DatabaseUnavailable included
        log.warning("metrics without database figures: %s", exc.message)
    counters = {}
    if report is not None:
        counters = {"discovered": report.discovered, "updated": report.updated, "closed": report.closed,
                    "close_orders_sent": report.close_orders_sent, "conflicts": report.conflicts,
                    "would_close": report.would_close}
    metrics = RunMetrics(
        run_started=started, run_finished=finished, last_success=last_success,
        exit_code=0 if report is None else report.exit_code,
        dry_run=bool(report and report.dry_run), counters=counters, open_positions_by_account=open_by_account,
        accounts_failed=0 if report is None else report.accounts_failed,
        accounts_ok=0 if report is None else report.accounts_ok, lock_busy=lock_busy,
        api_weight=0 if report is None else report.api_weight, requests=0 if report is None else report.requests,
        money_by_account=money,
        hedges=[] if report is None else [(h.name, h.coin, h.status, h.net) for h in report.hedges])
    try:
        write_metrics_file(settings.metrics_file, metrics)
    except OSError as exc:
        log.warning("metrics file %s not written: %s", settings.metrics_file, exc.strerror)
