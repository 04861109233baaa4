"""Typed values the monitor works with. No I/O here.

Money and sizes are ``decimal.Decimal`` from the exchange's JSON string to the database's
``numeric`` column; nothing in this package turns them into floats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

Side = Literal["long", "short"]

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
# Plain decimal notation as the exchange writes it; no exponents, no NaN/Infinity.
_DECIMAL_TEXT = re.compile(r"^-?[0-9]{1,30}(\.[0-9]{1,30})?$")


class ExchangeDataError(ValueError):
    """A payload from the exchange that does not have the shape we rely on.

    Raised by parsers; the caller turns it into a failed read ("unknown"), never an empty account.
    """


def normalize_address(text: str) -> str:
    """Validate an account address (0x + 40 hex, checksummed or not) and return it lowercase."""
    if not isinstance(text, str) or not _ADDRESS.match(text.strip()):
        raise ValueError(f"not an address (want 0x followed by 40 hex digits): {text!r}")
    return text.strip().lower()


def parse_decimal(value: Any, what: str) -> Decimal:
    """Parse a money/size value from the exchange's JSON string form.

    JSON numbers are accepted only when they are integers (never floats: they are already
    rounded). Exponents, NaN and Infinity are refused.
    """
    if isinstance(value, bool):
        raise ExchangeDataError(f"{what}: expected a decimal string, got {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    if not isinstance(value, str) or not _DECIMAL_TEXT.match(value):
        raise ExchangeDataError(f"{what}: expected a decimal string, got {value!r:.60}")
    try:
        return Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the regex already refuses these
        raise ExchangeDataError(f"{what}: not a decimal: {value!r:.60}") from exc


def parse_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExchangeDataError(f"{what}: expected an integer, got {value!r:.60}")
    return value


def parse_coin(value: Any, what: str = "coin") -> str:
    if not isinstance(value, str) or not value or len(value) > 64 or any(map(_unstorable, value)):
        # Control characters (NUL above all) and lone surrogates cannot be stored as PostgreSQL text.
        raise ExchangeDataError(f"{what}: expected a coin name, got {value!r:.60}")
    return value


def _unstorable(char: str) -> bool:
    code = ord(char)
    return code < 32 or 127 <= code < 160 or 0xD800 <= code <= 0xDFFF


@dataclass(frozen=True)
class ExchangePosition:
    """One open perp position as the exchange reports it (size is unsigned, side says which way)."""

    coin: str
    side: Side
    size: Decimal
    entry_price: Decimal | None


MAIN_DEX = ""  # the first perp dex; a HIP-3 (builder-deployed) dex's coins are named "<dex>:<COIN>"


def dex_of(coin: str) -> str:
    """The perp dex a coin lives on: "" (the main dex) or the prefix of a HIP-3 name such as ``xyz:TSLA``."""
    return coin.split(":", 1)[0] if ":" in coin else MAIN_DEX


@dataclass(frozen=True)
class AccountSnapshot:
    """A successful, validated read of one account's positions, on the perp dexes in ``dexes_read``.

    A dex not in ``dexes_read`` was not read (not watched, not this run's turn, or its read failed): nothing
    about its positions is known, and rows on it are never treated as missing."""

    address: str
    positions: dict[str, ExchangePosition]
    server_time_ms: int | None = None
    dexes_read: frozenset[str] = frozenset({MAIN_DEX})

    def covers(self, coin: str) -> bool:
        """Whether the read tells anything about ``coin``: its dex was read (or an answer listed it)."""
        return dex_of(coin) in self.dexes_read or coin in self.positions


@dataclass(frozen=True)
class Liquidation:
    liquidated_user: str | None
    mark_price: Decimal | None
    method: str | None


@dataclass(frozen=True)
class Fill:
    """One fill of the account, as returned by userFills / userFillsByTime."""

    coin: str
    price: Decimal
    size: Decimal
    side: Literal["B", "A"]
    time_ms: int
    start_position: Decimal
    direction: str
    closed_pnl: Decimal
    fee: Decimal
    hash: str
    oid: int
    tid: int | None = None
    cloid: str | None = None
    crossed: bool | None = None
    fee_token: str | None = None
    liquidation: Liquidation | None = None

    @property
    def signed_size(self) -> Decimal:
        return self.size if self.side == "B" else -self.size

    @property
    def end_position(self) -> Decimal:
        return self.start_position + self.signed_size

    @property
    def identity(self) -> tuple[Any, ...]:
        """What makes a fill unique: (coin, time, oid, tid) where the exchange gives ``tid``, else
        hash+oid+details. ``tid`` alone is not unique: it is a hash of the two orders, so both legs of a
        self-trade carry the same ``tid`` (and their own oids), and it is 0 on some system fills."""
        if self.tid is not None:
            return ("tid", self.coin, self.time_ms, self.oid, self.tid, self.side)
        return ("h", self.hash, self.oid, self.coin, self.time_ms, self.price, self.size, self.start_position)


@dataclass(frozen=True)
class FundingPayment:
    """One funding payment of the account (a ``userFunding`` entry): ``usdc`` is the signed cash flow as
    the exchange reports it, positive = received, negative = paid (reference §2.12, checked on a recording)."""

    coin: str
    time_ms: int
    usdc: Decimal
    szi: Decimal | None  # the signed position size it was computed on
    rate: Decimal | None
    hash: str

    @property
    def identity(self) -> tuple[Any, ...]:
        return (self.time_ms, self.coin, self.hash)


@dataclass
class PositionRow:
    """A row of the ``positions`` table as the planner sees it."""

    id: int
    account_id: int
    coin: str
    side: Side
    size: Decimal
    entry_price: Decimal | None
    status: str
    opened_at: datetime
    source: str = "platform"
    last_seen_at: datetime | None = None
    realized_pnl: Decimal | None = None
    fees: Decimal | None = None
    stop_loss_price: Decimal | None = None
    take_profit_price: Decimal | None = None
    trailing_stop_pct: Decimal | None = None
    best_price: Decimal | None = None
    max_hold_seconds: int | None = None
    close_requested_at: datetime | None = None
    close_attempts: int = 0
    close_cloid: str | None = None
    close_started_at: datetime | None = None
    close_rule: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    closed_at: datetime | None = None
    close_expires_at: datetime | None = None  # the expiresAfter of the claimed close order


@dataclass(frozen=True)
class Account:
    id: int
    address: str
    label: str | None
    active: bool
    max_hold_seconds: int | None = None


# ---- what the key's userRole answers mean (reference §2.11) ------------------------------------------------

RoleAnswer = tuple[str, "str | None"]  # (role, linked): linked is an agent's master or a sub-account's master


def key_master(signer: str, answer: RoleAnswer) -> str | None:
    """The account ``signer``'s key signs for, given its own userRole answer: the master that approved it (an
    ``agent``), itself (a funded ``user``), or None (``missing``, a vault, an agent without a master): it cannot
    act for anyone."""
    role, linked = answer
    return linked if role == "agent" else signer if role == "user" else None


def key_can_act(signer: str, address: str, answer: RoleAnswer, master: str | None) -> bool:
    """Whether a userRole ``answer`` about ``address`` lets ``signer``'s key act: about the key itself, that it
    acts for someone; about an account, that it is a sub-account of the key's ``master`` (None: the key's own
    answer is not known, any sub-account counts, as it may be the master's)."""
    if address == signer:
        return key_master(signer, answer) is not None
    role, linked = answer
    return role == "subAccount" and (master is None or linked == master)
