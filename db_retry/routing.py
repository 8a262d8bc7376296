"""Read/write routing: reads to a healthy replica, writes and read-your-writes to the primary.

``RoutingSessionMaker(primary, replicas)`` is an ``async_sessionmaker`` whose sessions run on
:class:`RoutingSession`, a ``Session`` that chooses the engine per statement in ``get_bind()``
from the statement object itself (never from SQL text). Replica health (reachable, replay lag)
comes from a background check, so routing adds no round trip. ``architecture/routing.md`` has
the rules.
"""

import asyncio
import collections.abc
import dataclasses
import itertools
import logging
import time
import types
import typing

import sqlalchemy as sa
from sqlalchemy import event, orm
from sqlalchemy.ext import asyncio as sa_async

from db_retry.dsn import dsn_hosts
from db_retry.replication import WAL_STATUS_QUERY, ReplayLag, WalStatus, replay_lag
from db_retry.validation import check_number, describe_error


__all__ = [
    "READ",
    "USE_PRIMARY",
    "ReplicaStatus",
    "RoutingSession",
    "RoutingSessionMaker",
]

logger = logging.getLogger("db_retry.routing")

USE_PRIMARY: typing.Final = "db_retry_use_primary"
"""Execution option (or bind argument): run this statement on the primary; it does not count as a write."""
READ: typing.Final = "db_retry_read"
"""Execution option (or bind argument): ``True`` marks a statement a read (e.g. a ``text()`` SELECT),
``False`` a write (e.g. a SELECT calling a function that writes)."""

DEFAULT_CHECK_INTERVAL: typing.Final = 1.0
DEFAULT_CHECK_TIMEOUT: typing.Final = 2.0
_TASK_NAME: typing.Final = "db-retry replica checks"
_NOT_CHECKED: typing.Final = "not checked yet"

# The one query of a check, on each replica and on the primary (see db_retry.replication).
_CHECK_QUERY: typing.Final = sa.text(WAL_STATUS_QUERY)
_REPLACED_OPTIONS: typing.Final = {
    "max_unreplayed_bytes": "max_lag_bytes (WAL the primary wrote that the replica has not replayed)",
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaStatus:
    """What the last check of a replica found; ``healthy`` replicas serve reads.

    ``reachable`` is ``None`` before the first check. ``in_recovery``: the server is a standby (``False``:
    promoted, or not a standby at all). ``streaming``: its WAL receiver streams from upstream (``None``
    when the check's role may not see the receiver's state; see ``architecture/routing.md``).
    ``lag`` (seconds) and ``lag_bytes`` are the replay lag behind the primary's current WAL position
    (:func:`db_retry.replication.replay_lag`), ``None`` when unknown (no primary position, not a standby).
    ``unreplayed_bytes`` counts WAL received but not yet replayed. ``checked_at`` is a
    ``time.monotonic()`` reading. ``reason`` says why an unhealthy replica is skipped.
    """

    name: str
    healthy: bool = False
    reachable: bool | None = None
    in_recovery: bool | None = None
    streaming: bool | None = None
    lag: float | None = None
    lag_bytes: int | None = None
    unreplayed_bytes: int | None = None
    checked_at: float | None = None
    reason: str | None = _NOT_CHECKED


@dataclasses.dataclass(eq=False, slots=True, kw_only=True)
class _Replica:
    name: str
    engine: sa_async.AsyncEngine
    # The checks use a pool of their own (same connect arguments), so a busy application pool cannot
    # delay them and make a healthy replica look dead.
    check_engine: sa_async.AsyncEngine
    status: ReplicaStatus


class _Router:
    """The replicas of one ``RoutingSessionMaker`` and which of them serve reads now."""

    def __init__(self, primary: sa.Engine) -> None:
        self.primary = primary
        self.replicas: dict[str, _Replica] = {}
        self.healthy: tuple[_Replica, ...] = ()
        self._turn = itertools.count()

    def __repr__(self) -> str:
        return f"<replicas {sorted(self.replicas)}>"

    def update(self) -> None:
        self.healthy = tuple(replica for replica in self.replicas.values() if replica.status.healthy)

    def pick(self) -> _Replica | None:
        """The next healthy replica in turn, or ``None`` when there is none."""
        healthy = self.healthy
        if not healthy:
            return None
        return healthy[next(self._turn) % len(healthy)]


# Timed-out checks still unwinding (closing their connection); kept so that they are not collected early.
_UNWINDING: set[asyncio.Future[WalStatus]] = set()


def _forget_unwound(task: "asyncio.Future[WalStatus]") -> None:
    _UNWINDING.discard(task)
    _ = task.cancelled() or task.exception()  # retrieved: a failure while unwinding is of no interest now


def _has_row_lock(statement: object) -> bool:
    """Whether a SELECT locks rows (``FOR UPDATE`` / ``FOR SHARE``), which a standby refuses.

    SQLAlchemy keeps the locking clause in the private ``_for_update_arg`` with no public accessor;
    this is the one place that reads it (tests route a ``with_for_update()`` read and fail if it moves).
    """
    return getattr(statement, "_for_update_arg", None) is not None


def _is_read(statement: object) -> bool:
    """A SELECT built with SQLAlchemy that locks no rows. ``text()``, DML, DDL and the rest are writes."""
    return (
        bool(getattr(statement, "is_select", False))
        and not getattr(statement, "is_text", False)
        and not _has_row_lock(statement)
    )


class RoutingSession(orm.Session):
    """A ``Session`` whose ``get_bind()`` sends reads to a replica and everything else to the primary.

    Made by :class:`RoutingSessionMaker` (as the ``sync_session_class`` of its ``AsyncSession``s).
    After the first write of a transaction, every statement of that transaction runs on the primary;
    the next transaction starts over. Set ``use_primary`` (``maker(use_primary=True)``, or
    ``session.sync_session.use_primary = True``) to run all of a session's statements on the primary.
    """

    def __init__(self, *, router: _Router, use_primary: bool = False, **options: typing.Any) -> None:  # noqa: ANN401 - Session's own options
        super().__init__(**options)
        self.use_primary = use_primary
        self._router = router
        self._wrote = False
        self._replica: _Replica | None = None

    def get_bind(
        self,
        mapper: typing.Any = None,  # noqa: ANN401 - Session.get_bind's signature
        *,
        clause: sa.ClauseElement | None = None,
        bind: sa.Engine | sa.Connection | None = None,
        **kw: typing.Any,  # noqa: ANN401 - Session.get_bind's signature
    ) -> sa.Engine | sa.Connection:
        if bind is not None:  # the caller chose (bind_arguments={"bind": ...})
            return bind
        primary = self._router.primary
        if clause is None:
            if mapper is not None:  # the ORM writing objects: a flush or a bulk operation
                self._wrote = True
            return primary  # else session.connection() (see there) or a caller asking for the dialect
        read = kw.get(READ)
        if not (_is_read(clause) if read is None else read):
            self._wrote = True
            return primary
        if self._wrote or self.use_primary or kw.get(USE_PRIMARY):
            return primary
        replica = self._replica
        if replica is None or replica not in self._router.healthy:
            # One replica per transaction (one snapshot, one connection) while it stays healthy.
            replica = self._replica = self._router.pick()
        return primary if replica is None else replica.engine.sync_engine

    def connection(
        self,
        bind_arguments: dict[str, typing.Any] | None = None,
        execution_options: typing.Mapping[str, typing.Any] | None = None,
    ) -> sa.Connection:
        """The transaction's connection; one on the primary pins the rest of the transaction there.

        Anything may run on a connection handed out (a write, ``SET TRANSACTION ISOLATION LEVEL``),
        so later statements of the transaction follow it to the primary.
        """
        connection = super().connection(bind_arguments, execution_options)
        if connection.engine is self._router.primary:
            self._wrote = True
        return connection


@event.listens_for(RoutingSession, "do_orm_execute")
def _carry_routing_options(state: orm.ORMExecuteState) -> None:
    """Hand the routing execution options to ``get_bind()``, which sees only the bind arguments.

    A load of an existing object's expired or refreshed attributes goes to the primary: it is asked
    for the object's latest state, which a replica may not have replayed yet.
    """
    options = state.execution_options
    if state.is_column_load or options.get(USE_PRIMARY):
        state.bind_arguments[USE_PRIMARY] = True
    if READ in options:
        state.bind_arguments[READ] = options[READ]


@event.listens_for(RoutingSession, "after_transaction_end")
def _transaction_ended(session: RoutingSession, transaction: orm.SessionTransaction) -> None:
    if transaction.parent is None:
        session._wrote = False  # noqa: SLF001 - the session's own state, reset by its own listener
        session._replica = None  # noqa: SLF001


def _default_name(engine: sa_async.AsyncEngine) -> str:
    hosts = dsn_hosts(engine.url)
    return ",".join(str(host) for host in hosts) if hosts else engine.url.render_as_string(hide_password=True)


def _log_fields(status: ReplicaStatus) -> dict[str, object]:
    return {"db_retry_replica": status.name, "db_retry_healthy": status.healthy, "db_retry_reason": status.reason}


def _require_async_engine(what: str, engine: object) -> None:
    if not isinstance(engine, sa_async.AsyncEngine):
        msg = f"{what} must be an AsyncEngine (create_async_engine), got {type(engine).__name__}"
        raise TypeError(msg)


class RoutingSessionMaker(sa_async.async_sessionmaker[sa_async.AsyncSession]):
    """An ``async_sessionmaker`` whose sessions read from healthy replicas and write to the primary.

    ``replicas`` is a sequence of engines (named ``host:port``) or a mapping of names to engines.
    A replica is healthy when its last check reached it, found it in recovery (a standby, not
    promoted) with its WAL receiver streaming and, if ``max_lag`` (seconds) or ``max_lag_bytes`` is
    set, its replay lag behind the primary's WAL position within the bound. Checks run every
    ``check_interval`` seconds in a background task from the first session made (``None``: only
    :meth:`refresh` checks), one query on each replica and one on the primary, each bounded by
    ``check_timeout``. Until its first check a replica serves no reads; with no healthy replica, reads
    go to the primary. Call :meth:`close` (or use ``async with``) to stop the checks. The engines stay
    the caller's to dispose, except that a replica found unreachable or promoted gets its pool
    disposed, so no connection to that server process is reused.
    Other keyword arguments are ``AsyncSession`` options (``expire_on_commit``, ``class_``, ...).
    """

    def __init__(  # noqa: PLR0913 - every tuning knob is keyword-only and optional
        self,
        primary: sa_async.AsyncEngine,
        replicas: collections.abc.Iterable[sa_async.AsyncEngine]
        | collections.abc.Mapping[str, sa_async.AsyncEngine] = (),
        *,
        max_lag: float | None = None,
        max_lag_bytes: int | None = None,
        check_interval: float | None = DEFAULT_CHECK_INTERVAL,
        check_timeout: float = DEFAULT_CHECK_TIMEOUT,
        **session_options: typing.Any,  # noqa: ANN401 - AsyncSession's own options
    ) -> None:
        _require_async_engine("primary", primary)
        replaced = sorted(set(_REPLACED_OPTIONS).intersection(session_options))
        if replaced:
            msg = "; ".join(f"{option} was replaced by {_REPLACED_OPTIONS[option]}" for option in replaced)
            raise TypeError(msg)
        check_number("max_lag", max_lag, inclusive=True, allow_none=True)
        check_number("max_lag_bytes", max_lag_bytes, inclusive=True, allow_none=True)
        check_number("check_interval", check_interval, allow_none=True)
        check_number("check_timeout", check_timeout)
        chosen = sorted({"bind", "binds", "sync_session_class", "router"}.intersection(session_options))
        if chosen:
            msg = f"RoutingSessionMaker sets {', '.join(chosen)} itself"
            raise TypeError(msg)
        self._primary = primary
        self._primary_check_engine = _check_engine_for(primary)
        self._router = _Router(primary.sync_engine)
        self._max_lag = max_lag
        self._max_lag_bytes = max_lag_bytes
        self._check_interval = check_interval
        self._check_timeout = check_timeout
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        super().__init__(primary, sync_session_class=RoutingSession, router=self._router, **session_options)
        named = replicas.items() if isinstance(replicas, collections.abc.Mapping) else ((None, e) for e in replicas)
        for name, engine in named:
            self._register(engine, name)

    def __call__(self, *, use_primary: bool = False, **local_kw: typing.Any) -> sa_async.AsyncSession:  # noqa: ANN401 - AsyncSession's own options
        """A new ``AsyncSession``; ``use_primary=True`` runs all its statements on the primary."""
        self._start_checks()
        return super().__call__(use_primary=use_primary, **local_kw)

    @property
    def primary(self) -> sa_async.AsyncEngine:
        return self._primary

    @property
    def replicas(self) -> collections.abc.Mapping[str, ReplicaStatus]:
        """The status of every replica by name, as of its last check."""
        return types.MappingProxyType({name: replica.status for name, replica in self._router.replicas.items()})

    # -- replicas at run time ------------------------------------------------------------------
    def _register(self, engine: sa_async.AsyncEngine, name: str | None) -> _Replica:
        _require_async_engine("a replica", engine)
        name = _default_name(engine) if name is None else name
        if name in self._router.replicas:
            msg = f"a replica named {name!r} is already routed to; pass another name="
            raise ValueError(msg)
        check_engine = _check_engine_for(engine)
        replica = _Replica(name=name, engine=engine, check_engine=check_engine, status=ReplicaStatus(name=name))
        self._router.replicas[name] = replica
        return replica

    async def add_replica(self, engine: sa_async.AsyncEngine, *, name: str | None = None) -> ReplicaStatus:
        """Route reads to ``engine`` too, once a check (run now) finds it healthy; returns that status."""
        replica = self._register(engine, name)
        await self._check([replica])
        return replica.status

    async def remove_replica(self, name: str) -> None:
        """Stop routing to the replica ``name`` (a transaction reading from it moves on at its next read).

        The engine itself is left open for its owner to dispose.
        """
        replica = self._router.replicas.pop(name, None)
        if replica is None:
            msg = f"no replica named {name!r}; known: {sorted(self._router.replicas)}"
            raise KeyError(msg)
        self._router.update()
        await replica.check_engine.dispose()

    # -- health checks ---------------------------------------------------------------------------
    async def refresh(self) -> collections.abc.Mapping[str, ReplicaStatus]:
        """Check every replica now (concurrently, with the primary's WAL position) and return the statuses."""
        await self._check(list(self._router.replicas.values()))
        return self.replicas

    async def _check(self, replicas: collections.abc.Sequence[_Replica]) -> None:
        """One query on the primary and one on each of ``replicas``, all at once; apply the statuses."""
        if not replicas:
            return  # nothing to compare with the primary's position: no query
        primary, *answers = await asyncio.gather(
            self._read(self._primary_check_engine),
            *(self._read(replica.check_engine) for replica in replicas),
        )
        # How an unknown lag is shown: with the reason when the primary's position is what is missing.
        if isinstance(primary, str):
            position, unknown = None, f"unknown (primary unreachable: {primary})"
        elif primary.written is None:
            position, unknown = None, "unknown (primary engine reaches a server in recovery)"
        else:
            position, unknown = primary.written, "unknown"
        for replica, answer in zip(replicas, answers, strict=True):
            await self._apply(replica, self._status(replica.name, answer, position, unknown))

    async def _read(self, engine: sa_async.AsyncEngine) -> WalStatus | str:
        """The server's WAL status, or why it could not be read; never raises (but lets cancellation through).

        The query runs in a task of its own: past ``check_timeout`` it is cancelled and left to unwind
        in the background, since closing a connection to a server that hangs can itself hang (SQLAlchemy
        2.0 closes gracefully), and the check must not wait for that.
        """
        query = asyncio.ensure_future(_query(engine))
        try:
            done, _ = await asyncio.wait({query}, timeout=self._check_timeout)
        except asyncio.CancelledError:
            query.cancel()
            raise
        if not done:
            query.cancel()
            _UNWINDING.add(query)
            query.add_done_callback(_forget_unwound)
            return describe_error(TimeoutError(), timeout=self._check_timeout)
        try:
            return query.result()
        except Exception as exc:  # noqa: BLE001 - whatever failed, reads must not go there
            return describe_error(exc, timeout=self._check_timeout, password=engine.url.password)

    def _status(self, name: str, answer: WalStatus | str, position: int | None, unknown: str) -> ReplicaStatus:
        """A replica's status from its answer (or why it gave none) and the primary's WAL position."""
        if isinstance(answer, str):
            return ReplicaStatus(
                name=name, reachable=False, checked_at=time.monotonic(), reason=f"unreachable: {answer}"
            )
        lag = replay_lag(position, answer)
        reason = self._unhealthy(answer, lag, unknown)
        return ReplicaStatus(
            name=name,
            healthy=reason is None,
            reachable=True,
            in_recovery=answer.in_recovery,
            streaming=answer.streaming,
            lag=lag.seconds,
            lag_bytes=lag.bytes,
            unreplayed_bytes=answer.unreplayed_bytes,
            checked_at=time.monotonic(),
            reason=reason,
        )

    def _unhealthy(self, answer: WalStatus, lag: ReplayLag, unknown: str) -> str | None:
        """Why a replica that answered must not serve reads, or ``None``."""
        if not answer.in_recovery:
            return "not in recovery: promoted, or not a standby"
        if answer.streaming is False:
            state = answer.receiver_state
            return "not streaming: " + ("no WAL receiver" if state is None else f"WAL receiver {state}")
        if self._max_lag is not None and (lag.seconds is None or lag.seconds > self._max_lag):
            shown = unknown if lag.seconds is None else f"{lag.seconds:.3f}s"
            return f"replay lag {shown} exceeds max_lag={self._max_lag}s"
        if self._max_lag_bytes is not None and (lag.bytes is None or lag.bytes > self._max_lag_bytes):
            shown = unknown if lag.bytes is None else str(lag.bytes)
            return f"{shown} bytes behind the primary exceeds max_lag_bytes={self._max_lag_bytes}"
        return None

    async def _apply(self, replica: _Replica, status: ReplicaStatus) -> None:
        if self._router.replicas.get(replica.name) is not replica:
            return  # removed while it was being checked
        before, replica.status = replica.status, status
        self._router.update()
        if status.healthy != before.healthy:
            if status.healthy:
                logger.info("replica %s serves reads", replica.name, extra=_log_fields(status))
            else:
                logger.warning(
                    "replica %s skipped: %s",
                    replica.name,
                    status.reason,
                    extra=_log_fields(status),
                )
        if _gone(status) and not _gone(before):
            # Its pooled connections died with the server (or soon will), or reach a promoted server,
            # which becomes a standby again only through a restart.
            await replica.engine.dispose()

    def _start_checks(self) -> None:
        if self._check_interval is None or self._closed or (self._task is not None and not self._task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a session made outside the event loop: checks start with one made inside it
            return
        self._task = loop.create_task(self._check_forever(self._check_interval), name=_TASK_NAME)

    async def _check_forever(self, interval: float) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Stop the background checks and close the check connections.

        Sessions can still be made; they route by the last statuses (:meth:`refresh` still checks).
        """
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        for replica in list(self._router.replicas.values()):
            await replica.check_engine.dispose()
        await self._primary_check_engine.dispose()

    async def __aenter__(self) -> typing.Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        await self.close()


def _check_engine_for(engine: sa_async.AsyncEngine) -> sa_async.AsyncEngine:
    """An autocommit engine for the checks over ``Pool.recreate()``: own pool, same connect arguments and hooks."""
    pool = engine.sync_engine.pool.recreate()
    return sa_async.create_async_engine(engine.url, pool=pool, isolation_level="AUTOCOMMIT")


def _gone(status: ReplicaStatus) -> bool:
    """Whether the server a replica's pool connected to is gone: unreachable, or promoted."""
    return status.reachable is False or status.in_recovery is False


async def _query(engine: sa_async.AsyncEngine) -> WalStatus:
    try:
        return await _run_check_query(engine)
    except sa.exc.DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    # The pooled check connection died while idle (the server restarted): one try on a new one.
    return await _run_check_query(engine)


async def _run_check_query(engine: sa_async.AsyncEngine) -> WalStatus:
    async with engine.connect() as connection:
        return WalStatus.from_row((await connection.execute(_CHECK_QUERY)).one())
