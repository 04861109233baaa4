"""Telling the outside world how runs go: a metrics file, a dead man's switch ping, alerts.

Three outputs, each optional and each unable to break a run:

* ``write_metrics_file``: the last run's figures in the Prometheus text format, for node_exporter's
  textfile collector, replaced atomically so a scrape never reads half a file.
* ``Pinger``: healthchecks.io-style pings (``/start``, success, ``/<exit code>``), so a monitor
  that stops running at all is noticed by someone else.
* ``decide_alerts`` (pure) and ``send_webhook``: which conditions deserve a message this run, with
  a streak threshold, a resend throttle and a single "resolved" message; then a Slack-compatible
  webhook to say it.

No SQL, no HTTP client and no command-line code live here (the POSTs go through ``monitor.webhooks``):
the runner persists ``AlertState`` in ``monitor_alerts`` and calls these functions. Network helpers
never raise: a failed ping or webhook logs one warning line (without the URL's secret parts) and
returns False.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from monitor import webhooks

log = logging.getLogger(__name__)

PREFIX = "position_monitor_"
# Action kinds always written (as 0 when absent) so their series do not vanish on a quiet run.
DEFAULT_ACTION_KINDS = ("discovered", "updated", "closed", "close_orders_sent", "conflicts")
# Alert kinds that are sent the first run they are seen, whatever the threshold.
IMMEDIATE_KINDS = frozenset({"liquidation", "close_failed", "run_overran", "followup_failed", "exit_starved",
                             "close_blocked_open_orders", "hedge_imbalance_urgent", "hedge_external_stale",
                             "key_unreadable"})
PING_BODY_LIMIT = 10_000  # characters; healthchecks stores the first 100 kB
WEBHOOK_TEXT_LIMIT = 3_500  # characters; well inside Slack's limits for one message


# -- metrics file ---------------------------------------------------------------------------------


@dataclass
class RunMetrics:
    """What one run reports to Prometheus. Timestamps are Unix epoch seconds."""

    run_started: float
    run_finished: float
    last_success: float | None = None
    exit_code: int = 0
    dry_run: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    open_positions_by_account: dict[str, int] = field(default_factory=dict)
    accounts_failed: int = 0
    accounts_ok: int = 0
    lock_busy: bool = False
    api_weight: int = 0
    requests: int = 0
    # per account: realized_pnl and fees summed over its closed rows, open_notional over its open ones
    money_by_account: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    # per judged hedge group: (name, coin, status, net); net is None when the status is unknown
    hedges: list[tuple[str, str, str, Decimal | None]] = field(default_factory=list)


def escape_label_value(value: str) -> str:
    """A label value for the text exposition format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float | int | bool | Decimal) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Decimal):  # money: written as its exact decimal text, never through a float
        return format(value, "f") if value.is_finite() else "NaN"
    if isinstance(value, int):
        return str(value)
    value = float(value)  # a metric sample (timestamps, counts), not money
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render_metrics(m: RunMetrics) -> str:
    """The metrics file's text: gauges (fees_total a counter), with HELP and TYPE lines, series sorted."""
    out: list[str] = []

    def gauge(name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float | int | bool | Decimal]],
              kind: str = "gauge") -> None:
        full = PREFIX + name
        out.append(f"# HELP {full} {_escape_help(help_text)}")
        out.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{escape_label_value(str(v))}"' for k, v in labels.items())
            out.append(f"{full}{{{text}}} {_format_value(value)}" if text else f"{full} {_format_value(value)}")

    # Timestamps and durations below are floats by nature (Unix seconds), not money.
    gauge("last_run_timestamp_seconds", "When the last run finished (Unix time).", [({}, float(m.run_finished))])
    if m.last_success is not None:
        gauge("last_success_timestamp_seconds", "When the last run that exited 0 finished (Unix time).",
              [({}, float(m.last_success))])  # Unix seconds, not money
    gauge("run_duration_seconds", "How long the last run took.",
          [({}, max(0.0, float(m.run_finished) - float(m.run_started)))])  # duration, not money
    counters = dict.fromkeys(DEFAULT_ACTION_KINDS, 0)
    counters.update(m.counters)
    gauge("run_actions", "Actions taken by the last run, by kind (a per-run count, not a running total).",
          [({"kind": kind}, int(counters[kind])) for kind in sorted(counters)])
    gauge("open_positions", "Open positions per watched account after the last run.",
          [({"account": account}, int(m.open_positions_by_account[account]))
           for account in sorted(m.open_positions_by_account)])
    gauge("accounts_failed", "Accounts the last run could not read or write.", [({}, int(m.accounts_failed))])
    gauge("accounts_ok", "Accounts the last run reconciled.", [({}, int(m.accounts_ok))])
    gauge("lock_busy", "1 if the last run found another run holding the lock and exited 75.",
          [({}, bool(m.lock_busy))])
    gauge("exit_code", "The last run's exit code.", [({}, int(m.exit_code))])
    gauge("dry_run", "1 if the last run was a dry run.", [({}, bool(m.dry_run))])
    gauge("api_weight", "Hyperliquid API weight the last run spent.", [({}, int(m.api_weight))])
    gauge("http_requests", "HTTP requests the last run made to Hyperliquid.", [({}, int(m.requests))])
    if m.money_by_account:  # read from the positions table after the run (absent when it could not be read)
        money = m.money_by_account
        gauge("realized_pnl_total", "Realized P&L (the exchange's gross closedPnl) summed over the account's closed"
              " positions, in USDC; a running sum that falls with losses (use delta(), not increase()).",
              [({"account": a}, money[a]["realized_pnl"]) for a in sorted(money)])
        gauge("fees_total", "Fees summed over the account's closed positions, in USDC.",
              [({"account": a}, money[a]["fees"]) for a in sorted(money)], kind="counter")
        gauge("open_notional", "Size x entry price summed over the account's open positions, in USDC.",
              [({"account": a}, money[a]["open_notional"]) for a in sorted(money)])
    if m.hedges:  # the groups the last run judged (README, "Hedge groups")
        known = sorted((h for h in m.hedges if h[3] is not None), key=lambda h: h[0])
        gauge("hedge_net", "A hedge group's net exposure (sum of signed size x ratio over its legs, external legs"
              " included) in the last run, in the coin's units; absent while the group is unknown.",
              [({"group": name, "coin": coin}, net) for name, coin, _, net in known if net is not None])
        gauge("hedge_imbalanced", "1 when a hedge group's |net| exceeded its tolerance in the last run, 0 when"
              " balanced; absent while the group is unknown.",
              [({"group": name}, status == "imbalanced") for name, _, status, _ in known])
        gauge("hedge_unknown", "1 when a hedge group's net could not be known in the last run (a leg's account or"
              " dex not read, an external leg stale).",
              [({"group": name}, status == "unknown") for name, _, status, _ in sorted(m.hedges)])
    return "\n".join(out) + "\n"


def write_metrics_file(path: Path, m: RunMetrics) -> None:
    """Replace ``path`` with the metrics for ``m``, atomically.

    The text goes to a hidden temporary file in the same directory (named without the ``.prom``
    suffix, so the textfile collector never reads it), is fsynced, made world-readable (0644, for
    node_exporter running as another user) and renamed over ``path``; the directory is then
    fsynced. On any error the temporary file is removed and the old file is left as it was; the
    error (OSError) propagates: the caller decides whether a metrics fault matters.
    """
    path = Path(path)
    with _metrics_lock(path):
        _replace_file(path, render_metrics(m).encode("utf-8"))


LOCK_BUSY_LINE = f"{PREFIX}lock_busy "


def mark_lock_busy(path: Path) -> None:
    """A run that found the lock busy: set ``lock_busy`` to 1 in the metrics file and change nothing else
    (every other figure is the last run's, the holder's to write). Under the same file lock as
    ``write_metrics_file``, so the holder's own write is never lost. No file yet: the gauge alone."""
    path = Path(path)
    with _metrics_lock(path):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        if any(line.startswith(LOCK_BUSY_LINE) for line in lines):
            lines = [LOCK_BUSY_LINE + "1" if line.startswith(LOCK_BUSY_LINE) else line for line in lines]
        else:
            lines += [f"# HELP {PREFIX}lock_busy 1 if the last run found another run holding the lock and exited 75.",
                      f"# TYPE {PREFIX}lock_busy gauge", LOCK_BUSY_LINE + "1"]
        _replace_file(path, ("\n".join(lines) + "\n").encode("utf-8"))


@contextmanager
def _metrics_lock(path: Path, timeout: float = 10.0) -> Iterator[None]:
    """The metrics file's writers take turns: an exclusive flock on its directory (no file of ours beside
    it; released when the holder dies). A timeout is an OSError, like every other fault here."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, "another run is writing the metrics file") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace_file(path: Path, text: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# -- HTTP helpers ---------------------------------------------------------------------------------


def _post(url: str, what: str, timeout: float, *, data: bytes | None = None, json: Any = None,
          content_type: str | None = None) -> bool:
    """POST through ``monitor.webhooks`` and report success as a bool; a fault is one warning line."""
    failure = webhooks.post(url, timeout, data=data, json=json, content_type=content_type)
    if failure is not None:
        log.warning("%s to %s failed: %s", what, webhooks.redacted(url), failure)
        return False
    return True


class Pinger:
    """healthchecks.io-style pings: ``start()``, ``success()``, ``failure(exit_code)``.

    ``url`` is the check's ping URL (``https://hc-ping.com/<uuid>`` or a self-hosted equivalent);
    None makes every method a no-op that returns True. Each ping is a POST whose body may carry a
    short text (truncated to ``PING_BODY_LIMIT`` characters). ``run_id``, when set, is sent as the
    ``rid`` query parameter (normalised to the dashed UUID form healthchecks expects when it is a
    UUID), so healthchecks pairs each start with its end. ``timeout`` bounds the connect and each
    read. Methods return True when the ping was accepted (HTTP 2xx) and False otherwise; they
    never raise.
    """

    def __init__(self, url: str | None, timeout: float = 5, *, run_id: str | None = None) -> None:
        self.url = url.rstrip("/") if url else None
        self.timeout = timeout
        self.run_id = run_id

    def ping_url(self, suffix: str = "") -> str:
        """The URL a ping with this suffix ("", "start", "fail" or an exit code) goes to."""
        if self.url is None:
            raise ValueError("no ping URL configured")
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/") + (f"/{suffix}" if suffix else "")
        query = parse_qsl(parts.query, keep_blank_values=True)
        if self.run_id:
            query = [(k, v) for k, v in query if k != "rid"] + [("rid", _rid(self.run_id))]
        return urlunsplit(parts._replace(path=path, query=urlencode(query)))

    def _ping(self, suffix: str, body: str | None) -> bool:
        if self.url is None:
            return True
        data = (body or "")[:PING_BODY_LIMIT].encode("utf-8", errors="replace")
        try:
            url = self.ping_url(suffix)
        except ValueError:  # a malformed URL (config validates it; stay safe anyway)
            log.warning("ping %s failed: the ping URL cannot be parsed", suffix or "success")
            return False
        return _post(url, f"ping {suffix or 'success'}", self.timeout, data=data,
                     content_type="text/plain; charset=utf-8")

    def start(self, body: str | None = None) -> bool:
        """The run has started (healthchecks measures the run time from here)."""
        return self._ping("start", body)

    def success(self, body: str | None = None) -> bool:
        """The run finished well."""
        return self._ping("", body)

    def failure(self, exit_code: int | None = None, body: str | None = None) -> bool:
        """The run failed: ``/<exit_code>`` (healthchecks treats non-zero as failure), ``/fail`` if
        the code is unknown, 0 (that would read as success) or outside 1..255."""
        suffix = str(exit_code) if exit_code is not None and 1 <= exit_code <= 255 else "fail"
        return self._ping(suffix, body)

    def finish(self, exit_code: int, body: str | None = None) -> bool:
        """``success()`` for exit code 0, otherwise ``failure(exit_code)``."""
        return self.success(body) if exit_code == 0 else self.failure(exit_code, body)


def _rid(run_id: str) -> str:
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        return run_id


def send_webhook(url: str, text: str, *, timeout: float = 5) -> bool:
    """POST ``{"text": text}`` (Slack-compatible) to ``url``; True on HTTP 2xx. Never raises.

    Text longer than ``WEBHOOK_TEXT_LIMIT`` characters is cut, with a marker saying so.
    """
    if len(text) > WEBHOOK_TEXT_LIMIT:
        text = text[:WEBHOOK_TEXT_LIMIT - 20] + "\n... (truncated)"
    return _post(url, "alert webhook", timeout, json={"text": text})


# -- alert decisions (pure) -----------------------------------------------------------------------


@dataclass
class AlertState:
    """One alert condition's memory between runs (a ``monitor_alerts`` row).

    ``streak`` counts consecutive runs the condition was observed; ``active`` means an alert was
    sent and no "resolved" message yet. The ``*_at`` fields mirror the table's columns.
    """

    key: str
    kind: str
    streak: int = 0
    active: bool = False
    message: str = ""
    last_sent_at: datetime | None = None
    first_seen_at: datetime | None = None
    last_seen_at: datetime | None = None
    resolved_at: datetime | None = None


def _normalise_observed(observed: Mapping[str, tuple[str, str]] | Collection[str]) -> dict[str, tuple[str, str]]:
    if isinstance(observed, Mapping):
        return {key: (kind, message) for key, (kind, message) in observed.items()}
    return {key: (key.split(":", 1)[0], key) for key in observed}


def decide_alerts(
    previous: Mapping[str, AlertState],
    observed: Mapping[str, tuple[str, str]] | Collection[str],
    now: datetime,
    *,
    threshold_runs: int,
    resend_after: timedelta | None,
    immediate: Collection[str] = IMMEDIATE_KINDS,
) -> tuple[dict[str, AlertState], list[tuple[str, str]], list[tuple[str, str]]]:
    """Decide this run's alerts from the previous states and the conditions observed now.

    ``observed`` maps an alert key (``"account_failed:0xabc"``, ``"lock_busy"``...) to
    ``(kind, message)``; a plain collection of keys also works (kind = the part before ``:``,
    message = the key). For each key:

    * observed: ``streak`` += 1 and the message is refreshed. An inactive alert becomes active and
      is sent when the streak reaches ``threshold_runs`` (1 for kinds in ``immediate``). An active
      one is sent again only when ``resend_after`` has passed since ``last_sent_at`` (None: never
      resent), with "(still present, N runs)" appended; one whose kind moves into ``immediate`` this run
      (``hedge_imbalance`` escalating to ``hedge_imbalance_urgent``) is sent again at once. While an alert stays
      active its kind never moves back out of ``immediate`` (only the resolve ends it), so an escalation is sent
      once per activation.
    * not observed: the streak resets to 0; an active alert is resolved once (``"resolved: " +
      its message``) and becomes inactive.

    Returns ``(new_states, to_send, to_resolve)``; the two lists hold ``(key, message)`` sorted by
    key. ``new_states`` holds every key that was observed, is active, or changed this run; a key
    of ``previous`` missing from it was already idle (inactive, streak 0) and can be forgotten.
    The function does no I/O and does not modify ``previous``.
    """
    if threshold_runs < 1:
        raise ValueError("threshold_runs must be at least 1")
    if resend_after is not None and resend_after < timedelta(0):
        raise ValueError("resend_after must not be negative")
    seen = _normalise_observed(observed)
    new_states: dict[str, AlertState] = {}
    to_send: list[tuple[str, str]] = []
    to_resolve: list[tuple[str, str]] = []
    for key in sorted(set(previous) | set(seen)):
        before = previous.get(key)
        if key in seen:
            kind, message = seen[key]
            state = replace(before) if before is not None else AlertState(key=key, kind=kind)
            if before is not None and before.active and before.kind in immediate and kind not in immediate:
                # an active alert never downgrades (only its resolve does): a value oscillating around the
                # urgent boundary must not re-send the escalation every other run
                kind = before.kind
            state.kind, state.message = kind, message
            if state.streak == 0 or state.first_seen_at is None:
                state.first_seen_at = now
            state.streak += 1
            state.last_seen_at = now
            needed = 1 if kind in immediate else threshold_runs
            if not state.active:
                if state.streak >= needed:
                    state.active, state.last_sent_at, state.resolved_at = True, now, None
                    to_send.append((key, message))
            elif kind in immediate and before is not None and before.kind not in immediate:
                # escalated while active (an imbalance grown past 10x its tolerance): urgent, so sent at once
                state.last_sent_at = now
                to_send.append((key, message))
            elif resend_after is not None and (state.last_sent_at is None
                                               or now - state.last_sent_at >= resend_after):
                state.last_sent_at = now
                to_send.append((key, f"{message} (still present, {state.streak} runs)"))
            new_states[key] = state
        elif before is not None:
            if before.active:
                state = replace(before, active=False, streak=0, resolved_at=now)
                to_resolve.append((key, f"resolved: {before.message}"))
                new_states[key] = state
            elif before.streak:
                new_states[key] = replace(before, streak=0)
            # else: idle already; dropped
    return new_states, to_send, to_resolve


def alert_text(to_send: list[tuple[str, str]], to_resolve: list[tuple[str, str]], *,
               source: str = "position-monitor") -> str | None:
    """One webhook message for a run's alerts and resolutions; None when there is nothing to say."""
    lines = [message for _, message in to_send] + [message for _, message in to_resolve]
    if not lines:
        return None
    return f"{source}:\n" + "\n".join(f"- {line}" for line in lines)
