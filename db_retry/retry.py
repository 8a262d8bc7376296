"""``postgres_retry``: retry a coroutine when PostgreSQL reports a transient failure.

The success path is one ``try`` around one ``await``; the retry machinery (settings, tenacity
objects) is built only after a first failure that is worth retrying.
"""

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import typing
import weakref

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from db_retry.engine import resolving_commits
from db_retry.retriable import RETRIED_KINDS, ErrorKind, classify, sqlstate_on_chain
from db_retry.settings import RetrySettings, get_settings
from db_retry.validation import check_number


logger = logging.getLogger("db_retry.retry")

_P = typing.ParamSpec("_P")
_T = typing.TypeVar("_T")
_Q = typing.ParamSpec("_Q")
_R = typing.TypeVar("_R")
Sleep: typing.TypeAlias = typing.Callable[[float], typing.Awaitable[None]]


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


class wait_for_error(wait_base):  # noqa: N801 - named like tenacity's strategies
    """Full-jitter exponential waits chosen by the kind of the last failure.

    Conflicts (``40001``, ``40P01``) wait milliseconds; a lost or unreachable server waits longer,
    up to a cap, so a caller notices quickly that the server is back.
    """

    def __init__(self, *, conflict: wait_base, outage: wait_base) -> None:
        self.conflict = conflict
        self.outage = outage

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> "wait_for_error":
        return cls(
            conflict=tenacity.wait_random_exponential(
                multiplier=settings.conflict_delay,
                max=settings.conflict_max_delay,
            ),
            outage=tenacity.wait_random_exponential(multiplier=settings.outage_delay, max=settings.outage_max_delay),
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
    """Stop after ``attempts`` attempts that ran the work, or when time is up.

    Attempts that could not reach a usable server at all (:attr:`ErrorKind.UNAVAILABLE`) did not run
    the work; they do not count, and are bounded by ``outage_timeout`` instead.
    """

    def __init__(self, *, attempts: int, outage_timeout: float, timeout: float | None) -> None:
        self.attempts = attempts
        self.outage_timeout = outage_timeout
        self.timeout = timeout
        self._counted = 0

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        kind = _failure_kind(retry_state)
        elapsed = retry_state.seconds_since_start or 0.0
        if kind is not ErrorKind.UNAVAILABLE:  # tenacity asks once per failed attempt
            self._counted += 1
        if self.timeout is not None and elapsed >= self.timeout:
            return True
        if kind is ErrorKind.UNAVAILABLE:
            return elapsed >= self.outage_timeout
        return self._counted >= self.attempts

    def remaining(self, retry_state: tenacity.RetryCallState) -> float:
        elapsed = retry_state.seconds_since_start or 0.0
        limits = [self.outage_timeout - elapsed] if _failure_kind(retry_state) is ErrorKind.UNAVAILABLE else []
        if self.timeout is not None:
            limits.append(self.timeout - elapsed)
        return max(0.0, min(limits, default=float("inf")))


# How long a queued caller waits for its turn, in conflict waits (``conflict_max_delay``): a queue of
# callers whose attempts take a few milliseconds each drains well within it; a stuck turn does not hold
# the others for longer.
_GATE_PATIENCE: typing.Final = 10
_GATES: typing.Final[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]]] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def _conflict_gate(function: str, patience: float) -> typing.AsyncIterator[None]:
    """Let the retries of ``function`` that follow a conflict run one at a time (per event loop).

    Callers that just lost a serialization conflict or a deadlock usually contend for the same rows:
    run together again, all but one lose again. Queued, each runs alone against at most the first
    attempts of other calls. A caller waits at most ``patience`` seconds for its turn, then goes ahead.
    """
    lock = _GATES.setdefault(asyncio.get_running_loop(), {}).setdefault(function, asyncio.Lock())
    try:
        async with asyncio.timeout(patience):
            await lock.acquire()
    except TimeoutError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


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
    # Counts the calls of the function retrying after a conflict (+1 / -1); lives in the wrapper's closure.
    count_conflicted: typing.Callable[[int], None]

    def retried_kind(self, exc: BaseException) -> ErrorKind | None:
        kind = classify(exc)
        if kind in RETRIED_KINDS or (kind is ErrorKind.AMBIGUOUS and self.retry_ambiguous_commit):
            return kind
        return None

    async def run_queued(self, call: typing.Callable[[], typing.Awaitable[_T]]) -> _T:
        """A call that came in while others of its function retry a conflict: its turn comes after theirs."""
        try:
            async with _conflict_gate(self.function, get_settings().conflict_max_delay * _GATE_PATIENCE):
                return await call()
        except Exception as exc:
            if self.retried_kind(exc) is None:
                raise
            first_error = exc
        return await self.run(first_error, call, queued=True)

    async def run(
        self,
        first_error: Exception,
        call: typing.Callable[[], typing.Awaitable[_T]],
        *,
        queued: bool = False,
    ) -> _T:
        """Retry ``call`` under the policy; ``first_error`` is the failure of the attempt already made."""
        settings = get_settings()
        budget = _Budget(
            attempts=self.retries if self.retries is not None else settings.retries_number,
            outage_timeout=settings.outage_timeout,
            timeout=self.timeout if self.timeout is not None else settings.timeout,
        )
        base_wait = self.wait or wait_for_error.from_settings(settings)

        def wait(retry_state: tenacity.RetryCallState) -> float:
            return min(float(base_wait(retry_state)), budget.remaining(retry_state))

        retrying = tenacity.AsyncRetrying(
            stop=self.stop or budget,
            wait=wait,
            retry=tenacity.retry_if_exception(lambda exc: self.retried_kind(exc) is not None),
            before_sleep=self._before_sleep,
            sleep=self.sleep or asyncio.sleep,
            reraise=True,
        )
        pending: Exception | None = first_error
        conflicted = classify(first_error) is ErrorKind.CONFLICT
        gated = queued or conflicted
        if conflicted:
            self.count_conflicted(1)
        try:
            async for attempt in retrying:  # pragma: no branch - tenacity ends it by returning or raising
                with attempt:
                    if pending is not None:
                        error, pending = pending, None
                        raise error  # the first attempt already ran: let tenacity account for it
                    try:
                        if not gated:
                            return await call()
                        async with _conflict_gate(self.function, settings.conflict_max_delay * _GATE_PATIENCE):
                            return await call()
                    except Exception as exc:
                        if not conflicted and classify(exc) is ErrorKind.CONFLICT:
                            conflicted = gated = True
                            self.count_conflicted(1)
                        raise
        except Exception as exc:
            self._give_up(exc, retrying.statistics.get("attempt_number", 1))
            raise
        finally:
            if conflicted:
                self.count_conflicted(-1)
        raise AssertionError  # pragma: no cover - tenacity either returns or raises

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

    def _give_up(self, error: Exception, attempts: int) -> None:
        kind = self.retried_kind(error)
        fields = {
            "db_retry_function": self.function,
            "db_retry_attempt": attempts,
            "db_retry_kind": kind.value if kind is not None else None,
            "db_retry_sqlstate": sqlstate_on_chain(error),
            "db_retry_error_class": f"{type(error).__module__}.{type(error).__qualname__}",
        }
        if kind is None:
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
    resolve_commit: bool = False,
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
    resolve_commit: bool = False,
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
    resolve_commit: bool = False,
    on_retry: typing.Callable[[RetryEvent], object] | None = None,
    sleep: Sleep | None = None,
) -> typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]] | _Decorator:
    """Retry an ``async def`` when PostgreSQL reports a transient failure.

    ``retries`` is the total number of attempts that run the work (default: ``DB_RETRY_RETRIES_NUMBER``,
    read at call time). ``timeout`` bounds the time spent retrying one call, from its first failure.
    ``wait`` / ``stop`` replace the built-in tenacity strategies. ``retry_ambiguous_commit`` retries a
    :class:`~db_retry.CommitOutcomeUnknownError` too: only for idempotent work. ``resolve_commit`` asks
    the server whether a COMMIT whose answer was lost committed (one more round trip per write
    transaction; :mod:`db_retry.engine`). ``on_retry`` is called
    with a :class:`RetryEvent` before each wait. ``sleep`` replaces :func:`asyncio.sleep` (for tests).
    """
    check_number("retries", retries, minimum=1, inclusive=True, integer=True, allow_none=True)
    check_number("timeout", timeout, unit="seconds", allow_none=True)

    def decorator(
        f: typing.Callable[_Q, typing.Coroutine[typing.Any, typing.Any, _R]],
    ) -> typing.Callable[_Q, typing.Coroutine[typing.Any, typing.Any, _R]]:
        if not inspect.iscoroutinefunction(f):
            msg = f"postgres_retry decorates async functions (coroutine functions), got {f!r}"
            raise TypeError(msg)
        if resolve_commit:
            f = resolving_commits(f)
        conflicted = 0  # calls of ``f`` retrying after a conflict right now

        def count_conflicted(delta: int) -> None:
            nonlocal conflicted
            conflicted += delta

        policy = _Policy(
            count_conflicted=count_conflicted,
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
            if conflicted:  # a hot spot right now: queue behind the calls retrying it (a closure cell: cheap)
                return await policy.run_queued(functools.partial(f, *args, **kwargs))
            try:
                return await f(*args, **kwargs)
            except Exception as exc:
                if policy.retried_kind(exc) is None:
                    raise
                first_error = exc
            # Outside the ``except`` block, so later attempts' errors do not get the first one as context.
            return await policy.run(first_error, functools.partial(f, *args, **kwargs))

        return retrying

    if func is not None:
        return decorator(func)
    return decorator
