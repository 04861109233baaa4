"""Exit rules execute under the weight budget: the run holds back what its exit work needs before the reads
spend the budget, and the key's userRole and meta are cached in the database (real CLI, PostgreSQL, simulator)."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import psycopg
import pytest
from eth_account import Account as EthAccount

from monitor.exit_budget import ROW_CLOSE_WEIGHT, ROW_SETTLE_WEIGHT, exit_reserve
from monitor.models import Account, PositionRow
from monitor.operations import observed_conditions
from tests.conftest import cli, run_json

ALICE = "0x" + "a1" * 20
SUBS = ["0x" + f"{n:02x}" * 20 for n in (0xb1, 0xb2, 0xb3)]


def filler(n: int) -> list[str]:
    return ["0x" + f"{i:040x}" for i in range(1, n + 1)]


def orders_sent(sim) -> list[dict]:
    return [e for e in sim.requests_log() if e["path"].endswith("/exchange") and e.get("type") == "order"]


def info_types(sim) -> list[str]:
    return [e["type"] for e in sim.requests_log() if e["path"].endswith("/info")]


def register(database_url: str, rows: list[tuple[str, str, str, str, Decimal | None]]) -> None:
    """Accounts and their open rows in two statements: (address, coin, size, entry, stop_loss_price)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO accounts (address) SELECT DISTINCT a FROM unnest(%s::text[]) AS a",
                     ([r[0] for r in rows],))
        conn.execute(
            "INSERT INTO positions (account_id, coin, side, size, entry_price, opened_at, stop_loss_price)"
            " SELECT a.id, t.coin, 'long', t.size, t.entry, now() - interval '1 minute', t.stop"
            " FROM unnest(%s::text[], %s::text[], %s::numeric[], %s::numeric[], %s::numeric[])"
            " AS t(address, coin, size, entry, stop) JOIN accounts a ON a.address = t.address",
            ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
             [r[4] for r in rows]))


@pytest.fixture
def agent(sim):
    key = EthAccount.create()
    sim.approve_agent(ALICE, key.address)
    for sub in SUBS:
        sim.add_sub_account(ALICE, sub)
    return key


def test_stop_losses_fire_and_are_sent_in_the_same_run_with_500_accounts_at_the_default_budget(env, sim, agent,
                                                                                             database_url):
    # 495 quiet accounts, loaded in one call; five rows whose stop loss fires: two on the key's master
    # account, one on each of three sub-accounts (each needs its own userRole: nothing is cached yet).
    quiet = filler(495)
    sim.load({"accounts": {a: {"positions": {"SOL": {"szi": "2", "entryPx": "100"}}} for a in quiet},
              "agents": {agent.address.lower(): ALICE}, "subAccounts": dict.fromkeys(SUBS, ALICE)})
    firing = [(ALICE, "BTC"), (ALICE, "ETH")] + [(s, "BTC") for s in SUBS]
    for address, coin in firing:
        sim.open_position(address, coin, "1", "30000" if coin == "BTC" else "2000")
    sim.set_mid("BTC", "29000")
    sim.set_mid("ETH", "1900")
    rows = [(a, "SOL", "2", "100", None) for a in quiet]
    rows += [(a, c, "1", "30000" if c == "BTC" else "2000", Decimal("29500") if c == "BTC" else Decimal("1950"))
             for a, c in firing]
    register(database_url, rows)
    sim.reset_log()

    report = run_json(dict(env, MONITOR_HL_SECRET_KEY=agent.key.hex()))

    orders = orders_sent(sim)
    assert len(orders) == 5, report["notes"]  # every fired stop loss is sent in the run it fires
    assert sorted(e["user"] for e in orders) == sorted(a for a, _ in firing)
    assert report["close_orders_sent"] == 5 and report["closed"] == 5
    assert report["exit_starved"] == 0
    assert 0 < report["exit_reserved"] <= 800  # at most 4/5 of the default budget
    assert sum(e["weight"] for e in sim.requests_log()) <= 1000  # the budget holds
    assert report["accounts_deferred"] > 0  # the reserve came out of the reads, the least urgent wait
    with psycopg.connect(database_url) as conn:
        closed = conn.execute("SELECT count(*) FROM positions WHERE status = 'closed'"
                              " AND close_reason = 'stop_loss'").fetchone()[0]
    assert closed == 5
    for address, coin in firing:
        assert sim.position(address, coin) is None


def test_a_close_to_settle_is_settled_in_the_run_with_500_accounts_at_the_default_budget(env, sim, agent,
                                                                                           database_url):
    # A close whose answer was lost (the order never reached the exchange): the row is 'closing' with a cloid.
    quiet = filler(499)
    sim.load({"accounts": {a: {"positions": {"SOL": {"szi": "2", "entryPx": "100"}}} for a in quiet},
              "agents": {agent.address.lower(): ALICE}})
    sim.open_position(ALICE, "BTC", "1", "30000")
    register(database_url, [(a, "SOL", "2", "100", None) for a in quiet] + [(ALICE, "BTC", "1", "30000", None)])
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE positions SET status = 'closing', close_cloid = %s, close_attempts = 1,"
                     " close_rule = 'stop_loss', close_started_at = now() - interval '1 minute' WHERE coin = 'BTC'",
                     ("0x" + "5e" * 16,))
    sim.reset_log()

    report = run_json(dict(env, MONITOR_HL_SECRET_KEY=agent.key.hex()))

    assert [e["user"] for e in sim.requests_log() if e["type"] == "orderStatus"] == [ALICE], report["notes"]
    assert report["exit_starved"] == 0 and report["exit_reserved"] > 0
    with psycopg.connect(database_url) as conn:
        status, attempts = conn.execute("SELECT status, close_attempts FROM positions WHERE coin = 'BTC'").fetchone()
    assert status == "open" and attempts == 1  # never placed: reopened for a fresh attempt next run


def stop_row(database_url: str, address: str, coin: str, stop: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE positions p SET stop_loss_price = %s FROM accounts a WHERE a.id = p.account_id"
                     " AND a.address = %s AND p.coin = %s AND p.closed_at IS NULL", (Decimal(stop), address, coin))


def test_a_second_close_asks_neither_userrole_nor_meta(env, sim, agent, database_url):
    keyed = dict(env, MONITOR_HL_SECRET_KEY=agent.key.hex())
    for coin, px in (("BTC", "30000"), ("ETH", "2000")):
        sim.open_position(ALICE, coin, "1", px)
    sim.open_position(SUBS[0], "BTC", "1", "30000")
    for address in (ALICE, SUBS[0]):
        assert cli(env, "accounts", "add", address).returncode == 0
    run_json(keyed)
    stop_row(database_url, SUBS[0], "BTC", "31000")  # fires at the mid of 30000
    sim.reset_log()
    first = run_json(keyed)
    assert first["close_orders_sent"] == 1
    assert info_types(sim).count("userRole") == 2 and info_types(sim).count("meta") == 1  # key + sub-account

    stop_row(database_url, ALICE, "ETH", "2100")
    sim.reset_log()
    second = run_json(keyed)
    assert second["close_orders_sent"] == 1 and second["closed"] == 1
    assert "userRole" not in info_types(sim) and "meta" not in info_types(sim)  # cache hits
    # What the close cost besides the positions reads: allMids, the fills read verifying the row's cycle before
    # the order (part of the account's read), then one order, the fills read explaining the close, its funding,
    # open orders.
    spent = [(e["type"], e["weight"]) for e in sim.requests_log() if e["type"] != "clearinghouseState"]
    assert sorted(t for t, _ in spent) == ["allMids", "frontendOpenOrders", "order", "userFillsByTime",
                                           "userFillsByTime", "userFunding"], spent
    assert sum(w for _, w in spent) <= 2 + ROW_CLOSE_WEIGHT + 5, spent  # (+ a fills surcharge)
    with psycopg.connect(database_url) as conn:
        cached = conn.execute("SELECT address, role, linked FROM key_roles WHERE dropped_at IS NULL"
                              " ORDER BY role").fetchall()
    assert cached == [(agent.address.lower(), "agent", ALICE), (SUBS[0], "subAccount", ALICE)]


def test_an_unauthorized_rejection_drops_the_cached_role(env, sim, agent, database_url):
    keyed = dict(env, MONITOR_HL_SECRET_KEY=agent.key.hex())
    for coin, px in (("BTC", "30000"), ("ETH", "2000")):
        sim.open_position(ALICE, coin, "1", px)
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    stop_row(database_url, ALICE, "BTC", "31000")
    assert run_json(keyed)["close_orders_sent"] == 1  # the key's role is now cached

    sim.revoke_agent(agent.address)  # the user revoked the API wallet: the cached "agent" is wrong now
    stop_row(database_url, ALICE, "ETH", "2100")
    sim.reset_log()
    refused = run_json(keyed)
    assert "userRole" not in info_types(sim)  # trusted the cache, sent, and was refused
    assert len(orders_sent(sim)) == 1 and orders_sent(sim)[0]["status"] == 200
    assert any("does not exist" in note and "cached role answer(s) dropped" in note for note in refused["notes"])
    with psycopg.connect(database_url) as conn:
        live = conn.execute("SELECT count(*) FROM key_roles WHERE dropped_at IS NULL").fetchone()[0]
        reason = conn.execute("SELECT drop_reason FROM key_roles").fetchone()[0]
    assert live == 0 and "does not exist" in reason

    sim.reset_log()
    after = run_json(keyed)  # asks again, learns the key acts for nobody, sends nothing
    assert info_types(sim).count("userRole") == 1 and orders_sent(sim) == []
    assert after["close_orders_sent"] == 0 and after["would_close"] == 1
    assert any("neither an approved agent" in note for note in after["notes"])


def test_exit_work_that_cannot_get_weight_is_a_note_and_an_immediate_alert(env, sim, agent, database_url):
    keyed = dict(env, MONITOR_HL_SECRET_KEY=agent.key.hex())
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    stop_row(database_url, ALICE, "BTC", "31000")
    report = run_json(dict(keyed, MONITOR_WEIGHT_BUDGET="10"))  # meta alone costs 20
    assert report["close_orders_sent"] == 0 and report["exit_starved"] == 1
    assert any("exit work starved" in note for note in report["notes"])
    assert report["exit_code"] == 0  # nothing failed; it is said loudly instead
    with psycopg.connect(database_url) as conn:
        alert = conn.execute("SELECT kind, active FROM monitor_alerts WHERE key = 'exit_starved'").fetchone()
    assert alert == ("exit_starved", True)  # urgent: the first run it happens
    assert run_json(keyed)["close_orders_sent"] == 1  # with the budget back, the close goes out
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT active FROM monitor_alerts WHERE key = 'exit_starved'").fetchone() == (False,)


# -- the reserve, pure ------------------------------------------------------------------------------------


def row(id_: int, coin: str = "BTC", status: str = "open", **rules) -> PositionRow:
    return PositionRow(id=id_, account_id=1, coin=coin, side="long", size=Decimal(1), entry_price=Decimal(100),
                       status=status, opened_at=datetime(2026, 1, 1, tzinfo=timezone.utc), **rules)


def test_the_reserve_counts_only_rules_that_fire_at_this_runs_mids_and_is_capped():
    now = datetime(2026, 1, 1, 1, tzinfo=timezone.utc)
    account = Account(1, "0x" + "11" * 20, None, True)
    rows = {1: [row(1, stop_loss_price=Decimal(90)), row(2, coin="ETH", stop_loss_price=Decimal(110)),
                row(3, coin="SOL", status="closing"), row(4, coin="DOGE", max_hold_seconds=60)]}
    mids = {"BTC": Decimal(100), "ETH": Decimal(100), "SOL": Decimal(1), "DOGE": Decimal(1)}
    reserve = exit_reserve([account], rows, mids, now, budget=1000, can_send=True, meta_cached=True,
                           key_master=account.address)
    assert reserve.firing == [2, 4] and reserve.closing == [3]  # row 1's stop is below the mid
    assert reserve.wanted == 2 * ROW_CLOSE_WEIGHT + ROW_SETTLE_WEIGHT and reserve.weight == reserve.wanted
    cold = exit_reserve([account], rows, mids, now, budget=1000, can_send=True)
    assert cold.wanted == reserve.wanted + 20 + 60 + 60  # meta, the key's role, the account's role
    assert exit_reserve([account], rows, mids, now, budget=100, can_send=True).weight == 80  # 4/5 of the budget
    assert exit_reserve([account], rows, {}, now, budget=1000, can_send=True).firing == []  # no mid, no order
    assert exit_reserve([account], rows, mids, now, budget=1000, can_send=False).wanted == 2  # orderStatus only


def test_observed_conditions_name_exit_starved():
    from monitor.runner import RunReport, exit_starved_alert

    note = "0xabc: exit work starved of weight (x)"
    report = RunReport(run_id="r", dry_run=False, exit_starved=2, notes=[note], alerts=[exit_starved_alert(2, note)])
    kind, message = observed_conditions(report)["exit_starved"]
    assert kind == "exit_starved" and "2 account(s)" in message and "0xabc" in message


def test_a_coin_listed_after_meta_was_cached_reads_meta_again(env, sim, agent, database_url):
    keyed = dict(env, MONITOR_HL_SECRET_KEY=agent.key.hex())
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    stop_row(database_url, ALICE, "BTC", "31000")
    assert run_json(keyed)["close_orders_sent"] == 1  # meta is cached now, without NEWCOIN
    sim.add_coin("NEWCOIN", sz_decimals=1, mid="10")
    sim.open_position(ALICE, "NEWCOIN", "5", "10")
    run_json(keyed)
    stop_row(database_url, ALICE, "NEWCOIN", "11")
    sim.reset_log()
    report = run_json(keyed)
    assert report["close_orders_sent"] == 1 and report["closed"] == 1
    assert info_types(sim).count("meta") == 1 and sim.position(ALICE, "NEWCOIN") is None


def test_a_dry_run_neither_sends_nor_fills_the_cache(env, sim, agent, database_url):
    keyed = dict(env, MONITOR_HL_SECRET_KEY=agent.key.hex())
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    stop_row(database_url, ALICE, "BTC", "31000")
    sim.reset_log()
    report = run_json(keyed, "--dry-run")
    assert report["would_close"] == 1 and orders_sent(sim) == [] and report["exit_reserved"] == 0
    with psycopg.connect(database_url) as conn:
        # (the real run before it cached only the perp dex list: no role, no meta)
        assert conn.execute("SELECT (SELECT count(*) FROM key_roles) + (SELECT count(*) FROM exchange_meta"
                            " WHERE dex <> '#perpDexs')").fetchone()[0] == 0


# -- accounts the key cannot act for (chaos seed 20268095) ------------------------------------------------

STRANGER = "0x" + "c7" * 20  # watched, but neither the key's master nor one of its sub-accounts


def age_refusals(database_url: str, minutes: int) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE key_roles SET checked_at = checked_at - make_interval(mins => %s)", (minutes,))


def test_a_fired_rule_the_key_cannot_send_holds_no_weight_once_the_refusal_is_cached(env, sim, agent,
                                                                                      database_url):
    # Chaos seed 20268095: such a rule held a close's weight (and asked userRole) every run, so a busy account
    # beside it was deferred run after run for want of weight.
    keyed = dict(env, MONITOR_HL_SECRET_KEY=agent.key.hex(), MONITOR_ALERT_AFTER_RUNS="2")
    sim.open_position(STRANGER, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", STRANGER).returncode == 0
    run_json(keyed)
    stop_row(database_url, STRANGER, "BTC", "31000")  # fires at the mid of 30000

    sim.reset_log()
    first = run_json(keyed)  # asks who the key acts for, and about the stranger: both answers kept
    assert first["would_close"] == 1 and first["close_orders_sent"] == 0 and orders_sent(sim) == []
    assert info_types(sim).count("userRole") == 2 and first["exit_reserved"] > 0
    with psycopg.connect(database_url) as conn:
        cached = conn.execute("SELECT address, role FROM key_roles WHERE dropped_at IS NULL ORDER BY 1").fetchall()
    assert cached == sorted([(agent.address.lower(), "agent"), (STRANGER, "user")])

    sim.reset_log()
    second = run_json(keyed)
    assert second["would_close"] == 1 and orders_sent(sim) == []
    assert "userRole" not in info_types(sim)  # the refusal is cached
    assert second["exit_reserved"] == 0  # nothing held for an order that cannot go out
    assert "userFillsByTime" not in info_types(sim)  # nor a cycle checked for it
    assert "meta" not in info_types(sim)  # refused before anything is read for an order
    assert any("does not control" in note for note in second["notes"])
    alert = [a for a in second["alerts"] if a["kind"] == "exit_blocked"]
    assert len(alert) == 1 and STRANGER in alert[0]["key"] and "#" in alert[0]["text"], second["alerts"]
    with psycopg.connect(database_url) as conn:
        active = conn.execute("SELECT active FROM monitor_alerts WHERE key = %s", (f"exit_blocked:{STRANGER}",))
        assert active.fetchone() == (True,)  # two runs in a row: alerted, not silent

    # In text, the run's summary says nothing was sent (the plan's "close on exchange" line alone read as a close).
    text = cli(keyed, "run")
    assert text.returncode == 0 and "1 would close on the exchange" in text.stdout, text.stdout
    assert "asked again once ten minutes old" in text.stderr

    # A run whose read of the account fails never got to the rule: the alert is held, not resolved.
    sim.add_fault("500", path="info", type="clearinghouseState", user=STRANGER, count=None)
    assert run_json(keyed, expect=1)["accounts_failed"] == 1
    sim.clear_faults()
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT active FROM monitor_alerts WHERE key = %s",
                            (f"exit_blocked:{STRANGER}",)).fetchone() == (True,)

    # The account becomes a sub-account of the key's master; a refusal is trusted 10 minutes, then asked again.
    sim.add_sub_account(ALICE, STRANGER)
    age_refusals(database_url, 11)
    sim.reset_log()
    third = run_json(keyed)
    assert info_types(sim).count("userRole") == 1  # the stranger's; the key's "agent" is trusted an hour
    assert third["close_orders_sent"] == 1 and sim.position(STRANGER, "BTC") is None
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT active FROM monitor_alerts WHERE key = %s",
                            (f"exit_blocked:{STRANGER}",)).fetchone() == (False,)


def test_a_key_not_yet_approved_holds_nothing_and_acts_in_the_run_after_its_approval(env, sim, database_url):
    key = EthAccount.create()  # not approved yet: userRole answers "missing"
    keyed = dict(env, MONITOR_HL_SECRET_KEY=key.key.hex())
    sim.open_position(ALICE, "BTC", "1", "30000")
    assert cli(env, "accounts", "add", ALICE).returncode == 0
    run_json(keyed)
    stop_row(database_url, ALICE, "BTC", "31000")
    assert run_json(keyed)["would_close"] == 1
    sim.reset_log()
    waiting = run_json(keyed)  # the key's refusal is asked again (one userRole) before the reads: still refused
    assert waiting["would_close"] == 1 and info_types(sim).count("userRole") == 1
    assert waiting["exit_reserved"] == 0 and "userFillsByTime" not in info_types(sim)
    assert any("neither an approved agent" in note for note in waiting["notes"])

    sim.approve_agent(ALICE, key.address)
    approved = run_json(keyed)  # asked again before the reads: acts in this run, its cycle checked first
    assert approved["close_orders_sent"] == 1 and sim.position(ALICE, "BTC") is None


def test_blocked_accounts_follow_the_closers_rule():
    from monitor.exit_budget import blocked_by_roles

    key, master, sub, other = ("0x" + c * 20 for c in ("0a", "0b", "0c", "0d"))
    accounts = [Account(i, a, None, True) for i, a in enumerate((master, sub, other, "0x" + "0e" * 20), 1)]
    roles = {key: ("agent", master), sub: ("subAccount", master), other: ("subAccount", "0x" + "0f" * 20)}
    assert blocked_by_roles(accounts, roles, key) == {
        3: f"the key acts for {master}, which does not control {other} (a cached userRole answer, asked again once"
           " ten minutes old)"}  # 4: not asked yet, not blocked
    assert set(blocked_by_roles(accounts, {key: ("missing", None)}, key)) == {1, 2, 3, 4}
    assert blocked_by_roles(accounts, {}, key) == {}  # nothing known: nothing blocked
    # a user key acts for itself only: another user is blocked, an account not asked yet is not
    assert set(blocked_by_roles(accounts, {key: ("user", None), master: ("user", None)}, key)) == {1}


def test_a_blocked_accounts_fired_rules_hold_nothing_in_the_reserve():
    now = datetime(2026, 1, 1, 1, tzinfo=timezone.utc)
    account = Account(1, "0x" + "11" * 20, None, True)
    rows = {1: [row(1, stop_loss_price=Decimal(110)), row(2, coin="SOL", status="closing")]}
    mids = {"BTC": Decimal(100), "SOL": Decimal(1)}
    blocked = exit_reserve([account], rows, mids, now, budget=1000, can_send=True, meta_cached=True,
                           key_master="0x" + "22" * 20, blocked_accounts={1: "no"})
    assert blocked.firing == [] and blocked.blocked == [1] and blocked.closing == [2]
    assert blocked.wanted == ROW_SETTLE_WEIGHT  # the close already sent is still settled
    assert "1 more on accounts the key cannot act for" in blocked.describe()


def test_the_cache_keeps_a_refusal_ten_minutes_whatever_its_role(db, database_url):
    from datetime import timedelta

    signer, master, sub, foreign, alone = ("0x" + c * 20 for c in ("1a", "1b", "1c", "1d", "1e"))
    db.store_role(signer, signer, "agent", master)
    db.store_role(signer, sub, "subAccount", master)
    db.store_role(signer, foreign, "subAccount", "0x" + "1f" * 20)  # another master's sub-account: a refusal
    db.store_role(signer, alone, "user", None)
    hour, ten = timedelta(hours=1), timedelta(minutes=10)
    assert set(db.cached_roles(signer, hour, ten)) == {signer, sub, foreign, alone}
    assert set(db.cached_roles(signer, hour)) == {signer, sub}  # refusals only when asked for
    age_refusals(database_url, 11)
    assert set(db.cached_roles(signer, hour, ten)) == {signer, sub}
    age_refusals(database_url, 50)
    assert db.cached_roles(signer, hour, ten) == {}

    db.store_role(signer, signer, "agent", None)  # an agent without a master acts for no one: a refusal
    age_refusals(database_url, 11)
    assert db.cached_roles(signer, hour, ten) == {}
