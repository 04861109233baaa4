"""Review of issue 14 (hedge groups): each test fails on the code before its fix (the red team's probes).

End to end: the real CLI, PostgreSQL and the simulator.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from monitor.notify import AlertState, decide_alerts
from monitor.runner import in_shard
from tests.conftest import ALICE, cli, run_json
from tests.test_hedges import BOB, hedges, ok, pair, recorder, sql, texts  # noqa: F401 - recorder: a fixture

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def _two_shards() -> tuple[str, str]:
    a = "0x" + "a1" * 20
    for i in range(200):
        candidate = "0x" + f"{i:040x}"
        if in_shard(candidate, (1, 2)) != in_shard(a, (1, 2)):
            return a, candidate
    raise AssertionError("no address in the other shard")


def _group_across_shards(env, name: str, coin: str, a: str, b: str) -> int:
    """Watch a and b (in different shards), make group ``name`` of their ``coin`` legs; returns a's shard K of 2."""
    ok(env, "accounts", "add", a)
    ok(env, "accounts", "add", b)
    ok(env, "hedge", "create", name, "--coin", coin)
    ok(env, "hedge", "add-leg", name, "--account", a)
    ok(env, "hedge", "add-leg", name, "--account", b)
    return 1 if in_shard(a, (1, 2)) else 2


def _messages(recorder):  # noqa: F811 - the fixture
    return [json.loads(body)["text"] for _, body in recorder.requests]


# ---- 1. a coin not listed ----------------------------------------------------------------------------


def test_hedge_create_refuses_a_coin_the_exchange_does_not_list(env, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_hip3_position(ALICE, "xyz:TSLA", "1", "250")
    for coin, says in (("btc", "did you mean BTC?"), ("BTCC", "not listed on the main perp dex"),
                       ("xyz:tsla", "did you mean xyz:TSLA?")):
        result = cli(env, "hedge", "create", "g", "--coin", coin)
        assert result.returncode == 2, (coin, result.stdout, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and says in result.stderr and "Traceback" not in result.stderr
    assert sql(database_url, "SELECT count(*) FROM hedge_groups") == [(0,)]
    ok(env, "hedge", "create", "tsla", "--coin", "xyz:TSLA")  # listed on its dex: created, no warning
    created = ok(env, "hedge", "create", "btc", "--coin", "BTC")
    assert created.stderr == "" and "no urgent level" in created.stdout  # tolerance 0 says so
    assert "no urgent level" not in ok(env, "hedge", "create", "btc", "--coin", "BTC", "--tolerance", "0.1").stdout


def test_hedge_create_without_an_answer_creates_the_group_with_one_warning(env, sim, database_url):
    sim.add_fault("500", path="info", type="meta", count=None)
    result = ok(env, "hedge", "create", "g", "--coin", "BTC")
    assert len(result.stderr.splitlines()) == 1 and "could not ask the exchange" in result.stderr
    assert sql(database_url, "SELECT name FROM hedge_groups") == [("g",)]


def test_a_run_with_the_dexs_meta_cached_marks_a_coin_not_listed_unknown(env, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_position(BOB, "BTC", "-0.2", "30000")
    ok(env, "accounts", "add", ALICE)
    ok(env, "accounts", "add", BOB)
    sim.add_fault("500", path="info", type="meta", count=None)  # created unchecked (the exchange did not answer)
    ok(env, "hedge", "create", "typo", "--coin", "BTCC")
    ok(env, "hedge", "add-leg", "typo", "--account", ALICE)
    ok(env, "hedge", "add-leg", "typo", "--account", BOB)
    sim.clear_faults()
    sql(database_url, "INSERT INTO exchange_meta (dex, meta) VALUES ('', %s::jsonb)",
        json.dumps(sim.meta()))
    sim.reset_log()
    typo = hedges(run_json(env))["typo"]
    assert typo["status"] == "unknown" and typo["net"] is None and "coin not listed" in typo["reason"]
    assert not [r for r in sim.requests_log() if r.get("type") == "meta"]  # from the cache, no request


# ---- 2. escalation to urgent ---------------------------------------------------------------------------


def test_an_active_imbalance_escalating_to_urgent_is_sent_at_once(env, sim, recorder):  # noqa: F811
    pair(env, sim, tolerance="0.1")
    env = dict(env, MONITOR_ALERT_WEBHOOK=recorder.url + "/hook", MONITOR_ALERT_AFTER_RUNS="2")
    sim.resize(BOB, "BTC", "-0.8", "30000")  # net 0.2: imbalanced, not urgent
    run_json(env)
    run_json(env)
    assert len(texts(recorder)) == 1
    sim.resize(ALICE, "BTC", "50", "30000")  # net 49.2 = 492 x tolerance
    assert hedges(run_json(env))["basis"]["status"] == "imbalanced"
    assert len(texts(recorder)) == 2 and "more than 10x its tolerance" in texts(recorder)[1]
    run_json(env)
    assert len(texts(recorder)) == 2  # once


def test_decide_alerts_sends_a_kind_moving_into_the_urgent_set():
    before = {"k": AlertState("k", "hedge_imbalance", streak=3, active=True, message="m", last_sent_at=NOW)}
    states, sent, _ = decide_alerts(before, {"k": ("hedge_imbalance_urgent", "urgent m")},
                                    NOW + timedelta(minutes=1), threshold_runs=3, resend_after=timedelta(hours=1))
    assert sent == [("k", "urgent m")] and states["k"].kind == "hedge_imbalance_urgent"
    _, again, _ = decide_alerts(states, {"k": ("hedge_imbalance_urgent", "urgent m")},
                                NOW + timedelta(minutes=2), threshold_runs=3, resend_after=timedelta(hours=1))
    assert again == []


# ---- 3. a group across shards -----------------------------------------------------------------------


def test_a_group_across_shards_is_judged_from_the_table_for_the_other_shards_leg(env, sim, database_url):
    a, b = _two_shards()
    sim.open_position(a, "BTC", "1", "30000")
    sim.open_position(b, "BTC", "-0.1", "30000")  # 0.9 BTC unhedged
    ka = _group_across_shards(env, "x", "BTC", a, b)
    first = run_json(env, "--shard", f"{ka}/2")  # b never read yet: unknown, and says which account
    x = hedges(first)["x"]
    assert x["status"] == "unknown" and b in x["reason"] and "stale" in x["reason"]
    run_json(env, "--shard", f"{3 - ka}/2")  # b read (its row written); a from the table
    for k in (ka, 3 - ka):
        x = hedges(run_json(env, "--shard", f"{k}/2"))["x"]
        assert (x["status"], Decimal(x["net"])) == ("imbalanced", Decimal("0.9")), k
    sql(database_url, "UPDATE account_health SET last_good_read_at = now() - interval '1 hour'")
    x = hedges(run_json(env, "--shard", f"{ka}/2"))["x"]
    assert x["status"] == "unknown" and b in x["reason"] and a not in x["reason"]


def test_a_group_of_only_external_legs_is_judged_by_a_sharded_run(env, sim):
    ok(env, "accounts", "add", ALICE)
    ok(env, "hedge", "create", "cex", "--coin", "BTC")
    ok(env, "hedge", "set-external", "cex", "--venue", "okx", "--size", "1")
    ok(env, "hedge", "set-external", "cex", "--venue", "binance", "--size", "-1")
    for k in (1, 2):
        assert hedges(run_json(env, "--shard", f"{k}/2"))["cex"]["status"] == "balanced"


# ---- 4. alerts of shards ------------------------------------------------------------------------------


def test_a_shard_neither_counts_nor_resolves_another_shards_alerts(env, sim, recorder):  # noqa: F811
    a, b = _two_shards()
    sim.open_position(a, "BTC", "1", "30000")
    ok(env, "accounts", "add", a)
    ok(env, "accounts", "add", b)
    env = dict(env, MONITOR_ALERT_WEBHOOK=recorder.url + "/hook", MONITOR_ALERT_AFTER_RUNS="2",
               MONITOR_LOCK_BACKEND="postgres")
    sim.add_fault("500", path="info", type="clearinghouseState", user=a, count=None)
    ka = 1 if in_shard(a, (1, 2)) else 2
    for _ in range(2):
        cli(env, "run", "--shard", f"{ka}/2")
        cli(env, "run", "--shard", f"{3 - ka}/2")
    msgs = _messages(recorder)
    assert len(msgs) == 1 and f"account {a} failed" in msgs[0] and "resolved" not in msgs[0]
    status = json.loads(ok(env, "status", "--json").stdout)
    assert f"account_failed:{a}" in [x["key"] for x in status["alerts"]]


def test_run_wide_alert_keys_carry_the_shard():
    from monitor.operations import alert_scope, observed_conditions
    from monitor.report import RunReport

    report = RunReport(run_id="r", dry_run=False, overrun=True, conflicts=1)
    assert {"run_overran", "conflicts"} <= set(observed_conditions(report))
    report.shard, report.scope_addresses = "shard-1-of-2", [ALICE]
    assert {"run_overran:shard-1-of-2", "conflicts:shard-1-of-2"} <= set(observed_conditions(report))
    owns = alert_scope(report)
    assert owns(AlertState("run_overran:shard-1-of-2", "run_overran"))
    assert not owns(AlertState("run_overran:shard-2-of-2", "run_overran"))
    assert owns(AlertState("run_overran", "run_overran"))  # a plain key no sharded run carries: orphaned, taken
    assert owns(AlertState(f"account_failed:{ALICE}", "account_failed"))
    assert not owns(AlertState(f"account_failed:{BOB}", "account_failed"))
    assert not owns(AlertState("followup_failed:3", "followup_failed", message=f"follow-up #3 ({BOB} BTC)"))


# ---- 5. long unknown ----------------------------------------------------------------------------------


def test_a_group_unknown_for_n_runs_alerts_and_disable_warns(env, sim, recorder):  # noqa: F811
    pair(env, sim)
    env = dict(env, MONITOR_ALERT_WEBHOOK=recorder.url + "/hook", MONITOR_ALERT_AFTER_RUNS="2")
    disabled = ok(env, "accounts", "disable", BOB)
    assert len(disabled.stderr.splitlines()) == 1 and "basis" in disabled.stderr
    run_json(env)
    assert texts(recorder) == []
    run_json(env)
    assert len(texts(recorder)) == 1 and "hedge group basis (BTC) has been unknown" in texts(recorder)[0]
    status = json.loads(ok(env, "status", "--json").stdout)
    assert "hedge_unknown:basis" in [x["key"] for x in status["alerts"]]
    ok(env, "accounts", "add", BOB)
    assert hedges(run_json(env))["basis"]["status"] == "balanced"
    assert "resolved: hedge group basis (BTC) has been unknown" in texts(recorder)[1]


# ---- 6. outdated verdicts, formatting -----------------------------------------------------------------


def test_hedge_list_and_show_mark_a_verdict_older_than_the_groups_definition(env, sim):
    pair(env, sim)
    run_json(env)
    listed, = json.loads(ok(env, "hedge", "list", "--json").stdout)
    assert listed["outdated"] is False
    ok(env, "hedge", "set-external", "basis", "--venue", "binance", "--size", "-5")
    listed, = json.loads(ok(env, "hedge", "list", "--json").stdout)
    assert listed["outdated"] is True and listed["status"] == "balanced"
    assert "outdated" in ok(env, "hedge", "show", "basis").stdout
    assert "balanced (outdated)" in ok(env, "hedge", "list").stdout
    assert "reason" in ok(env, "hedge", "list").stdout.splitlines()[0]
    run_json(env)
    listed, = json.loads(ok(env, "hedge", "list", "--json").stdout)
    assert listed["outdated"] is False and listed["status"] == "imbalanced" and listed["net"] == "-5"


def test_nets_are_exact_text_without_exponents_or_rounding():
    from monitor.hedges import HedgeResult, format_decimal

    assert format_decimal(Decimal("0E-27")) == "0" and format_decimal(Decimal("-0.000")) == "0"
    assert format_decimal(Decimal("0.20000")) == "0.2" and format_decimal(Decimal("1E+3")) == "1000"
    big = Decimal("12345678901234567890.123456789012345678901")
    assert format_decimal(big) == "12345678901234567890.123456789012345678901"
    r = HedgeResult(1, "g", "BTC", Decimal("0.10"), "imbalanced", Decimal("0.2000"))
    assert r.to_json()["net"] == "0.2" and "net 0.2 (tolerance 0.1)" in r.describe()


def test_a_sum_beyond_28_digits_is_not_rounded():
    from monitor.hedges import ExternalLeg, HedgeGroup, evaluate

    g = HedgeGroup(1, "g", "BTC", Decimal(0), externals=(
        ExternalLeg("a", Decimal("1234567890123456789012345678.9"), NOW),  # 29 digits: the default context rounds
        ExternalLeg("b", Decimal("-1234567890123456789012345678"), NOW)))
    result, = evaluate([g], {}, {}, NOW, timedelta(seconds=300))
    assert result.net == Decimal("0.9") and result.status == "imbalanced"


# ---- red team on the table path: only rows the other run confirmed count --------------------------------


def test_a_leg_from_the_table_whose_row_is_marked_missing_or_unconfirmed_is_unknown(env, sim, database_url):
    """The other shard read its account (fresh account_health) but found the position gone without a closing
    fill: the row stays open, marked missing, for up to 15 minutes. Counting it made the group balanced while the
    other shard's own verdict was imbalanced. A marked row, a row not confirmed lately, or a HIP-3 leg (the table
    does not say when its dex was read) is unknown from the table."""
    a, b = _two_shards()
    sim.open_position(a, "BTC", "1", "30000")
    sim.open_position(b, "BTC", "-1", "30000")  # balanced while b's short is open
    ka = _group_across_shards(env, "x", "BTC", a, b)
    run_json(env, "--shard", f"{3 - ka}/2")
    assert hedges(run_json(env, "--shard", f"{ka}/2"))["x"]["status"] == "balanced"

    sql(database_url, "UPDATE positions SET metadata = metadata || jsonb_build_object('missing_since', now()::text)"
                      " WHERE coin = 'BTC' AND account_id = (SELECT id FROM accounts WHERE address = %s)", b)
    x = hedges(run_json(env, "--shard", f"{ka}/2"))["x"]
    assert x["status"] == "unknown" and "marked missing" in x["reason"], x

    sql(database_url, "UPDATE positions SET metadata = metadata - 'missing_since',"
                      " last_seen_at = now() - interval '1 hour' WHERE coin = 'BTC'")
    x = hedges(run_json(env, "--shard", f"{ka}/2"))["x"]
    assert x["status"] == "unknown" and "last confirmed" in x["reason"], x


def test_a_hip3_leg_from_the_table_is_unknown(env, sim, database_url):
    a, b = _two_shards()
    sim.open_hip3_position(a, "xyz:TSLA", "1", "250")
    sim.open_hip3_position(b, "xyz:TSLA", "-1", "250")
    ka = _group_across_shards(env, "t", "xyz:TSLA", a, b)
    run_json(env, "--shard", f"{3 - ka}/2")
    x = hedges(run_json(env, "--shard", f"{ka}/2"))["t"]
    assert x["status"] == "unknown" and "HIP-3" in x["reason"], x
    assert hedges(run_json(env))["t"]["status"] == "balanced"  # an unsharded run reads both: judged
