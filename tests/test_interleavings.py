"""The safety core between the paths the matrix walks: attempt counts, cleanup, autocommit, crashes, budgets.

Each test is one defect of the issue "Correct under every interleaving", produced on a real server (the
kit's proxy, ``pg_terminate_backend``, ``kill -9`` of a backend, a crash restart) wherever a server can
produce it, on warm ``QueuePool`` engines; each failed on the code before the fix.
"""

import asyncio
import collections.abc
import typing
import uuid

import pytest
import sqlalchemy as sa
import tenacity
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from db_retry import CommitOutcomeUnknownError, RetryEvent, postgres_retry
from db_retry.engine import (
    RESOLVE_OPTION,
    STATE,
    CommitNotAppliedError,
    ConnectionState,
    ServerNotAnsweringError,
    transaction_failed,
)
from db_retry.retriable import ErrorKind, classify, sqlstate_on_chain
from db_retry.testing import PostgresCluster, PostgresNode, faults
from db_retry.testing.cluster import free_port
from db_retry.testing.proxy import FrontendMessage, ProxyMode, TcpProxy, query_starts_with


pytestmark = pytest.mark.standby

DRIVERS: typing.Final = ("asyncpg", "psycopg")
INSERT: typing.Final = sa.text("INSERT INTO ledger (key) VALUES (:key)")
POOL_SIZE: typing.Final = 3


def _engine(node: PostgresNode, driver: str, *, through: TcpProxy | None = None, **options: object) -> AsyncEngine:
    url = sa.make_url(node.dsn(driver=driver))
    if through is not None:
        url = url.set(host=through.host, port=through.port)
    options.setdefault("pool_size", POOL_SIZE)
    return create_async_engine(url, **options)


async def _warm(engine: AsyncEngine) -> None:
    """Fill the pool: ``POOL_SIZE`` connections open at once, then all back in the pool."""
    barrier = asyncio.Barrier(POOL_SIZE)

    async def hold() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
            await barrier.wait()

    await asyncio.gather(*(hold() for _ in range(POOL_SIZE)))


async def _stored(node: PostgresNode, key: uuid.UUID) -> int:
    return int(await node.fetchval("SELECT count(*) FROM ledger WHERE key = $1", key))


def _refuse_new_connections(proxy: TcpProxy) -> None:
    # The connection carrying COMMIT keeps going; every new one is reset, as if the address went away.
    proxy._mode = ProxyMode.CUT


def _on_commit(proxy: TcpProxy, action: collections.abc.Callable[[], None]) -> None:
    """Cut right after COMMIT, and run ``action`` the moment the proxy forwards it (before the server answers)."""
    is_commit = query_starts_with("COMMIT")

    def predicate(message: FrontendMessage) -> bool:
        if not is_commit(message):
            return False
        action()
        return True

    proxy.cut_after(predicate)


@pytest.fixture
async def node(fresh_cluster: collections.abc.Callable[..., PostgresCluster]) -> PostgresNode:
    primary = fresh_cluster(standbys=0).primary
    await primary.execute("CREATE TABLE ledger (key uuid NOT NULL)")
    return primary


# -- 1. the attempt count of 0.8.4 ----------------------------------------------------------------------


@pytest.mark.parametrize("sqlstate", ["40001", "40P01", "08006"])
@pytest.mark.parametrize("driver", DRIVERS)
async def test_with_no_setting_a_call_runs_three_times_as_in_0_8_4(
    pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch, driver: str, sqlstate: str
) -> None:
    # A healthy server answers each attempt with the code (40001 and 40P01 are what it sends mid-transaction;
    # 08006 is raised here only to show a code the server answered with counts: a real lost connection is
    # the query-of-death test below).
    for name in ("DB_RETRY_RETRIES_NUMBER", "DB_UTILS_RETRIES_NUMBER", "DB_RETRY_CONFLICT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    engine = _engine(pg_cluster.primary, driver)
    await _warm(engine)
    runs = 0

    @postgres_retry
    async def work() -> None:
        nonlocal runs
        runs += 1
        async with engine.begin() as connection:
            await connection.execute(sa.text(f"DO $$ BEGIN RAISE SQLSTATE '{sqlstate}'; END $$"))

    try:
        with pytest.raises(sa.exc.DBAPIError) as caught:
            await work()
    finally:
        await engine.dispose()
    assert sqlstate_on_chain(caught.value) == sqlstate
    assert runs == 3


async def test_conflicts_bounded_by_time_are_an_opt_in(
    pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_RETRY_CONFLICT_TIMEOUT", "0.3")
    engine = _engine(pg_cluster.primary, "asyncpg")
    runs = 0

    @postgres_retry
    async def work() -> None:
        nonlocal runs
        runs += 1
        async with engine.begin() as connection:
            await connection.execute(sa.text("DO $$ BEGIN RAISE SQLSTATE '40001'; END $$"))

    try:
        with pytest.raises(sa.exc.DBAPIError):
            await work()
    finally:
        await engine.dispose()
    assert runs > 3  # conflicts did not count: they were retried for 0.3 s


# -- 2. a query of death ---------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_statement_that_kills_its_backend_counts_as_an_attempt(node: PostgresNode, driver: str) -> None:
    # SIGKILL of the backend running the statement (as the OOM killer does) makes the whole server crash and
    # restart. Each run reached the server and ran the work: it counts. Waiting for the restarted server
    # (refused, "starting up") does not.
    engine = _engine(node, driver)
    await _warm(engine)
    runs = 0
    kills: list[asyncio.Task[None]] = []

    @postgres_retry(retries=2)
    async def deadly() -> None:
        nonlocal runs
        async with engine.connect() as connection:
            pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            runs += 1
            kills.append(asyncio.ensure_future(_kill_soon(node, int(pid))))
            await connection.execute(sa.text("SELECT pg_sleep(30)"))

    try:
        async with asyncio.timeout(60):
            with pytest.raises(sa.exc.DBAPIError) as caught:
                await deadly()
    finally:
        await asyncio.gather(*kills, return_exceptions=True)
        await engine.dispose()
    assert classify(caught.value) is ErrorKind.OUTAGE
    assert runs == 2


async def _kill_soon(node: PostgresNode, pid: int) -> None:
    await asyncio.sleep(0.2)  # the statement is running by then
    await faults.kill_backend(node, pid)


# -- 3. autocommit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_an_autocommit_statement_lost_after_the_server_ran_it_is_outcome_unknown(
    node: PostgresNode, driver: str
) -> None:
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy, isolation_level="AUTOCOMMIT")
        await _warm(engine)
        runs = 0

        @postgres_retry
        async def record(key: uuid.UUID) -> None:
            nonlocal runs
            runs += 1
            async with engine.connect() as connection:
                proxy.cut_after_query("INSERT")
                await connection.execute(INSERT, {"key": key})

        key = uuid.uuid4()
        try:
            with pytest.raises(CommitOutcomeUnknownError):
                await record(key)
        finally:
            await engine.dispose()
    assert (runs, await _stored(node, key)) == (1, 1)  # stored once, never run again


@pytest.mark.parametrize("driver", DRIVERS)
async def test_an_autocommit_statement_lost_on_a_read_only_node_is_retried(
    pg_cluster: PostgresCluster, driver: str
) -> None:
    # A standby cannot have written anything: a lost read there is safe to run again.
    standby = pg_cluster.standbys[0]
    async with TcpProxy(standby.host, standby.port) as proxy:
        engine = _engine(standby, driver, through=proxy, isolation_level="AUTOCOMMIT")
        runs = 0

        @postgres_retry
        async def read() -> int:
            nonlocal runs
            runs += 1
            async with engine.connect() as connection:
                if runs == 1:
                    proxy.cut_after_query("SELECT 41")
                return int((await connection.execute(sa.text("SELECT 41 + 1"))).scalar_one())

        try:
            assert await read() == 42
        finally:
            await engine.dispose()
    assert runs == 2


# -- 4. and 5. cancellation and errors raised during cleanup ---------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_cancellation_during_the_rollback_after_a_conflict_reaches_the_caller(
    node: PostgresNode, driver: str
) -> None:
    # The first attempt conflicts. The retry conflicts too, and its rollback is slow (from that 40001 on,
    # the proxy delays everything by seconds); the caller's deadline strikes during it. The CancelledError
    # carries the 40001 as its context: before, tenacity's attempt block caught it and it was retried as
    # that conflict, and the caller's TimeoutError never came.
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy)
        await _warm(engine)
        runs = 0
        deadline = asyncio.timeout(None)
        loop = asyncio.get_running_loop()

        @postgres_retry
        async def work() -> None:
            nonlocal runs
            runs += 1
            async with engine.begin() as connection:
                await connection.execute(INSERT, {"key": uuid.uuid4()})
                try:
                    await connection.execute(sa.text("DO $$ BEGIN RAISE SQLSTATE '40001'; END $$"))
                except sa.exc.DBAPIError:
                    if runs == 2:
                        proxy.delay(5.0)  # the ROLLBACK of the block waits seconds for its answer
                        deadline.reschedule(loop.time() + 0.3)  # and the caller gives up meanwhile
                        loop.call_later(1.0, proxy.pass_through)  # later attempts, if any, run unhindered
                    raise

        try:
            async with asyncio.timeout(30):
                with pytest.raises(TimeoutError):
                    async with deadline:
                        await work()
        finally:
            proxy.pass_through()
            await engine.dispose()
    assert runs == 2


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_unique_violation_of_a_fallback_insert_is_not_retried_as_the_conflict_under_it(
    node: PostgresNode, driver: str
) -> None:
    engine = _engine(node, driver)
    await node.execute("CREATE TABLE unique_keys (key int PRIMARY KEY)")
    await node.execute("INSERT INTO unique_keys VALUES (1)")
    runs = 0

    @postgres_retry
    async def work() -> None:
        nonlocal runs
        runs += 1
        try:
            async with engine.begin() as connection:
                await connection.execute(sa.text("DO $$ BEGIN RAISE SQLSTATE '40001'; END $$"))
        except sa.exc.DBAPIError:
            async with engine.begin() as connection:  # the fallback collides: the caller's real problem
                await connection.execute(sa.text("INSERT INTO unique_keys VALUES (1)"))

    try:
        with pytest.raises(sa.exc.IntegrityError) as caught:
            await work()
    finally:
        await engine.dispose()
    assert sqlstate_on_chain(caught.value) == "23505"
    assert runs == 1


# -- 6. a custom stop= -----------------------------------------------------------------------------------


async def test_a_custom_stop_keeps_its_waits_after_the_built_in_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_RETRY_OUTAGE_TIMEOUT", "0.2")
    engine = create_async_engine(f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none")  # refused
    events: list[RetryEvent] = []

    @postgres_retry(stop=tenacity.stop_after_delay(1.0), on_retry=events.append)
    async def work() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    try:
        with pytest.raises((OSError, sa.exc.DBAPIError)):
            await work()
    finally:
        await engine.dispose()
    assert events
    assert all(event.wait > 0 for event in events)  # before: 0 s waits once the built-in 0.2 s were spent
    assert len(events) < 200  # before: thousands of connects in the last part of the second


# -- 7. resolution: bounded, and only for a COMMIT that was lost -----------------------------------------


async def test_resolution_is_bounded_when_the_server_accepts_but_never_answers(
    node: PostgresNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_RETRY_OUTAGE_TIMEOUT", "0.5")
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, "asyncpg", through=proxy)

        @postgres_retry(resolve_commit=True)
        async def pay(key: uuid.UUID) -> None:
            async with engine.begin() as connection:
                await connection.execute(INSERT, {"key": key})
                _on_commit(proxy, proxy.hang)  # the connections that ask hang: accepted, never answered

        key = uuid.uuid4()
        try:
            async with asyncio.timeout(15):  # before: each connect waited asyncpg's 60 s
                with pytest.raises(CommitOutcomeUnknownError) as caught:
                    await pay(key)
        finally:
            proxy.pass_through()
            await engine.dispose()
    assert any("no answer within 0.5s" in note for note in caught.value.__notes__)
    assert await _stored(node, key) == 1


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_commit_the_server_refused_is_not_resolved(node: PostgresNode, driver: str) -> None:
    # A deferred unique constraint fails COMMIT: the server answered, so nobody needs to ask it again.
    await node.execute("CREATE TABLE deferred (key int, UNIQUE (key) DEFERRABLE INITIALLY DEFERRED)")
    await node.execute("INSERT INTO deferred VALUES (1)")
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy, execution_options={RESOLVE_OPTION: True})
        asked: list[str] = []

        def note(message: FrontendMessage) -> bool:
            if "pg_xact_status" in (message.sql or ""):
                asked.append(message.sql or "")
            return False

        proxy.cut_after(note, once=False)
        try:
            with pytest.raises(sa.exc.IntegrityError):
                async with engine.begin() as connection:
                    await connection.execute(sa.text("INSERT INTO deferred VALUES (1)"))
        finally:
            await engine.dispose()
    assert asked == []


# -- 8. a crash restart gives a lost transaction's id out again ------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_committed_after_a_crash_restart_is_not_trusted(node: PostgresNode, driver: str) -> None:
    # synchronous_commit = off and a long wal_writer_delay: the crash (SIGKILL of a backend: the server
    # reinitializes in place, keeping its postmaster start time) loses the transaction, and its id is given
    # to the next transactions, which commit. "Committed" is then another transaction's answer.
    await node.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
    await node.execute("SELECT pg_reload_conf()")
    await node.execute("CREATE TABLE other (n int)")
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy)
        tasks: list[asyncio.Task[None]] = []

        async def crash_and_reuse_ids() -> None:
            await faults.kill_backend(node)
            for n in range(5):  # each takes the next id, the lost one first
                await node.execute("INSERT INTO other VALUES ($1)", n)
            proxy.pass_through()

        def strike() -> None:
            _refuse_new_connections(proxy)
            tasks.append(asyncio.get_running_loop().create_task(crash_and_reuse_ids()))

        @postgres_retry(resolve_commit=True)
        async def pay(key: uuid.UUID) -> None:
            async with engine.begin() as connection:
                await connection.execute(sa.text("SET LOCAL synchronous_commit = off"))
                await connection.execute(INSERT, {"key": key})
                _on_commit(proxy, strike)

        key = uuid.uuid4()
        try:
            with pytest.raises(CommitOutcomeUnknownError) as caught:
                await pay(key)
        finally:
            await asyncio.gather(*tasks)
            await engine.dispose()
    assert any("restarted" in note for note in caught.value.__notes__)
    assert await _stored(node, key) == 0  # the crash lost it: "committed" would have been a lie


# -- 9. resolution after engine.dispose() ----------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_resolution_goes_on_after_the_engine_is_disposed(node: PostgresNode, driver: str) -> None:
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy, execution_options={RESOLVE_OPTION: True})
        keys = [uuid.uuid4(), uuid.uuid4()]
        try:
            async with engine.begin() as connection:
                await connection.execute(INSERT, {"key": keys[0]})
            await engine.dispose()  # a new pool from here on
            async with engine.begin() as connection:
                await connection.execute(INSERT, {"key": keys[1]})
                proxy.cut_after_query("COMMIT")
            # The block returned: the server said the lost COMMIT was applied.
        finally:
            await engine.dispose()
    assert [await _stored(node, key) for key in keys] == [1, 1]


# -- 10. a transaction that only notifies ----------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_lost_commit_of_a_notify_only_transaction_is_not_sent_twice(node: PostgresNode, driver: str) -> None:
    listener = await node.connect()
    heard: list[str] = []
    await listener.add_listener("payments", lambda *args: heard.append(args[-1]))
    try:
        async with TcpProxy(node.host, node.port) as proxy:
            engine = _engine(node, driver, through=proxy)
            runs = 0

            @postgres_retry(resolve_commit=True)
            async def announce() -> None:
                nonlocal runs
                runs += 1
                async with engine.begin() as connection:
                    await connection.execute(sa.text("SELECT pg_notify('payments', 'paid')"))
                    if runs == 1:
                        proxy.cut_after_query("COMMIT")

            try:
                await announce()
            finally:
                await engine.dispose()
        await listener.execute("SELECT 1")  # notifications delivered before this answer
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
    assert (runs, heard) == (1, ["paid"])


# -- 11. the caller's own READ ONLY transaction ---------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_write_in_the_callers_own_read_only_transaction_is_not_retried(node: PostgresNode, driver: str) -> None:
    engine = _engine(node, driver)
    runs = 0

    @postgres_retry
    async def write() -> None:
        nonlocal runs
        runs += 1
        async with engine.begin() as connection:
            await connection.execute(sa.text("SET TRANSACTION READ ONLY"))
            await connection.execute(INSERT, {"key": uuid.uuid4()})

    try:
        with pytest.raises(sa.exc.DBAPIError) as caught:
            await write()
    finally:
        await engine.dispose()
    assert (runs, sqlstate_on_chain(caught.value)) == (1, "25006")


@pytest.mark.parametrize(
    ("setup", "statement", "sqlstate"),
    [
        ("SET TRANSACTION READ ONLY", "INSERT INTO ledger (key) VALUES (gen_random_uuid())", "25006"),
        # A code the server answered with, on a connection that stays up (no disconnect to notice it by).
        ("SELECT 1", "DO $$ BEGIN RAISE SQLSTATE '08006'; END $$", "08006"),
    ],
    ids=["own-read-only", "server-said-08006"],
)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_failure_in_a_callers_own_transaction_reports_the_real_error(
    node: PostgresNode, driver: str, setup: str, statement: str, sqlstate: str
) -> None:
    # The caller began the session's transaction. The retried function is not retried inside a transaction
    # that cannot go on, and the caller sees the real error, not the 25P02 a retry on it would produce.
    engine = _engine(node, driver)
    runs = 0

    @postgres_retry
    async def step(session: AsyncSession) -> None:
        nonlocal runs
        runs += 1
        await session.execute(sa.text(statement))

    try:
        async with AsyncSession(engine) as session:
            await session.begin()
            await session.execute(sa.text(setup))
            with pytest.raises(sa.exc.DBAPIError) as caught:
                await step(session)
    finally:
        await engine.dispose()
    assert (runs, sqlstate_on_chain(caught.value)) == (1, sqlstate)


# -- 13. a COMMIT the driver never sent ------------------------------------------------------------------


async def test_a_commit_the_driver_refused_to_send_is_not_applied_and_retried(node: PostgresNode) -> None:
    # asyncpg refuses a command while another operation is in progress on the connection: COMMIT was
    # never sent, so nothing committed, and that connection is not handed out again.
    engine = _engine(node, "asyncpg")
    await _warm(engine)
    runs = 0
    errors: list[BaseException] = []
    stray: list[asyncio.Task[object]] = []

    @postgres_retry(on_retry=lambda event: errors.append(event.error))
    async def pay(key: uuid.UUID) -> None:
        nonlocal runs
        runs += 1
        async with engine.begin() as connection:
            await connection.execute(INSERT, {"key": key})
            if runs == 1:
                driver: typing.Any = (await connection.get_raw_connection()).driver_connection
                stray.append(asyncio.ensure_future(driver.execute("SELECT pg_sleep(0.3)")))
                await asyncio.sleep(0.05)  # the stray operation is on the wire

    key = uuid.uuid4()
    try:
        await pay(key)
    finally:
        await asyncio.gather(*stray, return_exceptions=True)
        await engine.dispose()
    assert [type(error) for error in errors] == [CommitNotAppliedError]
    assert "never sent" in "".join(errors[0].__notes__)
    assert (runs, await _stored(node, key)) == (2, 1)


# -- new connections prove a server stands behind them ---------------------------------------------------


async def test_a_new_connection_that_no_server_answers_is_unavailable(node: PostgresNode) -> None:
    # The proxy accepts and then resets every connection before its first query is answered (as PgBouncer
    # does while its server restarts): the connect fails, and the wait for a server does not count.
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, "asyncpg", through=proxy)
        try:
            async with engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))
            await engine.dispose()
            proxy.cut_after(query_starts_with("SELECT 1"), once=False)  # the probe of every new connection
            with pytest.raises(ServerNotAnsweringError) as caught:
                async with engine.connect():
                    pass  # pragma: no cover - the connect fails
        finally:
            await engine.dispose()
    assert classify(caught.value) is ErrorKind.UNAVAILABLE
    assert "did not answer its first query" in str(caught.value)


async def test_a_record_whose_reconnect_no_server_answered_connects_afresh(node: PostgresNode) -> None:
    # A pooled record reconnects after its connection was invalidated; its first query is cut (no server
    # answers). SQLAlchemy would keep the closed connection on the record and hand it out next time
    # ("connection is closed", a counted attempt each time, pool after pool of them after a restart).
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, "asyncpg", through=proxy, pool_size=1, max_overflow=0)
        try:
            async with engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))
                await connection.invalidate()  # the record reconnects at its next checkout
            proxy.cut_after(query_starts_with("SELECT 1"))  # that reconnect's first query
            with pytest.raises(ServerNotAnsweringError):
                async with engine.connect():
                    pass  # pragma: no cover - the connect fails
            async with engine.connect() as connection:
                assert (await connection.execute(sa.text("SELECT 2"))).scalar_one() == 2
        finally:
            await engine.dispose()


async def test_a_connection_made_before_db_retry_was_imported_gets_its_state(pg_cluster: PostgresCluster) -> None:
    # The pool's connect event gives each new connection its state; one made before the listeners were
    # installed gets it the first time a listener needs it.
    engine = _engine(pg_cluster.primary, "asyncpg", pool_size=1)
    try:
        async with engine.connect() as connection:
            del (await connection.get_raw_connection()).info[STATE]
            await connection.execute(sa.text("SELECT 1"))
            assert isinstance((await connection.get_raw_connection()).info[STATE], ConnectionState)
    finally:
        await engine.dispose()


async def test_a_client_side_error_does_not_mark_the_transaction_failed(pg_cluster: PostgresCluster) -> None:
    # psycopg refuses the statement itself (a placeholder without a parameter): it never reached the
    # server, whose transaction goes on. Only an error the server reported (a SQLSTATE) or a lost
    # connection marks the transaction as one that cannot continue.
    engine = _engine(pg_cluster.primary, "psycopg", pool_size=1)
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.text("SELECT 1"))
            with pytest.raises(sa.exc.DBAPIError) as caught:
                await connection.exec_driver_sql("SELECT %s::int", ())
            assert sqlstate_on_chain(caught.value) is None
            assert not transaction_failed(connection.sync_connection)  # type: ignore[arg-type]
            assert (await connection.execute(sa.text("SELECT 2"))).scalar_one() == 2  # it did go on
    finally:
        await engine.dispose()
