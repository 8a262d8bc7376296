"""A throwaway PostgreSQL cluster kit for tests and demos (SPEC B9).

``PostgresCluster`` starts a primary and streaming standbys; ``faults`` breaks them on demand
(restart, crash, terminate, failover, 57P03, 53300, 25006, a partition, a freeze); ``TcpProxy`` /
``ProxiedCluster`` hang, cut, delay or cut right after a ``COMMIT``. The pytest plugin
(``db_retry.testing.pytest_plugin``) turns them into fixtures.
"""

from db_retry.testing import faults
from db_retry.testing._binaries import BINDIR_ENV, PostgresBinariesNotFoundError, find_postgres_bindir
from db_retry.testing.cluster import ClusterError, PostgresCluster, PostgresNode, free_port
from db_retry.testing.proxy import ProxiedCluster, ProxyMode, TcpProxy, query_starts_with


__all__ = [
    "BINDIR_ENV",
    "ClusterError",
    "PostgresBinariesNotFoundError",
    "PostgresCluster",
    "PostgresNode",
    "ProxiedCluster",
    "ProxyMode",
    "TcpProxy",
    "faults",
    "find_postgres_bindir",
    "free_port",
    "query_starts_with",
]
