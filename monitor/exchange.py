"""Hyperliquid, through hyperliquid-python-sdk: the only module that talks to the exchange.

Reads never guess. Any error, timeout, 429, non-JSON or schema-invalid body becomes
``ReadFailed`` ("unknown"), never an empty account. The SDK is imported lazily (it pulls in
eth-account), and its ``Info`` is built with ``skip_ws=True`` and a given ``meta``/``spot_meta``
so construction makes no request. Every request has a timeout.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Callable, Iterable, Iterator

from monitor.clock import Clock, ExchangeClock
from monitor.models import (
    MAIN_DEX,
    AccountSnapshot,
    ExchangeDataError,
    ExchangePosition,
    Fill,
    FundingPayment,
    dex_of,
    parse_coin,
    parse_decimal,
)

log = logging.getLogger(__name__)

FILLS_PAGE_LIMIT = 2000  # the exchange's maximum fills per userFillsByTime answer
FILLS_HISTORY = 10_000  # the exchange keeps only the 10,000 most recent fills of a user
FILLS_MAX_REQUESTS = 24  # requests one fills read may make (a full page costs 120 weight)
FILLS_SPAN_AIM = 1200  # fills a span back from now aims at: well under a page, so few come back capped
# The most weight one fills read may spend, as a share of the run's budget (the runner sets it; per-item
# surcharge included): a window near or past the exchange's history costs 600 to 900 weight to read whole
# (10,000 fills are 500 of surcharge alone), and up to 24 pages of 120 when the search meets capped answers,
# more than a run's budget: such an account would be read every run and never finish, its exit work starved.
# A further page is read only while this read's weight plus a full page's (120) stays within the cap; past
# it the read is truncated like one past the history (the most recent part, read first, is used).
FILLS_MAX_READ_SHARE = (3, 5)
EMPTY_SPOT_META: dict[str, list[Any]] = {"universe": [], "tokens": []}
FUNDING_PAGE_LIMIT = 500  # time-range info answers are capped at 500 elements (reference §2.12)
FUNDING_MAX_REQUESTS = 10  # pages one funding read may make; more: the read fails (funding stays unknown)

# Request weights (Hyperliquid docs, rate limits; reference §5.1): what each request costs from the per-IP
# budget before its answer is known (the base).
WEIGHT = {"clearinghouseState": 2, "allMids": 2, "orderStatus": 2, "meta": 20, "frontendOpenOrders": 20,
          "openOrders": 20, "userFillsByTime": 20, "userFills": 20, "historicalOrders": 20, "userFunding": 20,
          "userRole": 60, "exchange": 1, "perpDexs": 20}
HIP3_ASSET_BASE = 100_000  # a HIP-3 asset id: 100000 + perp_dex_index * 10000 + index_in_meta (docs, asset-ids)
HIP3_DEX_STRIDE = 10_000
# Requests the docs charge "additional rate limit weight per 20 items returned" on top of the base (reference
# §5.1: userFills, userFillsByTime, historicalOrders, userFunding, ...; l2Book and allMids have none). The
# rounding is not documented (UNCONFIRMED): counted as ceil(items / 20), the larger reading, so a run never
# thinks it spent less than the exchange counts. A full 2,000-fill page: 20 + 100 = 120.
PER_ITEM_WEIGHT = frozenset({"userFills", "userFillsByTime", "historicalOrders", "userFunding", "recentTrades",
                             "fundingHistory", "nonUserFundingUpdates", "twapHistory", "userTwapSliceFills",
                             "userTwapSliceFillsByTime", "delegatorHistory", "delegatorRewards", "validatorStats"})
ITEMS_PER_WEIGHT = 20
MAX_ITEM_SURCHARGE = 100  # the most one answer adds: a full page of 2,000 fills (or orders)


def item_surcharge(kind: str, body: Any) -> int:
    """The weight an answer adds after the fact: 1 per 20 items (rounded up) of a per-item request's list."""
    if kind not in PER_ITEM_WEIGHT or not isinstance(body, list):
        return 0
    return -(-len(body) // ITEMS_PER_WEIGHT)

# Rejections of a signed action that mean "this key may not act here" (reference §3.5: a revoked or unknown
# agent, an unfunded signer, a vaultAddress the key does not control). Matched as substrings, lowercase.
AUTHORIZATION_ERRORS = ("user or api wallet", "must deposit before performing actions", "not authorized",
                        "unauthorized", "not approved")
# Rejections that a stale szDecimals (a cached ``meta``) would explain.
META_ERRORS = ("invalid size", "invalid price", "divisible by tick size")
# The 1,000-open-orders rule (reference §5.3, [DOC] rate-limits-and-user-limits): "When an order is placed with
# at least 1000 other open orders by the same user, it will be rejected if it is reduce-only or a trigger order."
# Its order status is ``tooManyOpenOrdersRejected`` ([TS], "Rejected due to exceeding the open order limit"); the
# error text inside ``statuses[i].error`` is UNCONFIRMED, so these fragments of the known names are matched,
# lowercase, anywhere in it (never "too many cumulative requests", the address-based limit of §5.2).
OPEN_ORDER_LIMIT = 1000  # "at least 1000 other open orders": whatever the account's own (higher) cap is
OPEN_ORDER_LIMIT_ERRORS = ("toomanyopenorders", "too many open orders", "open order limit", "open orders limit",
                           "exceeding the open order", "exceeds the open order", "max open orders",
                           "maximum open orders", "1000 open orders", "1000 other open orders")


def is_authorization_error(text: str | None) -> bool:
    """Whether an /exchange refusal says the key may not act for the account (so a cached role is wrong)."""
    return text is not None and any(marker in text.lower() for marker in AUTHORIZATION_ERRORS)


def is_open_order_limit_error(text: str | None) -> bool:
    """Whether an order was refused because the account has 1,000 or more open orders (reference §5.3)."""
    return text is not None and any(marker in text.lower() for marker in OPEN_ORDER_LIMIT_ERRORS)


def is_meta_error(text: str | None) -> bool:
    return text is not None and any(marker in text.lower() for marker in META_ERRORS)


def _is_unparsed(body: Any) -> bool:
    """The SDK's stand-in for a 2xx body that was not JSON: {"error": "Could not parse JSON: ..."}."""
    return isinstance(body, dict) and set(body) == {"error"}


def printable(text: str) -> str:
    """The exchange's own words made safe for one log line and a PostgreSQL text column: control
    characters (a NUL among them, which PostgreSQL refuses) are written as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ReadFailed(Exception):
    """A read whose answer is unknown: nothing may be concluded from it."""

    def __init__(self, what: str, reason: str, *, retry_after: float | None = None) -> None:
        reason = printable(reason)
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason
        self.rate_limited = retry_after is not None
        self.retry_after = retry_after


FILLS_REREAD_MARGIN_MS = 60_000  # a second read of one account's fills in a run starts this far before the first


@dataclass(frozen=True)
class CachedFills:
    since_ms: int
    read_at_ms: int  # this host's clock when the read began
    fills: list[Fill]
    truncated: bool


class FillsCache:
    """Fills read this run, per account, shared by the run's threads (each run starts with an empty one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_address: dict[str, CachedFills] = {}

    def get(self, address: str) -> CachedFills | None:
        with self._lock:
            return self._by_address.get(address)

    def put(self, address: str, entry: CachedFills) -> None:
        with self._lock:
            self._by_address[address] = entry


class FillsTruncated(ReadFailed):
    """The window reaches past the fills the exchange keeps (or past what one read may fetch).

    ``fills`` holds the most recent part of the window that was read completely, oldest first: a close or
    a flip near the present is still explained from them."""

    def __init__(self, what: str, reason: str, fills: list[Fill] | None = None) -> None:
        super().__init__(what, reason)
        self.fills = fills or []


def parse_clearinghouse_state(body: Any, address: str, dex: str = MAIN_DEX) -> AccountSnapshot:
    """Validate a clearinghouseState body (of perp dex ``dex``) and return the open positions it lists."""
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
        if dex and dex_of(coin) != dex:  # one HIP-3 dex per answer: another's coin means we misread something
            raise ExchangeDataError(f"{coin} in the answer for dex {dex!r}")
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
    return AccountSnapshot(address=address, positions=positions, server_time_ms=server_time,
                           dexes_read=frozenset({dex}))


def parse_mids(body: Any, dex: str = MAIN_DEX) -> dict[str, Decimal]:
    """allMids of one perp dex. A HIP-3 dex's mids are keyed by the full name (``xyz:TSLA``); a bare name in
    such an answer is taken as that dex's coin only when no name carries the prefix, and another dex's name
    is ignored."""
    if not isinstance(body, dict) or "error" in body:
        raise ExchangeDataError("allMids: expected an object of coin -> price")
    mids: dict[str, Decimal] = {}
    # Bare names stand for this dex's coins only in an answer that names none with the prefix: where both
    # appear, a bare name may be the first dex's coin (the key format is UNCONFIRMED), never a HIP-3 mid.
    prefixed = bool(dex) and any(isinstance(k, str) and k.startswith(f"{dex}:") for k in body)
    for coin, price in body.items():
        try:
            mid = parse_decimal(price, f"mid {coin}")
            name = parse_coin(coin)
            if dex and ":" not in name:
                if prefixed:
                    continue
                name = f"{dex}:{name}"
            if dex and dex_of(name) != dex:
                continue
            if mid > 0:  # a zero or negative mid would fire rules and price orders absurdly
                mids[name] = mid
        except ExchangeDataError:
            continue  # one odd entry (spot names, an empty book) does not spoil the others
    return mids


def parse_perp_dexs(body: Any) -> list[str]:
    """perpDexs: the dex names by perp_dex_index ("" first: the main dex). An entry's position is its identity
    (asset ids are numbered from it), so an entry that cannot be read fails the whole answer."""
    if not isinstance(body, list) or not body or body[0] is not None:
        raise ExchangeDataError("perpDexs: expected a list starting with null (the first perp dex)")
    names = [MAIN_DEX]
    for index, item in enumerate(body[1:], start=1):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name or ":" in name or len(name) > 32 or name in names:
            raise ExchangeDataError(f"perpDexs[{index}]: no usable name")
        names.append(parse_coin(name, f"perpDexs[{index}].name"))
    return names


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

    def add_surcharge(self, kind: str, weight: int) -> None:
        """The per-item part of a request already counted (known only once its answer is in)."""
        with self._lock:
            self.weight += weight


class BudgetExhausted(Exception):
    """The run's API weight budget cannot pay for this request; the work waits for the next run."""


class WeightBudget:
    """A run's share of the per-IP rate limit (1200 weight/minute), shared by every thread of the run.

    Part of it may be held back for the run's exit work (``hold``): while held, ``take`` never dips
    into it, so reads cannot starve a fired rule's order. ``open_reserve`` releases it when the run
    turns to its closes, which then draw from the reserve and whatever the reads left.

    A request is charged what the exchange charges it, in two steps: its base weight before it is sent
    (``take``: can the run afford it? If not, BudgetExhausted and nothing is sent), and the per-item part
    of a fills (or other per-item) answer once the answer is in (``charge``: always charged, it is spent).
    So that the surcharge cannot take the run past its budget, a per-item read of an account without exit
    work (in the read phase) is sent only when the budget can also pay the largest surcharge an answer can
    carry (``MAX_ITEM_SURCHARGE``), and that much is held for it while it is in flight (``pending``) so
    parallel reads cannot all count on the same weight; such an account otherwise waits a run. Exit work
    (an urgent account's reads, the closer after ``open_reserve``) is checked on its base only: the reserve
    already counts a plausible surcharge, and a fired rule's order must not wait for a worst case. Only its
    surcharge beyond that plan can take ``spent`` past ``limit``; every later ``take`` then finds nothing.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0
        self.reserved = 0
        self.pending = 0  # worst-case surcharges held for per-item reads in flight
        self.reading = True  # the read phase (until open_reserve)
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # an answer in flight was charged: pending went down
        self._local = threading.local()

    @contextmanager
    def urgent(self, flag: bool = True) -> Iterator[None]:
        """Reads of an account with exit work (the reserve counts them) draw on the reserve, on this thread."""
        previous = getattr(self._local, "urgent", False)
        self._local.urgent = flag
        try:
            yield
        finally:
            self._local.urgent = previous

    def hold(self, weight: int) -> int:
        """Hold ``weight`` back from reads (at most what is left); returns what is held."""
        with self._lock:
            self.reserved = max(0, min(weight, self.limit - self.spent))
            return self.reserved

    def open_reserve(self) -> None:
        with self._lock:
            self.reserved = 0
            self.reading = False

    def take(self, kind: str, weight: int) -> None:
        with self._lock:
            if getattr(self._local, "pending", 0):  # a new request on this thread: its last one is done
                self.pending -= self._local.pending
                self._settled.notify_all()
            self._local.pending = 0
            urgent = getattr(self._local, "urgent", False)
            if urgent and self.reserved and weight <= self.limit - self.spent - self.pending:
                self.spent += weight
                self.reserved = max(0, self.reserved - weight)
                return
            worst = MAX_ITEM_SURCHARGE if self.reading and not urgent and kind in PER_ITEM_WEIGHT else 0
            available = self.limit - self.reserved - self.spent - self.pending
            while weight + worst > available and self.pending:
                # Only the worst cases held for answers in flight stand in the way: wait for them to be
                # charged (they come back well under it, as a rule) rather than defer an account for nothing.
                self._settled.wait(timeout=1.0)
                available = self.limit - self.reserved - self.spent - self.pending
            if weight + worst > available:
                held = f", {self.reserved} held for exit work" if self.reserved else ""
                what = f"{weight} (+{worst} for the answer's items)" if worst else f"{weight}"
                raise BudgetExhausted(f"{kind} needs {what}, {max(available, 0)} of {self.limit} left{held}")
            self.spent += weight
            self.pending += worst
            self._local.pending = worst

    def charge(self, kind: str, weight: int) -> None:
        """The per-item part of an answer (0 when it failed): already spent on the exchange, so never
        refused; the worst case held for it is let go. An urgent thread's surcharge comes out of the reserve
        it drew the base from."""
        with self._lock:
            if getattr(self._local, "pending", 0):
                self.pending -= self._local.pending
                self._local.pending = 0
                self._settled.notify_all()
            if weight <= 0:
                return
            self.spent += weight
            if getattr(self._local, "urgent", False) and self.reserved:
                self.reserved = max(0, self.reserved - weight)


class Exchange:
    """Reads (and, with a key, writes) for one run. Not shared between threads: make one per worker."""

    def __init__(self, base_url: str, *, timeout: float, counter: RequestCounter | None = None,
                 before_request: Callable[[str, int], None] | None = None,
                 after_response: Callable[[str, int], None] | None = None,
                 fills_cache: FillsCache | None = None, exchange_clock: ExchangeClock | None = None,
                 fills_max_weight: int | None = None) -> None:
        from hyperliquid.info import Info  # heavy import, deferred to the first run that reads

        self.fills_cache = fills_cache
        self.base_url = base_url
        self.timeout = timeout
        self.counter = counter or RequestCounter()
        self.before_request = before_request  # the base weight, before sending (may refuse: BudgetExhausted)
        self.after_response = after_response  # the per-item part, once the answer is in
        self.exchange_clock = exchange_clock  # learns the exchange's clock from clearinghouseState's `time`
        self.fills_max_weight = fills_max_weight
        self._sent_ms = self._received_ms = 0
        self.info = Info(base_url, skip_ws=True, meta={"universe": []}, spot_meta=EMPTY_SPOT_META, timeout=timeout)

    def _local_ms(self) -> int:
        return self.exchange_clock.local_ms() if self.exchange_clock is not None else Clock().now_ms()

    def _post(self, what: str, payload: dict[str, Any], weight: int) -> Any:
        """POST /info through the SDK, turning every kind of failure into ReadFailed. The base ``weight`` is
        charged before the request, the per-item part (``item_surcharge``) after a list answer."""
        kind = payload.get("type", what)
        if self.before_request is not None:
            self.before_request(what, weight)
        self.counter.add(kind, weight)
        self._sent_ms = self._local_ms()
        try:
            body = self._ask(what, kind, payload)
        finally:
            self._received_ms = self._local_ms()
        if _is_unparsed(body):
            raise ReadFailed(what, "answer is not JSON")
        return body

    def _ask(self, what: str, kind: str, payload: dict[str, Any]) -> Any:
        """The request itself; the per-item part of its answer is charged (0 for a failed one, which lets the
        budget's worst case for it go)."""
        import requests
        from hyperliquid.utils.error import ClientError, ServerError

        extra = 0
        try:
            body = self.info.post("/info", payload)  # timeout: given to Info() at construction
            extra = item_surcharge(kind, body)
            if extra:
                self.counter.add_surcharge(kind, extra)
            return body
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
        except (KeyError, ValueError, AttributeError, TypeError) as exc:
            # The SDK indexes a 4xx JSON body as an object: one without "code", or not an object at all.
            raise ReadFailed(what, f"unexpected error body ({type(exc).__name__})") from None
        finally:
            if self.after_response is not None and kind in PER_ITEM_WEIGHT:
                self.after_response(what, extra)

    def read_positions(self, address: str, dex: str = MAIN_DEX) -> AccountSnapshot:
        what = "clearinghouseState" if not dex else f"clearinghouseState({dex})"
        body = self._post(what, {"type": "clearinghouseState", "user": address, "dex": dex},
                          WEIGHT["clearinghouseState"])
        try:
            snapshot = parse_clearinghouse_state(body, address, dex)
        except ExchangeDataError as exc:
            raise ReadFailed(what, f"invalid answer ({exc})") from None
        if snapshot.server_time_ms is not None and self.exchange_clock is not None:
            self.exchange_clock.observe(snapshot.server_time_ms, self._sent_ms, self._received_ms)
        return snapshot

    def read_perp_dexs(self) -> list[str]:
        """The perp dexes by index ("" = the main dex), weight 20."""
        body = self._post("perpDexs", {"type": "perpDexs"}, WEIGHT["perpDexs"])
        try:
            return parse_perp_dexs(body)
        except ExchangeDataError as exc:
            raise ReadFailed("perpDexs", f"invalid answer ({exc})") from None

    def read_fills(self, address: str, since_ms: int, until_ms: int | None = None) -> list[Fill]:
        """Every fill of the account from ``since_ms`` (inclusive) until now, deduplicated, oldest first.

        Within one run, an account whose fills were read already (for at least this window) is read again
        only from shortly before that read (``FILLS_REREAD_MARGIN_MS``, for clock differences and fills
        that show up late): a close order's own fills cost about one request, not the whole window again.
        """
        import time as _time

        from monitor.fills import dedupe_fills

        cache = self.fills_cache if until_ms is None else None
        cached = cache.get(address) if cache is not None else None
        read_at = int(_time.time() * 1000)
        if cached is None or cached.since_ms > since_ms:
            try:
                fills = self._read_fills(address, since_ms, until_ms)
            except FillsTruncated as exc:
                if cache is not None:
                    cache.put(address, CachedFills(since_ms, read_at, exc.fills, True))
                raise
            if cache is not None:
                cache.put(address, CachedFills(since_ms, read_at, fills, False))
            return fills
        # A host clock more than the margin off the exchange's could start it after a new fill: the row then
        # waits for the next run, whose own full read settles it (never a wrong figure, only later).
        start = max(since_ms, cached.read_at_ms - FILLS_REREAD_MARGIN_MS)
        truncated = cached.truncated
        try:
            newer = self._read_fills(address, start, None)
        except FillsTruncated as exc:
            newer, truncated = exc.fills, True
        merged = dedupe_fills([*cached.fills, *newer])
        cache.put(address, CachedFills(cached.since_ms, read_at, merged, truncated))  # type: ignore[union-attr]
        window = [f for f in merged if f.time_ms >= since_ms]
        if truncated:
            raise FillsTruncated("userFillsByTime", "the window reaches past the exchange's fill history;"
                                 " the most recent part is used", window)
        return window

    def _read_fills(self, address: str, since_ms: int, until_ms: int | None = None) -> list[Fill]:
        """Every fill of the account from ``since_ms`` (inclusive) until now, deduplicated, oldest first.

        One request when the window holds less than a page (the usual case). A capped answer (2,000 fills)
        is never trusted to be the window's oldest or newest part (the order of a capped page is
        UNCONFIRMED): the window is then read back from its end in spans whose answers are shorter than a
        page, so the most recent fills, where a close or a flip is, come first. When the fills read reach
        the exchange's 10,000-fill history (anything older is gone) or the request cap, ``FillsTruncated``
        carries the recent part that was read.
        """
        import time as _time

        from monitor.fills import dedupe_fills

        first = self._fills_page(address, since_ms, until_ms)
        if len(first) < FILLS_PAGE_LIMIT:
            return dedupe_fills(first)
        full_page = WEIGHT["userFillsByTime"] + item_surcharge("userFillsByTime", [None] * FILLS_PAGE_LIMIT)
        spent = WEIGHT["userFillsByTime"] + item_surcharge("userFillsByTime", first)
        # The first span back ends "now" by the exchange's clock (endTime null); later ones end where the
        # previous one started, so no fill is read twice and none is skipped.
        now = self.exchange_clock.now_ms() if self.exchange_clock is not None else int(_time.time() * 1000)
        end = until_ms if until_ms is not None else now
        open_end = until_ms is None
        times = [f.time_ms for f in first]
        span = max(1, (max(times) - min(times)) * FILLS_SPAN_AIM // FILLS_PAGE_LIMIT)
        known = set(times)  # times at which fills exist (seen in capped answers): empty stretches are skipped
        collected: list[Fill] = []
        requests = 1
        if open_end:
            # The newest fills first, in one request whatever the window's density: userFills answers the
            # account's 2,000 most recent fills ([DOC] info-endpoint; reference §2.2), so the close or flip
            # near the present is in hand before any weight goes into searching the rest of the window.
            latest = self._latest_fills(address)
            requests += 1
            spent += WEIGHT["userFills"] + item_surcharge("userFills", latest)
            if not latest:
                raise ReadFailed("userFills", "no fills, while a page of the window was full")
            latest_times = [f.time_ms for f in latest]
            oldest = min(latest_times)
            if len(latest) < FILLS_PAGE_LIMIT or oldest < since_ms:
                return dedupe_fills([f for f in latest if f.time_ms >= since_ms])  # the whole window
            # The oldest millisecond of the answer may hold more fills than it shows: read again below.
            collected = [f for f in latest if f.time_ms > oldest]
            known.update(latest_times)
            end, open_end = oldest, False
            span = max(1, (max(latest_times) - oldest) * FILLS_SPAN_AIM // FILLS_PAGE_LIMIT)
        while end >= since_ms:
            if requests >= FILLS_MAX_REQUESTS:
                raise FillsTruncated("userFillsByTime", f"more fills in the window than {FILLS_MAX_REQUESTS}"
                                     " requests read; the most recent part is used", dedupe_fills(collected))
            if self.fills_max_weight is not None and spent + full_page > self.fills_max_weight:
                raise FillsTruncated("userFillsByTime", f"more fills in the window than one read may spend"
                                     f" ({self.fills_max_weight} weight); the most recent part is used",
                                     dedupe_fills(collected))
            start = max(since_ms, end - span + 1)
            page = self._fills_page(address, start, None if open_end else end)
            requests += 1
            spent += WEIGHT["userFillsByTime"] + item_surcharge("userFillsByTime", page)
            if len(page) >= FILLS_PAGE_LIMIT:
                if start == end and open_end:
                    raise ReadFailed("userFillsByTime", "a page of fills is newer than this host's clock"
                                     " (is the clock behind the exchange's?)")
                if start == end:
                    raise ReadFailed("userFillsByTime", "more fills in one millisecond than one page holds")
                times = [f.time_ms for f in page]
                known.update(times)
                # whatever part of the span a capped answer holds, its 2,000 fills lie within max-min
                span = max(1, min((end - start + 1) // 2,
                                  (max(times) - min(times)) * FILLS_SPAN_AIM // FILLS_PAGE_LIMIT))
                continue
            collected.extend(page)
            open_end = False
            if len(collected) >= FILLS_HISTORY:
                raise FillsTruncated("userFillsByTime", f"the window reaches past the exchange's {FILLS_HISTORY:,}"
                                     "-fill history; the most recent part is used", dedupe_fills(collected))
            end = start - 1
            # Aim the next span at FILLS_SPAN_AIM fills at the density just seen; after an empty one, reach
            # straight back to the newest time a capped answer showed fills at.
            if page:
                span = max(1, span // 2, min(span * 4, span * FILLS_SPAN_AIM // len(page)))
            else:
                below = [t for t in known if t <= end]
                span = span * 4 if not below else max(span, end - max(below) + 1)
        return dedupe_fills(collected)

    def _latest_fills(self, address: str) -> list[Fill]:
        """userFills: the account's most recent fills (at most 2,000; every dex and spot), any order."""
        from monitor.fills import parse_fills

        body = self._post("userFills", {"type": "userFills", "user": address, "aggregateByTime": False},
                          WEIGHT["userFills"])
        try:
            return parse_fills(body)
        except ExchangeDataError as exc:
            raise ReadFailed("userFills", f"invalid answer ({exc})") from None

    def _fills_page(self, address: str, start_ms: int, end_ms: int | None) -> list[Fill]:
        from monitor.fills import parse_fills

        body = self._post(
            "userFillsByTime",
            {"type": "userFillsByTime", "user": address, "startTime": start_ms, "endTime": end_ms,
             "aggregateByTime": False},
            WEIGHT["userFillsByTime"],
        )
        try:
            return parse_fills(body)
        except ExchangeDataError as exc:
            raise ReadFailed("userFillsByTime", f"invalid answer ({exc})") from None

    def read_funding(self, address: str, since_ms: int, until_ms: int) -> list[FundingPayment]:
        """Every funding payment of the account with ``since_ms <= time <= until_ms``, deduplicated, oldest first.

        ``userFunding`` (the SDK's ``user_funding_history`` request) is paged by time like fills: an answer
        of ``FUNDING_PAGE_LIMIT`` items may have more after it, so the next page starts at its newest time
        (inclusive: repeats are dropped by (time, coin, hash)). That a capped answer holds the window's
        oldest items is the documented paging rule, not observed (UNCONFIRMED, reference §2.12). Any
        failure, a page that cannot move on, or more than ``FUNDING_MAX_REQUESTS`` pages is ``ReadFailed``:
        never a partial sum.
        """
        from monitor.fills import parse_funding

        collected: dict[tuple[Any, ...], FundingPayment] = {}
        start = since_ms
        for _ in range(FUNDING_MAX_REQUESTS):
            body = self._post("userFunding", {"type": "userFunding", "user": address, "startTime": start,
                                              "endTime": until_ms}, WEIGHT["userFunding"])
            try:
                page = parse_funding(body)
            except ExchangeDataError as exc:
                raise ReadFailed("userFunding", f"invalid answer ({exc})") from None
            for payment in page:
                if since_ms <= payment.time_ms <= until_ms:
                    collected.setdefault(payment.identity, payment)
            if len(page) < FUNDING_PAGE_LIMIT:
                return sorted(collected.values(), key=lambda p: (p.time_ms, p.coin, p.hash))
            newest = max(p.time_ms for p in page)
            if newest <= start:
                raise ReadFailed("userFunding", "more payments in one millisecond than one page holds")
            start = newest
        raise ReadFailed("userFunding", f"more payments in the window than {FUNDING_MAX_REQUESTS} pages")

    def read_meta(self, dex: str = MAIN_DEX) -> dict[str, Any]:
        body = self._post("meta", {"type": "meta", "dex": dex}, WEIGHT["meta"])
        if not isinstance(body, dict) or not isinstance(body.get("universe"), list):
            raise ReadFailed("meta", "invalid answer (no universe)")
        return body

    def read_open_orders(self, address: str, dex: str = MAIN_DEX) -> list[OpenOrder]:
        body = self._post("frontendOpenOrders", {"type": "frontendOpenOrders", "user": address, "dex": dex},
                          WEIGHT["frontendOpenOrders"])
        try:
            orders = parse_open_orders(body)
        except ExchangeDataError as exc:
            raise ReadFailed("frontendOpenOrders", f"invalid answer ({exc})") from None
        # One dex per answer (the main dex's may add spot orders, which are never ours to cancel).
        return [o for o in orders if dex_of(o.coin) == dex]

    def user_role(self, address: str) -> tuple[str, str | None]:
        """userRole (weight 60).

        ("agent", master) | ("subAccount", master) | ("user", None) | ("vault"|"missing", None).
        """
        body = self._post("userRole", {"type": "userRole", "user": address}, WEIGHT["userRole"])
        if not isinstance(body, dict) or not isinstance(body.get("role"), str):
            raise ReadFailed("userRole", "invalid answer")
        data = body.get("data")
        if not isinstance(data, dict):
            data = {}
        linked = data.get("user") or data.get("master")
        if linked is not None and not isinstance(linked, str):
            raise ReadFailed("userRole", "invalid answer (linked address)")
        return body["role"], linked.lower() if linked else None

    def order_status(self, address: str, cloid: str) -> str:
        """The status of an order by cloid: 'unknownOid' when the exchange never saw it."""
        body = self._post("orderStatus", {"type": "orderStatus", "user": address, "oid": cloid}, WEIGHT["orderStatus"])
        if not isinstance(body, dict) or body.get("status") not in ("order", "unknownOid"):
            raise ReadFailed("orderStatus", "invalid answer")
        if body["status"] == "unknownOid":
            return "unknownOid"
        try:
            return str(body["order"]["status"])
        except (KeyError, TypeError):
            raise ReadFailed("orderStatus", "invalid answer (no order status)") from None

    def read_mids(self, dex: str = MAIN_DEX) -> dict[str, Decimal]:
        body = self._post("allMids", {"type": "allMids", "dex": dex}, WEIGHT["allMids"])
        try:
            return parse_mids(body, dex)
        except ExchangeDataError as exc:
            raise ReadFailed("allMids", f"invalid answer ({exc})") from None


def decimal_to_wire(value: Decimal) -> str:
    """A price or size as the exchange's wire wants it: plain digits, no trailing zeros, no exponent."""
    text = f"{value.normalize():f}"
    return "0" if text in ("-0", "") else text


def round_price(price: Decimal, sz_decimals: int, *, is_buy: bool) -> Decimal:
    """At most 5 significant figures and 6 - szDecimals decimals (perps), rounded away from the book."""
    from decimal import ROUND_CEILING, ROUND_FLOOR

    rounding = ROUND_CEILING if is_buy else ROUND_FLOOR
    if price <= 0:
        raise ValueError("price must be positive")
    integer_digits = price.adjusted() + 1
    decimals = min(max(5 - integer_digits, 0), max(6 - sz_decimals, 0))
    rounded = price.quantize(Decimal(1).scaleb(-decimals), rounding=rounding)
    if integer_digits > 5:  # large prices: keep 5 significant figures of the integer part
        step = Decimal(1).scaleb(integer_digits - 5)
        rounded = (price / step).to_integral_value(rounding=rounding) * step
    return rounded


def close_cloid(address: str, position_id: int, attempt: int) -> str:
    """The client order id of one close attempt of one row: deterministic, never reused."""
    import hashlib

    digest = hashlib.sha256(f"position-monitor:{address.lower()}:{position_id}:{attempt}".encode()).hexdigest()
    return "0x" + digest[:32]


@dataclass(frozen=True)
class OrderOutcome:
    """What the exchange answered to a close order. ``kind`` is filled, partial, no_position, rejected, unknown."""

    kind: str
    filled_size: Decimal = Decimal(0)
    average_price: Decimal | None = None
    error: str | None = None
    oid: int | None = None  # the exchange's order id, when the answer names one

    def __post_init__(self) -> None:
        if self.error is not None:
            object.__setattr__(self, "error", printable(self.error))


@dataclass(frozen=True)
class OpenOrder:
    """One open order as frontendOpenOrders lists it (reference §2.6; recordings frontendOpenOrders*.json)."""

    coin: str
    oid: int
    reduce_only: bool
    is_trigger: bool
    order_type: str | None
    cloid: str | None
    timestamp_ms: int | None = None
    is_position_tpsl: bool = False  # a position-level TP/SL (grouping positionTpsl; its size follows the position)
    parent_oid: int | None = None  # the order whose ``children`` list this one (a TP/SL waiting for its parent)


def parse_open_orders(body: Any) -> list[OpenOrder]:
    """frontendOpenOrders, flattened (children repeat top-level triggers) and deduplicated by oid.

    ``reduceOnly`` is required (every recording and the documented schema carry it): without it nothing can
    tell a stranded stop from a user's entry order, so such an answer is a failed read, not "no orders"."""
    if not isinstance(body, list):
        raise ExchangeDataError("frontendOpenOrders: expected a list")
    seen: dict[int, OpenOrder] = {}
    parents: dict[int, int] = {}
    stack: list[tuple[Any, int | None]] = [(item, None) for item in body]
    while stack:
        item, parent = stack.pop()
        if not isinstance(item, dict):
            raise ExchangeDataError("frontendOpenOrders: an order is not an object")
        oid = item.get("oid")
        if isinstance(oid, bool) or not isinstance(oid, int):
            raise ExchangeDataError("frontendOpenOrders: oid is not an integer")
        if "reduceOnly" not in item:
            raise ExchangeDataError("frontendOpenOrders: reduceOnly missing")
        flags = {}
        for key in ("reduceOnly", "isTrigger", "isPositionTpsl"):
            value = item.get(key, False)
            if not isinstance(value, bool):
                raise ExchangeDataError(f"frontendOpenOrders: {key} is not a boolean")
            flags[key] = value
        for key in ("orderType", "cloid"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise ExchangeDataError(f"frontendOpenOrders: {key} is not a string")
        children = item.get("children")
        if children is None:
            children = []
        if not isinstance(children, list):
            raise ExchangeDataError("frontendOpenOrders: children is not a list")
        placed = item.get("timestamp")
        if placed is not None and (isinstance(placed, bool) or not isinstance(placed, int)):
            raise ExchangeDataError("frontendOpenOrders: timestamp is not an integer")
        seen.setdefault(oid, OpenOrder(coin=parse_coin(item.get("coin")), oid=oid, reduce_only=flags["reduceOnly"],
                                       is_trigger=flags["isTrigger"], order_type=item.get("orderType"),
                                       cloid=item.get("cloid"), timestamp_ms=placed,
                                       is_position_tpsl=flags["isPositionTpsl"]))
        if parent is not None and parent != oid:
            parents.setdefault(oid, parent)
        stack.extend((child, oid) for child in children)
    return sorted((replace(o, parent_oid=parents.get(o.oid)) for o in seen.values()), key=lambda o: o.oid)


def orphaned_orders(orders: Iterable[OpenOrder], coin: str, not_after_ms: int | None) -> list[OpenOrder]:
    """The orders a gone position of ``coin`` left behind, which are cancelled: reduce-only orders (limit or
    trigger, which includes every position TP/SL: reference §2.6, "TP/SL of a position: isTrigger=true,
    reduceOnly=true") placed at or before ``not_after_ms`` (None: any time).

    Never cancelled: an order that is not reduce-only (a user's resting entry, a stop-entry trigger that would
    open a new position), even one flagged ``isPositionTpsl`` (the docs make those reduce-only; flags that
    disagree are left alone); a TP/SL that is a child of an open order that is not reduce-only (it waits for
    that entry to fill: it belongs to the position the entry will open, not to the one that is gone); an order
    placed after the close."""
    by_oid = {o.oid: o for o in orders}
    kept: list[OpenOrder] = []
    for order in by_oid.values():
        if order.coin != coin or not order.reduce_only:
            continue
        if order.timestamp_ms is not None and not_after_ms is not None and order.timestamp_ms > not_after_ms:
            continue
        parent = by_oid.get(order.parent_oid) if order.parent_oid is not None else None
        if parent is not None and not parent.reduce_only:
            continue
        kept.append(order)
    return sorted(kept, key=lambda o: o.oid)


def order_kind(order: OpenOrder) -> str:
    """How an open order reads in an action's metadata: position TP/SL, reduce-only trigger, reduce-only limit..."""
    if order.is_position_tpsl:
        return "position_tpsl"
    if order.is_trigger:
        return "reduce_only_trigger" if order.reduce_only else "trigger"
    return "reduce_only" if order.reduce_only else "limit"


def hip3_asset_id(perp_dex_index: int, index_in_meta: int) -> int:
    """The asset id of a HIP-3 coin: 100000 + perp_dex_index * 10000 + index_in_meta (docs, asset-ids; the SDK's
    ``Info`` numbers them the same way, 110000 + i * 10000 for the i-th dex after the first)."""
    if perp_dex_index < 1 or not 0 <= index_in_meta < HIP3_DEX_STRIDE:
        raise ValueError("not a HIP-3 asset")
    return HIP3_ASSET_BASE + perp_dex_index * HIP3_DEX_STRIDE + index_in_meta


def hip3_assets(dex: str, perp_dex_index: int, meta: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """coin -> (asset id, szDecimals) for one HIP-3 dex's ``meta`` (delisted entries keep their index)."""
    out: dict[str, tuple[int, int]] = {}
    for index, item in enumerate(meta.get("universe", [])):
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            name = item["name"] if ":" in item["name"] else f"{dex}:{item['name']}"
            out[name] = (hip3_asset_id(perp_dex_index, index), int(item.get("szDecimals", 0)))
    return out


def signer_address(secret_key: str) -> str:
    """The lowercase address of the configured key (never the key itself)."""
    from eth_account import Account as EthAccount

    address: str = EthAccount.from_key(secret_key).address
    return address.lower()


class Trader:
    """Signed actions for one account, with an API (agent) wallet acting for it.

    Orders are built from Decimals (the SDK's own ``order()`` takes floats) and signed with the
    SDK's ``sign_l1_action``; each carries an ``expiresAfter``, and a cloid except on HIP-3 dexes (a HIP-3
    order with a cloid is reported to fail silently: reference §4). HIP-3 asset ids and szDecimals come from
    ``hip3`` (see ``hip3_assets``), never from the SDK, whose price rounding takes them for spot.
    """

    def __init__(self, reader: Exchange, secret_key: str, account: str, meta: dict[str, Any], *,
                 vault_address: str | None = None, nonces: Callable[[], int] | None = None,
                 hip3: dict[str, tuple[int, int]] | None = None) -> None:
        from eth_account import Account as EthAccount
        from hyperliquid.exchange import Exchange as SdkExchange

        self.reader = reader
        self.account = account
        # Nonces of this key: from the host-wide source when given (docs/design.md "Keys": unique across this host's
        # processes signing with the key); the SDK's bare millisecond time otherwise.
        self.nonces = nonces
        wallet = EthAccount.from_key(secret_key)
        # An agent's signature acts for its master; a sub-account is named as vaultAddress.
        self.sdk = SdkExchange(wallet, reader.base_url, meta=meta, spot_meta=EMPTY_SPOT_META,
                               vault_address=vault_address, account_address=account, timeout=reader.timeout)
        self.sz_decimals = {a["name"]: int(a.get("szDecimals", 0)) for a in meta.get("universe", [])}
        self.hip3: dict[str, tuple[int, int]] = hip3 if hip3 is not None else {}  # shared: filled in as dexes load

    def asset(self, coin: str) -> int:
        """The order asset id of ``coin``; KeyError when it is not in the meta the trader was built with."""
        if dex_of(coin):
            return self.hip3[coin][0]
        return int(self.sdk.info.name_to_asset(coin))

    def sz_decimals_of(self, coin: str) -> int:
        if dex_of(coin):
            return self.hip3[coin][1] if coin in self.hip3 else 0
        return self.sz_decimals.get(coin, 0)

    def _send(self, action: dict[str, Any], expires_after_ms: int | None, weight: int = 1) -> Any:
        import requests
        from hyperliquid.utils.constants import MAINNET_API_URL
        from hyperliquid.utils.error import ClientError, ServerError
        from hyperliquid.utils.signing import get_timestamp_ms, sign_l1_action

        try:
            nonce = self.nonces() if self.nonces is not None else get_timestamp_ms()
        except (OSError, TimeoutError) as exc:  # the nonce file cannot be used: nothing is signed or sent
            raise ReadFailed("exchange", f"no nonce for the key ({type(exc).__name__}); nothing sent") from None
        signature = sign_l1_action(self.sdk.wallet, action, self.sdk.vault_address, nonce, expires_after_ms,
                                   self.sdk.base_url == MAINNET_API_URL)
        payload = {"action": action, "nonce": nonce, "signature": signature,
                   "vaultAddress": self.sdk.vault_address, "expiresAfter": expires_after_ms}
        if self.reader.before_request is not None:
            self.reader.before_request("exchange", weight)
        self.reader.counter.add("exchange", weight)
        try:
            return self.sdk.post("/exchange", payload)  # timeout: given to the SDK Exchange at construction
        except ClientError as exc:
            raise ReadFailed("exchange", f"HTTP {exc.status_code}",
                             retry_after=1.0 if exc.status_code == 429 else None) from None
        except ServerError as exc:
            raise ReadFailed("exchange", f"HTTP {exc.status_code}") from None
        except requests.Timeout:
            raise ReadFailed("exchange", "timed out") from None
        except requests.RequestException as exc:
            raise ReadFailed("exchange", f"connection failed ({type(exc).__name__})") from None
        except (KeyError, ValueError, AttributeError, TypeError):
            raise ReadFailed("exchange", "unexpected error body") from None

    def close_ioc(self, coin: str, *, side: str, size: Decimal, mid: Decimal, slippage: Decimal, cloid: str | None,
                  expires_after_ms: int) -> OrderOutcome:
        """A reduce-only IOC order that closes ``size`` of a ``side`` position, priced ``slippage`` through the mid
        (perp price rules on every dex). ``cloid`` None sends none (HIP-3); the answer's oid is in the outcome.

        Raises ReadFailed when the answer is unknown (timeout, 5xx): the order may or may not exist;
        the caller settles it later (by its cloid, or on HIP-3 from fills once it has expired).
        """
        from hyperliquid.utils.signing import order_wires_to_order_action

        is_buy = side == "short"
        sz_decimals = self.sz_decimals_of(coin)
        price = round_price(mid * (1 + slippage) if is_buy else mid * (1 - slippage), sz_decimals, is_buy=is_buy)
        size = size.quantize(Decimal(1).scaleb(-sz_decimals)) if sz_decimals >= 0 else size
        try:
            asset = self.asset(coin)
        except KeyError:
            return OrderOutcome("rejected", error=f"{coin} is not in the exchange's meta (asset id unknown)")
        wire = {"a": asset, "b": is_buy, "p": decimal_to_wire(price),
                "s": decimal_to_wire(size), "r": True, "t": {"limit": {"tif": "Ioc"}}}
        if cloid is not None:
            wire["c"] = cloid
        body = self._send(order_wires_to_order_action([wire], None, "na"), expires_after_ms)
        return interpret_order_response(body, size)

    def cancel(self, coin: str, oid: int, expires_after_ms: int) -> str | None:
        """Cancel one order; None on success, else the exchange's error text."""
        try:
            asset = self.asset(coin)
        except KeyError:
            return f"{coin} is not in the exchange's meta (asset id unknown)"
        action = {"type": "cancel", "cancels": [{"a": asset, "o": oid}]}
        body = self._send(action, expires_after_ms)
        if not isinstance(body, dict) or body.get("status") != "ok":
            return printable(str(body.get("response") if isinstance(body, dict) else body)[:200])
        response = body.get("response")
        data = response.get("data") if isinstance(response, dict) else None
        statuses = data.get("statuses") if isinstance(data, dict) else None
        if not isinstance(statuses, list):
            return "unexpected cancel answer"
        if statuses and statuses[0] != "success":
            error = statuses[0].get("error") if isinstance(statuses[0], dict) else str(statuses[0])
            if error and "never placed, already canceled, or filled" in error:
                return None  # already gone: the goal is met
            return printable(str(error)[:200])
        return None


    def cancel_many(self, coin: str, oids: list[int], expires_after_ms: int) -> dict[int, str | None]:
        """Cancel ``oids`` of ``coin`` in one action (weight 1 + n // 40, reference §5.1); per oid None on
        success (or already gone), else the exchange's error text. Raises ReadFailed when the answer is unknown."""
        try:
            asset = self.asset(coin)
        except KeyError:
            return dict.fromkeys(oids, f"{coin} is not in the exchange's meta (asset id unknown)")
        action = {"type": "cancel", "cancels": [{"a": asset, "o": oid} for oid in oids]}
        body = self._send(action, expires_after_ms, weight=1 + len(oids) // 40)
        if not isinstance(body, dict) or body.get("status") != "ok":
            error = str(body.get("response") if isinstance(body, dict) else body)[:200]
            return dict.fromkeys(oids, error)
        response = body.get("response")
        data = response.get("data") if isinstance(response, dict) else None
        statuses = data.get("statuses") if isinstance(data, dict) else None
        if not isinstance(statuses, list) or len(statuses) != len(oids):
            return dict.fromkeys(oids, "unexpected cancel answer")
        result: dict[int, str | None] = {}
        for oid, status in zip(oids, statuses):
            if status == "success":
                result[oid] = None
                continue
            error = str(status.get("error")) if isinstance(status, dict) else str(status)
            gone = "never placed, already canceled, or filled" in error
            result[oid] = None if gone else printable(error[:200])
        return result


def interpret_order_response(body: Any, requested: Decimal) -> OrderOutcome:
    """Read an /exchange order answer. Anything that is not clearly one outcome is "unknown":
    the order may exist, so the row stays 'closing' and is settled by its cloid."""
    if not isinstance(body, dict) or _is_unparsed(body):
        return OrderOutcome("unknown", error="answer is not a JSON object")
    if body.get("status") != "ok":
        if body.get("status") == "err" and isinstance(body.get("response"), str):
            return OrderOutcome("rejected", error=body["response"][:200])
        return OrderOutcome("unknown", error=str(body)[:200])
    response = body.get("response")
    data = response.get("data") if isinstance(response, dict) else None
    statuses = data.get("statuses") if isinstance(data, dict) else None
    if not isinstance(statuses, list) or not statuses:
        return OrderOutcome("unknown", error="answer has no statuses")
    status = statuses[0]
    if isinstance(status, dict) and "filled" in status:
        filled = status["filled"]
        if not isinstance(filled, dict):
            return OrderOutcome("unknown", error="filled is not an object")
        try:
            total = parse_decimal(filled.get("totalSz"), "totalSz")
            average = parse_decimal(filled.get("avgPx"), "avgPx")
        except ExchangeDataError as exc:
            return OrderOutcome("unknown", error=str(exc))
        oid = filled.get("oid")
        oid = oid if isinstance(oid, int) and not isinstance(oid, bool) else None
        return OrderOutcome("filled" if total >= requested else "partial", total, average, oid=oid)
    if isinstance(status, dict) and isinstance(status.get("error"), str):
        error = status["error"]
        if "Reduce only order would increase position" in error:
            return OrderOutcome("no_position", error=error)
        return OrderOutcome("rejected", error=error[:200])
    if isinstance(status, dict) and "resting" in status:
        return OrderOutcome("rejected", error="IOC order rested (unexpected)")
    return OrderOutcome("unknown", error=str(status)[:200])
