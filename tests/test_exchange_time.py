"""Exchange time: the run learns the exchange's clock from clearinghouseState's ``time`` and signs
``expiresAfter`` (and judges settle windows) by it; an offset beyond 2 s is the ``clock_offset`` alert
(real CLI, PostgreSQL, the simulator with its clock off the host's)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest

from monitor.clock import ExchangeClock
from monitor.operations import observed_conditions
from monitor.report import RunReport
from tests.conftest import ALICE, cli, run_json


def orders(sim) -> list[dict]:
    return [e for e in sim.requests_log(path="exchange") if e.get("type") == "order"]


def stop_row(database_url: str, coin: str, stop: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE positions SET stop_loss_price = %s WHERE coin = %s AND closed_at IS NULL",
                     (Decimal(stop), coin))


def position(database_url: str, coin: str) -> dict:
    with psycopg.connect(database_url) as conn:
        cur = conn.execute("SELECT * FROM positions WHERE coin = %s ORDER BY id DESC LIMIT 1", (coin,))
        return dict(zip([c.name for c in cur.description], cur.fetchone()))


@pytest.mark.parametrize("offset_ms", [30_000, -30_000])
def test_closes_land_when_the_exchanges_clock_is_off_and_the_offset_alerts(keyed, sim, database_url, offset_ms):
    sim.set_clock_offset(offset_ms)  # the exchange's clock 30 s ahead of (behind) this host's
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    first = run_json(keyed)
    assert first["discovered"] == 1
    assert abs(first["clock_offset_ms"] - offset_ms) < 1000
    assert [a["key"] for a in first["alerts"]] == ["clock_offset"]
    sim.set_mid("BTC", "29000")
    stop_row(database_url, "BTC", "29500")
    sim.reset_log()

    report = run_json(keyed)

    sent = orders(sim)
    assert len(sent) == 1 and sent[0]["status"] == 200
    assert report["close_orders_sent"] == 1 and report["closed"] == 1, report["notes"]
    row = position(database_url, "BTC")
    assert row["status"] == "closed" and row["close_reason"] == "stop_loss" and sim.position(ALICE, "BTC") is None
    # expiresAfter (kept with the claim) was in the exchange's time: within 10 s after the exchange's now
    expires_ms = int(row["close_expires_at"].timestamp() * 1000)
    assert 0 < expires_ms - sent[0]["time"] <= 10_000
    assert "clock_offset" in observed_conditions(RunReport(run_id="x", dry_run=False, alerts=[
        _alert(a) for a in report["alerts"]]))


def _alert(item: dict):
    from monitor.report import Alert

    return Alert(item["key"], item["kind"], item["text"])


def test_no_alert_and_no_offset_within_two_seconds(env, sim):
    sim.set_clock_offset(500)
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    report = run_json(env)
    assert report["alerts"] == [] and abs(report["clock_offset_ms"] - 500) < 400


def test_exchange_clock_is_the_median_of_its_samples():
    class Fixed:
        def now_ms(self) -> int:
            return 1_000_000

    clock = ExchangeClock(Fixed())  # type: ignore[arg-type]
    assert clock.offset_ms() == 0 and clock.now_ms() == 1_000_000  # no sample: the host's clock
    for server, sent, received in ((1_030_000, 999_990, 1_000_010), (1_030_400, 1_000_000, 1_000_000),
                                   (1_100_000, 999_000, 1_001_000)):  # one slow, odd answer
        clock.observe(server, sent, received)
    assert clock.offset_ms() == 30_400 and clock.now_ms() == 1_030_400
    assert clock.now() == datetime.fromtimestamp(1_030.4, tz=timezone.utc)
    assert timedelta(milliseconds=clock.offset_ms()) > timedelta(seconds=2)
