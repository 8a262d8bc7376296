"""Resolving a lost COMMIT by asking the server (``resolve_commit``), under real cuts, kills and failovers.

The server is asked only when it can answer for sure: the same cluster on the same timeline. A failover in
between, or a restart after the transaction committed, leaves the outcome unknown.
"""

import asyncio
import collections.abc
import contextlib
import typing
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from db_retry import CommitOutcomeUnknownError, postgres_retry
from db_retry.engine import RESOLVE_OPTION, CommitNotAppliedError, state_of
from db_retry.retriable import ErrorKind, classify
from db_retry.testing import PostgresCluster, PostgresNode, faults
from db_retry.testing.proxy import FrontendMessage, ProxyMode, TcpProxy, query_starts_with


pytestmark = pytest.mark.standby

DRIVERS: typing.Final = ("asyncpg", "psycopg")
INSERT: typing.Final = sa.text("INSERT INTO resolved (key) VALUES (:key)")


async def _table(node: PostgresNode) -> None:
    await node.execute("CREATE TABLE IF NOT EXISTS resolved (key uuid NOT NULL)")


async def _stored(node: PostgresNode, key: uuid.UUID) -> int:
    return int(await node.fetchval("SELECT count(*) FROM resolved WHERE key = $1", key))


def _engine(node: PostgresNode, driver: str, *, through: TcpProxy | None = None, **options: object) -> AsyncEngine:
    url = sa.make_url(node.dsn(driver=driver))
    if through is not None:
        url = url.set(host=through.host, port=through.port)
    options.setdefault("pool_size", 2)
    return create_async_engine(url, **options)


def _on_commit(proxy: TcpProxy, action: collections.abc.Callable[[], None]) -> None:
    """Cut right after COMMIT, and run ``action`` the moment the proxy forwards it (before the server answers)."""
    is_commit = query_starts_with("COMMIT")

    def predicate(message: FrontendMessage) -> bool:
        if not is_commit(message):
            return False
        action()
        return True

    proxy.cut_after(predicate)


def _refuse_new_connections(proxy: TcpProxy) -> None:
    # The connection carrying COMMIT keeps going; every new one is reset, as if the address went away.
    proxy._mode = ProxyMode.CUT


@contextlib.asynccontextmanager
async def _commit_waits_for_a_standby(node: PostgresNode) -> collections.abc.AsyncIterator[asyncio.Task[None]]:
    """COMMIT waits for a synchronous standby that never comes; the yielded task terminates the waiter.

    The commit is durable locally by then: the backend is terminated (57P01) while the client still
    waits for the answer.
    """
    await node.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    await node.execute("SELECT pg_reload_conf()")

    async def terminate_when_waiting() -> None:
        query = "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        for _ in range(500):
            pid = await node.fetchval(query)
            if pid is not None:
                await node.execute("SELECT pg_terminate_backend($1)", pid)
                return
            await asyncio.sleep(0.01)
        pytest.fail("COMMIT never waited for the synchronous standby")  # pragma: no cover

    killer = asyncio.ensure_future(terminate_when_waiting())
    try:
        yield killer
        await killer
    finally:
        killer.cancel()
        await node.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await node.execute("SELECT pg_reload_conf()")


@pytest.fixture
async def node(fresh_cluster: collections.abc.Callable[..., PostgresCluster]) -> PostgresNode:
    primary = fresh_cluster(standbys=0).primary
    await _table(primary)
    return primary


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_backend_terminated_during_commit_is_known_to_have_committed(node: PostgresNode, driver: str) -> None:
    engine = _engine(node, driver, execution_options={RESOLVE_OPTION: True})  # opted in for the engine
    calls = 0

    @postgres_retry
    async def pay(key: uuid.UUID) -> str:
        nonlocal calls
        calls += 1
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(INSERT, {"key": key})
        return "paid"

    key = uuid.uuid4()
    try:
        async with _commit_waits_for_a_standby(node):
            assert await pay(key) == "paid"  # the work's own result: the commit was resolved as applied
    finally:
        await engine.dispose()
    assert (calls, await _stored(node, key)) == (1, 1)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_without_resolution_the_same_kill_is_an_unknown_outcome(node: PostgresNode, driver: str) -> None:
    engine = _engine(node, driver)
    key = uuid.uuid4()
    try:
        async with _commit_waits_for_a_standby(node):
            with pytest.raises(CommitOutcomeUnknownError):
                async with engine.begin() as connection:
                    await connection.execute(INSERT, {"key": key})
    finally:
        await engine.dispose()
    assert await _stored(node, key) == 1


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_failover_during_commit_leaves_the_outcome_unknown(
    fresh_cluster: collections.abc.Callable[..., PostgresCluster],
    driver: str,
) -> None:
    cluster = fresh_cluster(standbys=1)
    await _table(cluster.primary)
    await cluster.wait_for_replay()
    async with TcpProxy(cluster.primary.host, cluster.primary.port) as vip:  # an address that moves
        engine = _engine(cluster.primary, driver, through=vip)
        moved = asyncio.Event()

        async def fail_over() -> None:
            new_primary = await faults.failover(cluster)
            vip.target_host, vip.target_port = new_primary.host, new_primary.port
            vip.pass_through()
            moved.set()

        tasks: list[asyncio.Task[None]] = []

        def strike() -> None:
            _refuse_new_connections(vip)
            tasks.append(asyncio.get_running_loop().create_task(fail_over()))

        @postgres_retry(resolve_commit=True)
        async def pay(key: uuid.UUID) -> None:
            async with engine.begin() as connection:
                await connection.execute(INSERT, {"key": key})
                _on_commit(vip, strike)

        key = uuid.uuid4()
        try:
            with pytest.raises(CommitOutcomeUnknownError) as caught:
                await pay(key)
            await moved.wait()
        finally:
            await asyncio.gather(*tasks)
            await engine.dispose()
    assert classify(caught.value) is ErrorKind.AMBIGUOUS
    assert any("another server or timeline" in note for note in caught.value.__notes__)
    assert await _stored(cluster.primary, key) <= 1  # the new primary has it at most once


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_restart_after_the_commit_applied_leaves_the_outcome_unknown(node: PostgresNode, driver: str) -> None:
    # After a restart the server may have given a lost transaction id out again: "committed" could be
    # another transaction's answer, so it is not trusted.
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy)
        tasks: list[asyncio.Task[None]] = []

        async def restart() -> None:
            await faults.restart(node, "fast")
            proxy.pass_through()

        def strike() -> None:
            _refuse_new_connections(proxy)
            tasks.append(asyncio.get_running_loop().create_task(restart()))

        @postgres_retry(resolve_commit=True)
        async def pay(key: uuid.UUID) -> None:
            async with AsyncSession(engine) as session:
                await session.execute(INSERT, {"key": key})
                _on_commit(proxy, strike)
                await session.commit()

        key = uuid.uuid4()
        try:
            with pytest.raises(CommitOutcomeUnknownError) as caught:
                await pay(key)
        finally:
            await asyncio.gather(*tasks)
            await engine.dispose()
    assert any("restarted" in note for note in caught.value.__notes__)
    assert await _stored(node, key) == 1


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_commit_lost_in_a_crash_is_known_not_applied_and_retried(node: PostgresNode, driver: str) -> None:
    # synchronous_commit = off: COMMIT answers before its WAL is flushed, and the crash that cuts the
    # answer loses the transaction. The server, asked after recovery, has never heard of it. (The WAL
    # writer would flush it within wal_writer_delay: made long, so the crash always comes first.)
    await node.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
    await node.execute("SELECT pg_reload_conf()")
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy)
        tasks: list[asyncio.Task[None]] = []
        calls = 0

        async def crash() -> None:
            await faults.restart(node, "immediate")
            proxy.pass_through()

        def strike() -> None:
            _refuse_new_connections(proxy)
            tasks.append(asyncio.get_running_loop().create_task(crash()))

        @postgres_retry(resolve_commit=True)
        async def pay(key: uuid.UUID) -> None:
            nonlocal calls
            calls += 1
            async with engine.begin() as connection:
                await connection.execute(sa.text("SET LOCAL synchronous_commit = off"))
                await connection.execute(INSERT, {"key": key})
                if calls == 1:
                    _on_commit(proxy, strike)

        key = uuid.uuid4()
        try:
            await pay(key)
        finally:
            await asyncio.gather(*tasks)
            await engine.dispose()
    assert await _stored(node, key) == 1  # lost once by the crash, written once by the retry
    assert calls == 2


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_lost_commit_of_a_transaction_that_wrote_nothing_is_retried(
    pg_cluster: PostgresCluster,
    driver: str,
) -> None:
    primary = pg_cluster.primary
    async with TcpProxy(primary.host, primary.port) as proxy:
        engine = _engine(primary, driver, through=proxy)
        seen: list[BaseException] = []

        @postgres_retry(resolve_commit=True, on_retry=lambda event: seen.append(event.error))
        async def read() -> int:
            async with engine.begin() as connection:
                value = (await connection.execute(sa.text("SELECT 41 + 1"))).scalar_one()
                if not seen:
                    proxy.cut_after_query("COMMIT")
            return int(value)

        try:
            assert await read() == 42
        finally:
            await engine.dispose()
    assert len(seen) == 1
    assert isinstance(seen[0], CommitNotAppliedError)
    assert "wrote nothing" in "".join(seen[0].__notes__)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_commit_the_server_refused_behind_a_cut_is_known_not_applied(node: PostgresNode, driver: str) -> None:
    # A deferred unique constraint fails the COMMIT on the server; the proxy cuts that answer away.
    await node.execute(
        "CREATE TABLE IF NOT EXISTS deferred (key uuid NOT NULL, UNIQUE (key) DEFERRABLE INITIALLY DEFERRED)",
    )
    taken = uuid.uuid4()
    await node.execute("INSERT INTO deferred VALUES ($1)", taken)
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy)
        errors: list[BaseException] = []

        @postgres_retry(resolve_commit=True, on_retry=lambda event: errors.append(event.error))
        async def pay(key: uuid.UUID) -> None:
            async with engine.begin() as connection:
                await connection.execute(INSERT, {"key": key})
                if not errors:
                    await connection.execute(sa.text("INSERT INTO deferred VALUES (:key)"), {"key": taken})
                    proxy.cut_after_query("COMMIT")

        key = uuid.uuid4()
        try:
            await pay(key)
        finally:
            await engine.dispose()
    assert [type(error) for error in errors] == [CommitNotAppliedError]
    assert "aborted" in "".join(errors[0].__notes__)
    assert "COMMIT was not applied" in str(errors[0])
    assert await _stored(node, key) == 1


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_commit_still_in_progress_is_asked_again(node: PostgresNode, driver: str) -> None:
    # COMMIT waits for a synchronous standby; the proxy gives up on its answer and cuts. The server
    # says "in progress" until the wait is lifted; then the transaction is committed, and said so.
    await node.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    await node.execute("SELECT pg_reload_conf()")
    async with TcpProxy(node.host, node.port, reply_timeout=0.2) as proxy:
        engine = _engine(node, driver, through=proxy)

        async def lift_when_cut() -> None:
            while not proxy.cuts_fired:  # noqa: ASYNC110 - the proxy offers no event to wait on
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the resolution has asked at least once by now
            await node.execute("ALTER SYSTEM RESET synchronous_standby_names")
            await node.execute("SELECT pg_reload_conf()")

        @postgres_retry(resolve_commit=True)
        async def pay(key: uuid.UUID) -> str:
            async with AsyncSession(engine) as session, session.begin():
                await session.execute(INSERT, {"key": key})
                proxy.cut_after_query("COMMIT")
            return "paid"

        key = uuid.uuid4()
        lifter = asyncio.ensure_future(lift_when_cut())
        try:
            assert await pay(key) == "paid"
        finally:
            await lifter
            await engine.dispose()
    assert await _stored(node, key) == 1


async def test_no_answer_within_the_outage_budget_is_an_unknown_outcome(
    node: PostgresNode,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DB_RETRY_OUTAGE_TIMEOUT", "0.3")
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, "asyncpg", through=proxy)

        @postgres_retry(resolve_commit=True)
        async def pay(key: uuid.UUID) -> None:
            async with engine.begin() as connection:
                await connection.execute(INSERT, {"key": key})
                _on_commit(proxy, lambda: _refuse_new_connections(proxy))  # and never again

        key = uuid.uuid4()
        try:
            with pytest.raises(CommitOutcomeUnknownError) as caught:
                await pay(key)
        finally:
            await engine.dispose()
    assert any("no answer within 0.3s" in note for note in caught.value.__notes__)
    assert await _stored(node, key) == 1


async def test_the_identity_is_read_once_per_connection_and_plain_commits_stay_plain(node: PostgresNode) -> None:
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, "psycopg", through=proxy, pool_size=1, max_overflow=0)
        queries: list[str] = []

        def note(message: FrontendMessage) -> bool:  # matches nothing: only lists what the client runs
            queries.append(message.sql or "")
            return False

        proxy.cut_after(note, once=False)

        @postgres_retry(resolve_commit=True)
        async def pay(key: uuid.UUID) -> None:
            async with engine.begin() as connection:
                await connection.execute(INSERT, {"key": key})

        try:
            keys = [uuid.uuid4() for _ in range(3)]
            for key in keys[:2]:
                await pay(key)
            async with engine.begin() as connection:  # not opted in: no extra query
                await connection.execute(INSERT, {"key": keys[2]})
        finally:
            await engine.dispose()
    asked = [sql for sql in queries if "pg_current_xact_id_if_assigned" in sql]
    assert len(asked) == 2
    assert "pg_control_system" in asked[0]
    assert "pg_control_system" not in asked[1]  # the same connection: its server's identity is known
    assert [await _stored(node, key) for key in keys] == [1, 1, 1]


async def test_a_standby_answers_a_read_only_commit_without_caching_its_identity(pg_cluster: PostgresCluster) -> None:
    engine = _engine(pg_cluster.standbys[0], "asyncpg", pool_size=1, execution_options={RESOLVE_OPTION: True})
    try:
        for _ in range(2):
            async with engine.begin() as connection:
                assert (await connection.execute(sa.text("SELECT pg_is_in_recovery()"))).scalar_one() is True
        async with engine.connect() as connection:
            # A standby that is promoted later would be another server: its identity is not kept.
            assert state_of((await connection.get_raw_connection()).info).identity is None
    finally:
        await engine.dispose()
