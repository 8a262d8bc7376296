"""Decorator overhead: ``await f()`` of a no-op coroutine, bare and under ``@postgres_retry``, ns per call.

Child side: ``child`` times both in alternating rounds, in one process. Driver side: ``bench`` runs the child in
ABBA order over the two packages (two processes each; one each with ``--quick``) and pairs each round's
decorated and bare times. Goal (issues 5 and 17): the extra ns per call ≤ 0.8.4's.
"""

from __future__ import annotations

import collections
import gc
import statistics
import time
import typing

from db_retry import postgres_retry


if typing.TYPE_CHECKING:
    from child import Params, Result
    from harness import Context, GoalSink, Row


# -- child side (both packages) --------------------------------------------------------------------------
async def child(params: Params) -> Result:
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


# -- driver side ------------------------------------------------------------------------------------------
async def bench(context: Context) -> list[Row]:
    """Nanoseconds per call of a decorated no-op coroutine over a bare ``await``; ABBA order over two processes each."""
    from harness import Row, Scenario  # noqa: PLC0415 - driver only: the child side runs under 0.8.4 too

    settings = context.settings
    order = context.packages() if settings.quick else (*context.packages(0), *context.packages(1))
    bare: dict[str, list[float]] = collections.defaultdict(list)
    extra: dict[str, list[float]] = collections.defaultdict(list)
    params = {"iterations": settings.overhead_iterations, "rounds": settings.overhead_rounds}
    for package in order:
        async with Scenario(context, package, "overhead", params) as scenario:
            result = await scenario.expect("RESULT", timeout=300)
        bare[package.name] += result["bare_ns"]
        extra[package.name] += [
            wrapped - plain for plain, wrapped in zip(result["bare_ns"], result["decorated_ns"], strict=True)
        ]
    data: dict[str, dict[str, typing.Any]] = {
        name: {
            "bare_ns": statistics.median(bare[name]),
            "extra_ns": statistics.median(extra[name]),
            "rounds": extra[name],
        }
        for name in bare
    }
    context.data["overhead"] = data
    rounds = len(extra["ours"])
    return [
        Row(
            "overhead",
            f"extra ns per call over a bare await (median of {rounds} rounds)",
            data["reference"]["extra_ns"],
            data["ours"]["extra_ns"],
        ),
        Row("overhead", "bare await, ns per call", data["reference"]["bare_ns"], data["ours"]["bare_ns"]),
    ]


def goals(data: dict[str, typing.Any], goal: GoalSink) -> None:
    """Issue 5 (and 17): the decorator's overhead on success is no more than 0.8.4's."""
    if "overhead" not in data:
        return
    ours, ref = data["overhead"]["ours"]["extra_ns"], data["overhead"]["reference"]["extra_ns"]
    spread = {name: statistics.quantiles(data["overhead"][name]["rounds"], n=4) for name in ("ours", "reference")}
    goal(
        "decorator overhead ≤ reference's",
        ours <= ref,
        f"+{ours:.0f} ns vs +{ref:.0f} ns per call (middle half of the rounds: "
        f"{spread['ours'][0]:.0f} to {spread['ours'][2]:.0f} vs "
        f"{spread['reference'][0]:.0f} to {spread['reference'][2]:.0f})",
    )
