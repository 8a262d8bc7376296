"""What ``resolve_commit`` costs per write transaction: round trips and time, measured side by side.

    .venv/bin/python benchmarks/commit_resolution.py [--rounds 5] [--transactions 2000] [--json PATH]

One throwaway primary from the test kit. Round trips are counted on a connection through the kit's
``TcpProxy`` in pass-through mode, which sees every request the client sends (a simple ``Query`` or an
extended-protocol ``Sync``: one round trip each); times are measured on a direct connection. The same
short write transaction (``engine.begin()``, one INSERT, COMMIT) runs with and without ``resolve_commit``,
in alternating order (ABBA) over several rounds, on a warm pool, one driver at a time. It prints the
round trips per transaction, the time per transaction with the spread over the rounds, and the ratio of
the medians. Not a test: nothing here is asserted.
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

from db_retry import postgres_retry
from db_retry.testing import PostgresCluster
from db_retry.testing.proxy import FrontendMessage, TcpProxy


INSERT: typing.Final = sa.text("INSERT INTO bench_resolution (key) VALUES (:key)")


class RequestCounter:
    """A ``cut_after`` predicate that never matches: it only counts the client's requests."""

    def __init__(self) -> None:
        self.requests = 0

    def __call__(self, message: FrontendMessage) -> bool:
        if message.kind in {b"Q", b"S"}:
            self.requests += 1
        return False


def writer(engine: AsyncEngine, *, resolve: bool) -> typing.Callable[[], typing.Awaitable[None]]:
    @postgres_retry(resolve_commit=resolve)
    async def write() -> None:
        async with engine.begin() as connection:
            await connection.execute(INSERT, {"key": uuid.uuid4()})

    return write


async def timed_round(engine: AsyncEngine, transactions: int, *, resolve: bool) -> float:
    """Milliseconds per write transaction, after a warm-up (pool, prepared statements, cached identity)."""
    write = writer(engine, resolve=resolve)
    for _ in range(50):
        await write()
    start = time.perf_counter()
    for _ in range(transactions):
        await write()
    return (time.perf_counter() - start) / transactions * 1000


async def round_trips(engine: AsyncEngine, counter: RequestCounter, *, resolve: bool) -> float:
    write = writer(engine, resolve=resolve)
    for _ in range(10):
        await write()
    before = counter.requests
    for _ in range(100):
        await write()
    return (counter.requests - before) / 100


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    results: dict[str, dict[str, dict[str, typing.Any]]] = {}
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
                runs: dict[str, dict[str, typing.Any]] = {"off": {"ms": []}, "on": {"ms": []}}
                try:
                    for mode in ("off", "on"):
                        runs[mode]["round_trips"] = await round_trips(proxied, counter, resolve=mode == "on")
                    for index in range(args.rounds):
                        for mode in ("off", "on") if index % 2 == 0 else ("on", "off"):
                            runs[mode]["ms"].append(await timed_round(direct, args.transactions, resolve=mode == "on"))
                finally:
                    await direct.dispose()
                    await proxied.dispose()
                results[driver] = runs
    print(f"{args.rounds} rounds x {args.transactions} write transactions (engine.begin, one INSERT), ABBA order")
    print(f"{'driver':8} {'resolve_commit':15} {'round trips/txn':>16} {'ms/txn: median (min-max)':>28}")
    for driver, runs in results.items():
        for mode in ("off", "on"):
            print(f"{driver:8} {mode:15} {runs[mode]['round_trips']:16.2f} {spread(runs[mode]['ms']):>28}")
        ratio = statistics.median(runs["on"]["ms"]) / statistics.median(runs["off"]["ms"])
        print(f"{driver:8} time ratio on/off: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
