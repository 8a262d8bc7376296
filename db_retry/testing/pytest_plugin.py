"""pytest fixtures that start real PostgreSQL servers from the test kit.

Installed as the ``db_retry`` pytest plugin (a ``pytest11`` entry point), so every project with
``db-retry`` installed can request these fixtures. Loading the plugin starts nothing: a server
starts only when a test requests one of the fixtures.

- ``pg_cluster`` (session): a primary and one streaming standby, stopped at the end of the session.
- ``pg_dsn`` (session): a ``postgresql+asyncpg://`` URL of that primary, or of ``DB_RETRY_TEST_DSN`` when set.
- ``fresh_cluster`` (function): a factory of new clusters for tests that stop, crash or promote servers.
- ``proxied_cluster`` (function, needs pytest-asyncio): a new primary + standby behind one
  :class:`~db_retry.testing.proxy.TcpProxy` each, to hang, cut or delay the network.
- ``patroni_cluster``, ``pgbouncer``, ``haproxy``, ``moving_endpoint``: the deployment topologies, from
  :mod:`db_retry.testing.topology_fixtures`, which pytest loads with this plugin (``pytest_plugins``).

When ``DB_RETRY_TEST_DSN`` names an external server, the kit starts nothing: ``pg_dsn`` points at
that server and tests that need the kit's own servers are skipped with the reason. The variable is
namespaced on purpose: a service's own ``DB_DSN`` (or ``DATABASE_URL``) names its real database,
which tests must never write to. When a test that used a kit cluster fails, the tail of each
server's log is attached to its report.
"""

import collections.abc
import contextlib
import importlib.util
import os
import typing

import pytest

from db_retry.dsn import parse_url
from db_retry.testing.cluster import ClusterFactory, PostgresCluster
from db_retry.testing.proxy import ProxiedCluster


if typing.TYPE_CHECKING:
    import pluggy


__all__ = [
    "DSN_ENV",
    "FRESH_SKIP_REASON",
    "STANDBY_SKIP_REASON",
    "ClusterFactory",
    "external_dsn",
    "fresh_cluster",
    "pg_cluster",
    "pg_dsn",
]

DSN_ENV: typing.Final = "DB_RETRY_TEST_DSN"
STANDBY_SKIP_REASON: typing.Final = (
    f"needs a streaming standby from the test kit; {DSN_ENV} points at a single external server"
)
FRESH_SKIP_REASON: typing.Final = (
    f"needs a throwaway cluster from the test kit (it stops, crashes or promotes servers); "
    f"{DSN_ENV} points at a single external server"
)
_ASYNCPG_DRIVER: typing.Final = "postgresql+asyncpg"
# Fixtures whose value comes from the session cluster: a failing test that used one gets its logs.
_SESSION_FIXTURES: typing.Final = frozenset({"pg_cluster", "pg_dsn"})

# The deployment topologies' fixtures (patroni_cluster, pgbouncer, haproxy, moving_endpoint) live in a plugin module
# of their own that pytest loads with this one; neither module imports the other.
pytest_plugins: typing.Final = ("db_retry.testing.topology_fixtures",)

_session_cluster_key: typing.Final = pytest.StashKey[PostgresCluster]()
_test_clusters_key: typing.Final = pytest.StashKey[list[PostgresCluster]]()


def external_dsn() -> str | None:
    """``DB_RETRY_TEST_DSN`` as a SQLAlchemy asyncpg URL, or ``None``.

    A URL or a libpq ``key=value`` string; ``postgresql://`` and ``postgres://`` become ``postgresql+asyncpg://``.
    """
    value = os.environ.get(DSN_ENV)
    if not value:
        return None
    url = parse_url(value)  # a URL or a libpq key=value string
    if url.drivername == "postgresql":
        url = url.set(drivername=_ASYNCPG_DRIVER)
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_cluster(request: pytest.FixtureRequest) -> collections.abc.Iterator[PostgresCluster]:
    """A started primary with one streaming standby, shared by the session; skipped under ``DB_RETRY_TEST_DSN``."""
    if os.environ.get(DSN_ENV):
        pytest.skip(STANDBY_SKIP_REASON)
    cluster = PostgresCluster(standbys=1, name="session")
    cluster.start()
    request.config.stash[_session_cluster_key] = cluster
    try:
        yield cluster
    finally:
        del request.config.stash[_session_cluster_key]
        cluster.stop()


@pytest.fixture(scope="session")
def pg_dsn(request: pytest.FixtureRequest) -> str:
    """A ``postgresql+asyncpg://`` URL of the session primary, or of the external server ``DB_RETRY_TEST_DSN`` names."""
    external = external_dsn()
    if external is not None:
        return external
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    return cluster.primary.dsn(driver="asyncpg")


@pytest.fixture
def fresh_cluster(request: pytest.FixtureRequest) -> collections.abc.Iterator[ClusterFactory]:
    """A factory of new clusters (``fresh_cluster(standbys=0)``); each one is stopped when the test ends."""
    if os.environ.get(DSN_ENV):
        pytest.skip(FRESH_SKIP_REASON)
    made = request.node.stash.setdefault(_test_clusters_key, [])
    with contextlib.ExitStack() as stack:

        def factory(standbys: int = 0) -> PostgresCluster:
            cluster = PostgresCluster(standbys=standbys, name=f"fresh{len(made) + 1}")
            # Registered before start: a cluster that fails half-way is stopped too.
            stack.callback(cluster.stop)
            made.append(cluster)
            return cluster.start()

        yield factory


if importlib.util.find_spec("pytest_asyncio") is not None:  # pragma: no branch - the dev extra installs it
    import pytest_asyncio

    __all__ += ["proxied_cluster"]

    @pytest_asyncio.fixture
    async def proxied_cluster(fresh_cluster: ClusterFactory) -> collections.abc.AsyncIterator[ProxiedCluster]:
        """A new primary + standby with a :class:`~db_retry.testing.proxy.TcpProxy` in front of each node.

        Connect through ``proxied_cluster.multihost_dsn(...)`` (or ``.proxy(node).address``) and break the
        network with ``.primary.hang()``, ``.cut()``, ``.delay(s)`` or ``.cut_after_query("COMMIT")``;
        the servers themselves are ``proxied_cluster.cluster``. Needs pytest-asyncio.
        """
        async with ProxiedCluster(fresh_cluster(standbys=1)) as proxied:
            yield proxied


def _clusters_used_by(item: pytest.Item) -> list[PostgresCluster]:
    clusters = list(item.stash.get(_test_clusters_key, None) or ())
    session_cluster = item.config.stash.get(_session_cluster_key, None)
    if session_cluster is not None and _SESSION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        clusters.insert(0, session_cluster)
    return clusters


# An old-style wrapper: it works with every pluggy that pytest >= 7 may come with, and this module is
# imported by every pytest run in an environment where db-retry is installed.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> collections.abc.Generator[None, "pluggy.Result[pytest.TestReport]", None]:
    """Attach the server log tails of the clusters a failed test used to its report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for cluster in _clusters_used_by(item):
            for node in cluster.nodes:
                title = f"server log {cluster.name}/{node.name} ({node.address})"
                report.sections.append((title, node.log_tail()))
