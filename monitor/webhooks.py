"""HTTP for the notifications: the POSTs that ping a dead man's switch and call an alert webhook.

The one module besides ``monitor.exchange`` that imports ``requests`` (lazily: only runs that ping or
alert pay for it). Every request has a timeout, follows no redirect and never raises: a fault comes back
as one short line, without the URL's secret parts, for ``monitor.notify`` to log.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from monitor import __version__

USER_AGENT = f"position-monitor/{__version__}"


def redacted(url: str) -> str:
    """Scheme and host only: ping UUIDs and webhook paths are secrets and stay out of logs."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname or '?'}{':' + str(parts.port) if parts.port else ''}/..."
    except ValueError:
        return "(unparsable URL)"


def post(url: str, timeout: float, *, data: bytes | None = None, json: Any = None,
         content_type: str | None = None) -> str | None:
    """POST ``data`` (or ``json``) to ``url``: None when the answer is HTTP 2xx, else why not. Never raises.

    ``timeout`` bounds the connection and each read of the answer (requests' semantics).
    """
    import requests

    headers = {"User-Agent": USER_AGENT}
    if content_type:
        headers["Content-Type"] = content_type
    try:
        response = requests.post(url, timeout=(timeout, timeout), allow_redirects=False, headers=headers,
                                 data=data, json=json)
        status = response.status_code
        response.close()
    except requests.Timeout:
        return f"no answer within {timeout:g}s"
    except requests.RequestException as exc:
        return type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - a notification must never break a run
        return f"unexpected {type(exc).__name__}"
    if not 200 <= status < 300:
        return f"HTTP {status}"
    return None
