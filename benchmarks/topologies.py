"""Topologies (issue 11): the restart scenario's 4 looping writers on the test kit's deployment components.

A two-member Patroni cluster through a multi-host DSN across ``POST /switchover`` and across a ``SIGKILL`` of the
leader's postmaster, the same kill through HAProxy; PgBouncer in transaction mode across a fast restart of its
server; a moving endpoint (``MovingEndpoint.move()``). The child side is ``callers.py``'s; so are the write check
and the caller metrics. Driver only (no scenario process imports it, so the kit is imported at the top). No
goals: the rows are reported.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
import typing

from callers import CALL_PAUSE, CALLERS, caller_metrics, check_writes, run_callers
from harness import CONNECT_TIMEOUT, Context, Row, create_schema, ms, restart, running_cluster

from db_retry.testing.endpoint import MovingEndpoint
from db_retry.testing.haproxy import HAProxy
from db_retry.testing.patroni import PatroniCluster
from db_retry.testing.pgbouncer import PgBouncer


def write_window_ms(result: dict[str, typing.Any], marks: dict[str, float]) -> float | None:
    """The longest stretch with no successful call at all, from the fault on: how long writes were unavailable."""
    ends = sorted(end for _, _, end, error in result["calls"] if error is None and end > marks["fault"])
    if not ends:
        return None
    points = [marks["fault"], *ends]
    return ms(max(later - earlier for earlier, later in itertools.pairwise(points)))


def topology_metrics(result: dict[str, typing.Any], marks: dict[str, float]) -> dict[str, typing.Any]:
    return caller_metrics(result, marks) | {"window_ms": write_window_ms(result, marks)}


def topology_rows(label: str, metrics: dict[str, dict[str, typing.Any]], manager: str) -> list[Row]:
    def pair(key: str) -> tuple[typing.Any, typing.Any]:
        return metrics["reference"][key], metrics["ours"][key]

    return [
        Row(
            label,
            "failed calls / total",
            *(f"{m['failed']} / {m['calls']}" for m in (metrics["reference"], metrics["ours"])),
        ),
        Row(label, "writes unavailable (longest stretch without a successful call), ms", *pair("window_ms")),
        Row(label, f"{manager}, s", *pair("server_down_s")),
        Row(label, "writes applied twice", *pair("applied_twice")),
        Row(label, "writes applied but reported failed", *pair("applied_but_reported_failed")),
    ]


def _topology_params(dsn: str, *, multihost: bool, pgbouncer: bool = False) -> dict[str, typing.Any]:
    return {
        "dsn": dsn,
        "callers": CALLERS,
        "pause": CALL_PAUSE,
        "multihost": multihost,
        "pgbouncer": pgbouncer,
        "connect_timeout": CONNECT_TIMEOUT,
    }


async def _patroni_fault(cluster: PatroniCluster, kind: str) -> dict[str, float]:
    """Switch over or kill the leader's postmaster; the times the fault began and the new leader took writes."""
    fault = time.monotonic()
    transition = await (cluster.switchover() if kind == "switchover" else cluster.failover())
    return {"fault": fault, "stopped": fault, "back": fault + transition.seconds}


async def _bench_patroni(context: Context, kind: str, *, via_haproxy: bool) -> list[Row]:
    metrics: dict[str, dict[str, typing.Any]] = {}
    for package in context.packages():
        with PatroniCluster(members=2, name="bench-patroni") as cluster:
            leader = cluster.leader().node
            await create_schema(leader)
            with contextlib.ExitStack() as stack:
                if via_haproxy:
                    balancer = stack.enter_context(HAProxy(cluster))
                    params = _topology_params(balancer.dsn(), multihost=False)
                else:
                    params = _topology_params(cluster.multihost_dsn(target_session_attrs=None), multihost=True)
                fault = functools.partial(_patroni_fault, cluster, kind)
                result, marks = await run_callers(context, package, params, fault)
            metrics[package.name] = topology_metrics(result, marks) | await check_writes(
                cluster.leader().node, result["succeeded"], f"patroni {kind} ({package.name})"
            )
    context.data.setdefault("topologies", {})[f"patroni-{kind}{'-haproxy' if via_haproxy else ''}"] = metrics
    what = "POST /switchover" if kind == "switchover" else "leader postmaster killed"
    where = "HAProxy (GET /primary checks)" if via_haproxy else "multi-host DSN"
    return topology_rows(
        f"Patroni, {what}, through a {where}, {CALLERS} callers", metrics, "Patroni: fault → new leader writable"
    )


async def _bench_pgbouncer(context: Context) -> list[Row]:
    metrics: dict[str, dict[str, typing.Any]] = {}
    for package in context.packages():
        async with running_cluster(context, standbys=0) as cluster:
            primary = cluster.primary
            await create_schema(primary)
            with PgBouncer(primary.host, primary.port, pool_mode="transaction") as bouncer:
                params = _topology_params(bouncer.dsn(), multihost=False, pgbouncer=True)
                result, marks = await run_callers(context, package, params, functools.partial(restart, primary, "fast"))
            metrics[package.name] = topology_metrics(result, marks) | await check_writes(
                primary, result["succeeded"], f"pgbouncer restart ({package.name})"
            )
    context.data.setdefault("topologies", {})["pgbouncer-restart"] = metrics
    return topology_rows(
        f"PgBouncer (transaction pooling), fast restart of its server, {CALLERS} callers",
        metrics,
        "server down (stop began → accepts again)",
    )


async def _move(endpoint: MovingEndpoint) -> dict[str, float]:
    fault = time.monotonic()
    await endpoint.move(hold=1.0)
    back = time.monotonic()
    return {"fault": fault, "stopped": fault, "back": back}


async def _bench_moving_endpoint(context: Context) -> list[Row]:
    metrics: dict[str, dict[str, typing.Any]] = {}
    for package in context.packages():
        async with running_cluster(context, standbys=1) as cluster:
            await create_schema(cluster.primary)
            await cluster.wait_for_replay()
            async with MovingEndpoint(cluster) as endpoint:
                params = _topology_params(endpoint.dsn(), multihost=False)
                result, marks = await run_callers(context, package, params, functools.partial(_move, endpoint))
            metrics[package.name] = topology_metrics(result, marks) | await check_writes(
                cluster.primary, result["succeeded"], f"moving endpoint ({package.name})"
            )
    context.data.setdefault("topologies", {})["moving-endpoint"] = metrics
    return topology_rows(
        f"moving endpoint (old primary read-only, standby promoted, address moved), {CALLERS} callers",
        metrics,
        "the whole move (1 s hold, old primary rebuilt)",
    )


async def bench(context: Context) -> list[Row]:
    """Issue 11: 4 looping writers on each deployment topology of the kit, ours and 0.8.4 side by side."""
    rows = await _bench_patroni(context, "switchover", via_haproxy=False)
    rows += await _bench_patroni(context, "failover", via_haproxy=False)
    rows += await _bench_patroni(context, "failover", via_haproxy=True)
    rows += await _bench_pgbouncer(context)
    rows += await _bench_moving_endpoint(context)
    return rows
