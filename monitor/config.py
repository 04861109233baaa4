"""Settings: a command-line flag wins over the environment, which wins over an ``--env-file``, which wins over
the default.

A bad value raises ``ConfigError`` naming the setting and what is wrong (exit 78). The private key named by
``MONITOR_HL_SECRET_KEY_FILE`` is not read here: only a run about to sign reads it (``Settings.signing_key``).
"""

from __future__ import annotations

import difflib
import os
import socket
import stat
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from monitor.errors import ConfigError

MAINNET_API_URL = "https://api.hyperliquid.xyz"
TESTNET_API_URL = "https://api.hyperliquid-testnet.xyz"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    hl_api_url: str = MAINNET_API_URL
    data_dir: Path = Path("~/.local/share/position-monitor").expanduser()
    lock_file: Path | None = None
    lock_stale_after: float = 300.0
    lock_backend: str = "local"
    log_level: str = "warning"
    log_format: str = "text"
    close_grace_seconds: float = 60.0
    reopen_guard_seconds: float = 120.0
    http_timeout: float = 10.0
    max_close_failures: int = 3
    close_slippage: Decimal = Decimal("0.05")
    host_id: str = field(default_factory=socket.gethostname)
    secret_key: str | None = field(default=None, repr=False)
    # MONITOR_HL_SECRET_KEY_FILE: read only right before a run's first signature (see signing_key), never by
    # status, positions, db, lock, run --dry-run or a run with nothing to sign.
    secret_key_file: Path | None = None
    metrics_file: Path | None = None
    ping_url: str | None = None
    alert_webhook: str | None = None
    alert_after_runs: int = 3
    weight_budget: int = 1000
    read_parallelism: int = 16
    shard: tuple[int, int] | None = None
    perp_dexes: tuple[str, ...] | None = None  # HIP-3 dexes to watch: None = all (perpDexs), () = none
    hedge_external_stale: float = 300.0  # seconds: an older external hedge leg makes its group unknown

    @property
    def has_key(self) -> bool:
        """A key is configured (inline, or as a file not read yet)."""
        return self.secret_key is not None or self.secret_key_file is not None

    def with_signing_key(self) -> Settings:
        """These settings with the key file read (ConfigError, exit 78, when it cannot be): for a command that
        may sign orders or cancels. Without a key file, these settings as they are."""
        if self.secret_key is not None or self.secret_key_file is None:
            return self
        return replace(self, secret_key=read_secret_key_file(self.secret_key_file))

    def signing_key(self) -> str:
        """The key, read from its file now if it is one (ConfigError when it cannot be, or none is configured).
        A run calls this only right before its first signature (``runner.RunContext.signing_key``)."""
        if self.secret_key is not None:
            return self.secret_key
        if self.secret_key_file is None:
            raise ConfigError("no key configured (MONITOR_HL_SECRET_KEY or MONITOR_HL_SECRET_KEY_FILE)")
        return read_secret_key_file(self.secret_key_file)

    @property
    def shard_tag(self) -> str | None:
        """``shard-K-of-N`` under ``--shard K/N`` (in the lock's name, its file's, and a sharded run's alert keys)."""
        return None if self.shard is None else f"shard-{self.shard[0]}-of-{self.shard[1]}"

    @property
    def lease_name(self) -> str:
        """The lock's name: one per shard, so shards never block each other."""
        return "run" if self.shard_tag is None else f"run:{self.shard_tag}"

    @property
    def effective_lock_file(self) -> Path:
        base = self.lock_file if self.lock_file is not None else self.data_dir / "run.lock"
        if self.shard_tag is None:
            return base
        return base.with_name(f"{base.stem}.{self.shard_tag}{base.suffix}")

    @property
    def deadline_seconds(self) -> float:
        """A run stops starting new work this long after it started (a margin before the stale limit)."""
        return max(self.lock_stale_after * 0.8, self.lock_stale_after - 30.0)


def _positive_seconds(name: str, text: str, *, maximum: float = 86400.0) -> float:
    try:
        value = float(text)  # seconds, not money
    except ValueError:
        raise ConfigError(f"{name}: expected a number of seconds, got {text!r}") from None
    if not (0 < value <= maximum):
        raise ConfigError(f"{name}: expected seconds between 0 and {maximum:g}, got {text!r}")
    return value


def _non_negative_seconds(name: str, text: str) -> float:
    if text.strip() in {"0", "0.0"}:
        return 0.0
    return _positive_seconds(name, text)


def _positive_int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {text!r}") from None
    if value < 1:
        raise ConfigError(f"{name}: expected a whole number of at least 1, got {text!r}")
    return value


def _bounded_int(name: str, text: str, low: int, high: int) -> int:
    value = _positive_int(name, text)
    if not low <= value <= high:
        raise ConfigError(f"{name}: expected a whole number from {low} to {high}, got {text!r}")
    return value


def parse_shard(name: str, text: str) -> tuple[int, int]:
    """K/N: this host takes shard K of N (1 <= K <= N)."""
    try:
        k_text, n_text = text.strip().split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ConfigError(f"{name}: expected K/N such as 1/4, got {text!r}") from None
    if not (1 <= k <= n <= 1024):
        raise ConfigError(f"{name}: expected K/N with 1 <= K <= N <= 1024, got {text!r}")
    return k, n


_DEX_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def parse_perp_dexes(name: str, text: str) -> tuple[str, ...] | None:
    """``all`` (every dex perpDexs lists), a comma list of HIP-3 dex names, or "" (the first dex only)."""
    value = text.strip()
    if value.lower() == "all":
        return None
    names: list[str] = []
    for part in value.split(","):
        dex = part.strip()
        if not dex:
            if value:
                raise ConfigError(f"{name}: an empty name in the list {text!r} (use \"\" alone for the first dex only)")
            continue
        if len(dex) > 32 or not set(dex) <= _DEX_NAME_CHARS:
            raise ConfigError(f"{name}: expected 'all', dex names separated by commas, or empty, got {text!r}")
        if dex not in names:
            names.append(dex)
    return tuple(names)


def _fraction(name: str, text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ConfigError(f"{name}: expected a fraction such as 0.05, got {text!r}") from None
    if not value.is_finite() or not (Decimal(0) < value < Decimal("0.5")):
        raise ConfigError(f"{name}: expected a fraction between 0 and 0.5, got {text!r}")
    return value


def _http_url(name: str, text: str) -> str:
    try:
        parts = urlsplit(text.strip())
        host = parts.hostname
    except ValueError:
        raise ConfigError(f"{name}: expected an http(s) URL, got {text!r}") from None
    if not host or parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"{name}: expected an http(s) URL, got {text!r}")
    # The SDK signs as mainnet only when base_url equals its constant exactly: no trailing slash.
    return text.strip().rstrip("/")


def _database_url(name: str, text: str) -> str:
    text = text.strip()
    if not text:
        raise ConfigError(f"{name}: is empty")
    if "://" in text and not text.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{name}: expected a postgresql:// URL or a libpq connection string")
    from monitor.database import conninfo_problem  # the driver's parser; only monitor.database imports it

    problem = conninfo_problem(text)
    if problem is not None:
        raise ConfigError(f"{name}: not a valid PostgreSQL URL or connection string: {problem}")
    return text


def _choice(name: str, text: str, choices: tuple[str, ...]) -> str:
    value = text.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {text!r}")
    return value


def _path(name: str, text: str) -> Path:
    if not text.strip():
        raise ConfigError(f"{name}: is empty")
    if "\x00" in text:
        raise ConfigError(f"{name}: contains a NUL byte")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "~someone" for a user that does not exist
        raise ConfigError(f"{name}: cannot expand {text!r}") from None


def read_secret_key_file(path: Path) -> str:
    """Read a private key from a file that only its owner may read."""
    name = "MONITOR_HL_SECRET_KEY_FILE"
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {str(path)!r}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{name}: {str(path)!r} is readable by group or others; chmod 600 it")
    try:
        key = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"{name}: cannot read {str(path)!r}") from None
    return _secret_key(name, key)


def _secret_key(name: str, text: str) -> str:
    key = text.strip()
    body = key[2:] if key.startswith("0x") else key
    if len(body) != 64 or any(c not in "0123456789abcdefABCDEF" for c in body):
        # Never echo the value: it may be a real key with a typo.
        raise ConfigError(f"{name}: expected a 32-byte hex private key (64 hex digits)")
    if not 0 < int(body, 16) < _SECP256K1_ORDER:
        raise ConfigError(f"{name}: not a valid secp256k1 private key (zero or out of range)")
    return "0x" + body.lower()


_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


# setting name -> (environment variable, parser, Settings field)
_ENV: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "database_url": ("MONITOR_DATABASE_URL", _database_url),
    "hl_api_url": ("MONITOR_HL_API_URL", _http_url),
    "data_dir": ("MONITOR_DATA_DIR", _path),
    "lock_file": ("MONITOR_LOCK_FILE", _path),
    "lock_stale_after": ("MONITOR_LOCK_STALE_AFTER", _positive_seconds),
    "lock_backend": ("MONITOR_LOCK_BACKEND", lambda n, t: _choice(n, t, ("local", "postgres"))),
    "log_level": ("MONITOR_LOG_LEVEL", lambda n, t: _choice(n, t, LOG_LEVELS)),
    "log_format": ("MONITOR_LOG_FORMAT", lambda n, t: _choice(n, t, ("text", "json"))),
    "close_grace_seconds": ("MONITOR_CLOSE_GRACE", _non_negative_seconds),
    "reopen_guard_seconds": ("MONITOR_REOPEN_GUARD", _non_negative_seconds),
    "http_timeout": ("MONITOR_HTTP_TIMEOUT", lambda n, t: _positive_seconds(n, t, maximum=300)),
    "max_close_failures": ("MONITOR_MAX_CLOSE_FAILURES", _positive_int),
    "close_slippage": ("MONITOR_CLOSE_SLIPPAGE", _fraction),
    "host_id": ("MONITOR_HOST_ID", lambda n, t: t.strip() or socket.gethostname()),
    "secret_key": ("MONITOR_HL_SECRET_KEY", _secret_key),
    "metrics_file": ("MONITOR_METRICS_FILE", _path),
    "ping_url": ("MONITOR_PING_URL", _http_url),
    "alert_webhook": ("MONITOR_ALERT_WEBHOOK", _http_url),
    "alert_after_runs": ("MONITOR_ALERT_AFTER_RUNS", _positive_int),
    "weight_budget": ("MONITOR_WEIGHT_BUDGET", lambda n, t: _bounded_int(n, t, 10, 100_000)),
    "read_parallelism": ("MONITOR_READ_PARALLELISM", lambda n, t: _bounded_int(n, t, 1, 64)),
    "shard": ("MONITOR_SHARD", parse_shard),
    "perp_dexes": ("MONITOR_PERP_DEXES", parse_perp_dexes),
    "hedge_external_stale": ("MONITOR_HEDGE_EXTERNAL_STALE", lambda n, t: _positive_seconds(n, t, maximum=604800)),
}
# Settings whose empty value means something ("" = the first perp dex only), not "unset".
_EMPTY_IS_A_VALUE = {"MONITOR_PERP_DEXES"}

ENVIRONMENT_VARIABLES = tuple(env for env, _ in _ENV.values()) + ("MONITOR_HL_SECRET_KEY_FILE",)


def key_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a key is configured (MONITOR_HL_SECRET_KEY or its _FILE), without reading it."""
    environ = os.environ if environ is None else environ
    return any(environ.get(name, "").strip() for name in ("MONITOR_HL_SECRET_KEY", "MONITOR_HL_SECRET_KEY_FILE"))


def load_settings(flags: Mapping[str, str | None] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve settings from command-line flags (by field name), the environment, then defaults."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field_name, (env_name, parse) in _ENV.items():
        flag_value = flags.get(field_name)
        if flag_value is not None:
            values[field_name] = parse("--" + field_name.replace("_", "-"), str(flag_value))
        elif environ.get(env_name) not in (None, "") or (env_name in _EMPTY_IS_A_VALUE and env_name in environ):
            values[field_name] = parse(env_name, environ[env_name])
    key_file = environ.get("MONITOR_HL_SECRET_KEY_FILE")
    if key_file:
        if "secret_key" in values:
            raise ConfigError("MONITOR_HL_SECRET_KEY and MONITOR_HL_SECRET_KEY_FILE are both set; set one")
        values["secret_key_file"] = _path("MONITOR_HL_SECRET_KEY_FILE", key_file)
    if "data_dir" not in values:
        xdg = environ.get("XDG_DATA_HOME")
        base = Path(xdg).expanduser() if xdg else Path("~/.local/share").expanduser()
        values["data_dir"] = base / "position-monitor"
    return Settings(**values)


# MONITOR_* names that are no setting but are used around the monitor (the test suite's server).
_OTHER_VARIABLES = ("MONITOR_TEST_DATABASE_URL",)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning line per ``MONITOR_*`` variable that is no setting, naming the closest known one."""
    environ = os.environ if environ is None else environ
    known = set(ENVIRONMENT_VARIABLES) | set(_OTHER_VARIABLES)
    warnings = []
    for name in sorted(environ):
        if not name.startswith("MONITOR_") or name in known:
            continue
        shown = name if name.isprintable() and len(name) <= 64 else repr(name[:64])
        # compared without the shared MONITOR_ prefix, which would make every name look close
        close = difflib.get_close_matches(name[8:], [known[8:] for known in ENVIRONMENT_VARIABLES], n=1, cutoff=0.6)
        hint = f"; did you mean MONITOR_{close[0]}?" if close else ""
        warnings.append(f"{shown} is not a known setting and is ignored{hint}")
    return warnings


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=value`` lines of an env file (``--env-file``), parsed without a shell: values are kept literally
    (spaces, ``$``, ``&``, quotes' contents; no ``${VAR}`` expansion). A line that does not parse is a
    ConfigError (exit 78) naming its number, never its text (it may hold a password)."""
    from dotenv.parser import parse_stream

    name = "--env-file"
    try:
        with open(path, encoding="utf-8") as stream:
            bindings = list(parse_stream(stream))
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path!r} is not UTF-8 text") from None
    values: dict[str, str] = {}
    for binding in bindings:
        if binding.error:
            line = binding.original.line
            raise ConfigError(f"{name}: {path!r} line {line}: expected KEY=value")
        if binding.key is None:
            continue  # a blank line or a comment
        if binding.value is None:
            raise ConfigError(f"{name}: {path!r} line {binding.original.line}: {binding.key} has no '=value'")
        values[binding.key] = binding.value
    return values
