"""Looping writers across a restart and a failover: 4 callers, one ``INSERT`` per call, a 10 ms pause between calls.

Child side: ``child`` runs the callers until told to stop (on one DSN, on a multi-host DSN through
``build_db_dsn`` and ``build_connection_factory``, or behind PgBouncer) and returns every call and every
successful write. Driver side: ``bench_restart`` stops the primary (``fast``, ``immediate``) and starts it again,
``bench_failover`` stops it and promotes the standby, both while the callers run; ``check_writes`` fails the run if
a write reported successful is missing. ``topologies.py`` uses the same child and helpers. Goals (issue 5): 0
failed calls across a restart, the first success ≤ 100 ms after the server is back.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import sys
import time
import typing

import sqlalchemy as sa
from child import emit, error_name, fill_pool, make_engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from db_retry import Transaction, build_connection_factory, build_db_dsn, postgres_retry


if typing.TYPE_CHECKING:
    from child import Params, Result
    from harness import Context, GoalSink, Package, Row

    from db_retry.testing import PostgresCluster, PostgresNode


CALLERS: typing.Final = 4
CALL_PAUSE: typing.Final = 0.01  # each looping caller pauses this long between calls


# -- child side (both packages) --------------------------------------------------------------------------
INSERT_EVENT: typing.Final = sa.text("INSERT INTO bench_events (call_id) VALUES (:call_id)")


async def child(params: Params) -> Result:
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


# -- driver side ------------------------------------------------------------------------------------------
async def failover(cluster: PostgresCluster) -> dict[str, float]:
    """Stop the primary (fast), promote the standby; the times the stop began, ended and the standby took writes."""
    from harness import POLL  # noqa: PLC0415 - driver only

    primary, standby = cluster.primary, cluster.standbys[0]
    fault = time.monotonic()
    await asyncio.to_thread(primary.stop, "fast")
    stopped = time.monotonic()
    watcher = await standby.connect()
    try:
        promoting = asyncio.ensure_future(asyncio.to_thread(standby.promote))
        while True:
            began = time.monotonic()
            if not await watcher.fetchval("SELECT pg_is_in_recovery()"):
                writable = began
                break
            await asyncio.sleep(POLL)
        await promoting
    finally:
        await watcher.close()
    cluster.nodes[:] = [standby, primary]
    return {"fault": fault, "stopped": stopped, "back": writable}


async def check_writes(node: PostgresNode, succeeded: typing.Sequence[str], what: str) -> dict[str, int]:
    """Compare the rows written with the calls that reported success; a missing successful write fails the run."""
    from harness import BenchmarkError  # noqa: PLC0415 - driver only

    connection = await node.connect()
    try:
        written = {
            row["call_id"]: row["count"]
            for row in await connection.fetch("SELECT call_id, count(*) FROM bench_events GROUP BY call_id")
        }
    finally:
        await connection.close()
    lost = [call_id for call_id in succeeded if call_id not in written]
    if lost:
        msg = f"{what}: {len(lost)} write(s) reported successful are missing, e.g. {lost[:5]}"
        raise BenchmarkError(msg)
    return {
        "rows": sum(written.values()),
        "applied_twice": sum(count - 1 for count in written.values()),
        "applied_but_reported_failed": len(set(written) - set(succeeded)),
    }


def caller_metrics(result: dict[str, typing.Any], marks: dict[str, float]) -> dict[str, typing.Any]:
    from harness import ms  # noqa: PLC0415 - driver only

    calls = result["calls"]
    failed = [error for _, _, _, error in calls if error is not None]
    first_success: dict[int, float] = {}
    for caller, _, end, error in calls:
        if error is None and end > marks["stopped"]:
            first_success[caller] = min(first_success.get(caller, math.inf), end)
    return {
        "calls": len(calls),
        "failed": len(failed),
        "errors": dict(collections.Counter(failed)),
        "server_down_s": marks["back"] - marks["fault"],
        "first_success_after_back_ms": ms(min(first_success.values()) - marks["back"]) if first_success else None,
        "first_success_after_stop_ms": ms(min(first_success.values()) - marks["stopped"]) if first_success else None,
        "all_callers_back_after_back_ms": ms(max(first_success.values()) - marks["back"])
        if len(first_success) == CALLERS
        else None,
        "marks": marks,
    }


async def run_callers(
    context: Context,
    package: Package,
    params: dict[str, typing.Any],
    fault: typing.Callable[[], typing.Awaitable[dict[str, float]]],
) -> tuple[dict[str, typing.Any], dict[str, float]]:
    """The callers in ``package``'s interpreter; ``fault`` strikes while they run; their calls and its times."""
    from harness import Scenario  # noqa: PLC0415 - driver only

    settings = context.settings
    async with Scenario(context, package, "callers", params) as scenario:
        await scenario.expect("READY", timeout=60)
        await asyncio.sleep(settings.before_fault)
        marks = await fault()
        await asyncio.sleep(settings.after_fault)
        scenario.send("stop")
        result = await scenario.expect("RESULT", timeout=120)
    return result, marks


def caller_rows(label: str, metrics: dict[str, dict[str, typing.Any]], back: str) -> list[Row]:
    from harness import Row  # noqa: PLC0415 - driver only

    def pair(key: str) -> tuple[typing.Any, typing.Any]:
        return metrics["reference"][key], metrics["ours"][key]

    return [
        Row(
            label,
            "failed calls / total",
            *(f"{m['failed']} / {m['calls']}" for m in (metrics["reference"], metrics["ours"])),
        ),
        Row(label, f"first successful call after {back}, ms", *pair("first_success_after_back_ms")),
        Row(label, f"every caller succeeded again after {back}, ms", *pair("all_callers_back_after_back_ms")),
        Row(label, f"server unavailable (stop began → {back}), s", *pair("server_down_s")),
        Row(label, "writes applied twice", *pair("applied_twice")),
        Row(label, "writes applied but reported failed", *pair("applied_but_reported_failed")),
    ]


async def bench_restart(context: Context, cluster: PostgresCluster) -> list[Row]:
    """4 looping writers (pool_pre_ping=False) across a fast and an immediate restart of the primary."""
    from harness import restart  # noqa: PLC0415 - driver only

    primary = cluster.primary
    rows: list[Row] = []
    data: dict[str, typing.Any] = {}
    modes: tuple[typing.Literal["fast", "immediate"], ...] = ("fast", "immediate")
    for index, mode in enumerate(modes):
        metrics: dict[str, dict[str, typing.Any]] = {}
        for package in context.packages(index):
            await primary.execute("TRUNCATE bench_events")
            params = {"dsn": primary.dsn(driver="asyncpg"), "callers": CALLERS, "pause": CALL_PAUSE, "multihost": False}
            result, marks = await run_callers(context, package, params, functools.partial(restart, primary, mode))
            metrics[package.name] = caller_metrics(result, marks) | await check_writes(
                primary, result["succeeded"], f"{mode} restart ({package.name})"
            )
        data[mode] = metrics
        rows += caller_rows(f"{mode} restart of the primary, {CALLERS} callers", metrics, "the server accepts again")
    context.data["restart"] = data
    return rows


async def bench_failover(context: Context) -> list[Row]:
    """4 looping writers on a multi-host DSN (read-write) while the primary stops and the standby is promoted."""
    from harness import CONNECT_TIMEOUT, create_schema, running_cluster  # noqa: PLC0415 - driver only

    metrics: dict[str, dict[str, typing.Any]] = {}
    for package in context.packages():
        async with running_cluster(context, standbys=1) as cluster:
            await create_schema(cluster.primary)
            await cluster.wait_for_replay()
            params = {
                "dsn": cluster.multihost_dsn(),
                "callers": CALLERS,
                "pause": CALL_PAUSE,
                "multihost": True,
                "connect_timeout": CONNECT_TIMEOUT,
            }
            result, marks = await run_callers(context, package, params, functools.partial(failover, cluster))
            metrics[package.name] = caller_metrics(result, marks) | await check_writes(
                cluster.primary, result["succeeded"], f"failover ({package.name})"
            )
    context.data["failover"] = metrics
    return caller_rows(
        f"failover (stop primary, promote standby), {CALLERS} callers", metrics, "the new primary takes writes"
    )


def goals(data: dict[str, typing.Any], goal: GoalSink) -> None:
    """Issue 5: no failed call across a restart, and the callers back soon after the server."""
    from harness import fmt  # noqa: PLC0415 - driver only

    for mode, metrics in data.get("restart", {}).items():
        ours = metrics["ours"]
        first = ours["first_success_after_back_ms"]
        goal(
            f"{mode} restart, {CALLERS} callers: 0 failed calls",
            ours["failed"] == 0,
            f"{ours['failed']} of {ours['calls']}",
        )
        goal(
            f"{mode} restart: first success ≤ 100 ms after the server is back",
            first is not None and first <= 100,
            f"{first:.0f} ms (reference {fmt(metrics['reference']['first_success_after_back_ms'])} ms)"
            if first is not None
            else "no success after the restart",
        )
