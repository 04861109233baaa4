"""The loopback Hyperliquid simulator, driven with the real hyperliquid-python-sdk."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import eth_account
import pytest
import requests
from hyperliquid.exchange import Exchange
from hyperliquid.info import Info
from hyperliquid.utils.error import ClientError, ServerError
from hyperliquid.utils.signing import get_timestamp_ms, sign_l1_action
from hyperliquid.utils.types import Cloid

from hlsim import (
    DESERIALIZE_ERROR,
    Simulator,
    SimulatorClient,
    SimulatorError,
    SimulatorServer,
    fixtures,
    fmt,
)

ROOT = Path(__file__).resolve().parent.parent
SPOT_META = {"universe": [], "tokens": []}
NUMBER_TEXT = re.compile(r"^-?[0-9]+\.[0-9]+$")


def fixture(name: str) -> dict:
    return fixtures.load(name)


@pytest.fixture
def sim():
    with SimulatorServer() as server:
        yield server


def make_info(sim, timeout: float = 5) -> Info:
    return Info(base_url=sim.url, skip_ws=True, meta=sim.meta(), spot_meta=SPOT_META, timeout=timeout)


def make_exchange(sim, wallet, account_address=None, timeout: float = 5, vault_address=None) -> Exchange:
    return Exchange(wallet, base_url=sim.url, meta=sim.meta(), spot_meta=SPOT_META,
                    account_address=account_address, vault_address=vault_address, timeout=timeout)


def new_address() -> str:
    return eth_account.Account.create().address


def check_chain(fills: list[dict]) -> None:
    """Chronological fills of one account: per coin, each startPosition = previous end position."""
    end: dict[str, Decimal] = {}
    for f in fills:
        start = Decimal(f["startPosition"])
        assert start == end.get(f["coin"], Decimal(0)), f
        signed = Decimal(f["sz"]) if f["side"] == "B" else -Decimal(f["sz"])
        end[f["coin"]] = start + signed


def numbers_plain(obj) -> None:
    if isinstance(obj, dict):
        for v in obj.values():
            numbers_plain(v)
    elif isinstance(obj, list):
        for v in obj:
            numbers_plain(v)
    elif isinstance(obj, str) and re.match(r"^-?[0-9.]+[eE]", obj):
        raise AssertionError(f"exponent notation: {obj}")


# --------------------------------------------------------------------------------------------------


def test_fmt_is_plain_decimal():
    assert fmt(Decimal("26951")) == "26951.0"
    assert fmt(Decimal("1E+2")) == "100.0"
    assert fmt(Decimal("-0.00785000")) == "-0.00785"
    assert fmt(Decimal("0E-8")) == "0.0"
    assert fmt(Decimal("1E-7")) == "0.0000001"


def test_seed_from_fixture_round_trips_through_user_state(sim):
    recorded = fixture("clearinghouseState.json")["response"]
    user = new_address()
    coins = sim.seed_from_clearinghouse(user, fixture("clearinghouseState.json"))
    assert len(coins) == 12
    state = make_info(sim).user_state(user.upper().replace("0X", "0x"))  # any case accepted
    want = {p["position"]["coin"]: p["position"] for p in recorded["assetPositions"]}
    got = {p["position"]["coin"]: p["position"] for p in state["assetPositions"]}
    assert set(got) == set(want)
    for coin, p in got.items():
        assert p["szi"] == want[coin]["szi"]
        assert p["entryPx"] == want[coin]["entryPx"]
        assert p["positionValue"] == want[coin]["positionValue"]
        assert p["unrealizedPnl"] == want[coin]["unrealizedPnl"]
        assert p["leverage"] == {"type": "cross", "value": 20}
        assert p["maxLeverage"] == 50
        assert set(p["cumFunding"]) == {"allTime", "sinceOpen", "sinceChange"}
        assert NUMBER_TEXT.match(p["szi"]) and NUMBER_TEXT.match(p["marginUsed"])
    # the short BTC position has a liquidation price, the longs (over-margined) none, as recorded
    assert got["BTC"]["liquidationPx"] is not None and got["ETH"]["liquidationPx"] is None
    assert state["marginSummary"]["accountValue"] == recorded["marginSummary"]["accountValue"]
    assert state["marginSummary"]["totalNtlPos"] == recorded["marginSummary"]["totalNtlPos"]
    assert set(state) >= {"marginSummary", "crossMarginSummary", "crossMaintenanceMarginUsed", "withdrawable",
                          "assetPositions", "time"}
    assert abs(state["time"] - int(time.time() * 1000)) < 5000
    numbers_plain(state)
    # served meta / mids / spotMeta
    info = make_info(sim)
    assert info.meta()["universe"][:28] == fixture("meta.json")["response"]["universe"]
    mids = info.all_mids()
    assert mids["DOGE"] == fixture("allMids.json")["response"]["DOGE"]
    assert info.spot_meta() == SPOT_META
    assert info.user_state(new_address())["assetPositions"] == []


def test_fills_chain_and_closed_pnl(sim):
    user = new_address()
    sim.set_time(1_700_000_000_000)
    sim.open_position(user, "ETH", "1.0", "2000", parts=2)
    sim.advance_time(1000)
    sim.resize(user, "ETH", "2.0", "2200")  # entry -> 2100
    assert sim.position(user, "ETH")["entryPx"] == "2100.0"
    sim.advance_time(1000)
    sim.resize(user, "ETH", "0.5", "2300")  # close 1.5 @ +200
    sim.advance_time(1000)
    flip = sim.flip(user, "ETH", "-1.0", "2000")  # close 0.5 @ -100, open 1.0 short @2000
    sim.advance_time(1000)
    closes = sim.close_external(user, "ETH", px=["1900", "1950"])
    sim.advance_time(1000)
    sim.open_position(user, "BTC", "-0.01", "30000")
    sim.advance_time(1000)
    liq = sim.liquidate(user, "BTC", mark_px="33000")

    info = make_info(sim)
    newest_first = info.user_fills(user)
    # Newest first, but fills of one millisecond in the order they happened (as the exchange lists them): a stable
    # sort by time gives the history oldest first.
    fills = sorted(newest_first, key=lambda f: f["time"])
    assert [f["time"] for f in newest_first] == sorted((f["time"] for f in newest_first), reverse=True)
    assert [f["dir"] for f in fills] == [
        "Open Long", "Open Long", "Open Long", "Close Long", "Long > Short", "Close Short", "Close Short",
        "Open Short", "Close Short",  # a market liquidation: the victim's own fill has the ordinary dir
    ]
    check_chain(fills)
    assert [f["closedPnl"] for f in fills] == ["0.0", "0.0", "0.0", "300.0", "-50.0", "50.0", "25.0", "0.0", "-30.0"]
    assert fills[0]["fee"] == "0.45"  # 0.5 * 2000 * 0.00045
    assert all(f["feeToken"] == "USDC" and isinstance(f["tid"], int) for f in fills)
    assert len({f["tid"] for f in fills}) == len(fills)
    assert fills[0]["oid"] == fills[1]["oid"] and fills[0]["hash"] == fills[1]["hash"]
    assert flip[0]["sz"] == "1.5" and flip[0]["side"] == "A"
    assert [c["startPosition"] for c in closes] == ["-1.0", "-0.5"]
    assert liq[0]["liquidation"] == {"liquidatedUser": user.lower(), "markPx": "33000.0", "method": "market"}
    assert "liquidation" not in fills[0] and "cloid" not in fills[0]
    assert info.user_state(user)["assetPositions"] == []
    assert info.all_mids()["BTC"] == "33000.0"
    ledger = info.user_non_funding_ledger_updates(user, 0)
    assert ledger[0]["delta"]["type"] == "liquidation"

    # userFillsByTime: chronological, both bounds inclusive
    by_time = info.user_fills_by_time(user, fills[3]["time"], fills[5]["time"])
    assert [f["tid"] for f in by_time] == [f["tid"] for f in fills[3:7]]  # fills 5 and 6 share a time
    assert [f["tid"] for f in info.user_fills_by_time(user, fills[7]["time"])] == [fills[7]["tid"], fills[8]["tid"]]

    with pytest.raises(SimulatorError):
        sim.open_position(user, "ETH", "0.123456", "2000")  # more decimals than szDecimals
    with pytest.raises(SimulatorError):
        sim.close_external(user, "ETH")  # flat


def test_http_faults_as_the_sdk_sees_them(sim):
    user = new_address()
    sim.open_position(user, "SOL", "5", "20")
    info = make_info(sim)

    sim.add_fault("429", path="info", type="clearinghouseState", count=2)
    for _ in range(2):
        with pytest.raises(ClientError) as exc:
            info.user_state(user)
        assert exc.value.status_code == 429 and exc.value.error_message == "null" and exc.value.error_code is None
    assert info.user_state(user)["assetPositions"][0]["position"]["szi"] == "5.0"

    sim.add_fault("500", type="userFills")
    with pytest.raises(ServerError) as sexc:
        info.user_fills(user)
    assert sexc.value.status_code == 500 and sexc.value.message == "Internal Server Error"

    sim.add_fault("malformed", type="clearinghouseState")
    bad = info.user_state(user)
    assert set(bad) == {"error"} and bad["error"].startswith("Could not parse JSON")

    sim.add_fault("error_body", type="openOrders", message="boom")
    assert info.open_orders(user) == {"error": "boom"}

    sim.add_fault("missing_field")
    assert "assetPositions" not in info.user_state(user)

    sim.add_fault("empty")
    emptied = info.user_state(user)
    assert emptied["assetPositions"] == [] and "marginSummary" in emptied

    other = new_address()
    sim.open_position(other, "SOL", "1", "20")
    sim.add_fault("empty", user=other)  # only that user
    assert info.user_state(user)["assetPositions"] != []
    assert info.user_state(other)["assetPositions"] == []

    # stale by k: the answer from before the last state change
    sim.close_external(user, "SOL", px="21")
    sim.add_fault("stale", k=1)
    assert info.user_state(user)["assetPositions"][0]["position"]["szi"] == "5.0"
    assert info.user_state(user)["assetPositions"] == []
    # stale frozen until cleared: a fresh open is not visible yet
    fid = sim.add_fault("stale", count=None)
    sim.open_position(user, "SOL", "-3", "21")
    assert info.user_state(user)["assetPositions"] == []
    assert info.user_state(user)["assetPositions"] == []
    assert sim.clear_faults(fid) == 1
    assert info.user_state(user)["assetPositions"][0]["position"]["szi"] == "-3.0"

    # hang: longer than the client's timeout -> requests Timeout
    sim.add_fault("hang", type="clearinghouseState", seconds=1.5)
    with pytest.raises(requests.exceptions.Timeout):
        make_info(sim, timeout=0.3).user_state(user)

    # unknown info type -> 422 text
    with pytest.raises(ClientError) as cexc:
        info.post("/info", {"type": "noSuchThing"})
    assert cexc.value.status_code == 422 and cexc.value.error_message == DESERIALIZE_ERROR
    assert sim.list_faults() == []
    kinds = [e["fault"] for e in sim.requests_log() if e["fault"]]
    assert kinds[:4] == ["429", "429", "500", "malformed"]


def test_agent_signed_reduce_only_ioc_close_by_cloid(sim):
    master = eth_account.Account.create()
    agent = eth_account.Account.create()
    user = master.address
    sim.open_position(user, "ETH", "0.5", "1800")
    sim.set_mid("ETH", "1900")
    sim.approve_agent(user, agent.address)
    ex = make_exchange(sim, agent, account_address=user)
    info = make_info(sim)
    cloid = Cloid.from_int(0xABC)

    r = ex.order("ETH", False, 0.5, 1805.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=cloid)
    assert r["status"] == "ok"
    filled = r["response"]["data"]["statuses"][0]["filled"]
    assert filled["totalSz"] == "0.5" and filled["avgPx"] == "1900.0" and filled["cloid"] == cloid.to_raw()
    status = info.query_order_by_cloid(user, cloid)
    assert status["status"] == "order" and status["order"]["status"] == "filled"
    assert status["order"]["order"]["cloid"] == cloid.to_raw() and status["order"]["order"]["oid"] == filled["oid"]
    assert info.query_order_by_oid(user, filled["oid"])["order"]["status"] == "filled"
    assert info.query_order_by_cloid(user, Cloid.from_int(1)) == {"status": "unknownOid"}
    last = info.user_fills(user)[0]
    assert last["cloid"] == cloid.to_raw() and last["oid"] == filled["oid"] and last["dir"] == "Close Long"
    assert last["closedPnl"] == "50.0" and last["px"] == "1900.0"
    assert info.user_state(user)["assetPositions"] == []

    # the same cloid again: refused, nothing happens
    sim.resize(user, "ETH", "0.5", "1900")
    again = ex.order("ETH", False, 0.5, 1805.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=cloid)
    assert again["response"]["data"]["statuses"] == [{"error": "Order has duplicate cloid."}]
    # reduce-only larger than the position: capped; wrong direction: refused
    r = ex.order("ETH", False, 2.0, 1805.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=Cloid.from_int(2))
    assert r["response"]["data"]["statuses"][0]["filled"]["totalSz"] == "0.5"
    r = ex.order("ETH", True, 0.1, 2000.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=Cloid.from_int(3))
    assert r["response"]["data"]["statuses"] == [{"error": "Reduce only order would increase position. asset=1"}]
    assert info.query_order_by_cloid(user, Cloid.from_int(3))["order"]["status"] == "reduceOnlyRejected"
    # not marketable IOC
    sim.resize(user, "ETH", "1.0", "1900")
    r = ex.order("ETH", False, 1.0, 1950.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=Cloid.from_int(4))
    assert r["response"]["data"]["statuses"] == [
        {"error": "Order could not immediately match against any resting orders. asset=1"}]
    assert info.query_order_by_cloid(user, Cloid.from_int(4))["order"]["status"] == "iocCancelRejected"
    # partial fill
    sim.set_partial_fill_ratio("ETH", "0.3")
    r = ex.order("ETH", False, 1.0, 1805.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=Cloid.from_int(5))
    assert r["response"]["data"]["statuses"][0]["filled"]["totalSz"] == "0.3"
    st = info.query_order_by_cloid(user, Cloid.from_int(5))["order"]
    assert st["status"] == "canceled" and st["order"]["sz"] == "0.7" and st["order"]["origSz"] == "1.0"
    sim.set_partial_fill_ratio("ETH", None)
    # SDK market_close through the agent (looks the position up with account_address)
    r = ex.market_close("ETH", cloid=Cloid.from_int(6))
    assert r["response"]["data"]["statuses"][0]["filled"]["totalSz"] == "0.7"
    check_chain(list(reversed(info.user_fills(user))))
    # bad tick / size are refused without an oid
    r = ex.order("ETH", False, 0.12345, 1805.0, {"limit": {"tif": "Ioc"}}, cloid=Cloid.from_int(7))
    assert r["response"]["data"]["statuses"] == [{"error": "Order has invalid size."}]
    r = ex.order("ETH", False, 0.1, 1805.123, {"limit": {"tif": "Ioc"}}, cloid=Cloid.from_int(8))
    assert r["response"]["data"]["statuses"] == [{"error": "Order has invalid price."}]
    assert info.query_order_by_cloid(user, Cloid.from_int(8)) == {"status": "unknownOid"}


def test_expired_bad_signer_nonce_and_vault(sim):
    master = eth_account.Account.create()
    agent = eth_account.Account.create()
    user = master.address.lower()
    sim.open_position(user, "BTC", "0.01", "30000")
    sim.approve_agent(user, agent.address)
    ex = make_exchange(sim, agent, account_address=user)
    info = make_info(sim)

    ex.set_expires_after(get_timestamp_ms() - 1000)
    r = ex.order("BTC", False, 0.01, 1000.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=Cloid.from_int(9))
    assert r["status"] == "err" and r["response"].startswith("Action already expired")
    assert info.query_order_by_cloid(user, Cloid.from_int(9)) == {"status": "unknownOid"}
    assert sim.position(user, "BTC")["szi"] == "0.01"
    # the simulator clock decides: moving it forward expires a fresh expiresAfter
    ex.set_expires_after(get_timestamp_ms() + 10_000)
    sim.advance_time(60_000)
    r = ex.order("BTC", False, 0.01, 1000.0, {"limit": {"tif": "Ioc"}}, reduce_only=True)
    assert r["status"] == "err" and "expired" in r["response"]
    sim.set_clock_offset(0)
    r = ex.order("BTC", False, 0.01, 1000.0, {"limit": {"tif": "Ioc"}}, reduce_only=True)
    assert r["response"]["data"]["statuses"][0]["filled"]["totalSz"] == "0.01"
    ex.set_expires_after(None)

    stranger = eth_account.Account.create()
    r = make_exchange(sim, stranger, account_address=user).order(
        "BTC", True, 0.01, 40000.0, {"limit": {"tif": "Ioc"}})
    assert r == {"status": "err", "response": f"User or API Wallet {stranger.address.lower()} does not exist."}
    # an agent may not act for an account that is not its master
    other = new_address()
    sim.add_account(other)
    r = make_exchange(sim, agent, vault_address=other).order("BTC", True, 0.01, 40000.0, {"limit": {"tif": "Ioc"}})
    assert r["status"] == "err" and "does not exist" in r["response"]
    # ...but for a sub-account of its master, via vaultAddress
    sub = new_address()
    sim.add_sub_account(user, sub)
    r = make_exchange(sim, agent, vault_address=sub).order("BTC", True, 0.01, 40000.0, {"limit": {"tif": "Ioc"}})
    assert "filled" in r["response"]["data"]["statuses"][0]
    assert sim.position(sub, "BTC")["szi"] == "0.01"

    # a replayed signed payload (same nonce) is refused
    action = {"type": "noop"}
    nonce = get_timestamp_ms()
    payload = {"action": action, "nonce": nonce, "signature": sign_l1_action(agent, action, None, nonce, None, False),
               "vaultAddress": None, "expiresAfter": None}
    assert ex.post("/exchange", payload) == {"status": "ok", "response": {"type": "default"}}
    assert ex.post("/exchange", payload) == {"status": "err", "response": f"Invalid nonce: duplicate nonce {nonce}"}
    # approveAgent through the SDK (user-signed action)
    r, agent_key = make_exchange(sim, master).approve_agent()
    assert r == {"status": "ok", "response": {"type": "default"}}
    agent2 = eth_account.Account.from_key(agent_key)
    r = make_exchange(sim, agent2).order("BTC", True, 0.01, 40000.0, {"limit": {"tif": "Ioc"}})
    assert "filled" in r["response"]["data"]["statuses"][0]


def test_trigger_orders_show_cancel_and_fire(sim):
    master = eth_account.Account.create()
    user = master.address.lower()
    sim.open_position(user, "INJ", "12.5", "10")
    sim.set_mid("INJ", "10")
    sl = sim.add_trigger_order(user, "INJ", "A", "12.5", "9.995", "sl")
    tp = sim.add_trigger_order(user, "INJ", "sell", "12.5", "10.004", "tp")
    info = make_info(sim)
    front = info.frontend_open_orders(user)
    assert [o["oid"] for o in front] == [tp, sl]
    tp_order = front[0]
    assert tp_order["isTrigger"] is True and tp_order["reduceOnly"] is True and tp_order["tif"] is None
    assert tp_order["orderType"] == "Take Profit Market" and tp_order["triggerCondition"] == "Price above 10.004"
    assert tp_order["triggerPx"] == "10.004" and tp_order["children"] == [] and tp_order["side"] == "A"
    assert front[1]["triggerCondition"] == "Price below 9.995" and front[1]["orderType"] == "Stop Market"
    assert set(tp_order) >= set(fixture("frontendOpenOrders.json")["response"][0])
    opened = info.open_orders(user)
    assert {o["oid"] for o in opened} == {sl, tp} and all(o["reduceOnly"] for o in opened)

    ex = make_exchange(sim, master)
    r = ex.cancel("INJ", sl)
    assert r == {"status": "ok", "response": {"type": "cancel", "data": {"statuses": ["success"]}}}
    r = ex.cancel("INJ", sl)
    assert r["response"]["data"]["statuses"] == [{"error": "Order was never placed, already canceled, or filled."}]
    assert info.query_order_by_oid(user, sl)["order"]["status"] == "canceled"

    # a trigger placed through the SDK with a cloid, cancelled by cloid
    cl = Cloid.from_int(0x5151)
    r = ex.order("INJ", False, 12.5, 8.0, {"trigger": {"triggerPx": 9.0, "isMarket": True, "tpsl": "sl"}},
                 reduce_only=True, cloid=cl)
    resting = r["response"]["data"]["statuses"][0]["resting"]
    assert resting["cloid"] == cl.to_raw()
    assert info.query_order_by_cloid(user, cl)["order"]["status"] == "open"
    r = ex.cancel_by_cloid("INJ", cl)
    assert r["response"]["data"]["statuses"] == ["success"]
    assert info.query_order_by_cloid(user, cl)["order"]["status"] == "canceled"
    assert ex.cancel_by_cloid("INJ", cl)["response"]["data"]["statuses"][0]["error"].startswith("Order was never")

    # the TP fires: closes at the trigger price with the trigger's oid
    fills = sim.fill_trigger(user, tp)
    assert fills[0]["oid"] == tp and fills[0]["px"] == "10.004" and fills[0]["dir"] == "Close Long"
    assert fills[0]["closedPnl"] == "0.05"
    assert info.query_order_by_oid(user, tp)["order"]["status"] == "filled"
    assert info.frontend_open_orders(user) == []
    # an SL that fires when the mid crosses it (set_mid(..., match=True))
    sim.open_position(user, "INJ", "-2", "10")
    sl2 = sim.add_trigger_order(user, "INJ", "B", "2", "11", "sl")
    assert sim.set_mid("INJ", "10.5", match=True) == []
    fired = sim.set_mid("INJ", "11.2", match=True)
    assert fired[0]["oid"] == sl2 and fired[0]["dir"] == "Close Short" and fired[0]["px"] == "11.2"
    history = info.historical_orders(user)
    assert history[0]["order"]["oid"] == sl2 and history[0]["status"] == "filled"


def test_drop_response_applies_the_action(sim):
    master = eth_account.Account.create()
    user = master.address.lower()
    sim.open_position(user, "ETH", "1", "2000")
    ex = make_exchange(sim, master)
    info = make_info(sim)
    cl = Cloid.from_int(77)
    sim.add_fault("drop_response")
    with pytest.raises(ServerError):
        ex.order("ETH", False, 1.0, 1500.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=cl)
    assert info.query_order_by_cloid(user, cl)["order"]["status"] == "filled"
    assert info.user_state(user)["assetPositions"] == []

    sim.open_position(user, "ETH", "1", "2000")
    sim.add_fault("drop_response", mode="hang", seconds=1)
    with pytest.raises(requests.exceptions.Timeout):
        make_exchange(sim, master, timeout=0.3).order(
            "ETH", False, 1.0, 1500.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=Cloid.from_int(78))
    assert info.query_order_by_cloid(user, Cloid.from_int(78))["order"]["status"] == "filled"

    # 429 on /exchange: nothing applied
    sim.open_position(user, "ETH", "1", "2000")
    sim.add_fault("429", path="exchange")
    with pytest.raises(ClientError):
        ex.order("ETH", False, 1.0, 1500.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=Cloid.from_int(79))
    assert info.query_order_by_cloid(user, Cloid.from_int(79)) == {"status": "unknownOid"}


def test_weights_logged(sim):
    user = new_address()
    sim.open_position(user, "DOGE", "100", "0.07")
    for i in range(44):
        sim.resize(user, "DOGE", str(101 + i), "0.07")
    info = make_info(sim)
    sim.reset_log()
    info.user_state(user)
    info.all_mids()
    info.open_orders(user)
    info.user_fills(user)  # 45 fills -> 20 + ceil(45 / 20)
    info.user_fills_by_time(user, 0)
    info.query_order_by_oid(user, 1)
    info.historical_orders(user)  # 45 orders -> 20 + 3
    info.user_rate_limit(user)
    log = sim.requests_log()
    assert [(e["type"], e["weight"]) for e in log] == [
        ("clearinghouseState", 2), ("allMids", 2), ("openOrders", 20), ("userFills", 23),
        ("userFillsByTime", 23), ("orderStatus", 2), ("historicalOrders", 23), ("userRateLimit", 20)]
    assert all(e["user"] in (user.lower(), None) and e["status"] == 200 and e["path"] == "/info" for e in log)
    assert sim.total_weight() == 115
    rl = info.user_rate_limit(user)
    assert set(rl) >= {"cumVlm", "nRequestsUsed", "nRequestsCap"}

    master = eth_account.Account.create()
    sim.add_account(master.address)
    ex = make_exchange(sim, master)
    ex.bulk_orders([{"coin": "DOGE", "is_buy": True, "sz": 10.0, "limit_px": 0.05,
                     "order_type": {"limit": {"tif": "Gtc"}},
                     "reduce_only": False}] * 41)
    entry = sim.requests_log(path="exchange")[-1]
    assert entry["weight"] == 2 and entry["user"] == master.address.lower() and entry["type"] == "order"
    assert len(info.open_orders(master.address)) == 41

    # ip weight limit -> 429 null
    sim.set_config(ip_weight_limit=4)
    info.user_state(user)
    info.user_state(user)
    with pytest.raises(ClientError) as exc:
        info.user_state(user)
    assert exc.value.status_code == 429
    sim.set_config(ip_weight_limit=None)


def test_snapshot_load_round_trip():
    sim = Simulator()
    user = new_address()
    sim.open_position(user, "ARB", "-100", "1.2")
    sim.add_trigger_order(user, "ARB", "B", "100", "1.3", "sl", cloid="0x" + "ab" * 16)
    sim.approve_agent(user, new_address())
    snap = json.loads(json.dumps(sim.snapshot()))
    other = Simulator()
    other.load(snap)
    assert other.snapshot() == snap
    assert other.positions(user) == sim.positions(user)
    # minimal state file form
    other.load({"accounts": {user: {"positions": {"NEWCOIN": {"szi": "3", "entryPx": "5"}}}}, "mids": {"BTC": "1"}})
    assert other.positions(user)["NEWCOIN"]["szi"] == "3.0"
    assert other.meta()["universe"][-1]["name"] == "NEWCOIN" and other.mids()["BTC"] == "1.0"
    other.clear()
    assert other.accounts() == [] and other.mids()["BTC"] == "30135.0"


def test_control_over_http_and_cli_process(tmp_path):
    user = new_address()
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"accounts": {user: {"positions": {"BTC": {"szi": "0.5", "entryPx": "30000"}}}}}))
    url_file = tmp_path / "url"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hlsim", "--host", "127.0.0.1", "--port", "0", "--url-file", str(url_file),
         "--state", str(state), "--latency-ms", "1"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 10
        while not url_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        url = url_file.read_text().strip()
        assert re.match(r"^http://127\.0\.0\.1:\d+$", url)
        client = SimulatorClient(url)
        info = Info(base_url=url, skip_ws=True, meta=client.meta(), spot_meta=SPOT_META, timeout=5)
        assert info.user_state(user)["assetPositions"][0]["position"]["szi"] == "0.5"
        fills = client.call("close_external", address=user, coin="BTC", px=31000.5, parts=2)
        assert [f["closedPnl"] for f in fills] == ["250.125", "250.125"]
        client.add_fault(kind="429", path="info")
        with pytest.raises(ClientError):
            info.user_state(user)
        assert client.requests_log()[-1]["status"] == 429
        with pytest.raises(SimulatorError):
            client.call("no_such_op")
        with pytest.raises(SimulatorError):
            client.flip(address=user, coin="BTC", new_szi="1", px="1")
        assert client.snapshot()["accounts"][user.lower()]["positions"] == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_a_request_hook_changes_the_position_between_read_and_order(sim):
    master, agent = eth_account.Account.create(), eth_account.Account.create()
    user = master.address
    sim.open_position(user, "ETH", "0.5", "1800")
    sim.set_mid("ETH", "1900")
    sim.approve_agent(user, agent.address)
    seen = []

    def grow(path, typ, who, body):
        seen.append((path, typ, who, body["action"]["orders"][0]["s"]))
        sim.resize(user, "ETH", "0.8", "1900")

    sim.add_request_hook(grow, path="exchange", type="order", user=user)
    info = make_info(sim)
    assert info.user_state(user)["assetPositions"][0]["position"]["szi"] == "0.5"  # the read
    ex = make_exchange(sim, agent, account_address=user)
    expires = get_timestamp_ms() + 5000
    ex.set_expires_after(expires)
    r = ex.order("ETH", False, 0.5, 1805.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=Cloid.from_int(9))
    assert r["response"]["data"]["statuses"][0]["filled"]["totalSz"] == "0.5"
    assert seen == [("/exchange", "order", user.lower(), "0.5")]
    assert sim.position(user, "ETH")["szi"] == "0.3"  # grew to 0.8 before the order: 0.3 is left
    (order,) = [o for o in sim.orders(user) if o["cloid"]]
    assert order["expiresAfter"] == expires
    ex.order("ETH", False, 0.1, 1805.0, {"limit": {"tif": "Ioc"}}, reduce_only=True, cloid=Cloid.from_int(10))
    assert len(seen) == 1  # count=1: used up
    assert sim.clear_request_hooks() == 0


def test_a_busy_account_keeps_only_its_latest_10000_fills_reachable(sim):
    user = new_address()
    sim.open_position(user, "BTC", "0.01", "30000")
    time.sleep(0.02)
    assert sim.add_fill_history(user, "ATOM", 10_100) == 10_100
    sim.close_external(user, "BTC", "31000")
    fills = sim.fills(user)
    assert len(fills) == 10_102 and fills[-1]["coin"] == "BTC"
    assert [f["time"] for f in fills] == sorted(f["time"] for f in fills)
    check_chain(fills)
    info = make_info(sim)
    reachable, seen, start = [], set(), 0
    while True:  # page forward by time, as the docs say
        page = info.user_fills_by_time(user, start)
        new = [f for f in page if f["tid"] not in seen]
        seen.update(f["tid"] for f in new)
        reachable += new
        if len(page) < 2000 or not new:
            break
        start = page[-1]["time"]
    assert len(reachable) == 10_000 and reachable[-1]["coin"] == "BTC"
    assert not any(f["coin"] == "BTC" and f["dir"] == "Open Long" for f in reachable)  # the opening fill is gone
    assert sim.positions(user) == {}
