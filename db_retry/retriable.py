"""Which database errors are transient: a pure decision over an exception's cause chain.

The decision works from SQLSTATE codes (``exc.sqlstate`` on asyncpg, psycopg and SQLAlchemy's
adapted asyncpg errors), from SQLAlchemy's ``connection_invalidated`` flag and from the socket
errors raised while connecting, so it does not depend on one SQLAlchemy version's wrapper types.
``architecture/retriable.md`` has the table of codes and the reasons.
"""

import enum
import typing

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
CONNECTION_EXCEPTION_CLASS: typing.Final = "08"

_MAX_CHAIN: typing.Final = 64
RETRIED_KINDS: typing.Final = frozenset({ErrorKind.CONFLICT, ErrorKind.OUTAGE, ErrorKind.UNAVAILABLE})


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE an exception carries itself (asyncpg, psycopg, SQLAlchemy's adapted errors), if any."""
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) and len(code) == 5 else None  # noqa: PLR2004 - SQLSTATEs are 5 chars


def _kind_of_link(exc: BaseException) -> ErrorKind | None:
    own: ErrorKind | None = getattr(exc, "db_retry_kind", None)  # set by this package's own errors
    if own is not None:
        return own
    code = sqlstate_of(exc)
    if code is not None:
        if code in AMBIGUOUS_SQLSTATES:
            return ErrorKind.AMBIGUOUS
        if code in CONFLICT_SQLSTATES:
            return ErrorKind.CONFLICT
        if code in UNAVAILABLE_SQLSTATES:
            return ErrorKind.UNAVAILABLE
        if code in OUTAGE_SQLSTATES or code.startswith(CONNECTION_EXCEPTION_CLASS):
            return ErrorKind.OUTAGE
        return None
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return ErrorKind.OUTAGE
    if isinstance(exc, ConnectionError):
        # A bare socket error only reaches us from connecting (refused, reset during the handshake):
        # once connected, the drivers report a lost connection as class 08 or an invalidated connection.
        return ErrorKind.UNAVAILABLE
    return None


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
    the work twice); otherwise the outermost transient link decides.
    """
    found: ErrorKind | None = None
    for link in _chain(exc):
        kind = _kind_of_link(link)
        if kind is ErrorKind.AMBIGUOUS:
            return kind
        if found is None:
            found = kind
    return found


def is_retriable(exc: BaseException) -> bool:
    """Whether retrying the whole unit of work that raised ``exc`` can succeed and is safe."""
    return classify(exc) in RETRIED_KINDS
