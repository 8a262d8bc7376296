"""Which database errors are transient: a pure decision over an exception's cause chain.

The decision works from SQLSTATE codes (``exc.sqlstate`` on asyncpg, psycopg and SQLAlchemy's
adapted asyncpg errors), from SQLAlchemy's ``connection_invalidated`` flag and from the socket
errors raised while connecting, so it does not depend on one SQLAlchemy version's wrapper types.
``architecture/retriable.md`` has the table of codes and the reasons.
"""

import enum
import typing

import asyncpg
from sqlalchemy.exc import DBAPIError


class ErrorKind(enum.Enum):
    """What a failure says about the next attempt."""

    CONFLICT = "conflict"  # another transaction won; retry soon
    OUTAGE = "outage"  # the connection or the server went away while the work ran; retry once it is back
    UNAVAILABLE = "unavailable"  # no usable server could be reached: the work never started
    AMBIGUOUS = "ambiguous"  # a COMMIT may or may not have been applied; retrying could apply it twice


CONFLICT_SQLSTATES: typing.Final = frozenset({"40001", "40P01"})
OUTAGE_SQLSTATES: typing.Final = frozenset(
    {
        "57P01",  # admin_shutdown: backend terminated, fast shutdown
        "57P02",  # crash_shutdown: another backend crashed, the server restarts
        "25006",  # read_only_sql_transaction: a write reached a standby or a demoted primary
    },
)
UNAVAILABLE_SQLSTATES: typing.Final = frozenset(
    {
        "57P03",  # cannot_connect_now: starting up, shutting down, in recovery (only sent at connect)
        "53300",  # too_many_connections (only sent at connect)
    },
)
AMBIGUOUS_SQLSTATES: typing.Final = frozenset({"08007"})  # transaction_resolution_unknown
# Class 08 codes that report a lost or failed connection. Not 08P01 (protocol_violation: a client bug
# sends the same bytes again) nor codes this list does not know; 08007 is ambiguous (above).
LOST_CONNECTION_SQLSTATES: typing.Final = frozenset({"08000", "08001", "08003", "08004", "08006"})
PROTOCOL_VIOLATION: typing.Final = "08P01"
_NO_ACTIVE_TRANSACTION: typing.Final = "25P01"
# PgBouncer reports its own conditions as 08P01 with these messages (it has no codes of its own). The
# first group means no server connection could be had, so the work never started.
POOLER_UNAVAILABLE_MESSAGES: typing.Final = (
    "server login has been failing",
    "pgbouncer cannot connect to server",
    "query_wait_timeout",
    "no more connections allowed",
    "server_connect_timeout",
)
POOLER_LOST_MESSAGES: typing.Final = ("server conn crashed", "server shutting down", "pooler is shutting down")
# Messages of driver errors without a SQLSTATE: psycopg's connect failures (also when the server said
# "starting up"), and the ways asyncpg and psycopg report a connection lost under them.
_CONNECT_FAILED_MESSAGES: typing.Final = ("connection failed", "connection timeout expired", "connection is bad")
_LOST_MESSAGES: typing.Final = (
    "connection is closed",
    "connection is lost",
    "server closed the connection",
    "consuming input failed",
    "could not receive data",
    "could not send data",
    "ssl syscall error",
    "ssl connection has been closed",
    "eof detected",
    "no connection to the server",
    "terminating connection",
)

_MAX_CHAIN: typing.Final = 64
RETRIED_KINDS: typing.Final = frozenset({ErrorKind.CONFLICT, ErrorKind.OUTAGE, ErrorKind.UNAVAILABLE})
# A COMMIT that failed with one of these kinds may have been applied: the answer never arrived.
LOST_AT_COMMIT: typing.Final = frozenset({ErrorKind.OUTAGE, ErrorKind.UNAVAILABLE, ErrorKind.AMBIGUOUS})


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE an exception carries itself (asyncpg, psycopg, SQLAlchemy's adapted errors), if any."""
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) and len(code) == 5 else None  # noqa: PLR2004 - SQLSTATEs are 5 chars


def _is_psycopg_operational_error(exc: BaseException) -> bool:
    # By name: psycopg is optional, and its errors arrive raw as well as wrapped by SQLAlchemy.
    return any(f"{cls.__module__}.{cls.__qualname__}" == "psycopg.OperationalError" for cls in type(exc).__mro__)


def _message(exc: BaseException) -> str:
    """What the error says, lowercase; empty if it cannot say (some wrappers' ``__str__`` raise)."""
    try:
        return str(exc).lower()
    except Exception:  # noqa: BLE001 - a broken __str__ must not break the classification
        return ""


def _kind_of_code(code: str, exc: BaseException) -> ErrorKind | None:
    if code in AMBIGUOUS_SQLSTATES:
        return ErrorKind.AMBIGUOUS
    if code in CONFLICT_SQLSTATES:
        return ErrorKind.CONFLICT
    if code in UNAVAILABLE_SQLSTATES:
        return ErrorKind.UNAVAILABLE
    if code in OUTAGE_SQLSTATES or code in LOST_CONNECTION_SQLSTATES:
        return ErrorKind.OUTAGE
    if code == PROTOCOL_VIOLATION:
        message = _message(exc)
        if any(text in message for text in POOLER_UNAVAILABLE_MESSAGES):
            return ErrorKind.UNAVAILABLE
        if any(text in message for text in POOLER_LOST_MESSAGES):
            return ErrorKind.OUTAGE
    return None


def _kind_without_code(exc: BaseException) -> ErrorKind | None:
    """Driver errors that carry no SQLSTATE, classified by their type and what they say."""
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        return ErrorKind.UNAVAILABLE  # asyncpg's own multi-host connect found no host of the wanted role (yet)
    if isinstance(exc, asyncpg.InternalClientError):
        return ErrorKind.OUTAGE  # the protocol state machine broke ("cannot switch to state"): connection unusable
    if isinstance(exc, asyncpg.InterfaceError):
        return ErrorKind.OUTAGE if "connection is closed" in _message(exc) else None
    if _is_psycopg_operational_error(exc):
        message = _message(exc)
        if message.startswith(_CONNECT_FAILED_MESSAGES) or type(exc).__name__ == "ConnectionTimeout":
            return ErrorKind.UNAVAILABLE  # raised by connect: the work never started
        if any(text in message for text in _LOST_MESSAGES):
            return ErrorKind.OUTAGE
    return None


def leaves_connection_unusable(exc: BaseException) -> bool:
    """Whether a driver error says its connection is in a state no later transaction on it can leave.

    asyncpg's protocol state machine broke (``cannot switch to state``), or asyncpg still holds a
    transaction whose ``BEGIN`` failed: every later ``BEGIN`` on that connection becomes a ``SAVEPOINT``
    (``25P01`` outside a transaction block) or is refused as a nested transaction.
    """
    for link in _chain(exc):
        if isinstance(link, asyncpg.InternalClientError) and not isinstance(
            link, asyncpg.TargetServerAttributeNotMatched
        ):
            return True
        if isinstance(link, asyncpg.InterfaceError) and "nested transaction has a different" in _message(link):
            return True
        if sqlstate_of(link) == _NO_ACTIVE_TRANSACTION and "savepoint can only be used" in _message(link):
            return True
    return False


def _kind_of_link(exc: BaseException) -> tuple[ErrorKind | None, bool]:
    """The kind one link reports, and whether it says so itself (a code, a type) or only by a flag."""
    if hasattr(exc, "db_retry_kind"):  # this package's own errors, or what db_retry.engine learned of one
        own: ErrorKind | None = exc.db_retry_kind
        return own, True
    code = sqlstate_of(exc)
    if code is not None:
        return _kind_of_code(code, exc), True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        # Only a flag: a link below it (the driver's error) usually says more, e.g. PgBouncer's 08P01.
        return ErrorKind.OUTAGE, False
    if isinstance(exc, ConnectionError):
        # A bare socket error only reaches us from connecting (refused, reset during the handshake):
        # once connected, the drivers report a lost connection as class 08 or an invalidated connection.
        return ErrorKind.UNAVAILABLE, True
    kind = _kind_without_code(exc)
    return kind, kind is not None


def _chain(exc: BaseException) -> typing.Iterator[BaseException]:
    """``exc`` and every exception on its ``__cause__``/``__context__`` chain, each once (cycle-safe)."""
    seen: set[int] = set()
    pending = [exc]
    while pending and len(seen) < _MAX_CHAIN:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = (current.__context__, getattr(current, "orig", None), current.__cause__)
        pending.extend(link for link in linked if isinstance(link, BaseException))


def sqlstate_on_chain(exc: BaseException) -> str | None:
    """The first SQLSTATE found on ``exc``'s chain (outermost first), if any."""
    return next((code for link in _chain(exc) if (code := sqlstate_of(link)) is not None), None)


def classify(exc: BaseException) -> ErrorKind | None:
    """The kind of failure ``exc`` reports, or ``None`` if it is not transient.

    An ambiguous commit anywhere on the chain wins over everything else (retrying it could apply
    the work twice); otherwise the outermost link that says what happened (a SQLSTATE, a driver's
    error type, this package's own errors) decides, and SQLAlchemy's ``connection_invalidated`` flag
    only when no link does.
    """
    said: ErrorKind | None = None
    flagged: ErrorKind | None = None
    for link in _chain(exc):
        kind, itself = _kind_of_link(link)
        if kind is ErrorKind.AMBIGUOUS:
            return kind
        if itself and said is None:
            said = kind
        elif not itself and flagged is None:
            flagged = kind
    return said if said is not None else flagged


def is_retriable(exc: BaseException) -> bool:
    """Whether retrying the whole unit of work that raised ``exc`` can succeed and is safe."""
    return classify(exc) in RETRIED_KINDS
