"""Accounts, positions, orders and the core state of the Simulator (lifecycle, clock, scripting)."""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from . import fixtures
from .common import D, SimulatorError, _addr, _decimals, _q, _side, _sig, _sign, fmt

if TYPE_CHECKING:
    from .faults import Fault


DEFAULT_CASH = Decimal("10000")
# The HLP liquidator child an ADL fill names (the real recording's liquidatedUser, userFills_adl.json).
HLP_LIQUIDATOR = "0x2e3d94f0562703b25c83308a05046ddaf9a8dd14"
DEFAULT_TAKER_FEE = Decimal("0.00045")
DEFAULT_MAKER_FEE = Decimal("0.00015")
# The rejection of the 1,000-open-orders rule: the exchange's own text is UNCONFIRMED (reference §5.3, §8); this is
# the [TS] description of its order status ``tooManyOpenOrdersRejected``.
OPEN_ORDER_LIMIT_ERROR = "Rejected due to exceeding the open order limit."

# Embedded copy of the recorded fixtures (hlsim/fixtures/meta.json, allMids.json), used only
# when the package data is missing.
_EMBEDDED_SZ_DECIMALS = [
    ("BTC", 5), ("ETH", 4), ("ATOM", 2), ("MATIC", 1), ("DYDX", 1), ("SOL", 2), ("AVAX", 2), ("BNB", 3),
    ("APE", 1), ("OP", 1), ("LTC", 2), ("ARB", 1), ("DOGE", 0), ("INJ", 1), ("SUI", 1), ("kPEPE", 0),
    ("CRV", 1), ("LDO", 1), ("LINK", 1), ("STX", 1), ("RNDR", 1), ("CFX", 0), ("FTM", 0), ("GMX", 2),
    ("SNX", 1), ("XRP", 0), ("BCH", 3), ("APT", 2),
]
_EMBEDDED_MIDS = {
    "APE": "1.96595", "APT": "7.7731", "ARB": "1.28895", "ATOM": "9.3384", "AVAX": "14.1705",
    "BCH": "240.525", "BNB": "243.135", "BTC": "30135.0", "CFX": "0.186535", "CRV": "0.79852",
    "DOGE": "0.069277", "DYDX": "2.11305", "ETH": "1903.95", "FTM": "0.26268", "GMX": "55.8595",
    "INJ": "9.32295", "LDO": "2.0457", "LINK": "6.9123", "LTC": "91.832", "MATIC": "0.77389",
    "OP": "1.45515", "RNDR": "1.94575", "SNX": "2.6256", "SOL": "26.516", "STX": "0.62927",
    "SUI": "0.69539", "XRP": "0.73862", "kPEPE": "0.001565",
}


# --------------------------------------------------------------------------------------------------
# state


@dataclass
class Position:
    szi: Decimal
    entry_px: Decimal
    leverage: int = 20
    leverage_type: str = "cross"
    opened_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "szi": fmt(self.szi),
            "entryPx": fmt(self.entry_px),
            "leverage": self.leverage,
            "leverageType": self.leverage_type,
            "openedAt": self.opened_ms,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Position":
        return Position(
            szi=D(d["szi"], "szi"),
            entry_px=D(d.get("entryPx", d.get("entry_px")), "entryPx"),
            leverage=int(d.get("leverage", 20)),
            leverage_type=str(d.get("leverageType", "cross")),
            opened_ms=int(d.get("openedAt", 0)),
        )


@dataclass
class Order:
    oid: int
    coin: str
    side: str  # "B" | "A"
    limit_px: Decimal
    sz: Decimal  # remaining
    orig_sz: Decimal
    timestamp: int
    cloid: str | None = None
    reduce_only: bool = False
    tif: str | None = "Gtc"  # None for triggers
    is_trigger: bool = False
    trigger_px: Decimal | None = None
    tpsl: str | None = None
    is_market: bool = True
    order_type: str = "Limit"
    status: str = "open"
    status_ts: int = 0
    expires_after: int | None = None  # the expiresAfter of the /exchange action that placed it, if any
    position_tpsl: bool = False  # a position TP/SL (grouping positionTpsl): frontendOpenOrders isPositionTpsl

    def trigger_condition(self) -> str:
        if not self.is_trigger or self.trigger_px is None:
            return "N/A"
        # A sell TP fires above, a sell SL below; mirrored for buys.
        above = (self.tpsl == "tp") == (self.side == "A")
        return f"Price {'above' if above else 'below'} {fmt(self.trigger_px)}"

    def _common(self) -> dict[str, Any]:
        """The fields openOrders and frontendOpenOrders share."""
        return {
            "coin": self.coin,
            "side": self.side,
            "limitPx": fmt(self.limit_px),
            "sz": fmt(self.sz),
            "oid": self.oid,
            "timestamp": self.timestamp,
        }

    def open_order(self) -> dict[str, Any]:
        d = self._common() | {"origSz": fmt(self.orig_sz)}
        if self.cloid:
            d["cloid"] = self.cloid
        if self.reduce_only:
            d["reduceOnly"] = True
        return d

    def frontend(self) -> dict[str, Any]:
        return self._common() | {
            "triggerCondition": self.trigger_condition(),
            "isTrigger": self.is_trigger,
            "triggerPx": fmt(self.trigger_px) if self.trigger_px is not None else "0.0",
            "children": [],
            "isPositionTpsl": self.position_tpsl,
            "reduceOnly": self.reduce_only,
            "orderType": self.order_type,
            "origSz": fmt(self.orig_sz),
            "tif": self.tif,
            "cloid": self.cloid,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "oid": self.oid, "coin": self.coin, "side": self.side, "limitPx": fmt(self.limit_px),
            "sz": fmt(self.sz), "origSz": fmt(self.orig_sz), "timestamp": self.timestamp, "cloid": self.cloid,
            "reduceOnly": self.reduce_only, "tif": self.tif, "isTrigger": self.is_trigger,
            "triggerPx": fmt(self.trigger_px) if self.trigger_px is not None else None, "tpsl": self.tpsl,
            "isMarket": self.is_market, "orderType": self.order_type, "status": self.status,
            "statusTimestamp": self.status_ts, "expiresAfter": self.expires_after,
            "isPositionTpsl": self.position_tpsl,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Order":
        tp = d.get("triggerPx")
        return Order(
            oid=int(d["oid"]), coin=str(d["coin"]), side=_side(d["side"]), limit_px=D(d["limitPx"]),
            sz=D(d["sz"]), orig_sz=D(d.get("origSz", d["sz"])), timestamp=int(d.get("timestamp", 0)),
            cloid=(d.get("cloid") or None) and str(d["cloid"]).lower(), reduce_only=bool(d.get("reduceOnly", False)),
            tif=d.get("tif", "Gtc"), is_trigger=bool(d.get("isTrigger", False)),
            trigger_px=D(tp) if tp not in (None, "0.0", "0") else None, tpsl=d.get("tpsl"),
            is_market=bool(d.get("isMarket", True)), order_type=str(d.get("orderType", "Limit")),
            status=str(d.get("status", "open")), status_ts=int(d.get("statusTimestamp", d.get("timestamp", 0))),
            expires_after=int(d["expiresAfter"]) if d.get("expiresAfter") is not None else None,
            position_tpsl=bool(d.get("isPositionTpsl", False)),
        )


@dataclass
class _Version:
    positions: dict[str, Position]
    n_fills: int
    cash: Decimal


@dataclass
class Account:
    address: str
    cash: Decimal = DEFAULT_CASH
    positions: dict[str, Position] = field(default_factory=dict)
    fills: list[dict[str, Any]] = field(default_factory=list)  # chronological (oldest first)
    orders: dict[int, Order] = field(default_factory=dict)  # every order that got an oid
    cloids: dict[str, int] = field(default_factory=dict)
    leverage: dict[str, int] = field(default_factory=dict)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    funding: list[dict[str, Any]] = field(default_factory=list)  # userFunding entries, oldest first
    cum_vlm: Decimal = Decimal(0)
    n_actions: int = 0
    versions: deque = field(default_factory=lambda: deque(maxlen=1000))

    def version(self) -> _Version:
        return _Version({c: copy.copy(p) for c, p in self.positions.items()}, len(self.fills), self.cash)


def _load_fixture(name: str) -> Any | None:
    try:
        return fixtures.load(name)["response"]
    except (OSError, ValueError, KeyError):
        return None


def _default_universe() -> list[dict[str, Any]]:
    meta = _load_fixture("meta.json")
    if isinstance(meta, dict) and isinstance(meta.get("universe"), list):
        return [dict(u) for u in meta["universe"]]
    return [{"maxLeverage": 50, "name": n, "szDecimals": s} for n, s in _EMBEDDED_SZ_DECIMALS]


def _default_mids() -> dict[str, Decimal]:
    mids = _load_fixture("allMids.json")
    if not isinstance(mids, dict):
        mids = _EMBEDDED_MIDS
    return {k: D(v) for k, v in mids.items()}


class StateBase:
    """The core state behind one lock; every public method is thread safe."""

    def __init__(self, *, fee_rate: Any = DEFAULT_TAKER_FEE, latency_ms: Any = 0) -> None:
        self._lock = threading.RLock()
        self._wake = threading.Event()  # set on server stop: ends every sleep early
        self._gate = threading.Event()  # cleared by hold_requests(): /info answers wait until release_requests()
        self._gate.set()
        # requests being handled now, answered or not, and /info requests waiting at the closed gate
        self._traffic = threading.Condition()
        self._in_flight = 0
        self._held = 0
        self._log: deque[dict[str, Any]] = deque(maxlen=200_000)
        self._weight_window: deque[tuple[float, int]] = deque()
        self._faults: list[Fault] = []
        self._fault_seq = 0
        self._hooks: list[dict[str, Any]] = []  # add_request_hook: callbacks run before a matching request
        self.latency_ms = float(latency_ms)
        self._init_state()
        self.fee_rate = D(fee_rate, "fee_rate")

    # ---- state lifecycle -------------------------------------------------------------------

    def _init_state(self) -> None:
        self._accounts: dict[str, Account] = {}
        self._agents: dict[str, str] = {}  # agent -> master
        self._sub_accounts: dict[str, str] = {}  # sub -> master
        self._vaults: set[str] = set()  # userRole "vault" (recording userRole_vault.json)
        self._nonces: dict[str, list[int]] = {}
        self._universe = _default_universe()
        # HIP-3 builder-deployed perp dexes, in perpDexs order (index i + 1 in perpDexs), and their own meta
        # universes. Their coins are named "<dex>:<COIN>" everywhere (positions, fills, orders, mids).
        self._perp_dexes: list[dict[str, Any]] = []
        self._dex_universes: dict[str, list[dict[str, Any]]] = {}
        # What a HIP-3 order carrying a cloid does. "silent" (default): the order is dropped without an
        # error (answer {"status": "ok", "response": {"type": "default"}}, no oid, orderStatus unknownOid),
        # as python-sdk issue #251 reports; "honor": it is handled like any order. The real behaviour is
        # UNCONFIRMED (reference §4, §9.3): the monitor must work under both.
        self.hip3_cloid = "silent"
        # How userFills/userFillsByTime list fills that share a millisecond: "as_happened" (default, as the one
        # recorded mainnet answer with such fills does) or "reversed". The real order is UNCONFIRMED (reference
        # §2.3): the monitor must be right under both.
        self.same_ms_order = "as_happened"
        self._mids = _default_mids()
        self._partial: dict[str, Decimal] = {}
        self.fee_rate = DEFAULT_TAKER_FEE
        self.maker_fee_rate = DEFAULT_MAKER_FEE
        self.clock_offset_ms = 0
        self._oid_seq = 90_000_000_000
        self._tid_seq = 500_000_000_000_000
        self._hash_seq = 0
        self.strict_ticks = True
        self.check_nonces = True
        self.min_notional = Decimal(0)
        self.ip_weight_limit: int | None = None
        # The 1,000-open-orders rule (reference §5.3): a reduce-only or trigger order placed with at least this
        # many other open orders of the account is rejected (status tooManyOpenOrdersRejected). The exchange's
        # error text is UNCONFIRMED: the default is the [TS] description of that status, settable for tests.
        self.open_order_limit = 1000
        self.open_order_limit_error = OPEN_ORDER_LIMIT_ERROR

    def clear(self) -> None:
        """Forget all state (accounts, agents, mids back to the fixture, fee rates, clock, config).
        The request log, the faults and the latency are kept (use reset_log / clear_faults / set_latency)."""
        with self._lock:
            self._init_state()

    def snapshot(self) -> dict[str, Any]:
        """Full state as a JSON-able dict (load() takes it back)."""
        with self._lock:
            return {
                "version": 1,
                "clockOffsetMs": self.clock_offset_ms,
                "feeRate": fmt(self.fee_rate),
                "makerFeeRate": fmt(self.maker_fee_rate),
                "counters": {"oid": self._oid_seq, "tid": self._tid_seq, "hash": self._hash_seq},
                "universe": copy.deepcopy(self._universe),
                "perpDexes": copy.deepcopy(self._perp_dexes),
                "dexUniverses": copy.deepcopy(self._dex_universes),
                "mids": {c: fmt(p) for c, p in self._mids.items()},
                "partialFillRatio": {c: fmt(r) for c, r in self._partial.items()},
                "agents": dict(self._agents),
                "subAccounts": dict(self._sub_accounts),
                "vaults": sorted(self._vaults),
                "config": {
                    "strict_ticks": self.strict_ticks, "check_nonces": self.check_nonces,
                    "min_notional": fmt(self.min_notional), "ip_weight_limit": self.ip_weight_limit,
                    "open_order_limit": self.open_order_limit, "open_order_limit_error": self.open_order_limit_error,
                    "hip3_cloid": self.hip3_cloid, "same_ms_order": self.same_ms_order,
                },
                "accounts": {
                    a.address: {
                        "cash": fmt(a.cash),
                        "cumVlm": fmt(a.cum_vlm),
                        "nActions": a.n_actions,
                        "leverage": dict(a.leverage),
                        "positions": {c: p.to_json() for c, p in a.positions.items()},
                        "fills": copy.deepcopy(a.fills),
                        "orders": [o.to_json() for o in a.orders.values()],
                        "ledger": copy.deepcopy(a.ledger),
                        "funding": copy.deepcopy(a.funding),
                    }
                    for a in self._accounts.values()
                },
            }

    def load(self, state: dict[str, Any]) -> None:
        """Replace all state by ``state`` (a snapshot(); every key optional, missing ones take defaults).

        Minimal form: ``{"accounts": {"0xabc…": {"positions": {"BTC": {"szi": "0.1", "entryPx": "30000"}}}},
        "mids": {"BTC": "30100"}}`` (mids merge over the fixture mids)."""
        if not isinstance(state, dict):
            raise SimulatorError("state: expected a JSON object")
        with self._lock:
            self._init_state()
            self.clock_offset_ms = int(state.get("clockOffsetMs", 0))
            if "feeRate" in state:
                self.fee_rate = D(state["feeRate"], "feeRate")
            if "makerFeeRate" in state:
                self.maker_fee_rate = D(state["makerFeeRate"], "makerFeeRate")
            counters = state.get("counters") or {}
            self._oid_seq = int(counters.get("oid", self._oid_seq))
            self._tid_seq = int(counters.get("tid", self._tid_seq))
            self._hash_seq = int(counters.get("hash", self._hash_seq))
            if isinstance(state.get("universe"), list):
                self._universe = [dict(u) for u in state["universe"]]
            if isinstance(state.get("perpDexes"), list):
                self._perp_dexes = [dict(d) for d in state["perpDexes"]]
            for name, universe in (state.get("dexUniverses") or {}).items():
                self._dex_universes[str(name)] = [dict(u) for u in universe]
            for d in self._perp_dexes:
                self._dex_universes.setdefault(d["name"], [])
            for c, p in (state.get("mids") or {}).items():
                self._mids[c] = D(p, f"mid {c}")
            for c, r in (state.get("partialFillRatio") or {}).items():
                self._partial[c] = D(r)
            self._agents = {_addr(k): _addr(v) for k, v in (state.get("agents") or {}).items()}
            self._sub_accounts = {_addr(k): _addr(v) for k, v in (state.get("subAccounts") or {}).items()}
            self._vaults = {_addr(v) for v in state.get("vaults") or []}
            cfg = state.get("config") or {}
            if cfg:
                self.set_config(**cfg)
            for address, a in (state.get("accounts") or {}).items():
                acct = self._account(address, create=True)
                acct.cash = D(a.get("cash", DEFAULT_CASH))
                acct.cum_vlm = D(a.get("cumVlm", 0))
                acct.n_actions = int(a.get("nActions", 0))
                acct.leverage = {c: int(v) for c, v in (a.get("leverage") or {}).items()}
                positions = a.get("positions") or {}
                if isinstance(positions, list):  # [{"coin":..,"szi":..,"entryPx":..}]
                    positions = {p["coin"]: p for p in positions}
                for coin, p in positions.items():
                    pos = Position.from_json(p)
                    if pos.szi != 0:
                        self._ensure_coin(coin, pos.szi)
                        acct.positions[coin] = pos
                        if coin not in self._mids:
                            self._mids[coin] = pos.entry_px
                acct.fills = [dict(f) for f in a.get("fills") or []]
                acct.fills.sort(key=lambda f: f["time"])
                for od in a.get("orders") or []:
                    o = Order.from_json(od)
                    self._ensure_coin(o.coin)
                    acct.orders[o.oid] = o
                    if o.cloid:
                        acct.cloids[o.cloid] = o.oid
                    self._oid_seq = max(self._oid_seq, o.oid)
                acct.ledger = [dict(x) for x in a.get("ledger") or []]
                acct.funding = sorted((copy.deepcopy(x) for x in a.get("funding") or []), key=lambda e: e["time"])
                for f in acct.fills:
                    if isinstance(f.get("tid"), int):
                        self._tid_seq = max(self._tid_seq, f["tid"])
                    if isinstance(f.get("oid"), int):
                        self._oid_seq = max(self._oid_seq, f["oid"])
                acct.versions.clear()
                acct.versions.append(acct.version())

    def load_file(self, path: str | os.PathLike[str]) -> None:
        with open(path, encoding="utf-8") as fh:
            self.load(json.load(fh))

    # ---- clock / config ---------------------------------------------------------------------

    def now_ms(self) -> int:
        """Simulator clock: real time + offset, ms."""
        return int(time.time() * 1000) + self.clock_offset_ms

    def set_time(self, ms: int) -> int:
        """Move the clock so that now_ms() == ms (it keeps running).  Returns the offset."""
        with self._lock:
            self.clock_offset_ms = int(ms) - int(time.time() * 1000)
            return self.clock_offset_ms

    def advance_time(self, ms: int) -> int:
        """Move the clock forward by ms.  Returns the new now_ms()."""
        with self._lock:
            self.clock_offset_ms += int(ms)
            return self.now_ms()

    def set_clock_offset(self, offset_ms: int) -> None:
        with self._lock:
            self.clock_offset_ms = int(offset_ms)

    def set_fee_rate(self, rate: Any, maker_rate: Any = None) -> None:
        """Taker fee as a fraction of notional (default 0.00045); maker (resting orders) default 0.00015."""
        with self._lock:
            self.fee_rate = D(rate, "rate")
            if maker_rate is not None:
                self.maker_fee_rate = D(maker_rate, "maker_rate")

    def set_partial_fill_ratio(self, coin: str, ratio: Any = None) -> None:
        """IOC orders on ``coin`` fill only ``ratio`` (0..1) of their size, rounded down to szDecimals; the
        rest is cancelled.  ratio None or 1 = full fills."""
        with self._lock:
            if ratio is None or D(ratio) >= 1:
                self._partial.pop(coin, None)
                return
            r = D(ratio, "ratio")
            if r < 0:
                raise SimulatorError("ratio must be between 0 and 1")
            self._partial[coin] = r

    def set_latency(self, ms: Any) -> None:
        """Delay every /info and /exchange request by ms (bounded by 120 s)."""
        self.latency_ms = max(0.0, float(ms))

    def set_config(
        self,
        *,
        strict_ticks: bool | None = None,
        check_nonces: bool | None = None,
        min_notional: Any = None,
        ip_weight_limit: int | None | str = "unchanged",
        open_order_limit: int | None = None,
        open_order_limit_error: str | None = None,
        hip3_cloid: str | None = None,
        same_ms_order: str | None = None,
    ) -> dict[str, Any]:
        """strict_ticks: validate order price/size like the exchange (default True); check_nonces: refuse
        reused nonces (default True); min_notional: refuse orders below this notional with
        "Order must have minimum value of $10." (default 0 = off); ip_weight_limit: weight per rolling 60 s
        after which requests get HTTP 429 ``null`` (default None = off); open_order_limit: a reduce-only or
        trigger order placed with at least this many other open orders is rejected (default 1000, the
        exchange's; set it low so a test needs no 1,000 orders); open_order_limit_error: that rejection's text
        (the exchange's is UNCONFIRMED); hip3_cloid: "silent" (default) or "honor", what a HIP-3 order carrying
        a cloid does (UNCONFIRMED on the real exchange, see ``_init_state``); same_ms_order: "as_happened"
        (default) or "reversed", how fills of one millisecond are listed (UNCONFIRMED too)."""
        with self._lock:
            if strict_ticks is not None:
                self.strict_ticks = bool(strict_ticks)
            if check_nonces is not None:
                self.check_nonces = bool(check_nonces)
            if min_notional is not None:
                self.min_notional = D(min_notional, "min_notional")
            if ip_weight_limit != "unchanged":
                self.ip_weight_limit = None if ip_weight_limit is None else int(ip_weight_limit)
            if open_order_limit is not None:
                self.open_order_limit = int(open_order_limit)
            if open_order_limit_error is not None:
                self.open_order_limit_error = str(open_order_limit_error)
            if hip3_cloid is not None:
                if hip3_cloid not in ("silent", "honor"):
                    raise SimulatorError("hip3_cloid must be 'silent' or 'honor'")
                self.hip3_cloid = hip3_cloid
            if same_ms_order is not None:
                if same_ms_order not in ("as_happened", "reversed"):
                    raise SimulatorError("same_ms_order must be 'as_happened' or 'reversed'")
                self.same_ms_order = same_ms_order
            return {
                "strict_ticks": self.strict_ticks, "check_nonces": self.check_nonces,
                "min_notional": fmt(self.min_notional), "ip_weight_limit": self.ip_weight_limit,
                "open_order_limit": self.open_order_limit, "open_order_limit_error": self.open_order_limit_error,
                "hip3_cloid": self.hip3_cloid, "same_ms_order": self.same_ms_order,
            }

    # ---- accounts / agents / coins ----------------------------------------------------------

    def _account(self, address: str, create: bool = False) -> Account | None:
        a = _addr(address)
        acct = self._accounts.get(a)
        if acct is None and create:
            acct = Account(a)
            acct.versions.append(acct.version())
            self._accounts[a] = acct
        return acct

    def add_account(self, address: str, cash: Any = DEFAULT_CASH) -> None:
        """Make ``address`` a known (funded) account with ``cash`` USDC.  Scripting calls do this implicitly."""
        with self._lock:
            acct = self._account(address, create=True)
            acct.cash = D(cash, "cash")

    def approve_agent(self, account: str, agent_address: str) -> None:
        """Let ``agent_address`` sign /exchange actions for ``account`` (an agent serves exactly one account)."""
        with self._lock:
            master = _addr(account, "account")
            agent = _addr(agent_address, "agent_address")
            if agent == master:
                raise SimulatorError("an account cannot be its own agent")
            if agent in self._accounts:
                raise SimulatorError(f"{agent} is an account, not usable as an agent")
            if self._agents.get(agent, master) != master:
                raise SimulatorError(f"agent {agent} already approved for {self._agents[agent]}")
            self._account(master, create=True)
            self._agents[agent] = master

    def revoke_agent(self, agent_address: str) -> None:
        with self._lock:
            self._agents.pop(_addr(agent_address), None)

    def add_sub_account(self, master: str, sub: str) -> None:
        """``sub`` becomes a sub-account of ``master``: master (and its agents) may act for it via vaultAddress."""
        with self._lock:
            m, s = _addr(master), _addr(sub)
            self._account(m, create=True)
            self._account(s, create=True)
            self._sub_accounts[s] = m

    def add_vault(self, address: str) -> None:
        """``address`` is a vault: userRole answers {"role": "vault"} (recording userRole_vault.json)."""
        with self._lock:
            self._account(address, create=True)
            self._vaults.add(_addr(address))

    def add_coin(self, coin: str, sz_decimals: int = 2, max_leverage: int = 50, mid: Any = None) -> int:
        """Append ``coin`` to its dex's meta universe (if new; a "dex:COIN" name goes to that HIP-3 dex, which is
        created if unknown) and optionally set its mid.  Returns the index in that universe."""
        with self._lock:
            idx = self._asset_index(coin)
            if idx is None:
                universe = self._universe_of(coin, create=True)
                universe.append({"maxLeverage": int(max_leverage), "name": coin, "szDecimals": int(sz_decimals)})
                idx = len(universe) - 1
            if mid is not None:
                self._mids[coin] = D(mid, "mid")
            return idx

    # ---- HIP-3 perp dexes ----------------------------------------------------------------------

    def add_perp_dex(self, name: str, full_name: str | None = None) -> int:
        """Deploy a HIP-3 perp dex ``name`` (if new).  Returns its perp_dex_index (its position in perpDexs,
        1 for the first HIP-3 dex; 0 is the main dex)."""
        with self._lock:
            if not isinstance(name, str) or not name or ":" in name:
                raise SimulatorError(f"dex name: expected a name without ':', got {name!r}")
            for i, d in enumerate(self._perp_dexes):
                if d["name"] == name:
                    return i + 1
            self._perp_dexes.append({
                "name": name, "fullName": full_name or f"{name} dex",
                "deployer": "0x" + format(len(self._perp_dexes) + 1, "040x"),
                "oracleUpdater": None, "feeRecipient": None,
                "assetToStreamingOiCap": [], "assetToFundingMultiplier": [],
            })
            self._dex_universes.setdefault(name, [])
            return len(self._perp_dexes)

    def perp_dexs(self) -> list[Any]:
        """The perpDexs answer: null (the main dex), then one object per HIP-3 dex."""
        with self._lock:
            return [None, *copy.deepcopy(self._perp_dexes)]

    def open_hip3_position(self, address: str, coin: str, szi: Any, entry_px: Any, sz_decimals: int = 2,
                           leverage: int = 3, parts: int = 1) -> list[dict[str, Any]]:
        """Open an isolated position on a HIP-3 dex: ``coin`` is "dex:COIN" (the dex and the coin are created
        when new, the coin with ``sz_decimals``).  Returns the opening fills."""
        with self._lock:
            if not isinstance(coin, str) or coin.count(":") != 1 or not all(coin.split(":")):
                raise SimulatorError(f"coin: expected 'dex:COIN', got {coin!r}")
            if self._asset_index(coin) is None:
                self.add_coin(coin, sz_decimals=sz_decimals, max_leverage=max(int(leverage), 3))
            acct = self._account(address, create=True)
            acct.leverage[coin] = int(leverage)
            fills = self.open_position(address, coin, szi, entry_px, leverage=int(leverage), parts=parts)
            acct.positions[coin].leverage_type = "isolated"
            return fills

    @staticmethod
    def dex_of(coin: str) -> str:
        """The perp dex a coin lives on: "" (the main dex) or the prefix of "dex:COIN"."""
        return coin.split(":", 1)[0] if ":" in coin else ""

    def _universe_of(self, coin: str, create: bool = False) -> list[dict[str, Any]]:
        dex = self.dex_of(coin)
        if not dex:
            return self._universe
        if dex not in self._dex_universes:
            if not create:
                return []
            self.add_perp_dex(dex)
        return self._dex_universes[dex]

    def _dex_index(self, dex: str) -> int | None:
        if not dex:
            return 0
        for i, d in enumerate(self._perp_dexes):
            if d["name"] == dex:
                return i + 1
        return None

    def _asset_id(self, coin: str) -> int | None:
        """The asset id orders use: the index in meta (main dex), or 100000 + perp_dex_index * 10000 +
        index_in_meta for a HIP-3 coin (Hyperliquid docs, asset-ids)."""
        idx = self._asset_index(coin)
        if idx is None:
            return None
        dex = self.dex_of(coin)
        if not dex:
            return idx
        return 100_000 + (self._dex_index(dex) or 0) * 10_000 + idx

    def _coin_entry(self, asset: int) -> dict[str, Any] | None:
        """The meta entry an asset id names, or None."""
        if 0 <= asset < 10_000:
            return self._universe[asset] if asset < len(self._universe) else None
        if asset < 110_000 or asset >= 100_000_000:
            return None  # spot (10000 + index) is not simulated; outcome assets neither
        dex_index, idx = divmod(asset - 100_000, 10_000)
        if not 1 <= dex_index <= len(self._perp_dexes):
            return None
        universe = self._dex_universes.get(self._perp_dexes[dex_index - 1]["name"], [])
        return universe[idx] if idx < len(universe) else None

    def _asset_index(self, coin: str) -> int | None:
        for i, u in enumerate(self._universe_of(coin)):
            if u.get("name") == coin:
                return i
        return None

    def _ensure_coin(self, coin: str, size: Decimal | None = None) -> dict[str, Any]:
        if not isinstance(coin, str) or not coin:
            raise SimulatorError(f"coin: expected a name, got {coin!r}")
        idx = self._asset_index(coin)
        universe = self._universe_of(coin, create=True)
        if idx is None:
            szd = 2 if size is None else min(max(_decimals(size), 2), 5)
            universe.append({"maxLeverage": 50, "name": coin, "szDecimals": szd})
            idx = len(universe) - 1
        return universe[idx]

    def _check_size(self, coin: str, size: Decimal, what: str = "size") -> None:
        u = self._ensure_coin(coin, size)
        if _decimals(size) > int(u.get("szDecimals", 8)):
            raise SimulatorError(f"{what} {fmt(size)} has more decimals than {coin} szDecimals={u.get('szDecimals')}")

    def meta(self, dex: str = "") -> dict[str, Any]:
        """The meta answer (universe from the fixture + coins added since; of a HIP-3 dex with ``dex``).  Pass it
        to Info/Exchange(meta=...)."""
        with self._lock:
            return {"universe": copy.deepcopy(self._universe if not dex else self._dex_universes.get(dex, []))}

    def mids(self) -> dict[str, str]:
        with self._lock:
            return {c: fmt(p) for c, p in self._mids.items()}

    def set_mids(self, mids: dict[str, Any]) -> None:
        with self._lock:
            for coin, px in mids.items():
                self._ensure_coin(coin)
                self._mids[coin] = D(px, f"mid {coin}")

    def set_mid(self, coin: str, px: Any, match: bool = False) -> list[dict[str, Any]]:
        """Set the mid of ``coin``.  With match=True, open triggers whose condition is now met fire and resting
        limit orders that became marketable fill (at their own price); returns the fills that produced."""
        with self._lock:
            self._ensure_coin(coin)
            self._mids[coin] = D(px, "px")
            return self._match_coin(coin) if match else []

    # ---- scripting: positions -----------------------------------------------------------------

    def seed_position(self, address: str, coin: str, szi: Any, entry_px: Any, leverage: int = 20,
                      leverage_type: str = "cross") -> None:
        """Set a position without creating fills (it was opened before the fills we can see)."""
        with self._lock:
            s, e = D(szi, "szi"), D(entry_px, "entry_px")
            self._check_size(coin, abs(s), "szi")
            acct = self._account(address, create=True)
            if s == 0:
                acct.positions.pop(coin, None)
            else:
                acct.positions[coin] = Position(s, e, int(leverage), leverage_type, self.now_ms())
                self._mids.setdefault(coin, e)
            self._bump(acct)

    def seed_from_clearinghouse(self, address: str, payload: dict[str, Any], set_mids: bool = True) -> list[str]:
        """Seed ``address`` from a clearinghouseState answer (or a fixture file's dict with "response"): every
        position's coin/szi/entryPx/leverage, no fills.  set_mids: mids := positionValue/|szi| (the mark at
        the time) and cash chosen so accountValue matches.  Returns the coins seeded."""
        with self._lock:
            resp = payload.get("response", payload) if isinstance(payload, dict) else None
            if not isinstance(resp, dict) or not isinstance(resp.get("assetPositions"), list):
                raise SimulatorError("payload: expected a clearinghouseState answer with assetPositions")
            acct = self._account(address, create=True)
            acct.positions.clear()
            coins = []
            upnl = Decimal(0)
            for ap in resp["assetPositions"]:
                p = ap["position"]
                coin = p["coin"]
                szi = D(p["szi"], "szi")
                if szi == 0:
                    continue
                entry = D(p["entryPx"], "entryPx")
                lev = p.get("leverage") or {}
                self._ensure_coin(coin, abs(szi))
                acct.positions[coin] = Position(szi, entry, int(lev.get("value", 20)), lev.get("type", "cross"),
                                                self.now_ms())
                if set_mids and p.get("positionValue"):
                    mark = _sig(D(p["positionValue"]) / abs(szi), 8)
                    self._mids[coin] = mark
                    upnl += szi * (mark - entry)
                else:
                    self._mids.setdefault(coin, entry)
                coins.append(coin)
            summary = resp.get("marginSummary") or {}
            if set_mids and summary.get("accountValue") is not None:
                acct.cash = D(summary["accountValue"]) - upnl
            self._bump(acct)
            return coins

    def open_position(self, address: str, coin: str, szi: Any, entry_px: Any, leverage: int = 20,
                      parts: int = 1) -> list[dict[str, Any]]:
        """Open a position of signed size ``szi`` at ``entry_px`` from flat, with ``parts`` opening fills
        (same oid/hash).  Raises if a position is already open (use resize)."""
        with self._lock:
            s, px = D(szi, "szi"), D(entry_px, "entry_px")
            if s == 0:
                raise SimulatorError("szi must not be 0")
            self._check_size(coin, abs(s), "szi")
            acct = self._account(address, create=True)
            if coin in acct.positions:
                raise SimulatorError(f"{coin} position already open for {acct.address}; use resize/flip")
            self._mids.setdefault(coin, px)
            deltas = [d * _sign(s) for d in self._split(coin, abs(s), parts)]
            return self._trade(address, coin, deltas, [px] * len(deltas), leverage=int(leverage))

    def resize(self, address: str, coin: str, new_szi: Any, px: Any) -> list[dict[str, Any]]:
        """Trade the position to ``new_szi`` at ``px`` in one fill (Open*/Close*/flip dir as appropriate;
        closedPnl on the reducing part, gross of fees)."""
        with self._lock:
            acct = self._account(address, create=True)
            target, price = D(new_szi, "new_szi"), D(px, "px")
            self._check_size(coin, abs(target), "new_szi")
            cur = acct.positions[coin].szi if coin in acct.positions else Decimal(0)
            if target == cur:
                raise SimulatorError(f"{coin} position is already {fmt(cur)}")
            self._mids.setdefault(coin, price)
            return self._trade(address, coin, [target - cur], [price])

    def flip(self, address: str, coin: str, new_szi: Any, px: Any) -> list[dict[str, Any]]:
        """Reverse the position to ``new_szi`` (opposite sign) in one "Long > Short"/"Short > Long" fill."""
        with self._lock:
            acct = self._account(address, create=True)
            target = D(new_szi, "new_szi")
            pos = acct.positions.get(coin)
            if pos is None or target == 0 or _sign(target) == _sign(pos.szi):
                raise SimulatorError("flip needs an open position and a new_szi of the opposite sign")
            return self.resize(address, coin, target, px)

    def close_external(self, address: str, coin: str, px: Any = None, parts: int = 1) -> list[dict[str, Any]]:
        """Close the whole position outside the monitor (UI / another bot): ``parts`` fills of one order at
        ``px`` (default: the mid).  ``px`` may also be a list of prices, one fill per price."""
        with self._lock:
            acct = self._account(address, create=True)
            pos = acct.positions.get(coin)
            if pos is None:
                raise SimulatorError(f"no open {coin} position for {acct.address}")
            if isinstance(px, (list, tuple)):
                prices = [D(p, "px") for p in px]
                parts = len(prices)
            else:
                price = D(px, "px") if px is not None else self._mids.get(coin, pos.entry_px)
                prices = [price] * int(parts)
            deltas = [-d * _sign(pos.szi) for d in self._split(coin, abs(pos.szi), len(prices))]
            return self._trade(address, coin, deltas, prices)

    def liquidate(self, address: str, coin: str, mark_px: Any, px: Any = None,
                  cancel_orders: bool = True, method: str = "market") -> list[dict[str, Any]]:
        """Liquidate the whole position of ``address``: one fill at ``px`` (default mark_px) carrying
        liquidation {"liquidatedUser": the account, "markPx", "method"}.

        ``method="market"``: the victim's own fill has the ordinary dir ("Close Long"/"Close Short"), crossed,
        the taker fee, as in the real recording (reference §2.4, userFills_liquidation.json).
        ``method="backstop"``: the position goes to the liquidator vault: dir "Liquidated Cross Long" (or
        Isolated / Short), fee 0 (third-party notes only, no recording: UNCONFIRMED).
        The mid becomes mark_px; a userNonFundingLedgerUpdates liquidation delta is recorded; with
        cancel_orders the coin's open orders are cancelled (status liquidatedCanceled)."""
        if method not in ("market", "backstop"):
            raise SimulatorError("method must be 'market' or 'backstop'")
        with self._lock:
            acct = self._account(address, create=True)
            pos = acct.positions.get(coin)
            if pos is None:
                raise SimulatorError(f"no open {coin} position for {acct.address}")
            mark = D(mark_px, "mark_px")
            price = D(px, "px") if px is not None else mark
            self._mids[coin] = mark
            liq = {"liquidatedUser": acct.address, "markPx": fmt(mark), "method": method}
            szi = pos.szi
            account_value = self._account_value(acct.positions, acct.cash)
            backstop = method == "backstop"
            fills = self._trade(address, coin, [-szi], [price], tif="LiquidationMarket", liquidation=liq,
                                direction="Liquidated {kind} {side}" if backstop else None,
                                fee=Decimal(0) if backstop else None)
            acct.ledger.append({
                "time": fills[0]["time"],
                "hash": fills[0]["hash"],
                "delta": {
                    "type": "liquidation",
                    "liquidatedNtlPos": fmt(_q(abs(szi) * mark, 6)),
                    "accountValue": fmt(_q(account_value, 6)),
                    "leverageType": "Isolated" if pos.leverage_type == "isolated" else "Cross",
                    "liquidatedPositions": [{"coin": coin, "szi": fmt(szi)}],
                },
            })
            if cancel_orders:
                self._cancel_coin_orders(acct, coin, "liquidatedCanceled")
            return fills

    def _cancel_coin_orders(self, acct: Account, coin: str, status: str) -> None:
        for o in acct.orders.values():
            if o.coin == coin and o.status == "open":
                self._set_status(o, status)

    def adl(self, address: str, coin: str, px: Any = None, mark_px: Any = None,
            against: str = HLP_LIQUIDATOR, size: Any = None) -> list[dict[str, Any]]:
        """Auto-deleverage ``address`` (the profitable side) on ``coin``: one fill of ``size`` (default the
        whole position) at ``px`` (default the mid) shaped like the real recording (userFills_adl.json):
        dir "Auto-Deleveraging", crossed, fee 0, liquidation {"liquidatedUser": ``against`` (the account
        being deleveraged against, an HLP liquidator child), "markPx", "method": "backstop"}."""
        with self._lock:
            acct = self._account(address, create=True)
            pos = acct.positions.get(coin)
            if pos is None:
                raise SimulatorError(f"no open {coin} position for {acct.address}")
            price = D(px, "px") if px is not None else self._mids.get(coin, pos.entry_px)
            mark = D(mark_px, "mark_px") if mark_px is not None else price
            amount = abs(pos.szi) if size is None else D(size, "size")
            if not 0 < amount <= abs(pos.szi):
                raise SimulatorError("size must be > 0 and at most the position")
            liq = {"liquidatedUser": _addr(against), "markPx": fmt(mark), "method": "backstop"}
            return self._trade(address, coin, [-amount * _sign(pos.szi)], [price], tif="LiquidationMarket",
                               liquidation=liq, direction="Auto-Deleveraging", fee=Decimal(0))

    def settle(self, address: str, coin: str, px: Any = None, cancel_orders: bool = True) -> list[dict[str, Any]]:
        """Settle the whole ``coin`` position at ``px`` (default the mid), as a delisting or an outcome market
        does: one fill, dir "Settlement", fee 0.  UNCONFIRMED (reference §2.4, §8): "Settlement" is a HIP-4
        dir in third-party code; whether a delisting or a HIP-3 haltTrading settlement writes such fills (and
        with what fee) is not established.  Open orders of the coin are cancelled (delistedCanceled)."""
        with self._lock:
            acct = self._account(address, create=True)
            pos = acct.positions.get(coin)
            if pos is None:
                raise SimulatorError(f"no open {coin} position for {acct.address}")
            price = D(px, "px") if px is not None else self._mids.get(coin, pos.entry_px)
            fills = self._trade(address, coin, [-pos.szi], [price], tif="FrontendMarket", direction="Settlement",
                                fee=Decimal(0))
            if cancel_orders:
                self._cancel_coin_orders(acct, coin, "delistedCanceled")
            return fills

    # ---- scripting: orders --------------------------------------------------------------------

    def add_trigger_order(self, address: str, coin: str, side: Any, sz: Any, trigger_px: Any, tpsl: str,
                          limit_px: Any = None, is_market: bool = True, cloid: str | None = None,
                          reduce_only: bool = True, position_tpsl: bool = False) -> int:
        """Place a (reduce-only by default) TP/SL trigger order as if from the UI.  side "B"/"A" (or
        "buy"/"sell").  Shows in openOrders and frontendOpenOrders.  Returns its oid.  ``reduce_only=False``
        is a stop-entry order (it opens or adds to a position when it fires); ``position_tpsl=True`` a
        position TP/SL (isPositionTpsl, always reduce-only: reference §2.6)."""
        with self._lock:
            if tpsl not in ("tp", "sl"):
                raise SimulatorError("tpsl must be 'tp' or 'sl'")
            if position_tpsl and not reduce_only:
                raise SimulatorError("a position TP/SL is reduce-only")
            acct = self._account(address, create=True)
            s = _side(side)
            size, tpx = D(sz, "sz"), D(trigger_px, "trigger_px")
            self._check_size(coin, size, "sz")
            if limit_px is None:
                limit_px = _sig(tpx * (Decimal("1.08") if s == "B" else Decimal("0.92")), 5)
            o = self._new_order(acct, coin, s, D(limit_px, "limit_px"), size, cloid, reduce_only, None,
                                is_trigger=True, trigger_px=tpx, tpsl=tpsl, is_market=bool(is_market),
                                position_tpsl=bool(position_tpsl))
            self._bump(acct)
            return o.oid

    def add_limit_order(self, address: str, coin: str, side: Any, sz: Any, limit_px: Any,
                        reduce_only: bool = False, cloid: str | None = None, tif: str = "Gtc") -> int:
        """Place a resting limit order as if from the UI (never matched until set_mid(..., match=True)).
        Returns its oid."""
        with self._lock:
            acct = self._account(address, create=True)
            size = D(sz, "sz")
            self._check_size(coin, size, "sz")
            o = self._new_order(acct, coin, _side(side), D(limit_px, "limit_px"), size, cloid, reduce_only, tif)
            self._bump(acct)
            return o.oid

    def _new_order(self, acct: Account, coin: str, side: str, limit_px: Decimal, sz: Decimal, cloid: str | None,
                   reduce_only: bool, tif: str | None, *, is_trigger: bool = False, trigger_px: Decimal | None = None,
                   tpsl: str | None = None, is_market: bool = True, status: str = "open",
                   position_tpsl: bool = False) -> Order:
        cl = cloid.lower() if isinstance(cloid, str) and cloid else None
        if cl and cl in acct.cloids:
            raise SimulatorError(f"cloid {cl} already used by {acct.address}")
        now = self.now_ms()
        if is_trigger:
            order_type = ("Take Profit" if tpsl == "tp" else "Stop") + (" Market" if is_market else " Limit")
        else:
            order_type = "Limit"
        o = Order(
            oid=self._next_oid(), coin=coin, side=side, limit_px=limit_px, sz=sz, orig_sz=sz, timestamp=now,
            cloid=cl, reduce_only=bool(reduce_only), tif=None if is_trigger else tif, is_trigger=is_trigger,
            trigger_px=trigger_px, tpsl=tpsl, is_market=is_market, order_type=order_type, status=status,
            status_ts=now, position_tpsl=position_tpsl,
        )
        acct.orders[o.oid] = o
        if cl:
            acct.cloids[cl] = o.oid
        return o

    def _set_status(self, o: Order, status: str) -> None:
        o.status = status
        o.status_ts = self.now_ms()

    def fill_trigger(self, address: str, oid: int, px: Any = None) -> list[dict[str, Any]]:
        """The trigger order ``oid`` fires and fills at ``px`` (default its triggerPx).  Reduce-only triggers
        are capped at the position size; if the position is flat or on the same side the trigger is cancelled
        (status reduceOnlyCanceled) and [] is returned."""
        with self._lock:
            acct = self._account(address, create=True)
            o = acct.orders.get(int(oid))
            if o is None or not o.is_trigger or o.status != "open":
                raise SimulatorError(f"no open trigger order {oid} for {acct.address}")
            price = D(px, "px") if px is not None else o.trigger_px
            fills = self._execute_resting(acct, o, price, crossed=True)
            self._bump(acct)
            return fills

    def _execute_resting(self, acct: Account, o: Order, price: Decimal, crossed: bool) -> list[dict[str, Any]]:
        size = o.sz
        if o.reduce_only:
            pos = acct.positions.get(o.coin)
            if pos is None or (pos.szi > 0) == (o.side == "B"):
                self._set_status(o, "reduceOnlyCanceled")
                return []
            size = min(size, abs(pos.szi))
        delta = size if o.side == "B" else -size
        fill = self._fill(acct, o.coin, delta, price, oid=o.oid, cloid=o.cloid, crossed=crossed)
        o.sz = Decimal(0)
        self._set_status(o, "filled")
        return [fill]

    def _match_coin(self, coin: str) -> list[dict[str, Any]]:
        mid = self._mids[coin]
        fills: list[dict[str, Any]] = []
        changed: set[str] = set()
        for acct in self._accounts.values():
            for o in sorted(acct.orders.values(), key=lambda x: x.oid):
                if o.coin != coin or o.status != "open":
                    continue
                if o.is_trigger:
                    above = (o.tpsl == "tp") == (o.side == "A")
                    if (mid >= o.trigger_px) if above else (mid <= o.trigger_px):
                        fills += self._execute_resting(acct, o, mid if o.is_market else o.limit_px, crossed=True)
                        changed.add(acct.address)
                elif (o.side == "B" and mid <= o.limit_px) or (o.side == "A" and mid >= o.limit_px):
                    fills += self._execute_resting(acct, o, o.limit_px, crossed=False)
                    changed.add(acct.address)
        for address in changed:
            self._bump(self._accounts[address])
        return fills

    def cancel_order(self, address: str, oid: int, status: str = "canceled") -> bool:
        """Cancel an open order as if from the UI.  Returns False if it was not open."""
        with self._lock:
            acct = self._account(address, create=True)
            o = acct.orders.get(int(oid))
            if o is None or o.status != "open":
                return False
            self._set_status(o, status)
            self._bump(acct)
            return True

    # ---- inspection -------------------------------------------------------------------------------

    def position(self, address: str, coin: str) -> dict[str, Any] | None:
        with self._lock:
            acct = self._account(address)
            p = acct.positions.get(coin) if acct else None
            return p.to_json() if p else None

    def positions(self, address: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            acct = self._account(address)
            return {c: p.to_json() for c, p in acct.positions.items()} if acct else {}

    def orders(self, address: str, open_only: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            acct = self._account(address)
            if not acct:
                return []
            return [o.to_json() for o in acct.orders.values() if o.status == "open" or not open_only]

    def accounts(self) -> list[str]:
        with self._lock:
            return sorted(self._accounts)
