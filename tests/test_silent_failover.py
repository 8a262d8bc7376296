"""A primary that falls silent mid-query while another node takes over: the call ends on the new primary.

Three real kinds of silence, with the defaults (no setting of db-retry's changed): the kit's proxy stops
forwarding (the kernel still acknowledges: the watchdog's case), the node is frozen (``SIGSTOP`` of its
processes: the same), and the node is partitioned (iptables drops its packets: keepalives and the
watchdog both apply). The standby is promoted the moment the fault strikes; the pool is warm, its
connections on the old primary; the DSN names both nodes with ``target_session_attrs=read-write``.
"""

import asyncio
import collections.abc
import contextlib
import typing
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db_retry import build_connection_factory, postgres_retry
from db_retry.testing import PostgresCluster, PostgresNode, faults
from db_retry.testing.proxy import TcpProxy


pytestmark = pytest.mark.standby

DRIVERS: typing.Final = ("asyncpg", "psycopg")
SILENCES: typing.Final = ("proxy hang", "freeze", "partition")
POOL_SIZE: typing.Final = 3


def _engine(first: tuple[str, int], second: PostgresNode, user: str, database: str, driver: str) -> AsyncEngine:
    hosts = f"host={first[0]}:{first[1]}&host={second.host}:{second.port}"
    url = sa.make_url(f"postgresql+{driver}://{user}@/{database}?{hosts}&target_session_attrs=read-write")
    if driver == "asyncpg":
        factory = build_connection_factory(url.set(drivername="postgresql"), timeout=2)
        return create_async_engine(url, pool_size=POOL_SIZE, async_creator=factory)
    return create_async_engine(url.update_query_dict({"connect_timeout": "2"}), pool_size=POOL_SIZE)


async def _warm(engine: AsyncEngine) -> None:
    barrier = asyncio.Barrier(POOL_SIZE)

    async def hold() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
            await barrier.wait()

    await asyncio.gather(*(hold() for _ in range(POOL_SIZE)))


@contextlib.asynccontextmanager
async def _silence(kind: str, node: PostgresNode, proxy: TcpProxy) -> collections.abc.AsyncIterator[None]:
    if kind == "proxy hang":
        proxy.hang()
        try:
            yield
        finally:
            proxy.pass_through()
    elif kind == "freeze":
        async with faults.freeze(node):
            yield
    else:
        async with faults.partition(node, proxy):
            yield


@pytest.mark.parametrize("silence", SILENCES)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_primary_silent_mid_query_is_left_for_the_new_primary(
    fresh_cluster: collections.abc.Callable[..., PostgresCluster], driver: str, silence: str
) -> None:
    cluster = fresh_cluster(standbys=1)
    old, new = cluster.primary, cluster.standbys[0]
    await old.execute("CREATE TABLE ledger (key uuid NOT NULL, node text NOT NULL)")
    await cluster.wait_for_replay()
    async with TcpProxy(old.host, old.port) as proxy:
        engine = _engine((proxy.host, proxy.port), new, old.user, old.database, driver)
        await _warm(engine)
        struck = asyncio.Event()
        release = asyncio.Event()
        runs = 0

        async def strike() -> None:
            async with _silence(silence, old, proxy):
                await asyncio.to_thread(new.promote)  # another node takes over at once
                struck.set()
                await release.wait()

        @postgres_retry
        async def pay(key: uuid.UUID) -> str:
            nonlocal runs
            runs += 1
            async with engine.begin() as connection:
                node = (await connection.execute(sa.text("SELECT inet_server_port()::text"))).scalar_one()
                await connection.execute(sa.text("INSERT INTO ledger VALUES (:key, :node)"), {"key": key, "node": node})
                if runs == 1:
                    striker.append(asyncio.ensure_future(strike()))
                    await struck.wait()
                await connection.execute(sa.text("SELECT pg_sleep(0.2)"))  # silent here on the first run
            return str(node)

        striker: list[asyncio.Future[None]] = []
        key = uuid.uuid4()
        try:
            async with asyncio.timeout(30):  # without the defences: stuck for as long as TCP lets it
                served_by = await pay(key)
        finally:
            release.set()
            await asyncio.gather(*striker)
            await engine.dispose()
    assert served_by == str(new.port)
    assert runs == 2
    assert await new.fetchval("SELECT count(*) FROM ledger WHERE key = $1", key) == 1


async def test_a_deadline_against_a_frozen_server_ends_the_call_and_the_server_stops_the_statement(
    fresh_cluster: collections.abc.Callable[..., PostgresCluster],
) -> None:
    node = fresh_cluster(standbys=0).primary
    engine = create_async_engine(node.dsn(driver="asyncpg"), pool_size=2)
    frozen = asyncio.Event()
    release = asyncio.Event()

    async def freeze() -> None:
        async with faults.freeze(node):
            frozen.set()
            await release.wait()

    async def freeze_soon() -> None:
        await asyncio.sleep(0.3)  # the statement runs on the server by then
        await freeze()

    @postgres_retry(deadline=2)
    async def report() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
            fault.append(asyncio.ensure_future(freeze_soon()))
            await connection.execute(sa.text("SELECT pg_sleep(30) /* frozen-victim */"))

    fault: list[asyncio.Future[None]] = []
    try:
        async with asyncio.timeout(20):
            with pytest.raises(TimeoutError):
                await report()
    finally:
        release.set()
        await asyncio.gather(*fault)
        await engine.dispose()
    assert frozen.is_set()
    # Resumed, the server stops the statement by itself: its statement_timeout was the time the call had left
    # (a backend whose client went away would sleep on: PostgreSQL does not watch the socket meanwhile).
    for _ in range(200):
        active = await node.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%frozen-victim%' AND state = 'active'"
            " AND pid <> pg_backend_pid()"
        )
        if active == 0:
            break
        await asyncio.sleep(0.05)
    assert active == 0
