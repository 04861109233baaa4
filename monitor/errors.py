"""Expected faults and the exit codes they map to (sysexits.h values).

Each carries one line for the user. The CLI prints that line and exits with ``exit_code``;
no traceback is shown for these.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ACCOUNT_FAILED = 1
EXIT_USAGE = 2
EXIT_DB_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_LOCK_HELD = 75  # EX_TEMPFAIL
EXIT_CONFIG = 78  # EX_CONFIG


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
    exit_code = EXIT_DB_UNAVAILABLE


class LockHeld(MonitorError):
    exit_code = EXIT_LOCK_HELD


class Fenced(MonitorError):
    """This run's lock was taken over; the database refused its write."""

    exit_code = EXIT_LOCK_HELD


class ClaimLost(Fenced):
    """Another run took over this run's claim on an account (README, "Locking"); nothing more is written."""


class UsageError(MonitorError):
    exit_code = EXIT_USAGE
