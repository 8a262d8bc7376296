"""The test kit's faults: each one proven by the error a real server gives an asyncpg client."""

import asyncio
import collections.abc
import contextlib
import itertools
import os
import re
import secrets

import asyncpg
import pytest

from db_retry.testing import faults
from db_retry.testing.cluster import ClusterError, PostgresCluster, PostgresNode
from db_retry.testing.pytest_plugin import DSN_ENV, FRESH_SKIP_REASON, ClusterFactory


Connection = asyncpg.Connection  # the generic alias does not exist at run time
LogMessages = list[tuple[str | None, str]]


@pytest.fixture(scope="module")
def cluster() -> collections.abc.Iterator[PostgresCluster]:
    """A primary and a standby for faults that leave the cluster as they found it (running, same roles)."""
    if os.environ.get(DSN_ENV):
        pytest.skip(FRESH_SKIP_REASON)
    with PostgresCluster(standbys=1, name="faults") as started:
        yield started


@pytest.fixture
def primary(cluster: PostgresCluster) -> PostgresNode:
    return cluster.primary


@contextlib.asynccontextmanager
async def session(
    node: PostgresNode, **kwargs: object
) -> collections.abc.AsyncIterator["tuple[asyncpg.Connection[asyncpg.Record], LogMessages]"]:
    """A connection to ``node`` and the (sqlstate, message) of every notice or warning it receives."""
    connection = await node.connect(**kwargs)
    received: LogMessages = []
    connection.add_log_listener(lambda _, message: received.append((message.sqlstate, str(message))))
    try:
        yield connection, received
    finally:
        connection.terminate()


async def start_sleeping(node: PostgresNode, connection: "asyncpg.Connection[asyncpg.Record]") -> asyncio.Task[str]:
    """Start ``pg_sleep`` on ``connection`` and return once the server runs it."""
    query = asyncio.create_task(connection.execute("SELECT pg_sleep(60)"))
    pid = connection.get_server_pid()
    async with asyncio.timeout(10):
        for _ in itertools.count():
            if await node.fetchval(
                "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1 AND state = 'active')", pid
            ):
                break
            await asyncio.sleep(0.01)
    return query


def fatal_error(exc: BaseException, node: PostgresNode, pid: int) -> tuple[str, str]:
    """The SQLSTATE and message of the FATAL error that ended the session of backend ``pid``.

    asyncpg raises ``ConnectionDoesNotExistError`` (08003) for a query whose session the server ended.
    From 0.32 on, the server's own error (e.g. ``AdminShutdownError``, 57P01) is its cause; older
    versions drop it, so it is read from the server's log instead (the kit logs each message's SQLSTATE).
    """
    assert isinstance(exc, asyncpg.ConnectionDoesNotExistError)
    cause = exc.__cause__
    if isinstance(cause, asyncpg.PostgresError):
        return cause.sqlstate, str(cause)
    for line in node.log_tail(400).splitlines():
        logged = re.search(rf"\[{pid}\] (\w{{5}}) .*FATAL:  (.*)$", line)
        if logged:
            return logged[1], logged[2]
    pytest.fail(f"no FATAL message of backend {pid} in the log of {node.name}")


async def count_sessions(node: PostgresNode) -> int:
    count: int = await node.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    return count


# -- 57P01 -----------------------------------------------------------------------
async def test_terminate_backends_ends_a_running_query_with_57P01(cluster: PostgresCluster) -> None:  # noqa: N802
    primary = cluster.primary
    walsender = await primary.fetchval("SELECT pid FROM pg_stat_replication")
    async with (
        session(primary, server_settings={"application_name": "victim"}) as (victim, _),
        session(primary, server_settings={"application_name": "bystander"}) as (bystander, _),
    ):
        running = await start_sleeping(primary, victim)
        assert await faults.terminate_backends(primary, application_name="victim") == 1
        with pytest.raises(asyncpg.ConnectionDoesNotExistError) as ended:
            await running
        assert fatal_error(ended.value, primary, victim.get_server_pid()) == (
            "57P01",
            "terminating connection due to administrator command",
        )
        assert await bystander.fetchval("SELECT 1") == 1
        assert await faults.terminate_backends(primary, database="no_such_db") == 0
        assert await faults.terminate_backends(primary, database="postgres", pids=[bystander.get_server_pid()]) == 1
        with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
            await bystander.fetchval("SELECT 1")
    assert await faults.terminate_backends(primary) == 0
    assert await primary.fetchval("SELECT pid FROM pg_stat_replication") == walsender  # replication untouched


async def test_fast_restart_ends_a_running_query_with_57P01(primary: PostgresNode) -> None:  # noqa: N802
    async with session(primary) as (connection, _):
        pid = connection.get_server_pid()
        running = await start_sleeping(primary, connection)
        await faults.restart(primary, "fast")
        with pytest.raises(asyncpg.ConnectionDoesNotExistError) as ended:
            await running
        assert fatal_error(ended.value, primary, pid) == (
            "57P01",
            "terminating connection due to administrator command",
        )
    assert await primary.fetchval("SELECT 1") == 1


async def test_immediate_restart_drops_the_connection_after_a_57P01_warning(cluster: PostgresCluster) -> None:  # noqa: N802
    primary = cluster.primary
    async with session(primary) as (connection, received):
        running = await start_sleeping(primary, connection)
        await faults.restart(primary, "immediate")
        with pytest.raises(asyncpg.ConnectionDoesNotExistError) as lost:
            await running
        assert lost.value.sqlstate == "08003"
        assert [code for code, _ in received] == ["57P01"]  # a warning, not an error: PostgreSQL exits at once
    assert await primary.fetchval("SELECT 1") == 1
    await cluster.wait_for_replay()  # the standby reconnected


# -- refused ---------------------------------------------------------------------
async def test_crashed_server_refuses_connections_until_started(primary: PostgresNode) -> None:
    await faults.crash(primary)
    assert not primary.is_running
    with pytest.raises(ConnectionRefusedError):
        await primary.connect()
    with pytest.raises(ClusterError, match=r"^primary \(127\.0\.0\.1:\d+\) is not accepting connections after 0\.2s"):
        await faults.wait_accepting(primary, timeout=0.2)
    await faults.start(primary)
    await faults.wait_accepting(primary)
    await faults.stop(primary)
    with pytest.raises(ConnectionRefusedError):
        await primary.connect()
    await faults.start(primary)
    assert await primary.fetchval("SELECT 1") == 1


# -- 57P02 -----------------------------------------------------------------------
async def test_killed_backend_crashes_every_other_session_with_57P02(cluster: PostgresCluster) -> None:  # noqa: N802
    primary = cluster.primary
    async with session(primary) as (victim, _), session(primary) as (bystander, received):
        running = await start_sleeping(primary, bystander)
        await faults.kill_backend(primary, victim.get_server_pid())
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await running
        assert [code for code, _ in received] == ["57P02"]
        assert "terminating connection because of crash of another server process" in received[0][1]
    assert await primary.fetchval("SELECT 1") == 1  # recovered: kill_backend waits for that

    async with session(primary) as (bystander, received):
        await faults.kill_backend(primary)  # a throwaway session of the helper's own is the victim
        with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
            await bystander.fetchval("SELECT 1")
        assert [code for code, _ in received] == ["57P02"]
    with pytest.raises(ValueError, match=r"^1 is not a client backend of primary"):
        await faults.kill_backend(primary, 1)
    await cluster.wait_for_replay()


# -- 57P03 -----------------------------------------------------------------------
async def test_cannot_connect_now_refuses_new_sessions_with_57P03(primary: PostgresNode) -> None:  # noqa: N802
    port = primary.port
    async with session(primary) as (early, _):
        async with faults.cannot_connect_now(primary):
            with pytest.raises(asyncpg.CannotConnectNowError) as refused:
                await primary.connect()
            assert refused.value.sqlstate == "57P03"
            assert "the database system is shutting down" in str(refused.value)
            assert await early.fetchval("SELECT 1") == 1  # sessions from before keep working
        with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
            await early.fetchval("SELECT 1")
    assert primary.port == port
    assert await primary.fetchval("SELECT 1") == 1


async def test_waits_for_what_does_not_come_give_up_in_time(primary: PostgresNode) -> None:
    """The bounded waits behind cannot_connect_now and read_only, on a server that does not oblige."""
    with pytest.raises(ClusterError, match=r"still accepts connections after a smart shutdown request after 0\.1s"):
        await faults._wait_refusing(primary, timeout=0.1)
    with pytest.raises(ClusterError, match=r"has not set default_transaction_read_only=on after 0\.1s"):
        await faults._wait_for_setting(primary, "default_transaction_read_only", "on", timeout=0.1)


# -- 53300 -----------------------------------------------------------------------
async def test_limited_role_refuses_a_connection_beyond_its_limit_with_53300(primary: PostgresNode) -> None:
    table = f"faults_{secrets.token_hex(4)}"
    await primary.execute(f"CREATE TABLE {table} (id int)")
    try:
        async with faults.limited_role(primary, limit=2) as role, session(primary, user=role) as (first, _):
            await first.execute(f"INSERT INTO {table} VALUES (1)")  # the role may read and write
            assert await first.fetchval(f"SELECT count(*) FROM {table}") == 1
            kept = await primary.connect(user=role)  # terminated by the helper on exit
            with pytest.raises(asyncpg.TooManyConnectionsError) as refused:
                await primary.connect(user=role)
            assert refused.value.sqlstate == "53300"
            assert "too many connections for role" in str(refused.value)
        assert await primary.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", role) == 0
        with pytest.raises((asyncpg.AdminShutdownError, asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
            await kept.fetchval("SELECT 1")
        kept.terminate()
    finally:
        await primary.execute(f"DROP TABLE {table}")
    with pytest.raises(ValueError, match="limit must be >= 0, got -1"):
        async with faults.limited_role(primary, limit=-1):
            pytest.fail("the block must not run")  # pragma: no cover


async def test_exhausted_connections_refuse_even_a_superuser_with_53300(primary: PostgresNode) -> None:
    max_connections = int(await primary.fetchval("SHOW max_connections"))
    async with faults.exhaust_connections(primary) as held:
        assert 0 < held <= max_connections
        with pytest.raises(asyncpg.TooManyConnectionsError) as refused:
            await primary.connect()
        assert refused.value.sqlstate == "53300"
        assert "sorry, too many clients already" in str(refused.value)
    await primary.execute("SELECT 1")  # every slot is free again
    with pytest.raises(ClusterError, match="still accepts connections after 3"):
        async with faults.exhaust_connections(primary, limit=3):
            pytest.fail("the block must not run")  # pragma: no cover


# -- 25006 -----------------------------------------------------------------------
async def test_read_only_node_rejects_writes_with_25006(primary: PostgresNode) -> None:
    table = f"faults_{secrets.token_hex(4)}"
    await primary.execute(f"CREATE TABLE {table} (id int)")
    try:
        async with session(primary) as (pooled, _):
            async with faults.read_only(primary):
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError) as rejected:
                    await primary.execute(f"INSERT INTO {table} VALUES (1)")
                assert rejected.value.sqlstate == "25006"
                assert await primary.fetchval("SHOW transaction_read_only") == "on"  # what read-write checks
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):  # an open session follows
                    await pooled.execute(f"INSERT INTO {table} VALUES (1)")
            await pooled.execute(f"INSERT INTO {table} VALUES (1)")
        await primary.execute(f"INSERT INTO {table} VALUES (2)")
    finally:
        await primary.execute(f"DROP TABLE {table}")


async def test_standby_rejects_writes_with_25006(cluster: PostgresCluster) -> None:
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError) as rejected:
        await cluster.standbys[0].execute("CREATE TABLE faults_on_standby (id int)")
    assert rejected.value.sqlstate == "25006"


# -- failover ----------------------------------------------------------------------
async def test_failover_and_rebuild_keep_every_port(fresh_cluster: ClusterFactory) -> None:
    cluster = fresh_cluster(standbys=2)
    old, standby1, standby2 = cluster.nodes
    ports = {node.name: node.port for node in cluster.nodes}
    await old.execute("CREATE TABLE ledger (id int PRIMARY KEY)")
    await old.execute("INSERT INTO ledger VALUES (1)")

    new = await faults.failover(cluster)
    assert new is standby1
    assert cluster.nodes == [standby1, standby2, old]
    assert not old.is_running
    assert await new.role() == "primary"
    await new.execute("INSERT INTO ledger VALUES (2)")  # nothing committed on the old primary was lost
    await cluster.wait_for_replay(standby2)  # the other standby follows the new primary's timeline
    assert await standby2.fetchval("SELECT count(*) FROM ledger") == 2
    with pytest.raises(ConnectionRefusedError):
        await old.connect()

    assert await faults.rebuild_as_standby(cluster, old) is old
    assert await old.role() == "standby"
    await new.execute("INSERT INTO ledger VALUES (3)")
    await cluster.wait_for_replay()
    assert await old.fetchval("SELECT count(*) FROM ledger") == 3
    assert {node.name: node.port for node in cluster.nodes} == ports

    # Back to the rebuilt node, as a crash of the primary, with the other standby down.
    await faults.stop(standby2)
    assert await faults.failover(cluster, standby=old, mode="immediate") is old
    assert cluster.nodes == [old, standby2, standby1]
    assert await old.role() == "primary"
    assert await old.fetchval("SELECT count(*) FROM ledger") == 3
    await old.execute("INSERT INTO ledger VALUES (4)")
    assert {node.name: node.port for node in cluster.nodes} == ports


async def test_failover_refuses_what_it_cannot_do(fresh_cluster: ClusterFactory, cluster: PostgresCluster) -> None:
    single = fresh_cluster(standbys=0)
    with pytest.raises(ClusterError, match="has no running standby to promote"):
        await faults.failover(single)
    with pytest.raises(ValueError, match="primary is not a standby of"):
        await faults.failover(single, standby=single.primary)
    with pytest.raises(ValueError, match="standby1 is not a standby of"):
        await faults.failover(single, standby=cluster.standbys[0])  # a node of another cluster
    with pytest.raises(ValueError, match="primary is not a standby or retired node of"):
        await faults.rebuild_as_standby(single, single.primary)
    with pytest.raises(ValueError, match="standby1 is not a standby or retired node of"):
        await faults.rebuild_as_standby(single, cluster.standbys[0])
    assert single.primary.is_running
    assert await single.primary.role() == "primary"


async def _primary_conninfo_becomes(node: PostgresNode, expected: str) -> None:
    """Wait (bounded) until a new session of ``node`` sees ``expected``: the postmaster reloads asynchronously."""
    for _ in range(500):
        if await node.fetchval("SELECT current_setting('primary_conninfo')") == expected:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"primary_conninfo of {node.name} is not {expected!r}")


async def test_replication_link_cuts_and_hangs_the_wal_stream(fresh_cluster: ClusterFactory) -> None:
    cluster = fresh_cluster(standbys=1)
    (standby,) = cluster.standbys
    original = await standby.fetchval("SELECT current_setting('primary_conninfo')")
    await cluster.primary.execute("CREATE TABLE link_proof (id int)")
    async with faults.replication_link(cluster, standby) as link:
        assert (await standby.wal_status()).streaming is True
        assert link.open_connections == 1  # the WAL receiver's

        link.cut()
        for _ in range(500):
            if not (await standby.wal_status()).receiver_running:
                break
            await asyncio.sleep(0.02)
        await cluster.primary.execute("INSERT INTO link_proof VALUES (1)")
        with pytest.raises(ClusterError, match="standby1 did not replay"):
            await cluster.wait_for_replay(timeout=0.5)
        assert (await standby.wal_status()).receiver_running is False  # it reconnects, and is reset again

        link.pass_through()
        await cluster.wait_for_replay()
        link.hang()
        await cluster.primary.execute("INSERT INTO link_proof VALUES (2)")
        with pytest.raises(ClusterError, match="standby1 did not replay"):
            await cluster.wait_for_replay(timeout=0.5)
        assert (await standby.wal_status()).streaming is True  # until wal_receiver_timeout
    await _primary_conninfo_becomes(standby, original)
    await cluster.wait_for_replay()
    assert await standby.fetchval("SELECT count(*) FROM link_proof") == 2

    await faults.stop(cluster.primary)
    with pytest.raises(ClusterError, match=r"does not stream WAL through port \d+ after 0.5s"):
        async with faults.replication_link(cluster, standby, timeout=0.5):
            pytest.fail("entered without streaming")
    await _primary_conninfo_becomes(standby, original)
