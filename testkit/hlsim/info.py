"""The ``POST /info`` handlers and the clearinghouse rendering."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .common import (
    DESERIALIZE_ERROR,
    Response,
    _addr,
    _dumps,
    _is_addr,
    _json_response,
    _q,
    _text_response,
    fmt,
)
from .state import _Version

if TYPE_CHECKING:
    from .faults import Fault
    from .state import Position


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


FUNDING_PAGE_LIMIT = 500  # userFunding items per answer


class _BadRequest(Exception):
    pass


class _UnknownType(Exception):
    pass


class _UnknownDex(Exception):
    pass


# Requests that take a "dex" (reference §9.2); the simulator answers an unknown one with HTTP 500.
_INFO_TAKES_DEX = {"clearinghouseState", "openOrders", "frontendOpenOrders", "allMids", "meta"}


class InfoMixin:
    """The Simulator's info methods (a mixin of Simulator; the state lives in StateBase)."""

    # ---- clearinghouse rendering --------------------------------------------------------------

    def _max_lev(self, coin: str) -> int:
        idx = self._asset_index(coin)
        return int(self._universe_of(coin)[idx].get("maxLeverage", 50)) if idx is not None else 50

    def _mark(self, coin: str, pos: Position) -> Decimal:
        return self._mids.get(coin, pos.entry_px)

    def _account_value(self, positions: dict[str, Position], cash: Decimal) -> Decimal:
        return cash + sum((p.szi * (self._mark(c, p) - p.entry_px) for c, p in positions.items()), Decimal(0))

    def _clearinghouse(self, positions: dict[str, Position], cash: Decimal) -> dict[str, Any]:
        order = {u["name"]: i for i, u in enumerate(self._universe)}
        for universe in self._dex_universes.values():
            order.update({u["name"]: i for i, u in enumerate(universe)})
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
        if dex and typ in _INFO_TAKES_DEX and self._dex_index(dex) is None:
            raise _UnknownDex()  # an unknown dex: HTTP 500 ([3P] python-sdk PR #288); never "no positions"
        if typ == "clearinghouseState":
            view = self._view(user, fault)
            # One dex per answer: the main dex's positions, or one HIP-3 dex's (its own margin account; the
            # simulator gives it no collateral of its own).
            positions = {c: p for c, p in view.positions.items() if self.dex_of(c) == dex}
            if fault is not None and fault.kind == "empty":
                positions = {}
            return self._clearinghouse(positions, view.cash if not dex else Decimal(0))
        if typ in ("userFills", "userFillsByTime"):
            n = self._view(user, fault).n_fills
            fills = acct.fills[:n] if acct else []
            if self.same_ms_order == "reversed":  # each millisecond's fills listed last first (still by time)
                fills = sorted(reversed(fills), key=lambda f: f["time"])
            if typ == "userFills":
                # Newest first, but fills that share a millisecond in the order they happened (oldest first), as
                # a recorded mainnet answer lists them (monitor/fills.py): a stable sort on time, not a reversal.
                return copy.deepcopy(sorted(fills[-2000:], key=lambda f: -f["time"]))
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
            if not acct:
                return []
            live = sorted((o for o in acct.orders.values() if o.status == "open" and self.dex_of(o.coin) == dex),
                          key=lambda o: -o.oid)
            return [o.open_order() if typ == "openOrders" else o.frontend() for o in live]
        if typ == "allMids":
            # One dex's mids, under the coins' full names ("xyz:TSLA").
            return {c: fmt(p) for c, p in sorted(self._mids.items()) if self.dex_of(c) == dex}
        if typ == "meta":
            return {"universe": copy.deepcopy(self._universe if not dex else self._dex_universes[dex])}
        if typ == "spotMeta":
            return {"universe": [], "tokens": []}
        if typ == "perpDexs":
            return [None, *copy.deepcopy(self._perp_dexes)]
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
            # startTime required, endTime optional, both inclusive; oldest first; at most 500 items (the
            # generic time-range cap, reference §2.12; the real cap and order for userFunding: UNCONFIRMED).
            # Covers every coin of the account (whether it covers HIP-3 dexes on the real exchange: UNCONFIRMED).
            start = body.get("startTime")
            end = body.get("endTime")
            if not isinstance(start, int) or isinstance(start, bool):
                raise _BadRequest()
            if end is not None and (not isinstance(end, int) or isinstance(end, bool)):
                raise _BadRequest()
            entries = acct.funding if acct else []
            window = [e for e in entries if e["time"] >= start and (end is None or e["time"] <= end)]
            return copy.deepcopy(window[:FUNDING_PAGE_LIMIT])
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
            if user in self._vaults:
                return {"role": "vault"}
            return {"role": "user"} if user in self._accounts else {"role": "missing"}
        raise _UnknownType()

    def handle_info(self, raw: bytes) -> Response:
        """Serve one POST /info body (also used by the HTTP handler)."""
        return self._handle("/info", self._serve_info, raw, weight=0, gated=True)

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
        fault = self._take_fault("/info", typ, user, dex=body.get("dex") or "")
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
        except _UnknownDex:
            return _text_response("Internal Server Error", 500)
        if typ in _INFO_WEIGHT_PER_ITEM and isinstance(payload, list):
            # "+1 per 20 items returned" ([DOC] rate limits); the rounding is UNCONFIRMED: a simulator choice,
            # ceil (the larger reading, what the monitor budgets). Charged to the limiter after the answer is
            # built, like the docs' wording suggests: an answer is never refused for its own surcharge, but
            # the requests after it see the weight spent.
            extra = -(-len(payload) // 20)
            entry["weight"] = base_weight + extra
            self._charge_weight(extra)
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
