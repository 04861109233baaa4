"""position-monitor: keep a PostgreSQL positions table true to what is open on Hyperliquid."""

__version__ = "0.1.0"
