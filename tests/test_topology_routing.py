"""Routing reads to replicas behind HAProxy's ``/replica`` listener of a real Patroni cluster.

One engine stands for whatever server HAProxy sends its connection to. Across a switchover, HAProxy's
replica listener may still lead to the new leader until its checks catch up: the health check must then
see a primary (not in recovery) and send reads to the primary engine; once HAProxy moved, the old leader
(now a streaming replica) serves reads again.
"""

import asyncio
import collections.abc

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db_retry import postgres_retry
from db_retry.routing import READ, RoutingSessionMaker
from db_retry.testing.topology_fixtures import HAProxyFactory, PatroniFactory


pytestmark = pytest.mark.standby


async def _until(condition: collections.abc.Callable[[], bool], timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    pytest.fail("the condition never held")  # pragma: no cover


@postgres_retry  # as a service reads: HAProxy's shutdown-sessions ends pooled sessions at a switchover
async def _routed_read(maker: RoutingSessionMaker) -> tuple[int, bool, int]:
    """Where a routed read ran (server port, in recovery) and how many rows it saw."""
    async with maker() as session:
        port, in_recovery, rows = (
            await session.execute(
                sa.text("SELECT inet_server_port(), pg_is_in_recovery(), (SELECT count(*) FROM routed)"),
                execution_options={READ: True},  # text() counts as a write unless it says it reads
            )
        ).one()
    return int(port), bool(in_recovery), int(rows)


async def test_replicas_behind_haproxy_follow_a_switchover(
    patroni_cluster: PatroniFactory,
    haproxy: HAProxyFactory,
) -> None:
    cluster = patroni_cluster(2)
    balancer = haproxy(cluster)
    leader = cluster.leader()
    replica = next(member for member in cluster.members if member is not leader)
    primary: AsyncEngine = create_async_engine(balancer.dsn("primary", driver="asyncpg"), pool_size=2)
    replicas: AsyncEngine = create_async_engine(balancer.dsn("replicas", driver="asyncpg"), pool_size=2)
    maker = RoutingSessionMaker(primary, {"haproxy-replicas": replicas}, check_interval=None, max_lag_bytes=0)
    try:
        async with primary.begin() as connection:
            await connection.execute(sa.text("CREATE TABLE routed (n int)"))
            await connection.execute(sa.text("INSERT INTO routed SELECT generate_series(1, 5)"))
        await cluster.wait_streaming()
        for _ in range(200):  # until the replica has replayed the rows (max_lag_bytes=0)
            if (await maker.refresh())["haproxy-replicas"].healthy:
                break
            await asyncio.sleep(0.05)
        assert await _routed_read(maker) == (replica.node.port, True, 5)

        await cluster.switchover()
        await _until(lambda: balancer.up("primary") == [replica.name])
        # Until HAProxy's checks move it, the replica listener may lead to the new leader: never a "replica".
        status = (await maker.refresh())["haproxy-replicas"]
        _, in_recovery, rows = await _routed_read(maker)
        assert in_recovery or not status.healthy  # a primary behind the replica listener gets no reads
        assert rows == 5
        await _until(lambda: balancer.up("replicas") == [leader.name])
        await cluster.wait_streaming()
        await replicas.dispose()  # connections made before the move still lead to the new leader
        for _ in range(200):
            if (await maker.refresh())["haproxy-replicas"].healthy:
                break
            await asyncio.sleep(0.05)
        assert await _routed_read(maker) == (leader.node.port, True, 5)  # the old leader serves reads again
    finally:
        await maker.close()
        await primary.dispose()
        await replicas.dispose()
