"""One worker process of ``test_turns.py``: increments one SERIALIZABLE row through ``postgres_retry``.

``python tests/turns_worker.py PARAMS_JSON`` waits for a line on stdin (so every process of a test
starts together), runs ``workers`` callers of ``calls`` calls each, in the commit style the caller's
number picks, and prints one JSON line: successful calls, failures by error, attempts, and whether the
call site took turns on the server. Every process runs this same module: one call site, one lock key.
"""

import asyncio
import collections
import inspect
import json
import sys
import time
import typing

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from db_retry import Transaction, postgres_retry


STYLES: typing.Final = ("Transaction", "session.begin()", "engine.begin()", "session.commit()")
READ: typing.Final = sa.text("SELECT n FROM turn_counter WHERE id = 1")
WRITE: typing.Final = sa.text("UPDATE turn_counter SET n = :n WHERE id = 1")

attempts = 0


async def _bump_in(engine: AsyncEngine, style: str) -> None:
    if style == "engine.begin()":
        async with engine.begin() as connection:
            value = (await connection.execute(READ)).scalar_one()
            await connection.execute(WRITE, {"n": value + 1})
        return
    session = AsyncSession(engine)
    if style == "Transaction":
        async with Transaction(session=session) as transaction:
            value = (await transaction.session.execute(READ)).scalar_one()
            await transaction.session.execute(WRITE, {"n": value + 1})
            await transaction.commit()
    elif style == "session.begin()":
        async with session, session.begin():
            value = (await session.execute(READ)).scalar_one()
            await session.execute(WRITE, {"n": value + 1})
    else:
        async with session:
            value = (await session.execute(READ)).scalar_one()
            await session.execute(WRITE, {"n": value + 1})
            await session.commit()


@postgres_retry  # 0.8.4's defaults: 3 attempts
async def bump(engine: AsyncEngine, style: str) -> None:
    global attempts  # noqa: PLW0603 - the worker's one tally
    attempts += 1
    await _bump_in(engine, style)


def took_server_turns() -> bool:
    server = getattr(inspect.getclosurevars(bump).nonlocals["policy"], "server", None)
    return server is not None and bool(server.until)


async def main(params: dict[str, typing.Any]) -> dict[str, typing.Any]:
    engine = create_async_engine(params["dsn"], isolation_level="SERIALIZABLE", pool_size=params["workers"])
    ok = 0
    failed: collections.Counter[str] = collections.Counter()
    failed_at: list[float] = []  # seconds from the start, for a failure's report
    try:
        await warm(engine, params["workers"])
        print("READY", flush=True)  # noqa: T201 - the test's protocol
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        started = time.monotonic()

        async def caller(number: int) -> None:
            nonlocal ok
            style = STYLES[(number + params["offset"]) % len(STYLES)]
            for _ in range(params["calls"]):
                try:
                    await bump(engine, style)
                except Exception as exc:
                    failed[f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"] += 1
                    failed_at.append(round(time.monotonic() - started, 3))
                else:
                    ok += 1

        await asyncio.gather(*(caller(number) for number in range(params["workers"])))
    finally:
        await engine.dispose()
    return {
        "ok": ok,
        "failed": dict(failed),
        "failed_at": failed_at,
        "attempts": attempts,
        "server_turns": took_server_turns(),
    }


async def warm(engine: AsyncEngine, size: int) -> None:
    """Open ``size`` pooled connections at once and return them: a warm default QueuePool."""
    connections = [await engine.connect() for _ in range(size)]
    for connection in connections:
        await connection.execute(sa.text("SELECT 1"))
        await connection.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))), flush=True)  # noqa: T201
