"""Hedge groups (issue 14): legs across accounts and venues net to zero, and drift is caught.

End to end: the real CLI, PostgreSQL and the simulator. A group adds no exchange request; its net comes from the
snapshot the run read, and a leg not read (a failed read, a dex not read, a stale external leg) makes it unknown,
never balanced. The pure evaluation is checked on its own first.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest

from monitor.hedges import ExternalLeg, HedgeGroup, HedgeLeg, evaluate
from monitor.models import AccountSnapshot, ExchangePosition
from tests import test_security
from tests.conftest import ALICE, cli, run_json
from tests.test_operations import Recorder

BOB = "0x" + "b2" * 20
CAROL = "0x" + "c3" * 20
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
STALE = timedelta(seconds=300)

app_role = test_security.app_role  # a login role with exactly deploy/grants.sql's grants


@pytest.fixture
def recorder():
    server = Recorder()
    yield server
    server.close()


def sql(database_url, statement, *params):
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else None


def ok(env, *args):
    result = cli(env, *args)
    assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
    return result


def hedges(report):
    return {h["name"]: h for h in report["hedges"]}


def verdict(report, name):
    """(status, net as a Decimal or None) of one group in a run's JSON: nets are exact decimal text."""
    h = hedges(report)[name]
    assert h["net"] is None or isinstance(h["net"], str)
    return h["status"], None if h["net"] is None else Decimal(h["net"])


def texts(recorder):
    """The webhook's messages about hedge groups (an account's failure alerts too, on its own)."""
    return [t for t in (json.loads(body)["text"] for _, body in recorder.requests) if "hedge" in t]


def pair(env, sim, coin="BTC", long="1", short="-1", tolerance=None, ratio_bob=None):
    """ALICE long, BOB short the same coin, one group over both."""
    sim.open_position(ALICE, coin, long, "30000")
    sim.open_position(BOB, coin, short, "30000")
    ok(env, "accounts", "add", ALICE)
    ok(env, "accounts", "add", BOB)
    ok(env, "hedge", "create", "basis", "--coin", coin, *(["--tolerance", tolerance] if tolerance else []))
    ok(env, "hedge", "add-leg", "basis", "--account", ALICE)
    ok(env, "hedge", "add-leg", "basis", "--account", BOB, *(["--ratio", ratio_bob] if ratio_bob else []))


# ---- the pure evaluation ------------------------------------------------------------------------------


def snap(address, positions, dexes=frozenset({""})):
    return AccountSnapshot(address=address, dexes_read=frozenset(dexes), positions={
        coin: ExchangePosition(coin, "long" if Decimal(size) > 0 else "short", abs(Decimal(size)), None)
        for coin, size in positions.items()})


def group(coin="BTC", tolerance="0", legs=((1, "1"), (2, "1")), externals=()):
    return HedgeGroup(7, "g", coin, Decimal(tolerance),
                      legs=tuple(HedgeLeg(a, f"0x{a}", Decimal(r)) for a, r in legs),
                      externals=tuple(externals))


def test_evaluate_nets_signed_size_times_ratio_in_decimal():
    snaps = {1: snap("0x1", {"ETH": "0.3"}), 2: snap("0x2", {"ETH": "-0.6"})}
    result, = evaluate([group("ETH", legs=((1, "1"), (2, "0.5")))], snaps, {}, NOW, STALE)
    assert result.status == "balanced" and result.net == 0 and isinstance(result.net, Decimal)
    flat, = evaluate([group("ETH")], {1: snap("0x1", {}), 2: snap("0x2", {"ETH": "-0.25"})}, {}, NOW, STALE)
    assert flat.status == "imbalanced" and flat.net == Decimal("-0.25")  # a flat leg counts 0, it is known
    assert not flat.urgent  # tolerance 0: no urgent level


def test_evaluate_is_unknown_for_any_leg_not_read_and_never_balanced():
    g = group()
    failed, = evaluate([g], {1: snap("0x1", {"BTC": "1"})}, {2: "account read failed: HTTP 500"}, NOW, STALE)
    assert failed.status == "unknown" and failed.net is None and "HTTP 500" in failed.reason
    tsla = group("xyz:TSLA")
    unread, = evaluate([tsla], {1: snap("0x1", {}), 2: snap("0x2", {}, {"", "xyz"})}, {}, NOW, STALE)
    assert unread.status == "unknown" and "perp dex" in unread.reason  # account 1's xyz dex was not read
    old = ExternalLeg("cex", Decimal("-1"), NOW - timedelta(seconds=301))
    stale, = evaluate([group(legs=((1, "1"),), externals=[old])], {1: snap("0x1", {"BTC": "1"})}, {}, NOW, STALE)
    assert stale.status == "unknown" and stale.stale_venues == ("cex",)
    fresh, = evaluate([group(legs=((1, "1"),), externals=[ExternalLeg("cex", Decimal("-1"), NOW)])],
                      {1: snap("0x1", {"BTC": "1"})}, {}, NOW, STALE)
    assert fresh.status == "balanced" and fresh.net == 0
    empty, = evaluate([group(legs=())], {}, {}, NOW, STALE)
    assert empty.status == "unknown"


def test_evaluate_urgent_beyond_ten_tolerances():
    snaps = {1: snap("0x1", {"BTC": "1"}), 2: snap("0x2", {"BTC": "-0.95"})}
    mild, = evaluate([group(tolerance="0.01")], snaps, {}, NOW, STALE)
    assert mild.status == "imbalanced" and not mild.urgent  # 0.05 <= 10 x 0.01
    snaps[2] = snap("0x2", {"BTC": "-0.5"})
    far, = evaluate([group(tolerance="0.01")], snaps, {}, NOW, STALE)
    assert far.urgent


# ---- end to end -----------------------------------------------------------------------------------------


def test_two_accounts_long_and_short_are_balanced_with_no_extra_request(env, sim, database_url, tmp_path):
    pair(env, sim)
    sim.reset_log()
    metrics = tmp_path / "m.prom"
    report = run_json(env, "--metrics-file", str(metrics))
    item, = report["hedges"]
    assert {k: item[k] for k in ("name", "coin", "status", "tolerance", "reason")} == {
        "name": "basis", "coin": "BTC", "status": "balanced", "tolerance": "0", "reason": None}
    assert Decimal(item["net"]) == 0
    reads = [r for r in sim.requests_log() if r["path"].endswith("/info")]
    assert sorted(r.get("type") for r in reads) == ["clearinghouseState", "clearinghouseState", "perpDexs"]
    listed, = json.loads(ok(env, "hedge", "list", "--json").stdout)
    assert listed["name"] == "basis" and listed["coin"] == "BTC" and Decimal(listed["net"]) == 0
    assert listed["status"] == "balanced" and listed["tolerance"] == "0"
    assert [(leg["account"], leg["ratio"], Decimal(leg["size"])) for leg in listed["legs"]] == [
        (ALICE, "1", 1), (BOB, "1", -1)]
    text = metrics.read_text()
    assert 'position_monitor_hedge_net{group="basis",coin="BTC"} 0' in text  # 0 or 0.0: exact text
    assert 'position_monitor_hedge_imbalanced{group="basis"} 0' in text
    assert 'position_monitor_hedge_unknown{group="basis"} 0' in text
    quiet = cli(env, "run")  # a balanced hedge is nothing to say: cron stays quiet
    assert quiet.returncode == 0 and quiet.stdout == "", quiet.stdout


def test_an_imbalance_alerts_after_n_runs_once_and_is_resolved(env, sim, database_url, recorder):
    pair(env, sim, tolerance="0.1")
    env = dict(env, MONITOR_ALERT_WEBHOOK=recorder.url + "/hook", MONITOR_ALERT_AFTER_RUNS="3")
    assert hedges(run_json(env))["basis"]["status"] == "balanced"
    sim.resize(BOB, "BTC", "-0.8", "30000")  # one leg shrinks: net 0.2 > 0.1 (not urgent: <= 1.0)
    for expected_alerts in (0, 0, 1, 1):
        result = cli(env, "run")
        assert result.returncode == 0
        assert "hedges imbalanced: basis (net 0.2" in result.stdout and "tolerance 0.1)" in result.stdout
        assert "hedge basis BTC: net 0.2" in result.stdout and "(tolerance 0.1) imbalanced" in result.stdout
        assert len(texts(recorder)) == expected_alerts
    assert "hedge group basis (BTC) is imbalanced: net 0.2" in texts(recorder)[0]
    status = json.loads(ok(env, "status", "--json").stdout)
    assert [a["key"] for a in status["alerts"]] == ["hedge_imbalance:basis"]
    sim.resize(BOB, "BTC", "-1", "30000")
    assert hedges(run_json(env))["basis"]["status"] == "balanced"
    assert len(texts(recorder)) == 2 and texts(recorder)[1].count("resolved: hedge group basis") == 1
    run_json(env)
    assert len(texts(recorder)) == 2
    shown = json.loads(ok(env, "hedge", "show", "basis", "--runs", "3", "--json").stdout)
    assert [(r["status"], Decimal(r["net"])) for r in shown["runs"]] == [("balanced", 0), ("balanced", 0),
                                                                         ("imbalanced", Decimal("0.2"))]
    human = ok(env, "hedge", "show", "basis", "--runs", "7").stdout
    assert "balanced" in human and "0.2" in human and human.count("imbalanced") == 4


def test_an_imbalance_beyond_ten_tolerances_is_urgent_at_once(env, sim, recorder):
    pair(env, sim, tolerance="0.01")
    env = dict(env, MONITOR_ALERT_WEBHOOK=recorder.url + "/hook", MONITOR_ALERT_AFTER_RUNS="3")
    sim.resize(BOB, "BTC", "-0.5", "30000")
    assert verdict(run_json(env), "basis") == ("imbalanced", Decimal("0.5"))
    assert len(texts(recorder)) == 1 and "more than 10x its tolerance" in texts(recorder)[0]
    status = json.loads(ok(env, "status", "--json").stdout)
    assert [(a["key"], a["kind"]) for a in status["alerts"]] == [("hedge_imbalance:basis", "hedge_imbalance_urgent")]


def test_an_external_leg_restores_balance(env, sim, database_url):
    sim.open_position(ALICE, "ETH", "2", "3000")
    ok(env, "accounts", "add", ALICE)
    ok(env, "hedge", "create", "eth", "--coin", "ETH", "--tolerance", "0.001")
    ok(env, "hedge", "add-leg", "eth", "--account", ALICE)
    assert hedges(run_json(env))["eth"]["status"] == "imbalanced"
    assert "added" in ok(env, "hedge", "set-external", "eth", "--venue", "binance", "--size", "-2").stdout
    assert verdict(run_json(env), "eth") == ("balanced", 0)
    assert "updated" in ok(env, "hedge", "set-external", "eth", "--venue", "binance", "--size", "-1.5").stdout
    assert verdict(run_json(env), "eth") == ("imbalanced", Decimal("0.5"))
    rows = sql(database_url, "SELECT size, removed_at FROM hedge_external_legs")
    assert rows == [(Decimal("-1.5"), None)]  # one row per venue, upserted
    ok(env, "hedge", "remove-external", "eth", "--venue", "binance")
    assert verdict(run_json(env), "eth") == ("imbalanced", 2)


def test_a_failed_read_makes_the_group_unknown_and_keeps_its_alert(env, sim, database_url, recorder, tmp_path):
    pair(env, sim)
    env = dict(env, MONITOR_ALERT_WEBHOOK=recorder.url + "/hook", MONITOR_ALERT_AFTER_RUNS="1")
    sim.resize(BOB, "BTC", "-0.5", "30000")
    assert hedges(run_json(env))["basis"]["status"] == "imbalanced"
    assert len(texts(recorder)) == 1
    sim.resize(BOB, "BTC", "-1", "30000")  # balanced again on the exchange, but BOB cannot be read
    fault = sim.add_fault("500", path="info", type="clearinghouseState", user=BOB, count=None)
    metrics = tmp_path / "m.prom"
    for _ in range(2):
        report = run_json(env, "--metrics-file", str(metrics), expect=1)
        basis = hedges(report)["basis"]
        assert basis["status"] == "unknown" and basis["net"] is None and BOB in basis["reason"]
    assert len(texts(recorder)) == 1  # neither resolved (nothing is known) nor sent again
    status = json.loads(ok(env, "status", "--json").stdout)
    assert "hedge_imbalance:basis" in [a["key"] for a in status["alerts"]]
    text = metrics.read_text()
    assert 'position_monitor_hedge_unknown{group="basis"} 1' in text and "hedge_net{" not in text
    assert sql(database_url, "SELECT status, net FROM hedge_results ORDER BY id DESC LIMIT 1") == [("unknown", None)]
    human = cli(env, "run")
    assert human.returncode == 1 and "hedges unknown: basis" in human.stdout
    sim.clear_faults(fault)
    assert hedges(run_json(env))["basis"]["status"] == "balanced"
    assert len(texts(recorder)) == 2 and "resolved" in texts(recorder)[1]


def test_a_stale_external_leg_makes_the_group_unknown_and_alerts_once(env, sim, database_url, recorder):
    sim.open_position(ALICE, "BTC", "1", "30000")
    ok(env, "accounts", "add", ALICE)
    ok(env, "hedge", "create", "cex", "--coin", "BTC")
    ok(env, "hedge", "add-leg", "cex", "--account", ALICE)
    ok(env, "hedge", "set-external", "cex", "--venue", "okx", "--size", "-1")
    env = dict(env, MONITOR_ALERT_WEBHOOK=recorder.url + "/hook", MONITOR_ALERT_AFTER_RUNS="3")
    assert hedges(run_json(env))["cex"]["status"] == "balanced"
    sql(database_url, "UPDATE hedge_external_legs SET updated_at = now() - interval '301 seconds'")
    for _ in range(3):
        cex = hedges(run_json(env))["cex"]
        assert cex["status"] == "unknown" and cex["net"] is None and "okx" in cex["reason"]
    assert len(texts(recorder)) == 1 and "okx" in texts(recorder)[0]  # at once, and once
    listed, = json.loads(ok(env, "hedge", "list", "--json").stdout)
    assert listed["status"] == "unknown" and [leg.get("stale") for leg in listed["legs"]] == [None, True]
    assert hedges(run_json(dict(env, MONITOR_HEDGE_EXTERNAL_STALE="3600")))["cex"]["status"] == "balanced"
    assert len(texts(recorder)) == 2 and "resolved" in texts(recorder)[1]


def test_ratios_other_than_one(env, sim):
    sim.open_position(ALICE, "ETH", "0.3", "3000")
    sim.open_position(BOB, "ETH", "-0.6", "3000")
    ok(env, "accounts", "add", ALICE)
    ok(env, "accounts", "add", BOB)
    ok(env, "hedge", "create", "half", "--coin", "ETH")
    ok(env, "hedge", "add-leg", "half", "--account", ALICE)
    ok(env, "hedge", "add-leg", "half", "--account", BOB, "--ratio", "0.5")
    half = hedges(run_json(env))["half"]
    assert half["status"] == "balanced" and Decimal(half["net"]) == 0
    assert "updated" in ok(env, "hedge", "add-leg", "half", "--account", BOB, "--ratio", "0.25").stdout
    assert verdict(run_json(env), "half") == ("imbalanced", Decimal("0.15"))  # 0.3 - 0.6 x 0.25, exact
    assert "unchanged" in ok(env, "hedge", "add-leg", "half", "--account", BOB, "--ratio", "0.25").stdout


def test_hip3_coins_are_netted_and_an_unread_dex_is_unknown(env, sim, database_url):
    sim.open_hip3_position(ALICE, "xyz:TSLA", "2", "250")
    sim.open_hip3_position(BOB, "xyz:TSLA", "-2", "250")
    sim.open_position(BOB, "TSLA", "5", "250")  # a main-dex coin of the same name is another coin
    ok(env, "accounts", "add", ALICE)
    ok(env, "accounts", "add", BOB)
    ok(env, "hedge", "create", "tsla", "--coin", "xyz:TSLA")
    ok(env, "hedge", "add-leg", "tsla", "--account", ALICE, "--coin", "xyz:TSLA")
    ok(env, "hedge", "add-leg", "tsla", "--account", BOB)
    assert verdict(run_json(env), "tsla") == ("balanced", 0)
    sim.resize(BOB, "xyz:TSLA", "-1", "250")
    assert verdict(run_json(env), "tsla") == ("imbalanced", 1)
    fault = sim.add_fault("500", path="info", type="clearinghouseState", user=BOB, count=None, dex="xyz")
    tsla = hedges(run_json(env, expect=1))["tsla"]
    assert tsla["status"] == "unknown" and "perp dex" in tsla["reason"]
    sim.clear_faults(fault)
    tsla = hedges(run_json(dict(env, MONITOR_PERP_DEXES="")))["tsla"]  # the first dex only: xyz not read
    assert tsla["status"] == "unknown" and tsla["net"] is None


def test_a_dry_run_computes_and_prints_hedges_and_writes_nothing(env, sim, database_url, recorder):
    pair(env, sim)
    sim.resize(BOB, "BTC", "-0.5", "30000")
    env = dict(env, MONITOR_ALERT_WEBHOOK=recorder.url + "/hook", MONITOR_ALERT_AFTER_RUNS="1")
    result = cli(env, "run", "--dry-run")
    assert result.returncode == 0
    assert "hedge basis BTC: net 0.5" in result.stdout and "(tolerance 0) imbalanced" in result.stdout
    assert "hedges imbalanced: basis" in result.stdout
    report = run_json(env, "--dry-run")
    assert report["dry_run"] and verdict(report, "basis") == ("imbalanced", Decimal("0.5"))
    assert sql(database_url, "SELECT count(*) FROM hedge_results") == [(0,)]
    assert sql(database_url, "SELECT count(*) FROM monitor_alerts") == [(0,)]
    assert recorder.requests == []
    balanced = dict(env)
    sim.resize(BOB, "BTC", "-1", "30000")
    out = cli(balanced, "run", "--dry-run").stdout
    assert "hedge basis BTC: net 0" in out and "(tolerance 0) balanced" in out


def test_a_run_narrowed_to_some_accounts_leaves_other_groups_alone(env, sim, recorder):
    pair(env, sim)
    sim.open_position(CAROL, "SOL", "1", "100")
    ok(env, "accounts", "add", CAROL)
    ok(env, "hedge", "create", "solo", "--coin", "SOL")
    ok(env, "hedge", "add-leg", "solo", "--account", CAROL)
    env = dict(env, MONITOR_ALERT_WEBHOOK=recorder.url + "/hook", MONITOR_ALERT_AFTER_RUNS="1")
    sim.resize(BOB, "BTC", "-0.5", "30000")
    assert set(hedges(run_json(env))) == {"basis", "solo"}
    first, = texts(recorder)  # one message: both imbalanced (solo has one leg)
    assert "group basis" in first and "group solo" in first
    narrowed = run_json(env, "--account", CAROL)
    assert set(hedges(narrowed)) == {"solo"}  # basis has legs this run did not set out to read
    assert len(texts(recorder)) == 1  # basis's alert neither resolved nor sent again
    ok(env, "hedge", "disable", "solo")
    assert set(hedges(run_json(env))) == {"basis"}
    _, last = texts(recorder)
    assert "resolved: hedge group solo" in last and "basis" not in last  # a disabled group's alert ends
    assert [g["name"] for g in json.loads(ok(env, "hedge", "list", "--json").stdout)] == ["basis"]
    everything = json.loads(ok(env, "hedge", "list", "--all", "--json").stdout)
    assert [(g["name"], g["active"]) for g in everything] == [("basis", True), ("solo", False)]
    assert "re-activated" in ok(env, "hedge", "create", "solo", "--coin", "SOL").stdout


def test_a_removed_leg_or_a_disabled_account_is_not_counted(env, sim, database_url):
    pair(env, sim)
    ok(env, "hedge", "remove-leg", "basis", "--account", BOB)
    assert verdict(run_json(env), "basis") == ("imbalanced", 1)
    assert sql(database_url, "SELECT count(*) FROM hedge_legs WHERE removed_at IS NOT NULL") == [(1,)]
    ok(env, "hedge", "add-leg", "basis", "--account", BOB)
    ok(env, "accounts", "disable", BOB)
    basis = hedges(run_json(env))["basis"]
    assert basis["status"] == "unknown" and "not watched" in basis["reason"]


@pytest.mark.parametrize("args, says", [
    (("hedge", "add-leg", "nope", "--account", ALICE), "no hedge group named nope"),
    (("hedge", "show", "nope"), "no hedge group named nope"),
    (("hedge", "disable", "nope"), "no hedge group named nope"),
    (("hedge", "set-external", "nope", "--venue", "cex", "--size", "1"), "no hedge group named nope"),
    (("hedge", "add-leg", "basis", "--account", CAROL), "not a watched account"),
    (("hedge", "add-leg", "basis", "--account", "0x123"), "not an address"),
    (("hedge", "add-leg", "basis", "--account", ALICE, "--coin", "ETH"), "coin mismatch"),
    (("hedge", "create", "basis", "--coin", "ETH"), "coin mismatch"),
    (("hedge", "create", "other", "--coin", "BTC", "--tolerance", "-0.1"), "--tolerance: must be 0 or more"),
    (("hedge", "create", "other", "--coin", "BTC", "--tolerance", "NaN"), "--tolerance"),
    (("hedge", "add-leg", "basis", "--account", ALICE, "--ratio", "0"), "--ratio"),
    (("hedge", "set-external", "basis", "--venue", "cex", "--size", "1e"), "--size"),
    # beyond what numeric stores or anyone trades: a usage error, not a database error (exit 70)
    (("hedge", "create", "other", "--coin", "BTC", "--tolerance", "1e999999"), "--tolerance"),
    (("hedge", "set-external", "basis", "--venue", "cex", "--size", "1e-20000"), "--size"),
    (("hedge", "create", "bad name", "--coin", "BTC"), "hedge group name"),
    (("hedge", "remove-leg", "basis", "--account", CAROL), "is not a leg"),
])
def test_bad_input_is_one_line_and_exit_2(env, database_url, args, says):
    ok(env, "accounts", "add", ALICE)
    ok(env, "hedge", "create", "basis", "--coin", "BTC")
    result = cli(env, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert len(result.stderr.splitlines()) == 1 and says in result.stderr and "Traceback" not in result.stderr
    assert sql(database_url, "SELECT name, coin, tolerance FROM hedge_groups") == [("basis", "BTC", Decimal(0))]
    assert sql(database_url, "SELECT count(*) FROM hedge_legs") == [(0,)]


def test_hedge_commands_and_runs_work_as_the_role_with_only_the_documented_grants(env, sim, app_role, database_url):
    """deploy/grants.sql covers the new tables: every hedge command and a run that records verdicts, no DELETE."""
    _, role_url = app_role
    env = dict(env, MONITOR_DATABASE_URL=role_url)
    pair(env, sim)
    ok(env, "hedge", "set-external", "basis", "--venue", "cex", "--size", "0")
    ok(env, "hedge", "remove-external", "basis", "--venue", "cex")
    ok(env, "hedge", "remove-leg", "basis", "--account", BOB)
    ok(env, "hedge", "add-leg", "basis", "--account", BOB)
    assert verdict(run_json(env), "basis") == ("balanced", 0)
    ok(env, "hedge", "show", "basis")
    ok(env, "hedge", "disable", "basis")
    with psycopg.connect(role_url, autocommit=True) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM hedge_legs")
    assert sql(database_url, "SELECT count(*) FROM hedge_results") == [(1,)]


def test_create_again_changes_only_the_tolerance_and_says_so(env, database_url):
    assert "created" in ok(env, "hedge", "create", "basis", "--coin", "BTC").stdout
    assert "unchanged" in ok(env, "hedge", "create", "basis", "--coin", "BTC").stdout
    assert "updated" in ok(env, "hedge", "create", "basis", "--coin", "BTC", "--tolerance", "0.25").stdout
    assert "unchanged" in ok(env, "hedge", "create", "basis", "--coin", "BTC").stdout  # keeps its tolerance
    assert "disabled" in ok(env, "hedge", "disable", "basis").stdout
    assert "already disabled" in ok(env, "hedge", "disable", "basis").stdout
    assert sql(database_url, "SELECT tolerance, active FROM hedge_groups") == [(Decimal("0.25"), False)]
    listed, = json.loads(ok(env, "hedge", "list", "--all", "--json").stdout)
    assert listed["status"] == "unknown" and listed["net"] is None and listed["legs"] == []
