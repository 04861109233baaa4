"""The Simulator: its parts put together, ``POST /_control`` and the HTTP entry point."""

from __future__ import annotations

import json
import traceback
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .common import SimulatorError, _json_response, _text_response
from .exchange import ExchangeMixin
from .faults import MAX_SLEEP_S, FaultsMixin
from .info import InfoMixin
from .ledger import LedgerMixin
from .state import StateBase

if TYPE_CHECKING:
    from .common import Response


class Simulator(InfoMixin, ExchangeMixin, FaultsMixin, LedgerMixin, StateBase):
    """All simulated exchange state, behind one lock.  Every public method is thread safe.

    Numbers may be given as str, int, Decimal or float (floats via repr).  Addresses in any case;
    stored lowercase.  Methods that create fills return them in wire form (the dicts /info returns).
    """

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

    # ---- /_control ----------------------------------------------------------------------------------

    CONTROL_OPS = (
        "open_position", "seed_position", "seed_from_clearinghouse", "resize", "flip", "close_external",
        "liquidate", "set_mid", "set_mids", "add_trigger_order", "add_limit_order", "fill_trigger",
        "cancel_order", "set_fee_rate", "set_partial_fill_ratio", "set_latency", "set_config", "approve_agent",
        "revoke_agent", "add_account", "add_sub_account", "add_coin", "now_ms", "set_time", "advance_time",
        "add_vault", "set_clock_offset", "clear", "snapshot", "load", "requests_log", "reset_log", "total_weight",
        "add_fill_history", "pay_funding", "funding_ledger", "adl", "settle",
        "add_fault", "clear_faults", "list_faults", "meta", "mids", "position", "positions", "fills", "orders",
        "accounts", "add_perp_dex", "perp_dexs", "open_hip3_position",
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
