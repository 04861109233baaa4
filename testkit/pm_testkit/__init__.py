"""Test support shared by the position-monitor tests, ``scripts/bench.py`` and ``scripts/chaos.py``."""

from __future__ import annotations

from .scratch_pg import ScratchServer, with_database

__all__ = ["ScratchServer", "with_database"]
