"""Contention: callers looping over one ``@postgres_retry`` call, alone, in one process, in several processes.

Workloads (``WORKLOADS``; ``--workloads KEY ...`` picks some): the hot row (read one row and write it back + 1,
SERIALIZABLE) with 1 worker, 32 workers, 4 processes x 8 workers; spread transfers between two random accounts out
of 1000 with 32 workers and 4 processes x 8 workers; rare unrelated conflicts (10 ms of I/O per call, 2% of the
calls lose one conflict) with 50 workers.

Child side: ``child`` runs one process's workers for ``duration`` seconds from a common start and returns every
call's start, end and outcome. Driver side: ``bench`` runs each workload ``rounds`` times per package in
alternating order and checks the hot counter and the conserved balances after every round; ``goals`` judges issue
10's goals on the median of the per-round ratios.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import random
import statistics
import sys
import time
import typing

import asyncpg
import sqlalchemy as sa
from child import SELECT_COUNTER, emit, error_name, fill_pool, make_engine
from sqlalchemy.ext.asyncio import async_sessionmaker

from db_retry import Transaction, postgres_retry


if typing.TYPE_CHECKING:
    from child import Params, Result
    from harness import Context, GoalSink, Package, Row

    from db_retry.testing import PostgresCluster, PostgresNode


# -- child side (both packages) --------------------------------------------------------------------------
UPDATE_COUNTER: typing.Final = sa.text("UPDATE bench_counter SET n = :n WHERE id = 1")
SELECT_BALANCES: typing.Final = sa.text("SELECT id, balance FROM bench_accounts WHERE id IN (:a, :b)")
MOVE: typing.Final = sa.text("UPDATE bench_accounts SET balance = balance + :delta, moves = moves + 1 WHERE id = :id")
# The rare-conflict workload's conflict: asyncpg's own error class for 40001, as its driver raises it.
CONFLICT_MESSAGE: typing.Final = "could not serialize access due to read/write dependencies among transactions"


Unit: typing.TypeAlias = typing.Callable[[list[bool]], typing.Awaitable[None]]
Call: typing.TypeAlias = tuple[float, float, bool]  # start, end, succeeded


def workload(name: str, seed: int, params: Params, session_factory: async_sessionmaker[typing.Any]) -> Unit:
    """The undecorated work of one call of a contention scenario; its argument is the call's own state."""
    rng = random.Random(seed)
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


async def loop_calls(
    call: typing.Callable[[list[bool]], typing.Awaitable[None]], workers: int, deadline: float
) -> tuple[list[Call], collections.Counter[str]]:
    """``workers`` callers, each calling ``call`` in a loop until ``deadline``: every call's start, end, outcome."""
    calls: list[Call] = []
    errors: collections.Counter[str] = collections.Counter()

    async def worker() -> None:
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                await call([])
            except Exception as exc:  # noqa: BLE001 - a call that failed after its retries is a result
                errors[error_name(exc)] += 1
                calls.append((began, time.monotonic(), False))
            else:
                calls.append((began, time.monotonic(), True))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return calls, errors


async def wait_for_go() -> float:
    """Block until ``run.py`` sends ``go START_AT`` (a ``time.monotonic()`` value); that value."""
    command = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return float(command.split()[1])


async def child(params: Params) -> Result:
    """Workers looping over one decorated call for ``duration`` seconds; every call's start, end and outcome.

    ``workload``: ``hot`` (read then write one row, SERIALIZABLE), ``spread`` (a transfer between two
    random accounts, SERIALIZABLE), ``rare`` (I/O, then a short read; a share of the calls meet one
    conflict). After ``@READY`` it waits for ``go START_AT`` on stdin and starts then, so the processes of one
    round start together.
    """
    workers: int = params["workers"]
    engine = make_engine(params["dsn"], pool_size=workers)
    session_factory = async_sessionmaker(engine, expire_on_commit=False)
    unit = workload(params["workload"], params["seed"], params, session_factory)
    attempts = 0

    @postgres_retry
    async def run_once(state: list[bool]) -> None:
        nonlocal attempts
        attempts += 1
        await unit(state)

    await fill_pool(engine, workers)
    emit("READY")
    start_at = await wait_for_go()
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))  # all processes of a round at once
    start = time.monotonic()
    deadline = start + params["duration"]
    calls, errors = await loop_calls(run_once, workers, deadline)
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


# -- driver side ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One contention scenario: ``processes`` scenario processes of one package, ``workers`` callers each."""

    key: str  # for --workloads and the JSON
    label: str
    workload: str  # scenarios.py's name: hot, spread, rare
    processes: int
    workers: int
    zero_failures: bool  # issue 10: no failed call with the default settings
    goals: bool = True  # issue 10's goals apply (not to the one-worker yardstick)


WORKLOADS: typing.Final = (
    Workload(
        key="hot1",
        label="hot row, 1 worker",
        workload="hot",
        processes=1,
        workers=1,
        zero_failures=False,
        goals=False,
    ),
    Workload(key="hot32", label="hot row, 32 workers", workload="hot", processes=1, workers=32, zero_failures=False),
    Workload(
        key="hot4x8",
        label="hot row, 4 processes x 8 workers",
        workload="hot",
        processes=4,
        workers=8,
        zero_failures=False,
    ),
    Workload(
        key="spread32",
        label="spread transfers, 32 workers",
        workload="spread",
        processes=1,
        workers=32,
        zero_failures=True,
    ),
    Workload(
        key="spread4x8",
        label="spread transfers, 4 processes x 8 workers",
        workload="spread",
        processes=4,
        workers=8,
        zero_failures=True,
    ),
    Workload(
        key="rare50",
        label="rare unrelated conflicts, 50 workers",
        workload="rare",
        processes=1,
        workers=50,
        zero_failures=True,
    ),
)
RARE_IO_S: typing.Final = 0.01
RARE_CONFLICT_SHARE: typing.Final = 0.02


async def contention_run(
    context: Context, package: Package, primary: PostgresNode, workload: Workload, round_number: int
) -> dict[str, typing.Any]:
    """One round of a workload for one package: its processes start together; fails loudly on a wrong total."""
    from harness import (  # noqa: PLC0415 - driver only: the child side runs under 0.8.4 too
        ACCOUNTS,
        BALANCE,
        BenchmarkError,
        Scenario,
        ms,
        percentile,
    )

    duration = context.settings.duration
    await primary.execute("UPDATE bench_counter SET n = 0 WHERE id = 1")
    await primary.execute("UPDATE bench_accounts SET moves = 0")
    base = {
        "dsn": primary.dsn(driver="asyncpg"),
        "workers": workload.workers,
        "duration": duration,
        "workload": workload.workload,
        "accounts": ACCOUNTS,
        "io_s": RARE_IO_S,
        "conflict_share": RARE_CONFLICT_SHARE,
    }
    async with contextlib.AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(
                Scenario(context, package, "contention", base | {"seed": 1000 * round_number + number})
            )
            for number in range(workload.processes)
        ]
        for process in processes:
            await process.expect("READY", timeout=60)
        start_at = time.monotonic() + 0.2
        for process in processes:
            process.send(f"go {start_at}")
        results = [await process.expect("RESULT", timeout=duration + 120) for process in processes]
    calls = [call for result in results for call in result["calls"]]
    succeeded = sum(1 for *_, ok in calls if ok)
    what = f"{workload.label} ({package.name})"
    if workload.workload == "hot":
        counter = await primary.fetchval("SELECT n FROM bench_counter WHERE id = 1")
        if counter != succeeded:
            msg = f"{what}: counter {counter}, successful calls {succeeded}"
            raise BenchmarkError(msg)
    if workload.workload == "spread":
        total, moves = await primary.fetchval("SELECT ARRAY[sum(balance), sum(moves)] FROM bench_accounts")
        if total != ACCOUNTS * BALANCE or moves != 2 * succeeded:
            expected = ACCOUNTS * BALANCE
            msg = f"{what}: balances sum to {total} (expected {expected}), {moves} moves for {succeeded} transfers"
            raise BenchmarkError(msg)
    window = statistics.median(result["deadline"] - result["start"] for result in results)
    latencies = [end - start for start, end, _ in calls]
    return {
        "calls": len(calls),
        "calls_per_s": sum(
            1 for result in results for _, end, ok in result["calls"] if ok and end <= result["deadline"]
        )
        / window,
        "failed": len(calls) - succeeded,
        "attempts_per_call": sum(result["attempts"] for result in results) / max(1, len(calls)),
        "errors": dict(sum((collections.Counter(result["errors"]) for result in results), collections.Counter())),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies, default=math.nan)),
    }


CONTENTION_METRICS: typing.Final = (
    ("calls_per_s", "successful calls/s"),
    ("p50_ms", "call latency p50 ms"),
    ("p99_ms", "call latency p99 ms"),
    ("failed", "calls failed after retries, per round"),
    ("attempts_per_call", "attempts per call"),
)


async def bench(context: Context, cluster: PostgresCluster) -> list[Row]:
    """Each workload ``rounds`` times per package, alternating which goes first; ratios per round."""
    from harness import Row  # noqa: PLC0415 - driver only

    rounds = context.settings.rounds
    rows: list[Row] = []
    data: dict[str, typing.Any] = {}
    for index, workload in enumerate(context.workloads):
        print(f"  {workload.label} ...", flush=True)
        runs: dict[str, list[dict[str, typing.Any]]] = {"reference": [], "ours": []}
        for round_number in range(rounds):
            for package in context.packages(index + round_number):
                runs[package.name].append(
                    await contention_run(context, package, cluster.primary, workload, round_number)
                )
        data[workload.key] = {
            "label": workload.label,
            "runs": runs,
            "zero_failures": workload.zero_failures,
            "goals": workload.goals,
        }
        label = f"{workload.label} ({rounds} rounds of {context.settings.duration:g} s)"
        for key, metric in CONTENTION_METRICS:
            reference = [run[key] for run in runs["reference"]]
            ours = [run[key] for run in runs["ours"]]
            ratios = tuple(
                mine / theirs for mine, theirs in zip(ours, reference, strict=True) if theirs and not math.isnan(theirs)
            )
            rows.append(
                Row(
                    label,
                    metric + " (median of rounds)",
                    statistics.median(reference),
                    statistics.median(ours),
                    ratios if len(ratios) == len(ours) else (),
                )
            )
    context.data["contention"] = data
    return rows


# -- goals ------------------------------------------------------------------------------------------------
def goals(data: dict[str, typing.Any], goal: GoalSink) -> None:
    """Issue 10's goals for each workload that has some."""
    for entry in data.get("contention", {}).values():
        if entry["goals"]:
            contention_goals(entry, goal)


def contention_goals(entry: dict[str, typing.Any], goal: GoalSink) -> None:
    """Issue 10's goals for one workload, each judged on the median of the per-round ratios."""
    runs = entry["runs"]

    def ratios(key: str) -> list[float]:
        return [ours[key] / ref[key] for ours, ref in zip(runs["ours"], runs["reference"], strict=True) if ref[key]]

    def spread(key: str) -> str:
        found = ratios(key)
        if not found:
            return "—"
        return f"{statistics.median(found):.2f} (rounds {min(found):.2f} to {max(found):.2f})"

    def median_ratio(key: str) -> float:
        found = ratios(key)
        return statistics.median(found) if found else math.nan

    label = entry["label"]
    goal(f"{label}: calls/s ≥ 1.0x", median_ratio("calls_per_s") >= 1.0, spread("calls_per_s"))
    goal(f"{label}: p50 ≤ 1.1x", median_ratio("p50_ms") <= 1.1, spread("p50_ms"))
    goal(f"{label}: p99 ≤ 0.2x", median_ratio("p99_ms") <= 0.2, spread("p99_ms"))
    ours_failed = [run["failed"] for run in runs["ours"]]
    ref_failed = [run["failed"] for run in runs["reference"]]
    met = sum(ours_failed) <= sum(ref_failed) and (not entry["zero_failures"] or sum(ours_failed) == 0)
    goal(
        f"{label}: failed calls ≤ reference's" + (", and 0" if entry["zero_failures"] else ""),
        met,
        f"{ours_failed} vs {ref_failed} per round",
    )
