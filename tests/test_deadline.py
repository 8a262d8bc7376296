"""One deadline per call: ``postgres_retry(deadline=...)`` bounds attempts and waits, on the client and the server.

Silence is real (the kit's proxy stops forwarding without a reset); the server's own limits are read back
from the server.
"""

import asyncio
import collections.abc
import typing
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from test_commit_markers import STYLES, _write  # one write per commit style, shared

from db_retry import CommitOutcomeUnknownError, ErrorKind, RetryEvent, Transaction, postgres_retry
from db_retry.testing import PostgresCluster, PostgresNode, faults
from db_retry.testing.cluster import free_port
from db_retry.testing.proxy import FrontendMessage, TcpProxy, query_starts_with


pytestmark = pytest.mark.standby

DRIVERS: typing.Final = ("asyncpg", "psycopg")


def _engine(node: PostgresNode, driver: str, *, through: TcpProxy | None = None) -> AsyncEngine:
    url = sa.make_url(node.dsn(driver=driver))
    if through is not None:
        url = url.set(host=through.host, port=through.port)
    return create_async_engine(url, pool_size=3)


@pytest.fixture
async def node(fresh_cluster: collections.abc.Callable[..., PostgresCluster]) -> PostgresNode:
    primary = fresh_cluster(standbys=0).primary
    await primary.execute("CREATE TABLE ledger (key uuid NOT NULL)")
    return primary


@pytest.mark.parametrize("driver", DRIVERS)
async def test_each_transaction_gets_the_time_left_as_its_server_limits(
    pg_cluster: PostgresCluster, driver: str
) -> None:
    engine = _engine(pg_cluster.primary, driver)

    @postgres_retry(deadline=5)
    async def limits() -> tuple[str, str]:
        async with AsyncSession(engine) as session, session.begin():
            statement = (await session.execute(sa.text("SHOW statement_timeout"))).scalar_one()
            lock = (await session.execute(sa.text("SHOW lock_timeout"))).scalar_one()
            return str(statement), str(lock)

    try:
        statement, lock = await limits()
        async with engine.connect() as connection:  # outside the call: the server's own default again
            assert (await connection.execute(sa.text("SHOW statement_timeout"))).scalar_one() == "0"
    finally:
        await engine.dispose()
    assert statement == lock
    assert statement.endswith("ms")
    assert 0 < int(statement.removesuffix("ms")) <= 5000


def _hang_once_it_runs(proxy: TcpProxy, marker: str) -> collections.abc.Callable[[FrontendMessage], bool]:
    """A predicate that lets the statement reach the server, then makes the proxy silent (no reset)."""

    def predicate(message: FrontendMessage) -> bool:
        if message.kind in {b"Q", b"E"} and marker in (message.sql or ""):
            proxy.hang()  # this message is still forwarded; nothing comes back from here on
        return False

    return predicate


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_silent_server_mid_statement_ends_the_call_at_its_deadline_and_the_server_stops_it(
    node: PostgresNode, driver: str
) -> None:
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy)
        runs = 0

        @postgres_retry(deadline=2)
        async def slow() -> None:
            nonlocal runs
            runs += 1
            async with engine.connect() as connection:
                proxy.cut_after(_hang_once_it_runs(proxy, "deadline-victim"), once=False)
                await connection.execute(sa.text("SELECT pg_sleep(30) /* deadline-victim */"))

        try:
            async with asyncio.timeout(10):  # before: it hung for as long as TCP lets it
                with pytest.raises(TimeoutError):
                    await slow()
        finally:
            proxy.pass_through()
            await engine.dispose()
    assert runs == 1
    # The server gave up on the statement too: its own statement_timeout, the time the call had left. (A
    # backend whose client went away would sleep on for 30 s: PostgreSQL does not watch the socket.)
    for _ in range(300):
        state = await node.fetchval(
            "SELECT state FROM pg_stat_activity WHERE query LIKE '%deadline-victim%' AND pid <> pg_backend_pid()"
        )
        if state != "active":
            break
        await asyncio.sleep(0.05)
    assert state != "active"
    assert "canceling statement due to statement timeout" in node.log_tail(400)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_deadline_that_passes_during_commit_is_outcome_unknown(node: PostgresNode, driver: str) -> None:
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy)
        is_commit = query_starts_with("COMMIT")
        runs = 0

        def hang_at_commit(message: FrontendMessage) -> bool:
            if is_commit(message):
                proxy.hang()  # the COMMIT's answer never comes
            return False

        @postgres_retry(deadline=1.5)
        async def pay(key: uuid.UUID) -> None:
            nonlocal runs
            runs += 1
            async with Transaction(session=AsyncSession(engine)) as transaction:
                await transaction.session.execute(sa.text("INSERT INTO ledger VALUES (:key)"), {"key": key})
                proxy.cut_after(hang_at_commit, once=False)
                await transaction.commit()

        key = uuid.uuid4()
        try:
            async with asyncio.timeout(10):
                with pytest.raises(CommitOutcomeUnknownError) as caught:
                    await pay(key)
        finally:
            proxy.pass_through()
            await engine.dispose()
    assert runs == 1  # never retried
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert any("deadline" in note for note in caught.value.__notes__)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_healthy_long_query_is_never_cut(pg_cluster: PostgresCluster, driver: str) -> None:
    engine = _engine(pg_cluster.primary, driver)

    @postgres_retry(deadline=10)
    async def report() -> str:
        async with engine.connect() as connection:
            return str((await connection.execute(sa.text("SELECT 'done' FROM pg_sleep(5)"))).scalar_one())

    try:
        assert await report() == "done"
    finally:
        await engine.dispose()


async def test_the_deadline_bounds_the_waits_for_an_unreachable_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_RETRY_DEADLINE", "0.5")  # read when decorating
    engine = create_async_engine(f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none")  # refused
    attempts = 0

    @postgres_retry
    async def work() -> None:
        nonlocal attempts
        attempts += 1
        async with engine.connect():
            pass  # pragma: no cover - never connects

    try:
        async with asyncio.timeout(10):  # without a deadline: DB_RETRY_OUTAGE_TIMEOUT, 40 s
            with pytest.raises(TimeoutError):
                await work()
    finally:
        await engine.dispose()
    assert attempts > 1


async def test_a_timeout_of_the_work_itself_is_not_the_deadline(pg_cluster: PostgresCluster) -> None:
    engine = _engine(pg_cluster.primary, "asyncpg")

    @postgres_retry(deadline=5)
    async def impatient() -> None:
        async with engine.begin() as connection:
            async with asyncio.timeout(0.1):
                await connection.execute(sa.text("SELECT pg_sleep(1)"))

    try:
        with pytest.raises(TimeoutError) as caught:
            await impatient()
    finally:
        await engine.dispose()
    assert not isinstance(caught.value, CommitOutcomeUnknownError)


def test_a_bad_deadline_is_refused_at_decoration(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="deadline"):
        postgres_retry(deadline=-1)
    monkeypatch.setenv("DB_RETRY_DEADLINE", "soon")
    with pytest.raises(ValueError, match="DB_RETRY_DEADLINE='soon'"):
        postgres_retry(retries=2)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_pooled_connection_the_server_closed_is_not_handed_out_again_under_a_deadline(
    node: PostgresNode, driver: str
) -> None:
    # The server-side limits are set at BEGIN, in SQLAlchemy's begin event, whose errors SQLAlchemy does not
    # handle: a pooled connection the server had closed went back to the pool there and failed every call
    # after it (thousands in the chaos run). Every call here must succeed.
    engine = _engine(node, driver)

    @postgres_retry(deadline=10)
    async def pay() -> None:
        async with engine.begin() as connection:
            await connection.execute(sa.text("INSERT INTO ledger VALUES (:key)"), {"key": uuid.uuid4()})

    try:
        for _ in range(3):
            await pay()  # a warm pool
        await faults.terminate_backends(node)  # every pooled connection is closed by the server
        for _ in range(6):
            await pay()
    finally:
        await engine.dispose()
    assert await node.fetchval("SELECT count(*) FROM ledger") == 9


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_pooled_connections_found_closed_at_begin_cost_the_call_no_attempt(
    node: PostgresNode, driver: str, style: str
) -> None:
    # Under a deadline the transaction's first statement is db-retry's own (the time left, sent with BEGIN):
    # a connection found lost there ran none of the caller's work, like a refused connect. CI saw calls
    # behind PgBouncer spend their attempts on such connections while the server restarted, then fail on
    # the next restart. Here a warm pool of 4 connections is closed by the server while idle: with 0.8.4's
    # 3 attempts the call must still get through, to the fifth connection, a fresh one.
    await node.execute("CREATE TABLE marker_payments (key uuid NOT NULL)")  # the table _write inserts into
    engine = create_async_engine(node.dsn(driver=driver), pool_size=4, max_overflow=0)
    events: list[RetryEvent] = []
    pay = postgres_retry(deadline=20, on_retry=events.append)(_write)
    try:
        held = [await engine.connect() for _ in range(4)]
        for connection in held:
            await connection.execute(sa.text("SELECT 1"))
            await connection.close()
        await faults.terminate_backends(node)  # every pooled connection is closed by the server
        await pay(style, engine, uuid.uuid4(), lambda: None)
    finally:
        await engine.dispose()
    assert await node.fetchval("SELECT count(*) FROM marker_payments") == 1
    assert len(events) == 4  # one per closed connection, each waited over, none counted
    assert {event.kind for event in events} == {ErrorKind.UNAVAILABLE}


async def test_a_cancellation_during_commit_or_the_first_query_of_a_connection_reaches_the_caller(
    node: PostgresNode,
) -> None:
    # Without a deadline: the caller's own timeout strikes while COMMIT waits on a silent proxy, then while a
    # new connection's first query (the probe of the pool's connect event) does; both end as cancellations.
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, "asyncpg", through=proxy)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1):
                    async with engine.begin() as connection:
                        await connection.execute(sa.text("INSERT INTO ledger VALUES (:key)"), {"key": uuid.uuid4()})
                        proxy.cut_after(_hang_once_it_runs(proxy, "COMMIT"), once=False)
            proxy.pass_through()
            await engine.dispose()
            proxy.cut_after(_hang_once_it_runs(proxy, "SELECT 1"), once=False)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1), engine.connect():
                    pass  # pragma: no cover - the connect never ends
        finally:
            proxy.pass_through()
            await engine.dispose()
