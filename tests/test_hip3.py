"""HIP-3 builder-deployed perp dexes: positions on every dex, no false close for a dex not read, closes with
HIP-3 asset ids and perp prices, settled exactly once without a cloid, MONITOR_PERP_DEXES and the sweep."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest

from tests.conftest import ALICE, cli, fixture_response, run_json

BOB = "0x" + "b2" * 20


def row(database_url, coin):
    with psycopg.connect(database_url) as conn:
        cur = conn.execute("SELECT * FROM positions WHERE coin = %s ORDER BY id DESC LIMIT 1", (coin,))
        found = cur.fetchone()
        return None if found is None else dict(zip([c.name for c in cur.description], found))


def execute(database_url, sql, *params):
    with psycopg.connect(database_url) as conn:
        conn.execute(sql, params)


def orders_sent(sim):
    return [r for r in sim.requests_log() if r["path"].endswith("/exchange") and r.get("type") == "order"]


def dex_reads(sim):
    """The clearinghouseState requests, by dex, from the simulator's own view of the bodies (hooked)."""
    return [r for r in sim.requests_log() if r.get("type") == "clearinghouseState"]


def insert_platform_row(database_url, address, coin, side, size, entry, *, opened_ago, metadata=None, **rules):
    columns = ", ".join(["account_id", "coin", "side", "size", "entry_price", "opened_at", "metadata", *rules])
    marks = ", ".join(["(SELECT id FROM accounts WHERE address = %s)"] + ["%s"] * (6 + len(rules)))
    execute(database_url, f"INSERT INTO positions ({columns}) VALUES ({marks})", address, coin, side,
            Decimal(size), Decimal(entry), datetime.now(timezone.utc) - opened_ago, json.dumps(metadata or {}),
            *rules.values())


# ---- reading every dex ---------------------------------------------------------------------------


def test_a_hip3_position_is_discovered_under_its_own_name_and_closed_from_its_fills(env, sim, database_url):
    sim.open_position(ALICE, "BTC", "0.5", "30000")
    sim.open_hip3_position(ALICE, "xyz:TSLA", "2", "250")
    assert cli(env, "accounts", "add", ALICE).returncode == 0

    first = run_json(env)

    assert first["discovered"] == 2
    tsla = row(database_url, "xyz:TSLA")
    assert tsla["status"] == "open" and tsla["side"] == "long" and tsla["size"] == 2
    assert tsla["entry_price"] == 250 and tsla["source"] == "discovered"

    sim.advance_time(1000)
    sim.close_external(ALICE, "xyz:TSLA", px="260")
    execute(database_url, "UPDATE positions SET opened_at = opened_at - interval '5 minutes'")
    second = run_json(env)

    assert second["closed"] == 1
    closed = row(database_url, "xyz:TSLA")
    assert closed["status"] == "closed" and closed["close_reason"] == "external"
    assert closed["exit_price"] == 260 and closed["realized_pnl"] == 20  # 2 * (260 - 250), from the fills
    assert row(database_url, "BTC")["status"] == "open"
    assert run_json(env)["closed"] == 0  # exactly once


def test_the_recorded_hip3_position_is_read_as_the_exchange_names_it(env, sim, database_url):
    sim.add_perp_dex("xyz")
    sim.add_perp_dex("flx")
    sim.seed_from_clearinghouse(ALICE, fixture_response("clearinghouseState_hip3.json"))
    assert cli(env, "accounts", "add", ALICE).returncode == 0

    assert run_json(env)["discovered"] == 1
    crcl = row(database_url, "flx:CRCL")
    assert crcl["size"] == Decimal("0.13") and crcl["entry_price"] == Decimal("80.262") and crcl["side"] == "long"


def test_a_platform_row_on_a_dex_not_read_is_never_closed(env, sim, database_url):
    """The false close of issue 12: a platform row for xyz:… is missing on the first dex, its fills show no close,
    and after 15 minutes it used to be closed "unexplained" while still open."""
    sim.open_hip3_position(ALICE, "xyz:TSLA", "2", "250")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    # As an older version left it: opened an hour ago and marked missing 20 minutes ago (past the window).
    insert_platform_row(database_url, ALICE, "xyz:TSLA", "long", "2", "250", opened_ago=timedelta(hours=1),
                        metadata={"missing_since": (datetime.now(timezone.utc) - timedelta(minutes=20)).isoformat()},
                        stop_loss_price=Decimal("1"))
    fault = sim.add_fault("500", path="info", type="clearinghouseState", count=None, dex="xyz")

    for _ in range(3):  # the dex's read fails: one failed account (exit 1), nothing of the row touched
        report = run_json(env, expect=1)
        assert report["closed"] == 0 and report["discovered"] == 0
        assert "perp dex xyz" in report["failures"][0]["reason"]
        execute(database_url, "UPDATE positions SET opened_at = opened_at - interval '20 minutes'")
    assert row(database_url, "xyz:TSLA")["status"] == "open"

    narrowed = dict(env, MONITOR_PERP_DEXES="")  # the first dex only: xyz is not read at all
    sim.clear_faults(fault)
    sim.reset_log()
    for _ in range(3):
        report = run_json(narrowed)
        assert report["closed"] == 0
        assert any(a["type"] == "wait" and a["coin"] == "xyz:TSLA" and "not read" in a["reason"]
                   for a in report["actions"])
    assert not any(r.get("type") == "perpDexs" for r in sim.requests_log())
    tsla = row(database_url, "xyz:TSLA")
    assert tsla["status"] == "open" and tsla["last_seen_at"] is None

    # Gone for real while its dex is unread: still not closed; once read, closed from its fills.
    sim.close_external(ALICE, "xyz:TSLA", px="240")
    assert run_json(narrowed)["closed"] == 0
    sim.add_fault("500", path="info", type="clearinghouseState", count=None, dex="xyz")
    assert run_json(env, expect=1)["closed"] == 0
    assert row(database_url, "xyz:TSLA")["status"] == "open"
    sim.clear_faults()
    report = run_json(env)
    assert report["closed"] == 1
    closed = row(database_url, "xyz:TSLA")
    assert closed["close_reason"] == "external" and closed["exit_price"] == 240 and closed["realized_pnl"] == -20


def test_a_row_on_a_dex_that_was_read_and_is_gone_is_still_closed(env, sim, database_url):
    sim.add_perp_dex("xyz")
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    insert_platform_row(database_url, ALICE, "xyz:TSLA", "long", "2", "250", opened_ago=timedelta(hours=1),
                        metadata={"missing_since": (datetime.now(timezone.utc) - timedelta(minutes=20)).isoformat(),
                                  "missing_reads": 2})  # two runs that read xyz found it gone
    report = run_json(env)
    assert report["closed"] == 1  # xyz was read: the unexplained close after the window still works
    closed = row(database_url, "xyz:TSLA")
    assert closed["metadata"]["unexplained"] is True and closed["exit_price"] is None


def test_monitor_perp_dexes_narrows_the_dexes_read(env, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_hip3_position(ALICE, "xyz:TSLA", "2", "250")
    sim.open_hip3_position(ALICE, "flx:CRCL", "3", "80")
    assert cli(env, "accounts", "add", ALICE).returncode == 0

    sim.reset_log()
    report = run_json(dict(env, MONITOR_PERP_DEXES="flx"))
    assert report["discovered"] == 2
    assert row(database_url, "flx:CRCL") is not None and row(database_url, "xyz:TSLA") is None
    assert len(dex_reads(sim)) == 2  # the first dex and flx

    sim.reset_log()
    report = run_json(dict(env, MONITOR_PERP_DEXES=""))
    assert report["discovered"] == 0 and report["closed"] == 0
    assert len(dex_reads(sim)) == 1 and report["api_weight"] == 2

    sim.reset_log()
    assert run_json(env)["discovered"] == 1  # all: xyz too (perpDexs is cached, no request for it)
    assert len(dex_reads(sim)) == 3 and not any(r.get("type") == "perpDexs" for r in sim.requests_log())

    bad = cli(dict(env, MONITOR_PERP_DEXES="xyz,,flx"), "run")
    assert bad.returncode == 78 and "MONITOR_PERP_DEXES" in bad.stderr


def test_an_unknown_dex_list_reads_the_first_dex_only_and_leaves_hip3_rows_alone(env, sim, database_url):
    sim.open_hip3_position(ALICE, "xyz:TSLA", "2", "250")
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    insert_platform_row(database_url, ALICE, "xyz:TSLA", "long", "2", "250", opened_ago=timedelta(hours=1),
                        metadata={"missing_since": (datetime.now(timezone.utc) - timedelta(minutes=20)).isoformat()})
    sim.add_fault("500", path="info", type="perpDexs", count=None)
    report = run_json(env)
    assert report["closed"] == 0 and report["discovered"] == 1
    assert any("perp dexes unknown" in n for n in report["notes"])
    assert row(database_url, "xyz:TSLA")["status"] == "open"


def test_a_row_on_a_dex_the_exchange_does_not_list_waits_and_costs_no_perp_dexs_every_run(env, sim, database_url):
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    insert_platform_row(database_url, ALICE, "nope:X", "long", "1", "10", opened_ago=timedelta(hours=1),
                        metadata={"missing_since": (datetime.now(timezone.utc) - timedelta(minutes=20)).isoformat()})
    sim.reset_log()
    for _ in range(3):
        report = run_json(env)
        assert report["closed"] == 0
        assert any(a["type"] == "wait" and a["coin"] == "nope:X" for a in report["actions"])
    assert [r["type"] for r in sim.requests_log()].count("perpDexs") == 1
    assert row(database_url, "nope:X")["status"] == "open"


# ---- closing on a HIP-3 dex ------------------------------------------------------------------------


def _stop_loss_setup(keyed, sim, database_url, *, mode="silent"):
    sim.set_config(hip3_cloid=mode)
    sim.add_perp_dex("abc")
    sim.add_perp_dex("xyz")
    sim.add_coin("xyz:AAPL", sz_decimals=2, mid="190")
    # szDecimals 0 and a tiny price: perp rules allow 6 decimals, the SDK's spot rounding would send 7.
    sim.open_hip3_position(ALICE, "xyz:PEPE", "1000", "0.0013", sz_decimals=0)
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    execute(database_url, "UPDATE positions SET stop_loss_price = 0.00125 WHERE coin = 'xyz:PEPE'")
    sim.set_mid("xyz:PEPE", "0.0012345678")
    bodies = []
    sim.add_request_hook(lambda path, typ, user, body: bodies.append(body), path="exchange", type="order",
                         count=None)
    sim.reset_log()
    return bodies


@pytest.mark.parametrize("mode", ["silent", "honor"])
def test_a_stop_loss_on_a_hip3_row_closes_once_with_its_asset_id_and_a_perp_price(keyed, sim, database_url, mode):
    bodies = _stop_loss_setup(keyed, sim, database_url, mode=mode)

    reports = [run_json(keyed) for _ in range(3)]

    assert len(orders_sent(sim)) == 1 and len(bodies) == 1
    (wire,) = bodies[0]["action"]["orders"]
    assert wire["a"] == 100_000 + 2 * 10_000 + 1  # xyz is perp dex 2, PEPE its second coin
    assert wire["p"] == "0.001172" and wire["s"] == "1000" and wire["r"] is True and "c" not in wire
    assert reports[0]["close_orders_sent"] == 1 and reports[0]["closed"] == 1
    closed = row(database_url, "xyz:PEPE")
    assert closed["status"] == "closed" and closed["close_reason"] == "stop_loss"
    assert closed["metadata"]["close_oids"] and closed["close_cloid"] is not None
    assert sim.position(ALICE, "xyz:PEPE") is None


def test_the_hip3_asset_id_is_the_sdks_numbering(sim):
    from hyperliquid.info import Info

    from monitor.exchange import hip3_asset_id

    sim.add_perp_dex("xyz")
    sim.add_perp_dex("flx")
    sim.add_coin("flx:CRCL", sz_decimals=2, mid="80")
    sim.add_coin("flx:HOOD", sz_decimals=2, mid="100")
    info = Info(sim.url, skip_ws=True, meta=sim.meta(), spot_meta={"universe": [], "tokens": []},
                perp_dexs=["", "flx"], timeout=5)
    assert info.name_to_asset("flx:HOOD") == hip3_asset_id(2, 1) == 120_001


def test_a_lost_answer_on_hip3_is_settled_from_fills_after_it_expires_exactly_once(keyed, sim, database_url):
    _stop_loss_setup(keyed, sim, database_url)
    sim.add_fault("drop_response", count=1)  # the order executes; its answer is lost

    first = run_json(keyed)
    assert first["close_orders_sent"] == 1 and first["closed"] == 0
    assert row(database_url, "xyz:PEPE")["status"] == "closing"
    assert sim.position(ALICE, "xyz:PEPE") is None

    # The position is gone and the fills show the row's cycle ending inside its order's life: closed from them
    # (no cloid, no oid: the order's window names the rule), with nothing sent again.
    settled = run_json(keyed)
    assert settled["closed"] == 1 and settled["close_orders_sent"] == 0
    closed = row(database_url, "xyz:PEPE")
    assert closed["status"] == "closed" and closed["close_reason"] == "stop_loss"
    assert closed["exit_price"] == Decimal("0.0012345678") and "close_oids" not in closed["metadata"]
    assert run_json(keyed)["closed"] == 0 and len(orders_sent(sim)) == 1


def test_a_lost_answer_with_the_position_still_open_waits_for_expiry_then_settles(keyed, sim, database_url):
    _stop_loss_setup(keyed, sim, database_url)
    sim.set_partial_fill_ratio("xyz:PEPE", "0.4")  # the order closes 400 of 1000; its answer is lost
    sim.add_fault("drop_response", count=1)

    first = run_json(keyed)
    assert first["close_orders_sent"] == 1 and row(database_url, "xyz:PEPE")["status"] == "closing"
    assert Decimal(sim.position(ALICE, "xyz:PEPE")["szi"]) == 600
    sim.set_partial_fill_ratio("xyz:PEPE", None)

    early = run_json(keyed)  # its expiresAfter has not passed: nothing is concluded, nothing sent
    assert early["close_orders_sent"] == 0 and row(database_url, "xyz:PEPE")["status"] == "closing"

    execute(database_url, "UPDATE positions SET close_started_at = close_started_at - interval '30 seconds',"
                          " close_expires_at = close_expires_at - interval '30 seconds'")
    settled = run_json(keyed)  # from fills: 600 still open, back to open with that size, then a new attempt
    assert settled["close_orders_sent"] == 1 and settled["closed"] == 1
    closed = row(database_url, "xyz:PEPE")
    assert closed["close_reason"] == "stop_loss" and closed["close_attempts"] == 2
    assert sim.position(ALICE, "xyz:PEPE") is None and len(orders_sent(sim)) == 2
    assert run_json(keyed)["close_orders_sent"] == 0


@pytest.mark.parametrize("claimed_before_expiry_was_stored", [False, True])
def test_a_hip3_order_that_never_landed_is_retried_after_it_expires(keyed, sim, database_url,
                                                                    claimed_before_expiry_was_stored):
    _stop_loss_setup(keyed, sim, database_url)
    sim.add_fault("500", path="exchange", type="order", count=1)  # refused before it is applied

    first = run_json(keyed)
    assert first["close_orders_sent"] == 1 and row(database_url, "xyz:PEPE")["status"] == "closing"
    assert sim.position(ALICE, "xyz:PEPE") is not None

    execute(database_url, "UPDATE positions SET close_started_at = close_started_at - interval '30 seconds',"
                          " close_expires_at = close_expires_at - interval '30 seconds'")
    if claimed_before_expiry_was_stored:  # close_expires_at NULL: the longest expiresAfter a claim can have
        execute(database_url, "UPDATE positions SET close_expires_at = NULL")
    logged = len(sim.requests_log())
    retried = run_json(keyed)  # no fill of it: released, and the rule that still fires sends a new attempt
    assert retried["close_orders_sent"] == 1 and retried["closed"] == 1
    # The expired close is settled from the fills the read phase got (read after it could last land), not from
    # a second read of them that a busy account's weight could starve (as chaos seed 20267146 on the first dex);
    # the new attempt's own fills are read after it.
    assert [e["type"] for e in sim.requests_log()[logged:]].count("userFillsByTime") == 2
    closed = row(database_url, "xyz:PEPE")
    assert closed["close_reason"] == "stop_loss" and closed["close_attempts"] == 2
    assert len(orders_sent(sim)) == 2 and sim.position(ALICE, "xyz:PEPE") is None
    with psycopg.connect(database_url) as conn:
        events = [e for (e,) in conn.execute("SELECT event FROM position_events WHERE position_id = %s ORDER BY id",
                                             (closed["id"],))]
    assert events.count("closed") == 1 and "close_released" in events


def test_orders_left_by_a_closed_hip3_position_are_cancelled_on_its_dex(keyed, sim, database_url):
    sim.add_perp_dex("xyz")
    sim.open_hip3_position(ALICE, "xyz:TSLA", "2", "250")
    stop = sim.add_trigger_order(ALICE, "xyz:TSLA", "A", "2", "200", "sl")
    assert cli(keyed, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    execute(database_url, "UPDATE positions SET opened_at = opened_at - interval '5 minutes'")
    sim.advance_time(1000)
    sim.close_external(ALICE, "xyz:TSLA", px="255")

    report = run_json(keyed)

    assert report["closed"] == 1
    assert [o["status"] for o in sim.orders(ALICE) if o["oid"] == stop] == ["canceled"]
    assert any(a["type"] == "cancel_order" and a["coin"] == "xyz:TSLA" for a in report["actions"])


# ---- the weight policy -----------------------------------------------------------------------------


def test_the_sweep_reaches_every_dex_of_every_account_within_its_bound():
    from monitor.dexes import cursor_after, plan_dex_reads, sweep_bound
    from monitor.models import Account

    accounts = [Account(i, f"0x{i:040x}", None, True) for i in range(1, 101)]
    known = ["", "xyz", "flx", "abc"]
    bound = sweep_bound(100, 3, 400)
    assert bound == 7  # a quarter of 400 pays 16 accounts x 3 dexes per run: 100 accounts in 7 turns
    reached: set[tuple[int, str]] = set()
    cursor = 57  # wherever the stored cursor stands
    for _ in range(bound):
        plan = plan_dex_reads(accounts, {}, {}, known, {"xyz", "flx", "abc"}, read_weight=400, cursor=cursor)
        assert not plan.full and plan.groups == bound
        assert len(plan.sweep) <= 16
        reached |= {(a.id, d) for a in accounts for d in plan.dexes_for(a.id)}
        cursor = cursor_after(plan, cursor, plan.sweep)  # every sweep read happened
    assert reached == {(a.id, d) for a in accounts for d in ("xyz", "flx", "abc")}

    roomy = plan_dex_reads(accounts, {}, {}, known, {"xyz", "flx", "abc"}, read_weight=100_000, cursor=None)
    assert roomy.full and all(roomy.dexes_for(a.id) == {"xyz", "flx", "abc"} for a in accounts)


def test_under_a_tight_budget_dexes_with_rows_are_read_every_run_and_the_rest_by_the_sweep(env, sim, database_url):
    accounts = ["0x" + f"{i:02x}" * 20 for i in range(16, 28)]  # 12 accounts
    for name in ("xyz", "flx", "abc"):
        sim.add_perp_dex(name)
    for address in accounts:
        sim.open_position(address, "BTC", "1", "30000")
        assert cli(env, "accounts", "add", address).returncode == 0
    sim.open_hip3_position(accounts[0], "xyz:TSLA", "1", "250")
    tight = dict(env, MONITOR_WEIGHT_BUDGET="100")  # all dexes: 12 x 4 x 2 = 96 > 3/4 of 100
    first = run_json(tight)
    assert first["accounts_deferred"] == 0
    late = accounts[-1]
    sim.open_hip3_position(late, "abc:NVDA", "3", "180")  # on an account with no rows there

    found_after = None
    for n in range(1, 6):
        report = run_json(tight)
        assert report["api_weight"] <= 100 and report["accounts_deferred"] == 0
        assert report["closed"] == 0
        if row(database_url, "abc:NVDA") is not None:
            found_after = n
            break
    from monitor.dexes import sweep_bound

    assert found_after is not None and found_after <= sweep_bound(12, 3, 100) == 3
    # The row's own dex is read every run from then on: it is never missing, never closed.
    for _ in range(3):
        report = run_json(tight)
        assert report["closed"] == 0
    assert row(database_url, "xyz:TSLA")["status"] == "open" and row(database_url, "abc:NVDA")["status"] == "open"


def test_the_planner_leaves_rows_on_unread_dexes_alone():
    from monitor.models import Account, AccountSnapshot, PositionRow
    from monitor.planner import PlanSettings, needs_fills, plan_account

    now = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    account = Account(1, ALICE, None, True)
    stale_mark = (now - timedelta(hours=1)).isoformat()
    rows = [PositionRow(id=7, account_id=1, coin="xyz:TSLA", side="long", size=Decimal(2),
                        entry_price=Decimal(250), status="open", opened_at=now - timedelta(days=1),
                        stop_loss_price=Decimal(1000), metadata={"missing_since": stale_mark}),
            PositionRow(id=8, account_id=1, coin="BTC", side="long", size=Decimal(1), entry_price=Decimal(30000),
                        status="open", opened_at=now - timedelta(days=1))]
    snapshot = AccountSnapshot(ALICE, {}, dexes_read=frozenset({""}))
    assert needs_fills(snapshot, rows[:1], [], now, PlanSettings(), mids={"xyz:TSLA": Decimal(200)}) is None
    plan = plan_account(account, snapshot, rows, now, PlanSettings(), fills=[], mids={"xyz:TSLA": Decimal(200)})
    tsla = [a for a in plan.actions if a.coin == "xyz:TSLA"]
    # Left as it is but for its missing clock, which stops (missing time counts only runs reading its dex).
    assert [a.type for a in tsla] == ["wait", "pause_missing"] and 7 not in plan.seen_ids
    assert [a.type for a in plan.actions if a.coin == "BTC"] == ["mark_missing"]


@pytest.mark.parametrize("mode", ["silent", "honor"])
def test_the_simulator_models_both_answers_to_a_hip3_order_with_a_cloid(sim, mode):
    """UNCONFIRMED on the real exchange (reference §4): a HIP-3 order carrying a cloid is reported to fail
    silently. The simulator's default models that; ``hip3_cloid="honor"`` models the other possibility."""
    from eth_account import Account as EthAccount

    from monitor.exchange import Exchange, Trader, hip3_assets

    agent = EthAccount.create()
    sim.approve_agent(ALICE, agent.address)
    sim.set_config(hip3_cloid=mode)
    sim.open_hip3_position(ALICE, "xyz:TSLA", "2", "250", sz_decimals=1)
    reader = Exchange(sim.url, timeout=5)
    trader = Trader(reader, agent.key.hex(), ALICE, sim.meta(), hip3=hip3_assets("xyz", 1, sim.meta(dex="xyz")))
    cloid = "0x" + "ab" * 16
    outcome = trader.close_ioc("xyz:TSLA", side="long", size=Decimal(2), mid=Decimal(250),
                               slippage=Decimal("0.05"), cloid=cloid, expires_after_ms=sim.now_ms() + 10_000)
    if mode == "silent":
        assert outcome.kind == "unknown" and outcome.oid is None
        assert sim.position(ALICE, "xyz:TSLA") is not None and reader.order_status(ALICE, cloid) == "unknownOid"
    else:
        assert outcome.kind == "filled" and outcome.oid is not None
        assert sim.position(ALICE, "xyz:TSLA") is None and reader.order_status(ALICE, cloid) == "filled"


def test_a_hip3_close_gets_funding_only_when_userfunding_shows_that_coin():
    """Whether userFunding covers HIP-3 dexes is UNCONFIRMED: without a payment of the coin, funding is NULL."""
    from monitor.models import FundingPayment
    from monitor.planner import CLOSE, Action, with_funding

    close = Action(CLOSE, ALICE, "xyz:TSLA", position_id=7, realized_pnl=Decimal(20), fees=Decimal(1),
                   funding_window=(1_000, 9_000))
    main = Action(CLOSE, ALICE, "BTC", position_id=8, realized_pnl=Decimal(5), fees=Decimal(1),
                  funding_window=(1_000, 9_000))
    unknown, btc = with_funding([close, main], [])
    assert unknown.funding is None and unknown.net_pnl is None and unknown.metadata["funding_unconfirmed_hip3"]
    assert btc.funding == 0 and btc.net_pnl == 4  # the main dex: userFunding is known to cover it
    payment = FundingPayment(coin="xyz:TSLA", time_ms=5_000, usdc=Decimal("-0.5"), szi=Decimal(2),
                             rate=Decimal("0.0001"), hash="0x" + "0" * 64)
    (known,) = with_funding([close], [payment])
    assert known.funding == Decimal("-0.5") and known.net_pnl == Decimal("18.5")


# ---- a stale missing mark (red-team F6) -----------------------------------------------------------------------


def _missing_since(database_url, coin):
    return (row(database_url, coin)["metadata"] or {}).get("missing_since")


def _age(database_url, minutes):
    """Stand for ``minutes`` of cron time between two runs: the row's missing mark and pause grow older."""
    for key in ("missing_since", "missing_paused_at"):
        execute(database_url, f"UPDATE positions SET metadata = jsonb_set(metadata, '{{{key}}}', to_jsonb("
                              f"((metadata->>'{key}')::timestamptz - interval '{minutes} minutes')::text))"
                              f" WHERE metadata->>'{key}' IS NOT NULL")


def test_missing_time_counts_only_runs_that_read_the_rows_dex(env, sim, database_url):
    """A row marked missing in a run, its dex then unread for longer than the unexplained-close window, then read
    again: the old mark must not close it at once as unexplained. The run that does not read the dex stops the
    row's missing clock; when the dex is read again the mark moves on by the gap, and only the time over runs that
    read the dex adds up to the window."""
    sim.add_perp_dex("xyz")
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    insert_platform_row(database_url, ALICE, "xyz:TSLA", "long", "2", "250", opened_ago=timedelta(hours=1))

    assert run_json(env)["closed"] == 0  # xyz read, the position is not there: marked missing
    assert _missing_since(database_url, "xyz:TSLA") is not None
    _age(database_url, 1)

    narrowed = dict(env, MONITOR_PERP_DEXES="")  # xyz unread from here on, for "20 minutes"
    unread = run_json(narrowed)
    assert unread["closed"] == 0
    assert any(a["type"] == "pause_missing" and a["coin"] == "xyz:TSLA" for a in unread["actions"])
    _age(database_url, 20)
    assert run_json(narrowed)["closed"] == 0

    report = run_json(env)  # read again, still gone: one minute counted, not 21
    assert report["closed"] == 0
    tsla = row(database_url, "xyz:TSLA")
    assert tsla["status"] == "open" and tsla["metadata"].get("missing_paused_at") is None
    counted = datetime.now(timezone.utc) - datetime.fromisoformat(tsla["metadata"]["missing_since"])
    assert timedelta(seconds=50) < counted < timedelta(minutes=2)

    _age(database_url, 15)
    report = run_json(env)  # missing over a whole window of runs that read xyz: closed as unexplained
    assert report["closed"] == 1 and row(database_url, "xyz:TSLA")["metadata"]["unexplained"] is True


def test_a_dex_read_only_every_other_run_still_gets_its_unexplained_close(env, sim, database_url):
    """Red team (R2 on the first fix, which dropped the mark in a run that did not read the dex): with the dex read
    only every other run, the mark was dropped and set again for ever and the row never closed. Now the time over
    the runs that read it adds up: 3 minutes a pair of runs, so the close comes after five pairs, never before."""
    sim.add_perp_dex("xyz")
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    insert_platform_row(database_url, ALICE, "xyz:TSLA", "long", "2", "250", opened_ago=timedelta(hours=1))
    closed_in = None
    for i in range(12):
        fault = sim.add_fault("500", path="info", type="clearinghouseState", count=None, dex="xyz") if i % 2 else None
        report = run_json(env, expect=None)
        if fault is not None:
            sim.clear_faults(fault)
        if row(database_url, "xyz:TSLA")["status"] == "closed":
            closed_in = i
            break
        _age(database_url, 3)  # a run every 3 minutes
    assert closed_in is not None, report["actions"]
    assert closed_in >= 9  # 15 minutes counted only over the read runs: the unread gaps did not count
    assert row(database_url, "xyz:TSLA")["metadata"]["unexplained"] is True


def test_the_planner_pauses_the_missing_clock_of_a_row_whose_dex_was_not_read():
    from monitor.models import Account, AccountSnapshot, PositionRow
    from monitor.planner import PAUSE_MISSING, WAIT, PlanSettings, plan_account

    now = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    marked = PositionRow(id=7, account_id=1, coin="xyz:TSLA", side="long", size=Decimal(2), entry_price=Decimal(250),
                         status="open", opened_at=now - timedelta(days=1),
                         metadata={"missing_since": (now - timedelta(minutes=3)).isoformat()})
    unmarked = PositionRow(id=8, account_id=1, coin="xyz:AAPL", side="long", size=Decimal(1),
                           entry_price=Decimal(190), status="open", opened_at=now - timedelta(days=1))
    plan = plan_account(Account(1, ALICE, None, True), AccountSnapshot(ALICE, {}, dexes_read=frozenset({""})),
                        [marked, unmarked], now, PlanSettings(), fills=[])
    assert [(a.type, a.position_id) for a in plan.actions] == [(WAIT, 7), (PAUSE_MISSING, 7), (WAIT, 8)]
    assert [a.position_id for a in plan.changes] == [7]


# ---- rows on a dex never read are not silent (red-team F3) ---------------------------------------------------------


def _alert_state(database_url, key):
    with psycopg.connect(database_url) as conn:
        found = conn.execute("SELECT streak, active FROM monitor_alerts WHERE key = %s", (key,)).fetchone()
    return found


def test_rows_on_a_dex_that_is_not_watched_raise_rows_unwatched_after_the_alert_threshold(env, sim, database_url):
    sim.add_perp_dex("flx")
    sim.open_position(ALICE, "BTC", "1", "30000")
    sim.open_hip3_position(ALICE, "xyz:TSLA", "2", "250")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    insert_platform_row(database_url, ALICE, "xyz:TSLA", "long", "2", "250", opened_ago=timedelta(hours=1))
    narrowed = dict(env, MONITOR_PERP_DEXES="flx", MONITOR_ALERT_AFTER_RUNS="2")

    first = run_json(narrowed)
    [alert] = [a for a in first["alerts"] if a["kind"] == "rows_unwatched"]
    assert alert["key"] == "rows_unwatched:xyz" and "MONITOR_PERP_DEXES does not name it" in alert["text"]
    assert _alert_state(database_url, "rows_unwatched:xyz") == (1, False)  # seen once: not sent yet
    run_json(narrowed)
    assert _alert_state(database_url, "rows_unwatched:xyz") == (2, True)  # MONITOR_ALERT_AFTER_RUNS runs in a row

    report = run_json(dict(env, MONITOR_ALERT_AFTER_RUNS="2"))  # every dex watched: xyz is read, resolved
    assert not [a for a in report["alerts"] if a["kind"] == "rows_unwatched"]
    assert _alert_state(database_url, "rows_unwatched:xyz") in (None, (0, False))

    unlisted = run_json(dict(env, MONITOR_PERP_DEXES="", MONITOR_ALERT_AFTER_RUNS="2"))
    assert any(a["key"] == "rows_unwatched:xyz" and "first dex only" in a["text"] for a in unlisted["alerts"])


# ---- the sweep's cursor moves only past reads that happened (red-team F5) -----------------------------------------


def test_a_sweep_read_that_did_not_happen_keeps_its_turn():
    """Runs whose sweep accounts were deferred (budget, deadline) or partly read: the cursor stops at the first
    account not swept, so every dex of every account is still read within `groups` runs that carried out their
    sweep, however many runs skipped it in between."""
    from monitor.dexes import cursor_after, plan_dex_reads, sweep_bound
    from monitor.models import Account

    accounts = [Account(i, f"0x{i:040x}", None, True) for i in range(1, 101)]
    watched = {"xyz", "flx", "abc"}
    bound = sweep_bound(100, 3, 400)
    reached: set[int] = set()
    cursor, swept_runs = None, 0
    for run in range(40):
        plan = plan_dex_reads(accounts, {}, {}, ["", "xyz", "flx", "abc"], watched, read_weight=400, cursor=cursor)
        if run % 3 == 1:
            done: set[int] = set()  # the whole turn deferred by the budget: nothing swept
        elif run % 3 == 2:
            done = set(plan.sweep_order[:5]) | set(plan.sweep_order[6:])  # the 6th found no weight
        else:
            done = set(plan.sweep)
        reached |= done
        before, cursor = cursor, cursor_after(plan, cursor, done)
        if run % 3 == 1:
            assert cursor == before  # a skipped sweep does not move the cursor
        if run % 3 == 0:
            swept_runs += 1
        if len(reached) == 100:
            break
    assert len(reached) == 100
    assert swept_runs <= bound


def test_dry_runs_do_not_take_the_sweeps_turn(env, sim, database_url):
    """A dry run writes nothing, so what its sweep finds is not kept: it must not use up a turn. With the turn taken
    from the run count, the real runs between dry runs kept landing on the same accounts."""
    accounts = ["0x" + f"{i:02x}" * 20 for i in range(16, 28)]  # 12 accounts
    for name in ("xyz", "flx", "abc"):
        sim.add_perp_dex(name)
    for address in accounts:
        sim.open_position(address, "BTC", "1", "30000")
        assert cli(env, "accounts", "add", address).returncode == 0
    tight = dict(env, MONITOR_WEIGHT_BUDGET="100")  # 12 x 4 x 2 = 96 > 3/4 of 100: a sweep, 3 runs to a round
    run_json(tight)
    late = [accounts[0], accounts[1], accounts[2], accounts[5], accounts[10]]
    for n, address in enumerate(late):
        sim.open_hip3_position(address, "abc:NVDA", str(n + 1), "180")

    from monitor.dexes import sweep_bound

    bound = sweep_bound(12, 3, 100)
    for _ in range(bound):
        run_json(tight, "--dry-run")
        run_json(tight, "--dry-run")
        run_json(tight)
    with psycopg.connect(database_url) as conn:
        found = conn.execute("SELECT count(*) FROM positions WHERE coin = 'abc:NVDA'").fetchone()[0]
    assert found == len(late)  # every account's dexes reached within the bound's real runs


def test_the_run_moves_the_cursor_past_swept_accounts_only_and_notes_the_rest():
    from monitor.dexes import plan_dex_reads
    from monitor.models import Account
    from monitor.planner import AccountPlan
    from monitor.runner import AccountRead, Reads, _sweep_done

    accounts = [Account(i, f"0x{i:040x}", None, True) for i in range(1, 101)]
    plan = plan_dex_reads(accounts, {}, {}, ["", "xyz", "flx", "abc"], {"xyz", "flx", "abc"}, read_weight=400,
                          cursor=40)
    assert plan.sweep_order == tuple(range(41, 57))
    by_id = {a.id: a for a in accounts}
    results = [AccountRead(by_id[i], plan=AccountPlan(by_id[i])) for i in range(41, 45)]
    results.append(AccountRead(by_id[45], plan=AccountPlan(by_id[45]), dexes_skipped=frozenset({"abc"})))
    results += [AccountRead(by_id[i], plan=AccountPlan(by_id[i])) for i in range(46, 50)]
    results += [AccountRead(by_id[i], deferred="budget") for i in range(50, 57)]
    reads = Reads(results=results, dexes=plan, sweep_cursor=40)
    _sweep_done(reads)
    assert reads.next_sweep_cursor == 44  # 45 found no weight for abc: it and those after it keep their turn
    assert any("8 of 16 account(s) of this run's turn not swept" in n for n in reads.notes)


def test_an_account_whose_read_fails_does_not_hold_the_sweep_of_every_other_account():
    """Red team R5: an account whose positions read failed every run kept its turn for good, so the cursor never
    moved past it and the accounts after it were never swept again. Its failure has its own alert
    (account_failed); the sweep goes on past it."""
    from monitor.dexes import plan_dex_reads
    from monitor.models import Account
    from monitor.planner import AccountPlan
    from monitor.runner import AccountRead, Reads, _sweep_done

    accounts = [Account(i, f"0x{i:040x}", None, True) for i in range(1, 11)]
    plan = plan_dex_reads(accounts, {}, {}, ["", "xyz"], {"xyz"}, read_weight=16, cursor=2)
    by_id = {a.id: a for a in accounts}
    results = [AccountRead(by_id[i], failure="clearinghouseState: HTTP 500") if i == 3
               else AccountRead(by_id[i], plan=AccountPlan(by_id[i])) for i in plan.sweep_order]
    reads = Reads(results=results, dexes=plan, sweep_cursor=2)
    _sweep_done(reads)
    assert 3 in plan.sweep_order and reads.next_sweep_cursor == max(plan.sweep_order)
