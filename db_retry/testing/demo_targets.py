"""What ``db-retry demo --topology X`` runs against: the servers, how a service connects, the faults.

``kit`` is the kit's own primary + standby through a multi-host DSN (``pg_ctl`` restarts, a failover);
``patroni`` a Patroni cluster through a multi-host DSN (``POST /switchover``, the leader's postmaster
killed); ``haproxy`` the same cluster through HAProxy's primary listener; ``pgbouncer`` PgBouncer in
transaction mode in front of a primary that restarts (engine per the README recipe); ``moving-endpoint``
one address that moves to the promoted standby, sessions kept. Each target is started and stopped by
the demo; every process it starts is stopped by PID (architecture/topologies.md).
"""

import asyncio
import typing

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db_retry.connections import build_connection_factory
from db_retry.testing import faults
from db_retry.testing.cluster import PostgresCluster
from db_retry.testing.endpoint import MovingEndpoint
from db_retry.testing.haproxy import HAProxy
from db_retry.testing.patroni import PatroniCluster
from db_retry.testing.pgbouncer import PgBouncer


__all__ = ["KIT_FAULTS", "TOPOLOGY_FAULTS", "DemoTarget", "make_target"]

KIT_FAULTS: typing.Final = ("terminate", "restart-fast", "restart-immediate", "freeze", "failover")
# A frozen primary (SIGSTOP) stays silent this long: longer than the watchdog takes to cut what waits on it.
FREEZE_SECONDS: typing.Final = 8.0
TOPOLOGY_FAULTS: typing.Final[typing.Mapping[str, tuple[str, ...]]] = {
    "kit": KIT_FAULTS,
    "patroni": ("switchover", "failover"),
    "haproxy": ("switchover", "failover"),
    "pgbouncer": ("restart-fast", "restart-immediate"),
    "moving-endpoint": ("move",),
}


def _multihost_engine(dsn: str, workers: int) -> AsyncEngine:
    url = sa.make_url(dsn)
    return create_async_engine(
        url, async_creator=build_connection_factory(url, timeout=2.0), pool_size=workers, max_overflow=0
    )


class DemoTarget:
    """The kit's primary + standby through a multi-host DSN; the other topologies subclass it."""

    topology = "kit"

    def __init__(self, cluster: PostgresCluster | None = None, *, standbys: int = 1) -> None:
        self.owned = cluster is None
        self.cluster = cluster or PostgresCluster(standbys=standbys, name=f"demo-{self.topology}")

    async def start(self) -> None:
        if self.owned:
            await asyncio.to_thread(self.cluster.start)

    async def stop(self) -> None:
        if self.owned:
            await asyncio.to_thread(self.cluster.stop)

    def describe(self) -> str:
        return ", ".join(f"{node.name} {node.address}" for node in self.cluster.nodes)

    def engine(self, workers: int) -> AsyncEngine:
        return _multihost_engine(self.cluster.multihost_dsn(target_session_attrs="read-write"), workers)

    async def inject(self, name: str) -> None:
        primary = self.cluster.primary
        if name == "terminate":
            await faults.terminate_backends(primary)
        elif name == "restart-fast":
            await faults.restart(primary, "fast")
        elif name == "restart-immediate":
            await faults.restart(primary, "immediate")
        elif name == "freeze":
            async with faults.freeze(primary):
                await asyncio.sleep(FREEZE_SECONDS)
        else:
            await faults.failover(self.cluster)
            await faults.rebuild_as_standby(self.cluster, primary)


class _Patroni(DemoTarget):
    topology = "patroni"

    def __init__(self) -> None:
        self.patroni = PatroniCluster(members=2, name="demo-patroni")

    async def start(self) -> None:
        await asyncio.to_thread(self.patroni.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.patroni.stop)

    def describe(self) -> str:
        members = ", ".join(f"{member.name} {member.node.address}" for member in self.patroni.members)
        return f"Patroni members {members} (etcd {self.patroni.etcd.address if self.patroni.etcd else '-'})"

    def engine(self, workers: int) -> AsyncEngine:
        return _multihost_engine(self.patroni.multihost_dsn(), workers)

    async def inject(self, name: str) -> None:
        if name == "switchover":
            await self.patroni.switchover()
        else:
            await self.patroni.failover()
        await self.patroni.wait_streaming()  # the old leader is a replica again before the next fault


class _HAProxy(_Patroni):
    topology = "haproxy"

    def __init__(self) -> None:
        super().__init__()
        self.haproxy: HAProxy | None = None

    async def start(self) -> None:
        await super().start()
        self.haproxy = HAProxy(self.patroni)
        await asyncio.to_thread(self.haproxy.start)

    async def stop(self) -> None:
        if self.haproxy is not None:
            await asyncio.to_thread(self.haproxy.stop)
        await super().stop()

    def describe(self) -> str:
        return f"HAProxy {typing.cast('HAProxy', self.haproxy).address()} (GET /primary) over {super().describe()}"

    def engine(self, workers: int) -> AsyncEngine:
        return create_async_engine(typing.cast("HAProxy", self.haproxy).dsn(), pool_size=workers, max_overflow=0)


class _PgBouncer(DemoTarget):
    topology = "pgbouncer"

    def __init__(self) -> None:
        super().__init__(standbys=0)
        self.bouncer: PgBouncer | None = None

    async def start(self) -> None:
        await super().start()
        self.bouncer = PgBouncer(self.cluster.primary.host, self.cluster.primary.port, pool_mode="transaction")
        await asyncio.to_thread(self.bouncer.start)

    async def stop(self) -> None:
        if self.bouncer is not None:
            await asyncio.to_thread(self.bouncer.stop)
        await super().stop()

    def describe(self) -> str:
        bouncer = typing.cast("PgBouncer", self.bouncer)
        return f"PgBouncer {bouncer.address} (transaction pooling) in front of {super().describe()}"

    def engine(self, workers: int) -> AsyncEngine:
        # The README's recipe: no prepared statement outlives its transaction behind a transaction pooler.
        url = sa.make_url(typing.cast("PgBouncer", self.bouncer).dsn())
        return create_async_engine(
            url.update_query_dict({"prepared_statement_cache_size": "0"}),
            connect_args={"statement_cache_size": 0},
            pool_size=workers,
            max_overflow=0,
        )


class _MovingEndpoint(DemoTarget):
    topology = "moving-endpoint"

    def __init__(self) -> None:
        super().__init__()
        self.endpoint: MovingEndpoint | None = None

    async def start(self) -> None:
        await super().start()
        self.endpoint = await MovingEndpoint(self.cluster).start()

    async def stop(self) -> None:
        if self.endpoint is not None:
            await self.endpoint.stop()
        await super().stop()

    def describe(self) -> str:
        return f"one address {typing.cast('MovingEndpoint', self.endpoint).address} over {super().describe()}"

    def engine(self, workers: int) -> AsyncEngine:
        return create_async_engine(
            typing.cast("MovingEndpoint", self.endpoint).dsn(), pool_size=workers, max_overflow=0
        )

    async def inject(self, name: str) -> None:  # noqa: ARG002 - one fault: the move
        await typing.cast("MovingEndpoint", self.endpoint).move()


_TARGETS: typing.Final[typing.Mapping[str, typing.Callable[[], DemoTarget]]] = {
    "kit": DemoTarget,
    "patroni": _Patroni,
    "haproxy": _HAProxy,
    "pgbouncer": _PgBouncer,
    "moving-endpoint": _MovingEndpoint,
}


def make_target(topology: str) -> DemoTarget:
    """A new, not yet started target for ``topology`` (one of :data:`TOPOLOGY_FAULTS`)."""
    return _TARGETS[topology]()
