"""Found by a new-user trial: expected faults that gave tracebacks (each one line and an exit code now)."""

from __future__ import annotations

import uuid

import psycopg

from tests.conftest import cli, with_database


def test_status_and_lock_status_on_an_unmigrated_database_say_migrate(env, pg_server_url):
    name = f"pm_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        environ = dict(env, MONITOR_DATABASE_URL=with_database(pg_server_url, name), MONITOR_LOCK_BACKEND="postgres")
        for args in (("status",), ("lock", "status")):
            result = cli(environ, *args)
            assert result.returncode == 78, (args, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr and "db migrate" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_status_with_a_bad_run_count_is_a_usage_error(env):
    for value in ("-1", "100000000000000000000"):
        result = cli(env, "status", "--runs", value)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (value, result.stderr)
