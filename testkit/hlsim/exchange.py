"""The ``POST /exchange`` handlers: actions, orders and signature recovery."""

from __future__ import annotations

import json
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from .common import (
    DESERIALIZE_ERROR,
    Response,
    _addr,
    _decimals,
    _is_addr,
    _json_response,
    _text_response,
    fmt,
)
from .faults import DEFAULT_HANG_S

if TYPE_CHECKING:
    from .state import Account


_APPROVE_AGENT_TYPES = [
    {"name": "hyperliquidChain", "type": "string"},
    {"name": "agentAddress", "type": "address"},
    {"name": "agentName", "type": "string"},
    {"name": "nonce", "type": "uint64"},
]
_EXCHANGE_ACTIONS = {"order", "cancel", "cancelByCloid", "scheduleCancel", "noop", "updateLeverage", "approveAgent"}


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


_SILENTLY_DROPPED: dict[str, Any] = {}  # a HIP-3 order with a cloid under hip3_cloid="silent"


class ExchangeMixin:
    """The Simulator's exchange methods (a mixin of Simulator; the state lives in StateBase)."""

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
            grouping = action.get("grouping")
            statuses = [self._place(acct, w, expires, grouping) for w in action["orders"]]
            self._bump(acct)
            if any(st is _SILENTLY_DROPPED for st in statuses):
                return {"status": "ok", "response": {"type": "default"}}
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
                if o is None or o.status != "open" or self._asset_id(o.coin) != asset:
                    statuses.append({"error": "Order was never placed, already canceled, or filled."})
                else:
                    self._set_status(o, "canceled")
                    statuses.append("success")
            self._bump(acct)
            return {"status": "ok", "response": {"type": "cancel", "data": {"statuses": statuses}}}
        if typ == "updateLeverage":
            asset = action["asset"]
            entry = self._coin_entry(asset)
            if entry is None:
                return {"status": "err", "response": f"Invalid asset: {asset}"}
            coin = entry["name"]
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

    def _place(self, acct: Account, w: dict[str, Any], expires: int | None = None, grouping: Any = None) -> Any:
        a = w["a"]
        u = self._coin_entry(a)  # main dex: the index in meta; HIP-3: 100000 + perp_dex_index * 10000 + index
        if u is None:
            return {"error": f"Invalid asset. asset={a}"}
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
        if cloid and self.dex_of(coin) and self.hip3_cloid == "silent":
            # python-sdk issue #251: a HIP-3 order with a cloid "silently fails - no error returned, order simply
            # doesn't execute". UNCONFIRMED on the wire: modelled as this envelope with no status and no oid
            # (set_config(hip3_cloid="honor") models the other possibility).
            return _SILENTLY_DROPPED
        if cloid and cloid in acct.cloids:
            return {"error": "Order has duplicate cloid."}
        side = "B" if is_buy else "A"
        reduce_only = bool(w["r"])

        def with_cloid(d: dict[str, Any]) -> dict[str, Any]:
            if cloid:
                d["cloid"] = cloid
            return d

        # Reference §5.3 ([DOC] rate limits): "When an order is placed with at least 1000 other open orders by the
        # same user, it will be rejected if it is reduce-only or a trigger order." (status tooManyOpenOrdersRejected)
        if reduce_only or "trigger" in t:
            others = sum(1 for other in acct.orders.values() if other.status == "open")
            if others >= self.open_order_limit:
                o = self._new_order(acct, coin, side, px, sz, cloid, reduce_only, None if "trigger" in t else
                                    t["limit"]["tif"], is_trigger="trigger" in t)
                o.expires_after = expires
                self._set_status(o, "tooManyOpenOrdersRejected")
                return {"error": f"{self.open_order_limit_error} asset={a}"}

        if "trigger" in t:
            trig = t["trigger"]
            o = self._new_order(acct, coin, side, px, sz, cloid, reduce_only, None, is_trigger=True,
                                trigger_px=Decimal(str(trig["triggerPx"])), tpsl=trig.get("tpsl"),
                                is_market=bool(trig.get("isMarket", True)),
                                position_tpsl=grouping == "positionTpsl")
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
