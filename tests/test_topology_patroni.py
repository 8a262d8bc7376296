"""Proofs on a Patroni cluster (issue 11 item 4a, 4b).

The chaos workload through a multi-host DSN over the members, and through HAProxy checking Patroni's
REST API, across a switchover and a postmaster-kill failover; and with ``synchronous_mode: true``, no
acknowledged commit lost to a failover.
"""

import asyncio
import collections.abc
import contextlib

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from topology_workload import TopologyRun, assert_holds

from db_retry import build_connection_factory
from db_retry.testing.haproxy import HAProxy
from db_retry.testing.patroni import PatroniCluster
from db_retry.testing.topology_fixtures import HAProxyFactory, PatroniFactory


pytestmark = pytest.mark.standby

WORKERS = 2  # per kind: 4 kinds (asyncpg / psycopg x Transaction / session.begin())


@contextlib.asynccontextmanager
async def engines(asyncpg_url: str, psycopg_url: str) -> collections.abc.AsyncIterator[dict[str, AsyncEngine]]:
    """A warm QueuePool engine per driver, as a service builds it (asyncpg through the connection factory)."""
    url = sa.make_url(asyncpg_url)
    made = {
        "asyncpg": create_async_engine(
            url, async_creator=build_connection_factory(url, timeout=2.0), pool_size=2 * WORKERS, max_overflow=0
        ),
        "psycopg": create_async_engine(
            psycopg_url, connect_args={"connect_timeout": 2}, pool_size=2 * WORKERS, max_overflow=0
        ),
    }
    try:
        yield made
    finally:
        for engine in made.values():
            await engine.dispose()


async def _switchover_then_failover(run: TopologyRun, cluster: PatroniCluster, haproxy: HAProxy | None = None) -> None:
    record = run.fault("switchover")
    record.ha_seconds = (await cluster.switchover()).seconds
    await run.wait_commits(50)
    await cluster.wait_streaming()  # the old leader is a streaming replica again: it may be promoted next
    if haproxy is not None:
        await asyncio.to_thread(haproxy.wait_checked)
    record = run.fault("postmaster killed")
    record.unplanned = True
    record.ha_seconds = (await cluster.failover()).seconds
    await run.wait_commits(50)


async def test_patroni_multihost_dsn_rides_through_switchover_and_failover(patroni_cluster: PatroniFactory) -> None:
    cluster = patroni_cluster(2)
    async with engines(cluster.multihost_dsn(), cluster.multihost_dsn(driver="psycopg")) as made:
        run = TopologyRun("patroni multi-host DSN", made, workers=WORKERS, markers=True)
        await run.start()
        await _switchover_then_failover(run, cluster)
        report = await run.finish()
    # Asynchronous replication (Patroni's default): a commit acknowledged just before the kill may be gone.
    assert_holds(report, replication_loss_allowed=True)


async def test_patroni_synchronous_mode_loses_no_acknowledged_commit_on_failover(
    patroni_cluster: PatroniFactory,
) -> None:
    cluster = patroni_cluster(2, synchronous_mode=True)
    await cluster.wait_synchronous()
    async with engines(cluster.multihost_dsn(), cluster.multihost_dsn(driver="psycopg")) as made:
        run = TopologyRun("patroni synchronous_mode", made, workers=WORKERS)
        await run.start()
        record = run.fault("postmaster killed")
        record.unplanned = True
        record.ha_seconds = (await cluster.failover()).seconds
        await run.wait_commits(50)
        report = await run.finish()
    assert_holds(report)  # lost_to_replication == 0 too


async def test_patroni_through_haproxy_rides_through_switchover_and_failover(
    patroni_cluster: PatroniFactory, haproxy: HAProxyFactory
) -> None:
    cluster = patroni_cluster(2)
    balancer = haproxy(cluster)
    async with engines(balancer.dsn(), balancer.dsn(driver="psycopg")) as made:
        run = TopologyRun("patroni via haproxy", made, workers=WORKERS, markers=True)
        await run.start()
        await _switchover_then_failover(run, cluster, balancer)
        report = await run.finish()
    assert_holds(report, replication_loss_allowed=True)
