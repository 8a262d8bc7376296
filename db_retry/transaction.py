"""``Transaction``: a unit of work on an ``AsyncSession`` that is kept only if it commits.

Entry rolls back a session transaction that cannot continue: inactive after a failed flush, on a
connection SQLAlchemy invalidated, or aborted on the server by a failed statement (``25P02`` on
everything that follows). The last is noticed without a round trip: a ``handle_error`` listener
remembers which transaction a server error hit. ``commit()`` turns a connection lost while
``COMMIT`` was in flight into :class:`CommitOutcomeUnknownError`.
"""

import dataclasses
import logging
import types
import typing
import weakref

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import orm as sa_orm
from sqlalchemy.engine.interfaces import ExceptionContext, IsolationLevel
from sqlalchemy.ext import asyncio as sa_async

from db_retry.retriable import ErrorKind, classify, sqlstate_on_chain


logger = logging.getLogger("db_retry.transaction")
_FAILED_IN: typing.Final = "db_retry_failed_transaction"
_LOST_AT_COMMIT: typing.Final = frozenset({ErrorKind.OUTAGE, ErrorKind.UNAVAILABLE, ErrorKind.AMBIGUOUS})


class CommitOutcomeUnknownError(sa.exc.OperationalError):
    """The connection was lost while ``COMMIT`` was in flight: the work may or may not be committed.

    ``postgres_retry`` does not retry it (retrying could apply the work twice) unless the call site
    says ``retry_ambiguous_commit=True``. The original error is chained as ``__cause__``.
    """

    db_retry_kind: typing.ClassVar[ErrorKind] = ErrorKind.AMBIGUOUS


@event.listens_for(sa.engine.Engine, "handle_error")
def _remember_failed_transaction(context: ExceptionContext) -> None:
    """Note the (sub)transaction a server-reported error aborted, so ``Transaction`` can tell later."""
    connection = context.connection
    if connection is None or context.is_disconnect or sqlstate_on_chain(context.original_exception) is None:
        return
    transaction = connection.get_nested_transaction() or connection.get_transaction()
    if transaction is not None:  # pragma: no branch - SQLAlchemy begins one before any statement runs
        connection.info[_FAILED_IN] = weakref.ref(transaction)


def _held_connections(session: sa_async.AsyncSession | sa_orm.Session) -> list[sa.Connection]:
    """The connections the session's transaction already holds.

    SQLAlchemy has no public accessor for them; this is the one place that reads the private
    ``SessionTransaction._connections`` (a test fails loudly if that ever changes).
    """
    sync_session = session.sync_session if isinstance(session, sa_async.AsyncSession) else session
    transaction = sync_session.get_transaction()
    held: typing.Mapping[object, tuple[typing.Any, ...]] = getattr(transaction, "_connections", {})
    unique = {id(entry[0]): entry[0] for entry in held.values()}  # keyed by engine and by connection: dedupe
    return list(unique.values())


def _is_aborted(connection: sa.Connection) -> bool:
    reference = connection.info.get(_FAILED_IN)
    failed = reference() if reference is not None else None
    current = connection.get_nested_transaction() or connection.get_transaction()
    return failed is not None and failed is current and current.is_active


def cannot_continue(
    owner: sa_async.AsyncSession | sa_orm.Session | sa_async.AsyncConnection | sa.Connection,
) -> bool:
    """Whether the open transaction of a session or a connection can only be rolled back (``False`` if none is open)."""
    if isinstance(owner, (sa_async.AsyncConnection, sa.Connection)):
        connection = owner.sync_connection if isinstance(owner, sa_async.AsyncConnection) else owner
        begun = connection.get_transaction() if connection is not None else None
        if connection is None or begun is None:
            return False
        return not begun.is_active or connection.invalidated or _is_aborted(connection)
    sync_session = owner.sync_session if isinstance(owner, sa_async.AsyncSession) else owner
    transaction = sync_session.get_transaction()
    if transaction is None:
        return False
    if not transaction.is_active:
        return True
    return any(connection.invalidated or _is_aborted(connection) for connection in _held_connections(owner))


@dataclasses.dataclass(kw_only=True, frozen=True, slots=True)
class Transaction:
    """Async context manager: begin (or join) a transaction on ``session``; keep it only if ``commit()`` runs.

    On exit, what was not committed is rolled back and the session is closed; the exception that
    ended the block, if any, always propagates.
    """

    session: sa_async.AsyncSession
    isolation_level: IsolationLevel | None = None

    async def __aenter__(self) -> typing.Self:
        if cannot_continue(self.session):
            logger.info("rolling back a session transaction that cannot continue")
            await self.session.rollback()
        if self.isolation_level:
            await self.session.connection(execution_options={"isolation_level": self.isolation_level})
        if not self.session.in_transaction():
            await self.session.begin()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        try:
            if self.session.in_transaction():
                await self.session.rollback()
        except Exception:
            if exc_value is None:
                raise
            # The block already failed (often because the connection died): its error is the one to see.
            logger.debug("rollback after a failed block failed too", exc_info=True)
        finally:
            await self.session.close()

    async def commit(self) -> None:
        """Flush, then commit; a connection lost during ``COMMIT`` raises :class:`CommitOutcomeUnknownError`."""
        await self.session.flush()  # a failure here happens before COMMIT is sent: nothing was committed
        try:
            await self.session.commit()
        except Exception as exc:
            if not isinstance(exc, TimeoutError) and classify(exc) not in _LOST_AT_COMMIT:
                raise
            original = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
            statement = "COMMIT"
            raise CommitOutcomeUnknownError(
                statement,
                None,
                original if isinstance(original, Exception) else exc,
                hide_parameters=True,
            ) from exc

    async def rollback(self) -> None:
        await self.session.rollback()
