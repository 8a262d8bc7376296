"""Engine-level behaviour: what db-retry adds to every SQLAlchemy engine, through SQLAlchemy's public events.

Importing :mod:`db_retry` installs these listeners on :class:`sqlalchemy.engine.Engine` itself, so they
apply to every engine (sync or async, asyncpg or psycopg, any pool) whichever way the work commits:
``Connection.commit()``, ``async with engine.begin()``, ``Session.commit()``, ``async with
session.begin()`` or :class:`db_retry.Transaction`. All of them end in ``Connection._commit_impl``,
which fires the ``commit`` event and routes a failure through ``handle_error``.

- **A lost COMMIT** (the connection or the server went away while ``COMMIT`` was in flight) becomes
  :class:`CommitOutcomeUnknownError`: the transaction may or may not be committed, so it is not retried
  unless the call site opts in. A COMMIT that the server refused (``40001`` at commit, a deferred
  constraint) is a definite failure and keeps its error.
- **A node-role error** (``25006``: a write reached a read-only node, e.g. a demoted primary behind a
  DSN, DNS name or VIP that moved) counts as a disconnect: SQLAlchemy invalidates that connection and
  the pool's other connections of the same age, so the next checkout connects afresh (to the new
  primary, with the read-write factory) instead of going back to the read-only node. No round trip is
  added at checkout.
- **A connection the driver left unusable** without a SQLSTATE (asyncpg's protocol state errors) is
  treated as a disconnect too.
- **A server error that aborts the transaction** is remembered per (sub)transaction, so
  :class:`db_retry.Transaction` can tell without a round trip that it must roll back first.

``architecture/engine.md`` has the reasons.
"""

import typing
import weakref

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine.interfaces import ExceptionContext

from db_retry.retriable import (
    LOST_AT_COMMIT,
    ErrorKind,
    classify,
    leaves_connection_unusable,
    sqlstate_on_chain,
)


FAILED_IN: typing.Final = "db_retry_failed_transaction"
_COMMITTING: typing.Final = "db_retry_committing"
READ_ONLY_SQLSTATE: typing.Final = "25006"


class CommitOutcomeUnknownError(sa.exc.OperationalError):
    """The connection was lost while ``COMMIT`` was in flight: the work may or may not be committed.

    Raised wherever the commit happens (``Connection``/``Session`` ``commit()`` and ``begin()`` blocks,
    :meth:`db_retry.Transaction.commit`). :func:`db_retry.postgres_retry` does not retry it (retrying
    could apply the work twice) unless the call site says ``retry_ambiguous_commit=True``. The driver's
    own error is ``orig`` and is chained as ``__cause__``.
    """

    db_retry_kind: typing.ClassVar[ErrorKind] = ErrorKind.AMBIGUOUS

    def __str__(self) -> str:
        return (
            "the connection was lost while COMMIT was in flight; the transaction may or may not have been "
            f"committed: {super().__str__()}"
        )


@event.listens_for(sa.engine.Engine, "commit")
def _note_commit(connection: sa.Connection) -> None:
    """Mark the connection as committing: a failure before the next ``begin``/``rollback`` is the COMMIT's."""
    connection.info[_COMMITTING] = True


@event.listens_for(sa.engine.Engine, "begin")
@event.listens_for(sa.engine.Engine, "rollback")
def _clear_commit(connection: sa.Connection) -> None:
    if not connection.invalidated:  # ``info`` of an invalidated connection would try to reconnect
        connection.info.pop(_COMMITTING, None)


def _commit_was_lost(context: ExceptionContext) -> bool:
    error = context.original_exception
    return context.is_disconnect or isinstance(error, TimeoutError) or classify(error) in LOST_AT_COMMIT


@event.listens_for(sa.engine.Engine, "handle_error")
def _on_error(context: ExceptionContext) -> BaseException | None:
    connection = context.connection
    error = context.original_exception
    if connection is None or connection.invalidated or not isinstance(error, Exception):
        # A failed connect (the factory reports those), a connection already known dead (its ``info``
        # would try to reconnect), or the caller's own cancellation.
        return None
    # SQLAlchemy passes no statement for COMMIT (nor for BEGIN/ROLLBACK, whose events clear the mark).
    if connection.info.pop(_COMMITTING, False) and context.statement is None:
        if not _commit_was_lost(context):
            return None  # the server answered: the COMMIT definitely failed
        return CommitOutcomeUnknownError(
            "COMMIT",
            None,
            error,
            hide_parameters=True,
            connection_invalidated=context.is_disconnect,
        )
    code = sqlstate_on_chain(error)
    if code == READ_ONLY_SQLSTATE or (code is None and leaves_connection_unusable(error)):
        context.is_disconnect = True  # invalidates this connection and refreshes the pool
        return None
    if context.is_disconnect or code is None:
        return None
    transaction = connection.get_nested_transaction() or connection.get_transaction()
    if transaction is not None:  # pragma: no branch - SQLAlchemy begins one before any statement runs
        connection.info[FAILED_IN] = weakref.ref(transaction)
    return None
