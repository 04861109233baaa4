"""Faults, request hooks, the request log, rate limits and the request gate."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .common import Response, SimulatorError, _addr, _json_response, _text_response

if TYPE_CHECKING:
    from .state import _Version


MAX_SLEEP_S = 120.0
DEFAULT_HANG_S = 60.0

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


def _norm_path(path: str) -> str:
    p = path if path.startswith("/") else "/" + path
    if p not in ("/info", "/exchange"):
        raise SimulatorError(f"path must be 'info' or 'exchange', got {path!r}")
    return p


class FaultsMixin:
    """The Simulator's faults methods (a mixin of Simulator; the state lives in StateBase)."""

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
        address (info: the "user" field; exchange: the account acted for); ``dex`` (any kind, info only): only
        requests for that perp dex ("" = the main dex; without it, every dex).  Args by kind: hang
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

    def _take_fault(self, path: str, typ: str | None, user: str | None, dex: str | None = None) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.path not in (None, path) or f.type not in (None, typ) or f.user not in (None, user):
                    continue
                if "dex" in f.args and f.args["dex"] != dex:
                    continue  # a fault for one perp dex's requests ("" = the main dex)
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

    def _charge_weight(self, weight: int) -> None:
        """The per-item part of an answer already served: counted in the limiter's minute, never refused."""
        with self._lock:
            if self.ip_weight_limit is None or weight <= 0:
                return
            self._weight_window.append((time.monotonic(), weight))
