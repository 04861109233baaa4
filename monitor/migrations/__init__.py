"""Versioned SQL migrations, applied in order by `position-monitor db migrate`."""
