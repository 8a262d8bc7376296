"""A statement the driver prepared and the server no longer knows: a clear error saying what to set, not retried.

Behind a pooler in transaction mode each transaction may get another server connection, where the
driver's prepared statements do not exist. The same server error comes from ``DEALLOCATE ALL`` run
behind the driver's back on the one connection (inside a DO block), which is how these tests produce it for real.
"""

import collections.abc

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db_retry import postgres_retry
from db_retry.engine import PreparedStatementBehindPoolerError
from db_retry.retriable import classify


@pytest.fixture(params=["asyncpg", "psycopg"])
async def engine(pg_dsn: str, request: pytest.FixtureRequest) -> collections.abc.AsyncIterator[AsyncEngine]:
    # psycopg prepares a statement from its 5th run (prepare_threshold): make it the 1st.
    connect_args = {"prepare_threshold": 0} if request.param == "psycopg" else {}
    engine = create_async_engine(
        sa.make_url(pg_dsn).set(drivername=f"postgresql+{request.param}"),
        pool_size=1,
        connect_args=connect_args,
    )
    yield engine
    await engine.dispose()


async def test_a_lost_prepared_statement_says_what_to_set(engine: AsyncEngine) -> None:
    attempts = 0
    query = sa.text("SELECT CAST(:value AS int) + 1")

    @postgres_retry
    async def work() -> int:
        nonlocal attempts
        attempts += 1
        async with engine.connect() as connection:
            value = (await connection.execute(query, {"value": 1})).scalar_one()
            # As another server connection would be; in a DO block, so that psycopg does not see it and forget.
            await connection.exec_driver_sql("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$")
            return int(value + (await connection.execute(query, {"value": 2})).scalar_one())

    with pytest.raises(PreparedStatementBehindPoolerError) as caught:
        await work()
    assert attempts == 1  # retrying would not help
    assert classify(caught.value) is None
    message = str(caught.value)
    assert "does not exist" in message
    assert "statement_cache_size" in message
    assert "prepare_threshold" in message
    assert isinstance(caught.value, sa.exc.ProgrammingError)


async def test_a_users_own_prepared_statement_keeps_its_error(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        with pytest.raises(sa.exc.DBAPIError) as caught:
            await connection.exec_driver_sql("EXECUTE my_own_statement")
    assert not isinstance(caught.value, PreparedStatementBehindPoolerError)
