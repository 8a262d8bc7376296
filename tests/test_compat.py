"""A program written against db-retry 0.8.4's documented API runs unchanged against this package.

The program only uses what 0.8.4 documents: the five exported names with their 0.8.4 signatures
(keyword names included), the bare and called decorator forms, a ``Transaction`` kept in a frozen
use-case dataclass and entered again on every (retried) call, and ``DB_RETRY_RETRIES_NUMBER``.
"""

import dataclasses

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import db_retry
from db_retry import Transaction, build_connection_factory, build_db_dsn, is_dsn_multihost, postgres_retry
from db_retry.testing import PostgresCluster


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "compat_customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(), index=True)


@postgres_retry
async def find_customer(session: AsyncSession, email: str) -> int | None:
    async with Transaction(session=session):
        return await session.scalar(sa.select(Customer.id).where(Customer.email == email))


@dataclasses.dataclass(kw_only=True, frozen=True, slots=True)
class CreateCustomer:
    transaction: Transaction
    attempts: list[int] = dataclasses.field(default_factory=list)

    @postgres_retry(retries=5)
    async def __call__(self, customer_id: int, email: str) -> str:
        self.attempts.append(customer_id)
        async with self.transaction:
            customer = Customer(id=customer_id, email=email)
            self.transaction.session.add(customer)
            await self.transaction.session.flush()
            if len(self.attempts) < 3:  # a real serialization failure from the server, twice
                await self.transaction.session.execute(sa.text("DO $$ BEGIN RAISE SQLSTATE '40001'; END $$"))
            await self.transaction.commit()
            return email


def test_the_0_8_4_names_are_exported() -> None:
    assert {"Transaction", "build_connection_factory", "build_db_dsn", "is_dsn_multihost", "postgres_retry"} <= set(
        db_retry.__all__,
    )


@pytest.mark.standby
async def test_a_0_8_4_program_runs_unchanged(
    pg_cluster: PostgresCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DB_RETRY_RETRIES_NUMBER", "3")
    multi_host_dsn = pg_cluster.multihost_dsn(driver=None, database="placeholder")
    assert is_dsn_multihost(db_dsn=multi_host_dsn)
    dsn = build_db_dsn(db_dsn=multi_host_dsn, database_name="postgres", drivername="postgresql+asyncpg")
    connection_factory = build_connection_factory(url=dsn, timeout=5.0)
    engine = create_async_engine(dsn, async_creator=connection_factory)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
            await connection.run_sync(Base.metadata.create_all)

        use_case = CreateCustomer(
            transaction=Transaction(session=AsyncSession(engine), isolation_level="SERIALIZABLE"),
        )
        created = await use_case(customer_id=1, email="ada@example.com")
        assert created == "ada@example.com"
        assert use_case.attempts == [1, 1, 1]

        async with AsyncSession(engine) as session:
            found = await find_customer(session, "ada@example.com")
        assert found == 1

        replica_dsn = build_db_dsn(multi_host_dsn, "postgres", True, "postgresql+asyncpg")  # positional, as 0.8.4
        await pg_cluster.wait_for_replay()
        replica = build_connection_factory(replica_dsn, 5.0)
        connection = await replica()
        try:
            assert await connection.fetchval("SELECT email FROM compat_customers") == "ada@example.com"
            assert await connection.fetchval("SELECT pg_is_in_recovery()") is True
        finally:
            await connection.close()
    finally:
        await engine.dispose()
