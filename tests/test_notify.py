"""monitor.notify: the metrics file, pings and webhooks against a real loopback server, alert decisions."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor import notify
from monitor.notify import AlertState, Pinger, RunMetrics, decide_alerts, send_webhook, write_metrics_file

# -- metrics file ---------------------------------------------------------------------------------

ODD_ACCOUNT = 'we"ird\\acct\nx'


def sample_metrics(**changes: Any) -> RunMetrics:
    values: dict[str, Any] = dict(
        run_started=1_700_000_000.25, run_finished=1_700_000_003.75, last_success=1_699_999_940.5,
        exit_code=1, dry_run=False,
        counters={"discovered": 2, "closed": 1, "close_orders_sent": 3, "liquidations": 1},
        open_positions_by_account={"0x5e9ee1089755c3435139848e47e6635505d5a13a": 4, ODD_ACCOUNT: 1},
        accounts_failed=1, accounts_ok=7, lock_busy=False, api_weight=42, requests=19)
    values.update(changes)
    return RunMetrics(**values)


def parse(text: str) -> dict[str, Any]:
    """name -> family, parsed by prometheus_client's own parser."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Any) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}


def test_metrics_file_parses_with_expected_samples(tmp_path: Path) -> None:
    path = tmp_path / "position_monitor.prom"
    write_metrics_file(path, sample_metrics())
    families = parse(path.read_text())
    p = "position_monitor_"
    assert set(families) == {p + name for name in (
        "last_run_timestamp_seconds", "last_success_timestamp_seconds", "run_duration_seconds", "run_actions",
        "open_positions", "accounts_failed", "accounts_ok", "lock_busy", "exit_code", "dry_run", "api_weight",
        "http_requests")}
    assert all(f.type == "gauge" and f.documentation for f in families.values())

    def scalar(name: str) -> float:
        (value,) = samples(families[p + name]).values()
        return value

    assert scalar("last_run_timestamp_seconds") == 1_700_000_003.75
    assert scalar("last_success_timestamp_seconds") == 1_699_999_940.5
    assert scalar("run_duration_seconds") == 3.5
    assert (scalar("accounts_failed"), scalar("accounts_ok"), scalar("exit_code")) == (1, 7, 1)
    assert (scalar("lock_busy"), scalar("dry_run")) == (0, 0)
    assert (scalar("api_weight"), scalar("http_requests")) == (42, 19)
    assert samples(families[p + "run_actions"]) == {
        (("kind", "close_orders_sent"),): 3, (("kind", "closed"),): 1, (("kind", "conflicts"),): 0,
        (("kind", "discovered"),): 2, (("kind", "liquidations"),): 1, (("kind", "updated"),): 0}
    # The odd account round-trips through escaping: quote, backslash and newline intact.
    assert samples(families[p + "open_positions"]) == {
        (("account", "0x5e9ee1089755c3435139848e47e6635505d5a13a"),): 4, (("account", ODD_ACCOUNT),): 1}


def test_metrics_file_escapes_label_values_per_the_text_format(tmp_path: Path) -> None:
    text = notify.render_metrics(sample_metrics())
    assert 'account="we\\"ird\\\\acct\\nx"' in text
    assert text.endswith("\n") and "\n\n" not in text


def test_metrics_file_omits_last_success_when_unknown_and_flags_lock_busy(tmp_path: Path) -> None:
    path = tmp_path / "m.prom"
    write_metrics_file(path, sample_metrics(last_success=None, lock_busy=True, dry_run=True, exit_code=75,
                                            counters={}, open_positions_by_account={}))
    families = parse(path.read_text())
    assert "position_monitor_last_success_timestamp_seconds" not in families
    assert samples(families["position_monitor_lock_busy"]) == {(): 1}
    assert samples(families["position_monitor_dry_run"]) == {(): 1}
    assert samples(families["position_monitor_exit_code"]) == {(): 75}
    assert set(samples(families["position_monitor_run_actions"]).values()) == {0}  # default kinds, zero
    assert samples(families["position_monitor_open_positions"]) == {}


def test_metrics_file_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "position_monitor.prom"
    path.write_text("old contents\n")
    real_replace = os.replace
    seen: list[tuple[Path, Path]] = []

    def watching_replace(src: Any, dst: Any) -> None:
        src_path, dst_path = Path(src), Path(dst)
        seen.append((src_path, dst_path))
        # At the moment of the rename: the temp file is complete, readable by others, in the same
        # directory, not named *.prom (the collector ignores it); the old file is still whole.
        assert src_path.parent == dst_path.parent == tmp_path
        assert not src_path.name.endswith(".prom") and src_path.name.startswith(".")
        assert parse(src_path.read_text())["position_monitor_exit_code"]
        assert src_path.stat().st_mode & 0o777 == 0o644
        assert dst_path.read_text() == "old contents\n"
        real_replace(src, dst)

    monkeypatch.setattr(notify.os, "replace", watching_replace)
    write_metrics_file(path, sample_metrics())
    assert len(seen) == 1 and seen[0][1] == path
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind
    assert "position_monitor_exit_code 1" in path.read_text()


def test_metrics_file_write_failure_leaves_old_file_and_no_temp(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "position_monitor.prom"
    path.write_text("old contents\n")

    def failing_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(notify.os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_metrics_file(path, sample_metrics())
    assert os.listdir(tmp_path) == [path.name]
    assert path.read_text() == "old contents\n"


# -- a real loopback HTTP server ------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.hang = 0.0
        self.release = threading.Event()


class LoopbackServer:
    def __init__(self) -> None:
        recorder = self.recorder = Recorder()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append({"method": self.command, "path": self.path, "body": body,
                                          "headers": dict(self.headers)})
                if recorder.hang:
                    recorder.release.wait(recorder.hang)
                payload = b"OK" if recorder.status < 400 else b"boom"
                try:
                    self.send_response(recorder.status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up

            do_GET = do_POST = do_HEAD = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.recorder.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL whose port nobody listens on (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


CHECK = "/ping/5bf66975-d4c7-4bf5-bcc8-b8d8a82ea278"
RUN_ID = uuid.UUID("0123456789abcdef0123456789abcdef")


def split(path: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(path)
    return parts.path, parse_qs(parts.query)


def test_pings_hit_the_healthchecks_paths_with_rid(server: LoopbackServer) -> None:
    pinger = Pinger(server.url + CHECK + "/", timeout=2, run_id=RUN_ID.hex)
    assert pinger.start("starting") is True
    assert pinger.success("3 discovered") is True
    assert pinger.failure(1, "1 account failed") is True
    assert pinger.failure(None) is True
    assert pinger.failure(0) is True  # 0 would read as success: sent as /fail
    assert pinger.finish(0) is True
    assert pinger.finish(75) is True
    got = [split(r["path"]) for r in server.recorder.requests]
    assert [path for path, _ in got] == [CHECK + "/start", CHECK, CHECK + "/1", CHECK + "/fail", CHECK + "/fail",
                                         CHECK, CHECK + "/75"]
    assert all(query == {"rid": [str(RUN_ID)]} for _, query in got)  # dashed UUID form
    requests_ = server.recorder.requests
    assert all(r["method"] == "POST" for r in requests_)
    assert requests_[0]["body"] == b"starting" and requests_[2]["body"] == b"1 account failed"
    assert requests_[0]["headers"]["User-Agent"].startswith("position-monitor/")


def test_ping_without_run_id_keeps_existing_query(server: LoopbackServer) -> None:
    pinger = Pinger(server.url + "/ping/key/my-slug?create=1", timeout=2)
    assert pinger.failure(2) is True
    path, query = split(server.recorder.requests[0]["path"])
    assert (path, query) == ("/ping/key/my-slug/2", {"create": ["1"]})


def test_ping_body_is_truncated(server: LoopbackServer) -> None:
    assert Pinger(server.url, timeout=2).success("x" * (notify.PING_BODY_LIMIT + 500)) is True
    assert len(server.recorder.requests[0]["body"]) == notify.PING_BODY_LIMIT


def test_pinger_without_url_is_a_no_op() -> None:
    pinger = Pinger(None)
    assert pinger.start() is True and pinger.success() is True and pinger.failure(1) is True


def test_ping_server_error_returns_false_with_one_warning(server: LoopbackServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    server.recorder.status = 500
    with caplog.at_level(logging.WARNING, logger="monitor.notify"):
        assert Pinger(server.url + CHECK, timeout=2).success() is False
    warnings = [r for r in caplog.records if r.name == "monitor.notify"]
    assert len(warnings) == 1 and "HTTP 500" in warnings[0].getMessage()
    assert "5bf66975" not in warnings[0].getMessage()  # the check's UUID is a secret: not logged


def test_ping_to_a_hanging_server_gives_up_within_the_timeout(server: LoopbackServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    server.recorder.hang = 10
    timeout = 0.3
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="monitor.notify"):
        assert Pinger(server.url + CHECK, timeout=timeout).start() is False
    assert time.monotonic() - started < 5  # bounded by the timeout, not the 10 s hang (slack for a loaded machine)
    assert len([r for r in caplog.records if r.name == "monitor.notify"]) == 1


def test_ping_to_a_closed_port_returns_false(closed_port_url: str, caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="monitor.notify"):
        assert Pinger(closed_port_url + CHECK, timeout=1).failure(1) is False
    assert time.monotonic() - started < 5
    assert len([r for r in caplog.records if r.name == "monitor.notify"]) == 1


def test_webhook_posts_slack_json(server: LoopbackServer) -> None:
    assert send_webhook(server.url + "/services/T0/B0/secret", "account 0xabc failed 3 runs", timeout=2) is True
    (request,) = server.recorder.requests
    assert request["method"] == "POST" and request["path"] == "/services/T0/B0/secret"
    assert request["headers"]["Content-Type"] == "application/json"
    assert json.loads(request["body"]) == {"text": "account 0xabc failed 3 runs"}


def test_webhook_truncates_long_text(server: LoopbackServer) -> None:
    assert send_webhook(server.url, "y" * 10_000, timeout=2) is True
    text = json.loads(server.recorder.requests[0]["body"])["text"]
    assert len(text) <= notify.WEBHOOK_TEXT_LIMIT and text.endswith("(truncated)")


def test_webhook_failures_return_false_and_never_raise(server: LoopbackServer, closed_port_url: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="monitor.notify"):
        server.recorder.status = 500
        assert send_webhook(server.url + "/hook/secret", "x", timeout=2) is False
        assert send_webhook(closed_port_url + "/hook/secret", "x", timeout=1) is False
        server.recorder.status, server.recorder.hang = 200, 10
        started = time.monotonic()
        assert send_webhook(server.url + "/hook/secret", "x", timeout=0.3) is False
        assert time.monotonic() - started < 5  # not the 10 s hang
        assert send_webhook("not a url at all", "x", timeout=1) is False
    messages = [r.getMessage() for r in caplog.records if r.name == "monitor.notify"]
    assert len(messages) == 4
    assert not any("secret" in m for m in messages)


# -- alert decisions ------------------------------------------------------------------------------

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
MINUTE = timedelta(minutes=1)


class Alerts:
    """Drive decide_alerts run after run, one minute apart, like the cron job would."""

    def __init__(self, threshold: int = 3, resend_after: timedelta | None = timedelta(hours=1)) -> None:
        self.states: dict[str, AlertState] = {}
        self.now = T0
        self.threshold = threshold
        self.resend_after = resend_after

    def run(self, observed: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        self.now += MINUTE
        self.states, to_send, to_resolve = decide_alerts(
            self.states, observed, self.now, threshold_runs=self.threshold, resend_after=self.resend_after)
        return to_send, to_resolve


FAILED = {"account_failed:0xabc": ("account_failed", "account 0xabc unreadable")}


def test_alert_fires_when_streak_reaches_threshold_then_dedups() -> None:
    alerts = Alerts(threshold=3)
    assert alerts.run(FAILED) == ([], [])
    assert alerts.states["account_failed:0xabc"].streak == 1 and not alerts.states["account_failed:0xabc"].active
    assert alerts.run(FAILED) == ([], [])
    assert alerts.run(FAILED) == ([("account_failed:0xabc", "account 0xabc unreadable")], [])
    state = alerts.states["account_failed:0xabc"]
    assert (state.active, state.streak, state.last_sent_at, state.kind) == (True, 3, alerts.now, "account_failed")
    assert state.first_seen_at == T0 + MINUTE
    for _ in range(10):  # still failing: no repeats inside the resend window
        assert alerts.run(FAILED) == ([], [])
    assert alerts.states["account_failed:0xabc"].streak == 13


def test_streak_resets_when_the_condition_is_not_observed() -> None:
    alerts = Alerts(threshold=3)
    alerts.run(FAILED)
    alerts.run(FAILED)
    assert alerts.run({}) == ([], [])  # not active: nothing to resolve
    assert alerts.states["account_failed:0xabc"].streak == 0
    assert alerts.run(FAILED) == ([], [])
    assert alerts.run(FAILED) == ([], [])
    assert alerts.run(FAILED)[0] == [("account_failed:0xabc", "account 0xabc unreadable")]


@pytest.mark.parametrize("kind", sorted(notify.IMMEDIATE_KINDS))
def test_immediate_kinds_fire_at_the_first_run(kind: str) -> None:
    alerts = Alerts(threshold=5)
    key = f"{kind}:123"
    assert alerts.run({key: (kind, f"{kind} on position 123")}) == ([(key, f"{kind} on position 123")], [])
    assert alerts.run({key: (kind, f"{kind} on position 123")}) == ([], [])  # dedup while active


def test_active_alert_is_resent_at_most_once_per_resend_window() -> None:
    alerts = Alerts(threshold=1, resend_after=timedelta(minutes=10))
    sent_at: list[datetime] = []
    for _ in range(25):
        to_send, _ = alerts.run({"lock_busy": ("lock_busy", "another run holds the lock")})
        if to_send:
            sent_at.append(alerts.now)
            last = to_send
    assert sent_at == [T0 + MINUTE, T0 + 11 * MINUTE, T0 + 21 * MINUTE]
    assert last == [("lock_busy", "another run holds the lock (still present, 21 runs)")]


def test_no_resend_when_resend_after_is_none() -> None:
    alerts = Alerts(threshold=1, resend_after=None)
    sends = [alerts.run({"conflicts"})[0] for _ in range(100)]
    assert sends[0] == [("conflicts", "conflicts")] and not any(sends[1:])


def test_resolve_once_then_refire_after_a_new_streak() -> None:
    alerts = Alerts(threshold=2)
    alerts.run(FAILED)
    assert alerts.run(FAILED)[0]  # fired
    assert alerts.run({}) == ([], [("account_failed:0xabc", "resolved: account 0xabc unreadable")])
    state = alerts.states["account_failed:0xabc"]
    assert (state.active, state.streak, state.resolved_at) == (False, 0, alerts.now)
    assert alerts.run({}) == ([], [])  # resolved only once
    assert "account_failed:0xabc" not in alerts.states  # idle: forgotten
    assert alerts.run(FAILED) == ([], [])  # a new streak needs the threshold again
    assert alerts.run(FAILED) == ([("account_failed:0xabc", "account 0xabc unreadable")], [])
    assert alerts.states["account_failed:0xabc"].resolved_at is None


def test_message_is_refreshed_and_resolution_uses_the_latest() -> None:
    alerts = Alerts(threshold=1)
    alerts.run({"conflicts": ("conflicts", "2 conflicts")})
    alerts.run({"conflicts": ("conflicts", "5 conflicts")})
    assert alerts.run({}) == ([], [("conflicts", "resolved: 5 conflicts")])


def test_several_keys_are_independent_and_outputs_sorted() -> None:
    alerts = Alerts(threshold=2)
    observed = {"run_overran": ("run_overran", "run overran"), "account_failed:0xb": ("account_failed", "b"),
                "account_failed:0xa": ("account_failed", "a"), "liquidation:9": ("liquidation", "liq 9")}
    assert alerts.run(observed)[0] == [("liquidation:9", "liq 9"), ("run_overran", "run overran")]
    assert alerts.run(observed)[0] == [("account_failed:0xa", "a"), ("account_failed:0xb", "b")]
    del observed["account_failed:0xa"]
    assert alerts.run(observed) == ([], [("account_failed:0xa", "resolved: a")])


def test_set_of_keys_derives_the_kind_from_the_prefix() -> None:
    alerts = Alerts(threshold=3)
    assert alerts.run({"close_failed:123", "lock_busy"}) == ([("close_failed:123", "close_failed:123")], [])
    assert alerts.states["close_failed:123"].kind == "close_failed"
    assert alerts.states["lock_busy"].kind == "lock_busy"


def test_decide_alerts_is_pure_and_deterministic() -> None:
    previous = {"lock_busy": AlertState(key="lock_busy", kind="lock_busy", streak=2, message="busy")}
    snapshot = repr(previous)
    first = decide_alerts(previous, {"lock_busy"}, T0, threshold_runs=3, resend_after=MINUTE)
    second = decide_alerts(previous, {"lock_busy"}, T0, threshold_runs=3, resend_after=MINUTE)
    assert first == second
    assert repr(previous) == snapshot  # the input states were not modified
    assert first[1] == [("lock_busy", "lock_busy")]


def test_decide_alerts_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        decide_alerts({}, set(), T0, threshold_runs=0, resend_after=MINUTE)
    with pytest.raises(ValueError):
        decide_alerts({}, set(), T0, threshold_runs=1, resend_after=-MINUTE)


def test_alert_text() -> None:
    assert notify.alert_text([], []) is None
    assert notify.alert_text([("a", "account a failed")], [("b", "resolved: b")], source="pm@host1") == (
        "pm@host1:\n- account a failed\n- resolved: b")


def test_malformed_urls_never_raise(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="monitor.notify"):
        assert Pinger("http://[::1", timeout=1).start() is False
        assert Pinger("http://127.0.0.1:notaport/x", timeout=1).success() is False
        assert send_webhook("http://127.0.0.1:notaport/secret", "x", timeout=1) is False
    assert len([r for r in caplog.records if r.name == "monitor.notify"]) == 3
