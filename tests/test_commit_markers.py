"""Commit markers (``resolve_commit="marker"``): a lost COMMIT resolved by whichever primary answers now.

Where the transaction id cannot answer (a failover in between, a restart after the commit), the marker
row can: the tests below run the same faults with ``resolve_commit=True`` and with markers, side by side,
on real servers. The faults are real: the kit's proxy cuts the connection right after forwarding COMMIT,
a standby is promoted, the server restarts or crashes, replication is cut.
"""

import asyncio
import collections.abc
import time
import typing
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from test_commit_resolution import _on_commit, _refuse_new_connections  # the same faults, shared

from db_retry import CommitOutcomeUnknownError, Transaction, markers, postgres_retry
from db_retry.cli import main
from db_retry.engine import CommitNotAppliedError, resolution
from db_retry.testing import PostgresCluster, PostgresNode, faults
from db_retry.testing.proxy import FrontendMessage, TcpProxy


pytestmark = pytest.mark.standby

DRIVERS: typing.Final = ("asyncpg", "psycopg")
STYLES: typing.Final = ("engine.begin", "session.commit", "session.begin", "Transaction")
INSERT: typing.Final = sa.text("INSERT INTO marker_payments (key) VALUES (:key)")


def _engine(node: PostgresNode, driver: str, *, through: TcpProxy | None = None) -> AsyncEngine:
    url = sa.make_url(node.dsn(driver=driver))
    if through is not None:
        url = url.set(host=through.host, port=through.port)
    return create_async_engine(url, pool_size=3)


async def _prepare(node: PostgresNode) -> None:
    await node.execute("CREATE TABLE IF NOT EXISTS marker_payments (key uuid NOT NULL)")
    engine = create_async_engine(node.dsn(driver="asyncpg"))
    try:
        await markers.install(engine)
        await markers.install(engine)  # idempotent
    finally:
        await engine.dispose()


async def _stored(node: PostgresNode, key: uuid.UUID) -> int:
    return int(await node.fetchval("SELECT count(*) FROM marker_payments WHERE key = $1", key))


async def _write(
    style: str, engine: AsyncEngine, key: uuid.UUID, before_commit: collections.abc.Callable[[], None]
) -> None:
    """One attempt in the commit ``style``; ``before_commit`` arms the fault once the row is written."""
    if style == "engine.begin":
        async with engine.begin() as connection:
            await connection.execute(INSERT, {"key": key})
            before_commit()
    elif style == "session.commit":
        async with AsyncSession(engine) as session:
            await session.execute(INSERT, {"key": key})
            before_commit()
            await session.commit()
    elif style == "session.begin":
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(INSERT, {"key": key})
            before_commit()
    else:
        async with Transaction(session=AsyncSession(engine)) as transaction:
            await transaction.session.execute(INSERT, {"key": key})
            before_commit()
            await transaction.commit()


async def _fail_over_during_commit(
    cluster: PostgresCluster, driver: str, style: str, how: bool | str, *, replicated: bool
) -> tuple[str, int, PostgresNode, uuid.UUID]:
    """COMMIT is cut; the primary stops and the standby is promoted behind the address the engine uses.

    ``replicated``: a fast stop, which ships all WAL first; otherwise replication is cut before COMMIT and
    the primary crashes (immediate stop), so the commit never reaches the standby.
    """
    await _prepare(cluster.primary)
    await cluster.wait_for_replay()
    key = uuid.uuid4()
    runs = 0
    async with (
        faults.replication_link(cluster, cluster.standbys[0]) as link,
        TcpProxy(cluster.primary.host, cluster.primary.port) as vip,
    ):
        engine = _engine(cluster.primary, driver, through=vip)
        tasks: list[asyncio.Task[None]] = []
        moved = asyncio.Event()

        async def fail_over() -> None:
            new = await faults.failover(cluster, mode="fast" if replicated else "immediate")
            vip.target_host, vip.target_port = new.host, new.port
            vip.pass_through()
            moved.set()

        def strike() -> None:
            _refuse_new_connections(vip)
            tasks.append(asyncio.get_running_loop().create_task(fail_over()))

        def arm() -> None:
            if runs == 1:
                if not replicated:
                    link.cut()
                _on_commit(vip, strike)

        @postgres_retry(resolve_commit=how)  # type: ignore[arg-type]
        async def pay() -> None:
            nonlocal runs
            runs += 1
            await _write(style, engine, key, arm)

        try:
            try:
                await pay()
            except CommitOutcomeUnknownError as exc:
                outcome = "unknown: " + "; ".join(getattr(exc, "__notes__", []))
            else:
                outcome = "ok"
            await moved.wait()
        finally:
            await asyncio.gather(*tasks)
            await engine.dispose()
    return outcome, runs, cluster.primary, key


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_failover_during_commit_is_resolved_by_the_new_primary(
    fresh_cluster: collections.abc.Callable[..., PostgresCluster], driver: str, style: str
) -> None:
    # A fast stop ships the commit to the standby before it is promoted: the new primary has the marker.
    outcome, runs, primary, key = await _fail_over_during_commit(
        fresh_cluster(standbys=1), driver, style, "marker", replicated=True
    )
    assert (outcome, runs, await _stored(primary, key)) == ("ok", 1, 1)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_the_transaction_id_cannot_resolve_the_same_failover(
    fresh_cluster: collections.abc.Callable[..., PostgresCluster], driver: str
) -> None:
    outcome, runs, primary, key = await _fail_over_during_commit(
        fresh_cluster(standbys=1), driver, "engine.begin", True, replicated=True
    )
    assert outcome.startswith("unknown")
    assert "another server or timeline" in outcome
    assert (runs, await _stored(primary, key)) == (1, 1)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_commit_the_failover_lost_is_not_applied_and_runs_again_on_the_new_primary(
    fresh_cluster: collections.abc.Callable[..., PostgresCluster], driver: str
) -> None:
    # Replication is cut before COMMIT; the old primary commits, then crashes, and the standby that never
    # got the commit is promoted. In the history that survived the work never happened: it runs again.
    outcome, runs, primary, key = await _fail_over_during_commit(
        fresh_cluster(standbys=1), driver, "session.commit", "marker", replicated=False
    )
    assert (outcome, runs, await _stored(primary, key)) == ("ok", 2, 1)


@pytest.fixture
async def node(fresh_cluster: collections.abc.Callable[..., PostgresCluster]) -> PostgresNode:
    primary = fresh_cluster(standbys=0).primary
    await _prepare(primary)
    return primary


@pytest.mark.parametrize("how", [True, "marker"])
@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_crash_restart_after_the_commit_applied(node: PostgresNode, driver: str, how: bool | str) -> None:
    # The server crashes (immediate stop) right after COMMIT reached it, and recovers. By id the answer
    # cannot be trusted (the id may have been given out again); the marker is durable or not, and says so.
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy)
        tasks: list[asyncio.Task[None]] = []
        runs = 0

        async def crash() -> None:
            await asyncio.sleep(0.2)  # COMMIT's WAL is flushed by then (synchronous_commit = on)
            await faults.restart(node, "immediate")
            proxy.pass_through()

        def strike() -> None:
            _refuse_new_connections(proxy)
            tasks.append(asyncio.get_running_loop().create_task(crash()))

        @postgres_retry(resolve_commit=how)  # type: ignore[arg-type]
        async def pay(key: uuid.UUID) -> str:
            nonlocal runs
            runs += 1
            await _write("session.begin", engine, key, lambda: _on_commit(proxy, strike) if runs == 1 else None)
            return "paid"

        key = uuid.uuid4()
        try:
            if how == "marker":
                assert await pay(key) == "paid"
            else:
                with pytest.raises(CommitOutcomeUnknownError) as caught:
                    await pay(key)
                assert any("restarted" in note for note in caught.value.__notes__)
        finally:
            await asyncio.gather(*tasks)
            await engine.dispose()
    assert (runs, await _stored(node, key)) == (1, 1)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_commit_lost_in_a_crash_is_not_applied_by_its_marker(node: PostgresNode, driver: str) -> None:
    # synchronous_commit = off and a long WAL writer delay: the crash always comes before the flush.
    await node.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
    await node.execute("SELECT pg_reload_conf()")
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, driver, through=proxy)
        tasks: list[asyncio.Task[None]] = []
        errors: list[BaseException] = []

        async def crash() -> None:
            await faults.restart(node, "immediate")
            proxy.pass_through()

        def strike() -> None:
            _refuse_new_connections(proxy)
            tasks.append(asyncio.get_running_loop().create_task(crash()))

        @postgres_retry(resolve_commit="marker", on_retry=lambda event: errors.append(event.error))
        async def pay(key: uuid.UUID) -> None:
            async with engine.begin() as connection:
                await connection.execute(sa.text("SET LOCAL synchronous_commit = off"))
                await connection.execute(INSERT, {"key": key})
                if not errors:
                    _on_commit(proxy, strike)

        key = uuid.uuid4()
        try:
            await pay(key)
        finally:
            await asyncio.gather(*tasks)
            await engine.dispose()
    assert [type(error) for error in errors] == [CommitNotAppliedError]
    assert "is not in the history" in "".join(errors[0].__notes__)
    assert await _stored(node, key) == 1


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_marker_still_committing_is_waited_for_never_called_absent(node: PostgresNode, driver: str) -> None:
    # COMMIT waits for a synchronous standby that is not there; the proxy gives up on its answer. The
    # marker is not visible yet: the asking insert waits for that transaction instead of concluding
    # "absent". Once the wait is lifted the transaction commits, and the marker says so.
    await node.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    await node.execute("SELECT pg_reload_conf()")
    async with TcpProxy(node.host, node.port, reply_timeout=0.2) as proxy:
        engine = _engine(node, driver, through=proxy)
        runs = 0

        async def lift_when_cut() -> None:
            while not proxy.cuts_fired:  # noqa: ASYNC110 - the proxy offers no event to wait on
                await asyncio.sleep(0.01)
            await asyncio.sleep(1.0)  # the resolution's insert waits on the marker meanwhile
            waiting = await node.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%commit_markers%'"
            )
            assert waiting == 1
            await node.execute("ALTER SYSTEM RESET synchronous_standby_names")
            await node.execute("SELECT pg_reload_conf()")

        @postgres_retry(resolve_commit="marker")
        async def pay(key: uuid.UUID) -> str:
            nonlocal runs
            runs += 1
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
    assert (runs, await _stored(node, key)) == (1, 1)


async def test_only_a_standby_in_reach_leaves_the_outcome_unknown(
    pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After the cut only the standby answers (the address moved to it): it is never asked for a verdict.
    monkeypatch.setenv("DB_RETRY_OUTAGE_TIMEOUT", "0.5")
    primary, standby = pg_cluster.primary, pg_cluster.standbys[0]
    await _prepare(primary)
    await pg_cluster.wait_for_replay()
    async with TcpProxy(primary.host, primary.port) as proxy:
        engine = _engine(primary, "asyncpg", through=proxy)

        def moved() -> None:
            proxy.target_host, proxy.target_port = standby.host, standby.port

        @postgres_retry(resolve_commit="marker")
        async def pay(key: uuid.UUID) -> None:
            async with engine.begin() as connection:
                await connection.execute(INSERT, {"key": key})
                _on_commit(proxy, moved)

        key = uuid.uuid4()
        try:
            with pytest.raises(CommitOutcomeUnknownError) as caught:
                await pay(key)
        finally:
            await engine.dispose()
    assert any("only a standby answers" in note for note in caught.value.__notes__)
    assert await _stored(primary, key) == 1


async def test_markers_cost_one_round_trip_and_only_write_transactions_write_one(node: PostgresNode) -> None:
    async with TcpProxy(node.host, node.port) as proxy:
        engine = _engine(node, "psycopg", through=proxy)
        queries: list[str] = []

        def note(message: FrontendMessage) -> bool:  # matches nothing: only lists what the client runs
            if message.kind in {b"Q", b"E"}:  # an execution (a Parse and a Bind carry the text too)
                queries.append(message.sql or "")
            return False

        proxy.cut_after(note, once=False)

        @postgres_retry(resolve_commit="marker")
        async def pay(key: uuid.UUID) -> None:
            async with engine.begin() as connection:
                await connection.execute(INSERT, {"key": key})

        @postgres_retry(resolve_commit="marker")
        async def read() -> int:
            async with engine.begin() as connection:
                return int((await connection.execute(sa.text("SELECT 1"))).scalar_one())

        try:
            before = await node.fetchval(f"SELECT count(*) FROM {markers.TABLE}")
            await pay(uuid.uuid4())
            assert await read() == 1
            after = await node.fetchval(f"SELECT count(*) FROM {markers.TABLE}")
        finally:
            await engine.dispose()
    asked = [sql for sql in queries if markers.TABLE in sql]
    assert len(asked) == 2  # one statement before each COMMIT, no other
    assert after - before == 1  # the read-only transaction inserted nothing


async def test_a_missing_marker_table_is_named_with_the_command_that_creates_it(
    fresh_cluster: collections.abc.Callable[..., PostgresCluster],
) -> None:
    node = fresh_cluster(standbys=0).primary
    await node.execute("CREATE TABLE marker_payments (key uuid NOT NULL)")
    engine = _engine(node, "asyncpg")

    @postgres_retry(resolve_commit="marker")
    async def pay(key: uuid.UUID) -> None:
        async with engine.begin() as connection:
            await connection.execute(INSERT, {"key": key})

    key = uuid.uuid4()
    try:
        with pytest.raises(sa.exc.ProgrammingError) as caught:
            await pay(key)
    finally:
        await engine.dispose()
    assert any("db-retry markers install" in note for note in caught.value.__notes__)
    assert await _stored(node, key) == 0


async def test_prune_deletes_only_markers_older_than_the_retention(node: PostgresNode) -> None:
    now = time.time()
    old = [markers.new_marker(now - 7200 - index) for index in range(5)]
    young = [markers.new_marker(now - 60), markers.new_marker(now)]
    for marker in (*old, *young):
        await node.execute(f"INSERT INTO {markers.TABLE} (id) VALUES ($1)", marker)
    engine = _engine(node, "asyncpg")
    try:
        assert await markers.prune(engine, retention=3600, batch=2) == 5
        assert await markers.prune(engine, retention=3600) == 0
    finally:
        await engine.dispose()
    left = set(await node.fetchval(f"SELECT array_agg(id) FROM {markers.TABLE}"))
    assert left >= set(young)
    assert not left & set(old)


async def test_the_markers_command_installs_and_prunes(
    fresh_cluster: collections.abc.Callable[..., PostgresCluster], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = fresh_cluster(standbys=1)
    primary, standby = cluster.primary, cluster.standbys[0]
    dsn = (
        f"postgresql://{primary.user}@/{primary.database}"
        f"?host={standby.host}:{standby.port}&host={primary.host}:{primary.port}"
    )
    assert await asyncio.to_thread(main, ["markers", "install", dsn]) == 0  # several hosts: the writable one
    await primary.execute(f"INSERT INTO {markers.TABLE} (id) VALUES ($1)", markers.new_marker(time.time() - 100))
    assert await asyncio.to_thread(main, ["markers", "prune", primary.dsn(), "--retention", "10"]) == 0
    # Several hosts that say which one they want: taken as written.
    assert await asyncio.to_thread(main, ["markers", "prune", f"{dsn}&target_session_attrs=primary"]) == 0
    output = capsys.readouterr().out
    assert f"{markers.TABLE} is ready" in output
    assert "deleted 1 markers older than 10 s" in output
    assert "deleted 0 markers older than 3600 s" in output
    # A server that refuses: the standby cannot take the table.
    refused = await asyncio.to_thread(main, ["markers", "install", standby.dsn()])
    assert refused == 1
    assert "read-only transaction" in capsys.readouterr().out


def test_a_bad_dsn_is_refused_without_showing_its_password(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["markers", "install", "postgresql://app:s3cret@db:notaport/x"]) == 2
    output = capsys.readouterr().out
    assert "s3cret" not in output
    assert "notaport" in output


def test_markers_are_time_ordered_version_7_uuids() -> None:
    earlier, later = markers.new_marker(1_700_000_000.0), markers.new_marker(1_700_000_000.002)
    assert earlier.version == later.version == 7
    assert earlier.variant == uuid.RFC_4122
    assert earlier < later
    assert earlier.int >> 80 == 1_700_000_000_000
    assert len({markers.new_marker(1.0) for _ in range(1000)}) == 1000  # random below the milliseconds


def test_a_bad_resolve_commit_value_is_refused_at_decoration() -> None:
    with pytest.raises(ValueError, match="resolve_commit must be True, False or 'marker', got 'markers'"):
        postgres_retry(resolve_commit=typing.cast("typing.Any", "markers"))
    assert resolution(True) == resolution("xid") == "xid"
    assert resolution(False) is None
