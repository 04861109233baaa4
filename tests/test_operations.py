"""Operating it, end to end: history, audit trail, metrics file, pings, alerts, status, quiet cron runs."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import cli, run_json

ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20


class Recorder:
    """A loopback HTTP server that records what it is sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                recorder.requests.append((self.path, body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [path.split("?")[0] for path, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    server = Recorder()
    yield server
    server.close()


def test_clean_no_change_run_without_a_tty_prints_nothing(env, sim):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    first = cli(env, "run")
    assert first.returncode == 0 and "1 discovered" in first.stdout
    quiet = cli(env, "run")
    assert quiet.returncode == 0
    assert quiet.stdout == "" and quiet.stderr == ""


def test_audit_rows_match_the_changes_one_to_one(env, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(ALICE, "ETH", "2", "1900")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    reports = [run_json(env)]
    sim.resize(ALICE, "BTC", "0.5", "30500")
    sim.close_external(ALICE, "ETH", "1950")
    reports.append(run_json(env))
    with psycopg.connect(database_url) as conn:
        events = conn.execute("SELECT position_id, event, run_id FROM position_events ORDER BY id").fetchall()
        closed_rows = conn.execute("SELECT id FROM positions WHERE closed_at IS NOT NULL").fetchall()
    by_event = {}
    for _, event, _ in events:
        by_event[event] = by_event.get(event, 0) + 1
    assert by_event == {"discovered": 2, "resized": 1, "closed": 1}
    assert sum(r["discovered"] for r in reports) == 2 and sum(r["closed"] for r in reports) == 1
    assert [pid for pid, event, _ in events if event == "closed"] == [row[0] for row in closed_rows]
    assert {run_id for _, _, run_id in events} == {r["run_id"] for r in reports}
    history = cli(env, "positions", "history", str(closed_rows[0][0]), "--json")
    assert [e["event"] for e in json.loads(history.stdout)] == ["discovered", "closed"]


def test_metrics_file_is_valid_prometheus_text(env, sim, tmp_path):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    path = tmp_path / "metrics" / "position_monitor.prom"
    path.parent.mkdir()
    assert cli(env, "run", "--metrics-file", str(path)).returncode == 0
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("position_monitor_exit_code", ())] == 0
    assert samples[("position_monitor_run_actions", (("kind", "discovered"),))] == 1
    assert samples[("position_monitor_open_positions", (("account", ALICE),))] == 1
    assert ("position_monitor_last_success_timestamp_seconds", ()) in samples
    assert samples[("position_monitor_lock_busy", ())] == 0


def test_pings_follow_the_healthchecks_convention_and_never_fail_the_run(env, sim, recorder):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    assert cli(env, "accounts", "add", BOB).returncode == 0
    env = dict(env, MONITOR_PING_URL=recorder.url + "/ping/abc")
    assert cli(env, "run").returncode == 0
    assert recorder.paths() == ["/ping/abc/start", "/ping/abc"]
    assert all("rid=" in path for path, _ in recorder.requests)
    sim.add_fault("500", path="info", type="clearinghouseState", user=BOB, count=None)
    assert cli(env, "run").returncode == 1
    assert recorder.paths()[-2:] == ["/ping/abc/start", "/ping/abc/1"]
    down = dict(env, MONITOR_PING_URL="http://127.0.0.1:9/ping")  # nothing listens there
    result = cli(down, "run")
    assert result.returncode == 1 and "Traceback" not in result.stderr


def test_alerts_are_deduplicated_across_runs_and_resolved(env, sim, recorder):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    env = dict(env, MONITOR_ALERT_WEBHOOK=recorder.url + "/hook", MONITOR_ALERT_AFTER_RUNS="2")
    fault = sim.add_fault("429", path="info", type="clearinghouseState", user=ALICE, count=None)
    for _ in range(4):
        assert cli(env, "run").returncode == 1
    texts = [json.loads(body)["text"] for _, body in recorder.requests]
    assert len(texts) == 1 and ALICE in texts[0]  # fired at the 2nd failing run, once
    status = json.loads(cli(env, "status", "--json").stdout)
    assert [a["kind"] for a in status["alerts"]] == ["account_failed"]
    sim.clear_faults(fault)
    assert cli(env, "run").returncode == 0
    texts = [json.loads(body)["text"] for _, body in recorder.requests]
    assert len(texts) == 2 and "resolved" in texts[1]
    assert json.loads(cli(env, "status", "--json").stdout)["alerts"] == []


def test_status_shows_runs_accounts_and_lock(env, sim):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(env)
    status = json.loads(cli(env, "status", "--json").stdout)
    assert status["runs"][0]["exit_code"] == 0 and status["runs"][0]["counts"]["discovered"] == 1
    account, = status["accounts"]
    assert account["address"] == ALICE and account["open_positions"] == 1 and account["last_good_read_at"]
    assert status["lock"]["backend"] == "local" and status["lock"]["epoch"] >= 1
    human = cli(env, "status")
    assert human.returncode == 0 and "Last runs" in human.stdout and ALICE[:6] in human.stdout


def test_json_logs_are_one_object_per_line_with_the_run_id(env, sim):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    assert cli(env, "accounts", "add", BOB).returncode == 0
    sim.add_fault("500", path="info", type="clearinghouseState", user=BOB, count=None)  # something to log
    result = cli(env, "--log-format", "json", "--log-level", "info", "run", "--json")
    assert result.returncode == 1
    run_id = json.loads(result.stdout)["run_id"]
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines and all(entry["run_id"] == run_id for entry in lines)
    assert any(BOB in entry["message"] and entry["level"] == "warning" for entry in lines)
    assert {"time", "level", "logger", "message"} <= set(lines[0])


def test_a_run_on_a_terminal_shows_progress_and_a_table_of_changes(env, sim):
    import os
    import pty
    import subprocess
    import sys

    from tests.conftest import ROOT

    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "run"], env=env, cwd=ROOT,
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=60) == 0
    os.close(master)
    text = output.decode(errors="replace")
    assert "reading accounts" in text  # the progress bar (stderr is a TTY)
    assert "type" in text and "detail" in text and "discover" in text  # the table (stdout is a TTY)
