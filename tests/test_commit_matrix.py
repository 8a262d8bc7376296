"""Every way of committing, crossed with real faults and both drivers, on warm pooled engines (default QueuePool).

Each call writes one row under a key of its own, through ``@postgres_retry``. Whatever the fault, a call
either succeeds and its row is there exactly once, or raises :class:`CommitOutcomeUnknownError` (and then
its row is there at most once): never a doubled or a lost write. Faults are real: the kit's proxy cuts
the connection right after forwarding ``COMMIT``, the server terminates the backend or restarts, and a
node switches to read-only (``default_transaction_read_only``, as a demoted primary) while the pool holds
connections to it.

With ``resolve_commit=True`` the same calls ask the server about a lost COMMIT: the cut one is then known
to be committed (the call returns), and one lost to a restart is known not to be (the call is retried).
With ``resolve_commit="marker"`` the same holds, asked by the transaction's marker row instead of its id.
"""

import asyncio
import collections.abc
import dataclasses
import typing
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from db_retry import CommitOutcomeUnknownError, Transaction, build_connection_factory, markers, postgres_retry
from db_retry.testing import PostgresCluster, PostgresNode, faults
from db_retry.testing.proxy import TcpProxy


pytestmark = pytest.mark.standby

STYLES: typing.Final = ("engine.begin", "session.commit", "session.begin", "Transaction")
FAULTS: typing.Final = ("cut after COMMIT", "backend terminated", "demoted to read-only", "fast restart")
DRIVERS: typing.Final = ("asyncpg", "psycopg")
POOL_SIZE: typing.Final = 4
INSERT: typing.Final = sa.text("INSERT INTO matrix (key, attempt) VALUES (:key, :attempt)")

Hook = collections.abc.Callable[[AsyncConnection], collections.abc.Awaitable[None]]


@dataclasses.dataclass
class Nodes:
    first: PostgresNode  # where the pool's connections are when the fault strikes
    second: PostgresNode  # the read-write node after the demotion


@pytest.fixture(scope="module")
def nodes() -> collections.abc.Iterator[Nodes]:
    # Two servers of their own: the faults restart and demote them. Each holds the same table.
    with PostgresCluster(name="matrix-a") as first, PostgresCluster(name="matrix-b") as second:
        yield Nodes(first.primary, second.primary)


@pytest.fixture(autouse=True)
async def _table(nodes: Nodes) -> None:
    for node in (nodes.first, nodes.second):
        await node.execute("CREATE TABLE IF NOT EXISTS matrix (key uuid NOT NULL, attempt int NOT NULL)")
        engine = create_async_engine(node.dsn(driver="asyncpg"))
        try:
            await markers.install(engine)
        finally:
            await engine.dispose()


async def _count(nodes: Nodes, key: uuid.UUID) -> int:
    counts = [
        await node.fetchval("SELECT count(*) FROM matrix WHERE key = $1", key) for node in (nodes.first, nodes.second)
    ]
    return sum(int(count) for count in counts)


async def _warm(engine: AsyncEngine) -> set[int]:
    """Fill the pool: ``POOL_SIZE`` connections open at once, then all back in the pool; their backends."""
    barrier = asyncio.Barrier(POOL_SIZE)

    async def hold() -> int:
        async with engine.connect() as connection:
            pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            await barrier.wait()
            return int(pid)

    pids = set(await asyncio.gather(*(hold() for _ in range(POOL_SIZE))))
    assert engine.sync_engine.pool.checkedin() == POOL_SIZE  # type: ignore[attr-defined]
    return pids


def _engine(url: sa.URL, driver: str) -> AsyncEngine:
    if driver == "asyncpg":
        factory = build_connection_factory(url.set(drivername="postgresql"), timeout=2)
        return create_async_engine(url, pool_size=POOL_SIZE, async_creator=factory)
    return create_async_engine(url, pool_size=POOL_SIZE)


async def _commit_once(style: str, engine: AsyncEngine, key: uuid.UUID, attempt: int, hook: Hook) -> None:
    """One attempt: insert the row, let the fault strike (``hook``), commit the way ``style`` says."""
    if style == "engine.begin":
        async with engine.begin() as connection:
            await connection.execute(INSERT, {"key": key, "attempt": attempt})
            await hook(connection)
    elif style == "session.commit":
        async with AsyncSession(engine) as session:
            await session.execute(INSERT, {"key": key, "attempt": attempt})
            await hook(await session.connection())
            await session.commit()
    elif style == "session.begin":
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(INSERT, {"key": key, "attempt": attempt})
            await hook(await session.connection())
    else:
        async with Transaction(session=AsyncSession(engine)) as transaction:
            await transaction.session.execute(INSERT, {"key": key, "attempt": attempt})
            await hook(await transaction.session.connection())
            await transaction.commit()


@dataclasses.dataclass
class Outcome:
    result: str  # "ok" or "unknown"
    attempts: int
    stored: int


async def _run(nodes: Nodes, style: str, fault: str, driver: str, *, resolve: bool | str) -> Outcome:  # noqa: C901
    first, second = nodes.first, nodes.second
    async with TcpProxy(first.host, first.port) as proxy:
        if fault == "demoted to read-only":
            hosts = f"host={first.host}:{first.port}&host={second.host}:{second.port}"
            url = sa.make_url(
                f"postgresql+{driver}://{first.user}@/{first.database}?{hosts}&target_session_attrs=read-write"
            )
        else:
            url = sa.make_url(first.dsn(driver=driver)).set(host=proxy.host, port=proxy.port)
        engine = _engine(url, driver)
        attempts = 0
        key = uuid.uuid4()

        async def strike(connection: AsyncConnection) -> None:
            if attempts > 1:
                return
            if fault == "backend terminated":
                pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
                await first.execute("SELECT pg_terminate_backend($1)", pid)
                await connection.execute(sa.text("SELECT 1"))  # the server has ended this session
            elif fault == "fast restart":
                await faults.restart(first, "fast")

        @postgres_retry(resolve_commit=resolve)  # type: ignore[arg-type]
        async def pay() -> None:
            nonlocal attempts
            attempts += 1
            await _commit_once(style, engine, key, attempts, strike)

        try:
            if fault == "demoted to read-only":
                async with faults.read_only(second):
                    await _warm(engine)  # every pooled connection is on the first node
            else:
                await _warm(engine)
            try:
                if fault == "cut after COMMIT":
                    proxy.cut_after_query("COMMIT")
                    await pay()
                elif fault == "demoted to read-only":
                    async with faults.read_only(first):
                        await pay()
                else:
                    await pay()
            except CommitOutcomeUnknownError as exc:
                chained = exc.__cause__ is not None and "may or may not have been committed" in str(exc)
                result = "unknown" if chained else f"unknown, without the driver's error: {exc}"
            else:
                result = "ok"
        finally:
            await engine.dispose()
        return Outcome(result, attempts, await _count(nodes, key))


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("style", STYLES)
async def test_a_write_is_applied_once_or_reported_unknown(nodes: Nodes, style: str, fault: str, driver: str) -> None:
    outcome = await _run(nodes, style, fault, driver, resolve=False)
    # The invariant: a success is stored exactly once; an unknown outcome at most once.
    assert outcome.stored == 1 if outcome.result == "ok" else outcome.stored <= 1, outcome
    if fault == "cut after COMMIT":
        # The server applied the COMMIT; only the answer was lost: never run again.
        assert (outcome.result, outcome.attempts, outcome.stored) == ("unknown", 1, 1)
    elif fault in {"backend terminated", "demoted to read-only"}:
        # Nothing of the first attempt was committed, and the error says so: retried to success.
        assert (outcome.result, outcome.attempts, outcome.stored) == ("ok", 2, 1)
    else:
        # A restart closes the connection before or while COMMIT is sent: the driver tells which.
        assert outcome.result == "ok" or outcome.attempts == 1, outcome


@pytest.mark.parametrize("how", [True, "marker"])
@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("style", STYLES)
async def test_a_lost_commit_is_resolved_by_asking_the_server(
    nodes: Nodes, style: str, fault: str, driver: str, how: bool | str
) -> None:
    outcome = await _run(nodes, style, fault, driver, resolve=how)
    assert outcome.result == "ok", outcome  # the server could tell every time: no unknown outcome left
    assert outcome.stored == 1, outcome
    if fault == "cut after COMMIT":
        assert outcome.attempts == 1  # committed: the call returned, the work never ran again
    else:
        assert outcome.attempts == 2, outcome  # nothing committed: safe to run again, and it did
