"""SPEC B2 with a real cut: the proxy forwards COMMIT, the server applies it, the client never hears back."""

import collections.abc
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from db_retry import CommitOutcomeUnknownError, Transaction, postgres_retry
from db_retry.retriable import ErrorKind, classify
from db_retry.testing import PostgresCluster
from db_retry.testing.proxy import TcpProxy


pytestmark = pytest.mark.standby


@pytest.fixture(params=["asyncpg", "psycopg"])
async def proxied(
    pg_cluster: PostgresCluster,
    request: pytest.FixtureRequest,
) -> collections.abc.AsyncIterator[tuple[TcpProxy, AsyncEngine]]:
    primary = pg_cluster.primary
    await primary.execute("CREATE TABLE IF NOT EXISTS payments (id uuid PRIMARY KEY)")
    async with TcpProxy(primary.host, primary.port) as proxy:
        url = sa.make_url(primary.dsn(driver=request.param)).set(host=proxy.host, port=proxy.port)
        engine = create_async_engine(url, pool_size=2)
        try:
            yield proxy, engine
        finally:
            await engine.dispose()


async def _stored(cluster: PostgresCluster, key: uuid.UUID) -> int:
    return int(await cluster.primary.fetchval("SELECT count(*) FROM payments WHERE id = $1", key))


async def test_a_lost_commit_is_reported_once_and_not_retried(
    pg_cluster: PostgresCluster,
    proxied: tuple[TcpProxy, AsyncEngine],
) -> None:
    proxy, engine = proxied
    calls: list[uuid.UUID] = []

    @postgres_retry(retries=5)
    async def pay(key: uuid.UUID) -> None:
        calls.append(key)
        async with Transaction(session=AsyncSession(engine)) as transaction:
            await transaction.session.execute(sa.text("INSERT INTO payments VALUES (:id)"), {"id": key})
            await transaction.commit()

    key = uuid.uuid4()
    proxy.cut_after_query("COMMIT")
    with pytest.raises(CommitOutcomeUnknownError) as caught:
        await pay(key)
    assert proxy.cuts_fired == 1
    assert calls == [key]  # the function ran once
    assert await _stored(pg_cluster, key) == 1  # ... and the server did commit it
    assert classify(caught.value) is ErrorKind.AMBIGUOUS
    assert caught.value.__cause__ is not None  # the driver's own error, chained

    other = uuid.uuid4()
    await pay(other)  # the proxy passes traffic again
    assert await _stored(pg_cluster, other) == 1


async def test_idempotent_work_may_opt_in_and_is_applied_once(
    pg_cluster: PostgresCluster,
    proxied: tuple[TcpProxy, AsyncEngine],
) -> None:
    proxy, engine = proxied
    calls: list[uuid.UUID] = []

    @postgres_retry(retry_ambiguous_commit=True)
    async def pay_once(key: uuid.UUID) -> None:
        calls.append(key)
        async with Transaction(session=AsyncSession(engine)) as transaction:
            await transaction.session.execute(
                sa.text("INSERT INTO payments VALUES (:id) ON CONFLICT (id) DO NOTHING"),
                {"id": key},
            )
            await transaction.commit()

    key = uuid.uuid4()
    proxy.cut_after_query("COMMIT")
    await pay_once(key)
    assert calls == [key, key]  # retried after the lost commit
    assert await _stored(pg_cluster, key) == 1  # the key made the second run a no-op
