"""Expected faults, and the one place every outcome of a command maps to its exit code.

Exit codes are sysexits.h values (README, "Exit codes"). Each expected fault carries one line for the
user: the CLI prints that line and exits with ``exit_code``; no traceback is shown for these. What a run
records in ``monitor_runs`` comes from ``exit_code_for`` too, so the history never disagrees with the
process's own exit status.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ACCOUNT_FAILED = 1
EXIT_USAGE = 2
EXIT_DB_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_LOCK_HELD = 75  # EX_TEMPFAIL
EXIT_SOFTWARE = 70  # EX_SOFTWARE: a bug (an unexpected exception)
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class MonitorError(Exception):
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(MonitorError):
    """A setting has a bad value, or the environment cannot work as configured."""

    exit_code = EXIT_CONFIG


class SchemaBehind(ConfigError):
    """The database schema is older than this version of the monitor."""


class DatabaseUnavailable(MonitorError):
    """The database cannot be reached, or the connection was lost (an operational error)."""

    exit_code = EXIT_DB_UNAVAILABLE


class DatabaseBusy(DatabaseUnavailable):
    """The connection is fine, but the statement lost to another writer: a deadlock, a lock or statement
    timeout, a serialization failure. Still exit 69 where it stops a run; the apply phase retries a batch
    that hit it one account per transaction, and fails only the account that hits it there."""


class DatabaseError(MonitorError):
    """Any other error the database reported (a constraint violation, a bad statement, ...).

    Raised by ``Database`` in place of the driver's own exceptions, so no other module needs the driver.
    Its exit code is the one a run stopped by an unexpected exception records (70, EX_SOFTWARE).
    """

    exit_code = EXIT_SOFTWARE

    def __init__(self, kind: str, detail: str) -> None:
        first = detail.strip().splitlines()[0] if detail.strip() else kind
        super().__init__(f"database error: {kind}: {first}")
        self.kind = kind  # the server's error class, e.g. "CheckViolation"
        self.detail = detail  # the server's whole message (DETAIL lines included)


class LockHeld(MonitorError):
    exit_code = EXIT_LOCK_HELD


class Fenced(MonitorError):
    """This run's lock was taken over; the database refused its write."""

    exit_code = EXIT_LOCK_HELD


class ClaimLost(Fenced):
    """Another run took over this run's claim on an account (docs/design.md, "Locking"); nothing more is written."""


class UsageError(MonitorError):
    exit_code = EXIT_USAGE


class Terminated(MonitorError):
    """SIGTERM (exit 143) or SIGINT (exit 130) stopped the run (``monitor.signals``): raised only at a
    point where nothing is half-written, so the run is recorded, its lock released, and it exits."""

    def __init__(self, signum: int) -> None:
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}: the run was recorded and its lock released")
        self.signum = signum
        self.exit_code = 128 + signum


def exit_code_for(exc: BaseException) -> int:
    """The exit code of a command that ended with ``exc`` (and of the run it recorded)."""
    if isinstance(exc, MonitorError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_SOFTWARE  # a bug, a stray sys.exit() inside a run included: never recorded as a success


class Refused(MonitorError):
    """A change the row's state does not allow (e.g. exit rules of a row already closing); exit 1."""

    exit_code = EXIT_ACCOUNT_FAILED
