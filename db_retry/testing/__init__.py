"""A throwaway PostgreSQL cluster kit for tests and demos (SPEC B9)."""

from db_retry.testing._binaries import BINDIR_ENV, PostgresBinariesNotFoundError, find_postgres_bindir
from db_retry.testing.cluster import ClusterError, PostgresCluster, PostgresNode, free_port


__all__ = [
    "BINDIR_ENV",
    "ClusterError",
    "PostgresBinariesNotFoundError",
    "PostgresCluster",
    "PostgresNode",
    "find_postgres_bindir",
    "free_port",
]
