"""Hyperliquid, through hyperliquid-python-sdk: the only module that talks to the exchange.

Reads never guess. Any error, timeout, 429, non-JSON or schema-invalid body becomes
``ReadFailed`` ("unknown"), never an empty account. The SDK is imported lazily (it pulls in
eth-account), and its ``Info`` is built with ``skip_ws=True`` and a given ``meta``/``spot_meta``
so construction makes no request. Every request has a timeout.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Iterable

from monitor.models import (
    AccountSnapshot,
    ExchangeDataError,
    ExchangePosition,
    Fill,
    parse_coin,
    parse_decimal,
)

log = logging.getLogger(__name__)

FILLS_PAGE_LIMIT = 2000  # the exchange's maximum fills per userFillsByTime answer
FILLS_MAX_PAGES = 5  # the exchange keeps only the 10,000 most recent fills
EMPTY_SPOT_META = {"universe": [], "tokens": []}

# Request weights (Hyperliquid docs, rate limits): what each read costs from the per-IP budget.
WEIGHT = {"clearinghouseState": 2, "allMids": 2, "orderStatus": 2, "meta": 20, "frontendOpenOrders": 20,
          "openOrders": 20, "userFillsByTime": 20, "exchange": 1}


class ReadFailed(Exception):
    """A read whose answer is unknown: nothing may be concluded from it."""

    def __init__(self, what: str, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason
        self.rate_limited = retry_after is not None
        self.retry_after = retry_after


def parse_clearinghouse_state(body: Any, address: str) -> AccountSnapshot:
    """Validate a clearinghouseState body and return the open positions it lists."""
    if not isinstance(body, dict):
        raise ExchangeDataError(f"expected an object, got {type(body).__name__}")
    if "error" in body and "assetPositions" not in body:
        raise ExchangeDataError(f"error body: {str(body['error'])[:80]}")
    asset_positions = body.get("assetPositions")
    if not isinstance(asset_positions, list):
        raise ExchangeDataError("assetPositions missing or not a list")
    positions: dict[str, ExchangePosition] = {}
    for index, item in enumerate(asset_positions):
        if not isinstance(item, dict) or not isinstance(item.get("position"), dict):
            raise ExchangeDataError(f"assetPositions[{index}] has no position object")
        raw = item["position"]
        coin = parse_coin(raw.get("coin"), f"assetPositions[{index}].coin")
        szi = parse_decimal(raw.get("szi"), f"{coin}.szi")
        entry_raw = raw.get("entryPx")
        entry = None if entry_raw is None else parse_decimal(entry_raw, f"{coin}.entryPx")
        if szi == 0:
            continue  # a closed position may be listed with size zero
        if coin in positions:
            raise ExchangeDataError(f"{coin} listed twice")
        positions[coin] = ExchangePosition(coin=coin, side="long" if szi > 0 else "short", size=abs(szi),
                                           entry_price=entry)
    server_time = body.get("time")
    if server_time is not None and (isinstance(server_time, bool) or not isinstance(server_time, int)):
        raise ExchangeDataError("time is not an integer")
    return AccountSnapshot(address=address, positions=positions, server_time_ms=server_time)


def parse_mids(body: Any) -> dict[str, Decimal]:
    if not isinstance(body, dict) or "error" in body:
        raise ExchangeDataError("allMids: expected an object of coin -> price")
    mids: dict[str, Decimal] = {}
    for coin, price in body.items():
        try:
            mids[parse_coin(coin)] = parse_decimal(price, f"mid {coin}")
        except ExchangeDataError:
            continue  # one odd entry (spot names, an empty book) does not spoil the others
    return mids


@dataclass
class RequestCounter:
    """Counts requests and their rate-limit weight, across threads."""

    requests: int = 0
    weight: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, weight: int) -> None:
        with self._lock:
            self.requests += 1
            self.weight += weight
            self.by_type[kind] = self.by_type.get(kind, 0) + 1


class Exchange:
    """Reads (and, with a key, writes) for one run. Not shared between threads: make one per worker."""

    def __init__(self, base_url: str, *, timeout: float, counter: RequestCounter | None = None,
                 before_request: Callable[[str, int], None] | None = None) -> None:
        from hyperliquid.info import Info  # heavy import, deferred to the first run that reads

        self.base_url = base_url
        self.timeout = timeout
        self.counter = counter or RequestCounter()
        self.before_request = before_request
        self.info = Info(base_url, skip_ws=True, meta={"universe": []}, spot_meta=EMPTY_SPOT_META, timeout=timeout)

    def _post(self, what: str, payload: dict[str, Any], weight: int) -> Any:
        """POST /info through the SDK, turning every kind of failure into ReadFailed."""
        import requests
        from hyperliquid.utils.error import ClientError, ServerError

        if self.before_request is not None:
            self.before_request(what, weight)
        self.counter.add(payload.get("type", what), weight)
        try:
            body = self.info.post("/info", payload)
        except ClientError as exc:
            if exc.status_code == 429:
                raise ReadFailed(what, "rate limited (HTTP 429)", retry_after=1.0) from None
            raise ReadFailed(what, f"HTTP {exc.status_code}") from None
        except ServerError as exc:
            raise ReadFailed(what, f"HTTP {exc.status_code}") from None
        except requests.Timeout:
            raise ReadFailed(what, f"timed out after {self.timeout:g}s") from None
        except requests.RequestException as exc:
            raise ReadFailed(what, f"connection failed ({type(exc).__name__})") from None
        except (KeyError, ValueError) as exc:  # SDK: a 4xx JSON body without "code"
            raise ReadFailed(what, f"unexpected error body ({type(exc).__name__})") from None
        if isinstance(body, dict) and set(body) == {"error"}:
            raise ReadFailed(what, "answer is not JSON")
        return body

    def read_positions(self, address: str) -> AccountSnapshot:
        body = self._post("clearinghouseState", {"type": "clearinghouseState", "user": address, "dex": ""},
                          WEIGHT["clearinghouseState"])
        try:
            return parse_clearinghouse_state(body, address)
        except ExchangeDataError as exc:
            raise ReadFailed("clearinghouseState", f"invalid answer ({exc})") from None

    def read_fills(self, address: str, since_ms: int, until_ms: int | None = None) -> list[Fill]:
        """Every fill of the account from ``since_ms`` (inclusive), paged and deduplicated."""
        from monitor.fills import dedupe_fills, parse_fills

        collected: list[Fill] = []
        start = since_ms
        for _ in range(FILLS_MAX_PAGES):
            body = self._post(
                "userFillsByTime",
                {"type": "userFillsByTime", "user": address, "startTime": start, "endTime": until_ms,
                 "aggregateByTime": False},
                WEIGHT["userFillsByTime"],
            )
            try:
                page = parse_fills(body)
            except ExchangeDataError as exc:
                raise ReadFailed("userFillsByTime", f"invalid answer ({exc})") from None
            collected.extend(page)
            if len(page) < FILLS_PAGE_LIMIT:
                return dedupe_fills(collected)
            newest = max(f.time_ms for f in page)
            if newest <= start:  # a full page within one millisecond: cannot page further safely
                raise ReadFailed("userFillsByTime", "more fills in one millisecond than one page holds")
            start = newest  # inclusive: the boundary fills come back and are deduplicated
        raise ReadFailed("userFillsByTime", f"more than {FILLS_MAX_PAGES * FILLS_PAGE_LIMIT} fills in the window")

    def read_mids(self) -> dict[str, Decimal]:
        body = self._post("allMids", {"type": "allMids", "dex": ""}, WEIGHT["allMids"])
        try:
            return parse_mids(body)
        except ExchangeDataError as exc:
            raise ReadFailed("allMids", f"invalid answer ({exc})") from None


def addresses_in(snapshots: Iterable[AccountSnapshot]) -> list[str]:
    return [s.address for s in snapshots]
