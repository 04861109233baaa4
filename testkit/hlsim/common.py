"""Numbers, addresses and the wire format shared by every part of the simulator."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

DESERIALIZE_ERROR = "Failed to deserialize the JSON body into the target type"


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
