"""What a run reports: its counts, actions, notes and the alert conditions it saw, as typed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from monitor.errors import EXIT_ACCOUNT_FAILED, EXIT_CONFIG, EXIT_LOCK_HELD, EXIT_OK

if TYPE_CHECKING:
    from monitor.hedges import HedgeResult
    from monitor.planner import Action


@dataclass(frozen=True)
class Alert:
    """An alert condition a run observed: ``key`` identifies it across runs (README, "Alerts"), ``kind`` is
    its class (``close_failed``, ``exit_starved``, ``lock_stale_holder``, ...), ``text`` what to tell."""

    key: str
    kind: str
    text: str


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
    alerts: list[Alert] = field(default_factory=list)  # the conditions this run saw (README, "Alerts")
    failures: list[dict[str, str]] = field(default_factory=list)
    deferred_accounts: list[str] = field(default_factory=list)
    held_by_other_runs: list[dict[str, Any]] = field(default_factory=list)  # deferred: claimed by a live run
    notes: list[str] = field(default_factory=list)
    ok_account_ids: list[int] = field(default_factory=list)  # read and applied (not in the JSON)
    failed_account_ids: dict[int, str] = field(default_factory=dict)  # account id -> why (not in the JSON)
    followups: list[dict[str, Any]] = field(default_factory=list)  # follow-ups worked (or listed) this run
    overrun: bool = False
    fenced: bool = False
    requests: int = 0
    api_weight: int = 0  # what the exchange charges: base weights plus the per-item part of fills answers
    clock_offset_ms: int | None = None  # exchange time minus this host's (median of this run's samples)
    sql_statements: int = 0
    duration_seconds: float = 0.0
    stopped_exit_code: int | None = None  # the run was stopped by an exception (a fault, a signal): its code
    error: str | None = None  # what stopped it, one line
    hedges: list[HedgeResult] = field(default_factory=list)  # each judged hedge group's verdict this run
    hedges_held: list[str] = field(default_factory=list)  # active groups outside this run's accounts (not in JSON)
    # accounts the key cannot act for whose fired rule this run did not get to (a failed read, no order planned):
    # their exit_blocked alert is left as it is (not in JSON)
    exit_blocked_held: list[str] = field(default_factory=list)
    # a narrowed run's scope, for its alerts (not in JSON): the shard ("shard-1-of-2") its run-wide alert keys
    # carry, and the accounts (--shard, --account) whose account-keyed alerts it may count and resolve
    shard: str | None = None
    scope_addresses: list[str] | None = None

    @property
    def hedges_not_balanced(self) -> list[HedgeResult]:
        return [h for h in self.hedges if h.status != "balanced"]
    key_error: str | None = None  # the key file could not be read when an order was to be signed (exit 78)
    key_read: bool = False  # the key was read successfully this run (not in JSON): only then is key_unreadable resolved

    @property
    def exit_code(self) -> int:
        if self.stopped_exit_code is not None:
            return self.stopped_exit_code
        if self.fenced:
            return EXIT_LOCK_HELD
        if self.key_error is not None:
            return EXIT_CONFIG
        return EXIT_ACCOUNT_FAILED if self.accounts_failed else EXIT_OK

    @property
    def changed(self) -> bool:
        return bool(self.discovered or self.updated or self.closed or self.close_orders_sent or self.failures
                    or self.would_close
                    or self.exit_starved or self.hedges_not_balanced)

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
            "hedges": [h.to_json() for h in self.hedges],
            "overrun": self.overrun,
            "requests": self.requests,
            "api_weight": self.api_weight,
            "clock_offset_ms": self.clock_offset_ms,
            "sql_statements": self.sql_statements,
            "duration_seconds": round(self.duration_seconds, 3),
            "exit_code": self.exit_code,
            "error": self.error,
            "actions": [a.to_json() for a in self.actions],
            "alerts": [{"key": a.key, "kind": a.kind, "text": a.text} for a in self.alerts],
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
        from monitor.hedges import format_decimal  # hedges imports nothing of this module at run time

        imbalanced = [h for h in self.hedges if h.status == "imbalanced"]
        unknown = [h for h in self.hedges if h.status == "unknown"]
        if imbalanced:
            tail += "; hedges imbalanced: " + ", ".join(
                f"{h.name} (net {format_decimal(h.net) if h.net is not None else None} {h.coin}, tolerance"
                f" {format_decimal(h.tolerance)})" for h in imbalanced)
        if unknown:
            tail += "; hedges unknown: " + ", ".join(h.name for h in unknown)
        return f"{head}{', '.join(parts)}; {accounts}{tail}"
