"""``build_connection_factory``: asyncpg connections to one of several PostgreSQL hosts.

Each host gets its own connect timeout (as in libpq). Hosts are tried concurrently with a short
stagger, remembered good host first and the rest in random order; the first connection that
satisfies ``target_session_attrs`` wins and every other attempt is cancelled or closed. So one
connect costs about one timeout however many hosts hang. ``architecture/connections.md`` has the
details.
"""

import asyncio
import dataclasses
import logging
import random
import socket
import typing

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from db_retry.dsn import DSNError, HostPort, dsn_hosts, mask_dsn, parse_url
from db_retry.retriable import ErrorKind, classify
from db_retry.validation import check_number, describe_error


if typing.TYPE_CHECKING:
    ConnectionType: typing.TypeAlias = asyncpg.Connection[asyncpg.Record]
else:
    ConnectionType = asyncpg.Connection

logger = logging.getLogger("db_retry.connections")

TARGET_SESSION_ATTRS: typing.Final = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
DEFAULT_STAGGER: typing.Final = 0.05
_TIMEOUT_KEYS: typing.Final = ("timeout", "connect_timeout")
_HOST_KEYS: typing.Final = ("host", "port")
# Options of SQLAlchemy's asyncpg adapter, not of asyncpg.connect: create_async_engine takes them from the
# same URL, so the factory leaves them to it.
_ADAPTER_KEYS: typing.Final = ("prepared_statement_cache_size", "prepared_statement_name_func")
# asyncpg.connect options that must be numbers; a URL query gives them as text.
_INT_KEYS: typing.Final = ("statement_cache_size", "max_cached_statement_lifetime", "max_cacheable_statement_size")
_FLOAT_KEYS: typing.Final = ("command_timeout",)
# getaddrinfo() errors that will not go away by waiting: the name does not exist (a typo, a deleted record).
_LASTING_RESOLVE_ERRORS: typing.Final = frozenset(
    code for name in ("EAI_NONAME", "EAI_NODATA", "EAI_SERVICE") if (code := getattr(socket, name, None)) is not None
)


class NoHostAvailableError(asyncpg.TargetServerAttributeNotMatched):  # type: ignore[misc] # asyncpg is untyped
    """No host gave a connection that satisfies ``target_session_attrs``; each host's reason is kept.

    Subclasses :class:`asyncpg.TargetServerAttributeNotMatched`, what db-retry 0.8.4 raised here.
    """

    def __init__(self, requirement: str, failures: typing.Sequence["HostFailure"]) -> None:
        self.requirement = requirement
        self.failures = tuple(failures)
        reasons = "; ".join(f"{failure.address}: {failure.reason}" for failure in self.failures)
        super().__init__(
            f"no host can serve target_session_attrs={requirement!r} ({len(self.failures)} tried): {reasons}",
        )

    @property
    def db_retry_kind(self) -> ErrorKind | None:
        """Unavailable (worth waiting for) unless some host refused us for a lasting reason (e.g. a password)."""
        if all(failure.transient for failure in self.failures):
            return ErrorKind.UNAVAILABLE
        return None


class ConnectTimeoutError(TimeoutError):
    """Connecting to the DSN's one host timed out (e.g. a proxy that accepts while no server is up).

    A :class:`TimeoutError`, as asyncpg raises; unlike a timeout of a query, worth waiting for: retried
    within ``DB_RETRY_OUTAGE_TIMEOUT`` like a refused connection.
    """

    db_retry_kind: typing.ClassVar[ErrorKind] = ErrorKind.UNAVAILABLE


@dataclasses.dataclass(frozen=True, slots=True)
class HostFailure:
    address: HostPort
    reason: str
    transient: bool
    error: BaseException | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True, slots=True)
class _Role:
    hot_standby: bool
    read_only: bool

    def satisfies(self, requirement: str) -> bool:
        return {
            "any": True,
            "primary": not self.hot_standby,
            "standby": self.hot_standby,
            "prefer-standby": self.hot_standby,
            "read-write": not self.read_only,
            "read-only": self.read_only,
        }[requirement]

    def describe(self) -> str:
        if self.hot_standby:
            return "is a standby"
        return "is read-only" if self.read_only else "is a read-write primary"


async def session_role(connection: ConnectionType) -> _Role:
    """Role of a connected server, from the parameters it reports at startup when it does (PostgreSQL 14+)."""
    settings = connection.get_settings()
    in_hot_standby = getattr(settings, "in_hot_standby", None)
    if in_hot_standby is None:  # pragma: no cover - servers before PostgreSQL 14 (the suite runs 15)
        try:
            hot_standby = bool(await connection.fetchval("SELECT pg_catalog.pg_is_in_recovery()"))
        except BaseException:
            connection.terminate()
            raise
    else:
        hot_standby = in_hot_standby == "on"
    read_only = hot_standby or getattr(settings, "default_transaction_read_only", "off") == "on"
    return _Role(hot_standby=hot_standby, read_only=read_only)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPlan:
    """Everything a connect needs, checked once when the factory is built."""

    connect_args: typing.Mapping[str, typing.Any]
    hosts: tuple[HostPort, ...]
    target_session_attrs: str
    timeout: float
    stagger: float

    @classmethod
    def from_url(cls, url: str | sa.URL, timeout: float, stagger: float) -> "ConnectionPlan":
        parsed = parse_url(url)
        hosts = dsn_hosts(parsed)
        query = dict(parsed.query)
        requirement = str(query.pop("target_session_attrs", None) or "any")
        if requirement not in TARGET_SESSION_ATTRS:
            msg = f"unknown target_session_attrs {requirement!r}; expected one of {', '.join(TARGET_SESSION_ATTRS)}"
            raise DSNError(msg)
        for key in _TIMEOUT_KEYS:
            if key in query:
                timeout = check_number(f"{key} in the DSN", query.pop(key), unit="seconds", from_text=True)
        for key in (*_HOST_KEYS, *_ADAPTER_KEYS):
            query.pop(key, None)
        # SQLAlchemy's asyncpg dialect turns the rest (user, password, database, ssl, ...) into connect args.
        bare = sa.URL.create(
            "postgresql+asyncpg",
            username=parsed.username,
            password=parsed.password,
            database=parsed.database,
            query=query,
        )
        connect_args = dict(PGDialect_asyncpg().create_connect_args(bare)[1])  # type: ignore[no-untyped-call]
        for key in (*_INT_KEYS, *_FLOAT_KEYS):
            if isinstance(connect_args.get(key), str):
                connect_args[key] = _number(connect_args[key], key, integer=key in _INT_KEYS)
        return cls(
            connect_args=connect_args,
            hosts=hosts,
            target_session_attrs=requirement,
            timeout=check_number("timeout", timeout, unit="seconds"),
            stagger=check_number("stagger", stagger, inclusive=True, unit="seconds"),
        )


def _number(text: str, key: str, *, integer: bool) -> float:
    """A numeric asyncpg option given as text in the DSN: a count >= 0, or a number of seconds > 0."""
    try:
        return check_number(
            f"{key} in the DSN",
            text,
            inclusive=integer,
            integer=integer,
            unit=None if integer else "seconds",
            from_text=True,
        )
    except ValueError as exc:
        raise DSNError(str(exc)) from None


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, socket.gaierror):
        return error.errno not in _LASTING_RESOLVE_ERRORS
    return isinstance(error, (OSError, TimeoutError)) or classify(error) is not None


class _Connector:
    """The factory's state: the plan and the host that last gave a good connection."""

    def __init__(self, plan: ConnectionPlan) -> None:
        self.plan = plan
        self.last_good: HostPort | None = None

    def order(self) -> list[HostPort]:
        hosts = random.sample(self.plan.hosts, len(self.plan.hosts))
        if self.last_good in hosts:
            hosts.remove(self.last_good)
            hosts.insert(0, self.last_good)
        return hosts

    async def __call__(self) -> ConnectionType:
        if not self.plan.hosts:
            return await self._connect_default()
        return await self._connect_any()

    async def _connect_default(self) -> ConnectionType:
        """No host in the DSN: asyncpg's own defaults (PGHOST, the Unix socket)."""
        connection: ConnectionType = await asyncpg.connect(
            **self.plan.connect_args,
            timeout=self.plan.timeout,
            target_session_attrs=self.plan.target_session_attrs,
        )
        return connection

    async def _attempt(self, address: HostPort) -> tuple[ConnectionType, _Role]:
        connection: ConnectionType = await asyncpg.connect(
            **self.plan.connect_args,
            host=address.host,
            port=address.port,
            timeout=self.plan.timeout,
            target_session_attrs="any",
        )
        return connection, await session_role(connection)

    async def _connect_any(self) -> ConnectionType:
        running: dict[asyncio.Task[tuple[ConnectionType, _Role]], HostPort] = {}
        failures: list[HostFailure] = []
        chosen: tuple[ConnectionType, HostPort] | None = None
        try:
            chosen = await self._race(running, failures)
        finally:
            try:
                await self._abandon(running)
            except BaseException:
                # The caller was cancelled while the losers were being abandoned (chosen is None only if
                # the race itself was cancelled too, twice).
                if chosen is not None:  # pragma: no branch
                    chosen[0].terminate()
                raise
        if chosen is None:
            failure = failures[0]
            if len(self.plan.hosts) == 1 and isinstance(failure.error, TimeoutError):
                msg = f"{failure.address}: {failure.reason}"
                raise ConnectTimeoutError(msg) from failure.error
            if len(self.plan.hosts) == 1 and failure.error is not None:
                raise failure.error  # one host that could not be reached: the driver's own error, as before
            raise NoHostAvailableError(self.plan.target_session_attrs, failures)
        connection, self.last_good = chosen
        return connection

    async def _race(
        self,
        running: dict[asyncio.Task[tuple[ConnectionType, _Role]], HostPort],
        failures: list[HostFailure],
    ) -> tuple[ConnectionType, HostPort] | None:
        """Start the hosts' attempts ``stagger`` apart; the first fitting connection wins (``None``: none fits)."""
        requirement = self.plan.target_session_attrs
        loop = asyncio.get_running_loop()
        queue = self.order()
        fallback: tuple[ConnectionType, HostPort] | None = None  # prefer-standby: a non-standby we may use
        next_start = loop.time()
        try:
            while queue or running:
                if queue and (not running or loop.time() >= next_start):
                    address = queue.pop(0)
                    running[asyncio.ensure_future(self._attempt(address))] = address
                    next_start = loop.time() + self.plan.stagger
                    continue
                done, _ = await asyncio.wait(
                    running,
                    timeout=max(0.0, next_start - loop.time()) if queue else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    address = running.pop(task)
                    error = task.exception()
                    if error is not None:
                        failures.append(
                            HostFailure(
                                address,
                                describe_error(
                                    error,
                                    timeout=self.plan.timeout,
                                    password=self.plan.connect_args.get("password"),
                                ),
                                transient=_is_transient(error),
                                error=error,
                            ),
                        )
                        next_start = loop.time()  # a failed host frees its slot: start the next one now
                        continue
                    connection, role = task.result()
                    if role.satisfies(requirement):
                        return connection, address  # the caller closes the ones still in ``done`` via _abandon
                    if requirement == "prefer-standby" and fallback is None:
                        fallback = connection, address
                    else:
                        failures.append(HostFailure(address, role.describe(), transient=True))
                        connection.terminate()
            chosen, fallback = fallback, None
            return chosen
        finally:
            if fallback is not None:
                fallback[0].terminate()

    @staticmethod
    async def _abandon(running: typing.Mapping[asyncio.Task[tuple[ConnectionType, _Role]], HostPort]) -> None:
        """Cancel the attempts still running and close any connection one of them made meanwhile.

        The caller's own cancellation is never swallowed: waiting for the losers is cancellable, and a
        done-callback closes a connection that a loser made even if nobody waits for it any more.
        """
        if not running:
            return
        for task in running:
            task.add_done_callback(_close_unused)
            task.cancel()
        await asyncio.wait(running)


def _close_unused(task: "asyncio.Task[tuple[ConnectionType, _Role]]") -> None:
    if not task.cancelled() and task.exception() is None:
        # Only if the attempt finished connecting in the very step it was cancelled.
        task.result()[0].terminate()  # pragma: no cover


def build_connection_factory(
    url: str | sa.URL,
    timeout: float,
    *,
    stagger: float = DEFAULT_STAGGER,
) -> typing.Callable[[], typing.Awaitable[ConnectionType]]:
    """A zero-argument coroutine function returning an :class:`asyncpg.Connection`, for ``async_creator``.

    ``timeout`` is the connect timeout of each host in seconds (a ``timeout`` or ``connect_timeout``
    entry in the DSN takes precedence). With several hosts, attempts start ``stagger`` seconds apart
    (sooner when one fails) and the first host satisfying ``target_session_attrs`` wins;
    ``prefer-standby`` takes a standby if any is up, else any host. If none fits,
    :class:`NoHostAvailableError` lists every host's reason.
    """
    plan = ConnectionPlan.from_url(url, timeout, stagger)
    logger.debug("connection factory for %s", mask_dsn(url))
    return _Connector(plan)
