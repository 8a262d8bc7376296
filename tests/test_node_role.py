"""A node that cannot take writes: the pool is refreshed, and the wait is bounded by the outage budget.

A demoted primary, or a standby behind an address that moved: the wait for a writable node is bounded by
the outage budget rather than the attempt count.

Faults are real: ``faults.read_only`` switches ``default_transaction_read_only`` on (as a demoted primary
reports it), and a standby really refuses ``SERIALIZABLE``.
"""

import asyncio
import collections.abc
import gc
import typing
import uuid
import warnings

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from db_retry import ErrorKind, RetryEvent, Transaction, postgres_retry
from db_retry.retriable import classify
from db_retry.testing import PostgresCluster, PostgresNode, faults
from db_retry.testing.proxy import TcpProxy


pytestmark = pytest.mark.standby

DRIVERS: typing.Final = ("asyncpg", "psycopg")
POOL_SIZE: typing.Final = 3


@pytest.fixture(scope="module")
def node() -> collections.abc.Iterator[PostgresNode]:
    with PostgresCluster(name="node-role") as cluster:  # switched read-only and back: a server of its own
        yield cluster.primary


async def _backends(engine: AsyncEngine) -> set[int]:
    """Fill the pool with ``POOL_SIZE`` connections; their backend pids."""
    barrier = asyncio.Barrier(POOL_SIZE)

    async def hold() -> int:
        async with engine.connect() as connection:
            pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            await barrier.wait()
            return int(pid)

    return set(await asyncio.gather(*(hold() for _ in range(POOL_SIZE))))


@pytest.mark.parametrize("driver", DRIVERS)
async def test_behind_one_host_each_retry_reconnects_until_the_node_takes_writes(
    node: PostgresNode, driver: str
) -> None:
    # One host: a DNS name that still points at the demoted node until the failover is over.
    await node.execute("CREATE TABLE IF NOT EXISTS roles (key uuid NOT NULL)")
    engine = create_async_engine(node.dsn(driver=driver), pool_size=POOL_SIZE)
    backends: list[int] = []
    events: list[RetryEvent] = []
    lifted = asyncio.Event()

    async def lift_after_some_retries() -> None:
        while len(events) < 4:  # noqa: ASYNC110 - the hook below only appends
            await asyncio.sleep(0.01)
        await faults._set_read_only(node, value=False, timeout=10)
        lifted.set()

    @postgres_retry(retries=2, on_retry=events.append)
    async def pay(key: uuid.UUID) -> None:
        async with engine.begin() as connection:
            backends.append((await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
            await connection.execute(sa.text("INSERT INTO roles VALUES (:key)"), {"key": key})

    key = uuid.uuid4()
    try:
        pooled = await _backends(engine)
        await faults._set_read_only(node, value=True, timeout=10)
        lifter = asyncio.ensure_future(lift_after_some_retries())
        await pay(key)  # more attempts than retries=2: waiting for a writable node does not use them up
        await lifter
    finally:
        await faults._set_read_only(node, value=False, timeout=10)
        await engine.dispose()
    assert lifted.is_set()
    # The node said it was read-only: wait for it. (An attempt still in flight when it becomes writable
    # again may get its 25006 with the node already saying otherwise: then one counted attempt.)
    assert {event.kind for event in events[:-1]} == {ErrorKind.UNAVAILABLE}
    assert events[-1].kind in {ErrorKind.UNAVAILABLE, ErrorKind.OUTAGE}
    assert {event.sqlstate for event in events} == {"25006"}
    assert len(backends) == len(events) + 1 >= 5
    assert backends[0] in pooled  # the first attempt got a warm pooled connection ...
    assert not set(backends[1:]) & pooled  # ... after the 25006 the pool was refreshed: new backends only
    assert int(await node.fetchval("SELECT count(*) FROM roles WHERE key = $1", key)) == 1


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_read_only_node_is_given_up_on_after_the_outage_budget(
    node: PostgresNode,
    driver: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DB_RETRY_OUTAGE_TIMEOUT", "0.5")
    engine = create_async_engine(node.dsn(driver=driver), pool_size=POOL_SIZE)
    attempts = 0

    @postgres_retry
    async def pay() -> None:
        nonlocal attempts
        attempts += 1
        async with engine.begin() as connection:
            await connection.execute(sa.text("CREATE TEMPORARY TABLE scratch (n int)"))

    try:
        async with faults.read_only(node):
            with pytest.raises(sa.exc.DBAPIError) as caught:
                await pay()
    finally:
        await engine.dispose()
    assert "read-only transaction" in str(caught.value)
    assert classify(caught.value) is ErrorKind.UNAVAILABLE
    assert attempts > 1


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_read_only_transaction_of_the_callers_own_is_not_a_node_role_error(
    node: PostgresNode, driver: str
) -> None:
    # The node takes writes; the caller asked for a read-only transaction: nothing to wait for.
    engine = create_async_engine(node.dsn(driver=driver), pool_size=POOL_SIZE)
    try:
        pooled = await _backends(engine)
        async with engine.connect() as connection:
            await connection.execute(sa.text("SET TRANSACTION READ ONLY"))
            with pytest.raises(sa.exc.DBAPIError) as caught:
                await connection.execute(sa.text("CREATE TEMPORARY TABLE scratch (n int)"))
        assert classify(caught.value) is None  # the session's own doing: retrying cannot help
        assert not caught.value.connection_invalidated
        assert await _backends(engine) == pooled  # the pool was left alone
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_standby_refusing_serializable_does_not_poison_the_pool(
    pg_cluster: PostgresCluster, driver: str
) -> None:
    # Behind HAProxy, a connection may reach the old leader (now a standby) before the check marks it down.
    primary, standby = pg_cluster.primary, pg_cluster.standbys[0]
    async with TcpProxy(primary.host, primary.port) as address:
        url = sa.make_url(primary.dsn(driver=driver)).set(host=address.host, port=address.port)
        engine = create_async_engine(url, pool_size=1, isolation_level="SERIALIZABLE")
        try:
            async with engine.begin() as connection:  # a warm, initialized engine on the primary
                await connection.execute(sa.text("SELECT 1"))
            address.target_port = standby.port  # the address now leads to the standby ...
            address.cut()  # ... and the open session is gone
            address.pass_through()
            for attempt in range(3):  # the one-connection pool, again and again: the same refusal every time
                with pytest.raises(sa.exc.DBAPIError) as caught:
                    async with engine.begin() as connection:
                        await connection.execute(sa.text("SELECT 1"))
                if attempt == 0 and "cannot use serializable" not in str(caught.value):
                    continue  # the first use may find the cut connection first
                assert "cannot use serializable mode in a hot standby" in str(caught.value)
                assert classify(caught.value) is ErrorKind.UNAVAILABLE
        finally:
            await engine.dispose()


STYLES: typing.Final = ("engine.begin()", "session.begin()", "Transaction")


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_under_a_deadline_a_standby_refusing_serializable_is_waited_for_not_failed(
    pg_cluster: PostgresCluster, driver: str, style: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With deadline=, the time left is set as the transaction's first statement, from SQLAlchemy's begin
    # event: the drivers send BEGIN ISOLATION LEVEL SERIALIZABLE with it, so a standby's 0A000 comes from
    # there, outside SQLAlchemy's error handling. It must still be "no writable node yet" (CI saw 7 calls
    # through HAProxy fail with it at once after a switchover), not an error of the caller's.
    monkeypatch.setenv("DB_RETRY_OUTAGE_TIMEOUT", "0.5")
    engine = create_async_engine(pg_cluster.standbys[0].dsn(driver=driver), pool_size=POOL_SIZE)
    events: list[RetryEvent] = []

    @postgres_retry(deadline=20, on_retry=events.append)
    async def read() -> int:
        if style == "engine.begin()":
            async with engine.connect() as connection:
                serializable = await connection.execution_options(isolation_level="SERIALIZABLE")
                async with serializable.begin():
                    return int((await serializable.execute(sa.text("SELECT 1"))).scalar_one())
        session = AsyncSession(engine)
        if style == "session.begin()":
            async with session, session.begin():
                await session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
                return int((await session.execute(sa.text("SELECT 1"))).scalar_one())
        async with Transaction(session=session, isolation_level="SERIALIZABLE") as transaction:
            value = int((await transaction.session.execute(sa.text("SELECT 1"))).scalar_one())
            await transaction.commit()
            return value

    try:
        assert len(await _backends(engine)) == POOL_SIZE  # warm: the standby serves plain reads
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the driver's own class, either driver
            await read()
    finally:
        await engine.dispose()
    assert "cannot use serializable mode in a hot standby" in str(caught.value)
    assert classify(caught.value) is ErrorKind.UNAVAILABLE
    assert len(events) >= 2  # waited for a writable node within the outage budget, not one attempt and out
    assert {(event.kind, event.sqlstate) for event in events} == {(ErrorKind.UNAVAILABLE, "0A000")}


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_standby_refusing_the_engines_setup_while_connecting_is_unavailable(
    pg_cluster: PostgresCluster,
    driver: str,
) -> None:
    engine = create_async_engine(pg_cluster.standbys[0].dsn(driver=driver), isolation_level="SERIALIZABLE")
    try:
        with pytest.raises(sa.exc.DBAPIError) as caught:
            async with engine.connect() as connection:  # the engine's first connect runs a transaction
                await connection.execute(sa.text("SELECT 1"))
    finally:
        await engine.dispose()
    # psycopg reports the standby's refusal; asyncpg's first connect swallows it but keeps the failed
    # transaction, so its next query fails on that poisoned connection (the connect fails: discarded).
    message, kind = str(caught.value), classify(caught.value)
    del caught  # its traceback holds the failed connection
    with warnings.catch_warnings():
        # SQLAlchemy 2.0 (not 2.1) drops the connection of a failed first connect without closing it.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    assert "hot standby" in message or "SAVEPOINT can only be used" in message
    assert kind is ErrorKind.UNAVAILABLE


@pytest.mark.parametrize("driver", DRIVERS)
async def test_the_callers_cancellation_of_a_statement_is_left_alone(node: PostgresNode, driver: str) -> None:
    engine = create_async_engine(node.dsn(driver=driver), pool_size=1)
    try:
        async with engine.connect() as connection:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await connection.execute(sa.text("SELECT pg_sleep(10)"))
        async with engine.connect() as connection:  # the pool goes on
            assert (await connection.execute(sa.text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()
