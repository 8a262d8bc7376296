"""``postgres_retry``: retry a coroutine when PostgreSQL reports a transient failure.

The success path is one ``try`` around one ``await``; the retry machinery (settings, tenacity
objects) is built only after a first failure that is worth retrying. Nothing is shared between
calls: contention is handled by each call's own full-jitter backoff (``architecture/retry.md``).
"""

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import math
import random
import threading
import time
import typing
import weakref

import sqlalchemy as sa
import tenacity
from sqlalchemy import orm
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from db_retry import turns
from db_retry.engine import (
    CallDeadline,
    CommitOutcomeUnknownError,
    call_deadline,
    resolution,
    resolving_commits,
)
from db_retry.retriable import RETRIED_KINDS, ErrorKind, classify, sqlstate_on_chain
from db_retry.settings import RetrySettings, SettingsError, get_settings
from db_retry.transaction import cannot_continue
from db_retry.validation import check_number


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


# The longest a call waits for its turn at a hot spot (a turn stuck in a slow query holds nobody longer).
_PATIENCE: typing.Final = 1.0


class _Budget(stop_base):
    """When to stop retrying one call; every limit runs from the call's first failure.

    - ``attempts``: attempts that reached a server and ran the work (conflicts and outages), the first
      included: 0.8.4's count (3 by default). With ``conflict_timeout`` set (opt-in), conflicts do not
      count here and stop after that many seconds instead.
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

    def remaining_after_conflict(self) -> float:
        """Seconds left for retrying conflicts (the time budgets that apply to them)."""
        elapsed = self.clock() - self.started
        limits = [limit - elapsed for limit in (self.conflict_timeout, self.timeout) if limit is not None]
        return max(0.0, min(limits, default=_PATIENCE))

    def clipped(self, wait: wait_base) -> typing.Callable[[tenacity.RetryCallState], float]:
        """``wait``, never past this budget (only for this budget: a caller's own ``stop=`` keeps its waits)."""

        def clipped_wait(retry_state: tenacity.RetryCallState) -> float:
            return min(float(wait(retry_state)), self.remaining(retry_state))

        return clipped_wait

    def remaining(self, retry_state: tenacity.RetryCallState) -> float:
        elapsed = self.clock() - self.started
        limit = self._limit(_failure_kind(retry_state))
        limits = [limit - elapsed] if limit is not None else []
        if self.timeout is not None:
            limits.append(self.timeout - elapsed)
        return max(0.0, min(limits, default=float("inf")))


# Additive increase of the hot-spot limit per call that gets through, over the limit (AIMD).
_INCREASE: typing.Final = 0.1
# A call waiting for a turn longer than this goes before newer ones (seconds).
_FAIR_AFTER: typing.Final = 0.2
# Each call that gets through a hot spot shrinks the pause ceiling by this factor (a conflict doubles it).
_PAUSE_DECAY: typing.Final = 0.9


_HELD: typing.Final[contextvars.ContextVar[frozenset[int]]] = contextvars.ContextVar(
    "db_retry_held",
    default=frozenset(),
)


# The key of ``_Policy.engaged`` that stands for the server turns (loops are keyed by their ``id``, never 0).
_SERVER_KEY: typing.Final = 0
# How long a call site keeps taking turns on the server after the last sign that its calls contend for the
# same rows (a conflict, a probe that lost), unless its probes show first that they do not.
_SERVER_HOLD: typing.Final = 5.0
# After its turns lapsed, how long the site runs without them whatever happens: a site whose conflicts are
# spread over many rows would otherwise be serialized again at its next conflict.
_SERVER_COOLDOWN: typing.Final = 30.0
# While the site takes turns, one first attempt in this many runs without one: a probe. Serialized, calls
# of a site conflict with nobody; a probe conflicts with the turn running beside it only if they want the
# same rows: a sign that the site is a hot spot still. Spread work passes its probes ...
_PROBE_EVERY: typing.Final = 8
# ... and this many passed in a row end its turns at once.
_PROBES_PASSED: typing.Final = 32
# Turns on the server are for rivals outside the loop: this many transactions in a row that found no rival
# holding the turn end them (one process, one loop: its own turns do the work, without the round trip).
_UNRIVALLED: typing.Final = 32


class _ServerTurns:
    """Whether the calls of one call site take turns on the server (:mod:`db_retry.turns`), in every loop.

    Per process: loops and threads share it, and every process of a service finds out for itself, at
    its first conflict. Plain numbers, read and written from any thread without a lock: a lost update
    delays a decision by one call at most.
    """

    __slots__ = ("calls", "cool_until", "key", "notify", "passed", "unrivalled", "until")

    def __init__(self, key: int, notify: typing.Callable[[], None]) -> None:
        self.key = key
        self.notify = notify  # when engaged: the decorator's "is it hot?" check must see it
        self.until = 0.0  # time.monotonic() at which the turns lapse unless the site contends again
        self.calls = 0  # first attempts while engaged, for picking probes
        self.passed = 0  # probes in a row that did not conflict
        self.unrivalled = 0  # attempts in a row whose transactions found the turn free
        self.cool_until = 0.0  # no turns before this time.monotonic(): probes showed the rows are spread

    def active(self) -> bool:
        return time.monotonic() < self.until

    def contended(self) -> bool:
        """Calls of the site conflict: take turns for a while; False while cooling down."""
        now = time.monotonic()
        if now < self.cool_until:
            return False  # probes ended the last turns: not again so soon
        was = now < self.until
        self.until = now + _SERVER_HOLD
        self.passed = self.unrivalled = 0
        if not was:
            self.notify()
        return True

    def probe_due(self) -> bool:
        self.calls += 1
        return self.calls % _PROBE_EVERY == 0

    def probe_passed(self) -> None:
        self.passed += 1
        if self.passed >= _PROBES_PASSED and self.active():
            now = time.monotonic()
            self.until = now  # the site's conflicts were not over the same rows: lapse now, and stay off
            self.cool_until = now + _SERVER_COOLDOWN

    def asked(self, request: turns.TurnRequest) -> None:
        """An attempt whose transactions asked for the turn ended: note whether a rival was holding it."""
        if request.waited:
            self.unrivalled = 0
            return
        self.unrivalled += 1
        if self.unrivalled >= _UNRIVALLED and self.active():
            now = time.monotonic()
            self.until = now  # nobody outside the loop takes turns here: the loop's own suffice, and stay off
            self.cool_until = now + _SERVER_COOLDOWN

    def request(self, patience: float) -> turns.TurnRequest | None:
        return turns.TurnRequest(key=self.key, patience=patience) if self.active() else None


class _HotSpot:
    """Turns for the calls of one decorated function in one event loop, while it is a hot spot (AIMD).

    Not engaged (no limit, no turns) until a retry after a conflict conflicts again: the calls then
    contend for the same rows, and running them all together only makes them lose again. Engaged,
    every call of the function in this loop takes a turn:

    - a conflict halves the limit (down to 1); a call that gets through raises it by
      ``_INCREASE / limit``; once the limit holds nobody back, the function runs freely again;
    - a conflict at a limit of 1 came from outside this loop (another process or event loop): the
      call site takes turns on the server too (``_ServerTurns``), and the limit stays where it is
      while it does; a conflict at a limit of 1 while it already does (a rival that takes no turns:
      another function, another client) pauses turns for a full-jitter wait that doubles with each
      such conflict, so that rivals spread out like one call's retries do;
    - the newest waiter goes first, so most calls pass quickly, but any waiter older than
      ``_FAIR_AFTER`` goes before it, so none waits much longer than that;
    - a call waits at most ``patience`` seconds, then goes ahead without a turn; a nested or
      recursive call inside a turn never waits.
    """

    __slots__ = (
        "delays",
        "limit",
        "notify",
        "pause",
        "pinned",
        "resume_at",
        "running",
        "server",
        "uniform",
        "waiters",
        "waking_at",
    )

    def __init__(
        self,
        notify: typing.Callable[[bool], None],
        server: _ServerTurns,
        *,
        uniform: Uniform = random.uniform,
    ) -> None:
        self.notify = notify  # True when engaged, False when released (called in the spot's loop)
        self.server = server
        self.pinned: float | None = None  # the limit before the server turns pinned it at 1 (``engage_alone``)
        self.uniform = uniform
        self.limit = math.inf
        self.running = 0
        self.waiters: collections.deque[tuple[float, asyncio.Future[bool]]] = collections.deque()
        self.delays = (0.005, 0.1)  # base and cap of the pauses: the conflict waits of the latest retry
        self.pause = 0.0  # ceiling of the current pause
        self.resume_at = 0.0  # loop time before which no turn starts
        # When a timer will wake the waiters after a pause. Not the timer itself: a handle references its
        # loop, and the loop is the key of this spot in a WeakKeyDictionary, which would then never let go.
        self.waking_at: float | None = None

    @property
    def engaged(self) -> bool:
        return self.limit < math.inf

    @contextlib.asynccontextmanager
    async def turn(self, *, patience: float, retry: bool) -> typing.AsyncIterator[None]:
        """Run the body as one attempt of the function; its outcome adjusts the limit."""
        held = _HELD.get()
        if id(self) in held:  # nested in a turn of the same function: waiting for ourselves would stall
            yield
            return
        granted = await self._acquire(patience)
        token = _HELD.set(held | {id(self)})
        try:
            yield
        except Exception as exc:
            if (retry or self.engaged) and classify(exc) is ErrorKind.CONFLICT:
                self._conflicted()
            raise
        else:
            self._succeeded()
        finally:
            _HELD.reset(token)
            if granted:
                self.running -= 1
            self._wake()

    def engage_alone(self) -> None:
        """The call site takes turns on the server: one call of this loop at a time asks for them."""
        if self.pinned is None:
            self.pinned = self.limit
        if not self.engaged:
            self.notify(True)  # noqa: FBT003 - a callback's one argument
        self.limit = 1.0

    def follow_server(self) -> None:
        """Pin the limit at 1 while the site takes turns on the server; give back the loop's own after."""
        if self.server.active():
            self.engage_alone()
        elif self.pinned is not None:
            self.limit, self.pinned = max(self.limit, self.pinned), None
            if not self.engaged:
                self.notify(False)  # noqa: FBT003 - a callback's one argument
            self._wake()

    def _conflicted(self) -> None:
        if not self.engaged:
            self.notify(True)  # noqa: FBT003 - a callback's one argument
            self.server.contended()  # a retry lost again: the calls want the same rows, maybe in other processes too
        elif self.limit <= 1 and self.running == 1 and not self.server.contended():
            # It ran alone here and still lost: the rival is outside this loop, and the site cannot take
            # turns on the server just now. Pause.
            base, cap = self.delays
            self.pause = min(cap, max(base, self.pause * 2))
            now = asyncio.get_running_loop().time()
            self.resume_at = max(self.resume_at, now + self.uniform(0.0, self.pause))
        self.limit = max(1.0, min(self.limit, self.running) / 2)

    def _succeeded(self) -> None:
        if not self.engaged:
            return
        self.pause *= _PAUSE_DECAY
        if self.server.active():  # the limit stays while the site takes turns on the server
            return
        self.limit += _INCREASE / self.limit
        if self.limit > self.running + len(self.waiters) + 1:  # the limit no longer holds anyone back
            self.limit = math.inf
            self.pause = 0.0
            self.notify(False)  # noqa: FBT003 - a callback's one argument

    async def _acquire(self, patience: float) -> bool:
        loop = asyncio.get_running_loop()
        if self.running + 1 <= self.limit and not self.waiters and loop.time() >= self.resume_at:
            self.running += 1
            return True
        waiter: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(patience, _give_up_waiting, waiter)
        entry = (loop.time(), waiter)
        self.waiters.append(entry)
        self._wake()
        try:
            return await waiter  # True: granted (``running`` already counts it); False: patience ran out
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.running -= 1
                self._wake()
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(entry)

    def _wake(self) -> None:
        if not self.waiters:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self.resume_at:
            if self.waking_at != self.resume_at:  # a timer set for an earlier time fires with nothing to do
                self.waking_at = self.resume_at
                loop.call_at(self.resume_at, self._resume)
            return
        while self.waiters and self.running + 1 <= self.limit:
            oldest = now - self.waiters[0][0] >= _FAIR_AFTER
            _, waiter = self.waiters.popleft() if oldest else self.waiters.pop()
            if not waiter.done():
                waiter.set_result(True)
                self.running += 1

    def _resume(self) -> None:
        self.waking_at = None  # a timer fired: the next pause sets a new one (a timer may fire a hair early)
        self._wake()


def _give_up_waiting(waiter: asyncio.Future[bool]) -> None:
    with contextlib.suppress(asyncio.InvalidStateError):  # granted (or cancelled) just before
        waiter.set_result(False)


class _CancelWatch:
    """Notices a cancellation of the calling task that a layer below swallowed, and raises it again.

    A cancellation can be lost under the retry: CPython 3.11's ``asyncio.wait_for`` drops one that
    arrives as the awaited operation completes, and a driver or a callback may catch it. The task
    still counts the request (``Task.cancelling()``), so at each retry boundary a request made since
    the first failure that nobody acted on is raised here: the caller's timeout or shutdown is not
    outlived by more attempts (seen once: a call under ``asyncio.timeout(0.1)`` during a crash
    restart ran on for 1 s and returned).
    """

    __slots__ = ("requested", "task")

    def __init__(self) -> None:
        # A retried call always runs in a task (``postgres_retry`` wraps coroutine functions only).
        self.task = typing.cast("asyncio.Task[typing.Any]", asyncio.current_task())
        self.requested = self.task.cancelling()

    def check(self) -> None:
        if self.task.cancelling() > self.requested:
            msg = "db-retry: the call was cancelled while it was being retried"
            raise asyncio.CancelledError(msg)


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
    # One hot-spot state per event loop the function runs in: lives as long as the decorated function and the loop.
    spots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _HotSpot] = dataclasses.field(
        default_factory=weakref.WeakKeyDictionary
    )
    # The loops where the function is a hot spot, by id: the decorator's "is it hot?" check is this dict's truth.
    # Weak references without callbacks; an entry whose loop ended while engaged is dropped by ``run_hot``.
    engaged: dict[int, weakref.ref[asyncio.AbstractEventLoop] | None] = dataclasses.field(default_factory=dict)
    # Guards ``spots`` and ``engaged``. Never taken from a finalizer or a weakref callback: a collection
    # that ran one while this thread held the lock would deadlock.
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # Turns on the server, for every loop and thread of this process; engaged under ``engaged``'s key 0.
    server: _ServerTurns = dataclasses.field(init=False)
    site: dataclasses.InitVar[int] = 0

    def __post_init__(self, site: int) -> None:
        object.__setattr__(self, "server", _ServerTurns(site, self._mark_server_turns))

    def hot_spot(self) -> _HotSpot:
        """The function's contention state in the running event loop (each loop, so each thread, has its own)."""
        loop = asyncio.get_running_loop()
        with self.lock:
            spot = self.spots.get(loop)
            if spot is None:
                spot = self.spots[loop] = _HotSpot(self._mark_engaged, self.server)
        return spot

    def _mark_server_turns(self) -> None:
        """The site takes turns on the server now; ``_forget_ended_loops`` drops the mark once they lapse."""
        with self.lock:
            self.engaged[_SERVER_KEY] = None

    def _mark_engaged(self, engaged: bool) -> None:  # noqa: FBT001 - the hot spot's callback
        """The function became (or stopped being) a hot spot in the running loop."""
        loop = asyncio.get_running_loop()
        with self.lock:
            if engaged:
                self.engaged[id(loop)] = weakref.ref(loop)
            else:
                self.engaged.pop(id(loop), None)

    def _forget_ended_loops(self) -> None:
        """Drop the loops that were closed or collected while the function was a hot spot there."""
        with self.lock:
            for key, ref in list(self.engaged.items()):
                if ref is None:  # the server turns: over once their time is up
                    if not self.server.active():
                        del self.engaged[key]
                    continue
                loop = ref()
                if loop is None or loop.is_closed():
                    del self.engaged[key]

    async def run_hot(
        self, call: typing.Callable[[], typing.Awaitable[_T]], args: tuple[object, ...], kwargs: dict[str, object]
    ) -> _T:
        """A first attempt while the function is a hot spot in some loop: take a turn if it is one in this loop."""
        self._forget_ended_loops()
        spot = self.hot_spot()
        spot.follow_server()
        if self.server.active() and self.server.probe_due():
            return await self.probe(call, args, kwargs)
        try:
            if not spot.engaged:
                return await self.attempt(call, _PATIENCE)
            async with spot.turn(patience=_PATIENCE, retry=False):
                return await self.attempt(call, _PATIENCE)
        except Exception as exc:
            if self.retried_kind(exc) is None:
                raise
            first_error = exc
        return await self.run(first_error, call, args, kwargs)

    async def probe(
        self, call: typing.Callable[[], typing.Awaitable[_T]], args: tuple[object, ...], kwargs: dict[str, object]
    ) -> _T:
        """A first attempt without any turn while the site takes them (``_PROBE_EVERY``): does it still conflict."""
        try:
            result = await call()
        except Exception as exc:
            if self.retried_kind(exc) is None:
                raise
            first_error = exc  # a conflict: it lost to the turn beside it, the site is still a hot spot (``run``)
        else:
            self.server.probe_passed()
            return result
        return await self.run(first_error, call, args, kwargs)

    async def attempt(self, call: typing.Callable[[], typing.Awaitable[_T]], patience: float) -> _T:
        """One attempt; while the site takes turns on the server, its transactions take them."""
        request = self.server.request(patience)
        if request is None:
            return await call()
        token = turns.requested.set(request)
        try:
            return await call()
        finally:
            turns.requested.reset(token)
            self.server.asked(request)

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
        if classify(first_error) is ErrorKind.CONFLICT:
            self.server.contended()  # rivals may be in other processes or loops: they find out at their first too
        budget = _Budget(
            attempts=self.retries if self.retries is not None else settings.retries_number,
            conflict_timeout=settings.conflict_timeout,
            outage_timeout=settings.outage_timeout,
            timeout=self.timeout if self.timeout is not None else settings.timeout,
        )
        base_wait = self.wait or wait_for_error.from_settings(settings)
        blocked: list[str] = []

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
            stop=self._stop(budget),
            wait=base_wait if self.stop is not None else budget.clipped(base_wait),
            retry=tenacity.retry_if_exception(should_retry),
            before_sleep=self._before_sleep,
            sleep=self.sleep or asyncio.sleep,
            reraise=True,
        )
        pending: Exception | None = first_error
        last: Exception = first_error
        cancels = _CancelWatch()
        spot = self.hot_spot()
        spot.delays = (settings.conflict_delay, settings.conflict_max_delay)
        try:
            async for attempt in retrying:  # pragma: no branch - tenacity ends it by returning or raising
                with attempt:
                    if pending is not None:
                        error, pending = pending, None
                        raise error  # the first attempt already ran: let tenacity account for it
                    try:
                        return await self.retry(call, spot, after=last, budget=budget, cancels=cancels)
                    except Exception as exc:
                        last = exc
                        raise
        except Exception as exc:
            reason = f"the caller owns the transaction of {blocked[0]}" if blocked else None
            self._give_up(exc, retrying.statistics.get("attempt_number", 1), reason=reason)
            raise
        raise AssertionError  # pragma: no cover - tenacity either returns or raises

    async def retry(
        self,
        call: typing.Callable[[], typing.Awaitable[_T]],
        spot: _HotSpot,
        *,
        after: Exception,
        budget: _Budget,
        cancels: "_CancelWatch",
    ) -> _T:
        """One retry: after a conflict it takes a turn (in its loop, and on the server while the site takes them)."""
        cancels.check()
        patience = min(_PATIENCE, budget.remaining_after_conflict())
        if classify(after) is not ErrorKind.CONFLICT:
            result = await self.attempt(call, patience)
        else:
            spot.follow_server()
            async with spot.turn(patience=patience, retry=True):
                result = await self.attempt(call, patience)
        cancels.check()
        return result

    def _stop(self, budget: _Budget) -> stop_base:
        """The built-in budget; or the caller's ``stop=``, which an explicit ``retries=`` still bounds."""
        if self.stop is None:
            return budget
        if self.retries is None:
            return self.stop
        attempts = _Budget(attempts=self.retries, conflict_timeout=None, outage_timeout=math.inf, timeout=None)
        return self.stop | attempts

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
    resolve_commit: bool | typing.Literal["marker"] = False,
    deadline: float | None = None,
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
    resolve_commit: bool | typing.Literal["marker"] = False,
    deadline: float | None = None,
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
    resolve_commit: bool | typing.Literal["marker"] = False,
    deadline: float | None = None,
    on_retry: typing.Callable[[RetryEvent], object] | None = None,
    sleep: Sleep | None = None,
) -> typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]] | _Decorator:
    """Retry an ``async def`` when PostgreSQL reports a transient failure.

    ``retries`` is the total number of attempts that reached a server, conflicts included (default:
    ``DB_RETRY_RETRIES_NUMBER``, read at call time, 3 as in 0.8.4; ``DB_RETRY_CONFLICT_TIMEOUT`` opts
    in to retrying conflicts for a time instead). ``timeout`` bounds the time spent retrying one
    call, from its first failure. ``deadline`` (default ``DB_RETRY_DEADLINE``, read when decorating)
    bounds the whole call, attempts and waits included: an attempt still running when it passes is
    cancelled and its connection aborted, each transaction gets the time left as its server-side
    ``statement_timeout`` and ``lock_timeout``, and the caller gets :class:`TimeoutError`, or
    :class:`~db_retry.CommitOutcomeUnknownError` if COMMIT was in flight. A call is not retried
    inside a transaction its caller began that can no longer continue (a session or connection
    argument): the error propagates with a note. ``wait`` / ``stop`` replace the built-in tenacity
    strategies. ``retry_ambiguous_commit`` retries a :class:`~db_retry.CommitOutcomeUnknownError` too:
    only for idempotent work. ``resolve_commit`` asks the server whether a COMMIT whose answer was lost
    committed (one more round trip per write transaction; :mod:`db_retry.engine`); ``"marker"``
    asks with a marker row the transaction writes, whichever primary answers, also after a failover
    (:mod:`db_retry.markers`). ``on_retry`` is
    called with a :class:`RetryEvent` before each wait. ``sleep`` replaces :func:`asyncio.sleep` (for
    tests).
    """
    check_number("retries", retries, minimum=1, inclusive=True, integer=True, allow_none=True)
    check_number("timeout", timeout, unit="seconds", allow_none=True)
    check_number("deadline", deadline, unit="seconds", allow_none=True)
    # A bad DB_RETRY_* value fails here, at decoration, naming the variable and the value.
    budget = deadline if deadline is not None else get_settings().deadline
    how = resolution(resolve_commit)  # a bad value fails here, naming it

    def decorator(
        f: typing.Callable[_Q, typing.Coroutine[typing.Any, typing.Any, _R]],
    ) -> typing.Callable[_Q, typing.Coroutine[typing.Any, typing.Any, _R]]:
        if not inspect.iscoroutinefunction(f):
            msg = f"postgres_retry decorates async functions (coroutine functions), got {f!r}"
            raise TypeError(msg)
        if how is not None:
            f = resolving_commits(f, how)
        policy = _Policy(
            site=turns.site_key(getattr(f, "__module__", "") or "", getattr(f, "__qualname__", repr(f))),
            function=getattr(f, "__qualname__", repr(f)),
            retries=retries,
            timeout=timeout,
            wait=wait,
            stop=stop,
            retry_ambiguous_commit=retry_ambiguous_commit,
            on_retry=on_retry,
            sleep=sleep,
        )
        if budget is not None:
            return _with_deadline(_retrying(f, policy), budget)
        return _retrying(f, policy)

    if func is not None:
        return decorator(func)
    return decorator


def _retrying(
    f: typing.Callable[_Q, typing.Coroutine[typing.Any, typing.Any, _R]], policy: _Policy
) -> typing.Callable[_Q, typing.Coroutine[typing.Any, typing.Any, _R]]:
    hot = policy.engaged  # the event loops in which this function is a hot spot right now

    @functools.wraps(f)
    async def retrying(*args: _Q.args, **kwargs: _Q.kwargs) -> _R:
        if hot:  # a hot spot in some event loop (a dict in a closure cell: cheap); turns are per loop
            return await policy.run_hot(functools.partial(f, *args, **kwargs), args, kwargs)
        try:
            return await f(*args, **kwargs)
        except Exception as exc:
            if policy.retried_kind(exc) is None:
                raise
            first_error = exc
        # Outside the ``except`` block, so later attempts' errors do not get the first one as context.
        return await policy.run(first_error, functools.partial(f, *args, **kwargs), args, kwargs)

    return retrying


def _with_deadline(
    f: typing.Callable[_Q, typing.Coroutine[typing.Any, typing.Any, _R]], seconds: float
) -> typing.Callable[_Q, typing.Coroutine[typing.Any, typing.Any, _R]]:
    """``f`` bounded as a whole: past ``seconds`` the attempt running is cancelled (its connection aborted)."""

    @functools.wraps(f)
    async def bounded(*args: _Q.args, **kwargs: _Q.kwargs) -> _R:
        loop = asyncio.get_running_loop()
        call = CallDeadline(at=loop.time() + seconds)
        token = call_deadline.set(call)
        bound = asyncio.timeout(seconds)
        try:
            async with bound:
                return await f(*args, **kwargs)
        except TimeoutError as exc:
            if bound.expired() and call.commit_cut:  # it struck while COMMIT was in flight
                unknown = CommitOutcomeUnknownError("COMMIT", None, exc, hide_parameters=True)
                unknown.add_note(f"db-retry: the deadline of {seconds:g}s passed while COMMIT was in flight")
                raise unknown from exc
            raise
        finally:
            call_deadline.reset(token)

    return bounded
