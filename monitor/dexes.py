"""Which perp dexes of which accounts a run reads (docs/design.md, "HIP-3 perp dexes"). Pure: no I/O here.

Every account's first (main) dex is always read. The HIP-3 dexes watched (``MONITOR_PERP_DEXES``: all that
``perpDexs`` lists, or the names given) cost one more ``clearinghouseState`` (weight 2) each per account:

* **full**: when reading every watched dex of every account fits in 3/4 of the weight the reads may spend
  (the rest is left for fills), every dex of every account is read;
* **targeted** otherwise: an account's HIP-3 dexes are read where it has open (or recently closed) rows,
  where the fills read for it this run show that dex (the runner adds those), and in a **rotating sweep**:
  the accounts, in a stable order, are split into ``groups`` turns, and the accounts of turn
  ``run_turn % groups`` read every watched dex. The sweep may spend a quarter of the read weight, so
  ``groups = ceil(accounts / max(1, (read_weight / 4) // (2 x dexes)))``: with the same accounts, dexes and
  budget, every watched dex of every account is read at least once in every ``groups`` consecutive runs of
  one lock (``run_turn`` is the run's lease epoch, which every run of that lock advances by one). The sweep's
  accounts rank with accounts that have rows, ahead of idle ones, when the budget defers accounts.

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


def plan_dex_reads(accounts: Sequence[Account], rows_by_account: Mapping[int, Sequence[PositionRow]],
                   recent_by_account: Mapping[int, Sequence[PositionRow]], known: Sequence[str],
                   watched: Collection[str], *, read_weight: int, run_turn: int) -> DexReads:
    """Which HIP-3 dexes each account reads this run (see the module's docstring)."""
    order = tuple(d for d in known if d in watched)
    plan = DexReads(known=list(known), watched=order)
    if not order or not accounts:
        return plan
    full_cost = len(accounts) * READ_WEIGHT_PER_DEX * len(order)
    main_cost = len(accounts) * READ_WEIGHT_PER_DEX
    if main_cost + full_cost <= max(0, read_weight) * FULL_SHARE[0] // FULL_SHARE[1]:
        return plan
    plan.full = False
    per_sweep_account = READ_WEIGHT_PER_DEX * len(order)
    per_run = max(1, (max(0, read_weight) * SWEEP_SHARE[0] // SWEEP_SHARE[1]) // per_sweep_account)
    ordered = sorted(accounts, key=lambda a: a.id)
    plan.groups = max(1, -(-len(ordered) // per_run))
    turn = run_turn % plan.groups
    plan.sweep = frozenset(a.id for i, a in enumerate(ordered) if i % plan.groups == turn)
    for account in accounts:
        if account.id in plan.sweep:
            plan.per_account[account.id] = frozenset(order)
            continue
        with_rows = {dex_of(r.coin) for r in (*rows_by_account.get(account.id, ()),
                                              *recent_by_account.get(account.id, ()))}
        plan.per_account[account.id] = frozenset(d for d in order if d in with_rows)
    return plan


def sweep_bound(accounts: int, dexes: int, read_weight: int) -> int:
    """The sweep's bound in runs for ``accounts`` accounts and ``dexes`` watched HIP-3 dexes (docs/design.md)."""
    if not dexes or not accounts:
        return 1
    per_run = max(1, (max(0, read_weight) * SWEEP_SHARE[0] // SWEEP_SHARE[1]) // (READ_WEIGHT_PER_DEX * dexes))
    return max(1, -(-accounts // per_run))
