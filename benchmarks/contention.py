"""Contention: callers looping over one ``@postgres_retry`` call, alone, in one process, in several, in two threads.

Workloads (``WORKLOADS``; ``--workloads KEY ...`` picks some):

- hot row: read one row and write it back + 1, SERIALIZABLE. 1 worker (``hot1``, the lone-worker yardstick of
  the hot-row goals), 32 workers (``hot32``), 4 processes x 8 workers (``hot4x8``), and 2 threads x 1 event
  loop each x 16 workers in one process (``hot2x16``: one decorated function object shared by both threads,
  each thread with its own ``asyncio.run`` and its own engine);
- spread: a transfer between two random accounts out of 1000, SERIALIZABLE: 32 workers (``spread32``),
  4 processes x 8 workers (``spread4x8``);
- rare: 10 ms of I/O per call, 2% of the calls lose one conflict (asyncpg's own ``SerializationError``,
  raised in the process): 50 workers (``rare50``);
- each again with the machine loaded (``KEY+hog``: a process spinning on every core for the whole round,
  started before the round's scenario processes and killed after them).

Child side: ``child`` runs one process's workers for ``duration`` seconds from a common start and returns every
call's start, end and outcome. Driver side: ``bench`` runs each workload ``rounds`` times per package in
alternating order, checks the hot counter and the conserved balances after every round, and ``goals`` judges
issue 17's goals (hot row against the lone worker's rate and 0.8.4's p99; spread and rare against 0.8.4; 0 failed
calls everywhere, loaded too).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import random
import statistics
import sys
import threading
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
    round start together. With ``threads`` > 1, see ``threaded``.
    """
    if params.get("threads", 1) > 1:
        return await threaded(params)
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


async def threaded(params: Params) -> Result:
    """``threads`` threads, each with its own event loop (``asyncio.run``) and engine, sharing one decorated function.

    The function object decorated with ``@postgres_retry`` is the same in every thread; the thread's unit of work
    (which holds its own session factory: an engine cannot serve two event loops) is its argument. Attempts are
    counted under a lock. All threads start at the ``go`` time and stop at the same deadline.
    """
    threads: int = params["threads"]
    workers: int = params["workers"]
    lock = threading.Lock()
    attempts = 0

    @postgres_retry
    async def run_once(unit: Unit, state: list[bool]) -> None:
        nonlocal attempts
        with lock:
            attempts += 1
        await unit(state)

    ready = [threading.Event() for _ in range(threads)]
    go = threading.Event()
    start_at: list[float] = []  # set once, before `go`; empty if the round was called off

    async def one_thread(number: int) -> tuple[list[Call], collections.Counter[str]]:
        engine = make_engine(params["dsn"], pool_size=workers)
        try:
            session_factory = async_sessionmaker(engine, expire_on_commit=False)
            unit = workload(params["workload"], params["seed"] * 100 + number, params, session_factory)
            await fill_pool(engine, workers)
            ready[number].set()
            await asyncio.to_thread(go.wait)
            if not start_at:
                return [], collections.Counter()
            await asyncio.sleep(max(0.0, start_at[0] - time.monotonic()))
            return await loop_calls(functools.partial(run_once, unit), workers, start_at[0] + params["duration"])
        finally:
            await engine.dispose()

    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-loop") as pool:
        futures = [loop.run_in_executor(pool, asyncio.run, one_thread(number)) for number in range(threads)]
        try:
            while not all(event.is_set() for event in ready):
                for future in futures:
                    if future.done():
                        future.result()  # a thread that failed before it was ready: its error
                await asyncio.sleep(0.01)
            emit("READY")
            start_at.append(await wait_for_go())
        finally:
            go.set()  # also when called off: the threads return at once and the pool can shut down
        results = await asyncio.gather(*futures)
    finished = time.monotonic()
    return {
        "start": start_at[0],
        "deadline": start_at[0] + params["duration"],
        "finished": finished,
        "calls": [call for calls, _ in results for call in calls],
        "attempts": attempts,
        "errors": dict(sum((errors for _, errors in results), collections.Counter())),
    }


# -- driver side ------------------------------------------------------------------------------------------
RARE_IO_S: typing.Final = 0.01
RARE_CONFLICT_SHARE: typing.Final = 0.02
HOG_SUFFIX: typing.Final = "+hog"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One contention workload: ``processes`` scenario processes of one package, ``threads`` x ``workers`` callers each.

    ``goals`` names the goals that apply: ``hot``, ``spread``, ``rare`` (issue 17, against 0.8.4 and the lone
    worker), ``loaded`` (0 failed calls with a CPU hog on every core), or None (``hot1``: the yardstick).
    """

    key: str  # for --workloads and the JSON
    label: str
    workload: str  # the child's unit of work: hot, spread, rare
    processes: int
    workers: int
    threads: int = 1
    goals: typing.Literal["hot", "spread", "rare", "loaded"] | None
    loaded: bool = False  # a CPU hog on every core during each round

    @property
    def zero_failures(self) -> bool:
        return self.goals is not None

    def under_load(self) -> Workload:
        return dataclasses.replace(
            self,
            key=self.key + HOG_SUFFIX,
            label=f"{self.label}, CPU hog on every core",
            goals="loaded",
            loaded=True,
        )


BASE_WORKLOADS: typing.Final = (
    Workload(key="hot1", label="hot row, 1 worker", workload="hot", processes=1, workers=1, goals=None),
    Workload(key="hot32", label="hot row, 32 workers", workload="hot", processes=1, workers=32, goals="hot"),
    Workload(
        key="hot4x8",
        label="hot row, 4 processes x 8 workers",
        workload="hot",
        processes=4,
        workers=8,
        goals="hot",
    ),
    Workload(
        key="hot2x16",
        label="hot row, 2 threads x 1 event loop each x 16 workers",
        workload="hot",
        processes=1,
        threads=2,
        workers=16,
        goals="hot",
    ),
    Workload(
        key="spread32",
        label="spread transfers, 32 workers",
        workload="spread",
        processes=1,
        workers=32,
        goals="spread",
    ),
    Workload(
        key="spread4x8",
        label="spread transfers, 4 processes x 8 workers",
        workload="spread",
        processes=4,
        workers=8,
        goals="spread",
    ),
    Workload(
        key="rare50",
        label="rare unrelated conflicts, 50 workers",
        workload="rare",
        processes=1,
        workers=50,
        goals="rare",
    ),
)
# Every workload, then each again under a CPU hog (KEY+hog): what --workloads accepts.
WORKLOADS: typing.Final = (*BASE_WORKLOADS, *(workload.under_load() for workload in BASE_WORKLOADS))
# What a run does without --workloads: issue 17's workloads, plain and loaded (the lone worker plain only).
DEFAULT_WORKLOADS: typing.Final = tuple(workload.key for workload in WORKLOADS if workload.key != "hot1" + HOG_SUFFIX)
YARDSTICK: typing.Final = "hot1"  # the lone worker: the hot-row goals' calls/s are measured against its rate


def selected(keys: typing.Iterable[str]) -> list[Workload]:
    """The workloads named, in ``WORKLOADS`` order, with the lone worker first whenever a hot-row goal needs it."""
    wanted = set(keys)
    if any(workload.goals == "hot" and workload.key in wanted for workload in WORKLOADS):
        wanted.add(YARDSTICK)
    return [workload for workload in WORKLOADS if workload.key in wanted]


async def contention_run(
    context: Context, package: Package, primary: PostgresNode, workload: Workload, round_number: int
) -> dict[str, typing.Any]:
    """One round of a workload for one package: its processes start together; fails loudly on a wrong total."""
    from harness import (  # noqa: PLC0415 - driver only: the child side runs under 0.8.4 too
        ACCOUNTS,
        BALANCE,
        BenchmarkError,
        Scenario,
        cpu_hog,
        ms,
        percentile,
    )

    duration = duration_of(context, workload)
    await primary.execute("UPDATE bench_counter SET n = 0 WHERE id = 1")
    await primary.execute("UPDATE bench_accounts SET moves = 0")
    base = {
        "dsn": primary.dsn(driver="asyncpg"),
        "workers": workload.workers,
        "threads": workload.threads,
        "duration": duration,
        "workload": workload.workload,
        "accounts": ACCOUNTS,
        "io_s": RARE_IO_S,
        "conflict_share": RARE_CONFLICT_SHARE,
    }
    # The hog spins from before the round's processes start until they have all exited, also on an error.
    hog: contextlib.AbstractContextManager[list[int]] = (
        cpu_hog(limit_s=duration + 600) if workload.loaded else contextlib.nullcontext([])
    )
    with hog as hogs:
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
    run: dict[str, typing.Any] = {
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
    if hogs:
        run["hogs"] = len(hogs)
    return run


CONTENTION_METRICS: typing.Final = (
    ("calls_per_s", "successful calls/s"),
    ("p50_ms", "call latency p50 ms"),
    ("p99_ms", "call latency p99 ms"),
    ("failed", "calls failed after retries, per round"),
    ("attempts_per_call", "attempts per call"),
)


def duration_of(context: Context, workload: Workload) -> float:
    return context.settings.loaded_duration if workload.loaded else context.settings.duration


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
            "loaded": workload.loaded,
            "duration_s": duration_of(context, workload),
        }
        label = f"{workload.label} ({rounds} rounds of {duration_of(context, workload):g} s)"
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
    """Issue 17's goals for each workload that has some, each judged on the median over the rounds."""
    if "contention" not in data:
        return
    entries: dict[str, typing.Any] = data["contention"]
    yardstick = entries.get(YARDSTICK)
    for entry in entries.values():
        kind = entry["goals"]
        if kind == "hot":
            hot_goals(entry, yardstick, goal)
        elif kind in {"spread", "rare"}:
            against_reference_goals(entry, goal)
        if kind:
            failure_goal(entry, goal, no_more_than_reference=kind == "rare")


def ratios(entry: dict[str, typing.Any], key: str) -> list[float]:
    """Ours / 0.8.4 in each round (the packages' runs of one round are paired)."""
    runs = entry["runs"]
    return [ours[key] / ref[key] for ours, ref in zip(runs["ours"], runs["reference"], strict=True) if ref[key]]


def medians(entry: dict[str, typing.Any], key: str) -> tuple[float, float]:
    """The median over the rounds of ``key``: ours, 0.8.4's."""
    runs = entry["runs"]
    return statistics.median(run[key] for run in runs["ours"]), statistics.median(run[key] for run in runs["reference"])


def judged(found: list[float], bound: float, *, at_least: bool) -> bool:
    if not found:
        return False
    value = statistics.median(found)
    return value >= bound if at_least else value <= bound


UNITS: typing.Final = {"calls_per_s": "calls/s", "p50_ms": "ms", "p99_ms": "ms"}


def against_reference(entry: dict[str, typing.Any], key: str, bound: float, *, at_least: bool) -> tuple[bool, str]:
    """A goal on ours / 0.8.4: met or not, and the measured figures (ratio, its range, both medians)."""
    from harness import fmt, ratio_summary  # noqa: PLC0415 - driver only

    found = ratios(entry, key)
    ours, reference = medians(entry, key)
    detail = f"{ratio_summary(found)}; {fmt(ours)} vs {fmt(reference)} {UNITS[key]}"
    return judged(found, bound, at_least=at_least), detail


def hot_goals(entry: dict[str, typing.Any], yardstick: dict[str, typing.Any] | None, goal: GoalSink) -> None:
    """Hot row: calls/s ≥ 1.0x the lone worker's (ours, this run), p99 ≤ 0.2x 0.8.4's."""
    from harness import fmt, ratio_summary  # noqa: PLC0415 - driver only

    label = entry["label"]
    name = f"{label}: calls/s ≥ 1.0x the lone worker's ({YARDSTICK}, ours, this run)"
    if yardstick is None:
        goal(name, False, f"not measured: {YARDSTICK} was not run")  # noqa: FBT003 - the sink's signature
    else:
        lone = statistics.median(run["calls_per_s"] for run in yardstick["runs"]["ours"])
        per_round = [run["calls_per_s"] / lone for run in entry["runs"]["ours"]] if lone else []
        ours, _ = medians(entry, "calls_per_s")
        goal(
            name,
            judged(per_round, 1.0, at_least=True),
            f"{ratio_summary(per_round)}; {fmt(ours)} vs {fmt(lone)} calls/s (lone worker, median of rounds)",
        )
    met, detail = against_reference(entry, "p99_ms", 0.2, at_least=False)
    goal(f"{label}: p99 ≤ 0.2x 0.8.4's", met, detail)


def against_reference_goals(entry: dict[str, typing.Any], goal: GoalSink) -> None:
    """Spread and rare: calls/s ≥ 1.0x, p50 ≤ 1.1x, p99 ≤ 0.2x 0.8.4's."""
    label = entry["label"]
    for key, text, bound, at_least in (
        ("calls_per_s", "calls/s ≥ 1.0x", 1.0, True),
        ("p50_ms", "p50 ≤ 1.1x", 1.1, False),
        ("p99_ms", "p99 ≤ 0.2x", 0.2, False),
    ):
        met, detail = against_reference(entry, key, bound, at_least=at_least)
        goal(f"{label}: {text}", met, detail)


def failure_goal(entry: dict[str, typing.Any], goal: GoalSink, *, no_more_than_reference: bool) -> None:
    """0 failed calls in every round (rare: also no more than 0.8.4's); the error classes when some failed."""
    runs = entry["runs"]
    ours = [run["failed"] for run in runs["ours"]]
    reference = [run["failed"] for run in runs["reference"]]
    met = sum(ours) == 0 and (not no_more_than_reference or sum(ours) <= sum(reference))
    errors = sum((collections.Counter(run["errors"]) for run in runs["ours"]), collections.Counter())
    detail = f"{ours} vs {reference} per round"
    if errors:
        detail += "; ours: " + ", ".join(f"{count}x {name}" for name, count in errors.most_common())
    if entry.get("loaded"):
        calls_per_s, reference_calls_per_s = medians(entry, "calls_per_s")
        p99, reference_p99 = medians(entry, "p99_ms")
        detail += (
            f" (calls/s {calls_per_s:.0f} vs {reference_calls_per_s:.0f}, p99 {p99:.0f} vs {reference_p99:.0f} ms)"
        )
    text = "failed calls ≤ 0.8.4's, and 0" if no_more_than_reference else "0 failed calls"
    goal(f"{entry['label']}: {text}", met, detail)
