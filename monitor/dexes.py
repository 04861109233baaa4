"""Which perp dexes of which accounts a run reads (docs/design.md, "HIP-3 perp dexes"). Pure: no I/O here.

Every account's first (main) dex is always read. The HIP-3 dexes watched (``MONITOR_PERP_DEXES``: all that
``perpDexs`` lists, or the names given) cost one more ``clearinghouseState`` (weight 2) each per account:

* **full**: when reading every watched dex of every account fits in 3/4 of the weight the reads may spend
  (the rest is left for fills), every dex of every account is read;
* **targeted** otherwise: an account's HIP-3 dexes are read where it has open (or recently closed) rows,
  where the fills read for it this run show that dex (the runner adds those), and in a **rotating sweep**:
  the accounts in id order, from the one after the stored **cursor** (wrapping), ``per_run`` of them a run,
  read every watched dex. The sweep may spend a quarter of the read weight, so ``per_run =
  max(1, (read_weight / 4) // (2 x dexes))`` and ``groups = ceil(accounts / per_run)``. The cursor (the id of
  the last account whose sweep read happened, kept per lock in the database) moves only past accounts whose
  sweep read did happen (``cursor_after``): an account deferred by the budget or the deadline, whose positions
  could not be read, or one of whose dexes found no weight, keeps its turn, and so does every account of a
  dry run or of a run limited to named accounts. So with the same accounts, dexes and budget, every watched
  dex of every account is read within ``groups`` runs that carry out their sweep. The sweep's accounts rank
  with accounts that have rows, ahead of idle ones, when the budget defers accounts.

A row whose dex was not read is never treated as missing (``AccountSnapshot.dexes_read``, the planner).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

from monitor.models import MAIN_DEX, Account, PositionRow, dex_of

READ_WEIGHT_PER_DEX = 2  # clearinghouseState
FULL_SHARE = (3, 4)  # every dex of every account when that fits in 3/4 of the read weight
SWEEP_SHARE = (1, 4)  # the rotating sweep may spend 1/4 of it


@dataclass
class DexReads:
    """The run's dex plan: which HIP-3 dexes each account reads (its main dex is always read)."""

    known: list[str] = field(default_factory=lambda: [MAIN_DEX])  # by perp_dex_index ("" first)
    watched: tuple[str, ...] = ()  # the HIP-3 dexes watched this run
    full: bool = True
    per_account: dict[int, frozenset[str]] = field(default_factory=dict)
    sweep: frozenset[int] = frozenset()  # accounts whose turn in the sweep this is (they read every dex)
    sweep_order: tuple[int, ...] = ()  # the same, in the order the cursor passes them
    groups: int = 1  # the sweep's bound, in runs

    def dexes_for(self, account_id: int) -> frozenset[str]:
        if self.full:
            return frozenset(self.watched)
        return self.per_account.get(account_id, frozenset())

    def describe(self) -> str:
        if not self.watched:
            return "perp dexes: the first dex only"
        if self.full:
            return f"perp dexes: every dex of every account ({', '.join(self.watched)})"
        return (f"perp dexes: targeted ({len(self.watched)} HIP-3 dex(es) watched; rows, fills and a sweep of"
                f" {len(self.sweep)} account(s), every account within {self.groups} run(s))")


def watched_dexes(known: Sequence[str], setting: tuple[str, ...] | None) -> tuple[tuple[str, ...], list[str]]:
    """The HIP-3 dexes to watch (in perpDexs order), and the configured names perpDexs does not list."""
    hip3 = [d for d in known if d != MAIN_DEX]
    if setting is None:
        return tuple(hip3), []
    return tuple(d for d in hip3 if d in setting), [d for d in setting if d not in hip3]


def reads_every_dex(accounts: int, dexes: int, read_weight: int) -> bool:
    """Whether reading every watched dex of every account fits (the "full" policy): no sweep, no cursor."""
    return accounts * READ_WEIGHT_PER_DEX * (1 + dexes) <= max(0, read_weight) * FULL_SHARE[0] // FULL_SHARE[1]


def plan_dex_reads(accounts: Sequence[Account], rows_by_account: Mapping[int, Sequence[PositionRow]],
                   recent_by_account: Mapping[int, Sequence[PositionRow]], known: Sequence[str],
                   watched: Collection[str], *, read_weight: int, cursor: int | None) -> DexReads:
    """Which HIP-3 dexes each account reads this run (see the module's docstring); ``cursor`` is the stored
    sweep cursor (None: from the first account)."""
    order = tuple(d for d in known if d in watched)
    plan = DexReads(known=list(known), watched=order)
    if not order or not accounts:
        return plan
    if reads_every_dex(len(accounts), len(order), read_weight):
        return plan
    plan.full = False
    per_run = max(1, (max(0, read_weight) * SWEEP_SHARE[0] // SWEEP_SHARE[1]) // (READ_WEIGHT_PER_DEX * len(order)))
    ordered = sorted(accounts, key=lambda a: a.id)
    plan.groups = max(1, -(-len(ordered) // per_run))
    start = next((i for i, a in enumerate(ordered) if cursor is not None and a.id > cursor), 0)
    plan.sweep_order = tuple(ordered[(start + k) % len(ordered)].id for k in range(min(per_run, len(ordered))))
    plan.sweep = frozenset(plan.sweep_order)
    for account in accounts:
        if account.id in plan.sweep:
            plan.per_account[account.id] = frozenset(order)
            continue
        with_rows = {dex_of(r.coin) for r in (*rows_by_account.get(account.id, ()),
                                              *recent_by_account.get(account.id, ()))}
        plan.per_account[account.id] = frozenset(d for d in order if d in with_rows)
    return plan


def cursor_after(plan: DexReads, cursor: int | None, done: Collection[int]) -> int | None:
    """The sweep's cursor after this run: past the accounts of its turn, in order, whose sweep read happened
    (``done``), up to the first that did not (it keeps its turn, and so do those after it)."""
    for account_id in plan.sweep_order:
        if account_id not in done:
            break
        cursor = account_id
    return cursor


def sweep_bound(accounts: int, dexes: int, read_weight: int) -> int:
    """The sweep's bound in runs for ``accounts`` accounts and ``dexes`` watched HIP-3 dexes (docs/design.md)."""
    if not dexes or not accounts:
        return 1
    per_run = max(1, (max(0, read_weight) * SWEEP_SHARE[0] // SWEEP_SHARE[1]) // (READ_WEIGHT_PER_DEX * dexes))
    return max(1, -(-accounts // per_run))
