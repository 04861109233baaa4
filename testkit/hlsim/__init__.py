"""A loopback Hyperliquid simulator for tests, the demo, the benchmark and the chaos runner.

It speaks the real wire format (``POST /info``, ``POST /exchange``) so the project can drive it with
the real ``hyperliquid-python-sdk``, and it adds ``POST /_control`` so another process can script it.
Standard library only (http.server + threading), plus the SDK's own signing helpers for verifying
``/exchange`` signatures.

Quick use::

    from hlsim import SimulatorServer
    with SimulatorServer() as sim:                 # listens on 127.0.0.1:<free port>
        sim.open_position(addr, "BTC", "0.01", "30000")
        info = Info(base_url=sim.url, skip_ws=True, meta=sim.meta(),
                    spot_meta={"universe": [], "tokens": []}, timeout=5)
        info.user_state(addr)

As a process::

    python -m hlsim --host 127.0.0.1 --port 0 --url-file PATH [--state FILE] [--latency-ms N]

Simulator choices where the real exchange's behaviour is not established (see
/work/shared/reference/hyperliquid-api.md §8) -- they are choices, not facts:

* A second order with a cloid this account already used (any order that got an oid, including
  rejected IOC / reduce-only orders) gets the per-order status ``{"error": "Order has duplicate cloid."}``
  and nothing happens.  The real behaviour is UNCONFIRMED.
* An expired action answers ``{"status":"err","response":"Action already expired: <expiresAfter> < <now>"}``
  (exact real text UNCONFIRMED; match on "expired").  ``now`` is the simulator clock, so
  ``set_time``/``advance_time`` also move the expiry check.
* A partially filled IOC (``partial_fill_ratio``) is answered ``filled`` with the smaller ``totalSz``;
  its orderStatus afterwards is ``canceled`` (remaining size in ``sz``).  Fully filled -> ``filled``.
* A nonce already used by the same signer -> ``{"status":"err","response":"Invalid nonce: duplicate nonce N"}``
  (text seen in third-party reports); nonces lower than the 100 highest seen -> ``Invalid nonce: nonce too low N``
  (UNCONFIRMED).  No time-window check (the simulator clock may be moved).
* Signatures are verified as TESTNET (phantom agent source "b"): the SDK signs that way for any base_url other
  than the mainnet URL.  A signature that recovers to an address that is neither a known account nor an
  approved agent is refused with ``User or API Wallet 0x… does not exist.``
* Reduce-only TP/SL triggers are left open when the position closes (stranded triggers, as on the real
  exchange until it cancels them), except ``liquidate(..., cancel_orders=True)`` which cancels the coin's open
  orders with status ``liquidatedCanceled``.
* Order ``grouping`` (normalTpsl/positionTpsl) is ignored: every order in a batch is handled on its own.
* Funding is paid only when scripted (``pay_funding``: ``usdc = -szi * px * rate``, + received, - paid, the
  sign of the real ``userFunding`` recording), into a per-account funding ledger (``funding_ledger``).
  ``userFunding`` answers it oldest first, ``startTime``/``endTime`` inclusive, at most 500 items per
  answer (the generic time-range cap; the real cap and order for userFunding are UNCONFIRMED), every coin
  in one answer.  ``cumFunding`` in clearinghouseState stays zero.
* ``liquidate(method="market")`` gives the victim an ordinary ``Close Long/Short`` fill with the taker fee
  (as recorded); ``method="backstop"`` a ``Liquidated Cross/Isolated Long/Short`` fill with fee 0 (third-party
  notes only: UNCONFIRMED).  ``adl`` writes the recorded ADL shape (``Auto-Deleveraging``, fee 0, crossed,
  ``liquidation`` naming the HLP liquidator child, method backstop).  ``settle`` writes a ``Settlement`` fill
  with fee 0 (that a delisting produces such fills is UNCONFIRMED).

Modules (everything public is importable from ``hlsim`` itself):

* ``hlsim.common``    numbers, addresses, ``SimulatorError``, the wire format
* ``hlsim.state``     accounts, positions, orders and the core state (``StateBase``)
* ``hlsim.ledger``    the fills ledger (``LedgerMixin``)
* ``hlsim.faults``    faults, request hooks, the request log and gate (``FaultsMixin``)
* ``hlsim.info``      ``POST /info`` (``InfoMixin``)
* ``hlsim.exchange``  ``POST /exchange`` and signature recovery (``ExchangeMixin``)
* ``hlsim.simulator`` ``Simulator``: the mixins put together, ``POST /_control``
* ``hlsim.server``    ``SimulatorServer``, ``start``
* ``hlsim.client``    ``SimulatorClient``
* ``hlsim.cli``       ``main`` (``python -m hlsim``)
* ``hlsim.fixtures``  the recorded Hyperliquid answers, as package data
"""

from __future__ import annotations

from .cli import main
from .client import SimulatorClient
from .common import DESERIALIZE_ERROR, SimulatorError, fmt
from .faults import FAULT_KINDS
from .server import SimulatorServer, start
from .simulator import Simulator

__all__ = [
    "Simulator",
    "SimulatorServer",
    "SimulatorClient",
    "SimulatorError",
    "start",
    "FAULT_KINDS",
    "DESERIALIZE_ERROR",
    "fmt",
    "main",
]
