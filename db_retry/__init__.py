"""Async PostgreSQL reliability for SQLAlchemy + asyncpg: retries, multi-host failover, transactions."""

import logging

from db_retry.connections import NoHostAvailableError, build_connection_factory
from db_retry.dsn import DSNError, build_db_dsn, is_dsn_multihost
from db_retry.engine import CommitOutcomeUnknownError
from db_retry.health import HealthReport, HostStatus, check_hosts
from db_retry.retriable import ErrorKind, is_retriable
from db_retry.retry import RetryEvent, postgres_retry, wait_for_error
from db_retry.routing import ReplicaStatus, RoutingSession, RoutingSessionMaker
from db_retry.settings import SettingsError
from db_retry.transaction import Transaction


# A library's loggers stay silent until the application configures logging.
logging.getLogger("db_retry").addHandler(logging.NullHandler())

__all__ = [
    "CommitOutcomeUnknownError",
    "DSNError",
    "ErrorKind",
    "HealthReport",
    "HostStatus",
    "NoHostAvailableError",
    "ReplicaStatus",
    "RetryEvent",
    "RoutingSession",
    "RoutingSessionMaker",
    "SettingsError",
    "Transaction",
    "build_connection_factory",
    "build_db_dsn",
    "check_hosts",
    "is_dsn_multihost",
    "is_retriable",
    "postgres_retry",
    "wait_for_error",
]
