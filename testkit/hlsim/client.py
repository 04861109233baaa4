"""``SimulatorClient``: drive a simulator in another process through ``POST /_control``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Callable

from .common import SimulatorError, _dumps
from .simulator import Simulator


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
