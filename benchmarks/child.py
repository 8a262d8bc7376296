"""What every scenario process shares, in both interpreters: the ``@`` line protocol, the engine, the schema's SQL.

Imported by the child side of each scenario module, so it runs under db-retry 0.8.4 too: it uses nothing but
SQLAlchemy, asyncpg and the standard library (never ``db_retry.testing``, never ``harness``).
"""

import json
import sys
import typing

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


Params: typing.TypeAlias = dict[str, typing.Any]
Result: typing.TypeAlias = dict[str, typing.Any]

SELECT_COUNTER: typing.Final = sa.text("SELECT n FROM bench_counter WHERE id = 1")
APPLICATION_NAME: typing.Final = "db-retry-bench"


def emit(tag: str, payload: object = None) -> None:
    sys.stdout.write(f"@{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


def error_name(exc: BaseException) -> str:
    """The error class, and the class of the driver error under a SQLAlchemy wrapper."""
    name = type(exc).__name__
    orig = getattr(exc, "orig", None)
    cause = getattr(orig, "__cause__", None) or orig
    return f"{name}({type(cause).__name__})" if cause is not None else name


def make_engine(dsn: str, *, pool_size: int, pre_ping: bool = False, **kwargs: typing.Any) -> AsyncEngine:  # noqa: ANN401
    connect_args = {"server_settings": {"application_name": APPLICATION_NAME}}
    return create_async_engine(
        dsn,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=pre_ping,
        connect_args=connect_args,
        **kwargs,
    )


async def fill_pool(engine: AsyncEngine, size: int) -> None:
    """Open ``size`` pooled connections before measuring, so connecting is not part of the numbers."""
    connections = [await engine.connect() for _ in range(size)]
    for connection in connections:
        await connection.exec_driver_sql("SELECT 1")
    for connection in connections:
        await connection.close()
