"""Side-by-side benchmarks of this package and db-retry 0.8.4 from PyPI, in one run.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run.py [--quick] [--json PATH] [--only NAME ...] [--workloads KEY ...]

This runner picks the scenarios, prints the report and the goals, and writes the JSON. Each scenario is one
module next to it (``overhead``, ``connect``, ``contention``, ``disconnects``, ``callers`` for the restart and
the failover, ``topologies``), holding both its driver side and the code its scenario processes run;
``harness.py`` holds what the driver sides share (settings, both packages, scenario processes, servers, tables).

The driver owns the PostgreSQL servers (throwaway clusters of the test kit, ``db_retry.testing``) and injects the
faults. Both packages import as ``db_retry``, so each runs in its own interpreter: ours is the interpreter running
this script, the reference lives in ``.bench-venvs/ref-0.8.4`` (created on first use, with the same SQLAlchemy,
asyncpg and greenlet versions as ours). The same entry point, ``benchmarks/scenarios.py``, runs in both, back to
back, from a directory outside the repository. Times on both sides come from ``time.monotonic()``: CLOCK_MONOTONIC,
one clock for every process of a Linux machine.

Correctness checks fail the run loudly (exit status 1): the counter equals the successful increments, the
transfers conserve the money, no successful write is missing, no connection attempt or task is left behind.
Goals are reported, not asserted: a missed goal is a finding.
"""

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import typing

import callers
import connect
import contention
import disconnects
import overhead
import topologies
from harness import (
    REPO,
    RESULTS,
    BenchmarkError,
    Context,
    Row,
    Settings,
    create_schema,
    ensure_reference_venv,
    fmt,
    markdown_table,
    our_package,
    running_cluster,
)


ALL_SCENARIOS: typing.Final = (
    "overhead",
    "connect",
    "contention",
    "disconnects",
    "restart",
    "failover",
    "topologies",
)


# -- main -----------------------------------------------------------------------------------------------------
def machine() -> dict[str, typing.Any]:
    meminfo = pathlib.Path("/proc/meminfo")
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    memory_kib = (
        next((int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")), 0)
        if meminfo.exists()
        else 0
    )
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if cpuinfo.exists()
        else platform.processor()
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
    }


async def run(context: Context, only: set[str]) -> tuple[list[Row], list[list[str]] | None]:
    rows: list[Row] = []
    seed: list[list[str]] | None = None
    if "overhead" in only:
        print("overhead ...", flush=True)
        rows += await overhead.bench(context)
    if "connect" in only:
        print("connect latency with hanging hosts ...", flush=True)
        rows += await connect.bench(context)
    if only & {"contention", "disconnects", "restart"}:
        async with running_cluster(context, standbys=1) as cluster:
            await create_schema(cluster.primary)
            if "contention" in only:
                print("contention: hot row, spread transfers, rare conflicts ...", flush=True)
                rows += await contention.bench(context, cluster)
            if "disconnects" in only:
                print("pre-ping vs retry on invalidation (ours) ...", flush=True)
                seed = await disconnects.bench(context, cluster)
            if "restart" in only:
                print("restarts ...", flush=True)
                rows += await callers.bench_restart(context, cluster)
    if "failover" in only:
        print("failover ...", flush=True)
        rows += await callers.bench_failover(context)
    if "topologies" in only:
        print("topologies (Patroni, HAProxy, PgBouncer, a moving endpoint) ...", flush=True)
        rows += await topologies.bench(context)
    return rows, seed


def goals(data: dict[str, typing.Any]) -> list[dict[str, typing.Any]]:
    """Issues 5, 10 and 17's goals against this run's numbers, from each scenario module's ``goals``."""
    found: list[dict[str, typing.Any]] = []

    def goal(name: str, met: bool, detail: str) -> None:  # noqa: FBT001
        found.append({"goal": name, "met": met, "detail": detail})

    for module in (connect, contention, callers, overhead):
        module.goals(data, goal)
    return found


def report(context: Context, rows: list[Row], seed: list[list[str]] | None, meta: dict[str, typing.Any]) -> str:
    reference, ours = context.reference.label, context.ours.label
    parts = [
        markdown_table(
            ["scenario", "metric", reference, ours, "ours / reference"],
            ([row.scenario, row.metric, fmt(row.reference), fmt(row.ours), row.ratio_text] for row in rows),
        )
    ]
    if seed is not None:
        parts.append(
            "Disconnect handling, ours only (seed 003):\n\n"
            + markdown_table(["metric", "pessimistic: pool_pre_ping=True", "optimistic: pool_pre_ping=False"], seed)
        )
    found = context.goals
    if found:
        parts.append(
            "Goals (issues 5, 10 and 17):\n\n"
            + markdown_table(
                ["goal", "met", "measured"],
                ([g["goal"], "met" if g["met"] else "**MISSED**", g["detail"]] for g in found),
            )
            + f"\n\n{sum(1 for g in found if g['met'])} of {len(found)} goals met."
        )
    parts.append(describe_run(meta))
    return "\n\n".join(parts)


def source_state() -> str:
    """The commit our package was measured at, and whether ``db_retry/`` had uncommitted changes."""

    def git(*args: str) -> str:
        completed = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=30)
        return completed.stdout.strip() if completed.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "db_retry")
    return f"{commit} + uncommitted changes in db_retry/" if dirty else commit


def describe_run(meta: dict[str, typing.Any]) -> str:
    host = meta["machine"]
    versions = "; ".join(
        f"{side}: " + ", ".join(f"{name} {version}" for name, version in found.items())
        for side, found in meta["versions"].items()
    )
    return (
        f"{meta['date']} · {host['nproc']} CPUs ({host['cpu']}), {host['memory_gib']} GiB, Linux {host['kernel']}"
        f" · 1-minute load average {meta['load_average'][0]:.1f} to {meta['load_average'][1]:.1f}"
        f" · PostgreSQL {meta['server_version'] or '(no server started)'} · Python {meta['python']}"
        f" · ours at {meta['source']} · {versions}"
        f"\n`{meta['command']}`"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs: checks the harness, numbers are rough")
    parser.add_argument("--json", type=pathlib.Path, default=RESULTS / "latest.json", help="where to write the JSON")
    parser.add_argument("--only", nargs="+", choices=ALL_SCENARIOS, default=list(ALL_SCENARIOS), metavar="NAME")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=[workload.key for workload in contention.WORKLOADS],
        default=list(contention.DEFAULT_WORKLOADS),
        metavar="KEY",
        help="contention workloads to run: "
        + ", ".join(workload.key for workload in contention.WORKLOADS)
        + f"; KEY{contention.HOG_SUFFIX} runs KEY with a CPU hog on every core;"
        + f" {contention.YARDSTICK} runs too whenever a hot-row workload with goals does"
        + f" (default: all but {contention.YARDSTICK}{contention.HOG_SUFFIX})",
    )
    args = parser.parse_args()
    settings = Settings.make(quick=args.quick)
    started = time.monotonic()
    source = source_state()
    reference, ours = ensure_reference_venv(), our_package()
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(RESULTS / "logs", ignore_errors=True)
    (RESULTS / "logs").mkdir()
    with tempfile.TemporaryDirectory(prefix="db-retry-bench-") as workdir:
        workloads = contention.selected(args.workloads)
        context = Context(settings, reference, ours, pathlib.Path(workdir), workloads)
        try:
            rows, seed = asyncio.run(run(context, set(args.only)))
        except BenchmarkError as exc:
            print(
                f"\nBENCHMARK FAILED: {exc}\n(scenario logs in {(RESULTS / 'logs').relative_to(REPO)})", file=sys.stderr
            )
            return 1
    command = shlex.join([os.path.relpath(sys.executable, REPO), "benchmarks/run.py", *sys.argv[1:]])
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "server_version": context.data.get("server_version"),
        "python": platform.python_version(),
        "versions": {side: hello["versions"] for side, hello in sorted(context.hello.items())},
        "command": command,
        "source": source,
        "load_average": [min(context.load, default=0), max(context.load, default=0)],
        "quick": settings.quick,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    context.goals = goals(context.data)
    text = report(context, rows, seed, meta)
    print("\n" + text + f"\n\n(elapsed {meta['elapsed_s']} s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta,
        "rows": [dataclasses.asdict(row) | {"ratio": row.ratio} for row in rows],
        "seed003": seed,
        "goals": context.goals,
        "data": context.data,
    }
    args.json.write_text(json.dumps(payload, indent=1, default=str))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
