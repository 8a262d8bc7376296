"""What ``resolve_commit`` costs per write transaction: round trips, WAL bytes and time, side by side.

    .venv/bin/python benchmarks/commit_resolution.py [--rounds 6] [--transactions 2000] [--json PATH]

One throwaway primary from the test kit. Round trips are counted on a connection through the kit's
``TcpProxy`` in pass-through mode, which sees every request the client sends (a simple ``Query`` or an
extended-protocol ``Sync``: one round trip each); times are measured on a direct connection. The same
short write transaction (``engine.begin()``, one INSERT, COMMIT) runs without ``resolve_commit``, with
``resolve_commit=True`` (the transaction id) and with ``resolve_commit="marker"`` (a marker row), in a
rotating order over the rounds, on a warm pool, one driver at a time. WAL bytes per transaction are the
server's own count (``pg_current_wal_lsn()`` before and after a round, nothing else writing; full-page
images after a checkpoint included, as in production). It prints each measure with the spread over the
rounds and the ratios of the medians to "off". Not a test: nothing here is asserted.
"""

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import time
import typing
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db_retry import markers, postgres_retry
from db_retry.testing import PostgresCluster
from db_retry.testing.proxy import FrontendMessage, TcpProxy


INSERT: typing.Final = sa.text("INSERT INTO bench_resolution (key) VALUES (:key)")
LSN: typing.Final = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"


class RequestCounter:
    """A ``cut_after`` predicate that never matches: it only counts the client's requests."""

    def __init__(self) -> None:
        self.requests = 0

    def __call__(self, message: FrontendMessage) -> bool:
        if message.kind in {b"Q", b"S"}:
            self.requests += 1
        return False


MODES: typing.Final[dict[str, bool | str]] = {"off": False, "xid": True, "marker": "marker"}


def writer(engine: AsyncEngine, *, resolve: bool | str) -> typing.Callable[[], typing.Awaitable[None]]:
    @postgres_retry(resolve_commit=resolve)  # type: ignore[arg-type]
    async def write() -> None:
        async with engine.begin() as connection:
            await connection.execute(INSERT, {"key": uuid.uuid4()})

    return write


async def wal_position(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(sa.text(LSN))).scalar_one())


async def timed_round(engine: AsyncEngine, transactions: int, *, resolve: bool | str) -> tuple[float, float]:
    """Milliseconds and WAL bytes per write transaction, after a warm-up (pool, prepared statements, identity)."""
    write = writer(engine, resolve=resolve)
    for _ in range(50):
        await write()
    wal = await wal_position(engine)
    start = time.perf_counter()
    for _ in range(transactions):
        await write()
    elapsed = time.perf_counter() - start
    return elapsed / transactions * 1000, (await wal_position(engine) - wal) / transactions


async def round_trips(engine: AsyncEngine, counter: RequestCounter, *, resolve: bool | str) -> float:
    write = writer(engine, resolve=resolve)
    for _ in range(10):
        await write()
    before = counter.requests
    for _ in range(100):
        await write()
    return (counter.requests - before) / 100


def spread(values: list[float], digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, typing.Any]]] = {}
    names = list(MODES)
    with PostgresCluster(name="bench-resolution") as cluster:
        primary = cluster.primary
        await primary.execute("CREATE TABLE bench_resolution (key uuid NOT NULL)")
        async with TcpProxy(primary.host, primary.port) as proxy:
            counter = RequestCounter()
            proxy.cut_after(counter, once=False)
            for driver in ("asyncpg", "psycopg"):
                url = sa.make_url(primary.dsn(driver=driver))
                direct = create_async_engine(url, pool_size=2)
                proxied = create_async_engine(url.set(host=proxy.host, port=proxy.port), pool_size=2)
                runs: dict[str, dict[str, typing.Any]] = {mode: {"ms": [], "wal": []} for mode in MODES}
                try:
                    await markers.install(direct)
                    for mode, resolve in MODES.items():
                        runs[mode]["round_trips"] = await round_trips(proxied, counter, resolve=resolve)
                    for index in range(args.rounds):
                        for mode in names[index % 3 :] + names[: index % 3]:  # each mode first, second, third
                            ms, wal = await timed_round(direct, args.transactions, resolve=MODES[mode])
                            runs[mode]["ms"].append(ms)
                            runs[mode]["wal"].append(wal)
                finally:
                    await direct.dispose()
                    await proxied.dispose()
                results[driver] = runs
    print(f"{args.rounds} rounds x {args.transactions} write transactions (engine.begin, one INSERT), rotating order")
    print(
        f"{'driver':8} {'resolve_commit':15} {'round trips/txn':>16} {'WAL bytes/txn: median (min-max)':>34} "
        f"{'ms/txn: median (min-max)':>28} {'time ratio':>10}"
    )
    for driver, runs in results.items():
        base = statistics.median(runs["off"]["ms"])
        for mode in MODES:
            ratio = statistics.median(runs[mode]["ms"]) / base
            print(
                f"{driver:8} {mode:15} {runs[mode]['round_trips']:16.2f} {spread(runs[mode]['wal'], 0):>34} "
                f"{spread(runs[mode]['ms']):>28} {ratio:9.2f}x"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
