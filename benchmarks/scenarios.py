"""Benchmark scenarios, run in one interpreter per package: ours and db-retry 0.8.4 (both import as ``db_retry``).

``run.py`` starts ``python -I scenarios.py NAME PARAMS_JSON`` from outside the repository, so ``db_retry`` is
whatever that interpreter has installed. Only the API both packages share is used: ``postgres_retry``,
``build_connection_factory``, ``build_db_dsn`` and ``Transaction``, each with its default settings.

The process talks to ``run.py`` through lines on stdout that start with ``@`` (``@HELLO``, ``@READY``,
``@RESULT``, each followed by JSON) and reads commands (``stop``, ``exit``) on stdin. Everything else
(log records, warnings) goes to stderr, which ``run.py`` keeps in a log file.
"""

import asyncio
import collections
import gc
import importlib.metadata
import json
import random
import struct
import sys
import time
import typing

import asyncpg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

import db_retry
from db_retry import Transaction, build_connection_factory, build_db_dsn, postgres_retry


Params: typing.TypeAlias = dict[str, typing.Any]
Result: typing.TypeAlias = dict[str, typing.Any]

SELECT_COUNTER: typing.Final = sa.text("SELECT n FROM bench_counter WHERE id = 1")
UPDATE_COUNTER: typing.Final = sa.text("UPDATE bench_counter SET n = :n WHERE id = 1")
INSERT_EVENT: typing.Final = sa.text("INSERT INTO bench_events (call_id) VALUES (:call_id)")
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


# -- decorator overhead ----------------------------------------------------------------
async def overhead(params: Params) -> Result:
    """Nanoseconds per call of a bare ``await noop()`` and of the same coroutine decorated."""
    iterations: int = params["iterations"]

    async def noop() -> None:
        return None

    decorated = postgres_retry(noop)

    async def per_call(function: typing.Callable[[], typing.Awaitable[None]]) -> float:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            await function()
        return (time.perf_counter_ns() - start) / iterations

    await per_call(noop)
    await per_call(decorated)
    bare: list[float] = []
    wrapped: list[float] = []
    gc.disable()
    try:
        for round_number in range(params["rounds"]):
            if round_number % 2 == 0:
                bare.append(await per_call(noop))
                wrapped.append(await per_call(decorated))
            else:
                wrapped.append(await per_call(decorated))
                bare.append(await per_call(noop))
    finally:
        gc.enable()
    return {"bare_ns": bare, "decorated_ns": wrapped}


# -- multi-host connect latency ---------------------------------------------------------------
async def connect(params: Params) -> Result:
    """Connect latency through ``build_connection_factory`` with some hosts hanging: fresh and reused factory."""
    hosts: list[str] = params["hosts"]
    timeout: float = params["timeout"]
    count: int = params["connects"]
    url = sa.make_url("postgresql+asyncpg://postgres@/postgres?" + "&".join(f"host={host}" for host in hosts))
    failures: collections.Counter[str] = collections.Counter()

    async def timed(factory: typing.Callable[[], typing.Awaitable[typing.Any]]) -> float | None:
        start = time.perf_counter()
        try:
            connection = await factory()
        except Exception as exc:  # noqa: BLE001 - a failed connect is a result, counted by class
            failures[error_name(exc)] += 1
            return None
        elapsed = time.perf_counter() - start
        await connection.close()
        return elapsed

    host, port = params["baseline"].rsplit(":", 1)

    async def plain() -> asyncpg.Connection:
        return await asyncpg.connect(host=host, port=int(port), user="postgres", database="postgres", timeout=timeout)

    baseline = [await timed(plain) for _ in range(count)]
    fresh = [await timed(build_connection_factory(url, timeout)) for _ in range(count)]
    reused_factory = build_connection_factory(url, timeout)
    await timed(reused_factory)  # the first connect of a reused factory is the fresh case; not counted
    reused = [await timed(reused_factory) for _ in range(count)]
    await asyncio.sleep(0.1)  # let cancelled attempts finish unwinding before looking for leftovers
    leftover_tasks = [repr(task) for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    return {
        "baseline_s": [value for value in baseline if value is not None],
        "fresh_s": [value for value in fresh if value is not None],
        "reused_s": [value for value in reused if value is not None],
        "failures": dict(failures),
        "leftover_tasks": leftover_tasks,
    }


# -- contention: one hot row, transfers spread over many rows, rare unrelated conflicts ----------------
SELECT_BALANCES: typing.Final = sa.text("SELECT id, balance FROM bench_accounts WHERE id IN (:a, :b)")
MOVE: typing.Final = sa.text("UPDATE bench_accounts SET balance = balance + :delta, moves = moves + 1 WHERE id = :id")
# The rare-conflict workload's conflict: asyncpg's own error class for 40001, as its driver raises it.
CONFLICT_MESSAGE: typing.Final = "could not serialize access due to read/write dependencies among transactions"


Unit: typing.TypeAlias = typing.Callable[[list[bool]], typing.Awaitable[None]]


def workload(name: str, params: Params, session_factory: async_sessionmaker[typing.Any]) -> Unit:
    """The undecorated work of one call of a contention scenario; its argument is the call's own state."""
    rng = random.Random(params["seed"])
    accounts: int = params.get("accounts", 0)
    io_s: float = params.get("io_s", 0.0)
    conflict_share: float = params.get("conflict_share", 0.0)

    async def hot(_: list[bool]) -> None:
        async with Transaction(session=session_factory(), isolation_level="SERIALIZABLE") as transaction:
            value = (await transaction.session.execute(SELECT_COUNTER)).scalar_one()
            await transaction.session.execute(UPDATE_COUNTER, {"n": value + 1})
            await transaction.commit()

    async def spread(_: list[bool]) -> None:
        source, target = rng.sample(range(1, accounts + 1), 2)
        async with Transaction(session=session_factory(), isolation_level="SERIALIZABLE") as transaction:
            balances = dict((await transaction.session.execute(SELECT_BALANCES, {"a": source, "b": target})).all())
            amount = 1 if balances[source] > 0 else 0
            await transaction.session.execute(MOVE, {"delta": -amount, "id": source})
            await transaction.session.execute(MOVE, {"delta": amount, "id": target})
            await transaction.commit()

    async def rare(attempted: list[bool]) -> None:
        conflicts = not attempted and rng.random() < conflict_share
        attempted.append(True)
        await asyncio.sleep(io_s)  # the call's I/O: a query, another service; redone on a retry
        if conflicts:  # this call lost a conflict on rows no other call wants, once
            raise asyncpg.SerializationError(CONFLICT_MESSAGE)

    units: dict[str, Unit] = {"hot": hot, "spread": spread, "rare": rare}
    return units[name]


async def contention(params: Params) -> Result:
    """Workers looping over one decorated call for ``duration`` seconds; every call's start, end and outcome.

    ``workload``: ``hot`` (read then write one row, SERIALIZABLE), ``spread`` (a transfer between two
    random accounts, SERIALIZABLE), ``rare`` (I/O, then a short read; a share of the calls meet one
    conflict). After ``@READY`` it waits for ``go START_AT`` on stdin (a ``time.monotonic()`` value) and
    starts then, so the processes of one round start together.
    """
    workers: int = params["workers"]
    engine = make_engine(params["dsn"], pool_size=workers)
    session_factory = async_sessionmaker(engine, expire_on_commit=False)
    unit = workload(params["workload"], params, session_factory)
    attempts = 0

    @postgres_retry
    async def run_once(state: list[bool]) -> None:
        nonlocal attempts
        attempts += 1
        await unit(state)

    await fill_pool(engine, workers)
    calls: list[tuple[float, float, bool]] = []
    errors: collections.Counter[str] = collections.Counter()
    emit("READY")
    command = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go START_AT"
    await asyncio.sleep(max(0.0, float(command.split()[1]) - time.monotonic()))  # all processes of a round at once
    start = time.monotonic()
    deadline = start + params["duration"]

    async def worker() -> None:
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                await run_once([])
            except Exception as exc:  # noqa: BLE001 - a call that failed after its retries is a result
                errors[error_name(exc)] += 1
                calls.append((began, time.monotonic(), False))
            else:
                calls.append((began, time.monotonic(), True))

    await asyncio.gather(*(worker() for _ in range(workers)))
    finished = time.monotonic()
    await engine.dispose()
    return {
        "start": start,
        "deadline": deadline,
        "finished": finished,
        "calls": calls,
        "attempts": attempts,
        "errors": dict(errors),
    }


# -- looping writers across a restart or a failover ------------------------------------------------
async def callers(params: Params) -> Result:
    """Callers writing one row per call in a loop until told to stop; ``run.py`` injects the fault meanwhile."""
    count: int = params["callers"]
    pause: float = params["pause"]
    if params["multihost"]:
        # build_db_dsn sets target_session_attrs=read-write, as a service writing to the primary does.
        url = build_db_dsn(params["dsn"], "postgres", drivername="postgresql+asyncpg")
        engine = make_engine(
            params["dsn"],
            pool_size=count,
            async_creator=build_connection_factory(url, params["connect_timeout"]),
        )
    elif params.get("pgbouncer"):
        # Behind a transaction pooler no prepared statement may outlive its transaction (README recipe).
        url = sa.make_url(params["dsn"]).update_query_dict({"prepared_statement_cache_size": "0"})
        engine = create_async_engine(url, pool_size=count, max_overflow=0, connect_args={"statement_cache_size": 0})
    else:
        engine = make_engine(params["dsn"], pool_size=count)
    session_factory = async_sessionmaker(engine, expire_on_commit=False)

    @postgres_retry
    async def write(call_id: str) -> None:
        async with Transaction(session=session_factory()) as transaction:
            await transaction.session.execute(INSERT_EVENT, {"call_id": call_id})
            await transaction.commit()

    await fill_pool(engine, count)
    stop = asyncio.Event()
    calls: list[tuple[int, float, float, str | None]] = []  # caller, start, end, error (None: success)
    succeeded: list[str] = []

    async def caller(number: int) -> None:
        sequence = 0
        while not stop.is_set():
            sequence += 1
            call_id = f"{number}-{sequence}"
            began = time.monotonic()
            try:
                await write(call_id)
            except Exception as exc:  # noqa: BLE001 - a failed call is a result
                calls.append((number, began, time.monotonic(), error_name(exc)))
            else:
                calls.append((number, began, time.monotonic(), None))
                succeeded.append(call_id)
            await asyncio.sleep(pause)

    tasks = [asyncio.create_task(caller(number)) for number in range(count)]
    emit("READY")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # run.py says "stop"
    stop.set()
    await asyncio.gather(*tasks)
    await engine.dispose()
    return {"calls": calls, "succeeded": succeeded}


# -- seed 003: pessimistic (pre-ping) vs optimistic (retry on invalidation) ----------------------------
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


async def disconnects(params: Params) -> Result:
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


SCENARIOS: typing.Final[dict[str, typing.Callable[[Params], typing.Coroutine[typing.Any, typing.Any, Result]]]] = {
    "overhead": overhead,
    "connect": connect,
    "contention": contention,
    "callers": callers,
    "disconnects": disconnects,
}


def main() -> None:
    name, params = sys.argv[1], json.loads(sys.argv[2])
    versions = {
        package: importlib.metadata.version(package)
        for package in ("db-retry", "sqlalchemy", "asyncpg", "greenlet", "tenacity")
        if package != "tenacity" or _installed(package)
    }
    emit("HELLO", {"file": db_retry.__file__, "python": sys.version.split()[0], "versions": versions})
    result = asyncio.run(SCENARIOS[name](params))
    emit("RESULT", result)
    sys.stdin.readline()  # run.py may look at the server (leftover sessions) before this process exits


def _installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
