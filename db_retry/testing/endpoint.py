"""One address that stands for "the primary" and moves on failover: a DNS name, a VIP, a cloud writer endpoint.

:class:`MovingEndpoint` is a :class:`~db_retry.testing.proxy.TcpProxy` in front of a kit cluster's primary
that :mod:`~db_retry.testing.faults` moves to a promoted standby. It composes the two, so neither imports
the other's user.
"""

import asyncio
import types
import typing

from db_retry.testing import faults
from db_retry.testing.cluster import DATABASE, SUPERUSER, PostgresCluster, PostgresNode
from db_retry.testing.proxy import ProxyOptions, TcpProxy


__all__ = ["MovingEndpoint"]


class MovingEndpoint:
    """One address that stands for "the primary" (a DNS name, a VIP, a cloud writer endpoint) over a cluster.

    A :class:`TcpProxy` in front of the cluster's primary; :meth:`move` promotes a standby and points the
    address at it, as a managed service does on failover. Sessions opened before the move stay on the old
    primary, which turns read-only first (writes fail with ``25006``), unless ``cut_sessions``. Use
    ``async with MovingEndpoint(cluster) as endpoint``.
    """

    def __init__(
        self, cluster: PostgresCluster, *, cut_sessions: bool = False, **options: typing.Unpack[ProxyOptions]
    ) -> None:
        self.cluster = cluster
        self.cut_sessions = cut_sessions
        self.proxy = TcpProxy(cluster.primary.host, cluster.primary.port, name="moving-endpoint", **options)
        self.moves = 0

    def __repr__(self) -> str:
        return f"MovingEndpoint({self.proxy.address} -> {self.proxy.target_host}:{self.proxy.target_port})"

    @property
    def address(self) -> str:
        return self.proxy.address

    def dsn(self, *, driver: str | None = "asyncpg", database: str = DATABASE) -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{SUPERUSER}@{self.address}/{database}"

    async def start(self) -> typing.Self:
        await self.proxy.start()
        return self

    async def stop(self) -> None:
        await self.proxy.stop()

    async def __aenter__(self) -> typing.Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        await self.stop()

    async def move(self, *, hold: float = 1.0) -> PostgresNode:
        """Move the endpoint to a standby: old primary read-only, standby promoted, address retargeted.

        Kept sessions meet the read-only old primary for ``hold`` seconds; then it is stopped and rebuilt as
        a standby of the new primary (on its port). Returns the new primary.
        """
        old = self.cluster.primary
        new = self.cluster.standbys[0]
        await faults.set_read_only(old)
        await self.cluster.wait_for_replay(new)
        await asyncio.to_thread(new.promote)
        self.cluster.nodes[:] = [new, *[node for node in self.cluster.nodes if node not in {new, old}], old]
        self.proxy.retarget(new.host, new.port, cut=self.cut_sessions)
        self.moves += 1
        await asyncio.sleep(hold)
        await faults.rebuild_as_standby(self.cluster, old)
        return new
