"""Proofs through PgBouncer and a moving endpoint (issue 11 item 4c, 4d).

(c) PgBouncer in transaction mode in front of a kit primary that restarts (fast, then immediate), with
the engines built per the README's PgBouncer recipe: no prepared statement outlives a transaction
(asyncpg ``statement_cache_size=0`` and SQLAlchemy's ``prepared_statement_cache_size=0``; psycopg
``prepare_threshold=None``).
(d) One address standing for the primary (a DNS name or VIP) that moves to the promoted standby while
the sessions opened before stay on the old primary, which turns read-only first.
"""

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from topology_workload import TopologyRun, assert_holds

from db_retry.testing import faults
from db_retry.testing.endpoint import MovingEndpoint
from db_retry.testing.pytest_plugin import ClusterFactory
from db_retry.testing.topology_fixtures import PgBouncerFactory


pytestmark = pytest.mark.standby

WORKERS = 2
POOL = 2 * WORKERS


async def test_pgbouncer_transaction_mode_rides_through_server_restarts(
    fresh_cluster: ClusterFactory, pgbouncer: PgBouncerFactory
) -> None:
    cluster = fresh_cluster()
    bouncer = pgbouncer(cluster.primary.host, cluster.primary.port, pool_mode="transaction")
    made = {
        "asyncpg": create_async_engine(
            sa.make_url(bouncer.dsn()).update_query_dict({"prepared_statement_cache_size": "0"}),
            connect_args={"statement_cache_size": 0},
            pool_size=POOL,
            max_overflow=0,
        ),
        "psycopg": create_async_engine(
            bouncer.dsn(driver="psycopg"), connect_args={"prepare_threshold": None}, pool_size=POOL, max_overflow=0
        ),
    }
    try:
        run = TopologyRun("pgbouncer transaction mode", made, workers=WORKERS, markers=True)
        await run.start()
        for mode in ("fast", "immediate"):
            record = run.fault(f"server restart ({mode})")
            started = asyncio.get_running_loop().time()
            await faults.restart(cluster.primary, mode)
            record.ha_seconds = asyncio.get_running_loop().time() - started
            await run.wait_commits(50)
        report = await run.finish()
    finally:
        for engine in made.values():
            await engine.dispose()
    assert_holds(report)
    assert bouncer.log_tail()  # PgBouncer itself ran the whole time


async def test_moving_endpoint_with_sessions_kept(moving_endpoint: MovingEndpoint) -> None:
    old_primary = moving_endpoint.cluster.primary
    made = {
        "asyncpg": create_async_engine(moving_endpoint.dsn(), pool_size=POOL, max_overflow=0),
        "psycopg": create_async_engine(
            moving_endpoint.dsn(driver="psycopg"), connect_args={"connect_timeout": 2}, pool_size=POOL, max_overflow=0
        ),
    }
    try:
        run = TopologyRun("moving endpoint, sessions kept", made, workers=WORKERS)
        await run.start()
        accepted = moving_endpoint.proxy.connections_accepted
        record = run.fault("endpoint moved")
        started = asyncio.get_running_loop().time()
        new_primary = await moving_endpoint.move(hold=1.0)
        record.ha_seconds = asyncio.get_running_loop().time() - started
        await run.wait_commits(50)
        report = await run.finish()
    finally:
        for engine in made.values():
            await engine.dispose()
    assert_holds(report)
    assert new_primary is not old_primary
    assert moving_endpoint.cluster.primary is new_primary
    assert (moving_endpoint.proxy.target_host, moving_endpoint.proxy.target_port) == (
        new_primary.host,
        new_primary.port,
    )
    assert moving_endpoint.proxy.connections_accepted > accepted  # the pools replaced their kept sessions
    assert "25006" in report.retries, report.summary()  # kept sessions met the read-only old primary
