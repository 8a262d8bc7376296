"""Read/write routing against the kit's real primary and standbys.

Where a statement ran is read from the server that ran it: ``pg_is_in_recovery()`` and
``inet_server_port()`` in the statement itself (or in its ``RETURNING``). The tests that need servers
use ``pg_cluster`` / ``fresh_cluster``, which skip them when ``DB_DSN`` names one external server.
"""

import asyncio
import collections.abc
import contextlib
import logging
import socket
import typing
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from db_retry import build_connection_factory, postgres_retry
from db_retry.routing import READ, USE_PRIMARY, ReplicaStatus, RoutingSession, RoutingSessionMaker
from db_retry.testing import faults
from db_retry.testing.cluster import PostgresCluster, PostgresNode
from db_retry.testing.proxy import TcpProxy
from db_retry.testing.pytest_plugin import ClusterFactory
from db_retry.transaction import Transaction


Where = tuple[bool, int]
WHERE: typing.Final = sa.select(sa.func.pg_is_in_recovery(), sa.func.inet_server_port())


class Base(orm.DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "routing_items"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]


def on(node: PostgresNode, *, standby: bool) -> Where:
    return (standby, node.port)


async def where(session: AsyncSession, **options: object) -> Where:
    """Where ``session`` runs a plain SELECT now (the options are passed to ``execute``)."""
    in_recovery, port = (await session.execute(WHERE, execution_options=options)).one()
    return (in_recovery, port)


def unique_name() -> str:
    return f"item-{uuid.uuid4().hex}"


async def eventually(predicate: collections.abc.Callable[[], bool], *, timeout: float = 30.0) -> None:
    """Wait until ``predicate()`` holds (a bound on the wait, not a timed assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            msg = f"condition still false after {timeout}s"
            raise AssertionError(msg)
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def replay_paused(cluster: PostgresCluster, standby: PostgresNode) -> collections.abc.AsyncIterator[None]:
    """Pause WAL replay on ``standby`` (it keeps receiving); resume and catch up on exit."""
    await standby.execute("SELECT pg_wal_replay_pause()")
    try:
        yield
    finally:
        await standby.execute("SELECT pg_wal_replay_resume()")
        await cluster.wait_for_replay(standby)


def engine_for(node: PostgresNode, driver: str = "asyncpg") -> AsyncEngine:
    return create_async_engine(node.dsn(driver=driver))


@pytest.fixture(scope="module")
async def schema(pg_cluster: PostgresCluster) -> None:
    engine = engine_for(pg_cluster.primary)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    await engine.dispose()
    await pg_cluster.wait_for_replay()


@pytest.fixture
async def primary(pg_cluster: PostgresCluster) -> collections.abc.AsyncIterator[AsyncEngine]:
    engine = engine_for(pg_cluster.primary)
    yield engine
    await engine.dispose()


@pytest.fixture
async def replica(pg_cluster: PostgresCluster) -> collections.abc.AsyncIterator[AsyncEngine]:
    engine = engine_for(pg_cluster.standbys[0])
    yield engine
    await engine.dispose()


@pytest.fixture
async def maker(
    primary: AsyncEngine,
    replica: AsyncEngine,
    schema: None,  # noqa: ARG001 - the table must exist
) -> collections.abc.AsyncIterator[RoutingSessionMaker]:
    routing = RoutingSessionMaker(primary, {"standby": replica}, check_interval=None)
    assert (await routing.refresh())["standby"].healthy
    yield routing
    await routing.close()


@pytest.fixture
def primary_node(pg_cluster: PostgresCluster) -> PostgresNode:
    return pg_cluster.primary


@pytest.fixture
def standby_node(pg_cluster: PostgresCluster) -> PostgresNode:
    return pg_cluster.standbys[0]


# -- what goes where -------------------------------------------------------------------------------


async def test_reads_run_on_the_replica_and_writes_on_the_primary(
    maker: RoutingSessionMaker, primary_node: PostgresNode, standby_node: PostgresNode
) -> None:
    async with maker() as session:
        assert await where(session) == on(standby_node, standby=True)
        inserted = sa.insert(Item).values(name=unique_name()).returning(sa.func.inet_server_port())
        assert (await session.execute(inserted)).scalar_one() == primary_node.port
        # Read-your-writes: the rest of the transaction follows the write.
        assert await where(session) == on(primary_node, standby=False)
        await session.commit()
        # A new transaction reads from the replica again.
        assert await where(session) == on(standby_node, standby=True)
        changed = sa.update(Item).where(Item.id == -1).values(name="x").returning(sa.func.inet_server_port())
        assert (await session.execute(changed)).all() == []
        assert await where(session) == on(primary_node, standby=False)
        await session.rollback()
        assert await where(session) == on(standby_node, standby=True)
        await session.execute(sa.delete(Item).where(Item.id == -1))
        assert await where(session) == on(primary_node, standby=False)


async def test_orm_insert_on_the_primary_read_back_from_the_replica(
    maker: RoutingSessionMaker, pg_cluster: PostgresCluster, standby_node: PostgresNode
) -> None:
    name = unique_name()
    async with maker() as session:
        session.add(Item(name=name))
        await session.commit()
    assert await pg_cluster.primary.fetchval("SELECT count(*) FROM routing_items WHERE name = $1", name) == 1
    await pg_cluster.wait_for_replay()
    async with maker() as session:
        query = sa.select(Item, sa.func.pg_is_in_recovery(), sa.func.inet_server_port()).where(Item.name == name)
        item, in_recovery, port = (await session.execute(query)).one()
        assert item.name == name
        assert (in_recovery, port) == on(standby_node, standby=True)
        assert await session.get(Item, item.id) is item


async def test_read_your_writes_sees_a_row_the_replica_has_not_replayed(
    maker: RoutingSessionMaker, pg_cluster: PostgresCluster, primary_node: PostgresNode, standby_node: PostgresNode
) -> None:
    name = unique_name()
    by_name = sa.select(Item).where(Item.name == name)
    async with replay_paused(pg_cluster, standby_node), maker() as writer, maker() as reader:
        writer.add(Item(name=name))
        # The autoflush before this SELECT writes on the primary; the SELECT follows it there.
        assert (await writer.execute(by_name)).scalar_one().name == name
        assert await where(writer) == on(primary_node, standby=False)
        await writer.commit()
        # Another session reads from the replica, which has not replayed the commit.
        assert (await reader.execute(by_name)).scalar_one_or_none() is None
        assert await where(reader) == on(standby_node, standby=True)


async def test_an_explicit_flush_moves_the_transaction_to_the_primary(
    maker: RoutingSessionMaker, primary_node: PostgresNode, standby_node: PostgresNode
) -> None:
    async with maker(autoflush=False) as session:
        session.add(Item(name=unique_name()))
        assert await where(session) == on(standby_node, standby=True)  # nothing written yet
        await session.flush()
        assert await where(session) == on(primary_node, standby=False)
        await session.rollback()


async def test_bulk_writes_count_as_writes_and_asking_for_the_bind_does_not(
    maker: RoutingSessionMaker, primary_node: PostgresNode, standby_node: PostgresNode
) -> None:
    async with maker() as session:
        assert session.get_bind() is maker.primary.sync_engine  # e.g. to read the dialect
        assert await where(session) == on(standby_node, standby=True)
        await session.run_sync(lambda sync: sync.bulk_insert_mappings(Item, [{"name": unique_name()}]))
        assert await where(session) == on(primary_node, standby=False)


async def test_text_is_a_write_unless_marked_read(
    maker: RoutingSessionMaker, primary_node: PostgresNode, standby_node: PostgresNode
) -> None:
    port = sa.text("SELECT inet_server_port()")
    async with maker() as session:
        assert (await session.execute(port.execution_options(**{READ: True}))).scalar_one() == standby_node.port
        assert (await session.execute(port, execution_options={READ: True})).scalar_one() == standby_node.port
        assert (await session.execute(port)).scalar_one() == primary_node.port
        assert await where(session) == on(primary_node, standby=False)  # text() counted as a write
    async with maker() as session:
        # READ=False: a SELECT that writes (a volatile function, a data-modifying CTE) is a write.
        assert await where(session, **{READ: False}) == on(primary_node, standby=False)
        assert await where(session) == on(primary_node, standby=False)


async def test_row_locking_reads_run_on_the_primary_and_count_as_writes(
    maker: RoutingSessionMaker, primary_node: PostgresNode, standby_node: PostgresNode, pg_cluster: PostgresCluster
) -> None:
    async with maker() as session:
        session.add(item := Item(name=unique_name()))
        await session.flush()
        item_id = item.id
        await session.commit()
    await pg_cluster.wait_for_replay()
    port_of = sa.select(sa.func.inet_server_port()).select_from(Item).where(Item.id == item_id)
    for lock in (port_of.with_for_update(), port_of.with_for_update(read=True)):
        async with maker() as session:
            assert await where(session) == on(standby_node, standby=True)
            # A standby refuses row locks; the lock (a write to the row) keeps the transaction on the primary.
            assert await session.scalar(lock) == primary_node.port
            assert await where(session) == on(primary_node, standby=False)
    async with maker() as session:
        assert await session.get(Item, item_id, with_for_update=True) is not None
        assert await where(session) == on(primary_node, standby=False)


async def test_use_primary_for_one_statement_or_a_whole_session(
    maker: RoutingSessionMaker, primary_node: PostgresNode, standby_node: PostgresNode
) -> None:
    on_primary = on(primary_node, standby=False)
    on_standby = on(standby_node, standby=True)
    async with maker() as session:
        assert await where(session, **{USE_PRIMARY: True}) == on_primary
        assert await where(session) == on_standby  # the override does not count as a write
        assert tuple((await session.execute(WHERE.execution_options(**{USE_PRIMARY: True}))).one()) == on_primary
        by_bind_argument = await session.execute(WHERE, bind_arguments={USE_PRIMARY: True})
        assert tuple(by_bind_argument.one()) == on_primary
        assert await where(session) == on_standby
    async with maker(use_primary=True) as session:
        assert await where(session) == on_primary
        assert isinstance(session.sync_session, RoutingSession)
        session.sync_session.use_primary = False
        assert await where(session) == on_standby
    async with maker() as session:
        # An explicit bind is obeyed.
        chosen = await session.execute(WHERE, bind_arguments={"bind": maker.primary.sync_engine})
        assert tuple(chosen.one()) == on_primary


async def test_refreshing_an_object_reads_the_primary(
    maker: RoutingSessionMaker, pg_cluster: PostgresCluster, standby_node: PostgresNode
) -> None:
    async with maker() as session:
        session.add(item := Item(name=unique_name()))
        await session.flush()
        item_id, item_name = item.id, item.name
        await session.commit()
    await pg_cluster.wait_for_replay()
    async with maker() as session:
        loaded = await session.get(Item, item_id)
        assert loaded is not None
        await session.commit()
        async with replay_paused(pg_cluster, standby_node):
            await pg_cluster.primary.execute("UPDATE routing_items SET name = 'renamed' WHERE id = $1", item_id)
            await session.refresh(loaded)  # the object's latest state: from the primary
            assert loaded.name == "renamed"
            stale = await session.scalar(sa.select(Item.name).where(Item.id == item_id))
            assert stale == item_name  # a plain read still goes to the replica, which has not replayed it


async def test_a_connection_handed_out_pins_the_transaction_to_the_primary(
    maker: RoutingSessionMaker, primary_node: PostgresNode, standby_node: PostgresNode
) -> None:
    async with maker() as session:
        connection = await session.connection()
        assert (await connection.scalar(sa.select(sa.func.inet_server_port()))) == primary_node.port
        assert await where(session) == on(primary_node, standby=False)
        await session.commit()
        replica_connection = await session.connection(bind_arguments={"clause": WHERE})
        assert (await replica_connection.execute(WHERE)).one() == on(standby_node, standby=True)
        assert await where(session) == on(standby_node, standby=True)
    async with Transaction(session=maker(), isolation_level="REPEATABLE READ") as transaction:
        level = await transaction.session.scalar(sa.select(sa.func.current_setting("transaction_isolation")))
        assert level == "repeatable read"
        assert await where(transaction.session) == on(primary_node, standby=False)


# -- replicas at run time, health ------------------------------------------------------------------


async def test_status_after_a_check(maker: RoutingSessionMaker) -> None:
    status = maker.replicas["standby"]
    assert status.healthy
    assert status.reachable
    assert status.in_recovery
    assert status.streaming is True
    assert status.lag is not None
    assert status.lag >= 0
    assert status.lag_bytes is not None
    assert status.lag_bytes >= 0
    assert status.unreplayed_bytes is not None
    assert status.unreplayed_bytes >= 0
    assert status.checked_at is not None
    assert status.reason is None


async def test_replicas_added_and_removed_at_run_time(
    primary: AsyncEngine, replica: AsyncEngine, primary_node: PostgresNode, standby_node: PostgresNode
) -> None:
    async with RoutingSessionMaker(primary, check_interval=None) as maker:
        assert maker.replicas == {}
        assert await maker.refresh() == {}
        async with maker() as session:
            assert await where(session) == on(primary_node, standby=False)
            status = await maker.add_replica(replica)
            assert status.name == standby_node.address
            assert status.healthy
            await session.commit()
            assert await where(session) == on(standby_node, standby=True)
            with pytest.raises(ValueError, match="already routed to"):
                await maker.add_replica(replica)
            # Removed while a transaction reads from it: the next read of that transaction moves on.
            await maker.remove_replica(standby_node.address)
            assert maker.replicas == {}
            assert await where(session) == on(primary_node, standby=False)
        with pytest.raises(KeyError, match="no replica named 'nope'"):
            await maker.remove_replica("nope")
    # The engine was not the maker's to close.
    async with replica.connect() as connection:
        assert await connection.scalar(sa.select(sa.func.inet_server_port())) == standby_node.port


async def test_a_replica_serves_no_reads_before_its_first_check(
    primary: AsyncEngine, replica: AsyncEngine, primary_node: PostgresNode
) -> None:
    async with RoutingSessionMaker(primary, [replica], check_interval=None) as maker, maker() as session:
        name = f"127.0.0.1:{replica.url.port}"
        assert maker.replicas == {name: ReplicaStatus(name=name, reason="not checked yet")}
        assert await where(session) == on(primary_node, standby=False)


@pytest.mark.usefixtures("schema")  # the table must exist
async def test_a_replica_beyond_max_lag_is_skipped_until_it_catches_up(
    primary: AsyncEngine,
    replica: AsyncEngine,
    pg_cluster: PostgresCluster,
    standby_node: PostgresNode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="db_retry.routing")
    async with RoutingSessionMaker(primary, {"standby": replica}, max_lag=0.2, check_interval=None) as maker:
        assert (await maker.refresh())["standby"].healthy
        async with replay_paused(pg_cluster, standby_node):
            await pg_cluster.primary.execute("INSERT INTO routing_items (name) VALUES ('lag')")

            async def lagging() -> bool:
                return not (await maker.refresh())["standby"].healthy

            await eventually_async(lagging)
            status = maker.replicas["standby"]
            assert status.reachable
            assert status.reason is not None
            assert "exceeds max_lag=0.2s" in status.reason
            assert status.lag is not None
            assert status.lag > 0.2
            async with maker() as session:
                assert await where(session) == on(pg_cluster.primary, standby=False)
        assert (await maker.refresh())["standby"].healthy
        async with maker() as session:
            assert await where(session) == on(standby_node, standby=True)
    messages = [record.getMessage() for record in caplog.records]
    assert any("replica standby skipped: replay lag" in message for message in messages)
    assert "replica standby serves reads" in messages


@pytest.mark.usefixtures("schema")  # the table must exist
async def test_a_replica_beyond_max_lag_bytes_is_skipped(
    primary: AsyncEngine,
    replica: AsyncEngine,
    pg_cluster: PostgresCluster,
    primary_node: PostgresNode,
    standby_node: PostgresNode,
) -> None:
    async with RoutingSessionMaker(primary, [replica], max_lag_bytes=4096, check_interval=None) as maker:
        name = standby_node.address
        assert (await maker.refresh())[name].healthy
        async with replay_paused(pg_cluster, standby_node):
            await primary_node.execute(
                "INSERT INTO routing_items (name) SELECT repeat('x', 100) FROM generate_series(1, 1000)"
            )

            async def behind() -> bool:
                return not (await maker.refresh())[name].healthy

            await eventually_async(behind)
            status = maker.replicas[name]
            assert status.streaming is True  # it receives; replay is what is paused
            assert status.unreplayed_bytes is not None
            assert status.unreplayed_bytes > 4096
            assert status.lag_bytes is not None
            assert status.lag_bytes >= status.unreplayed_bytes
            assert status.reason == f"{status.lag_bytes} bytes behind the primary exceeds max_lag_bytes=4096"
            async with maker() as session:
                assert await where(session) == on(primary_node, standby=False)
        assert (await maker.refresh())[name].healthy


async def eventually_async(
    predicate: collections.abc.Callable[[], collections.abc.Awaitable[bool]], *, timeout: float = 30.0
) -> None:
    """Wait until ``await predicate()`` holds (a bound on the wait, not a timed assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            msg = f"condition still false after {timeout}s"
            raise AssertionError(msg)
        await asyncio.sleep(0.05)


async def test_a_hanging_replica_times_out_and_can_be_removed_mid_check(primary: AsyncEngine) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        hanging = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{listener.getsockname()[1]}/postgres")
        try:
            async with RoutingSessionMaker(primary, {"hang": hanging}, check_timeout=0.2, check_interval=None) as maker:
                status = (await maker.refresh())["hang"]
                assert not status.healthy
                assert status.reachable is False
                assert status.reason == "unreachable: timed out after 0.2s"
                in_flight = asyncio.ensure_future(maker.refresh())
                await asyncio.sleep(0.05)
                await maker.remove_replica("hang")
                assert await in_flight == {}
        finally:
            await hanging.dispose()


async def test_a_replica_that_refuses_the_connection_is_skipped_with_the_servers_reason(
    primary: AsyncEngine, standby_node: PostgresNode, primary_node: PostgresNode
) -> None:
    refused = create_async_engine(standby_node.dsn(driver="asyncpg", database="no_such_database"))
    try:
        async with RoutingSessionMaker(primary, {"wrong": refused}, check_interval=None) as maker:
            status = (await maker.refresh())["wrong"]
            assert not status.healthy
            assert status.reachable is False
            assert status.reason is not None
            assert 'database "no_such_database" does not exist' in status.reason
            async with maker() as session:
                assert await where(session) == on(primary_node, standby=False)
    finally:
        await refused.dispose()


async def test_a_replica_engine_made_with_build_connection_factory(
    pg_cluster: PostgresCluster, primary: AsyncEngine, primary_node: PostgresNode, standby_node: PostgresNode
) -> None:
    # Any standby of a multi-host DSN, connected the library's way; checks connect the same way.
    url = pg_cluster.multihost_dsn(target_session_attrs="standby")
    replica = create_async_engine(url, async_creator=build_connection_factory(url, timeout=5))
    try:
        async with RoutingSessionMaker(primary, [replica], check_interval=None) as maker:
            name = f"{primary_node.address},{standby_node.address}"
            assert (await maker.refresh())[name].in_recovery
            async with maker() as session:
                assert await where(session) == on(standby_node, standby=True)
    finally:
        await replica.dispose()


async def test_psycopg_engines(
    schema: None,  # noqa: ARG001 - the table must exist
    primary_node: PostgresNode,
    standby_node: PostgresNode,
) -> None:
    primary, replica = engine_for(primary_node, "psycopg"), engine_for(standby_node, "psycopg")
    try:
        async with RoutingSessionMaker(primary, {"standby": replica}, check_interval=None) as maker:
            assert (await maker.refresh())["standby"].healthy
            async with maker() as session:
                assert await where(session) == on(standby_node, standby=True)
                session.add(Item(name=unique_name()))
                await session.flush()
                assert await where(session) == on(primary_node, standby=False)
                await session.commit()
                assert await where(session) == on(standby_node, standby=True)
    finally:
        await primary.dispose()
        await replica.dispose()


# -- stopped and restarted standbys (a cluster of their own) ---------------------------------------


async def test_stopped_standbys_are_skipped_and_used_again_after_they_restart(fresh_cluster: ClusterFactory) -> None:
    cluster = fresh_cluster(standbys=2)
    first, second = cluster.standbys
    primary = engine_for(cluster.primary)
    replicas = {"first": engine_for(first), "second": engine_for(second)}
    try:
        async with RoutingSessionMaker(primary, replicas, check_interval=None) as maker:
            assert all(status.healthy for status in (await maker.refresh()).values())
            async with maker() as session:
                # One replica per transaction; the next transaction takes the next one in turn.
                ports = set()
                for _ in range(2):
                    here = await where(session)
                    assert await where(session) == here
                    ports.add(here)
                    await session.commit()
                assert ports == {on(first, standby=True), on(second, standby=True)}

            first.stop()
            statuses = await maker.refresh()
            assert not statuses["first"].healthy
            assert statuses["first"].reachable is False
            assert statuses["first"].reason is not None
            assert statuses["first"].reason.startswith("unreachable: ")
            assert statuses["second"].healthy
            async with maker() as session:
                for _ in range(3):
                    assert await where(session) == on(second, standby=True)
                    await session.commit()

            second.stop()
            assert not any(status.healthy for status in (await maker.refresh()).values())
            async with maker() as session:
                assert await where(session) == on(cluster.primary, standby=False)

            first.start()
            second.start()
            assert all(status.healthy for status in (await maker.refresh()).values())
            async with maker() as session:
                # The pools of the stopped replicas were disposed: no dead connection is handed out.
                for _ in range(2):
                    assert (await where(session))[0] is True
                    await session.commit()

            # A restart between two checks: the check's pooled connection died while idle and is
            # replaced at once, so the replica is not reported down.
            first.restart()
            assert (await maker.refresh())["first"].healthy

            # The application's pool still holds connections to the old server process; the first read on
            # one fails with a retriable error and the retry succeeds.
            @postgres_retry(retries=3)
            async def read() -> Where:
                async with maker() as session:
                    return await where(session)

            for _ in range(4):
                assert (await read())[0] is True
    finally:
        await primary.dispose()
        for engine in replicas.values():
            await engine.dispose()


async def test_background_checks_follow_a_standby_down_and_up(fresh_cluster: ClusterFactory) -> None:
    cluster = fresh_cluster(standbys=1)
    (standby,) = cluster.standbys
    primary, replica = engine_for(cluster.primary), engine_for(standby)
    maker = RoutingSessionMaker(primary, {"standby": replica}, check_interval=0.05, check_timeout=1.0)
    try:
        async with maker() as session:  # the first session starts the checks
            await eventually(lambda: maker.replicas["standby"].healthy)
            assert await where(session) == on(standby, standby=True)
        await maker().close()  # another session: the running checks are not started twice
        assert [task.get_name() for task in asyncio.all_tasks()].count("db-retry replica checks") == 1
        standby.stop()
        await eventually(lambda: not maker.replicas["standby"].healthy)
        async with maker() as session:
            assert await where(session) == on(cluster.primary, standby=False)
        standby.start()
        await eventually(lambda: maker.replicas["standby"].healthy)
    finally:
        await maker.close()
        await maker.close()  # idempotent
        await primary.dispose()
        await replica.dispose()
    assert "db-retry replica checks" not in [task.get_name() for task in asyncio.all_tasks()]
    await maker().close()  # a closed maker still makes sessions, without starting checks again
    assert "db-retry replica checks" not in [task.get_name() for task in asyncio.all_tasks()]


# -- configuration (no server needed) --------------------------------------------------------------


def test_a_session_made_outside_the_event_loop_starts_no_checks() -> None:
    engine = create_async_engine("postgresql+asyncpg://app:s3cret-pw@127.0.0.1:1/db")
    maker = RoutingSessionMaker(engine, [create_async_engine("postgresql+asyncpg://app:s3cret-pw@127.0.0.1:2/db")])
    session = maker()
    assert isinstance(session.sync_session, RoutingSession)
    assert maker._task is None
    assert "s3cret-pw" not in repr(maker)
    assert "127.0.0.1:2" in repr(maker)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_lag": -1}, "max_lag must be a number >= 0 or None, got -1"),
        ({"max_lag": True}, "max_lag must be a number >= 0 or None, got True"),
        ({"max_lag_bytes": "1kB"}, "max_lag_bytes must be a number >= 0 or None, got '1kB'"),
        ({"check_interval": 0}, "check_interval must be a number > 0 or None, got 0"),
        ({"check_timeout": None}, "check_timeout must be a number > 0, got None"),
    ],
)
def test_bad_settings_are_named(options: dict[str, typing.Any], message: str) -> None:
    engine = create_async_engine("postgresql+asyncpg://app@127.0.0.1:1/db")
    with pytest.raises(ValueError, match=message):
        RoutingSessionMaker(engine, **options)


def test_engines_must_be_async_and_binds_are_the_makers() -> None:
    engine = create_async_engine("postgresql+asyncpg://app@127.0.0.1:1/db")
    with pytest.raises(TypeError, match="primary must be an AsyncEngine"):
        RoutingSessionMaker(engine.sync_engine)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a replica must be an AsyncEngine"):
        RoutingSessionMaker(engine, [engine.sync_engine])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="RoutingSessionMaker sets bind, binds itself"):
        RoutingSessionMaker(engine, bind=engine, binds={})


def test_a_replaced_option_says_what_replaced_it() -> None:
    engine = create_async_engine("postgresql+asyncpg://app@127.0.0.1:1/db")
    # Not passed on to AsyncSession, where it would fail only at the first session.
    with pytest.raises(TypeError, match=r"^max_unreplayed_bytes was replaced by max_lag_bytes \(WAL the primary"):
        RoutingSessionMaker(engine, max_unreplayed_bytes=4096)


# -- real replication faults (a cluster of their own) ----------------------------------------------

COUNTED: typing.Final = sa.table("fault_items", sa.column("id"))
COUNT_WHERE: typing.Final = sa.select(
    sa.func.count(), sa.func.pg_is_in_recovery(), sa.func.inet_server_port()
).select_from(COUNTED)


async def receiver(standby: PostgresNode) -> tuple[str, int] | None:
    """The standby's WAL receiver as the server itself reports it: (status, upstream port), or None."""
    connection = await standby.connect()
    try:
        row = await connection.fetchrow("SELECT status, sender_port FROM pg_stat_wal_receiver")
    finally:
        await connection.close()
    return None if row is None else (row["status"], row["sender_port"])


async def count_where(maker: RoutingSessionMaker) -> tuple[int, bool, int]:
    """How many fault_items a routed read sees, and where it ran."""
    async with maker() as session:
        count, in_recovery, port = (await session.execute(COUNT_WHERE)).one()
    return (count, in_recovery, port)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_standby_whose_replication_is_cut_gets_no_reads_until_it_streams_again(
    fresh_cluster: ClusterFactory, driver: str
) -> None:
    cluster = fresh_cluster(standbys=1)
    (standby,) = cluster.standbys
    await cluster.primary.execute("CREATE TABLE fault_items (id int)")
    primary, replica = engine_for(cluster.primary, driver), engine_for(standby, driver)
    try:
        async with (
            faults.replication_link(cluster, standby) as link,
            RoutingSessionMaker(primary, {"standby": replica}, check_interval=None) as maker,
        ):
            await cluster.wait_for_replay()
            assert (await maker.refresh())["standby"].healthy
            assert await count_where(maker) == (0, True, standby.port)

            link.cut()  # the network between standby and primary: every connection reset, new ones too

            async def receiver_gone() -> bool:
                return await receiver(standby) is None

            await eventually_async(receiver_gone)
            await cluster.primary.execute("INSERT INTO fault_items SELECT generate_series(1, 5)")
            assert await standby.fetchval("SELECT count(*) FROM fault_items") == 0  # the cut is real

            status = (await maker.refresh())["standby"]
            assert not status.healthy
            assert status.reachable
            assert status.in_recovery
            assert status.streaming is False
            assert status.reason == "not streaming: no WAL receiver"
            # Behind the primary's WAL position, although everything it received is replayed.
            assert status.lag_bytes is not None
            assert status.lag_bytes > 0
            assert status.unreplayed_bytes == 0
            assert status.lag is not None
            assert status.lag > 0
            assert await count_where(maker) == (5, False, cluster.primary.port)

            link.pass_through()  # the receiver reconnects by itself (wal_retrieve_retry_interval)

            async def recovered() -> bool:
                return (await maker.refresh())["standby"].healthy

            await eventually_async(recovered)
            assert maker.replicas["standby"].streaming is True
            await cluster.wait_for_replay()
            assert await count_where(maker) == (5, True, standby.port)
    finally:
        await primary.dispose()
        await replica.dispose()


async def test_a_hung_replication_link_is_caught_by_the_lag_bound(fresh_cluster: ClusterFactory) -> None:
    cluster = fresh_cluster(standbys=1)
    (standby,) = cluster.standbys
    await cluster.primary.execute("CREATE TABLE fault_items (id int, pad text)")
    primary, replica = engine_for(cluster.primary), engine_for(standby)
    try:
        async with (
            faults.replication_link(cluster, standby) as link,
            RoutingSessionMaker(primary, {"standby": replica}, max_lag_bytes=4096, check_interval=None) as maker,
        ):
            await cluster.wait_for_replay()
            assert (await maker.refresh())["standby"].healthy

            link.hang()  # nothing flows; the receiver still reports "streaming" until wal_receiver_timeout
            await cluster.primary.execute(
                "INSERT INTO fault_items SELECT i, repeat('x', 100) FROM generate_series(1, 1000) AS i"
            )
            assert await receiver(standby) == ("streaming", link.port)

            status = (await maker.refresh())["standby"]
            assert not status.healthy
            assert status.streaming is True
            assert status.lag_bytes is not None
            assert status.lag_bytes > 4096
            assert status.reason == f"{status.lag_bytes} bytes behind the primary exceeds max_lag_bytes=4096"
            assert await count_where(maker) == (1000, False, cluster.primary.port)

            link.pass_through()

            async def caught_up() -> bool:
                return (await maker.refresh())["standby"].healthy

            await eventually_async(caught_up)
            assert await count_where(maker) == (1000, True, standby.port)
    finally:
        await primary.dispose()
        await replica.dispose()


async def test_a_cascading_standby_behind_a_cut_upstream_is_caught_by_the_lag_bound(
    fresh_cluster: ClusterFactory,
) -> None:
    cluster = fresh_cluster(standbys=1)
    (upstream,) = cluster.standbys
    cascaded = await asyncio.to_thread(cluster.add_standby, upstream=upstream)
    await cluster.primary.execute("CREATE TABLE fault_items (id int)")
    primary = engine_for(cluster.primary)
    replicas = {"upstream": engine_for(upstream), "cascaded": engine_for(cascaded)}
    try:
        async with (
            faults.replication_link(cluster, upstream) as link,
            RoutingSessionMaker(primary, replicas, max_lag_bytes=0, check_interval=None) as maker,
        ):
            await cluster.wait_for_replay()
            assert all(status.healthy for status in (await maker.refresh()).values())
            link.cut()

            async def upstream_cut_off() -> bool:
                return await receiver(upstream) is None

            await eventually_async(upstream_cut_off)
            await cluster.primary.execute("INSERT INTO fault_items SELECT generate_series(1, 5)")
            statuses = await maker.refresh()
            assert statuses["upstream"].reason == "not streaming: no WAL receiver"
            # It streams from its upstream, which has nothing new: only the lag behind the primary shows it.
            assert statuses["cascaded"].streaming is True
            assert statuses["cascaded"].lag_bytes is not None
            assert statuses["cascaded"].lag_bytes > 0
            assert not statuses["cascaded"].healthy
            assert await count_where(maker) == (5, False, cluster.primary.port)
    finally:
        await primary.dispose()
        for engine in replicas.values():
            await engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_promoted_replica_gets_no_reads_until_it_is_a_standby_again(
    fresh_cluster: ClusterFactory, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="db_retry.routing")
    cluster = fresh_cluster(standbys=1)
    (standby,) = cluster.standbys
    await cluster.primary.execute("CREATE TABLE fault_items (id int)")
    await cluster.wait_for_replay()
    primary, replica = engine_for(cluster.primary, driver), engine_for(standby, driver)
    try:
        async with RoutingSessionMaker(primary, {"standby": replica}, check_interval=None) as maker:
            assert (await maker.refresh())["standby"].healthy
            assert await count_where(maker) == (0, True, standby.port)

            await asyncio.to_thread(standby.promote)  # a split brain in the making: it accepts writes now
            await cluster.primary.execute("INSERT INTO fault_items SELECT generate_series(1, 5)")

            status = (await maker.refresh())["standby"]
            assert not status.healthy
            assert status.reachable
            assert status.in_recovery is False
            assert status.reason == "not in recovery: promoted, or not a standby"
            assert status.lag is None
            assert status.lag_bytes is None
            assert await count_where(maker) == (5, False, cluster.primary.port)

            await faults.rebuild_as_standby(cluster, standby)  # a fresh clone of the primary, same port
            await cluster.wait_for_replay()
            assert (await maker.refresh())["standby"].healthy
            # Its pool was disposed when it was found promoted: no connection to the old server is reused.
            assert await count_where(maker) == (5, True, standby.port)
    finally:
        await primary.dispose()
        await replica.dispose()
    messages = [record.getMessage() for record in caplog.records]
    assert "replica standby skipped: not in recovery: promoted, or not a standby" in messages


async def test_a_failover_moves_reads_to_the_standby_that_follows_the_new_primary(
    fresh_cluster: ClusterFactory,
) -> None:
    cluster = fresh_cluster(standbys=2)
    old_primary = cluster.primary
    first, second = cluster.standbys
    await old_primary.execute("CREATE TABLE fault_items (id int)")
    await cluster.wait_for_replay()
    # The primary engine follows the writable server, as a service's would; so does the maker's check of it.
    url = cluster.multihost_dsn(target_session_attrs="read-write")
    primary = create_async_engine(url, async_creator=build_connection_factory(url, timeout=5))
    replicas = {"first": engine_for(first), "second": engine_for(second)}
    try:
        async with RoutingSessionMaker(primary, replicas, check_interval=None) as maker:
            assert all(status.healthy for status in (await maker.refresh()).values())

            await faults.stop(old_primary)

            async def cut_off() -> bool:
                return not any(status.healthy for status in (await maker.refresh()).values())

            await eventually_async(cut_off)  # their receivers lost their upstream
            for status in maker.replicas.values():
                assert status.reachable
                assert status.in_recovery
                assert status.streaming is False
                assert status.lag_bytes is None  # no primary to measure against
                assert status.reason == "not streaming: no WAL receiver"

            await faults.failover(cluster, standby=first)  # promotes first; second follows it
            await cluster.primary.execute("INSERT INTO fault_items SELECT generate_series(1, 5)")

            async def following() -> bool:
                return (await maker.refresh())["second"].healthy

            await eventually_async(following)
            assert maker.replicas["first"].reason == "not in recovery: promoted, or not a standby"
            assert maker.replicas["second"].lag_bytes is not None  # against the new primary
            await cluster.wait_for_replay(second)
            assert await count_where(maker) == (5, True, second.port)
    finally:
        await primary.dispose()
        for engine in replicas.values():
            await engine.dispose()


async def test_lag_is_unknown_while_the_primary_cannot_be_checked(
    pg_cluster: PostgresCluster, replica: AsyncEngine, standby_node: PostgresNode
) -> None:
    async with TcpProxy(pg_cluster.primary.host, pg_cluster.primary.port, name="to-primary") as to_primary:
        primary = create_async_engine(f"postgresql+asyncpg://postgres@{to_primary.address}/postgres")
        bounded = RoutingSessionMaker(primary, {"standby": replica}, max_lag=5, check_interval=None, check_timeout=0.5)
        unbounded = RoutingSessionMaker(primary, {"standby": replica}, check_interval=None, check_timeout=0.5)
        try:

            async def healthy() -> bool:
                return (await bounded.refresh())["standby"].healthy

            # The precondition, waited for: WAL that is not a commit (a running-transactions record the
            # background writer logs) makes the standby bytes behind until it is replayed, and for that
            # moment its lag is the time since the last commit it replayed (replication.py).
            await eventually_async(healthy, timeout=10)
            to_primary.hang()
            status = (await bounded.refresh())["standby"]
            assert not status.healthy
            assert status.lag is None
            assert status.lag_bytes is None
            assert status.reason == "replay lag unknown (primary unreachable: timed out after 0.5s) exceeds max_lag=5s"
            # With no bound, streaming and in recovery is enough.
            status = (await unbounded.refresh())["standby"]
            assert status.healthy
            assert status.streaming is True
            assert status.lag is None
            async with unbounded() as session:
                assert await where(session) == on(standby_node, standby=True)
        finally:
            to_primary.pass_through()
            await bounded.close()
            await unbounded.close()
            await primary.dispose()


async def test_lag_is_unknown_when_the_primary_engine_reaches_a_standby(
    replica: AsyncEngine, standby_node: PostgresNode
) -> None:
    # E.g. a fixed-host primary engine after a failover demoted its server.
    wrong = engine_for(standby_node)
    try:
        async with RoutingSessionMaker(wrong, {"standby": replica}, max_lag_bytes=0, check_interval=None) as maker:
            status = (await maker.refresh())["standby"]
            assert not status.healthy
            assert status.reason == (
                "unknown (primary engine reaches a server in recovery) bytes behind the primary exceeds max_lag_bytes=0"
            )
    finally:
        await wrong.dispose()


async def test_a_check_role_without_pg_read_all_stats(pg_cluster: PostgresCluster, standby_node: PostgresNode) -> None:
    # PostgreSQL hides pg_stat_wal_receiver's status from such a role: a running receiver then counts.
    role = f"routing_monitor_{uuid.uuid4().hex[:8]}"
    await pg_cluster.primary.execute(f"CREATE ROLE {role} LOGIN")
    await pg_cluster.wait_for_replay()
    primary = create_async_engine(pg_cluster.primary.dsn(driver="asyncpg").replace("postgres@", f"{role}@"))
    replica = create_async_engine(standby_node.dsn(driver="asyncpg").replace("postgres@", f"{role}@"))
    try:
        async with RoutingSessionMaker(primary, {"standby": replica}, check_interval=None) as maker:
            status = (await maker.refresh())["standby"]
            assert status.healthy
            assert status.streaming is None
            assert status.lag_bytes is not None
            await pg_cluster.primary.execute(f"GRANT pg_read_all_stats TO {role}")
            await pg_cluster.wait_for_replay()
            assert (await maker.refresh())["standby"].streaming is True
    finally:
        await primary.dispose()
        await replica.dispose()
        await pg_cluster.primary.execute(f"DROP ROLE {role}")


async def test_a_cancelled_refresh_cancels_its_checks(pg_cluster: PostgresCluster, replica: AsyncEngine) -> None:
    async with TcpProxy(pg_cluster.primary.host, pg_cluster.primary.port, name="to-primary") as to_primary:
        primary = create_async_engine(f"postgresql+asyncpg://postgres@{to_primary.address}/postgres")
        maker = RoutingSessionMaker(primary, {"standby": replica}, check_interval=None, check_timeout=30)
        try:
            to_primary.hang()
            refresh = asyncio.ensure_future(maker.refresh())
            await asyncio.sleep(0.2)  # the primary's check waits for an answer that does not come
            refresh.cancel()
            with pytest.raises(asyncio.CancelledError):
                await refresh
            assert not maker.replicas["standby"].healthy  # never checked: no reads yet
        finally:
            to_primary.pass_through()
            await maker.close()
            await primary.dispose()
