"""Closing positions on the exchange exactly once, and cleaning up orders a closed position leaves behind.

The order of steps is what makes a close exactly-once:

1. claim the row in SQL (``open -> closing`` with this attempt's cloid), committed before anything
   is sent; zero rows means another process owns the close;
2. send one reduce-only IOC order carrying that cloid and an ``expiresAfter`` inside the run's
   deadline;
3. record the outcome. When the answer is lost (timeout, crash), the row stays ``closing`` and
   the next run looks the cloid up once ``expiresAfter`` has passed, before anything is sent again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any, Callable

from monitor import planner
from monitor.clock import Clock, from_ms, to_ms
from monitor.database import Database
from monitor.exchange import Exchange, OpenOrder, ReadFailed, Trader, close_cloid
from monitor.fills import row_close_figures
from monitor.models import Account, ExchangeDataError
from monitor.planner import Action, PlanSettings, lookback

log = logging.getLogger(__name__)

ORDER_TTL_SECONDS = 10.0  # expiresAfter of a close order, at most
SETTLE_MARGIN_SECONDS = 2.0  # after expiresAfter, before the cloid is looked up


@dataclass
class CloseContext:
    db: Database
    epoch: int
    exchange: Exchange
    clock: Clock
    secret_key: str | None
    dry_run: bool
    slippage: Decimal
    max_failures: int
    seconds_left: Callable[[], float]
    mids: dict[str, Decimal]
    report: Any
    lock_lost: Callable[[], bool] = lambda: False
    plan_settings: PlanSettings = PlanSettings()
    meta: dict[str, Any] | None = None


def _rule(row: Any) -> str:
    return row.close_rule or "requested"


class CannotAct(Exception):
    """The configured key may not sign for this account: nothing is sent for it."""


class Closer:
    def __init__(self, ctx: CloseContext) -> None:
        self.ctx = ctx
        self._traders: dict[str, Trader] = {}
        self._vaults: dict[str, str | None] = {}

    def _key_master(self) -> str | None:
        """The account the key signs for: its master when it is an agent, itself when it is a user key."""
        if not hasattr(self, "_master"):
            from eth_account import Account as EthAccount

            assert self.ctx.secret_key is not None
            signer = EthAccount.from_key(self.ctx.secret_key).address.lower()
            role, linked = self.ctx.exchange.user_role(signer)
            self._master = linked if role == "agent" else signer if role == "user" else None
        return self._master

    def _vault_for(self, account: Account) -> str | None:
        """How the key may act for ``account`` (None: as itself/its master), or CannotAct."""
        if account.address in self._vaults:
            return self._vaults[account.address]
        master = self._key_master()
        if master is None:
            raise CannotAct("the key is neither an approved agent nor a funded account")
        if account.address == master:
            vault = None
        else:
            role, linked = self.ctx.exchange.user_role(account.address)
            if role != "subAccount" or linked != master:
                raise CannotAct(f"the key acts for {master}, which does not control {account.address}")
            vault = account.address
        self._vaults[account.address] = vault
        return vault

    def _trader(self, account: Account) -> Trader:
        ctx = self.ctx
        if ctx.meta is None:
            ctx.meta = ctx.exchange.read_meta()  # once per run, and only when an order is to be sent
        if account.address not in self._traders:
            assert ctx.secret_key is not None
            self._traders[account.address] = Trader(ctx.exchange, ctx.secret_key, account.address, ctx.meta,
                                                    vault_address=self._vault_for(account))
        return self._traders[account.address]

    def _note(self, text: str) -> None:
        log.info(text)
        self.ctx.report.notes.append(text)

    # ---- entry point ---------------------------------------------------------------------

    def handle(self, account: Account, actions: list[Action], closed_coins: dict[str, int | None], *,
               open_orders: list[OpenOrder] | None = None) -> None:
        for action in actions:
            try:
                if action.type == planner.CLOSE_ORDER:
                    self._close(account, action)
                elif action.type == planner.SETTLE_CLOSE:
                    self._settle(account, action)
            except ReadFailed as exc:
                self._note(f"{account.address} {action.coin}: {exc}; will retry next run")
        if closed_coins:
            try:
                self._cancel_orphans(account, closed_coins, open_orders)
            except ReadFailed as exc:
                self._note(f"{account.address}: could not check orders left by closed positions: {exc}")

    # ---- sending a close -------------------------------------------------------------------

    def _close(self, account: Account, action: Action) -> None:
        ctx = self.ctx
        if ctx.dry_run or ctx.secret_key is None:
            ctx.report.would_close += 1
            if ctx.secret_key is None and not ctx.dry_run:
                self._note(f"would close #{action.position_id} {action.coin} ({action.reason}):"
                           " no MONITOR_HL_SECRET_KEY, nothing sent")
            return
        if action.price is None:
            self._note(f"#{action.position_id} {action.coin}: no mid price, close postponed")
            return
        left = ctx.seconds_left()
        if left < SETTLE_MARGIN_SECONDS + 1:
            self._note(f"#{action.position_id} {action.coin}: too close to the run's deadline to send a close")
            return
        row = ctx.db.position(action.position_id)
        if row is None or row.status != "open":
            self._already(action)
            return
        try:
            trader = self._trader(account)  # before the claim: a key that cannot act leaves the row open
        except CannotAct as exc:
            ctx.report.would_close += 1
            self._note(f"would close #{row.id} {action.coin} ({action.reason}) but {exc}; nothing sent")
            return
        cloid = close_cloid(account.address, row.id, row.close_attempts + 1)
        now = ctx.clock.now()
        with ctx.db.fenced(ctx.epoch):
            claimed = ctx.db.claim_close(row.id, cloid=cloid, rule=action.reason or "requested", now=now,
                                         attempts=row.close_attempts)
        if not claimed:
            self._already(action)
            return
        expires_after = self._expires_after()
        if expires_after is None:
            # Too late to send safely (deadline, or the lock was lost): undo the claim; nothing was sent.
            with ctx.db.fenced(ctx.epoch):
                ctx.db.release_close(row.id, cloid=cloid, event="close_not_placed", error="run deadline reached")
            self._note(f"#{row.id} {action.coin}: not sent, the run is at its deadline; next run")
            return
        try:
            outcome = trader.close_ioc(action.coin, side=row.side, size=action.size or row.size, mid=action.price,
                                       slippage=ctx.slippage, cloid=cloid, expires_after_ms=expires_after)
        except ReadFailed as exc:
            ctx.report.close_orders_sent += 1
            self._note(f"#{row.id} {action.coin}: close order answer unknown ({exc.reason});"
                       f" settled by its cloid {cloid} next run")
            return
        ctx.report.close_orders_sent += 1
        ctx.report.actions.append(Action("close_sent", account.address, action.coin, position_id=row.id,
                                         reason=action.reason, size=outcome.filled_size,
                                         price=outcome.average_price, metadata={"outcome": outcome.kind,
                                                                                "cloid": cloid}))
        if outcome.kind == "filled":
            self._close_from_fills(account, row, action.reason)
        elif outcome.kind == "partial":
            with ctx.db.fenced(ctx.epoch):
                ctx.db.release_close(row.id, cloid=cloid, event="close_partial",
                                     error=f"partially filled: {outcome.filled_size} of {action.size}")
        elif outcome.kind == "no_position":
            # Already flat: the next run explains the close from fills (idempotent success).
            self._close_from_fills(account, row, "external")
        elif outcome.kind == "rejected":
            with ctx.db.fenced(ctx.epoch):
                ctx.db.release_close(row.id, cloid=cloid, event="close_failed", error=outcome.error)
            attempts = row.close_attempts + 1
            level = "ALERT: " if attempts >= ctx.max_failures else ""
            self._note(f"{level}#{row.id} {action.coin}: close rejected ({outcome.error}); attempt {attempts}")
        # "unknown": the row stays closing and is settled by its cloid next run.

    def _expires_after(self) -> int | None:
        """expiresAfter for an action signed now: at most ORDER_TTL ahead and never past the run's deadline
        (so a paused run's action cannot land after another run may have taken over). None: do not send."""
        ctx = self.ctx
        left = ctx.seconds_left() - SETTLE_MARGIN_SECONDS
        if ctx.lock_lost() or left < 1:
            return None
        return ctx.clock.now_ms() + int(min(ORDER_TTL_SECONDS, left) * 1000)

    def _already(self, action: Action) -> None:
        self.ctx.report.conflicts += 1
        self._note(f"#{action.position_id} {action.coin}: already closing or closed by another process")

    def _close_from_fills(self, account: Account, row: Any, reason: str | None) -> None:
        """Close ``row`` from its fills (the same window the planner uses), or leave it for the next run."""
        ctx = self.ctx
        position_id, coin = row.id, row.coin
        lookback_ms = int(lookback(row, ctx.plan_settings).total_seconds() * 1000)
        try:
            fills = ctx.exchange.read_fills(account.address, to_ms(row.opened_at) - lookback_ms)
        except ReadFailed as exc:
            self._note(f"#{position_id} {coin}: closed on the exchange; fills unreadable ({exc.reason}),"
                       " the row is settled next run")
            return
        try:
            figures = row_close_figures(fills, coin=coin, side=row.side, opened_ms=to_ms(row.opened_at),
                                        account=account.address, lookback_ms=lookback_ms)
        except ExchangeDataError:
            return  # fills do not chain yet; the next run settles the row
        if not figures.flat:
            return  # the fill is not visible yet; the row stays 'closing' and the next run settles it
        closed_at = from_ms(figures.closed_at_ms) if figures.closed_at_ms else ctx.clock.now()
        with ctx.db.fenced(ctx.epoch):
            done = ctx.db.close_position(
                position_id, closed_at=max(closed_at, row.opened_at),
                reason="liquidation" if figures.liquidated else (reason or "requested"),
                exit_price=figures.exit_price, realized_pnl=figures.realized_pnl, fees=figures.fees,
                metadata={"fills": figures.fill_count})
        if done:
            ctx.report.closed += 1
            self._cancel_orphans(account, {coin: figures.closed_at_ms})

    # ---- settling an unfinished close (crash recovery) ----------------------------------------

    def _settle(self, account: Account, action: Action) -> None:
        ctx = self.ctx
        row = ctx.db.position(action.position_id)
        if row is None or row.status != "closing" or not row.close_cloid:
            return
        started = row.close_started_at or ctx.clock.now()
        if ctx.clock.now() < started + timedelta(seconds=ORDER_TTL_SECONDS + SETTLE_MARGIN_SECONDS):
            self._note(f"#{row.id} {row.coin}: close order {row.close_cloid} may still land; settling later")
            return
        status = ctx.exchange.order_status(account.address, row.close_cloid)
        if ctx.dry_run:
            self._note(f"#{row.id} {row.coin}: unfinished close {row.close_cloid} is {status}; would settle it")
            return
        if status == "filled":
            # It executed; the snapshot may lag. Explain the close from fills, else wait for them.
            self._close_from_fills(account, row, _rule(row))
            return
        if status in ("open", "triggered"):
            self._note(f"#{row.id} {row.coin}: close order {row.close_cloid} is {status}; left to the exchange")
            return
        event = "close_not_placed" if status == "unknownOid" else "close_released"
        with ctx.db.fenced(ctx.epoch):
            ctx.db.release_close(row.id, cloid=row.close_cloid, event=event,
                                 error=f"order {row.close_cloid} {status}; position still open")
        self._note(f"#{row.id} {row.coin}: unfinished close {row.close_cloid} was {status}; row reopened for retry")

    # ---- orphaned orders -------------------------------------------------------------------

    def _cancel_orphans(self, account: Account, coins: dict[str, int | None],
                        orders: list[OpenOrder] | None = None) -> None:
        """Cancel the reduce-only and trigger orders a closed position left behind.

        ``coins`` maps each closed coin to its close time (ms). An order placed after the close belongs
        to a position opened since, and is kept.
        """
        ctx = self.ctx
        if orders is None:
            orders = ctx.exchange.read_open_orders(account.address)
        targets: list[OpenOrder] = [
            o for o in orders
            if o.coin in coins and (o.reduce_only or o.is_trigger)
            and (o.timestamp_ms is None or coins[o.coin] is None or o.timestamp_ms <= coins[o.coin])
        ]
        for order in targets:
            if ctx.dry_run or ctx.secret_key is None:
                ctx.report.actions.append(Action("cancel_order", account.address, order.coin,
                                                 reason="would cancel: position gone",
                                                 metadata={"oid": order.oid, "order_type": order.order_type}))
                continue
            try:
                trader = self._trader(account)
            except CannotAct as exc:
                self._note(f"{account.address}: would cancel order {order.oid} ({order.coin}) but {exc}")
                continue
            expires_after = self._expires_after()
            if expires_after is None:
                self._note(f"{account.address}: order {order.oid} left for the next run (deadline)")
                continue
            error = trader.cancel(order.coin, order.oid, expires_after)
            ctx.report.actions.append(Action("cancel_order", account.address, order.coin,
                                             reason="position gone" if error is None else f"cancel failed: {error}",
                                             metadata={"oid": order.oid, "order_type": order.order_type}))
