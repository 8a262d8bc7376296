"""``postgres_retry``: retry a coroutine when PostgreSQL reports a transient failure.

The success path is one ``try`` around one ``await``; the retry machinery (settings, tenacity
objects) is built only after a first failure that is worth retrying. Nothing is shared between
calls: contention is handled by each call's own full-jitter backoff (``architecture/retry.md``).
"""

import asyncio
import dataclasses
import functools
import inspect
import logging
import random
import time
import typing

import sqlalchemy as sa
import tenacity
from sqlalchemy import orm
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from db_retry.retriable import RETRIED_KINDS, ErrorKind, classify, sqlstate_on_chain
from db_retry.settings import RetrySettings, SettingsError, get_settings
from db_retry.transaction import cannot_continue


logger = logging.getLogger("db_retry.retry")

_P = typing.ParamSpec("_P")
_T = typing.TypeVar("_T")
_Q = typing.ParamSpec("_Q")
_R = typing.TypeVar("_R")
Sleep: typing.TypeAlias = typing.Callable[[float], typing.Awaitable[None]]
Uniform: typing.TypeAlias = typing.Callable[[float, float], float]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RetryEvent:
    """One decision of :func:`postgres_retry`, as given to ``on_retry`` and logged."""

    function: str
    attempt: int  # the attempt that failed, 1-based
    wait: float  # seconds until the next attempt
    kind: ErrorKind
    sqlstate: str | None
    error: BaseException = dataclasses.field(repr=False)

    @property
    def error_class(self) -> str:
        return f"{type(self.error).__module__}.{type(self.error).__qualname__}"

    def log_fields(self) -> dict[str, object]:
        """Structured fields for log records and metrics labels (never a DSN or a password)."""
        return {
            "db_retry_function": self.function,
            "db_retry_attempt": self.attempt,
            "db_retry_wait": round(self.wait, 6),
            "db_retry_kind": self.kind.value,
            "db_retry_sqlstate": self.sqlstate,
            "db_retry_error_class": self.error_class,
        }


class _full_jitter(tenacity.wait_exponential):  # noqa: N801 - named like tenacity's strategies
    """Uniform in ``[0, min(max, multiplier * 2**(n-1))]``: tenacity's exponential ceiling, full jitter.

    ``uniform`` is :func:`random.uniform` unless a test gives its own.
    """

    def __init__(self, *, multiplier: float, max: float, uniform: Uniform = random.uniform) -> None:  # noqa: A002
        super().__init__(multiplier=multiplier, max=max)
        self.uniform = uniform

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        return self.uniform(0.0, super().__call__(retry_state))


class wait_for_error(wait_base):  # noqa: N801 - named like tenacity's strategies
    """Full-jitter exponential waits chosen by the kind of the last failure.

    Conflicts (``40001``, ``40P01``) start at milliseconds and grow to a cap; a lost or unreachable
    server waits longer, up to its own cap, so a caller notices quickly that the server is back.
    """

    def __init__(self, *, conflict: wait_base, outage: wait_base) -> None:
        self.conflict = conflict
        self.outage = outage

    @classmethod
    def from_settings(cls, settings: RetrySettings, *, uniform: Uniform = random.uniform) -> "wait_for_error":
        return cls(
            conflict=_full_jitter(multiplier=settings.conflict_delay, max=settings.conflict_max_delay, uniform=uniform),
            outage=_full_jitter(multiplier=settings.outage_delay, max=settings.outage_max_delay, uniform=uniform),
        )

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        kind = _failure_kind(retry_state)
        strategy = self.conflict if kind is ErrorKind.CONFLICT else self.outage
        return float(strategy(retry_state))


def _failure_kind(retry_state: tenacity.RetryCallState) -> ErrorKind | None:
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    return classify(error) if error is not None else None


class _Budget(stop_base):
    """When to stop retrying one call; every limit runs from the call's first failure.

    - ``attempts``: attempts that ran the work (conflicts and outages). With ``conflict_timeout``
      set, conflicts do not count here and stop after that many seconds instead.
    - ``outage_timeout``: attempts that could not reach a usable server at all
      (:attr:`ErrorKind.UNAVAILABLE`) did not run the work; they never count, and stop after this.
    - ``timeout``: the whole retry, whatever failed.
    """

    def __init__(
        self,
        *,
        attempts: int,
        conflict_timeout: float | None,
        outage_timeout: float,
        timeout: float | None,
        clock: typing.Callable[[], float] = time.monotonic,
    ) -> None:
        self.attempts = attempts
        self.conflict_timeout = conflict_timeout
        self.outage_timeout = outage_timeout
        self.timeout = timeout
        self.clock = clock
        self.started = clock()
        self._counted = 0

    def _limit(self, kind: ErrorKind | None) -> float | None:
        if kind is ErrorKind.UNAVAILABLE:
            return self.outage_timeout
        if kind is ErrorKind.CONFLICT:
            return self.conflict_timeout
        return None

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        kind = _failure_kind(retry_state)
        elapsed = self.clock() - self.started
        limit = self._limit(kind)
        if limit is None:  # tenacity asks once per failed attempt
            self._counted += 1
        if self.timeout is not None and elapsed >= self.timeout:
            return True
        if limit is not None:
            return elapsed >= limit
        return self._counted >= self.attempts

    def remaining(self, retry_state: tenacity.RetryCallState) -> float:
        elapsed = self.clock() - self.started
        limit = self._limit(_failure_kind(retry_state))
        limits = [limit - elapsed] if limit is not None else []
        if self.timeout is not None:
            limits.append(self.timeout - elapsed)
        return max(0.0, min(limits, default=float("inf")))


_OWNERS: typing.Final = (AsyncSession, orm.Session, AsyncConnection, sa.Connection)


def _caller_transaction(args: tuple[object, ...], kwargs: dict[str, object]) -> str | None:
    """Which argument holds an open transaction that cannot continue (a session or connection the caller owns)."""
    named = [(f"argument {index + 1}", value) for index, value in enumerate(args)] + [
        (f"argument {name!r}", value) for name, value in kwargs.items()
    ]
    for where, value in named:
        if isinstance(value, _OWNERS) and cannot_continue(value):
            return f"{where} ({type(value).__name__})"
    return None


_CALLER_NOTE: typing.Final = (
    "db-retry did not retry {function}: the transaction of {owner} was begun outside the retried "
    "function and can no longer continue. Retrying inside it would fail with 25P02 or commit only "
    "part of the caller's work. Begin the transaction inside the retried function (Transaction, "
    "session.begin(), engine.begin()), or retry the caller's whole unit of work."
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Policy:
    function: str
    retries: int | None
    timeout: float | None
    wait: wait_base | None
    stop: stop_base | None
    retry_ambiguous_commit: bool
    on_retry: typing.Callable[[RetryEvent], object] | None
    sleep: Sleep | None

    def retried_kind(self, exc: BaseException) -> ErrorKind | None:
        kind = classify(exc)
        if kind in RETRIED_KINDS or (kind is ErrorKind.AMBIGUOUS and self.retry_ambiguous_commit):
            return kind
        return None

    async def run(
        self,
        first_error: Exception,
        call: typing.Callable[[], typing.Awaitable[_T]],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> _T:
        """Retry ``call`` under the policy; ``first_error`` is the failure of the attempt already made."""
        settings = self._settings(first_error)
        explicit = self.retries is not None or settings.retries_set
        budget = _Budget(
            attempts=self.retries if self.retries is not None else settings.retries_number,
            conflict_timeout=None if explicit else settings.conflict_timeout,
            outage_timeout=settings.outage_timeout,
            timeout=self.timeout if self.timeout is not None else settings.timeout,
        )
        base_wait = self.wait or wait_for_error.from_settings(settings)
        blocked: list[str] = []

        def wait(retry_state: tenacity.RetryCallState) -> float:
            return min(float(base_wait(retry_state)), budget.remaining(retry_state))

        def should_retry(exc: BaseException) -> bool:
            if self.retried_kind(exc) is None:
                return False
            owner = _caller_transaction(args, kwargs)
            if owner is None:
                return True
            exc.add_note(_CALLER_NOTE.format(function=self.function, owner=owner))
            blocked.append(owner)
            return False

        retrying = tenacity.AsyncRetrying(
            stop=self.stop or budget,
            wait=wait,
            retry=tenacity.retry_if_exception(should_retry),
            before_sleep=self._before_sleep,
            sleep=self.sleep or asyncio.sleep,
            reraise=True,
        )
        pending: Exception | None = first_error
        try:
            async for attempt in retrying:  # pragma: no branch - tenacity ends it by returning or raising
                with attempt:
                    if pending is not None:
                        error, pending = pending, None
                        raise error  # the first attempt already ran: let tenacity account for it
                    return await call()
        except Exception as exc:
            reason = f"the caller owns the transaction of {blocked[0]}" if blocked else None
            self._give_up(exc, retrying.statistics.get("attempt_number", 1), reason=reason)
            raise
        raise AssertionError  # pragma: no cover - tenacity either returns or raises

    def _settings(self, first_error: Exception) -> RetrySettings:
        """The settings; if a variable went bad since decoration, ``first_error`` is raised with a note instead."""
        try:
            return get_settings()
        except SettingsError as exc:
            problem = exc
        # Raised outside the ``except`` block: the database error stays the one callers catch, with its
        # chain untouched; the bad setting is named in a note.
        first_error.add_note(f"db-retry did not retry {self.function}: {problem}")
        self._give_up(first_error, 1, reason="invalid settings")
        raise first_error

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if error is None:  # pragma: no cover - we retry on exceptions only
            return
        event = RetryEvent(
            function=self.function,
            attempt=retry_state.attempt_number,
            wait=float(getattr(retry_state.next_action, "sleep", 0.0)),  # set before before_sleep, in tenacity 8 and 9
            kind=self.retried_kind(error) or ErrorKind.OUTAGE,
            sqlstate=sqlstate_on_chain(error),
            error=error,
        )
        logger.info(
            "retrying %s after attempt %d failed with %s (sqlstate %s, %s); waiting %.3fs",
            event.function,
            event.attempt,
            event.error_class,
            event.sqlstate,
            event.kind.value,
            event.wait,
            extra=event.log_fields(),
        )
        if self.on_retry is not None:
            try:
                self.on_retry(event)
            except Exception:
                logger.exception("on_retry hook of %s failed; the retry goes on", self.function)

    def _give_up(self, error: Exception, attempts: int, *, reason: str | None) -> None:
        kind = self.retried_kind(error)
        fields = {
            "db_retry_function": self.function,
            "db_retry_attempt": attempts,
            "db_retry_kind": kind.value if kind is not None else None,
            "db_retry_sqlstate": sqlstate_on_chain(error),
            "db_retry_error_class": f"{type(error).__module__}.{type(error).__qualname__}",
        }
        if reason is not None:
            logger.warning(
                "not retrying %s after attempt %d failed with %s (sqlstate %s): %s",
                self.function,
                attempts,
                fields["db_retry_error_class"],
                fields["db_retry_sqlstate"],
                reason,
                extra=fields,
            )
        elif kind is None:
            logger.info(
                "%s failed on attempt %d with a non-transient %s; not retrying",
                self.function,
                attempts,
                fields["db_retry_error_class"],
                extra=fields,
            )
        else:
            logger.warning(
                "giving up on %s after %d attempts: %s (sqlstate %s)",
                self.function,
                attempts,
                fields["db_retry_error_class"],
                fields["db_retry_sqlstate"],
                extra=fields,
            )


def _check_options(retries: object, timeout: object) -> None:
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 1):
        msg = f"retries must be an integer >= 1 (total attempts), got {retries!r}"
        raise ValueError(msg)
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        msg = f"timeout must be > 0 seconds, got {timeout!r}"
        raise ValueError(msg)


class _Decorator(typing.Protocol):
    def __call__(
        self,
        func: typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]],
        /,
    ) -> typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]]: ...


@typing.overload
def postgres_retry(
    func: typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]],
    *,
    retries: int | None = None,
    timeout: float | None = None,
    wait: wait_base | None = None,
    stop: stop_base | None = None,
    retry_ambiguous_commit: bool = False,
    on_retry: typing.Callable[[RetryEvent], object] | None = None,
    sleep: Sleep | None = None,
) -> typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]]: ...


@typing.overload
def postgres_retry(
    func: None = None,
    *,
    retries: int | None = None,
    timeout: float | None = None,
    wait: wait_base | None = None,
    stop: stop_base | None = None,
    retry_ambiguous_commit: bool = False,
    on_retry: typing.Callable[[RetryEvent], object] | None = None,
    sleep: Sleep | None = None,
) -> _Decorator: ...


def postgres_retry(  # noqa: PLR0913 - every knob is keyword-only and optional
    func: typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]] | None = None,
    *,
    retries: int | None = None,
    timeout: float | None = None,
    wait: wait_base | None = None,
    stop: stop_base | None = None,
    retry_ambiguous_commit: bool = False,
    on_retry: typing.Callable[[RetryEvent], object] | None = None,
    sleep: Sleep | None = None,
) -> typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]] | _Decorator:
    """Retry an ``async def`` when PostgreSQL reports a transient failure.

    ``retries`` is the total number of attempts that run the work (default: ``DB_RETRY_RETRIES_NUMBER``,
    read at call time). ``timeout`` bounds the time spent retrying one call, from its first failure.
    ``wait`` / ``stop`` replace the built-in tenacity strategies. ``retry_ambiguous_commit`` retries a
    :class:`~db_retry.CommitOutcomeUnknownError` too: only for idempotent work. ``on_retry`` is called
    with a :class:`RetryEvent` before each wait. ``sleep`` replaces :func:`asyncio.sleep` (for tests).
    """
    _check_options(retries, timeout)
    get_settings()  # a bad DB_RETRY_* value fails here, at decoration, naming the variable and the value

    def decorator(
        f: typing.Callable[_Q, typing.Coroutine[typing.Any, typing.Any, _R]],
    ) -> typing.Callable[_Q, typing.Coroutine[typing.Any, typing.Any, _R]]:
        if not inspect.iscoroutinefunction(f):
            msg = f"postgres_retry decorates async functions (coroutine functions), got {f!r}"
            raise TypeError(msg)
        policy = _Policy(
            function=getattr(f, "__qualname__", repr(f)),
            retries=retries,
            timeout=timeout,
            wait=wait,
            stop=stop,
            retry_ambiguous_commit=retry_ambiguous_commit,
            on_retry=on_retry,
            sleep=sleep,
        )

        @functools.wraps(f)
        async def retrying(*args: _Q.args, **kwargs: _Q.kwargs) -> _R:
            try:
                return await f(*args, **kwargs)
            except Exception as exc:
                if policy.retried_kind(exc) is None:
                    raise
                first_error = exc
            # Outside the ``except`` block, so later attempts' errors do not get the first one as context.
            return await policy.run(first_error, functools.partial(f, *args, **kwargs), args, kwargs)

        return retrying

    if func is not None:
        return decorator(func)
    return decorator
