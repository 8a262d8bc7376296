"""Disconnects (seed 003, ours only): pre-ping (pessimistic) vs retry on invalidation (optimistic).

Child side: ``child`` counts round trips per short transaction through a counting proxy, times short
transactions with and without ``pool_pre_ping``, then kills every pooled session (``pg_terminate_backend``) and
runs bursts of concurrent calls, without and with ``@postgres_retry``. Driver side: ``bench`` runs it in our
interpreter only and fails the run if a client session is left; its table has its own columns (pessimistic,
optimistic). No goals. The analysis is in architecture/disconnects.md.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import struct
import time
import typing

import asyncpg
import sqlalchemy as sa
from child import APPLICATION_NAME, SELECT_COUNTER, error_name, fill_pool, make_engine
from sqlalchemy import event
from sqlalchemy.ext.asyncio import async_sessionmaker

from db_retry import Transaction, postgres_retry


if typing.TYPE_CHECKING:
    from child import Params, Result
    from harness import Context

    from db_retry.testing import PostgresCluster


# -- child side (ours; it uses only the shared API all the same) ------------------------------------------
class CountingProxy:
    """A loopback TCP proxy counting the client's requests that wait for an answer (one round trip each).

    In the PostgreSQL protocol a client waits for ``ReadyForQuery`` after a simple ``Query`` (``Q``) and
    after a ``Sync`` (``S``, which ends each extended-protocol exchange), so counting those counts round
    trips. The untyped packets of the startup phase (SSL request, startup message) are skipped.
    """

    STARTUP_CODES: typing.Final = (80877103, 80877104)  # SSLRequest, GSSENCRequest: a startup packet follows

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()
        if self.server is not None:
            await self.server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.upstream)
        self.writers |= {client_writer, server_writer}
        try:
            await asyncio.gather(
                self._pump(client_reader, server_writer, count=True),
                self._pump(server_reader, client_writer, count=False),
            )
        finally:
            for writer in (client_writer, server_writer):
                writer.close()
                self.writers.discard(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool) -> None:
        buffer = b""
        startup = True
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
                if not count:
                    continue
                buffer += data
                while True:
                    if startup:
                        if len(buffer) < 8:
                            break
                        length, code = struct.unpack("!ii", buffer[:8])
                        if len(buffer) < length:
                            break
                        buffer = buffer[length:]
                        startup = code in self.STARTUP_CODES
                        continue
                    if len(buffer) < 5:
                        break
                    kind, length = buffer[:1], struct.unpack("!i", buffer[1:5])[0]
                    if len(buffer) < 1 + length:
                        break
                    buffer = buffer[1 + length :]
                    self.requests += kind in (b"Q", b"S")
        except ConnectionError:
            pass
        finally:
            writer.close()


async def child(params: Params) -> Result:
    """Pre-ping vs retry on invalidation: round trips and latency per short transaction; a pool of killed sessions."""
    host: str = params["host"]
    port: int = params["port"]
    dsn = f"postgresql+asyncpg://postgres@{host}:{port}/postgres"
    result: Result = {"round_trips": await round_trips(host, port, params["count_transactions"])}
    result["latency_s"] = await transaction_latency(dsn, params["latency_transactions"])
    result["killed"] = {
        name: await killed_pool(dsn, pre_ping=pre_ping, retried=retried, bursts=params["kill_bursts"])
        for name, pre_ping, retried in (
            ("pessimistic", True, False),
            ("optimistic", False, False),
            ("optimistic+postgres_retry", False, True),
        )
    }
    return result


POOL_SIZE: typing.Final = 4


async def short_transaction(session_factory: async_sessionmaker[typing.Any]) -> None:
    """One checkout: read one row in a transaction and commit, as a small service call does."""
    async with Transaction(session=session_factory()) as transaction:
        await transaction.session.execute(SELECT_COUNTER)
        await transaction.commit()


async def round_trips(host: str, port: int, transactions: int) -> Result:
    """Round trips (counted by a proxy), statements and checkouts (SQLAlchemy events) per short transaction."""
    proxy = CountingProxy(host, port)
    proxy_port = await proxy.start()
    result: Result = {}
    try:
        for name, pre_ping in (("pessimistic", True), ("optimistic", False)):
            engine = make_engine(
                f"postgresql+asyncpg://postgres@127.0.0.1:{proxy_port}/postgres", pool_size=POOL_SIZE, pre_ping=pre_ping
            )
            session_factory = async_sessionmaker(engine, expire_on_commit=False)
            counts = collections.Counter[str]()
            await fill_pool(engine, POOL_SIZE)
            await short_transaction(session_factory)  # prepare the statement once (asyncpg's cache)
            event.listen(engine.sync_engine, "before_cursor_execute", lambda *_, c=counts: c.update(["statements"]))
            event.listen(engine.sync_engine.pool, "checkout", lambda *_, c=counts: c.update(["checkouts"]))
            before = proxy.requests
            for _ in range(transactions):
                await short_transaction(session_factory)
            result[name] = {
                "transactions": transactions,
                "round_trips": proxy.requests - before,
                "statements": counts["statements"],
                "checkouts": counts["checkouts"],
            }
            await engine.dispose()
    finally:
        await proxy.close()
    return result


async def transaction_latency(dsn: str, transactions: int) -> dict[str, list[float]]:
    """Seconds per short transaction with and without pre-ping, direct to the server, in alternating blocks."""
    engines = {
        "pessimistic": make_engine(dsn, pool_size=POOL_SIZE, pre_ping=True),
        "optimistic": make_engine(dsn, pool_size=POOL_SIZE),
    }
    latencies: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        await fill_pool(engine, POOL_SIZE)
    block = 100
    for _ in range(max(1, transactions // block)):
        for name, engine in engines.items():
            session_factory = async_sessionmaker(engine, expire_on_commit=False)
            for _ in range(block):
                began = time.perf_counter()
                await short_transaction(session_factory)
                latencies[name].append(time.perf_counter() - began)
    for engine in engines.values():
        await engine.dispose()
    return latencies


async def killed_pool(dsn: str, *, pre_ping: bool, retried: bool, bursts: int) -> Result:
    """Fill the pool, kill every pooled session on the server, then run ``bursts`` bursts of concurrent calls."""
    pool_size = POOL_SIZE
    engine = make_engine(dsn, pool_size=pool_size, pre_ping=pre_ping)
    session_factory = async_sessionmaker(engine, expire_on_commit=False)
    attempts = 0

    async def call() -> None:
        nonlocal attempts
        attempts += 1
        await short_transaction(session_factory)

    function = postgres_retry(call) if retried else call
    errors: collections.Counter[str] = collections.Counter()

    async def one() -> float:
        began = time.perf_counter()
        try:
            await function()
        except Exception as exc:  # noqa: BLE001 - what a caller sees is the result
            errors[error_name(exc)] += 1
        return time.perf_counter() - began

    await fill_pool(engine, pool_size)
    url = sa.make_url(dsn)
    killed = await terminate_pooled(url.host or "127.0.0.1", url.port or 5432)
    latency = [list(await asyncio.gather(*(one() for _ in range(pool_size)))) for _ in range(bursts)]
    await engine.dispose()
    return {
        "killed": killed,
        "calls": bursts * pool_size,
        "attempts": attempts,
        "errors": dict(errors),
        "burst_latency_s": latency,
    }


async def terminate_pooled(host: str, port: int) -> int:
    """End every session of this benchmark's engines on the server (``pg_terminate_backend``), waiting for each."""
    admin = await asyncpg.connect(host=host, port=port, user="postgres", database="postgres", timeout=10)
    try:
        killed: int = await admin.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE application_name = $1 AND pid <> pg_backend_pid()",
            APPLICATION_NAME,
        )
    finally:
        await admin.close()
    return killed


# -- driver side ------------------------------------------------------------------------------------------
async def bench(context: Context, cluster: PostgresCluster) -> list[list[str]]:
    """Seed 003, ours only: pre-ping (pessimistic) vs retry on invalidation (optimistic)."""
    from harness import Scenario, assert_no_sessions, fmt, ms, percentile  # noqa: PLC0415 - driver only

    settings = context.settings
    primary = cluster.primary
    params = {
        "host": primary.host,
        "port": primary.port,
        "latency_transactions": settings.latency_transactions,
        "count_transactions": settings.count_transactions,
        "kill_bursts": settings.kill_bursts,
    }
    async with Scenario(context, context.ours, "disconnects", params) as scenario:
        result = await scenario.expect("RESULT", timeout=600)
    await assert_no_sessions([primary], "disconnects")
    context.data["disconnects"] = result
    trips, latency, killed = result["round_trips"], result["latency_s"], result["killed"]

    def per_transaction(mode: str, key: str) -> float:
        return float(trips[mode][key]) / float(trips[mode]["transactions"])

    def describe(mode: str) -> str:
        outcome = killed[mode]
        errors = sum(outcome["errors"].values())
        detail = ", ".join(f"{count}x {name}" for name, count in outcome["errors"].items())
        text = f"{errors} of {outcome['calls']} calls failed" + (f" ({detail})" if detail else "")
        retries = outcome["attempts"] - outcome["calls"]
        return text + (f"; {retries} retried" if retries else "")

    return [
        [
            "round trips per checkout (short read transaction)",
            fmt(per_transaction("pessimistic", "round_trips")),
            fmt(per_transaction("optimistic", "round_trips")),
        ],
        [
            "statements sent by the application per checkout",
            fmt(per_transaction("pessimistic", "statements")),
            fmt(per_transaction("optimistic", "statements")),
        ],
        [
            "latency per short transaction, median ms",
            fmt(ms(statistics.median(latency["pessimistic"]))),
            fmt(ms(statistics.median(latency["optimistic"]))),
        ],
        [
            "latency per short transaction, p95 ms",
            fmt(ms(percentile(latency["pessimistic"], 95))),
            fmt(ms(percentile(latency["optimistic"], 95))),
        ],
        [
            "after pg_terminate_backend of every pooled session, without postgres_retry",
            describe("pessimistic"),
            describe("optimistic"),
        ],
        ["the same, calls under @postgres_retry", "—", describe("optimistic+postgres_retry")],
        [
            "slowest call of the first burst after the kill, ms",
            fmt(ms(max(killed["pessimistic"]["burst_latency_s"][0]))),
            fmt(ms(max(killed["optimistic+postgres_retry"]["burst_latency_s"][0]))) + " (with postgres_retry)",
        ],
    ]
