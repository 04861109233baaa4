"""What a run's exit work will cost, held back from the weight budget before the reads spend it.

With hundreds of accounts the reads alone spend the whole per-run budget (2 per account), so a fired
rule's order, and the reads that explain its close, never found weight. The run now works out, after
``allMids`` and before any account is read, which rows need exit work this run and what it costs:

* an open row whose rule fires at this run's mids (the same ``planner.exit_rule`` the plan uses): its
  account's read and the fills read that checks its cycle, one order, the fills read that explains its
  close, the ``userFunding`` read for its funding, an open-orders read and two cancels (its own TP/SL left
  on the book) = ``ROW_CLOSE_WEIGHT`` (the fills reads with a plausible per-item surcharge, see
  ``FILLS_FIRST_READ_WEIGHT``);
* a row in ``closing``: its account's read, ``orderStatus`` for its cloid, then the same
  fills/funding/open-orders/cancels = ``ROW_SETTLE_WEIGHT``;
* pending cancels recorded by earlier runs (per account: an open-orders read + one per cancel);
* a row on a HIP-3 dex: that dex's read too, and once per such dex with an order to send, its ``meta``;
* once, when an order is to be sent: ``meta`` unless cached, the key's ``userRole`` unless cached,
  and a ``userRole`` per other account unless cached (a sub-account of the key's master).

A fired rule on an account the cached ``userRole`` answers say the key cannot act for (``blocked_accounts``)
costs nothing: no order can go out for it this run (the closer is told the same accounts, so an answer that
expires mid-run cannot let an order out for a row whose cycle the read phase did not check).

That sum, at most 4/5 of the budget (reads of accounts without exit work keep the rest; they can wait a
run, a fired stop loss cannot), is held back; the reads of the accounts with exit work (their positions,
and the fills that check a row's cycle before its order) and the closer draw from it, other reads never
do. Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Collection, Mapping, Sequence

from monitor.exchange import WEIGHT
from monitor.exchange import signer_address as signer_address  # re-exported for runner.py until it imports it
from monitor.models import Account, PositionRow, RoleAnswer, dex_of, key_can_act
from monitor.models import key_master as master_of
from monitor.planner import exit_rule

# Cached exchange answers (key_roles, exchange_meta) are trusted this long.
CACHE_TTL = timedelta(hours=1)
# A userRole answer that does not let the key act (the key not an approved agent, an account not a sub-account of
# its master) is trusted this long: without it every run asked again (60 each) and held a close's weight for each
# fired rule it could never send. Shorter than CACHE_TTL: nothing drops it when the user approves the key.
REFUSAL_CACHE_TTL = timedelta(minutes=10)
CANCELS_PER_ROW = 2
# A fills answer costs 1 more per 20 fills (monitor.exchange.item_surcharge). What a row's exit work will
# return is not known before: these are plausible figures, not bounds. A row's window (since it opened) read
# for the first time in a run: up to 200 fills (+10); the read again after the order fetches only what came
# since the first read (FillsCache): the order's own fills (+1). A busier account's first read costs more;
# the budget then charges what it really cost, and a row the reserve cannot pay for waits a run (exit_starved).
FILLS_FIRST_READ_WEIGHT = WEIGHT["userFillsByTime"] + 10  # 30
FILLS_REREAD_WEIGHT = WEIGHT["userFillsByTime"] + 1  # 21
# The account's own read and the fills read that checks the row's cycle before its order (drawn from the
# reserve: an account with exit work reads on it), then the order and what follows it.
ROW_READ_WEIGHT = WEIGHT["clearinghouseState"] + FILLS_FIRST_READ_WEIGHT  # 32
ROW_CLOSE_WEIGHT = (ROW_READ_WEIGHT + WEIGHT["exchange"] + FILLS_REREAD_WEIGHT + WEIGHT["userFunding"]
                    + WEIGHT["frontendOpenOrders"] + CANCELS_PER_ROW * WEIGHT["exchange"])  # 96
# A row in 'closing': its account's read, orderStatus, then its fills (the run's first read of them), its
# funding, open orders and the cancels.
ROW_SETTLE_WEIGHT = (WEIGHT["clearinghouseState"] + WEIGHT["orderStatus"] + FILLS_FIRST_READ_WEIGHT
                     + WEIGHT["userFunding"] + WEIGHT["frontendOpenOrders"]
                     + CANCELS_PER_ROW * WEIGHT["exchange"])  # 76
KEY_REFUSED = "the key is neither an approved agent nor a funded account"
RESERVE_SHARE_OF = (4, 5)  # the reserve is at most 4/5 of the run's budget: other accounts' reads can wait a run


@dataclass
class ExitReserve:
    weight: int = 0  # held back (capped)
    wanted: int = 0  # what the exit work would cost (uncapped)
    firing: list[int] = field(default_factory=list)  # row ids whose rule fires at this run's mids
    blocked: list[int] = field(default_factory=list)  # ... on accounts the key cannot act for: nothing held
    blocked_accounts: dict[int, str] = field(default_factory=dict)  # account id -> why the key cannot act for it
    closing: list[int] = field(default_factory=list)  # row ids in 'closing'
    urgent_accounts: set[int] = field(default_factory=set)  # accounts with exit work: read first

    def describe(self) -> str:
        capped = f" (capped from {self.wanted})" if self.wanted > self.weight else ""
        blocked = f" ({len(self.blocked)} more on accounts the key cannot act for)" if self.blocked else ""
        return (f"{self.weight} weight held for exit work{capped}: {len(self.firing)} rule(s) firing{blocked},"
                f" {len(self.closing)} close(s) to settle")


def firing(row: PositionRow, account: Account, mids: Mapping[str, Decimal], now: datetime) -> bool:
    """Whether the planner will ask for a close order for this row, given its snapshot agrees."""
    if row.status != "open" or row.closed_at is not None:
        return False
    mid = mids.get(row.coin)
    if mid is None:
        return False  # no mid, no order (the closer postpones it)
    rule, _ = exit_rule(row, mid, now, account.max_hold_seconds)
    return rule is not None


def exit_reserve(accounts: Sequence[Account], rows_by_account: Mapping[int, Sequence[PositionRow]],
                 mids: Mapping[str, Decimal], now: datetime, *, budget: int, can_send: bool,
                 meta_cached: bool = False, key_master: str | None = None,
                 cached_accounts: Collection[str] = (),
                 pending_cancels: Mapping[int, int] | None = None,
                 blocked_accounts: Mapping[int, str] | None = None) -> ExitReserve:
    """The weight this run's exit work needs (see the module's docstring).

    ``key_master``: the account the key acts for, when its role is cached (None: unknown, every
    account then counts a userRole). ``cached_accounts``: accounts whose role is cached.
    ``blocked_accounts``: accounts the key cannot act for (``blocked_by_roles``): their fired rules hold nothing.
    """
    reserve = ExitReserve(blocked_accounts=dict(blocked_accounts or {}))
    sending_accounts: list[Account] = []
    hip3_dexes: set[str] = set()
    for account in accounts:
        for row in rows_by_account.get(account.id, ()):
            # A row on a HIP-3 dex also needs that dex's read (2), and before its order that dex's meta (20).
            hip3 = WEIGHT["clearinghouseState"] if dex_of(row.coin) else 0
            if row.status == "closing" and row.closed_at is None:
                reserve.closing.append(row.id)
                reserve.urgent_accounts.add(account.id)
                reserve.wanted += (ROW_SETTLE_WEIGHT if can_send else WEIGHT["orderStatus"]) + hip3
            elif account.id in reserve.blocked_accounts and firing(row, account, mids, now):
                reserve.blocked.append(row.id)
            elif firing(row, account, mids, now):
                reserve.firing.append(row.id)
                reserve.urgent_accounts.add(account.id)
                if can_send:
                    reserve.wanted += ROW_CLOSE_WEIGHT + hip3
                    if hip3:
                        hip3_dexes.add(dex_of(row.coin))
                    if not sending_accounts or sending_accounts[-1] is not account:
                        sending_accounts.append(account)
        cancels = (pending_cancels or {}).get(account.id, 0)
        if cancels and can_send and account.id not in reserve.blocked_accounts:  # none go out this run
            reserve.urgent_accounts.add(account.id)
            reserve.wanted += WEIGHT["frontendOpenOrders"] + cancels * WEIGHT["exchange"]
    reserve.wanted += WEIGHT["meta"] * len(hip3_dexes)  # counted uncached: at most 20 a dex too many
    if sending_accounts:
        if not meta_cached:
            reserve.wanted += WEIGHT["meta"]
        if key_master is None:
            reserve.wanted += WEIGHT["userRole"]
        reserve.wanted += WEIGHT["userRole"] * sum(
            1 for a in sending_accounts if a.address != key_master and a.address not in cached_accounts)
    reserve.weight = min(reserve.wanted, budget * RESERVE_SHARE_OF[0] // RESERVE_SHARE_OF[1])
    return reserve


def blocked_by_roles(accounts: Sequence[Account], roles: Mapping[str, RoleAnswer],
                     signer: str) -> dict[int, str]:
    """The accounts the cached userRole answers (``roles``: address -> (role, linked), as ``key_roles`` keeps
    them) say ``signer``'s key cannot act for, with why: every account when the key itself is neither an
    approved agent nor a funded account; else any account but the key's master whose answer is not a
    sub-account of that master. An account without a cached answer is not blocked (it is asked when needed).
    The same rule as the closer's (``Closer._vault_for``)."""
    key = roles.get(signer)
    if key is None:
        return {}
    master = master_of(signer, key)
    blocked: dict[int, str] = {}
    for account in accounts:
        if master is None:
            blocked[account.id] = KEY_REFUSED
        elif account.address != master:
            answer = roles.get(account.address)
            if answer is not None and not key_can_act(signer, account.address, answer, master):
                blocked[account.id] = (f"the key acts for {master}, which does not control {account.address}"
                                       " (a cached userRole answer, asked again once ten minutes old)")
    return blocked
