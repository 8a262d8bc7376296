"""Transaction against a real server, every outcome checked from a second connection."""

import asyncio
import collections.abc
import typing

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from db_retry import CommitOutcomeUnknownError, Transaction, is_retriable, postgres_retry
from db_retry.retriable import ErrorKind, classify
from db_retry.transaction import _held_connections, cannot_continue


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "tx_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str] = mapped_column(sa.String(), default="")


@pytest.fixture(params=["asyncpg", "psycopg"])
async def engine(pg_dsn: str, request: pytest.FixtureRequest) -> collections.abc.AsyncIterator[AsyncEngine]:
    """The same tests through both drivers: SQLAlchemy's asyncpg and psycopg 3 dialects."""
    engine = create_async_engine(sa.make_url(pg_dsn).set(drivername=f"postgresql+{request.param}"), pool_size=2)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
async def observer(
    engine: AsyncEngine,
) -> collections.abc.AsyncIterator[typing.Callable[[], typing.Awaitable[list[int]]]]:
    """Reads committed rows through a connection of its own (NullPool: one-off, outside the engine under test)."""
    separate = create_async_engine(engine.url, poolclass=sa.NullPool)

    async def ids() -> list[int]:
        async with separate.connect() as connection:
            return list((await connection.execute(sa.text("SELECT id FROM tx_items ORDER BY id"))).scalars())

    yield ids
    await separate.dispose()


async def test_commit_keeps_the_work(
    engine: AsyncEngine, observer: typing.Callable[[], typing.Awaitable[list[int]]]
) -> None:
    session = AsyncSession(engine)
    async with Transaction(session=session) as transaction:
        session.add(Item(id=1))
        await transaction.commit()
    assert await observer() == [1]
    assert not session.in_transaction()


async def test_work_without_commit_is_rolled_back(
    engine: AsyncEngine,
    observer: typing.Callable[[], typing.Awaitable[list[int]]],
) -> None:
    async with Transaction(session=AsyncSession(engine)) as transaction:
        transaction.session.add(Item(id=1))
        await transaction.session.flush()
    assert await observer() == []


async def test_an_exception_propagates_and_rolls_back(
    engine: AsyncEngine,
    observer: typing.Callable[[], typing.Awaitable[list[int]]],
) -> None:
    error = RuntimeError("boom")
    with pytest.raises(RuntimeError) as caught:
        async with Transaction(session=AsyncSession(engine)) as transaction:
            transaction.session.add(Item(id=1))
            await transaction.session.flush()
            raise error
    assert caught.value is error
    assert await observer() == []


async def test_explicit_rollback(
    engine: AsyncEngine, observer: typing.Callable[[], typing.Awaitable[list[int]]]
) -> None:
    async with Transaction(session=AsyncSession(engine)) as transaction:
        transaction.session.add(Item(id=1))
        await transaction.rollback()
        transaction.session.add(Item(id=2))
        await transaction.commit()
    assert await observer() == [2]


@pytest.mark.parametrize(
    ("level", "shown"),
    [("SERIALIZABLE", "serializable"), ("REPEATABLE READ", "repeatable read"), (None, "read committed")],
)
async def test_isolation_level(engine: AsyncEngine, level: typing.Any, shown: str) -> None:
    async with Transaction(session=AsyncSession(engine), isolation_level=level) as transaction:
        result = await transaction.session.execute(sa.text("SHOW transaction_isolation"))
        assert result.scalar() == shown


async def test_joins_an_open_transaction(
    engine: AsyncEngine, observer: typing.Callable[[], typing.Awaitable[list[int]]]
) -> None:
    session = AsyncSession(engine)
    await session.begin()
    session.add(Item(id=1))
    await session.flush()
    async with Transaction(session=session) as transaction:
        transaction.session.add(Item(id=2))
        await transaction.commit()
    assert await observer() == [1, 2]


async def test_recovers_from_a_failed_flush(
    engine: AsyncEngine, observer: typing.Callable[[], typing.Awaitable[list[int]]]
) -> None:
    session = AsyncSession(engine)
    async with Transaction(session=session) as transaction:
        session.add(Item(id=1))
        await transaction.commit()
    session.add(Item(id=1))
    with pytest.raises(sa.exc.IntegrityError):
        await session.flush()
    assert cannot_continue(session)
    async with Transaction(session=session) as transaction:
        session.add(Item(id=2))
        await transaction.commit()
    assert await observer() == [1, 2]


async def test_recovers_from_a_statement_the_server_aborted(
    engine: AsyncEngine,
    observer: typing.Callable[[], typing.Awaitable[list[int]]],
) -> None:
    session = AsyncSession(engine)
    await session.begin()
    with pytest.raises(sa.exc.ProgrammingError):
        await session.execute(sa.text("SELECT * FROM no_such_table"))
    # SQLAlchemy still calls this transaction active; PostgreSQL would answer 25P02 to anything else.
    assert session.sync_session.get_transaction() is not None
    assert session.sync_session.get_transaction().is_active  # type: ignore[union-attr]
    assert cannot_continue(session)
    async with Transaction(session=session) as transaction:
        session.add(Item(id=3))
        await transaction.commit()
    assert await observer() == [3]


async def test_a_failure_inside_a_released_savepoint_does_not_abort(
    engine: AsyncEngine,
    observer: typing.Callable[[], typing.Awaitable[list[int]]],
) -> None:
    session = AsyncSession(engine)
    await session.begin()
    session.add(Item(id=1))
    await session.flush()
    savepoint = await session.begin_nested()
    with pytest.raises(sa.exc.ProgrammingError):
        await session.execute(sa.text("SELECT * FROM no_such_table"))
    await savepoint.rollback()
    assert not cannot_continue(session)
    async with Transaction(session=session) as transaction:  # joins: the outer work is kept
        session.add(Item(id=2))
        await transaction.commit()
    assert await observer() == [1, 2]


async def test_recovers_from_a_killed_connection(
    engine: AsyncEngine,
    observer: typing.Callable[[], typing.Awaitable[list[int]]],
) -> None:
    session = AsyncSession(engine)
    await session.begin()
    pid = (await session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
    # NullPool: a one-off admin connection, outside the engine under test.
    async with create_async_engine(engine.url, poolclass=sa.NullPool).connect() as admin:
        await admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with pytest.raises(sa.exc.DBAPIError) as caught:
        await session.execute(sa.text("SELECT 1"))
    assert is_retriable(caught.value)
    assert cannot_continue(session)
    async with Transaction(session=session) as transaction:
        session.add(Item(id=4))
        await transaction.commit()
    assert await observer() == [4]


async def test_held_connections_reads_sqlalchemy_internals_that_still_exist(engine: AsyncEngine) -> None:
    session = AsyncSession(engine)
    async with Transaction(session=session):
        assert _held_connections(session) == []
        await session.execute(sa.text("SELECT 1"))
        assert len(_held_connections(session)) == 1  # fails loudly if SessionTransaction._connections changes


async def test_a_commit_the_server_refuses_is_not_ambiguous(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            sa.text(
                "ALTER TABLE tx_items ADD CONSTRAINT unique_note UNIQUE (note) DEFERRABLE INITIALLY DEFERRED",
            ),
        )
    with pytest.raises(sa.exc.IntegrityError) as caught:
        async with Transaction(session=AsyncSession(engine)) as transaction:
            transaction.session.add_all([Item(id=1, note="same"), Item(id=2, note="same")])
            await transaction.commit()  # the deferred check fails at COMMIT: definitely not committed
    assert not isinstance(caught.value, CommitOutcomeUnknownError)


async def test_a_flush_failure_before_commit_is_not_ambiguous(engine: AsyncEngine) -> None:
    with pytest.raises(sa.exc.IntegrityError) as caught:
        async with Transaction(session=AsyncSession(engine)) as transaction:
            transaction.session.add_all([Item(id=1), Item(id=1)])
            await transaction.commit()
    assert not isinstance(caught.value, CommitOutcomeUnknownError)


async def test_connection_lost_during_commit_is_outcome_unknown(
    engine: AsyncEngine,
    observer: typing.Callable[[], typing.Awaitable[list[int]]],
) -> None:
    # A deferred constraint trigger makes COMMIT itself take a while, so the backend can be
    # terminated exactly while COMMIT is in flight: a real server in the ambiguous situation.
    async with engine.begin() as connection:
        await connection.execute(
            sa.text(
                "CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$",
            ),
        )
        await connection.execute(
            sa.text(
                "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON tx_items "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
            ),
        )
    calls: list[int] = []

    @postgres_retry(retries=3)
    async def insert() -> None:
        calls.append(1)
        async with Transaction(session=AsyncSession(engine)) as transaction:
            transaction.session.add(Item(id=5))
            pid = (await transaction.session.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
            killer = asyncio.create_task(_terminate_when_committing(engine, pid))
            try:
                await transaction.commit()
            finally:
                await killer

    with pytest.raises(CommitOutcomeUnknownError) as caught:
        await insert()
    assert calls == [1]  # not retried: the work might have been applied
    assert isinstance(caught.value, sa.exc.OperationalError)
    assert caught.value.__cause__ is not None
    assert classify(caught.value) is ErrorKind.AMBIGUOUS
    assert await observer() == []


async def _terminate_when_committing(engine: AsyncEngine, pid: int) -> None:
    # NullPool: a one-off admin connection, outside the engine under test.
    async with create_async_engine(engine.url, poolclass=sa.NullPool).connect() as admin:
        for _ in range(500):
            state = (
                await admin.execute(sa.text("SELECT query FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid})
            ).scalar()
            if state is not None and state.upper().startswith("COMMIT"):
                await admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                return
            await asyncio.sleep(0.01)
    pytest.fail("COMMIT never showed up in pg_stat_activity")


async def test_a_failing_rollback_never_hides_the_blocks_error(engine: AsyncEngine) -> None:
    # No real server makes ROLLBACK itself fail on demand, so the session's rollback is replaced here.
    class BrokenRollback(AsyncSession):
        async def rollback(self) -> None:
            raise OSError("rollback failed")

    original = RuntimeError("the block failed")
    with pytest.raises(RuntimeError) as caught:
        async with Transaction(session=BrokenRollback(engine)) as transaction:
            await transaction.session.execute(sa.text("SELECT 1"))
            raise original
    assert caught.value is original

    with pytest.raises(OSError, match="rollback failed"):
        async with Transaction(session=BrokenRollback(engine)) as transaction:
            await transaction.session.execute(sa.text("SELECT 1"))


async def test_joining_an_open_transaction_at_another_isolation_level_is_refused(engine: AsyncEngine) -> None:
    session = AsyncSession(engine)
    await session.execute(sa.text("SELECT 1"))  # the session now holds a READ COMMITTED transaction
    with pytest.raises(ValueError, match=r"isolation_level='SERIALIZABLE'.* already runs at 'READ COMMITTED'"):
        async with Transaction(session=session, isolation_level="SERIALIZABLE"):
            pytest.fail("the block must not run at the old level")  # pragma: no cover
    async with Transaction(session=session, isolation_level="READ COMMITTED") as transaction:  # the same level: joins
        shown = (await transaction.session.execute(sa.text("SHOW transaction_isolation"))).scalar_one()
        assert shown == "read committed"
    session = AsyncSession(engine)
    await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    async with Transaction(session=session, isolation_level="REPEATABLE READ") as transaction:
        shown = (await transaction.session.execute(sa.text("SHOW transaction_isolation"))).scalar_one()
        assert shown == "repeatable read"
