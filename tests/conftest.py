"""Shared fixtures: a real PostgreSQL (embedded, or MONITOR_TEST_DATABASE_URL) and the loopback simulator.

Each test gets its own database, cloned from a migrated template, so tests never see each
other's rows and the suite needs no cleanup between tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest

from hlsim import fixtures
from pm_testkit import with_database

try:
    from hypothesis import settings as hypothesis_settings
    from hypothesis.database import DirectoryBasedExampleDatabase
except ImportError:  # pragma: no cover - hypothesis comes with the test extra
    hypothesis_settings = None

if hypothesis_settings is not None:
    # `make test` (and CI) replays the same examples every time, so a green suite stays green;
    # `make fuzz` explores new random examples (HYPOTHESIS_PROFILE=explore) and keeps any it fails on.
    hypothesis_settings.register_profile("default", derandomize=True, database=None)
    _examples = Path(__file__).resolve().parent.parent / ".hypothesis" / "examples"
    hypothesis_settings.register_profile("explore", derandomize=False,
                                         database=DirectoryBasedExampleDatabase(_examples))
    hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_ACCOUNT = "0x5e9ee1089755c3435139848e47e6635505d5a13a"
ALICE = "0x" + "a1" * 20  # the account most end-to-end tests trade on
BOB = "0x" + "b0" * 20  # a second watched account


def fixture_response(name: str) -> Any:
    return fixtures.response(name)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url = os.environ.get("MONITOR_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from pm_testkit import ScratchServer

    server = ScratchServer("pm-test-pg-")
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="session")
def template_db(pg_server_url: str) -> str:
    """A migrated database that each test's database is cloned from."""
    from monitor.database import Database

    name = f"pm_template_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    db = Database.open(with_database(pg_server_url, name))
    db.migrate()
    db.close()
    return name


@pytest.fixture
def database_url(pg_server_url: str, template_db: str) -> Iterator[str]:
    name = f"pm_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_database(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db(database_url: str) -> Iterator[Any]:
    from monitor.database import Database

    database = Database.open(database_url)
    yield database
    database.close()


@pytest.fixture
def sim() -> Iterator[Any]:
    from hlsim import start

    server = start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def env(tmp_path: Path, database_url: str, sim: Any) -> dict[str, str]:
    """Environment for running the real CLI against this test's database and simulator."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    environ.update({
        "MONITOR_DATABASE_URL": database_url,
        "MONITOR_HL_API_URL": sim.url,
        "MONITOR_DATA_DIR": str(tmp_path / "data"),
        "MONITOR_LOCK_FILE": str(tmp_path / "lock" / "run.lock"),
        "MONITOR_CLOSE_GRACE": "0",
        "MONITOR_HTTP_TIMEOUT": "2",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    return environ


@pytest.fixture
def settings(env: dict[str, str]) -> Any:
    """The settings a run in this test's process gets from ``env`` (for in-process phase tests)."""
    from monitor.config import load_settings

    return load_settings(environ=env)


@pytest.fixture
def watched(db: Any) -> list[Any]:
    """ALICE and BOB, watched."""
    return [db.add_account(ALICE, "alice")[0], db.add_account(BOB, "bob")[0]]


@pytest.fixture
def keyed(env: dict[str, str], sim: Any) -> dict[str, str]:
    """An agent wallet approved by ALICE, its key in the environment."""
    from eth_account import Account as EthAccount

    agent = EthAccount.create()
    sim.approve_agent(ALICE, agent.address)
    return dict(env, MONITOR_HL_SECRET_KEY=agent.key.hex())


def cli(env: dict[str, str], *args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run the real ``position-monitor`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "monitor", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kwargs)


def run_json(env: dict[str, str], *args: str, expect: int | None = 0) -> dict[str, Any]:
    result = cli(env, "run", "--json", *args)
    if expect is not None:
        assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)
