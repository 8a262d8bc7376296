"""The suite's external-server mode (``DB_RETRY_TEST_DSN``), run against a server this test starts.

docker-compose runs the suite this way against its own primary; this test keeps that mode from
rotting: a subset of the suite runs in a child pytest pointed at a fresh database of the kit's
primary, where single-server tests pass and tests that need the kit's standby skip with the reason.
"""

import os
import pathlib
import subprocess
import sys

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from db_retry.testing import PostgresCluster
from db_retry.testing.pytest_plugin import DSN_ENV, STANDBY_SKIP_REASON


ROOT = pathlib.Path(__file__).parent.parent
SUBSET = (
    "tests/test_health.py::test_single_host_dsn",  # uses pg_dsn
    "tests/test_transaction.py::test_commit_keeps_the_work",  # pg_dsn with both drivers; writes tx_items
    "tests/test_chaos.py::test_the_invariant_check_catches_a_lost_and_a_doubled_write",  # marked standby: skips
    "tests/test_validation.py::test_a_command_line_option_is_parsed_and_argparse_names_it",  # no server at all
)


async def _tables(dsn: str) -> set[str]:
    engine = create_async_engine(dsn)
    try:
        async with engine.connect() as connection:
            names = await connection.scalars(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
            return set(names)
    finally:
        await engine.dispose()


async def test_the_suite_runs_against_an_external_server(pg_cluster: PostgresCluster) -> None:
    primary = pg_cluster.primary
    await primary.execute("DROP DATABASE IF EXISTS external_mode")
    await primary.execute("CREATE DATABASE external_mode")
    dsn = primary.dsn(driver=None, database="external_mode")  # what a user would export
    env = {key: value for key, value in os.environ.items() if not key.startswith("COV_CORE")}
    completed = subprocess.run(  # noqa: S603, ASYNC221 - our own interpreter on our own tests; nothing else runs
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *SUBSET],
        cwd=ROOT,
        env={**env, DSN_ENV: dsn},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "4 passed, 1 skipped" in output, output
    assert STANDBY_SKIP_REASON in output
    # The tests wrote to the database the variable named, and nowhere else.
    assert "tx_items" in await _tables(primary.dsn(database="external_mode"))
