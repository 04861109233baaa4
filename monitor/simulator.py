"""A loopback Hyperliquid simulator for tests, the demo, the benchmark and the chaos runner.

It speaks the real wire format (``POST /info``, ``POST /exchange``) so the project can drive it with
the real ``hyperliquid-python-sdk``, and it adds ``POST /_control`` so another process can script it.
Standard library only (http.server + threading), plus the SDK's own signing helpers for verifying
``/exchange`` signatures.

Quick use::

    from monitor.simulator import SimulatorServer
    with SimulatorServer() as sim:                 # listens on 127.0.0.1:<free port>
        sim.open_position(addr, "BTC", "0.01", "30000")
        info = Info(base_url=sim.url, skip_ws=True, meta=sim.meta(),
                    spot_meta={"universe": [], "tokens": []}, timeout=5)
        info.user_state(addr)

As a process::

    python -m monitor.simulator --host 127.0.0.1 --port 0 --url-file PATH [--state FILE] [--latency-ms N]

Simulator choices where the real exchange's behaviour is not established (see
/work/shared/reference/hyperliquid-api.md §8) -- they are choices, not facts:

* A second order with a cloid this account already used (any order that got an oid, including
  rejected IOC / reduce-only orders) gets the per-order status ``{"error": "Order has duplicate cloid."}``
  and nothing happens.  The real behaviour is UNCONFIRMED.
* An expired action answers ``{"status":"err","response":"Action already expired: <expiresAfter> < <now>"}``
  (exact real text UNCONFIRMED; match on "expired").  ``now`` is the simulator clock, so
  ``set_time``/``advance_time`` also move the expiry check.
* A partially filled IOC (``partial_fill_ratio``) is answered ``filled`` with the smaller ``totalSz``;
  its orderStatus afterwards is ``canceled`` (remaining size in ``sz``).  Fully filled -> ``filled``.
* A nonce already used by the same signer -> ``{"status":"err","response":"Invalid nonce: duplicate nonce N"}``
  (text seen in third-party reports); nonces lower than the 100 highest seen -> ``Invalid nonce: nonce too low N``
  (UNCONFIRMED).  No time-window check (the simulator clock may be moved).
* Signatures are verified as TESTNET (phantom agent source "b"): the SDK signs that way for any base_url other
  than the mainnet URL.  A signature that recovers to an address that is neither a known account nor an
  approved agent is refused with ``User or API Wallet 0x… does not exist.``
* Reduce-only TP/SL triggers are left open when the position closes (stranded triggers, as on the real
  exchange until it cancels them), except ``liquidate(..., cancel_orders=True)`` which cancels the coin's open
  orders with status ``liquidatedCanceled``.
* Order ``grouping`` (normalTpsl/positionTpsl) is ignored: every order in a batch is handled on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "Simulator",
    "SimulatorServer",
    "SimulatorClient",
    "SimulatorError",
    "start",
    "FAULT_KINDS",
    "main",
]

MAX_SLEEP_S = 120.0
DEFAULT_HANG_S = 60.0
DEFAULT_CASH = Decimal("10000")
DEFAULT_TAKER_FEE = Decimal("0.00045")
DEFAULT_MAKER_FEE = Decimal("0.00015")
DESERIALIZE_ERROR = "Failed to deserialize the JSON body into the target type"
FIXTURE_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hyperliquid"

FAULT_KINDS = (
    "429",
    "500",
    "hang",
    "malformed",
    "error_body",
    "missing_field",
    "empty",
    "stale",
    "drop_response",
)

# Embedded copy of the recorded fixtures (tests/fixtures/hyperliquid/meta.json, allMids.json), used only
# when the fixture files are not next to the package.
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

# §5 of the reference: request weights.
_INFO_WEIGHT_2 = {"clearinghouseState", "orderStatus", "allMids", "l2Book", "spotClearinghouseState", "exchangeStatus"}
_INFO_WEIGHT_PER_ITEM = {
    "userFills", "userFillsByTime", "historicalOrders", "userFunding", "userNonFundingLedgerUpdates",
}
_INFO_NEEDS_USER = {
    "userRole",
    "clearinghouseState", "userFills", "userFillsByTime", "openOrders", "frontendOpenOrders", "orderStatus",
    "historicalOrders", "userRateLimit", "userFunding", "userNonFundingLedgerUpdates", "spotClearinghouseState",
}
_APPROVE_AGENT_TYPES = [
    {"name": "hyperliquidChain", "type": "string"},
    {"name": "agentAddress", "type": "address"},
    {"name": "agentName", "type": "string"},
    {"name": "nonce", "type": "uint64"},
]
_EXCHANGE_ACTIONS = {"order", "cancel", "cancelByCloid", "scheduleCancel", "noop", "updateLeverage", "approveAgent"}


class SimulatorError(ValueError):
    """A scripting call that does not make sense for the current state (bad args, no position, ...)."""


# --------------------------------------------------------------------------------------------------
# numbers


def D(value: Any, what: str = "value") -> Decimal:
    """Decimal from str/int/Decimal/float (floats via repr, so 0.1 -> Decimal('0.1'))."""
    if isinstance(value, bool):
        raise SimulatorError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, float):
        d = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            raise SimulatorError(f"{what}: not a number: {value!r}") from None
    else:
        raise SimulatorError(f"{what}: expected a number, got {value!r}")
    if not d.is_finite():
        raise SimulatorError(f"{what}: not finite: {value!r}")
    return d


def fmt(value: Any) -> str:
    """Decimal string the way the API writes it: plain notation, at least one decimal ("26951.0", "-0.00785")."""
    d = value if isinstance(value, Decimal) else D(value)
    if d == 0:
        return "0.0"
    s = format(d.normalize(), "f")
    if "." not in s:
        s += ".0"
    return s


def _q(d: Decimal, places: int) -> Decimal:
    return d.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)


def _sig(d: Decimal, figures: int) -> Decimal:
    """Round to ``figures`` significant figures."""
    if d == 0:
        return Decimal(0)
    exp = d.adjusted() - figures + 1
    return d.quantize(Decimal(1).scaleb(exp), rounding=ROUND_HALF_EVEN)


def _decimals(d: Decimal) -> int:
    exp = d.normalize().as_tuple().exponent
    return max(0, -int(exp))


def _sign(d: Decimal) -> int:
    return 1 if d > 0 else (-1 if d < 0 else 0)


def _addr(text: Any, what: str = "address") -> str:
    if not isinstance(text, str):
        raise SimulatorError(f"{what}: expected an address, got {text!r}")
    t = text.strip().lower()
    if len(t) != 42 or not t.startswith("0x") or any(c not in "0123456789abcdef" for c in t[2:]):
        raise SimulatorError(f"{what}: not an address (0x + 40 hex): {text!r}")
    return t


def _is_addr(text: Any) -> bool:
    try:
        _addr(text)
        return True
    except SimulatorError:
        return False


def _side(value: Any) -> str:
    if isinstance(value, bool):
        return "B" if value else "A"
    v = str(value).strip().lower()
    if v in ("b", "buy", "bid", "long"):
        return "B"
    if v in ("a", "sell", "ask", "short"):
        return "A"
    raise SimulatorError(f"side: expected 'B'/'A'/'buy'/'sell', got {value!r}")


def _json_default(o: Any) -> Any:
    if isinstance(o, Decimal):
        return fmt(o)
    if isinstance(o, (set, tuple, deque)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=_json_default, separators=(",", ":")).encode()


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
            "isPositionTpsl": False,
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
    cum_vlm: Decimal = Decimal(0)
    n_actions: int = 0
    versions: deque = field(default_factory=lambda: deque(maxlen=1000))

    def version(self) -> _Version:
        return _Version({c: copy.copy(p) for c, p in self.positions.items()}, len(self.fills), self.cash)


@dataclass
class Fault:
    id: int
    kind: str
    path: str | None
    type: str | None
    user: str | None
    remaining: int | None
    args: dict[str, Any]
    frozen: dict[str, _Version] | None = None
    hits: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "path": self.path, "type": self.type, "user": self.user,
            "remaining": self.remaining, "args": self.args, "hits": self.hits,
        }


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes
    drop: bool = False  # close the connection without answering


def _json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, "application/json", _dumps(obj))


def _text_response(text: str, status: int) -> Response:
    return Response(status, "text/plain; charset=utf-8", text.encode())


def _load_fixture(name: str) -> Any | None:
    try:
        with open(FIXTURE_DIR / name, encoding="utf-8") as fh:
            return json.load(fh)["response"]
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


# --------------------------------------------------------------------------------------------------
# the simulator


class Simulator:
    """All simulated exchange state, behind one lock.  Every public method is thread safe.

    Numbers may be given as str, int, Decimal or float (floats via repr).  Addresses in any case;
    stored lowercase.  Methods that create fills return them in wire form (the dicts /info returns).
    """

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
        self._nonces: dict[str, list[int]] = {}
        self._universe = _default_universe()
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
                "mids": {c: fmt(p) for c, p in self._mids.items()},
                "partialFillRatio": {c: fmt(r) for c, r in self._partial.items()},
                "agents": dict(self._agents),
                "subAccounts": dict(self._sub_accounts),
                "config": {
                    "strict_ticks": self.strict_ticks, "check_nonces": self.check_nonces,
                    "min_notional": fmt(self.min_notional), "ip_weight_limit": self.ip_weight_limit,
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
            for c, p in (state.get("mids") or {}).items():
                self._mids[c] = D(p, f"mid {c}")
            for c, r in (state.get("partialFillRatio") or {}).items():
                self._partial[c] = D(r)
            self._agents = {_addr(k): _addr(v) for k, v in (state.get("agents") or {}).items()}
            self._sub_accounts = {_addr(k): _addr(v) for k, v in (state.get("subAccounts") or {}).items()}
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
    ) -> dict[str, Any]:
        """strict_ticks: validate order price/size like the exchange (default True); check_nonces: refuse
        reused nonces (default True); min_notional: refuse orders below this notional with
        "Order must have minimum value of $10." (default 0 = off); ip_weight_limit: weight per rolling 60 s
        after which requests get HTTP 429 ``null`` (default None = off)."""
        with self._lock:
            if strict_ticks is not None:
                self.strict_ticks = bool(strict_ticks)
            if check_nonces is not None:
                self.check_nonces = bool(check_nonces)
            if min_notional is not None:
                self.min_notional = D(min_notional, "min_notional")
            if ip_weight_limit != "unchanged":
                self.ip_weight_limit = None if ip_weight_limit is None else int(ip_weight_limit)
            return {
                "strict_ticks": self.strict_ticks, "check_nonces": self.check_nonces,
                "min_notional": fmt(self.min_notional), "ip_weight_limit": self.ip_weight_limit,
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

    def add_coin(self, coin: str, sz_decimals: int = 2, max_leverage: int = 50, mid: Any = None) -> int:
        """Append ``coin`` to the meta universe (if new) and optionally set its mid.  Returns the asset index."""
        with self._lock:
            idx = self._asset_index(coin)
            if idx is None:
                self._universe.append({"maxLeverage": int(max_leverage), "name": coin, "szDecimals": int(sz_decimals)})
                idx = len(self._universe) - 1
            if mid is not None:
                self._mids[coin] = D(mid, "mid")
            return idx

    def _asset_index(self, coin: str) -> int | None:
        for i, u in enumerate(self._universe):
            if u.get("name") == coin:
                return i
        return None

    def _ensure_coin(self, coin: str, size: Decimal | None = None) -> dict[str, Any]:
        if not isinstance(coin, str) or not coin:
            raise SimulatorError(f"coin: expected a name, got {coin!r}")
        idx = self._asset_index(coin)
        if idx is None:
            szd = 2 if size is None else min(max(_decimals(size), 2), 5)
            self._universe.append({"maxLeverage": 50, "name": coin, "szDecimals": szd})
            idx = len(self._universe) - 1
        return self._universe[idx]

    def _check_size(self, coin: str, size: Decimal, what: str = "size") -> None:
        u = self._ensure_coin(coin, size)
        if _decimals(size) > int(u.get("szDecimals", 8)):
            raise SimulatorError(f"{what} {fmt(size)} has more decimals than {coin} szDecimals={u.get('szDecimals')}")

    def meta(self) -> dict[str, Any]:
        """The meta answer (universe from the fixture + coins added since).  Pass it to Info/Exchange(meta=...)."""
        with self._lock:
            return {"universe": copy.deepcopy(self._universe)}

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

    # ---- ids -----------------------------------------------------------------------------------

    def _next_oid(self) -> int:
        self._oid_seq += 1
        return self._oid_seq

    def _next_tid(self) -> int:
        self._tid_seq += 7919  # not contiguous, like real trade ids
        return self._tid_seq

    def _next_hash(self) -> str:
        self._hash_seq += 1
        return "0x" + hashlib.sha256(f"hl-sim-{self._hash_seq}".encode()).hexdigest()

    # ---- position arithmetic ----------------------------------------------------------------

    def _fill(
        self,
        acct: Account,
        coin: str,
        delta: Decimal,
        px: Decimal,
        *,
        oid: int,
        cloid: str | None = None,
        tx_hash: str | None = None,
        crossed: bool = True,
        liquidation: dict[str, Any] | None = None,
        leverage: int | None = None,
        ts: int | None = None,
    ) -> dict[str, Any]:
        """Apply one fill of signed size ``delta`` at ``px`` to ``acct`` and record it.  Returns the wire fill."""
        if delta == 0:
            raise SimulatorError("fill of size 0")
        if px <= 0:
            raise SimulatorError("price must be positive")
        ts = self.now_ms() if ts is None else ts
        pos = acct.positions.get(coin)
        start = pos.szi if pos else Decimal(0)
        end = start + delta
        size = abs(delta)
        lev_type = pos.leverage_type if pos else "cross"
        closed_pnl = Decimal(0)
        if start == 0:
            direction = "Open Long" if delta > 0 else "Open Short"
            lev = leverage or acct.leverage.get(coin) or 20
            acct.positions[coin] = Position(end, px, lev, "cross", ts)
        elif _sign(start) == _sign(delta):
            direction = "Open Long" if start > 0 else "Open Short"
            new_entry = (abs(start) * pos.entry_px + size * px) / abs(end)
            pos.entry_px = _sig(new_entry, 8)
            pos.szi = end
        elif abs(delta) <= abs(start):
            direction = "Close Long" if start > 0 else "Close Short"
            closed_pnl = size * (px - pos.entry_px) * _sign(start)
            if end == 0:
                del acct.positions[coin]
            else:
                pos.szi = end
        else:
            direction = "Long > Short" if start > 0 else "Short > Long"
            closed_pnl = abs(start) * (px - pos.entry_px) * _sign(start)
            acct.positions[coin] = Position(end, px, pos.leverage, pos.leverage_type, ts)
        if liquidation is not None:
            kind = "Isolated" if lev_type == "isolated" else "Cross"
            direction = f"Liquidated {kind} {'Long' if start > 0 else 'Short'}"
        rate = self.fee_rate if crossed else self.maker_fee_rate
        fee = _q(size * px * rate, 6)
        closed_pnl = _q(closed_pnl, 6)
        acct.cash += closed_pnl - fee
        acct.cum_vlm += size * px
        fill: dict[str, Any] = {
            "coin": coin,
            "px": fmt(px),
            "sz": fmt(size),
            "side": "B" if delta > 0 else "A",
            "time": ts,
            "startPosition": fmt(start),
            "dir": direction,
            "closedPnl": fmt(closed_pnl),
            "hash": tx_hash or self._next_hash(),
            "oid": oid,
            "crossed": crossed,
            "fee": fmt(fee),
            "tid": self._next_tid(),
            "feeToken": "USDC",
        }
        if cloid:
            fill["cloid"] = cloid
        if liquidation is not None:
            fill["liquidation"] = liquidation
        acct.fills.append(fill)
        return fill

    def _external_order(self, acct: Account, coin: str, side: str, sz: Decimal, px: Decimal, tif: str) -> Order:
        """An order placed outside the simulator's /exchange (UI, other bot, liquidation engine): history only."""
        now = self.now_ms()
        o = Order(
            oid=self._next_oid(), coin=coin, side=side, limit_px=px, sz=Decimal(0), orig_sz=sz, timestamp=now,
            tif=tif, order_type="Market", status="filled", status_ts=now,
        )
        acct.orders[o.oid] = o
        return o

    def _bump(self, acct: Account) -> None:
        """Record a state version (for "stale" faults) if positions, fills or cash changed."""
        v = acct.version()
        last = acct.versions[-1] if acct.versions else None
        if last is None or (last.positions, last.n_fills, last.cash) != (v.positions, v.n_fills, v.cash):
            acct.versions.append(v)

    def _trade(
        self, address: str, coin: str, deltas: list[Decimal], prices: list[Decimal], *, tif: str = "FrontendMarket",
        liquidation: dict[str, Any] | None = None, leverage: int | None = None,
    ) -> list[dict[str, Any]]:
        acct = self._account(address, create=True)
        total = sum(deltas, Decimal(0))
        avg = sum((abs(d) * p for d, p in zip(deltas, prices)), Decimal(0)) / abs(total)
        o = self._external_order(acct, coin, "B" if total > 0 else "A", abs(total), _sig(avg, 8), tif)
        tx = self._next_hash()
        ts = self.now_ms()
        fills = [
            self._fill(acct, coin, d, p, oid=o.oid, tx_hash=tx, liquidation=liquidation, leverage=leverage, ts=ts)
            for d, p in zip(deltas, prices)
        ]
        self._bump(acct)
        return fills

    def _split(self, coin: str, size: Decimal, parts: int) -> list[Decimal]:
        parts = int(parts)
        if parts < 1:
            raise SimulatorError("parts must be >= 1")
        szd = int(self._ensure_coin(coin).get("szDecimals", 8))
        step = Decimal(1).scaleb(-szd)
        chunk = (size / parts).quantize(step, rounding=ROUND_DOWN)
        if chunk <= 0:
            raise SimulatorError(f"cannot split {fmt(size)} {coin} into {parts} fills")
        out = [chunk] * (parts - 1)
        out.append(size - chunk * (parts - 1))
        return out

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

    def add_fill_history(self, address: str, coin: str, count: int, sz: Any = None, px: Any = None) -> int:
        """Give ``address`` ``count`` (even) more fills on ``coin``: open/close round trips of ``sz`` (default
        one size step) at ``px`` (default the mid), spread evenly in time from just after the account's last
        fill to now, ending flat. A busy account in bulk: past the 10,000 fills userFillsByTime can reach.
        ``coin`` must have no open position. Returns the number of fills added."""
        with self._lock:
            n = int(count)
            if n < 2 or n % 2:
                raise SimulatorError("count must be an even number >= 2")
            acct = self._account(address, create=True)
            if coin in acct.positions:
                raise SimulatorError(f"{coin} position is open for {acct.address}")
            szd = int(self._ensure_coin(coin).get("szDecimals", 8))
            size = D(sz, "sz") if sz is not None else Decimal(1).scaleb(-szd)
            self._check_size(coin, size, "sz")
            price = D(px, "px") if px is not None else self._mids.get(coin, Decimal(1))
            now = self.now_ms()
            first = (acct.fills[-1]["time"] + 1) if acct.fills else now - n
            first = min(first, now)
            span = max(0, now - first)
            o = self._external_order(acct, coin, "B", size * (n // 2), price, "FrontendMarket")
            for i in range(n):
                ts = first + (span * i) // max(1, n - 1)
                self._fill(acct, coin, size if i % 2 == 0 else -size, price, oid=o.oid, ts=ts)
            self._bump(acct)
            return n

    def liquidate(self, address: str, coin: str, mark_px: Any, px: Any = None,
                  cancel_orders: bool = True) -> list[dict[str, Any]]:
        """Market-liquidate the whole position: one fill at ``px`` (default mark_px), dir "Liquidated Cross
        Long/Short", liquidation {"liquidatedUser", "markPx", "method": "market"}.  The mid becomes mark_px; a
        userNonFundingLedgerUpdates liquidation delta is recorded; with cancel_orders the coin's open orders
        are cancelled (status liquidatedCanceled)."""
        with self._lock:
            acct = self._account(address, create=True)
            pos = acct.positions.get(coin)
            if pos is None:
                raise SimulatorError(f"no open {coin} position for {acct.address}")
            mark = D(mark_px, "mark_px")
            price = D(px, "px") if px is not None else mark
            self._mids[coin] = mark
            liq = {"liquidatedUser": acct.address, "markPx": fmt(mark), "method": "market"}
            szi = pos.szi
            account_value = self._account_value(acct.positions, acct.cash)
            fills = self._trade(address, coin, [-szi], [price], tif="LiquidationMarket", liquidation=liq)
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
                for o in acct.orders.values():
                    if o.coin == coin and o.status == "open":
                        self._set_status(o, "liquidatedCanceled")
            return fills

    # ---- scripting: orders --------------------------------------------------------------------

    def add_trigger_order(self, address: str, coin: str, side: Any, sz: Any, trigger_px: Any, tpsl: str,
                          limit_px: Any = None, is_market: bool = True, cloid: str | None = None,
                          reduce_only: bool = True) -> int:
        """Place a (reduce-only by default) TP/SL trigger order as if from the UI.  side "B"/"A" (or
        "buy"/"sell").  Shows in openOrders and frontendOpenOrders.  Returns its oid."""
        with self._lock:
            if tpsl not in ("tp", "sl"):
                raise SimulatorError("tpsl must be 'tp' or 'sl'")
            acct = self._account(address, create=True)
            s = _side(side)
            size, tpx = D(sz, "sz"), D(trigger_px, "trigger_px")
            self._check_size(coin, size, "sz")
            if limit_px is None:
                limit_px = _sig(tpx * (Decimal("1.08") if s == "B" else Decimal("0.92")), 5)
            o = self._new_order(acct, coin, s, D(limit_px, "limit_px"), size, cloid, reduce_only, None,
                                is_trigger=True, trigger_px=tpx, tpsl=tpsl, is_market=bool(is_market))
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
                   tpsl: str | None = None, is_market: bool = True, status: str = "open") -> Order:
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
            status_ts=now,
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

    def fills(self, address: str) -> list[dict[str, Any]]:
        """All fills of the account, oldest first."""
        with self._lock:
            acct = self._account(address)
            return copy.deepcopy(acct.fills) if acct else []

    def orders(self, address: str, open_only: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            acct = self._account(address)
            if not acct:
                return []
            return [o.to_json() for o in acct.orders.values() if o.status == "open" or not open_only]

    def accounts(self) -> list[str]:
        with self._lock:
            return sorted(self._accounts)

    # ---- request log ------------------------------------------------------------------------------

    def requests_log(self, path: str | None = None, type: str | None = None) -> list[dict[str, Any]]:
        """Every /info and /exchange request served: {time, path, type, user, weight, status, fault}
        (status 0 = connection closed without an answer)."""
        with self._lock:
            return [
                dict(e) for e in self._log
                if (path is None or e["path"] == _norm_path(path)) and (type is None or e["type"] == type)
            ]

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()
            self._weight_window.clear()

    def total_weight(self) -> int:
        with self._lock:
            return sum(e["weight"] for e in self._log)

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._log.append(entry)

    # ---- faults -----------------------------------------------------------------------------------

    def add_fault(self, kind: str, path: str | None = None, type: str | None = None, user: str | None = None,
                  count: int | None = 1, **args: Any) -> int:
        """Inject a fault into the next ``count`` matching requests (None = until cleared).  Returns its id.

        kind: "429" | "500" | "hang" | "malformed" | "error_body" | "missing_field" | "empty" | "stale" |
        "drop_response".  path "info"/"exchange" (or "/info"...); type = info type or action type; user =
        address (info: the "user" field; exchange: the account acted for).  Args by kind: hang
        ``seconds`` (default 60, max 120); 500 ``status`` (default 500) and ``body``; malformed ``body``
        (default: the real answer cut in half); error_body ``message``; missing_field ``field`` (default
        "assetPositions"; for list answers the key is removed from every item); stale ``k`` (answer as it
        was k state changes ago; omitted = frozen at the moment the fault is added); drop_response ``mode``
        "500" (default) | "hang" and ``seconds``.  missing_field/empty/stale default to path info and type
        clearinghouseState; drop_response to path exchange."""
        if kind not in FAULT_KINDS:
            raise SimulatorError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        p = _norm_path(path) if path else None
        t = type
        if kind in ("missing_field", "empty", "stale"):
            p = p or "/info"
            t = t or "clearinghouseState"
        if kind == "drop_response":
            p = "/exchange"
        if count is not None:
            count = int(count)
            if count < 1:
                raise SimulatorError("count must be >= 1 (or None for until cleared)")
        for key in ("seconds",):
            if key in args and args[key] is not None:
                args[key] = min(float(args[key]), MAX_SLEEP_S)
        if kind == "drop_response" and args.get("mode", "500") not in ("500", "hang"):
            raise SimulatorError("drop_response mode must be '500' or 'hang'")
        with self._lock:
            self._fault_seq += 1
            f = Fault(self._fault_seq, kind, p, t, _addr(user) if user else None, count, dict(args))
            if kind == "stale" and args.get("k") is None:
                f.frozen = {a: acct.version() for a, acct in self._accounts.items()}
            self._faults.append(f)
            return f.id

    def clear_faults(self, fault_id: int | None = None) -> int:
        """Remove one fault (by id) or all.  Returns how many were removed."""
        with self._lock:
            before = len(self._faults)
            self._faults = [f for f in self._faults if fault_id is not None and f.id != int(fault_id)]
            return before - len(self._faults)

    def list_faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.to_json() for f in self._faults]

    def add_request_hook(self, callback: Callable[[str, str | None, str | None, dict[str, Any]], Any],
                         path: str | None = None, type: str | None = None, user: str | None = None,
                         count: int | None = 1) -> int:
        """In-process only: call ``callback(path, type, user, body)`` just before the next ``count`` matching
        requests are processed (None = until cleared); a test's way to change the exchange between a
        client's read and its write (e.g. the position grows while a close order is in flight). /info:
        before the answer is built; /exchange: after the signature and the account are resolved, before
        the action is applied (``user`` is the account acted for). The callback may call any scripting
        method; an exception in it is swallowed. Returns the hook's id."""
        with self._lock:
            self._fault_seq += 1
            self._hooks.append({"id": self._fault_seq, "fn": callback, "path": _norm_path(path) if path else None,
                                "type": type, "user": _addr(user) if user else None,
                                "remaining": None if count is None else int(count)})
            return self._fault_seq

    def clear_request_hooks(self) -> int:
        with self._lock:
            n = len(self._hooks)
            self._hooks = []
            return n

    def _run_hooks(self, path: str, typ: str | None, user: str | None, body: dict[str, Any]) -> None:
        with self._lock:
            due = []
            for h in list(self._hooks):
                if h["path"] not in (None, path) or h["type"] not in (None, typ) or h["user"] not in (None, user):
                    continue
                due.append(h["fn"])
                if h["remaining"] is not None:
                    h["remaining"] -= 1
                    if h["remaining"] <= 0:
                        self._hooks.remove(h)
        for fn in due:
            try:
                fn(path, typ, user, body)
            except Exception:  # noqa: BLE001 - a scripting hook that the state did not allow
                pass

    def _take_fault(self, path: str, typ: str | None, user: str | None) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.path not in (None, path) or f.type not in (None, typ) or f.user not in (None, user):
                    continue
                f.hits += 1
                if f.remaining is not None:
                    f.remaining -= 1
                    if f.remaining <= 0:
                        self._faults.remove(f)
                return f
            return None

    # ---- sleeping ---------------------------------------------------------------------------------

    def hold_requests(self) -> None:
        """Make every /info request wait (at most MAX_SLEEP_S) until release_requests(): a test's way to keep
        a run busy for exactly as long as it needs, independent of machine load."""
        self._gate.clear()

    def release_requests(self) -> None:
        self._gate.set()

    def wait_for_held_requests(self, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``count`` /info requests are waiting at the gate (a run's read is provably in flight)."""
        with self._traffic:
            if not self._traffic.wait_for(lambda: self._held >= count, timeout):
                raise TimeoutError(f"{count} held request(s) expected within {timeout}s, {self._held} arrived")

    def wait_until_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no request is being handled (a hung or slow order from a client that gave up may
        still be applied until then). False if requests are still in flight after ``timeout``."""
        with self._traffic:
            return self._traffic.wait_for(lambda: self._in_flight == 0, timeout)

    @contextlib.contextmanager
    def _counted(self, counter: str) -> Iterator[None]:
        """Count a request in ``counter`` ("_in_flight" or "_held") while the block runs."""
        with self._traffic:
            setattr(self, counter, getattr(self, counter) + 1)
            self._traffic.notify_all()
        try:
            yield
        finally:
            with self._traffic:
                setattr(self, counter, getattr(self, counter) - 1)
                self._traffic.notify_all()

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._wake.wait(min(seconds, MAX_SLEEP_S))

    # ---- clearinghouse rendering --------------------------------------------------------------

    def _max_lev(self, coin: str) -> int:
        idx = self._asset_index(coin)
        return int(self._universe[idx].get("maxLeverage", 50)) if idx is not None else 50

    def _mark(self, coin: str, pos: Position) -> Decimal:
        return self._mids.get(coin, pos.entry_px)

    def _account_value(self, positions: dict[str, Position], cash: Decimal) -> Decimal:
        return cash + sum((p.szi * (self._mark(c, p) - p.entry_px) for c, p in positions.items()), Decimal(0))

    def _clearinghouse(self, positions: dict[str, Position], cash: Decimal) -> dict[str, Any]:
        order = {u["name"]: i for i, u in enumerate(self._universe)}
        coins = sorted(positions, key=lambda c: (order.get(c, 10**9), c))
        av = self._account_value(positions, cash)
        mm = {c: abs(p.szi) * self._mark(c, p) / (2 * self._max_lev(c)) for c, p in positions.items()}
        total_mm = sum(mm.values(), Decimal(0))
        asset_positions = []
        ntl = margin = net_ntl = Decimal(0)
        for c in coins:
            p = positions[c]
            mark = self._mark(c, p)
            value = abs(p.szi) * mark
            upnl = p.szi * (mark - p.entry_px)
            used = value / p.leverage
            roe = upnl / (abs(p.szi) * p.entry_px / p.leverage) if p.entry_px else Decimal(0)
            denom = p.szi - abs(p.szi) / (2 * self._max_lev(c))
            liq = None
            if denom != 0:
                liq_px = (total_mm - mm[c] - av + p.szi * mark) / denom
                if liq_px > 0:
                    liq = fmt(_q(liq_px, 8))
            lev: dict[str, Any] = {"type": p.leverage_type, "value": p.leverage}
            if p.leverage_type == "isolated":
                lev["rawUsd"] = fmt(_q(-p.szi * p.entry_px + abs(p.szi) * p.entry_px / p.leverage, 6))
            asset_positions.append({
                "type": "oneWay",
                "position": {
                    "coin": c,
                    "szi": fmt(p.szi),
                    "leverage": lev,
                    "entryPx": fmt(p.entry_px),
                    "positionValue": fmt(_q(value, 6)),
                    "unrealizedPnl": fmt(_q(upnl, 6)),
                    "returnOnEquity": fmt(_q(roe, 8)),
                    "liquidationPx": liq,
                    "marginUsed": fmt(_q(used, 6)),
                    "maxLeverage": self._max_lev(c),
                    "cumFunding": {"allTime": "0.0", "sinceOpen": "0.0", "sinceChange": "0.0"},
                },
            })
            ntl += _q(value, 6)
            margin += _q(used, 6)
            net_ntl += p.szi * mark
        summary = {
            "accountValue": fmt(_q(av, 6)),
            "totalNtlPos": fmt(_q(ntl, 6)),
            "totalRawUsd": fmt(_q(av - net_ntl, 6)),
            "totalMarginUsed": fmt(_q(margin, 6)),
        }
        return {
            "marginSummary": summary,
            "crossMarginSummary": dict(summary),
            "crossMaintenanceMarginUsed": fmt(_q(total_mm, 6)),
            "withdrawable": fmt(_q(max(av - margin, Decimal(0)), 6)),
            "assetPositions": asset_positions,
            "time": self.now_ms(),
        }

    def _view(self, user: str, fault: Fault | None) -> _Version:
        acct = self._accounts.get(user)
        empty = _Version({}, 0, Decimal(0))
        if fault is not None and fault.kind == "stale":
            if fault.frozen is not None:
                return fault.frozen.get(user, empty)
            if acct is None:
                return empty
            k = int(fault.args.get("k", 1))
            versions = list(acct.versions)
            return versions[max(0, len(versions) - 1 - k)]
        if acct is None:
            return empty
        return _Version(acct.positions, len(acct.fills), acct.cash)

    # ---- /info ----------------------------------------------------------------------------------------

    def _info_payload(self, typ: str, body: dict[str, Any], user: str | None, fault: Fault | None) -> Any:
        acct = self._accounts.get(user) if user else None
        dex = body.get("dex") or ""
        if typ == "clearinghouseState":
            view = self._view(user, fault)
            positions = {} if dex else view.positions
            if fault is not None and fault.kind == "empty":
                positions = {}
            return self._clearinghouse(positions, view.cash if not dex else Decimal(0))
        if typ in ("userFills", "userFillsByTime"):
            n = self._view(user, fault).n_fills
            fills = acct.fills[:n] if acct else []
            if typ == "userFills":
                return copy.deepcopy(list(reversed(fills[-2000:])))
            start = body.get("startTime")
            end = body.get("endTime")
            if not isinstance(start, int) or isinstance(start, bool):
                raise _BadRequest()
            if end is not None and (not isinstance(end, int) or isinstance(end, bool)):
                raise _BadRequest()
            window = [f for f in fills[-10000:] if f["time"] >= start and (end is None or f["time"] <= end)]
            if body.get("reversed"):
                window.reverse()
            return copy.deepcopy(window[:2000])
        if typ in ("openOrders", "frontendOpenOrders"):
            if not acct or dex:
                return []
            live = sorted((o for o in acct.orders.values() if o.status == "open"), key=lambda o: -o.oid)
            return [o.open_order() if typ == "openOrders" else o.frontend() for o in live]
        if typ == "allMids":
            return {} if dex else {c: fmt(p) for c, p in sorted(self._mids.items())}
        if typ == "meta":
            return {"universe": [] if dex else copy.deepcopy(self._universe)}
        if typ == "spotMeta":
            return {"universe": [], "tokens": []}
        if typ == "perpDexs":
            return [None]
        if typ == "metaAndAssetCtxs":
            ctxs = []
            for u in self._universe:
                m = self._mids.get(u["name"])
                px = fmt(m) if m is not None else None
                ctxs.append({"funding": "0.0", "openInterest": "0.0", "prevDayPx": px, "dayNtlVlm": "0.0",
                             "premium": "0.0", "oraclePx": px, "markPx": px, "midPx": px,
                             "impactPxs": [px, px] if px else None})
            return [{"universe": copy.deepcopy(self._universe)}, ctxs]
        if typ == "orderStatus":
            ref = body.get("oid")
            o = None
            if acct is not None:
                if isinstance(ref, int) and not isinstance(ref, bool):
                    o = acct.orders.get(ref)
                elif isinstance(ref, str):
                    oid = acct.cloids.get(ref.lower())
                    o = acct.orders.get(oid) if oid is not None else None
                else:
                    raise _BadRequest()
            elif not (isinstance(ref, (int, str)) and not isinstance(ref, bool)):
                raise _BadRequest()
            if o is None:
                return {"status": "unknownOid"}
            return {"status": "order", "order": {"order": o.frontend(), "status": o.status,
                                                  "statusTimestamp": o.status_ts}}
        if typ == "historicalOrders":
            if not acct:
                return []
            hist = sorted(acct.orders.values(), key=lambda o: (-o.status_ts, -o.oid))[:2000]
            return [{"order": o.frontend(), "status": o.status, "statusTimestamp": o.status_ts} for o in hist]
        if typ == "userRateLimit":
            vlm = acct.cum_vlm if acct else Decimal(0)
            used = acct.n_actions if acct else 0
            return {"cumVlm": fmt(_q(vlm, 6)), "nRequestsUsed": used, "nRequestsCap": int(vlm) + 10000,
                    "nRequestsSurplus": 0}
        if typ == "userFunding":
            return []
        if typ == "userNonFundingLedgerUpdates":
            start = body.get("startTime", 0) or 0
            end = body.get("endTime")
            return [x for x in (acct.ledger if acct else [])
                    if x["time"] >= start and (end is None or x["time"] <= end)]
        if typ == "spotClearinghouseState":
            return {"balances": []}
        if typ == "userRole":  # who an address is: the monitor asks before signing for an account
            if user in self._agents:
                return {"role": "agent", "data": {"user": self._agents[user]}}
            if user in self._sub_accounts:
                return {"role": "subAccount", "data": {"master": self._sub_accounts[user]}}
            return {"role": "user"} if user in self._accounts else {"role": "missing"}
        raise _UnknownType()

    def handle_info(self, raw: bytes) -> Response:
        """Serve one POST /info body (also used by the HTTP handler)."""
        return self._handle("/info", self._serve_info, raw, weight=0, gated=True)

    def _handle(self, path: str, serve: Any, raw: bytes, *, weight: int, gated: bool = False) -> Response:
        """Latency, the test gate, the request log and a crash guard around one request."""
        with self._counted("_in_flight"):
            return self._handle_one(path, serve, raw, weight=weight, gated=gated)

    def _handle_one(self, path: str, serve: Any, raw: bytes, *, weight: int, gated: bool) -> Response:
        arrived = self.now_ms()
        self._sleep(self.latency_ms / 1000.0)
        if gated and not self._gate.is_set():
            with self._counted("_held"):
                self._gate.wait(MAX_SLEEP_S)
        entry = {"time": arrived, "path": path, "type": None, "user": None, "weight": weight, "status": 0,
                 "fault": None}
        try:
            resp = serve(raw, entry)
        except Exception:  # pragma: no cover - bug guard: answer like a crashed server would
            traceback.print_exc()
            resp = _text_response("Internal Server Error", 500)
        entry["status"] = 0 if resp.drop else resp.status
        self._record(entry)
        return resp

    def _serve_info(self, raw: bytes, entry: dict[str, Any]) -> Response:
        try:
            body = json.loads(raw or b"")
        except ValueError as exc:
            return _text_response(f"Failed to parse the request body as JSON: {exc}", 400)
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            return _text_response(DESERIALIZE_ERROR, 422)
        typ = body["type"]
        entry["type"] = typ
        known = _INFO_NEEDS_USER | {"allMids", "meta", "spotMeta", "perpDexs", "metaAndAssetCtxs"}
        if typ not in known:
            return _text_response(DESERIALIZE_ERROR, 422)
        user = None
        if typ in _INFO_NEEDS_USER:
            if not _is_addr(body.get("user")):
                return _text_response(DESERIALIZE_ERROR, 422)
            user = _addr(body["user"])
        entry["user"] = user
        base_weight = 2 if typ in _INFO_WEIGHT_2 else 60 if typ == "userRole" else 20
        entry["weight"] = base_weight
        if self._hooks:
            self._run_hooks("/info", typ, user, body)
        fault = self._take_fault("/info", typ, user)
        entry["fault"] = fault.kind if fault else None
        limited = self._rate_limited(base_weight)
        if limited is not None:
            return limited
        if fault is not None:
            pre = self._pre_fault(fault)
            if pre is not None:
                return pre
        try:
            with self._lock:
                payload = self._info_payload(typ, body, user, fault)
        except _BadRequest:
            return _text_response(DESERIALIZE_ERROR, 422)
        if typ in _INFO_WEIGHT_PER_ITEM and isinstance(payload, list):
            entry["weight"] = base_weight + len(payload) // 20
        if fault is not None:
            if fault.kind == "empty":
                if isinstance(payload, list):
                    payload = []
                elif typ != "clearinghouseState" and isinstance(payload, dict):
                    payload = {}
            elif fault.kind == "missing_field":
                key = fault.args.get("field", "assetPositions")
                if isinstance(payload, dict):
                    payload.pop(key, None)
                elif isinstance(payload, list):
                    for item in payload:
                        if isinstance(item, dict):
                            item.pop(key, None)
            elif fault.kind == "malformed":
                text = fault.args.get("body")
                if text is None:
                    full = _dumps(payload).decode()
                    text = full[: max(1, len(full) // 2)]
                return Response(200, "application/json", str(text).encode())
        return _json_response(payload)

    def _pre_fault(self, fault: Fault) -> Response | None:
        """Faults answered before the request is processed; None = go on (after a hang's sleep)."""
        k = fault.kind
        if k == "429":
            return Response(429, "application/json", b"null")
        if k == "500":
            return _text_response(str(fault.args.get("body", "Internal Server Error")), int(fault.args.get("status", 500)))
        if k == "error_body":
            return _json_response({"error": str(fault.args.get("message", "Internal error"))})
        if k == "hang":
            self._sleep(float(fault.args.get("seconds") or DEFAULT_HANG_S))
        return None

    def _rate_limited(self, weight: int) -> Response | None:
        with self._lock:
            if self.ip_weight_limit is None:
                return None
            now = time.monotonic()
            while self._weight_window and self._weight_window[0][0] < now - 60:
                self._weight_window.popleft()
            used = sum(w for _, w in self._weight_window)
            if used + weight > self.ip_weight_limit:
                return Response(429, "application/json", b"null")
            self._weight_window.append((now, weight))
            return None

    # ---- /exchange ------------------------------------------------------------------------------------

    def handle_exchange(self, raw: bytes) -> Response:
        """Serve one POST /exchange body (also used by the HTTP handler)."""
        return self._handle("/exchange", self._serve_exchange, raw, weight=1)

    def _serve_exchange(self, raw: bytes, entry: dict[str, Any]) -> Response:
        try:
            body = json.loads(raw or b"")
        except ValueError as exc:
            return _text_response(f"Failed to parse the request body as JSON: {exc}", 400)
        if not isinstance(body, dict):
            return _text_response(DESERIALIZE_ERROR, 422)
        action, nonce, sig = body.get("action"), body.get("nonce"), body.get("signature")
        vault, expires = body.get("vaultAddress"), body.get("expiresAfter")
        if (
            not isinstance(action, dict)
            or not isinstance(action.get("type"), str)
            or not isinstance(nonce, int) or isinstance(nonce, bool)
            or not isinstance(sig, dict) or not all(k in sig for k in ("r", "s", "v"))
            or (vault is not None and not _is_addr(vault))
            or (expires is not None and (not isinstance(expires, int) or isinstance(expires, bool)))
        ):
            return _text_response(DESERIALIZE_ERROR, 422)
        typ = action["type"]
        entry["type"] = typ
        shape_ok = _action_shape_ok(action)
        if shape_ok is None:
            return _text_response(DESERIALIZE_ERROR, 422)
        entry["weight"] = 1 + shape_ok // 40
        signer = _recover_signer(action, sig, vault, nonce, expires)
        with self._lock:
            actor, err = self._resolve_actor(signer, vault, typ)
        entry["user"] = actor
        if self._hooks and actor is not None:
            self._run_hooks("/exchange", typ, actor, body)
        fault = self._take_fault("/exchange", typ, actor)
        entry["fault"] = fault.kind if fault else None
        limited = self._rate_limited(entry["weight"])
        if limited is not None:
            return limited
        if fault is not None:
            if fault.kind == "malformed":
                return Response(200, "text/html", str(fault.args.get("body", "<html><body>Bad Gateway</body></html>")).encode())
            if fault.kind != "drop_response":
                pre = self._pre_fault(fault)
                if pre is not None:
                    return pre
        with self._lock:
            result = self._apply_exchange(action, nonce, expires, signer, actor, err, shape_ok)
        if fault is not None and fault.kind == "drop_response":
            if fault.args.get("mode", "500") == "hang":
                self._sleep(float(fault.args.get("seconds") or DEFAULT_HANG_S))
                return Response(0, "", b"", drop=True)
            return _text_response("Internal Server Error", 500)
        return _json_response(result)

    def _resolve_actor(self, signer: str | None, vault: str | None, typ: str) -> tuple[str | None, str | None]:
        """(account acted for, error text or None)."""
        who = signer or "0x0000000000000000000000000000000000000000"
        unknown = f"User or API Wallet {who} does not exist."
        if signer is None:
            return None, unknown
        if typ == "approveAgent":
            if signer in self._accounts:
                return signer, None
            return None, f"Must deposit before performing actions. User: {signer}"
        master = self._agents.get(signer)
        if master is None and signer not in self._accounts:
            return None, unknown
        principal = master or signer
        if vault is None:
            return principal, None
        v = _addr(vault)
        if v == principal or self._sub_accounts.get(v) == principal:
            return v, None
        return None, unknown

    def _apply_exchange(self, action: dict[str, Any], nonce: int, expires: int | None, signer: str | None,
                        actor: str | None, err: str | None, n_items: int) -> dict[str, Any]:
        if err is not None or actor is None:
            return {"status": "err", "response": err}
        now = self.now_ms()
        if expires is not None and expires < now:
            return {"status": "err", "response": f"Action already expired: {expires} < {now}"}
        if self.check_nonces:
            used = self._nonces.setdefault(signer, [])
            if nonce in used:
                return {"status": "err", "response": f"Invalid nonce: duplicate nonce {nonce}"}
            if len(used) >= 100 and nonce < used[0]:
                return {"status": "err", "response": f"Invalid nonce: nonce too low {nonce}"}
            used.append(nonce)
            used.sort()
            del used[:-100]
        acct = self._account(actor, create=True)
        typ = action["type"]
        acct.n_actions += max(1, n_items)
        if typ == "order":
            statuses = [self._place(acct, w, expires) for w in action["orders"]]
            self._bump(acct)
            return {"status": "ok", "response": {"type": "order", "data": {"statuses": statuses}}}
        if typ in ("cancel", "cancelByCloid"):
            statuses = []
            for c in action["cancels"]:
                if typ == "cancel":
                    o = acct.orders.get(c["o"])
                    asset = c["a"]
                else:
                    oid = acct.cloids.get(str(c["cloid"]).lower())
                    o = acct.orders.get(oid) if oid is not None else None
                    asset = c["asset"]
                if o is None or o.status != "open" or self._asset_index(o.coin) != asset:
                    statuses.append({"error": "Order was never placed, already canceled, or filled."})
                else:
                    self._set_status(o, "canceled")
                    statuses.append("success")
            self._bump(acct)
            return {"status": "ok", "response": {"type": "cancel", "data": {"statuses": statuses}}}
        if typ == "updateLeverage":
            asset = action["asset"]
            if not 0 <= asset < len(self._universe):
                return {"status": "err", "response": f"Invalid asset: {asset}"}
            coin = self._universe[asset]["name"]
            acct.leverage[coin] = int(action["leverage"])
            if coin in acct.positions:
                acct.positions[coin].leverage = int(action["leverage"])
                acct.positions[coin].leverage_type = "cross" if action.get("isCross", True) else "isolated"
            return {"status": "ok", "response": {"type": "default"}}
        if typ == "approveAgent":
            agent = _addr(action["agentAddress"])
            if self._agents.get(agent, actor) != actor or agent in self._accounts:
                return {"status": "err", "response": f"Agent {agent} is already used."}
            self._agents[agent] = actor
            return {"status": "ok", "response": {"type": "default"}}
        # scheduleCancel / noop: accepted, no effect in the simulator
        return {"status": "ok", "response": {"type": "default"}}

    def _place(self, acct: Account, w: dict[str, Any], expires: int | None = None) -> Any:
        a = w["a"]
        if not 0 <= a < len(self._universe):
            return {"error": f"Invalid asset. asset={a}"}
        u = self._universe[a]
        coin = u["name"]
        szd = int(u.get("szDecimals", 0))
        is_buy = bool(w["b"])
        try:
            px, sz = Decimal(str(w["p"])), Decimal(str(w["s"]))
        except InvalidOperation:
            return {"error": "Order has invalid price."}
        if not sz.is_finite() or sz <= 0 or (self.strict_ticks and _decimals(sz) > szd):
            return {"error": "Order has invalid size."}
        if not px.is_finite() or px <= 0 or (self.strict_ticks and not _price_ok(px, szd)):
            return {"error": "Order has invalid price."}
        t = w["t"]
        cloid = w.get("c")
        cloid = cloid.lower() if isinstance(cloid, str) else None
        if cloid and cloid in acct.cloids:
            return {"error": "Order has duplicate cloid."}
        side = "B" if is_buy else "A"
        reduce_only = bool(w["r"])

        def with_cloid(d: dict[str, Any]) -> dict[str, Any]:
            if cloid:
                d["cloid"] = cloid
            return d

        if "trigger" in t:
            trig = t["trigger"]
            o = self._new_order(acct, coin, side, px, sz, cloid, reduce_only, None, is_trigger=True,
                                trigger_px=Decimal(str(trig["triggerPx"])), tpsl=trig.get("tpsl"),
                                is_market=bool(trig.get("isMarket", True)))
            o.expires_after = expires
            return {"resting": with_cloid({"oid": o.oid})}
        tif = t["limit"]["tif"]
        o = self._new_order(acct, coin, side, px, sz, cloid, reduce_only, tif)
        o.expires_after = expires
        mid = self._mids.get(coin)
        if self.min_notional > 0 and sz * (mid or px) < self.min_notional:
            self._set_status(o, "minTradeNtlRejected")
            return {"error": f"Order must have minimum value of ${fmt(self.min_notional).removesuffix('.0')}. asset={a}"}
        pos = acct.positions.get(coin)
        fill_sz = sz
        if reduce_only:
            if pos is None or (pos.szi > 0) == is_buy:
                self._set_status(o, "reduceOnlyRejected")
                return {"error": f"Reduce only order would increase position. asset={a}"}
            fill_sz = min(sz, abs(pos.szi))
        marketable = mid is not None and (px >= mid if is_buy else px <= mid)
        if tif == "Alo" and marketable:
            self._set_status(o, "badAloPxRejected")
            return {"error": f"Post only order would have immediately matched, bbo was {fmt(mid)}@{fmt(mid)}. asset={a}"}
        if not marketable:
            if tif == "Ioc":
                self._set_status(o, "iocCancelRejected")
                if mid is None:
                    return {"error": f"No liquidity available for market order. asset={a}"}
                return {"error": f"Order could not immediately match against any resting orders. asset={a}"}
            return {"resting": with_cloid({"oid": o.oid})}
        partial = False
        ratio = self._partial.get(coin) if tif == "Ioc" else None
        if ratio is not None:
            part = (fill_sz * ratio).quantize(Decimal(1).scaleb(-szd), rounding=ROUND_DOWN)
            if part <= 0:
                self._set_status(o, "iocCancelRejected")
                return {"error": f"Order could not immediately match against any resting orders. asset={a}"}
            partial = part < fill_sz
            fill_sz = part
        self._fill(acct, coin, fill_sz if is_buy else -fill_sz, mid, oid=o.oid, cloid=cloid, crossed=True)
        if partial:
            o.sz = sz - fill_sz  # the rest of the IOC is cancelled
            self._set_status(o, "canceled")
        else:
            o.sz = Decimal(0)  # a reduce-only order larger than the position is filled to the position size
            self._set_status(o, "filled")
        return {"filled": with_cloid({"totalSz": fmt(fill_sz), "avgPx": fmt(mid), "oid": o.oid})}

    # ---- /_control ----------------------------------------------------------------------------------

    CONTROL_OPS = (
        "open_position", "seed_position", "seed_from_clearinghouse", "resize", "flip", "close_external",
        "liquidate", "set_mid", "set_mids", "add_trigger_order", "add_limit_order", "fill_trigger",
        "cancel_order", "set_fee_rate", "set_partial_fill_ratio", "set_latency", "set_config", "approve_agent",
        "revoke_agent", "add_account", "add_sub_account", "add_coin", "now_ms", "set_time", "advance_time",
        "set_clock_offset", "clear", "snapshot", "load", "requests_log", "reset_log", "total_weight",
        "add_fill_history",
        "add_fault", "clear_faults", "list_faults", "meta", "mids", "position", "positions", "fills", "orders",
        "accounts",
    )

    def control(self, op: str, **args: Any) -> Any:
        """Run a scripting op by name (what POST /_control does)."""
        if op not in self.CONTROL_OPS:
            raise SimulatorError(f"unknown op {op!r}")
        if op == "load" and "state" in args:
            return self.load(args["state"])
        return getattr(self, op)(**args)

    def handle_control(self, raw: bytes) -> Response:
        try:
            body = json.loads(raw or b"", parse_float=Decimal)
            if not isinstance(body, dict) or not isinstance(body.get("op"), str):
                raise SimulatorError('expected {"op": name, ...args}')
            op = body.pop("op")
            result = self.control(op, **body)
            return _json_response({"ok": True, "result": result})
        except (SimulatorError, TypeError, KeyError, ValueError) as exc:
            return _json_response({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, 400)

    # ---- HTTP entry point ---------------------------------------------------------------------------

    def handle(self, path: str, raw: bytes) -> Response:
        path = path.split("?", 1)[0]
        if path == "/info":
            return self.handle_info(raw)
        if path == "/exchange":
            return self.handle_exchange(raw)
        if path == "/_control":
            return self.handle_control(raw)
        return _text_response("Not Found", 404)


class _BadRequest(Exception):
    pass


class _UnknownType(Exception):
    pass


def _norm_path(path: str) -> str:
    p = path if path.startswith("/") else "/" + path
    if p not in ("/info", "/exchange"):
        raise SimulatorError(f"path must be 'info' or 'exchange', got {path!r}")
    return p


def _price_ok(px: Decimal, sz_decimals: int) -> bool:
    """Perp tick rule: integer prices always; else <= 5 significant figures and <= 6 - szDecimals decimals."""
    if px == px.to_integral_value():
        return True
    n = px.normalize()
    digits = len(n.as_tuple().digits)
    return digits <= 5 and _decimals(n) <= 6 - sz_decimals


def _action_shape_ok(action: dict[str, Any]) -> int | None:
    """Number of orders/cancels in a well-formed action, None when it would not deserialize."""
    typ = action["type"]

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    try:
        if typ == "order":
            orders = action["orders"]
            if not isinstance(orders, list):
                return None
            for w in orders:
                if not (is_int(w["a"]) and isinstance(w["b"], bool) and isinstance(w["p"], str)
                        and isinstance(w["s"], str) and isinstance(w["r"], bool) and isinstance(w["t"], dict)):
                    return None
                t = w["t"]
                if "limit" in t:
                    if t["limit"].get("tif") not in ("Gtc", "Ioc", "Alo"):
                        return None
                elif "trigger" in t:
                    tr = t["trigger"]
                    if not isinstance(tr.get("triggerPx"), str) or tr.get("tpsl") not in ("tp", "sl"):
                        return None
                else:
                    return None
                c = w.get("c")
                if c is not None and not (isinstance(c, str) and len(c) == 34 and c.startswith("0x")):
                    return None
            return len(orders)
        if typ == "cancel":
            cancels = action["cancels"]
            if not all(is_int(c["a"]) and is_int(c["o"]) for c in cancels):
                return None
            return len(cancels)
        if typ == "cancelByCloid":
            cancels = action["cancels"]
            if not all(is_int(c["asset"]) and isinstance(c["cloid"], str) for c in cancels):
                return None
            return len(cancels)
        if typ == "updateLeverage":
            return 1 if is_int(action["asset"]) and is_int(action["leverage"]) else None
        if typ == "approveAgent":
            return 1 if _is_addr(action["agentAddress"]) else None
        if typ in ("scheduleCancel", "noop"):
            return 1
    except (KeyError, TypeError, AttributeError):
        return None
    return None


def _recover_signer(action: dict[str, Any], sig: dict[str, Any], vault: str | None, nonce: int,
                    expires: int | None) -> str | None:
    """Recover the signing address with the SDK's own helpers (testnet phantom agent, source "b")."""
    try:
        from hyperliquid.utils import signing

        signature = {"r": sig["r"], "s": sig["s"], "v": int(sig["v"])}
        if action.get("type") == "approveAgent":
            act = dict(action)
            act.setdefault("agentName", "")
            address = signing.recover_user_from_user_signed_action(
                act, signature, _APPROVE_AGENT_TYPES, "HyperliquidTransaction:ApproveAgent", False)
        else:
            address = signing.recover_agent_or_user_from_l1_action(action, signature, vault, nonce, expires, False)
        return str(address).lower()
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------
# HTTP server


class _Handler(BaseHTTPRequestHandler):
    # Answer without waiting for a delayed ACK (Nagle): otherwise each keep-alive request stalls ~40 ms.
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server_version = "hl-sim/1.0"
    sys_version = ""
    timeout = 300  # idle keep-alive connections are dropped after this

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _send(self, resp: Response) -> None:
        if resp.drop:
            self.close_connection = True
            return
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            self.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] in ("/", "/health"):
            self._send(Response(200, "text/plain", b"ok"))
        else:
            self._send(_text_response("Not Found", 404))

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        sim: Simulator = self.server.simulator  # type: ignore[attr-defined]
        self._send(sim.handle(self.path, raw))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # a run opens up to 16 connections at once; the default backlog (5) drops SYNs

    def __init__(self, addr: tuple[str, int], simulator: Simulator) -> None:
        self.simulator = simulator
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class SimulatorServer:
    """A Simulator served over HTTP on ``host:port`` (port 0 = a free one).

    ``url`` is "http://127.0.0.1:PORT" (pass it as the SDK's base_url).  Unknown attributes are forwarded to
    the Simulator, so ``server.open_position(...)`` works; ``server.sim`` is the Simulator itself.
    Context manager: starts on enter, stops on exit.
    """

    def __init__(self, simulator: Simulator | None = None, host: str = "127.0.0.1", port: int = 0,
                 latency_ms: Any = None) -> None:
        self.sim = simulator if simulator is not None else Simulator()
        if latency_ms is not None:
            self.sim.set_latency(latency_ms)
        self.host = host
        self.port = int(port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "SimulatorServer":
        if self._httpd is not None:
            return self
        self.sim._wake.clear()
        self._httpd = _HTTPServer((self.host, self.port), self.sim)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hl-sim:{self.port}", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self.sim._wake.set()  # end hangs and latency sleeps
        self.sim._gate.set()
        httpd.shutdown()
        httpd.close_all_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "SimulatorServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __getattr__(self, name: str) -> Any:
        if name == "sim":  # not yet set (during __init__)
            raise AttributeError(name)
        return getattr(self.sim, name)


def start(simulator: Simulator | None = None, host: str = "127.0.0.1", port: int = 0,
          latency_ms: Any = None) -> SimulatorServer:
    """Start a SimulatorServer and return it (call .stop() when done)."""
    return SimulatorServer(simulator, host, port, latency_ms).start()


class SimulatorClient:
    """Drive a simulator in another process through POST /_control (stdlib only).

    ``SimulatorClient(url).call("open_position", address=..., coin="BTC", szi="0.1", entry_px="30000")``
    or ``client.open_position(address=..., ...)`` (keyword arguments only).  Raises SimulatorError on
    {"ok": false}."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        data = _dumps({"op": op, **args})
        req = urllib.request.Request(self.url + "/_control", data=data,
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"null")
        if not isinstance(body, dict) or not body.get("ok"):
            raise SimulatorError((body or {}).get("error", "control call failed"))
        return body.get("result")

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("_") or op not in Simulator.CONTROL_OPS:
            raise AttributeError(op)
        return lambda **args: self.call(op, **args)


# --------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitor.simulator", description="Loopback Hyperliquid simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--url-file", help="write the base URL here once listening")
    parser.add_argument("--state", help="JSON state to load at start (Simulator.load format)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every /info and /exchange")
    args = parser.parse_args(argv)

    sim = Simulator()
    if args.state:
        sim.load_file(args.state)
    server = SimulatorServer(sim, args.host, args.port, latency_ms=args.latency_ms).start()
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.url_file:
        tmp = f"{args.url_file}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(server.url + "\n")
        os.replace(tmp, args.url_file)
    print(f"hyperliquid simulator listening on {server.url}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
