"""``Transaction``: a unit of work on an ``AsyncSession`` that is kept only if it commits.

Entry rolls back a session transaction that cannot continue: inactive after a failed flush, on a
connection SQLAlchemy invalidated, or aborted on the server by a failed statement (``25P02`` on
everything that follows). The last is noticed without a round trip: the ``handle_error`` listener of
:mod:`db_retry.engine` remembers which transaction a server error hit. A connection lost while
``COMMIT`` was in flight raises :class:`CommitOutcomeUnknownError` (also from :mod:`db_retry.engine`,
for every way of committing). Joining an open transaction at another isolation level is refused.
"""

import dataclasses
import logging
import types
import typing

import sqlalchemy as sa
from sqlalchemy import orm as sa_orm
from sqlalchemy.engine.interfaces import IsolationLevel
from sqlalchemy.ext import asyncio as sa_async

from db_retry.engine import CommitOutcomeUnknownError, transaction_failed


__all__ = ["CommitOutcomeUnknownError", "Transaction", "cannot_continue"]

logger = logging.getLogger("db_retry.transaction")


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


def cannot_continue(
    owner: sa_async.AsyncSession | sa_orm.Session | sa_async.AsyncConnection | sa.Connection,
) -> bool:
    """Whether the open transaction of a session or a connection can only be rolled back (``False`` if none is open)."""
    if isinstance(owner, (sa_async.AsyncConnection, sa.Connection)):
        connection = owner.sync_connection if isinstance(owner, sa_async.AsyncConnection) else owner
        begun = connection.get_transaction() if connection is not None else None
        if connection is None or begun is None:
            return False
        return not begun.is_active or connection.invalidated or transaction_failed(connection)
    sync_session = owner.sync_session if isinstance(owner, sa_async.AsyncSession) else owner
    transaction = sync_session.get_transaction()
    if transaction is None:
        return False
    if not transaction.is_active:
        return True
    return any(connection.invalidated or transaction_failed(connection) for connection in _held_connections(owner))


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
        if self.isolation_level and not self._joins_at_the_same_level():
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
        """Flush, then commit; a connection lost during ``COMMIT`` raises :class:`CommitOutcomeUnknownError`.

        The engine-level listeners of :mod:`db_retry.engine` raise it, as for every other way to commit.
        """
        await self.session.flush()  # a failure here happens before COMMIT is sent: nothing was committed
        await self.session.commit()

    def _joins_at_the_same_level(self) -> bool:
        """Whether the session already holds a connection at the wanted level; another level is refused.

        The level of a transaction that has begun cannot change: joining it would silently run the block
        at the old level.
        """
        held = _held_connections(self.session)
        for connection in held:
            options = connection.get_execution_options()
            current = options.get("isolation_level") or connection.dialect.default_isolation_level
            if str(current).upper() != str(self.isolation_level).upper():
                msg = (
                    f"Transaction(isolation_level={self.isolation_level!r}) cannot join the session's open "
                    f"transaction, which already runs at {current!r}; commit or roll it back first, or use a "
                    "new session"
                )
                raise ValueError(msg)
        return bool(held)

    async def rollback(self) -> None:
        await self.session.rollback()
