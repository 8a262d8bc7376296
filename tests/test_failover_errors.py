"""SPEC B1: every failover-time error is produced by a real server fault, classified, and retried.

Each test runs work through ``postgres_retry``; a background task injects the fault and, where the
fault lasts, lifts it once the first retry shows the caller has seen it. The retry events tell which
error the caller really got.
"""

import asyncio
import collections.abc
import contextlib
import typing

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db_retry import ErrorKind, RetryEvent, postgres_retry
from db_retry.testing import PostgresCluster, PostgresNode, faults


pytestmark = pytest.mark.standby

# A lost server: an outage, or unavailable when the connection had never committed (db_retry/engine.py),
# which is how asyncpg before 0.32 reports a terminated backend (it drops the FATAL: only the lost connection).
LOST_SERVER: typing.Final = frozenset({ErrorKind.OUTAGE, ErrorKind.UNAVAILABLE})

Work = collections.abc.Callable[[], collections.abc.Coroutine[typing.Any, typing.Any, object]]


class _Seen:
    """Retry events, and an event set at the first one."""

    def __init__(self) -> None:
        self.events: list[RetryEvent] = []
        self.first = asyncio.Event()

    def __call__(self, event: RetryEvent) -> None:
        self.events.append(event)
        self.first.set()

    @property
    def sqlstates(self) -> list[str | None]:
        return [event.sqlstate for event in self.events]

    @property
    def kinds(self) -> list[ErrorKind]:
        return [event.kind for event in self.events]


def _engine(node: PostgresNode, **url: typing.Any) -> AsyncEngine:
    return create_async_engine(sa.make_url(node.dsn(driver="asyncpg")).set(**url), pool_size=2)


async def _query_running(node: PostgresNode, text: str) -> None:
    for _ in range(1000):
        count = await node.fetchval("SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'", text)
        if count:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{text!r} never ran")


async def _run(
    work: Work,
    fault: collections.abc.Callable[[_Seen], collections.abc.Coroutine[typing.Any, typing.Any, None]],
) -> _Seen:
    seen = _Seen()
    retried = postgres_retry(retries=20, on_retry=seen)(work)
    injector = asyncio.create_task(fault(seen))
    try:
        await asyncio.wait_for(retried(), 60)
    finally:
        await asyncio.wait_for(injector, 60)
    return seen


async def _retried_inside(
    fault: collections.abc.Callable[[], contextlib.AbstractAsyncContextManager[object]],
    work: Work,
    *,
    retries: int | None = None,
) -> tuple[object, _Seen]:
    """Enter ``fault``, run ``work`` under ``postgres_retry``, and lift the fault at the first retry."""
    seen = _Seen()
    entered = asyncio.Event()

    async def hold() -> None:
        async with fault():
            entered.set()
            await seen.first.wait()

    injector = asyncio.create_task(hold())
    ready = asyncio.create_task(entered.wait())
    await asyncio.wait([injector, ready], return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if injector.done():
        injector.result()  # the fault could not be set up: say why
    try:
        result = await asyncio.wait_for(postgres_retry(retries=retries, on_retry=seen)(work)(), 60)
    finally:
        await asyncio.wait_for(injector, 60)
    return result, seen


SLEEP = "SELECT pg_sleep(30)"


def _sleep_once(engine: AsyncEngine) -> Work:
    """Work that runs a long query on its first attempt and a short one after."""
    attempts: list[int] = []

    async def work() -> object:
        attempts.append(1)
        async with engine.connect() as connection:
            return await connection.scalar(sa.text(SLEEP if len(attempts) == 1 else "SELECT 1"))

    return work


async def test_57p01_backend_terminated_mid_query(pg_cluster: PostgresCluster) -> None:
    node = pg_cluster.primary
    engine = _engine(node)

    async def terminate(_: _Seen) -> None:
        await _query_running(node, SLEEP)
        assert await faults.terminate_backends(node, pids=None, application_name=None) >= 1

    try:
        seen = await _run(_sleep_once(engine), terminate)
    finally:
        await engine.dispose()
    # The server sends FATAL 57P01 and closes; the driver reports that, or the closed socket (08003).
    assert seen.sqlstates[0] in {"57P01", "08003"}
    assert seen.kinds[0] in LOST_SERVER


async def test_57p01_fast_shutdown_then_refused_while_down(
    fresh_cluster: typing.Callable[..., PostgresCluster],
) -> None:
    node = fresh_cluster().primary
    engine = _engine(node)

    async def fast_restart(_: _Seen) -> None:
        await _query_running(node, SLEEP)
        await faults.restart(node, "fast")

    try:
        seen = await _run(_sleep_once(engine), fast_restart)
    finally:
        await engine.dispose()
    assert seen.sqlstates[0] in {"57P01", "08003"}
    assert seen.kinds[0] in LOST_SERVER


async def test_57p02_crash_of_another_backend(fresh_cluster: typing.Callable[..., PostgresCluster]) -> None:
    node = fresh_cluster().primary
    engine = _engine(node)

    async def crash_other_backend(_: _Seen) -> None:
        await _query_running(node, SLEEP)
        await faults.kill_backend(node)  # SIGKILL of another backend: the postmaster resets every session

    try:
        seen = await _run(_sleep_once(engine), crash_other_backend)
    finally:
        await engine.dispose()
    assert seen.kinds[0] in LOST_SERVER
    assert seen.sqlstates[0] in {"57P02", "08003", None}  # a crash warning, then the connection is gone


async def test_57p03_server_not_accepting_yet(fresh_cluster: typing.Callable[..., PostgresCluster]) -> None:
    node = fresh_cluster().primary
    engine = _engine(node)

    async def work() -> object:
        async with engine.connect() as connection:
            return await connection.scalar(sa.text("SELECT 1"))

    try:
        result, seen = await _retried_inside(lambda: faults.cannot_connect_now(node), work, retries=1)
    finally:
        await engine.dispose()
    assert result == 1
    assert seen.sqlstates[0] == "57P03"
    assert set(seen.kinds) == {ErrorKind.UNAVAILABLE}  # retries=1, yet it waited: the work never started


async def test_53300_role_connection_limit(pg_cluster: PostgresCluster) -> None:
    node = pg_cluster.primary
    async with faults.limited_role(node, limit=1) as role:
        engine = _engine(node, username=role)
        held = await node.connect(user=role)

        async def work() -> object:
            async with engine.connect() as connection:
                return await connection.scalar(sa.text("SELECT current_user"))

        async def release(seen: _Seen) -> None:
            await seen.first.wait()
            await held.close()

        try:
            seen = _Seen()
            releaser = asyncio.create_task(release(seen))
            assert await asyncio.wait_for(postgres_retry(retries=1, on_retry=seen)(work)(), 60) == role
            await releaser
        finally:
            await engine.dispose()
            if not held.is_closed():
                await held.close()
    assert seen.sqlstates[0] == "53300"
    assert seen.kinds[0] is ErrorKind.UNAVAILABLE


async def test_53300_max_connections_exhausted(fresh_cluster: typing.Callable[..., PostgresCluster]) -> None:
    node = fresh_cluster().primary
    engine = _engine(node)

    async def work() -> object:
        async with engine.connect() as connection:
            return await connection.scalar(sa.text("SELECT 1"))

    try:
        result, seen = await _retried_inside(lambda: faults.exhaust_connections(node), work)
    finally:
        await engine.dispose()
    assert result == 1
    assert seen.sqlstates[0] == "53300"


async def test_25006_write_on_a_demoted_node(fresh_cluster: typing.Callable[..., PostgresCluster]) -> None:
    node = fresh_cluster().primary
    await node.execute("CREATE TABLE writes (id serial PRIMARY KEY)")
    engine = _engine(node)

    async def work() -> object:
        async with engine.begin() as connection:
            return await connection.scalar(sa.text("INSERT INTO writes DEFAULT VALUES RETURNING id"))

    try:
        result, seen = await _retried_inside(lambda: faults.read_only(node), work, retries=50)
    finally:
        await engine.dispose()
    assert result == 1
    assert seen.sqlstates[0] == "25006"
    # The node says it is read-only (default_transaction_read_only): wait for a writable one, as when no
    # host fits target_session_attrs, within the outage budget (tests/test_node_role.py).
    assert seen.kinds[0] is ErrorKind.UNAVAILABLE
    assert await node.fetchval("SELECT count(*) FROM writes") == 1  # the failed attempts wrote nothing


async def test_refused_while_the_server_is_stopped(fresh_cluster: typing.Callable[..., PostgresCluster]) -> None:
    node = fresh_cluster().primary
    engine = _engine(node)
    await faults.stop(node)

    async def work() -> object:
        async with engine.connect() as connection:
            return await connection.scalar(sa.text("SELECT 1"))

    async def start_again(seen: _Seen) -> None:
        await seen.first.wait()
        await faults.start(node)

    try:
        seen = await _run(work, start_again)
    finally:
        with contextlib.suppress(Exception):
            await engine.dispose()
    assert seen.sqlstates[0] is None
    assert set(seen.kinds) == {ErrorKind.UNAVAILABLE}
    assert "ConnectionRefusedError" in seen.events[0].error_class or "OSError" in seen.events[0].error_class
