"""The apply phase: carry out the planned changes of many accounts with a few statements.

Accounts are applied in batches (``BATCH_ACCOUNTS`` at a time), each batch in one fenced transaction
that first checks every account's claim in one statement (``Database.require_claims``); then one
statement per kind of change (open rows inserted, rows resized, closed, best prices, missing marks,
follow-ups), each guarded in SQL exactly as its single-row counterpart and writing its own audit events.
What a statement did not change was changed first by another writer: a conflict, not an error.

One account's fault never aborts another's: a batch that fails with anything but a fenced lock, a lost
claim or a lost database is rolled back and applied again one account per transaction, so only the
faulty account fails (with ``failure`` set and nothing applied).

Within one account the changes keep the plan's order where it matters: two changes to the same coin
(a close and the re-open of the coin, an update and a best price of one row) go to successive rounds
of statements, in plan order; changes to different coins are independent of each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Sequence

from monitor import planner
from monitor.clock import to_ms
from monitor.closing import close_bound_ms
from monitor.database import Close, Database, NewFollowup, NewPosition, Resize
from monitor.errors import DatabaseBusy, DatabaseError, DatabaseUnavailable, Fenced
from monitor.models import Account
from monitor.planner import AccountPlan, Action

log = logging.getLogger(__name__)

BUSY_RETRIES = 2  # accounts of a batch that may hit a lock wait one by one before the rest wait a run
BATCH_ACCOUNTS = 100  # accounts per transaction (its statements do not grow with it, only their arrays)
CANCEL_ORPHANS = "cancel_orphans"
_ROW_CHANGES = (planner.DISCOVER, planner.UPDATE, planner.CLOSE, planner.TRACK_BEST, planner.MARK_MISSING,
                planner.PAUSE_MISSING)
_CONFLICTING = (planner.DISCOVER, planner.UPDATE, planner.CLOSE)  # a lost race on these is counted


@dataclass
class AppliedAccount:
    """What the apply phase did for one account."""

    account: Account
    applied: list[Action]  # the actions this writer carried out, in plan order
    conflicts: int  # DISCOVER/UPDATE/CLOSE another writer got to first
    failure: str | None = None  # "database write failed: ..." (then nothing was applied)


def apply_plans(db: Database, epoch: int, plans: Sequence[AccountPlan], *, now: datetime,
                record_followups: bool) -> list[AppliedAccount]:
    """Apply these plans (one per account); one result per plan, in the same order.

    ``record_followups``: a close also records its ``cancel_orphans`` follow-up, in the close's own
    transaction (only when orders could be cancelled, i.e. with a key). ``Fenced`` (``ClaimLost`` too)
    and ``DatabaseUnavailable`` propagate: the run stops writing.
    """
    results: list[AppliedAccount] = []
    for start in range(0, len(plans), BATCH_ACCOUNTS):
        batch = list(plans[start:start + BATCH_ACCOUNTS])
        try:
            results.extend(_apply_batch(db, epoch, batch, now, record_followups))
            continue
        except DatabaseBusy as exc:  # a deadlock or lock timeout: the batch's many rows, retried one by one
            if len(batch) == 1:
                results.append(_failed(batch[0], exc))
                continue
            log.info("a batch of %d accounts lost to another writer (%s); applying them one by one", len(batch),
                     exc.message)
        except (Fenced, DatabaseUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - one account's fault must not abort the others
            if len(batch) == 1:
                results.append(_failed(batch[0], exc))
                continue
            log.info("a batch of %d accounts failed (%s); applying them one by one", len(batch),
                     type(exc).__name__)
        busy = 0
        for plan in batch:
            if busy >= BUSY_RETRIES:  # a writer holding many rows: the rest wait a run, not a lock wait each
                results.append(AppliedAccount(plan.account, [], 0, "database write failed: DatabaseBusy: not"
                                              " tried, other accounts' rows were held by another writer"))
                continue
            try:
                results.extend(_apply_batch(db, epoch, [plan], now, record_followups))
            except DatabaseBusy as exc:  # this account's row is held by another writer: it waits a run
                busy += 1
                results.append(_failed(plan, exc))
            except (Fenced, DatabaseUnavailable):
                raise
            except Exception as exc:  # noqa: BLE001 - one account's fault must not abort the others
                results.append(_failed(plan, exc))
    return results


def _failed(plan: AccountPlan, exc: Exception) -> AppliedAccount:
    # The CLI prints the one line for the failed account (the report's failures); the traceback only at debug.
    log.debug("account %s: applying the plan failed", plan.account.address, exc_info=exc,
              extra={"event": "account_failed", "account": plan.account.address})
    if isinstance(exc, DatabaseError):
        kind, detail = exc.kind, exc.detail
    else:
        kind, detail = type(exc).__name__, str(exc)
    return AppliedAccount(plan.account, [], 0, f"database write failed: {kind}: {detail[:120]}")


@dataclass
class _Pending:
    """One planned change on its way to the database."""

    plan_index: int
    order: int  # its place in the plan
    action: Action
    done: bool = False


def _rounds(plans: Sequence[AccountPlan]) -> list[list[_Pending]]:
    """Every change of these plans, in rounds: an account's k-th change to a coin goes to round k."""
    rounds: list[list[_Pending]] = []
    for plan_index, plan in enumerate(plans):
        seen: dict[str, int] = {}
        for order, action in enumerate(plan.actions):
            if action.type not in _ROW_CHANGES:
                continue
            k = seen.get(action.coin, 0)
            seen[action.coin] = k + 1
            while len(rounds) <= k:
                rounds.append([])
            rounds[k].append(_Pending(plan_index, order, action))
    return rounds


def _apply_batch(db: Database, epoch: int, plans: Sequence[AccountPlan], now: datetime,
                 record_followups: bool) -> list[AppliedAccount]:
    """Apply these plans in one fenced transaction (all or nothing)."""
    rounds = _rounds(plans)
    with db.fenced(epoch):
        db.require_claims([plan.account.id for plan in plans], epoch)
        for changes in rounds:
            _apply_round(db, plans, changes, now, record_followups)
    results = []
    for plan_index, plan in enumerate(plans):
        mine = sorted((p for changes in rounds for p in changes if p.plan_index == plan_index),
                      key=lambda p: p.order)
        applied = [p.action for p in mine if p.done]
        conflicts = sum(1 for p in mine if not p.done and p.action.type in _CONFLICTING)
        results.append(AppliedAccount(plan.account, applied, conflicts))
    return results


def _apply_round(db: Database, plans: Sequence[AccountPlan], changes: list[_Pending], now: datetime,
                 record_followups: bool) -> None:
    """One statement per kind of change in this round (no two of its changes touch one coin of an account)."""
    by_type: dict[str, list[_Pending]] = {}
    for p in changes:
        by_type.setdefault(p.action.type, []).append(p)

    # Closes first: a coin closed in this round is not re-opened in it (that is the next round).
    closes = by_type.get(planner.CLOSE, [])
    closed = db.close_positions([
        Close(position_id=_row_id(p.action), closed_at=p.action.closed_at or now, reason=p.action.reason,
              exit_price=p.action.exit_price, realized_pnl=p.action.realized_pnl, fees=p.action.fees,
              metadata=p.action.metadata, funding=p.action.funding, net_pnl=p.action.net_pnl) for p in closes])
    for p in closes:
        p.done = p.action.position_id in closed
    if record_followups:
        followups = [f for f in (_followup(plans[p.plan_index], p.action, now) for p in closes if p.done)
                     if f is not None]
        db.record_followups(followups)

    discovers = by_type.get(planner.DISCOVER, [])
    inserted = db.insert_discovered_many([
        NewPosition(account_id=plans[p.plan_index].account.id, coin=p.action.coin, side=p.action.side or "long",
                    size=_size(p.action), entry_price=p.action.entry_price, opened_at=p.action.opened_at or now,
                    metadata=p.action.metadata) for p in discovers], now)
    for p in discovers:
        p.done = (plans[p.plan_index].account.id, p.action.coin) in inserted
        if not p.done:
            log.info("%s %s: another writer inserted the open row first", plans[p.plan_index].account.address,
                     p.action.coin, extra={"event": "conflict", "account": plans[p.plan_index].account.address,
                                           "coin": p.action.coin})

    updates = by_type.get(planner.UPDATE, [])
    updated = db.update_positions([
        Resize(position_id=_row_id(p.action), size=_size(p.action), entry_price=p.action.entry_price,
               realized_pnl=p.action.realized_pnl, fees=p.action.fees, previous_size=p.action.previous_size)
        for p in updates], now)
    for p in updates:
        p.done = p.action.position_id in updated

    bests = by_type.get(planner.TRACK_BEST, [])
    moved = db.set_best_prices([(_row_id(p.action), _price(p.action)) for p in bests])
    for p in bests:
        p.done = p.action.position_id in moved

    missing = by_type.get(planner.MARK_MISSING, [])
    marked = db.merge_metadata_many([(_row_id(p.action), {"missing_since": (p.action.closed_at or now).isoformat(),
                                                          "missing_paused_at": None,
                                                          "missing_reads": p.action.metadata.get("missing_reads", 1)})
                                     for p in missing])
    for p in missing:
        p.done = p.action.position_id in marked

    paused = by_type.get(planner.PAUSE_MISSING, [])
    stopped = db.pause_missing_many([(_row_id(p.action), p.action.closed_at or now) for p in paused])
    for p in paused:
        p.done = p.action.position_id in stopped


def _row_id(action: Action) -> int:
    """The row a change is to: every change but a discovery names one (a plan without it is a bug, and
    fails its account alone)."""
    if action.position_id is None:
        raise ValueError(f"{action.type} {action.coin}: no position id")
    return action.position_id


def _size(action: Action) -> Decimal:
    if action.size is None:
        raise ValueError(f"{action.type} {action.coin}: no size")
    return action.size


def _price(action: Action) -> Decimal:
    if action.price is None:
        raise ValueError(f"{action.type} {action.coin}: no price")
    return action.price


def _followup(plan: AccountPlan, action: Action, now: datetime) -> NewFollowup | None:
    """The ``cancel_orphans`` follow-up a close leaves (none for a flip: see below)."""
    # A flip's new position began with the very fill that closed the old one: its orders (TP/SL placed
    # with the flip order) cannot be told from the old position's by time, so a flip records nothing.
    flipped = {a.metadata.get("flipped_from") for a in plan.actions if a.type == planner.DISCOVER}
    flat_since = "later_cycles_closed_at" in action.metadata  # flat now, and every later position closed too
    if (action.position_id in flipped or action.metadata.get("cycle_flipped")) and not flat_since:
        return None
    bound = close_bound_ms(action, now)
    next_at = action.metadata.get("next_cycle_at")
    if isinstance(next_at, str) and not flat_since:
        # A later position (open now, or whose snapshot lags) began at or before the bound: only orders placed
        # before it began are the row's.
        bound = min(bound, to_ms(datetime.fromisoformat(next_at)) - 1)
    reopened_at: set[int] = set()
    for a in plan.actions:
        if (a.type == planner.DISCOVER and a.opened_at is not None
                and a.metadata.get("reopened_after", object()) == action.position_id):
            reopened_at.add(to_ms(a.opened_at))
    if bound in reopened_at:
        bound -= 1  # re-opened in the close's millisecond: its orders may share it
    return NewFollowup(account_id=plan.account.id, coin=action.coin, kind=CANCEL_ORPHANS, not_after_ms=bound,
                       position_id=action.position_id)
