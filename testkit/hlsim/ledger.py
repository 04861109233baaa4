"""The fills ledger: ids, fills, trades and the fill history."""

from __future__ import annotations

import copy
import hashlib
from decimal import ROUND_DOWN, Decimal
from typing import TYPE_CHECKING, Any

from .common import D, SimulatorError, _q, _sig, _sign, fmt
from .state import Order, Position

if TYPE_CHECKING:
    from .state import Account


class LedgerMixin:
    """The Simulator's ledger methods (a mixin of Simulator; the state lives in StateBase)."""

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
        direction: str | None = None,
        fee: Decimal | None = None,
    ) -> dict[str, Any]:
        """Apply one fill of signed size ``delta`` at ``px`` to ``acct`` and record it.  Returns the wire fill.
        ``direction`` / ``fee`` override the computed ``dir`` and fee (liquidation engine, ADL, settlement)."""
        forced_dir, forced_fee = direction, fee
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
        if forced_dir is not None:
            direction = forced_dir.format(kind="Isolated" if lev_type == "isolated" else "Cross",
                                          side="Long" if start > 0 else "Short")
        rate = self.fee_rate if crossed else self.maker_fee_rate
        fee = _q(size * px * rate, 6) if forced_fee is None else forced_fee
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
        liquidation: dict[str, Any] | None = None, leverage: int | None = None, direction: str | None = None,
        fee: Decimal | None = None,
    ) -> list[dict[str, Any]]:
        acct = self._account(address, create=True)
        total = sum(deltas, Decimal(0))
        avg = sum((abs(d) * p for d, p in zip(deltas, prices)), Decimal(0)) / abs(total)
        o = self._external_order(acct, coin, "B" if total > 0 else "A", abs(total), _sig(avg, 8), tif)
        tx = self._next_hash()
        ts = self.now_ms()
        fills = [
            self._fill(acct, coin, d, p, oid=o.oid, tx_hash=tx, liquidation=liquidation, leverage=leverage, ts=ts,
                       direction=direction, fee=fee)
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

    # ---- funding ------------------------------------------------------------------------------

    def pay_funding(self, address: str, coin: str, rate: Any = None, usdc: Any = None, px: Any = None,
                    ts: Any = None) -> dict[str, Any]:
        """One funding payment on the open ``coin`` position, recorded in the account's funding ledger (what
        ``userFunding`` answers) and in its cash.  Signed as the exchange signs it (reference §2.12):
        ``usdc = -szi * px * rate`` (px default the mid), so a long pays a positive rate and a short receives
        it; or give ``usdc`` itself (+ received, - paid).  ``ts`` defaults to now.  Returns the entry."""
        with self._lock:
            acct = self._account(address, create=True)
            pos = acct.positions.get(coin)
            if pos is None:
                raise SimulatorError(f"no open {coin} position for {acct.address}: no funding to pay")
            if (rate is None) == (usdc is None):
                raise SimulatorError("give exactly one of rate and usdc")
            price = D(px, "px") if px is not None else self._mids.get(coin, pos.entry_px)
            if usdc is not None:
                amount = D(usdc, "usdc")
                funding_rate = _q(-amount / (pos.szi * price), 8) if price else Decimal(0)
            else:
                funding_rate = D(rate, "rate")
                amount = _q(-pos.szi * price * funding_rate, 6)
            entry = {
                "time": self.now_ms() if ts is None else int(ts),
                "hash": self._next_hash(),
                "delta": {"type": "funding", "coin": coin, "usdc": fmt(amount), "szi": fmt(pos.szi),
                          "fundingRate": fmt(funding_rate), "nSamples": None},
            }
            acct.funding.append(entry)
            acct.funding.sort(key=lambda e: e["time"])
            acct.cash += amount
            self._bump(acct)
            return copy.deepcopy(entry)

    def funding_ledger(self, address: str, coin: str | None = None) -> list[dict[str, Any]]:
        """The account's funding payments (oldest first), of ``coin`` only if given."""
        with self._lock:
            acct = self._account(address)
            entries = acct.funding if acct else []
            return copy.deepcopy([e for e in entries if coin is None or e["delta"]["coin"] == coin])

    def fills(self, address: str) -> list[dict[str, Any]]:
        """All fills of the account, oldest first."""
        with self._lock:
            acct = self._account(address)
            return copy.deepcopy(acct.fills) if acct else []
