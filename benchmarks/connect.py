"""Connect latency through ``build_connection_factory`` over 4 hosts of which k hang (k = 0, 1, 3).

Child side: ``child`` times plain asyncpg connects to one healthy host (the yardstick), then connects with a
fresh factory each and with one reused factory. Driver side: ``bench`` starts a primary with 3 standbys and
loopback listeners that accept and never answer (``HangingHosts``), runs both packages per k in alternating
order, and fails the run if a task or a client session is left behind. Goals (issue 5): p95 ≤ 300 ms with 3
of 4 hosts hanging; a reused factory costs about one healthy connect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import selectors
import socket
import statistics
import threading
import time
import typing

import asyncpg
import sqlalchemy as sa
from child import error_name

from db_retry import build_connection_factory


if typing.TYPE_CHECKING:
    from child import Params, Result
    from harness import Context, GoalSink, Row


HOSTS: typing.Final = 4
HANGING: typing.Final = (0, 1, 3)


# -- child side (both packages) --------------------------------------------------------------------------
async def child(params: Params) -> Result:
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


# -- driver side ------------------------------------------------------------------------------------------
class HangingHosts:
    """Loopback listeners that accept TCP connections and never answer: a hung server, as a client sees it."""

    def __init__(self, count: int) -> None:
        self.listeners = [socket.create_server(("127.0.0.1", 0), backlog=128) for _ in range(count)]
        self.addresses = [f"127.0.0.1:{listener.getsockname()[1]}" for listener in self.listeners]
        self.selector = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self.accepted = 0
        for listener in self.listeners:
            listener.setblocking(False)  # noqa: FBT003 - the socket API
            self.selector.register(listener, selectors.EVENT_READ, data="listener")
        self.thread = threading.Thread(target=self._serve, name="hanging-hosts", daemon=True)

    def __enter__(self) -> typing.Self:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        for key in list(self.selector.get_map().values()):
            typing.cast("socket.socket", key.fileobj).close()
        self.selector.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                sock = typing.cast("socket.socket", key.fileobj)
                if key.data == "listener":
                    with contextlib.suppress(BlockingIOError):
                        connection, _ = sock.accept()
                        connection.setblocking(False)  # noqa: FBT003 - the socket API
                        self.selector.register(connection, selectors.EVENT_READ, data="client")
                        self.accepted += 1
                    continue
                try:
                    data = sock.recv(65536)  # the startup packet: read and never answered
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(sock)
                    sock.close()


async def bench(context: Context) -> list[Row]:
    """Connect latency over 4 hosts with k hanging, fresh and reused factory; then leftover tasks and sessions."""
    from harness import (  # noqa: PLC0415 - driver only: the child side runs under 0.8.4 too
        CONNECT_TIMEOUT,
        BenchmarkError,
        Scenario,
        assert_no_sessions,
        running_cluster,
    )

    settings = context.settings
    rows: list[Row] = []
    data: dict[str, typing.Any] = {}
    async with running_cluster(context, standbys=HOSTS - 1) as cluster:
        with HangingHosts(max(HANGING)) as hanging:
            for index, k in enumerate(HANGING):
                hosts = [node.address for node in cluster.nodes[: HOSTS - k]] + hanging.addresses[:k]
                params = {
                    "hosts": hosts,
                    "timeout": CONNECT_TIMEOUT,
                    "connects": settings.connects,
                    "baseline": cluster.primary.address,
                }
                results: dict[str, typing.Any] = {}
                for package in context.packages(index):
                    async with Scenario(context, package, "connect", params) as scenario:
                        result = await scenario.expect("RESULT", timeout=60 + 3 * settings.connects * (HOSTS + 1))
                        if result["leftover_tasks"]:
                            msg = f"connect k={k} ({package.name}): tasks left running: {result['leftover_tasks']}"
                            raise BenchmarkError(msg)
                        await assert_no_sessions(cluster.nodes, f"connect k={k} ({package.name})")
                    results[package.name] = result
                data[f"k={k}"] = results
                rows += connect_rows(k, results)
                data[f"k={k}"]["baseline_median_s"] = median_baseline(results)
            data["hanging_accepted"] = hanging.accepted
    context.data["connect"] = data
    return rows


def median_baseline(results: dict[str, typing.Any]) -> float:
    """Median of the plain asyncpg connects to one healthy host, both processes pooled."""
    samples: list[float] = results["reference"]["baseline_s"] + results["ours"]["baseline_s"]
    return statistics.median(samples)


def connect_rows(k: int, results: dict[str, typing.Any]) -> list[Row]:
    from harness import Row, ms, percentile  # noqa: PLC0415 - driver only

    label = f"connect n={HOSTS} k={k} hanging"
    rows: list[Row] = []
    for mode in ("fresh", "reused"):
        samples = [results[name][f"{mode}_s"] for name in ("reference", "ours")]
        rows.append(Row(label, f"{mode} factory: median ms", *(ms(statistics.median(values)) for values in samples)))
        rows.append(Row(label, f"{mode} factory: p95 ms", *(ms(percentile(values, 95)) for values in samples)))
    rows += [
        Row(label, f"failed connects ({name})", None, json.dumps(results[name]["failures"]))
        for name in ("reference", "ours")
        if results[name]["failures"]
    ]
    baseline = ms(median_baseline(results))
    rows.append(Row(label, "one plain asyncpg connect to a healthy host: median ms", baseline, baseline))
    return rows


def goals(data: dict[str, typing.Any], goal: GoalSink) -> None:
    """Issue 5: a bounded connect with hanging hosts; a reused factory about as fast as one healthy connect."""
    from harness import ms, percentile  # noqa: PLC0415 - driver only

    if "connect" not in data:
        return
    k3 = data["connect"][f"k={max(HANGING)}"]
    fresh_p95 = ms(percentile(k3["ours"]["fresh_s"], 95))
    reused_p95 = ms(percentile(k3["ours"]["reused_s"], 95))
    goal(
        f"connect, {HOSTS} hosts with {max(HANGING)} hanging, timeout 1 s: p95 ≤ 300 ms",
        fresh_p95 <= 300 and reused_p95 <= 300,
        f"fresh factory p95 {fresh_p95:.0f} ms, reused {reused_p95:.0f} ms "
        f"(reference {ms(percentile(k3['reference']['fresh_s'], 95)):.0f} ms)",
    )
    ratios = []
    for k in HANGING:
        entry = data["connect"][f"k={k}"]
        ratios.append((k, statistics.median(entry["ours"]["reused_s"]) / entry["baseline_median_s"]))
    worst = max(ratio for _, ratio in ratios)
    goal(
        "reused factory, remembered host up: about one healthy connect (median ≤ 1.5 x a plain asyncpg connect)",
        worst <= 1.5,
        ", ".join(f"k={k}: {ratio:.2f}x" for k, ratio in ratios),
    )
