"""pytest fixtures for the deployment topologies: Patroni, PgBouncer, HAProxy and a moving endpoint.

A pytest plugin of its own, which the kit's plugin names in ``pytest_plugins``, so they come with it
(and neither module imports the other). Each is a factory (or, for ``moving_endpoint``, a started
object) whose processes are stopped by PID when the test ends. When a program is not installed, the
test is skipped with a reason naming what to install.
"""

import collections.abc
import contextlib
import importlib.util
import typing

import pytest

from db_retry.testing._binaries import MissingComponentError
from db_retry.testing.cluster import ClusterFactory
from db_retry.testing.endpoint import MovingEndpoint
from db_retry.testing.haproxy import HAProxy
from db_retry.testing.patroni import PatroniCluster
from db_retry.testing.pgbouncer import PgBouncer, PoolMode


__all__ = [
    "HAProxyFactory",
    "PatroniFactory",
    "PgBouncerFactory",
    "haproxy",
    "moving_endpoint",
    "patroni_cluster",
    "pgbouncer",
]


class PatroniFactory(typing.Protocol):
    def __call__(self, members: int = 2, *, synchronous_mode: bool = False) -> PatroniCluster: ...


class PgBouncerFactory(typing.Protocol):
    def __call__(self, host: str, port: int, *, pool_mode: PoolMode = "transaction") -> PgBouncer: ...


class HAProxyFactory(typing.Protocol):
    def __call__(self, cluster: PatroniCluster, *, shutdown_sessions: bool = True) -> HAProxy: ...


@contextlib.contextmanager
def skip_if_missing() -> collections.abc.Iterator[None]:
    """Turn a :class:`MissingComponentError` (a program that is not installed) into a skip saying what to install."""
    try:
        yield
    except MissingComponentError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def patroni_cluster() -> collections.abc.Iterator[PatroniFactory]:
    """A factory of started Patroni clusters (etcd + ``members``), each stopped when the test ends."""
    with contextlib.ExitStack() as stack:

        def factory(members: int = 2, *, synchronous_mode: bool = False) -> PatroniCluster:
            with skip_if_missing():
                cluster = PatroniCluster(members=members, synchronous_mode=synchronous_mode)
            return stack.enter_context(cluster)

        yield factory


@pytest.fixture
def pgbouncer() -> collections.abc.Iterator[PgBouncerFactory]:
    """A factory of started PgBouncers in front of ``host:port``, each stopped when the test ends."""
    with contextlib.ExitStack() as stack:

        def factory(host: str, port: int, *, pool_mode: PoolMode = "transaction") -> PgBouncer:
            with skip_if_missing():
                bouncer = PgBouncer(host, port, pool_mode=pool_mode)
            return stack.enter_context(bouncer)

        yield factory


@pytest.fixture
def haproxy() -> collections.abc.Iterator[HAProxyFactory]:
    """A factory of started HAProxys over a Patroni cluster's members, each stopped when the test ends."""
    with contextlib.ExitStack() as stack:

        def factory(cluster: PatroniCluster, *, shutdown_sessions: bool = True) -> HAProxy:
            with skip_if_missing():
                balancer = HAProxy(cluster, shutdown_sessions=shutdown_sessions)
            return stack.enter_context(balancer)

        yield factory


if importlib.util.find_spec("pytest_asyncio") is not None:  # pragma: no branch - the dev extra installs it
    import pytest_asyncio

    @pytest_asyncio.fixture
    async def moving_endpoint(fresh_cluster: ClusterFactory) -> collections.abc.AsyncIterator[MovingEndpoint]:
        """A new primary + standby behind one address that :meth:`MovingEndpoint.move` points at the standby."""
        async with MovingEndpoint(fresh_cluster(standbys=1)) as endpoint:
            yield endpoint
