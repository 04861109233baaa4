"""Closing positions on the exchange exactly once, and cleaning up orders a closed position leaves behind.

The order of steps is what makes a close exactly-once:

1. claim the row in SQL (``open -> closing`` with this attempt's cloid), committed before anything
   is sent; zero rows means another process owns the close;
2. send one reduce-only IOC order carrying that cloid and an ``expiresAfter`` inside the run's
   deadline;
3. record the outcome. When the answer is lost (timeout, crash), the row stays ``closing`` and
   the next run looks the cloid up once ``expiresAfter`` has passed, before anything is sent again.

On a HIP-3 dex the order carries no cloid (such orders are reported to fail silently, reference §4): the
claim's cloid stays the attempt's token in SQL only, the oid from the order's answer is recorded on the row
(``metadata.close_oids``, guarded by that token), and a lost answer is settled, once ``expiresAfter`` has
passed (the order can no longer land; an IOC never rests), from the row's cycle in the fills alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Callable, Mapping

from monitor import planner
from monitor.clock import Clock, ExchangeClock, from_ms, to_ms
from monitor.database import EXIT_RULE_COLUMNS, Database, Followup
from monitor.errors import ConfigError
from monitor.exchange import (
    OPEN_ORDER_LIMIT,
    BudgetExhausted,
    Exchange,
    FillsTruncated,
    OpenOrder,
    ReadFailed,
    Trader,
    close_cloid,
    hip3_assets,
    is_authorization_error,
    is_meta_error,
    is_open_order_limit_error,
    order_kind,
    orphaned_orders,
    signer_address,
)
from monitor.exit_budget import CACHE_TTL, KEY_REFUSED, REFUSAL_CACHE_TTL
from monitor.models import Account, Fill, dex_of, key_master
from monitor.planner import Action, PlanSettings, lookback
from monitor.report import Alert

log = logging.getLogger(__name__)

ORDER_TTL_SECONDS = 10.0  # expiresAfter of a close order, at most
SETTLE_MARGIN_SECONDS = 2.0  # after expiresAfter, before the cloid is looked up
# Fills the read phase got serve a settle only when read this much later still (their read time is the run's early,
# least-sampled estimate of the exchange's clock, and the exchange may index a fill a moment late).
KNOWN_FILLS_SLACK = 1.0
# expiresAfter, close_expires_at and the settle windows are in the exchange's time (the host's clock plus the
# offset this run measured, ``ExchangeClock``): the exchange judges expiry by its own clock (reference §3.3),
# so a host clock 30 s behind would otherwise sign every order already expired, and one 30 s ahead would look
# a cloid up while its order can still land.
CANCEL_ORPHANS = "cancel_orphans"  # followups.kind: cancel the orders a closed position left behind
MAIN_DEX = ""  # the meta cache is keyed by perp dex ('' = the first)


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
    lock_lost: Callable[[], bool] = lambda: False
    plan_settings: PlanSettings = PlanSettings()
    meta: dict[str, Any] | None = None
    exchange_clock: ExchangeClock | None = None  # None: the exchange's time is taken to be the host's
    nonces: Callable[[], int] | None = None  # the key's host-wide nonce source (monitor.lock.NonceSource)
    # The key when it is a file: read by the first signature that needs it (ConfigError when it cannot be;
    # that close or cancel is then not sent). ``nonces_for`` gives the nonce source of the key's address.
    load_key: Callable[[], str] | None = None
    nonces_for: Callable[[str], Callable[[], int]] | None = None
    perp_dexes: list[str] = field(default_factory=lambda: [MAIN_DEX])  # by perp_dex_index, from perpDexs
    # The dexes whose open orders count for the 1,000-open-orders rule (it counts the account's orders on every
    # dex): every dex perpDexs lists, watched or not; None when the dex list could not be had this run (then the
    # count is unknown). ``order_dexes_lookup``, when given, is asked instead, only when a close meets the rule
    # (a run with MONITOR_PERP_DEXES="" has no dex list of its own: it asks perpDexs then).
    order_dexes: list[str] | None = field(default_factory=lambda: [MAIN_DEX])
    order_dexes_lookup: Callable[[], list[str] | None] | None = None
    # Accounts the run found (from cached userRole answers, before its reads) the key cannot act for, with why:
    # refused all run long, so no order goes out for a row whose cycle the read phase did not check for one.
    cannot_act: Mapping[str, str] = field(default_factory=dict)

    @property
    def has_key(self) -> bool:
        """A key is configured (a key file is not read until a signature needs it)."""
        return self.secret_key is not None or self.load_key is not None

    def exchange_now_ms(self) -> int:
        return self.exchange_clock.now_ms() if self.exchange_clock is not None else self.clock.now_ms()


@dataclass
class CloseOutcome:
    """What the closer did this run, for the run's report (built once, from every phase's result)."""

    close_orders_sent: int = 0
    would_close: int = 0
    closed: int = 0
    conflicts: int = 0
    exit_starved: int = 0
    postponed_at_deadline: int = 0  # fired rules' orders not sent: too little of the run's time was left
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    followups: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    key_blocked: list[str] = field(default_factory=list)  # work not signed: the key file could not be read
    exit_blocked: set[str] = field(default_factory=set)  # accounts whose fired rule was refused (CannotAct) here




class CannotAct(Exception):
    """The configured key may not sign for this account: nothing is sent for it. ``key_refused``: the key itself
    acts for no one yet (not an approved agent): a follow-up then waits for it instead of being given up."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.key_refused = reason == KEY_REFUSED


class KeyUnreadable(Exception):
    """The key file could not be read when a signature needed it: nothing is sent, the work stays to do
    (unlike CannotAct, a follow-up is not moot: the orders are cancelled once the key can be read)."""


@dataclass(frozen=True)
class KnownFills:
    """An account's fills as the run's read phase got them: from ``since_ms``, read at ``read_ms`` (exchange time)."""

    fills: list[Fill]
    since_ms: int
    read_ms: int
    truncated: bool = False


class Closer:
    def __init__(self, ctx: CloseContext) -> None:
        self.ctx = ctx
        # Fills the read phase got, by address: a close to settle whose window they cover, read after its order
        # could last land, is settled from them (no second read of the same fills, which a busy account's
        # weight could starve run after run).
        self.known_fills: dict[str, KnownFills] = {}
        self.done = CloseOutcome()  # what this run did, for its report
        self._traders: dict[str, Trader] = {}
        # orders sent whose effect is read from fills next (in handle): (row, cloid, rule, partial, filled, oid)
        self._settles: dict[str, list[tuple[Any, str, str, bool, Decimal | None, int | None]]] = {}
        self._hip3: dict[str, tuple[int, int]] = {}  # HIP-3 coin -> (asset id, szDecimals), shared by the traders
        self._hip3_metas: set[str] = set()  # HIP-3 dexes whose meta is loaded (or was read fresh) this run
        self._vaults: dict[str, str | None] = {}
        self._blocked: dict[str, list[str]] = {}  # address -> fired rules not sent: the key cannot act for it

    def _key(self) -> str:
        """The signing key; its file is read here, by the first signature that needs it (KeyUnreadable)."""
        ctx = self.ctx
        if ctx.secret_key is not None:
            return ctx.secret_key
        assert ctx.load_key is not None
        try:
            ctx.secret_key = ctx.load_key()
        except ConfigError:
            raise KeyUnreadable("the key cannot be read") from None
        return ctx.secret_key

    def _signer(self) -> str:
        if not hasattr(self, "_signer_address"):
            self._signer_address = signer_address(self._key())
        return self._signer_address

    def _nonces(self) -> Callable[[], int] | None:
        ctx = self.ctx
        if ctx.nonces is None and ctx.nonces_for is not None:
            ctx.nonces = ctx.nonces_for(self._signer())
        return ctx.nonces

    def _role(self, address: str) -> tuple[str, str | None]:
        """userRole of ``address``, from the database cache (key_roles) while fresh, else asked (weight 60)."""
        ctx = self.ctx
        signer = self._signer()
        if not hasattr(self, "_cached_roles"):
            self._cached_roles = ctx.db.cached_roles(signer, CACHE_TTL, REFUSAL_CACHE_TTL)
        if address in self._cached_roles:
            return self._cached_roles[address]
        role, linked = ctx.exchange.user_role(address)
        # Every answer is kept: one that lets the key act for an hour, one that does not (a "missing" key may be
        # approved any minute) for REFUSAL_CACHE_TTL, so a fired rule the key cannot send costs no weight each run.
        if not ctx.dry_run:
            ctx.db.store_role(signer, address, role, linked)
            self._cached_roles[address] = (role, linked)
        return role, linked

    def _key_master(self) -> str | None:
        """The account the key signs for: its master when it is an agent, itself when it is a user key."""
        if not hasattr(self, "_master"):
            signer = self._signer()
            self._master = key_master(signer, self._role(signer))
        return self._master

    def _vault_for(self, account: Account) -> str | None:
        """How the key may act for ``account`` (None: as itself/its master), or CannotAct."""
        if account.address in self._vaults:
            return self._vaults[account.address]
        master = self._key_master()
        if master is None:
            raise CannotAct(KEY_REFUSED)
        if account.address == master:
            vault = None
        else:
            role, linked = self._role(account.address)
            if role != "subAccount" or linked != master:
                raise CannotAct(f"the key acts for {master}, which does not control {account.address}")
            vault = account.address
        self._vaults[account.address] = vault
        return vault

    def _meta(self, coin: str | None = None) -> dict[str, Any]:
        """meta of the main dex: once per run at most, from the database cache (exchange_meta) while fresh.
        A coin the cached meta does not list (a new listing) makes it read again."""
        ctx = self.ctx
        if ctx.meta is None:
            ctx.meta = ctx.db.cached_meta(MAIN_DEX, CACHE_TTL)
            self._meta_fresh = False
        listed = ctx.meta is not None and (coin is None or any(
            isinstance(a, dict) and a.get("name") == coin for a in ctx.meta.get("universe", [])))
        if not listed and not getattr(self, "_meta_fresh", False):
            ctx.meta = ctx.exchange.read_meta()
            self._meta_fresh = True
            self._traders.clear()  # built on the old meta
            if not ctx.dry_run:
                ctx.db.store_meta(MAIN_DEX, ctx.meta)
        assert ctx.meta is not None
        return ctx.meta

    def _dex_meta(self, coin: str) -> None:
        """A HIP-3 coin's asset id and szDecimals: its dex's meta from the cache while fresh (and listing the
        coin), else read (weight 20); the asset id from the dex's position in perpDexs. ReadFailed when the
        dex list or the meta cannot be had."""
        ctx = self.ctx
        dex = dex_of(coin)
        if coin in self._hip3:
            return
        if dex not in ctx.perp_dexes:
            raise ReadFailed("perpDexs", f"dex {dex!r} of {coin} is not in the perp dex list this run")
        index = ctx.perp_dexes.index(dex)
        meta = ctx.db.cached_meta(dex, CACHE_TTL) if dex not in self._hip3_metas else None
        if meta is not None:
            self._hip3.update(hip3_assets(dex, index, meta))
        if coin not in self._hip3 and dex not in self._hip3_metas:
            meta = ctx.exchange.read_meta(dex)
            if not ctx.dry_run:
                ctx.db.store_meta(dex, meta)
            self._hip3.update(hip3_assets(dex, index, meta))
        self._hip3_metas.add(dex)

    def _trader(self, account: Account, coin: str | None = None) -> Trader:
        ctx = self.ctx
        if account.address in ctx.cannot_act:  # refused this run before anything is read for it
            raise CannotAct(ctx.cannot_act[account.address])
        self._key()  # first: a key that cannot be read costs no meta read (KeyUnreadable)
        meta = self._meta(None if coin is not None and dex_of(coin) else coin)  # only when an order is to be sent
        if coin is not None and dex_of(coin):
            self._dex_meta(coin)
        if account.address not in self._traders:
            key = self._key()
            self._traders[account.address] = Trader(ctx.exchange, key, account.address, meta,
                                                    vault_address=self._vault_for(account), nonces=self._nonces(),
                                                    hip3=self._hip3)
        return self._traders[account.address]

    def _refused(self, account: Account, error: str | None, coin: str | None = None) -> None:
        """An order or cancel was refused: a "not authorized" kind drops the key's cached roles, a bad
        size/price the cached meta, so the next attempt asks the exchange again."""
        ctx = self.ctx
        if ctx.dry_run or not error:
            return
        if is_authorization_error(error):
            dropped = ctx.db.drop_roles(self._signer(), error)
            for name in ("_master", "_cached_roles"):
                self.__dict__.pop(name, None)
            self._vaults.clear()
            self._traders.clear()
            self._note(f"{account.address}: the exchange refused the key ({error[:80]});"
                       f" {dropped} cached role answer(s) dropped")
        elif is_meta_error(error):
            dex = dex_of(coin) if coin else MAIN_DEX
            ctx.db.drop_meta(dex)
            if dex:
                self._hip3 = {c: v for c, v in self._hip3.items() if dex_of(c) != dex}
                self._hip3_metas.discard(dex)
            else:
                ctx.meta = None
            self._traders.clear()

    def _exit_blocked(self, account: Account, what: str, why: str) -> None:
        """Not silent: exit work the key may not sign for (a fired rule; follow-up cancels while the key is not
        approved) is the alert ``exit_blocked:<address>`` until it can be done, or is no longer needed."""
        self.done.exit_blocked.add(account.address)
        blocked = self._blocked.setdefault(account.address, [])
        blocked.append(what)
        key = f"exit_blocked:{account.address}"
        self.done.alerts = [a for a in self.done.alerts if a.key != key]
        self.done.alerts.append(Alert(key, "exit_blocked", f"{account.address}: not sent, {', '.join(blocked)}:"
                                                           f" {why}"))

    def _note(self, text: str) -> None:
        log.info(text)
        self.done.notes.append(text)

    # ---- entry point ---------------------------------------------------------------------

    def send_orders(self, account: Account, actions: list[Action]) -> None:
        """Send the close orders of fired rules; what they did is settled from fills by ``handle`` later."""
        for action in actions:
            try:
                self._close(account, action)
            except ReadFailed as exc:
                self._note(f"{account.address} {action.coin}: {exc}; will retry next run")

    def handle(self, account: Account, actions: list[Action], closed_coins: dict[str, int | None], *,
               open_orders: dict[str, list[OpenOrder]] | None = None,
               followups: list[Followup] | None = None) -> None:
        """Send/settle closes, then the account's follow-ups: with a key (not a dry run) the closes this run
        applied were recorded as follow-ups in their own transactions, and every pending one is worked here."""
        self._closed_here = False
        for action in actions:
            try:
                if action.type == planner.CLOSE_ORDER:
                    self._close(account, action)
                elif action.type == planner.SETTLE_CLOSE:
                    self._settle(account, action)
            except ReadFailed as exc:
                self._note(f"{account.address} {action.coin}: {exc}; will retry next run")
        for row, cloid, rule, partial, filled, oid in self._settles.pop(account.address, []):
            try:
                self._settle_from_fills(account, row, cloid, rule, partial=partial, filled=filled, oid=oid)
            except ReadFailed as exc:
                self._note(f"#{row.id} {row.coin}: {exc}; the row is settled next run")
        if not self.ctx.dry_run and self.ctx.has_key:
            if closed_coins or followups or self._closed_here:
                # Orders read while planning serve for the planner's closes (their close times are past
                # fills); after a close sent here the book is read again.
                self._run_followups(account, None if self._closed_here else open_orders)
            return
        coins = dict(closed_coins)
        for followup in followups or ():
            self._note(f"pending follow-up #{followup.id} {account.address} {followup.coin}: {followup.kind}"
                       f" (orders placed up to {followup.not_after_ms} ms), {followup.attempts} failed attempt(s)"
                       + (f", last error: {followup.last_error}" if followup.last_error else ""))
            self.done.followups.append(followup_json(account, followup, followup.status))
            if followup.coin not in coins or coins[followup.coin] is not None:
                coins[followup.coin] = max(coins.get(followup.coin) or 0, followup.not_after_ms)
        if coins:
            try:
                self._cancel_orphans(account, coins, open_orders)
            except ReadFailed as exc:
                self._note(f"{account.address}: could not check orders left by closed positions: {exc}")

    # ---- sending a close -------------------------------------------------------------------

    def _close(self, account: Account, action: Action) -> None:
        ctx = self.ctx
        if ctx.dry_run or not ctx.has_key:
            self.done.would_close += 1
            if not ctx.has_key and not ctx.dry_run:
                self._note(f"would close #{action.position_id} {action.coin} ({action.reason}):"
                           " no MONITOR_HL_SECRET_KEY, nothing sent")
            return
        if action.price is None:
            self._note(f"#{action.position_id} {action.coin}: no mid price, close postponed")
            return
        left = ctx.seconds_left()
        if left < SETTLE_MARGIN_SECONDS + 1:
            self._postponed(f"#{action.position_id} {action.coin}: too close to the run's deadline to send a close")
            return
        assert action.position_id is not None  # the planner's close orders always name their row
        row = ctx.db.position(action.position_id)
        if row is None or row.status != "open":
            self._already(action)
            return
        if planner.exit_rule(row, action.price, ctx.clock.now(), account.max_hold_seconds)[0] is None:
            # `positions set` or `close --cancel` changed the row's rules since the plan read it
            self._note(f"#{row.id} {action.coin}: {action.reason} no longer fires (its rules changed); nothing sent")
            return
        try:
            trader = self._trader(account, action.coin)  # before the claim: a key that cannot act leaves the row open
        except KeyUnreadable:  # one line for the run (RunReport.key_error) names it; the rule stays armed
            self.done.would_close += 1
            self.done.key_blocked.append(f"close #{row.id} {action.coin} ({action.reason})")
            return
        except CannotAct as exc:
            self.done.would_close += 1
            self._note(f"would close #{row.id} {action.coin} ({action.reason}) but {exc}; nothing sent")
            self._exit_blocked(account, f"fired rule #{row.id} {action.coin} ({action.reason})", str(exc))
            return
        cloid = close_cloid(account.address, row.id, row.close_attempts + 1)
        expires_after = self._expires_after()
        if expires_after is None:
            # Too late to send safely (deadline, or the lock was lost): nothing is claimed, nothing sent.
            self._postponed(f"#{row.id} {action.coin}: not sent, the run is at its deadline; next run")
            return
        now = ctx.clock.now()
        with ctx.db.fenced(ctx.epoch):
            claimed = ctx.db.claim_close(row.id, cloid=cloid, rule=action.reason or "requested", now=now,
                                         attempts=row.close_attempts, expires_at=from_ms(expires_after),
                                         rules={column: getattr(row, column) for column in
                                                (*EXIT_RULE_COLUMNS, "close_requested_at")})
        if not claimed:
            self._already(action)
            return
        if ctx.lock_lost() or ctx.exchange_now_ms() >= expires_after - int(SETTLE_MARGIN_SECONDS * 1000):
            with ctx.db.fenced(ctx.epoch):
                ctx.db.release_close(row.id, cloid=cloid, event="close_not_placed", error="run deadline reached")
            self._postponed(f"#{row.id} {action.coin}: not sent, the run is at its deadline; next run")
            return
        hip3 = bool(dex_of(action.coin))
        try:
            # On a HIP-3 dex no cloid is sent (reported to make the order fail silently); the claim's cloid is
            # then only this attempt's token in SQL.
            outcome = trader.close_ioc(action.coin, side=row.side, size=action.size or row.size, mid=action.price,
                                       slippage=ctx.slippage, cloid=None if hip3 else cloid,
                                       expires_after_ms=expires_after)
        except BudgetExhausted:
            # Refused before anything was signed or sent (the order's weight is taken first): the claim is
            # let go at once, so the next run sends without waiting for this attempt to expire.
            with ctx.db.fenced(ctx.epoch):
                ctx.db.release_close(row.id, cloid=cloid, event="close_not_placed", error="weight budget spent")
            raise
        except ReadFailed as exc:
            self.done.close_orders_sent += 1
            how = "from fills once it has expired" if hip3 else f"by its cloid {cloid}"
            self._note(f"#{row.id} {action.coin}: close order answer unknown ({exc.reason}); settled {how} next run")
            return
        self.done.close_orders_sent += 1
        if hip3 and outcome.oid is not None:
            with ctx.db.fenced(ctx.epoch):
                ctx.db.record_close_oid(row.id, cloid=cloid, oid=outcome.oid)
        self.done.actions.append(Action("close_sent", account.address, action.coin, position_id=row.id,
                                         reason=action.reason, size=outcome.filled_size,
                                         price=outcome.average_price,
                                         metadata={"outcome": outcome.kind, "cloid": None if hip3 else cloid,
                                                   **({"oid": outcome.oid} if outcome.oid is not None else {})}))
        if outcome.kind in ("filled", "partial"):
            # A reduce-only order is capped at the position (a stale size reads as "partial"), and a position
            # that grew since the read is bigger than the order: the row's cycle in the fills decides.
            self._settles.setdefault(account.address, []).append(
                (row, cloid, action.reason or planner.claimed_rule(row), outcome.kind == "partial",
                 outcome.filled_size, outcome.oid))
        elif outcome.kind == "no_position":
            # Already flat: the row is closed from its fills, with whatever ended its cycle as the reason.
            self._settles.setdefault(account.address, []).append(
                (row, cloid, action.reason or planner.claimed_rule(row), True, None, None))
        elif outcome.kind == "rejected":
            with ctx.db.fenced(ctx.epoch):
                ctx.db.release_close(row.id, cloid=cloid, event="close_failed", error=outcome.error)
            self._refused(account, outcome.error, action.coin)
            attempts = row.close_attempts + 1
            if is_open_order_limit_error(outcome.error):
                self._open_order_limit(account, action, row, trader, outcome.error or "", attempts)
                return
            text = f"#{row.id} {action.coin}: close rejected ({outcome.error}); attempt {attempts}"
            if attempts >= ctx.max_failures:
                self.done.alerts.append(Alert(f"close_failed:{row.id}", "close_failed", f"{account.address} {text}"))
                text = "ALERT: " + text
            self._note(text)
        # "unknown": the row stays closing and is settled by its cloid next run.

    def _open_order_limit(self, account: Account, action: Action, row: Any, trader: Trader, error: str,
                          attempts: int) -> None:
        """The close was refused by the 1,000-open-orders rule (reference §5.3: with 1,000 or more other open
        orders a reduce-only order is rejected). The fallback, once per row and run: cancel this coin's own
        reduce-only orders (its TP/SL and other reduce-only orders, which the close would strand anyway; never
        an order that is not reduce-only, never another coin's), then send the close once more, now. If nothing
        could be cancelled, or the retry is refused again, the row stays open with its rule armed and the next
        run tries again (one order, and the fallback once more). Every refusal is the urgent alert
        ``close_blocked_open_orders:<id>``."""
        retry = action.metadata.get("open_order_limit_retry") is True
        head = (f"#{row.id} {action.coin}: close rejected by the open-order limit ({error}; Hyperliquid refuses"
                " reduce-only orders while the account has 1,000 or more open orders); attempt " + str(attempts))
        outcome = "the retry was refused too; the next run tries again"
        if not retry:
            outcome = self._cancel_for_close(account, action, trader)
        text = f"ALERT: {head}; {outcome}"
        # The account's address first: alert scoping takes the first address in the text (the exchange's error
        # may name another, e.g. the key's).
        self.done.alerts.append(Alert(f"close_blocked_open_orders:{row.id}", "close_blocked_open_orders",
                                      f"{account.address}: {text}"))
        self._note(text)
        if not retry and outcome.startswith("cancelled"):
            self._close(account, replace(action, metadata={**action.metadata, "open_order_limit_retry": True}))

    def _cancel_for_close(self, account: Account, action: Action, trader: Trader) -> str:
        """Cancel ``action.coin``'s reduce-only orders so that a close can be placed; what happened, in words
        (starting with "cancelled" when at least one order is gone and the close may be sent again)."""
        ctx = self.ctx
        try:
            orders = ctx.exchange.read_open_orders(account.address, dex_of(action.coin))
        except BudgetExhausted as exc:
            return f"open orders not read (weight budget: {exc}); nothing cancelled, the next run tries again"
        except ReadFailed as exc:
            return f"open orders unreadable ({exc}); nothing cancelled, the next run tries again"
        own = orphaned_orders(orders, action.coin, None)
        if not own:
            return (f"the account has {len(orders)} open orders and none of its {action.coin} orders is reduce-only;"
                    " nothing cancelled (orders that are not reduce-only are never cancelled): cancel orders by"
                    " hand; the next run tries again")
        total, where = len(orders), ""
        if total - len(own) < OPEN_ORDER_LIMIT:
            # The limit counts the account's open orders on every perp dex: this dex's alone cannot show that
            # cancelling frees a place. The other dexes are counted first; a count that cannot be had is unknown.
            others = self._other_dex_orders(account, dex_of(action.coin))
            if isinstance(others, str):
                return (f"{total} open order(s) on {action.coin}'s dex, but {others}: whether cancelling would free"
                        " a place is unknown, nothing cancelled; the next run tries again")
            count, dexes = others
            total += count
            where = f" on {dexes + 1} perp dexes" if dexes else ""
        left = total - len(own)
        if left >= OPEN_ORDER_LIMIT:
            # The close would be refused again: its stop orders are not stripped from a position for nothing.
            return (f"the account has {total} open orders{where}; without its {len(own)} reduce-only {action.coin}"
                    f" order(s) {left} would be left, still at the limit: nothing cancelled (orders that are not"
                    " reduce-only are never cancelled): cancel orders by hand; the next run tries again")
        expires_after = self._expires_after()
        if expires_after is None:
            return "not cancelled, the run is at its deadline; the next run tries again"
        try:
            results = trader.cancel_many(action.coin, [o.oid for o in own], expires_after)
        except (ReadFailed, BudgetExhausted) as exc:
            return f"cancelling {len(own)} reduce-only {action.coin} order(s) failed ({exc}); the next run tries again"
        by_oid = {o.oid: o for o in own}
        self._refused(account, next((f for f in results.values() if f is not None), None))
        for oid, failure in results.items():
            self.done.actions.append(Action(
                "cancel_order", account.address, action.coin, position_id=action.position_id,
                reason="open-order limit: to place the close" if failure is None else f"cancel failed: {failure}",
                metadata={"oid": oid, "order_type": by_oid[oid].order_type, "order_kind": order_kind(by_oid[oid])}))
        cancelled = [oid for oid, failure in results.items() if failure is None]
        if not cancelled:
            return f"none of {len(own)} reduce-only {action.coin} order(s) could be cancelled; the next run tries again"
        return (f"cancelled {len(cancelled)} of {len(own)} reduce-only {action.coin} order(s)"
                f" (the account had {total} open orders{where}); the close is sent once more")

    def _other_dex_orders(self, account: Account, own_dex: str) -> tuple[int, int] | str:
        """How many open orders the account has on the perp dexes other than ``own_dex`` (every dex the run's
        perp dex list names, weight 20 each), and on how many dexes they were counted; or why that is unknown
        (the dex list or a dex's orders could not be read, or the budget could not pay)."""
        ctx = self.ctx
        order_dexes = ctx.order_dexes if ctx.order_dexes_lookup is None else ctx.order_dexes_lookup()
        if order_dexes is None:
            return "the perp dex list could not be read this run (orders on other dexes unknown)"
        count, dexes = 0, 0
        for dex in order_dexes:
            if dex == own_dex:
                continue
            where = "the first dex" if dex == MAIN_DEX else f"dex {dex}"
            try:
                count += len(ctx.exchange.read_open_orders(account.address, dex))
            except BudgetExhausted as exc:
                return f"the open orders of {where} were not read (weight budget: {exc})"
            except ReadFailed as exc:
                return f"the open orders of {where} are unreadable ({exc})"
            dexes += 1
        return count, dexes

    def _expires_after(self) -> int | None:
        """expiresAfter for an action signed now: at most ORDER_TTL ahead and never past the run's deadline
        (so a paused run's action cannot land after another run may have taken over), in the exchange's time.
        None: do not send."""
        ctx = self.ctx
        left = ctx.seconds_left() - SETTLE_MARGIN_SECONDS
        if ctx.lock_lost() or left < 1:
            return None
        return ctx.exchange_now_ms() + int(min(ORDER_TTL_SECONDS, left) * 1000)

    def _postponed(self, note: str) -> None:
        """A close the run had no time left to send safely: the run overran (alert run_overran) and the
        next run sends it."""
        self.done.postponed_at_deadline += 1
        self._note(note)

    def _already(self, action: Action) -> None:
        self.done.conflicts += 1
        self._note(f"#{action.position_id} {action.coin}: already closing or closed by another process")

    def _settle_from_fills(self, account: Account, row: Any, cloid: str, rule: str, *, partial: bool,
                           filled: Decimal | None = None, oid: int | None = None,
                           release_event: str = "close_partial") -> bool | None:
        """Our close order executed (in full, in part, or we do not know how much): the row's own cycle in
        the fills decides. Ended: the row is closed with that cycle's figures (the rule is the reason when
        our order's fill ended it). Still open (a stale size, or a position that grew): the row goes back
        to ``open`` with the true size and its rule stays armed. No fill of ours visible yet after an order
        that filled in full: the row stays ``closing`` and the next run settles it by its cloid."""
        ctx = self.ctx
        position_id, coin = row.id, row.coin
        truncated = False
        since = to_ms(row.opened_at) - int(lookback(row, ctx.plan_settings).total_seconds() * 1000)
        known = self.known_fills.get(account.address)
        # When the claimed order could last land: its stored expiresAfter, or for a claim made before that was
        # stored the longest a claim's can be (as ``_settle``). None for an order sent in this run (``row`` is
        # the row as it was before its claim): the read phase's fills were read before it, never after.
        # (close_started_at is the host's time: moved to the exchange's by this run's measured offset.)
        offset = timedelta(milliseconds=ctx.exchange_clock.offset_ms() if ctx.exchange_clock else 0)
        expires = row.close_expires_at or (row.close_started_at + offset + timedelta(seconds=ORDER_TTL_SECONDS)
                                           if row.status == "closing" and row.close_started_at else None)
        try:
            # An order sent in this run is settled from a fresh read; so is an in-run partial fill. An expired
            # HIP-3 close (``release_event`` close_released) settles from the read phase's fills like any other.
            if (known is not None and (not partial or release_event != "close_partial") and expires is not None
                    and known.since_ms <= since
                    and known.read_ms >= to_ms(expires) + int((SETTLE_MARGIN_SECONDS + KNOWN_FILLS_SLACK) * 1000)):
                fills, truncated = known.fills, known.truncated  # read after the order could last land
            else:
                fills = ctx.exchange.read_fills(account.address, since)
        except FillsTruncated as exc:
            fills, truncated = exc.fills, True
        except ReadFailed as exc:
            self._note(f"#{position_id} {coin}: close order executed; fills unreadable ({exc.reason}),"
                       " the row is settled next run")
            if partial and release_event == "close_partial":
                self._release_partial(row, cloid, None, f"partially filled ({filled}); fills unreadable")
            return None
        own = planner.row_cycles_of(fills, row, account.address, ctx.plan_settings).own
        if own is None or own.broken:
            if partial and not (own is not None and own.broken and release_event != "close_partial"):
                return self._release_partial(row, cloid, None, f"partially filled ({filled}); fills do not"
                                             " show it yet" if release_event == "close_partial" else
                                             "close order expired; no fill of it", event=release_event)
            return None  # the next run settles the row
        if own.ended:
            ours = {cloid.lower()} | ({row.close_cloid.lower()} if row.close_cloid else set())
            oids = planner.row_order_ids(row) | ({oid} if oid is not None else set())
            mine = own.end_cloid in ours or own.end_oid in oids or planner.ended_by_own_order(row, own)
            reason = rule if mine and not own.liquidated else None
            close = planner.cycle_close(account.address, row, own, ctx.clock.now(), truncated=truncated,
                                        reason=reason)
            close, = attach_funding(ctx.exchange, account.address, [close])
            assert close.closed_at is not None and close.reason is not None  # cycle_close always sets both
            with ctx.db.fenced(ctx.epoch):
                done = ctx.db.close_position(position_id, closed_at=close.closed_at, reason=close.reason,
                                             exit_price=close.exit_price, realized_pnl=close.realized_pnl,
                                             fees=close.fees, metadata=close.metadata, funding=close.funding,
                                             net_pnl=close.net_pnl)
                if done and ctx.has_key:  # durable: the orders it leaves are cancelled by handle()
                    ctx.db.record_followup(account_id=account.id, coin=coin, kind=CANCEL_ORPHANS,
                                           position_id=position_id,
                                           not_after_ms=own.end_ms or ctx.exchange_now_ms())
            if done:
                self.done.closed += 1
                self.done.actions.append(close)
                self._closed_here = True
            return None
        if partial or cloid.lower() in own.cloids or (oid is not None and oid in own.oids):
            error = (f"filled {filled}; {own.size} still open" if release_event == "close_partial"
                     else f"close order expired; {own.size} still open")
            return self._release_partial(row, cloid, own, error, event=release_event)
        return None

    def _release_partial(self, row: Any, cloid: str, own: Any, error: str, event: str = "close_partial") -> bool:
        """closing -> open after an order that left part of the position; the true size from the row's cycle."""
        ctx = self.ctx
        with ctx.db.fenced(ctx.epoch):
            released = ctx.db.release_close(row.id, cloid=cloid, event=event, error=error)
            if released and own is not None and own.size > 0 and own.size != row.size:
                ctx.db.update_position(row.id, size=own.size, entry_price=row.entry_price, now=ctx.clock.now(),
                                       realized_pnl=own.realized_pnl, fees=own.fees, previous_size=row.size)
        if released:
            self._note(f"#{row.id} {row.coin}: close order {cloid} left part of the position ({error});"
                       " the rule stays armed")
        return released

    # ---- settling an unfinished close (crash recovery) ----------------------------------------

    def _settle(self, account: Account, action: Action) -> None:
        ctx = self.ctx
        assert action.position_id is not None  # the planner's settle actions always name their row
        row = ctx.db.position(action.position_id)
        if row is None or row.status != "closing" or not row.close_cloid:
            return
        # The order can land until its own expiresAfter (stored with the claim, in the exchange's time, so
        # compared with the exchange's time now); rows claimed before that was stored fall back to the
        # longest expiresAfter a claim can have.
        expires = row.close_expires_at or ((row.close_started_at or ctx.clock.now())
                                           + timedelta(seconds=ORDER_TTL_SECONDS))
        if from_ms(ctx.exchange_now_ms()) < expires + timedelta(seconds=SETTLE_MARGIN_SECONDS):
            self._note(f"#{row.id} {row.coin}: close order {row.close_cloid} may still land; settling later")
            return
        if dex_of(row.coin):
            self._settle_hip3(account, row, action)
            return
        status = ctx.exchange.order_status(account.address, row.close_cloid)
        if ctx.dry_run:
            self._note(f"#{row.id} {row.coin}: unfinished close {row.close_cloid} is {status}; would settle it")
            return
        if status == "filled":
            # It executed; the snapshot may lag. The row's cycle in the fills settles it, else wait for them.
            self._settle_from_fills(account, row, row.close_cloid, planner.claimed_rule(row), partial=False)
            return
        if status in ("open", "triggered"):
            self._note(f"#{row.id} {row.coin}: close order {row.close_cloid} is {status}; left to the exchange")
            return
        event = "close_not_placed" if status == "unknownOid" else "close_released"
        with ctx.db.fenced(ctx.epoch):
            ctx.db.release_close(row.id, cloid=row.close_cloid, event=event,
                                 error=f"order {row.close_cloid} {status}; position still open")
        self._note(f"#{row.id} {row.coin}: unfinished close {row.close_cloid} was {status}; row reopened for retry")
        then = action.metadata.get("then")
        if then and action.price is not None:  # the rule still fires (checked against fills): a new attempt now
            self._close(account, Action(planner.CLOSE_ORDER, account.address, row.coin, position_id=row.id,
                                        side=row.side, size=action.size, reason=then, price=action.price))

    def _settle_hip3(self, account: Account, row: Any, action: Action) -> None:
        """A HIP-3 close whose order has expired (it carried no cloid to look up): what it did is in the fills.
        The row's cycle ended: closed with its figures. Still open: back to ``open`` with the true size (the
        order can no longer land, and an IOC never rests), and a rule that still fires sends a new attempt."""
        ctx = self.ctx
        if ctx.dry_run:
            self._note(f"#{row.id} {row.coin}: unfinished HIP-3 close {row.close_cloid} has expired; would settle"
                       " it from fills")
            return
        released = self._settle_from_fills(account, row, row.close_cloid, planner.claimed_rule(row), partial=True,
                                           release_event="close_released")
        if not released:
            return
        self._note(f"#{row.id} {row.coin}: HIP-3 close {row.close_cloid} expired with the position still open;"
                   " row reopened for retry")
        then = action.metadata.get("then")
        if then and action.price is not None:  # the rule still fires (checked against fills): a new attempt now
            self._close(account, Action(planner.CLOSE_ORDER, account.address, row.coin, position_id=row.id,
                                        side=row.side, size=action.size, reason=then, price=action.price))

    # ---- orphaned orders -------------------------------------------------------------------

    def _cancel_orphans(self, account: Account, coins: dict[str, int | None],
                        orders: dict[str, list[OpenOrder]] | None = None) -> None:
        """Cancel the reduce-only orders (its TP/SL among them) a closed position left behind
        (``exchange.orphaned_orders``): never an order that is not reduce-only. Open orders are read per perp
        dex of the coins (``orders``: those read already, by dex).

        ``coins`` maps each closed coin to its close time (ms). An order placed after the close belongs
        to a position opened since, and is kept.
        """
        ctx = self.ctx
        read: dict[str, list[OpenOrder]] = dict(orders or {})
        for dex in sorted({dex_of(c) for c in coins} - set(read)):
            read[dex] = ctx.exchange.read_open_orders(account.address, dex)
        every = [o for dex_orders in read.values() for o in dex_orders]
        targets: list[OpenOrder] = [o for coin, bound in coins.items() for o in orphaned_orders(every, coin, bound)]
        for order in targets:
            if ctx.dry_run or not ctx.has_key:
                self.done.actions.append(Action("cancel_order", account.address, order.coin,
                                                 reason="would cancel: position gone",
                                                 metadata={"oid": order.oid, "order_type": order.order_type,
                                                           "order_kind": order_kind(order)}))
                continue
            try:
                trader = self._trader(account, order.coin)
            except KeyUnreadable:
                self.done.key_blocked.append(f"cancel of order {order.oid} ({order.coin})")
                continue
            except CannotAct as exc:
                self._note(f"{account.address}: would cancel order {order.oid} ({order.coin}) but {exc}")
                continue
            expires_after = self._expires_after()
            if expires_after is None:
                self._note(f"{account.address}: order {order.oid} left for the next run (deadline)")
                continue
            error = trader.cancel(order.coin, order.oid, expires_after)
            self._refused(account, error, order.coin)
            self.done.actions.append(Action("cancel_order", account.address, order.coin,
                                             reason="position gone" if error is None else f"cancel failed: {error}",
                                             metadata={"oid": order.oid, "order_type": order.order_type,
                                                       "order_kind": order_kind(order)}))

    # ---- durable follow-ups ---------------------------------------------------------------------

    def _run_followups(self, account: Account, orders: dict[str, list[OpenOrder]] | None) -> None:
        """Work every pending follow-up of ``account``: done when its cancels succeed, moot when no such
        order is left, else one more failed attempt (an alert from MONITOR_MAX_CLOSE_FAILURES on).

        Only reduce-only orders of the follow-up's coin placed at or before its close time are cancelled
        (``exchange.orphaned_orders``): a position opened since keeps its orders, and an order that is not
        reduce-only (a stop-entry trigger, a resting entry) is never touched. Open orders are read per perp dex
        of the follow-ups' coins; a dex whose orders cannot be read fails only its own follow-ups.
        """
        ctx = self.ctx
        pending = [f for f in ctx.db.pending_followups([account.id]).get(account.id, []) if f.kind == CANCEL_ORPHANS]
        if not pending or ctx.lock_lost():
            return
        refused = ctx.cannot_act.get(account.address)
        if refused is not None:
            # Refused by the answers cached before this run's reads: nothing can be cancelled, no orders are read.
            # Left pending (no attempt counted; an alert it had stays): the key not approved yet alerts until it
            # is; an account it does not control is asked again once that answer expires, then moot.
            self._note(f"{account.address}: {len(pending)} follow-up(s) wait, nothing cancelled: {refused}")
            for followup in pending:
                self.done.followups.append(followup_json(account, followup, "pending",
                                                         alert=followup.attempts >= ctx.max_failures))
                if refused == KEY_REFUSED:
                    self._exit_blocked(account, f"follow-up #{followup.id} ({followup.coin} orders)", refused)
            return
        by_dex: dict[str, list[OpenOrder]] = dict(orders or {})
        unreadable: dict[str, str] = {}
        for dex in sorted({dex_of(f.coin) for f in pending} - set(by_dex)):
            try:
                by_dex[dex] = ctx.exchange.read_open_orders(account.address, dex)
            except ReadFailed as exc:
                unreadable[dex] = str(exc)
        for followup in [f for f in pending if dex_of(f.coin) in unreadable]:
            self._followup_failed(account, followup, f"open orders unreadable ({unreadable[dex_of(followup.coin)]})")
        pending = [f for f in pending if dex_of(f.coin) not in unreadable]
        orders_list = [o for dex_orders in by_dex.values() for o in dex_orders]
        for followup in pending:
            targets = orphaned_orders(orders_list, followup.coin, followup.not_after_ms)
            if not targets:
                self._followup_finished(account, followup, "moot", "followup_moot", "no such order left", {})
                continue
            try:
                trader = self._trader(account, followup.coin)  # a coin listed since meta was cached reads it anew
            except CannotAct as exc:
                self._note(f"{account.address}: would cancel {len(targets)} order(s) ({followup.coin}) but {exc}")
                if exc.key_refused:  # the key may be approved any minute: pending (no attempt counted) until then
                    self.done.followups.append(followup_json(account, followup, "pending",
                                                             alert=followup.attempts >= ctx.max_failures))
                    self._exit_blocked(account, f"follow-up #{followup.id} ({followup.coin} orders)", str(exc))
                    continue
                self._followup_finished(account, followup, "moot", "followup_moot", str(exc)[:200],
                                        {"oids": [o.oid for o in targets]})
                continue
            except KeyUnreadable:  # left pending as it is (no attempt counted): done once the key can be read
                self.done.key_blocked.append(f"follow-up #{followup.id} ({followup.coin})")
                self.done.followups.append(followup_json(account, followup, "pending",
                                                         alert=followup.attempts >= ctx.max_failures))
                continue
            except ReadFailed as exc:
                self._followup_failed(account, followup, f"cannot sign ({exc})")
                continue
            cancelled: list[int] = []
            errors: list[str] = []
            for order in targets:
                expires_after = self._expires_after()
                if expires_after is None:
                    break
                try:
                    error = trader.cancel(order.coin, order.oid, expires_after)
                except ReadFailed as exc:
                    error = exc.reason
                self.done.actions.append(Action(
                    "cancel_order", account.address, order.coin, position_id=followup.position_id,
                    reason="position gone" if error is None else f"cancel failed: {error}",
                    metadata={"oid": order.oid, "order_type": order.order_type, "order_kind": order_kind(order),
                              "followup_id": followup.id}))
                if error is None:
                    cancelled.append(order.oid)
                else:
                    errors.append(f"order {order.oid}: {error}")
            if errors:
                self._followup_failed(account, followup, "cancel failed: " + "; ".join(errors),
                                      {"cancelled": cancelled})
            elif len(cancelled) < len(targets):
                self._note(f"follow-up #{followup.id} {account.address} {followup.coin}: left for the next run"
                           " (deadline)")
                self.done.followups.append(followup_json(account, followup, "pending"))
            else:
                self._followup_finished(account, followup, "done", "orders_cancelled", "position gone",
                                        {"oids": cancelled})

    def _followup_finished(self, account: Account, followup: Followup, status: str, event: str, reason: str,
                           details: dict[str, Any]) -> None:
        ctx = self.ctx
        with ctx.db.fenced(ctx.epoch):
            finished = ctx.db.finish_followup(followup, status=status, event=event, reason=reason, details=details)
        if finished:
            self.done.followups.append(followup_json(account, followup, status, reason=reason))

    def _followup_failed(self, account: Account, followup: Followup, error: str,
                         details: dict[str, Any] | None = None) -> None:
        ctx = self.ctx
        with ctx.db.fenced(ctx.epoch):
            attempts = ctx.db.fail_followup(followup, error=error, details=details)
        if attempts is None:
            return  # finished by another run meanwhile
        alert = attempts >= ctx.max_failures
        self._note(f"follow-up #{followup.id} {account.address} {followup.coin} ({followup.kind}): {error};"
                   f" attempt {attempts}, retried next run")
        self.done.followups.append(followup_json(account, followup, "pending", attempts=attempts, error=error,
                                                   alert=alert))


def attach_funding(exchange: Exchange, address: str, actions: list[Action]) -> list[Action]:
    """The closes among ``actions`` with their funding and net P&L: ``userFunding`` is read once, over the
    closes' windows, only when a row closes with figures (never in a quiet run). Unreadable (an error, a
    timeout, an invalid answer): the closes go ahead without funding (NULL, and ``metadata.funding_unread``),
    never with a zero that was not read. ``BudgetExhausted`` is raised: like any other read of the account
    that does not fit the run's weight, the work waits for the next run."""
    span = planner.funding_span(actions)
    if span is None:
        return actions
    try:
        return planner.with_funding(actions, exchange.read_funding(address, *span))
    except ReadFailed as exc:
        log.warning("%s: funding unreadable (%s); closing without it", address, exc,
                    extra={"event": "funding_unreadable", "account": address})
        return planner.with_funding(actions, None, str(exc))


def close_bound_ms(action: Action, now: datetime) -> int:
    """A planned close's cancel bound: its closing fill's own time (also for a row adopted after that fill,
    whose ``closed_at`` is its ``opened_at``), else when it was closed; later, when positions opened and
    closed after the row's own before this run saw them (``later_cycles_closed_at``): the last of those
    closes, so that their reduce-only orders are cancelled too."""
    fill_at = action.metadata.get("close_fill_at")
    bound = to_ms(datetime.fromisoformat(fill_at)) if isinstance(fill_at, str) else to_ms(action.closed_at or now)
    later = action.metadata.get("later_cycles_closed_at")
    if isinstance(later, str):
        bound = max(bound, to_ms(datetime.fromisoformat(later)))
    return bound


def followup_json(account: Account, followup: Followup, status: str, *, attempts: int | None = None,
                   error: str | None = None, reason: str | None = None, alert: bool = False) -> dict[str, Any]:
    """One follow-up as the run report's ``followups`` list shows it."""
    return {"id": followup.id, "account": account.address, "coin": followup.coin, "kind": followup.kind,
            "position_id": followup.position_id, "not_after_ms": followup.not_after_ms, "status": status,
            "attempts": followup.attempts if attempts is None else attempts,
            "error": error if error is not None else followup.last_error if status == "pending" else None,
            "reason": reason, "alert": alert}
