"""Generated fault schedules: Hypothesis draws a write, a real fault, when it strikes and how the call is bounded.

Each example draws the way one write commits (``engine.begin()``, ``session.commit()``,
``session.begin()``, :class:`db_retry.Transaction`, autocommit on the engine or on the connection),
the driver (asyncpg through :func:`build_connection_factory`, psycopg), a real fault and the moment it
strikes (the kit's proxy cuts the connection right after forwarding ``COMMIT``; ``pg_terminate_backend``
while the statement sleeps; a crash restart by ``SIGKILL`` of a backend; the node demoted to read-only;
a silent server, the proxy holding every byte), a cancellation point (``asyncio.timeout``) and the
settings of ``@postgres_retry`` (``retries``, ``timeout``, ``stop``, ``resolve_commit``). The write
runs on a warm default ``QueuePool`` engine of its own, in an event loop of its own, under a key of
its own; then six invariants are checked (``_check``), and each names itself when it fails.

``DB_RETRY_SOAK_EXAMPLES=N`` (``just soak``) runs ``N`` random examples instead of the fixed,
derandomized ones. Failing examples found by either become plain regression tests at the end of
this file. ``architecture/fault-schedules.md`` has the reasons.
"""

import asyncio
import collections.abc
import dataclasses
import gc
import os
import secrets
import time
import typing
import uuid
import weakref

import hypothesis
import pytest
import sqlalchemy as sa
import tenacity
from hypothesis import strategies as st
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from db_retry import CommitOutcomeUnknownError, Transaction, build_connection_factory, postgres_retry
from db_retry.retriable import ErrorKind, classify
from db_retry.testing import PostgresCluster, PostgresNode, faults
from db_retry.testing.proxy import TcpProxy


pytestmark = pytest.mark.standby  # servers of the kit's own, which the faults crash and demote

STYLES: typing.Final = (
    "engine.begin",
    "session.commit",
    "session.begin",
    "Transaction",
    "autocommit engine",  # create_async_engine(..., isolation_level="AUTOCOMMIT")
    "autocommit connection",  # connection.execution_options(isolation_level="AUTOCOMMIT")
)
AUTOCOMMIT: typing.Final = ("autocommit engine", "autocommit connection")
DRIVERS: typing.Final = ("asyncpg", "psycopg")
# Each fault and the moments it may strike: "idle pool" is after the pool was warmed, before the call;
# "mid-statement" while the write's INSERT sleeps on the server; "at COMMIT" right after the proxy has
# forwarded the statement that commits (COMMIT, or the INSERT itself in autocommit).
MOMENTS: typing.Final[dict[str, tuple[str, ...]]] = {
    "none": ("-",),
    "cut after COMMIT": ("at COMMIT",),
    "backend terminated": ("mid-statement", "idle pool"),
    "crash restart": ("mid-statement", "idle pool"),
    "demoted to read-only": ("idle pool",),
    "silent server": ("mid-statement", "idle pool"),
}
FAULTS: typing.Final = tuple(MOMENTS)
POOL_SIZE: typing.Final = 4
CONNECT_TIMEOUT: typing.Final = 2  # seconds, each connect (both drivers)
STRIKE_SLEEP: typing.Final = 1.0  # how long a write sleeps when a fault strikes mid-statement
CANCEL_SLACK: typing.Final = 0.05  # invariant 3: the call ends this soon after its asyncio.timeout
LEFTOVER_WAIT: typing.Final = 5.0  # how long the server gets to notice that the example's sessions ended
SOAK_ENV: typing.Final = "DB_RETRY_SOAK_EXAMPLES"
# The liveness watchdog's settings for this module: a silent server is cut within about 1.5 s rather than the
# default 6 s, so that examples stay short (the defaults are proven in tests/test_liveness.py).
PROBE_AFTER: typing.Final = 1.0
PROBE_TIMEOUT: typing.Final = 0.5
DEFAULT_EXAMPLES: typing.Final = 80  # about 100 s when every invariant holds

PID: typing.Final = sa.text("SELECT pg_backend_pid()")
# One statement that writes and sleeps on the server: what a fault mid-statement interrupts.
INSERT: typing.Final = sa.text(
    "INSERT INTO schedule (key, attempt) SELECT :key, :attempt FROM pg_sleep(CAST(:sleep AS float8))"
)

_soak = int(os.environ.get(SOAK_ENV) or 0)
SETTINGS: typing.Final = hypothesis.settings(
    max_examples=_soak or DEFAULT_EXAMPLES,
    derandomize=not _soak,  # `just test`: the same examples every run; `just soak`: new ones each time
    database=None,
    deadline=None,  # an example takes a second or several; the invariants bound the time, not Hypothesis
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
    print_blob=bool(_soak),
    # `just test` reports the failing example as drawn: shrinking costs dozens of examples of seconds each.
    phases=list(hypothesis.Phase) if _soak else [hypothesis.Phase.explicit, hypothesis.Phase.generate],
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    style: str
    driver: str
    fault: str = "none"
    moment: str = "-"
    strikes: tuple[int, ...] = (1,)  # the runs of the work it strikes (mid-statement, at COMMIT)
    sleep: float = 0.0  # seconds the INSERT sleeps on the server
    cancel_after: float | None = None  # asyncio.timeout around the call
    retries: int | None = None
    timeout: float | None = None
    stop_after: float | None = None  # stop=tenacity.stop_after_delay(...)
    resolve_commit: bool = False

    @property
    def attempt_allowance(self) -> float:
        """What one attempt may take: a connect, the statement's sleep, the watchdog's detection, slack.

        The detection of a silent server is ``DB_RETRY_PROBE_AFTER`` + ``DB_RETRY_PROBE_TIMEOUT`` (shortened
        for this module).
        """
        return CONNECT_TIMEOUT + self.sleep + PROBE_AFTER + PROBE_TIMEOUT + 1.0

    @property
    def safety_cap(self) -> float:
        """When the test itself gives up waiting for the call (a second cancellation): never reached if it holds."""
        if self.cancel_after is not None:
            return self.cancel_after + 3.0  # enough to tell how late a late cancellation is
        if self.timeout is not None:
            return self.timeout + self.attempt_allowance + 1.0  # past invariant 5's bound
        return 60.0  # the library's own bounds (DB_RETRY_OUTAGE_TIMEOUT is 40 s) end it well before


@dataclasses.dataclass
class Observation:
    result: str = "not run"  # ok | unknown | cancelled | stuck | error: <class>: <message>
    elapsed: float = 0.0  # seconds from the call to its end
    loop_lateness: float = 0.0  # how late the event loop ran a timer due when the call was cancelled
    first_failure: float | None = None  # seconds from the call to the first run that failed
    runs: int = 0  # runs of the work (its body started)
    reached: int = 0  # runs whose first statement the server answered (invariant 4 counts these)
    struck: int = 0  # faults that struck
    rows: int = -1  # rows under the example's key, on both servers
    alive: list[str] = dataclasses.field(default_factory=list)  # objects still referenced after gc.collect()
    tasks: list[str] = dataclasses.field(default_factory=list)  # tasks still running after the call
    leftovers: list[str] = dataclasses.field(default_factory=list)  # backends of the example still on a server


@dataclasses.dataclass(frozen=True)
class Nodes:
    first: PostgresNode  # the pool's server, behind the proxy; every fault strikes it
    second: PostgresNode  # the read-write server once the first is demoted


@pytest.fixture(scope="module")
def nodes() -> collections.abc.Iterator[Nodes]:
    # Servers of their own: the faults crash and demote them. A table each: a write may land on either.
    with (
        pytest.MonkeyPatch.context() as environment,
        PostgresCluster(name="sched-a") as first,
        PostgresCluster(name="sched-b") as second,
    ):
        environment.setenv("DB_RETRY_PROBE_AFTER", str(PROBE_AFTER))
        environment.setenv("DB_RETRY_PROBE_TIMEOUT", str(PROBE_TIMEOUT))
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            for node in (first.primary, second.primary):
                runner.run(node.execute("CREATE TABLE schedule (key uuid NOT NULL, attempt int NOT NULL)"))
        yield Nodes(first.primary, second.primary)


# -- drawing a schedule ------------------------------------------------------------------------------------
def draw_schedule(data: st.DataObject) -> Schedule:
    """Each choice drawn on its own, in the order a reader would make them."""
    style = data.draw(st.sampled_from(STYLES), label="style")
    driver = data.draw(st.sampled_from(DRIVERS), label="driver")
    fault = data.draw(st.sampled_from(FAULTS), label="fault")
    moment = data.draw(st.sampled_from(MOMENTS[fault]), label="moment")
    strikes: tuple[int, ...] = (1,)
    if moment in {"mid-statement", "at COMMIT"}:
        runs = data.draw(st.sets(st.integers(1, 3), min_size=1, max_size=3), label="strikes on runs")
        strikes = tuple(sorted(runs))
    sleep = STRIKE_SLEEP if moment == "mid-statement" else data.draw(st.sampled_from((0.0, 0.05, 0.3)), label="sleep")
    cancel_after = data.draw(st.sampled_from((None, 0.02, 0.1, 0.3, 0.8)), label="cancel after")
    timeout = data.draw(st.sampled_from((None, 0.3, 1.0, 2.0)), label="timeout")
    if fault == "silent server" and cancel_after is None and timeout is None:
        # A silent server never answers: only a cancellation point or a time budget ends the call.
        cancel_after = data.draw(st.sampled_from((0.02, 0.1, 0.3, 0.8)), label="cancel after (silent server)")
    return Schedule(
        style=style,
        driver=driver,
        fault=fault,
        moment=moment,
        strikes=strikes,
        sleep=sleep,
        cancel_after=cancel_after,
        retries=data.draw(st.one_of(st.none(), st.integers(1, 4)), label="retries"),
        timeout=timeout,
        stop_after=data.draw(st.sampled_from((None, 0.3, 2.0)), label="stop after delay"),
        resolve_commit=data.draw(st.booleans(), label="resolve_commit"),
    )


# -- one example -------------------------------------------------------------------------------------------
def _engine(schedule: Schedule, nodes: Nodes, proxy: TcpProxy, app: str) -> AsyncEngine:
    """A default QueuePool engine through the proxy; demotion adds the second server for read-write."""
    first, second = nodes.first, nodes.second
    if schedule.fault == "demoted to read-only":
        hosts = f"host={proxy.host}:{proxy.port}&host={second.host}:{second.port}"
        url = sa.make_url(
            f"postgresql+{schedule.driver}://{first.user}@/{first.database}?{hosts}&target_session_attrs=read-write"
        )
    else:
        url = sa.make_url(first.dsn(driver=schedule.driver)).set(host=proxy.host, port=proxy.port)
    options: dict[str, typing.Any] = {"pool_size": POOL_SIZE}
    if schedule.style == "autocommit engine":
        options["isolation_level"] = "AUTOCOMMIT"
    if schedule.driver == "psycopg":
        url = url.update_query_dict({"application_name": app, "connect_timeout": str(CONNECT_TIMEOUT)})
        return create_async_engine(url, **options)
    factory = build_connection_factory(url.set(drivername="postgresql"), timeout=CONNECT_TIMEOUT)

    async def creator() -> typing.Any:
        # asyncpg takes application_name only in server_settings, which a URL cannot carry: set it first thing.
        connection = await factory()
        try:
            await connection.execute(f"SET application_name = '{app}'")
        except BaseException:
            connection.terminate()
            raise
        return connection

    return create_async_engine(url, async_creator=creator, **options)


async def _warm(engine: AsyncEngine) -> None:
    """Fill the pool: ``POOL_SIZE`` connections open at once, then all back in the pool."""
    barrier = asyncio.Barrier(POOL_SIZE)

    async def hold() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
            await barrier.wait()

    await asyncio.gather(*(hold() for _ in range(POOL_SIZE)))


async def _write_once(
    style: str,
    engine: AsyncEngine,
    params: dict[str, object],
    reached: collections.abc.Callable[[int], None],
) -> None:
    """One run of the work: a first statement (``reached`` gets its backend), then the write, then its commit."""
    if style == "engine.begin":
        async with engine.begin() as connection:
            reached((await connection.execute(PID)).scalar_one())
            await connection.execute(INSERT, params)
    elif style == "session.commit":
        async with AsyncSession(engine) as session:
            reached((await session.execute(PID)).scalar_one())
            await session.execute(INSERT, params)
            await session.commit()
    elif style == "session.begin":
        async with AsyncSession(engine) as session, session.begin():
            reached((await session.execute(PID)).scalar_one())
            await session.execute(INSERT, params)
    elif style == "Transaction":
        async with Transaction(session=AsyncSession(engine)) as transaction:
            reached((await transaction.session.execute(PID)).scalar_one())
            await transaction.session.execute(INSERT, params)
            await transaction.commit()
    else:  # AUTOCOMMIT: the INSERT commits itself
        async with engine.connect() as connection:
            if style == "autocommit connection":
                await connection.execution_options(isolation_level="AUTOCOMMIT")
            reached((await connection.execute(PID)).scalar_one())
            await connection.execute(INSERT, params)


async def _wait_sleeping(node: PostgresNode, pid: int, patience: float) -> bool:
    """Whether backend ``pid`` reached its ``pg_sleep`` within ``patience`` seconds."""
    admin = await node.connect()
    try:
        deadline = time.monotonic() + patience
        query = "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'PgSleep')"
        while time.monotonic() < deadline:
            if await admin.fetchval(query, pid):
                return True
            await asyncio.sleep(0.01)
        return False
    finally:
        await admin.close()


@dataclasses.dataclass(frozen=True)
class _Scene:
    """What one example plays with."""

    schedule: Schedule
    nodes: Nodes
    proxy: TcpProxy
    app: str  # the application_name of the example's sessions
    key: uuid.UUID  # the key of its row
    observation: Observation


async def _strike(scene: _Scene, pid: int | None) -> None:
    """The fault itself: on backend ``pid`` mid-statement, or on the idle pool (``pid`` None)."""
    node = scene.nodes.first
    fault = scene.schedule.fault
    if fault == "backend terminated":
        if pid is None:
            await faults.terminate_backends(node, application_name=scene.app)
        else:
            await node.execute("SELECT pg_terminate_backend($1)", pid)
    elif fault == "crash restart":
        await faults.kill_backend(node, pid)  # SIGKILL: the postmaster resets every session, recovers
    elif fault == "silent server":
        scene.proxy.hang()
    else:  # demoted to read-only
        await faults.set_read_only(node)


@dataclasses.dataclass
class _Striker:
    """Faults at a moment of a run: arms the cut, or a task per struck run waits for its INSERT to sleep."""

    scene: _Scene
    waiting: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)
    striking: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)

    def run_started(self, run: int) -> None:
        schedule, proxy = self.scene.schedule, self.scene.proxy
        if schedule.fault == "cut after COMMIT":
            if run in schedule.strikes:  # in autocommit the INSERT is what commits
                proxy.cut_after_query("INSERT" if schedule.style in AUTOCOMMIT else "COMMIT")
            else:
                proxy.pass_through()  # disarmed: a trigger left from a run that failed earlier

    def reached(self, run: int, pid: int) -> None:
        if self.scene.schedule.moment == "mid-statement" and run in self.scene.schedule.strikes:
            task = asyncio.get_running_loop().create_task(self._mid_statement(pid))
            self.waiting.add(task)

    async def _mid_statement(self, pid: int) -> None:
        if not await _wait_sleeping(self.scene.nodes.first, pid, patience=self.scene.schedule.sleep + 1.0):
            return
        task = asyncio.current_task()
        assert task is not None
        self.waiting.discard(task)
        self.striking.add(task)
        self.scene.observation.struck += 1
        await _strike(self.scene, pid)

    async def settle(self) -> None:
        """Stop waiting for runs that will not sleep any more; let faults under way finish (bounded)."""
        for task in self.waiting:
            task.cancel()
        await asyncio.gather(*self.waiting, return_exceptions=True)
        async with asyncio.timeout(40):
            await asyncio.gather(*self.striking)


def _work(
    scene: _Scene, engine: AsyncEngine, striker: _Striker, started: list[float]
) -> collections.abc.Callable[[], collections.abc.Coroutine[typing.Any, typing.Any, None]]:
    """The work unit: one row under the example's key, through ``@postgres_retry`` with the drawn settings."""
    schedule, observation = scene.schedule, scene.observation

    @postgres_retry(
        retries=schedule.retries,
        timeout=schedule.timeout,
        stop=tenacity.stop_after_delay(schedule.stop_after) if schedule.stop_after is not None else None,
        resolve_commit=schedule.resolve_commit,
    )
    async def write() -> None:
        observation.runs += 1
        run = observation.runs

        # Invariant 4 counts runs that reached the server: the counter moves once the first statement
        # (SELECT pg_backend_pid()) has been answered, not when the body starts. A run that failed to
        # connect, or whose pooled connection was already dead, never reached the server and is not
        # counted (the library does not count those either).
        def reached(pid: int) -> None:
            observation.reached += 1
            striker.reached(run, pid)

        striker.run_started(run)
        params = {"key": scene.key, "attempt": run, "sleep": schedule.sleep}
        try:
            await _write_once(schedule.style, engine, params, reached)
        except Exception as exc:
            if observation.first_failure is None:
                observation.first_failure = time.monotonic() - started[0]
            if classify(exc) is ErrorKind.UNAVAILABLE and observation.reached >= run:
                # Refused for the node's role (25006 from a node that reports itself read-only): the library
                # waits for a writable node as it waits when no host fits target_session_attrs, bounded by
                # DB_RETRY_OUTAGE_TIMEOUT, not by retries (README: what counts in retries).
                observation.reached -= 1
            raise

    return write


async def _call(
    scene: _Scene, write: collections.abc.Callable[[], collections.abc.Awaitable[None]], started: list[float]
) -> None:
    """Make the call under the drawn cancellation point (and the test's own bound); record how it ended."""
    schedule, observation = scene.schedule, scene.observation
    cancel: asyncio.Timeout | None = None
    started[0] = time.monotonic()
    try:
        async with asyncio.timeout(schedule.safety_cap) as safety:
            if schedule.cancel_after is None:
                await write()
            else:
                # The loop's own lateness at the moment of cancelling (a busy 2-core machine, the coverage tracer)
                # is not the library's: measured by a timer due at the same moment, and allowed for.
                due = started[0] + schedule.cancel_after
                asyncio.get_running_loop().call_later(
                    schedule.cancel_after, lambda: setattr(observation, "loop_lateness", time.monotonic() - due)
                )
                async with asyncio.timeout(schedule.cancel_after) as cancel:
                    await write()
    except CommitOutcomeUnknownError:
        observation.result = "unknown"
    except TimeoutError as exc:
        if safety.expired():
            observation.result = "stuck"
        elif cancel is not None and cancel.expired():
            observation.result = "cancelled"
        else:
            observation.result = f"error: {type(exc).__qualname__}: {exc}"
    except Exception as exc:  # every other outcome is recorded, then judged
        observation.result = f"error: {type(exc).__qualname__}: {exc}"
    else:
        observation.result = "ok"
    observation.elapsed = time.monotonic() - started[0]


async def _play(scene: _Scene) -> dict[str, weakref.ref[typing.Any]]:
    """Warm a pool, let the fault strike, make the call; returns weak references to what must not outlive it."""
    schedule, nodes, proxy = scene.schedule, scene.nodes, scene.proxy
    engine = _engine(schedule, nodes, proxy, scene.app)
    refs: dict[str, weakref.ref[typing.Any]] = {
        "AsyncEngine": weakref.ref(engine),
        "Engine": weakref.ref(engine.sync_engine),
        "pool": weakref.ref(engine.sync_engine.pool),
    }

    def note_connection(dbapi_connection: typing.Any, _record: object) -> None:
        refs[f"driver connection {len(refs) - 2}"] = weakref.ref(dbapi_connection.driver_connection)

    event.listen(engine.sync_engine, "connect", note_connection)
    striker = _Striker(scene)
    started = [0.0]  # when the call started (set by _call), for the time of the first failure
    write = _work(scene, engine, striker, started)
    refs["work"] = weakref.ref(write)
    try:
        if schedule.fault == "demoted to read-only":
            async with faults.read_only(nodes.second):
                await _warm(engine)  # every pooled connection is on the first server
        else:
            await _warm(engine)
        if schedule.moment == "idle pool":
            scene.observation.struck += 1
            await _strike(scene, None)
        await _call(scene, write, started)
        await striker.settle()
        if schedule.fault == "cut after COMMIT":
            scene.observation.struck = proxy.cuts_fired
    finally:
        proxy.pass_through()  # a silent server speaks again, so that the pool can close its connections
        async with asyncio.timeout(10):
            await engine.dispose()
    return refs


def _collect() -> None:
    """Collect until nothing more is found: a finalizer (a driver connection's) may free more on the next pass."""
    for _ in range(5):
        if not gc.collect():
            return


async def _backends(nodes: Nodes, app: str) -> list[tuple[PostgresNode, int, str]]:
    """The sessions of application ``app`` on both servers: node, pid, and what they do."""
    found: list[tuple[PostgresNode, int, str]] = []
    for node in (nodes.first, nodes.second):
        admin = await node.connect()
        try:
            records = await admin.fetch(
                "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = $1", app
            )
        finally:
            await admin.close()
        found += [(node, r["pid"], f"{node.name} pid {r['pid']} {r['state']}: {r['query']}") for r in records]
    return found


async def _example(schedule: Schedule, nodes: Nodes, observation: Observation) -> weakref.ref[typing.Any]:
    app = f"sched_{secrets.token_hex(4)}"
    key = uuid.uuid4()
    first = nodes.first
    try:
        async with TcpProxy(first.host, first.port, reply_timeout=5) as proxy:
            # In a task of its own, as a request of a service runs: a task cancelled by asyncio.timeout keeps
            # its CancelledError (and so the frames of its traceback) until the task itself is gone.
            scene = _Scene(schedule, nodes, proxy, app, key, observation)
            refs = await asyncio.create_task(_play(scene))
            _collect()
            observation.alive = [name for name, ref in refs.items() if ref() is not None]
            # Invariant 6: the server sees the example's sessions end (it notices a closed socket at once,
            # or when a running statement ends); what is still there after LEFTOVER_WAIT was kept open.
            deadline = time.monotonic() + LEFTOVER_WAIT
            while (backends := await _backends(nodes, app)) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling the server: no event to wait on
            observation.leftovers = [description for _, _, description in backends]
            for node, pid, _ in backends:  # the next examples start clean
                await node.execute("SELECT pg_terminate_backend($1, 10000)", pid)
    finally:
        await faults.wait_accepting(first)  # a crash restart is over
        if schedule.fault == "demoted to read-only":
            await faults.set_read_only(first, value=False)
    # Taken once the proxy stopped (its tasks, wait_for's inner ones included, are over): the library's left.
    current = asyncio.current_task()
    observation.tasks = [repr(task) for task in asyncio.all_tasks() if task is not current]
    counts = [
        await node.fetchval("SELECT count(*) FROM schedule WHERE key = $1", key) for node in (first, nodes.second)
    ]
    observation.rows = sum(int(count) for count in counts)
    return weakref.ref(asyncio.get_running_loop())


def run_schedule(schedule: Schedule, nodes: Nodes) -> Observation:
    """Play ``schedule`` in an event loop of its own; the loop is closed and collected before returning."""
    observation = Observation()
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        loop = runner.run(_example(schedule, nodes, observation))
    _collect()
    if loop() is not None:
        observation.alive.append("event loop")
    return observation


# -- the invariants ----------------------------------------------------------------------------------------
def _check(schedule: Schedule, observed: Observation) -> None:
    """The six invariants; each assertion names its invariant, so Hypothesis reports each failure apart."""
    where = f"\n  {schedule}\n  {observed}"
    assert observed.rows <= 1, f"invariant 1 (no write doubled): {observed.rows} rows{where}"
    if observed.result == "ok":
        assert observed.rows == 1, f"invariant 2 (reported committed but not): {observed.rows} rows{where}"
    elif observed.result not in {"unknown", "cancelled", "stuck"}:  # unknown or cut short: 0 or 1 row
        assert observed.rows == 0, f"invariant 2 (an error, yet committed): {observed.rows} rows{where}"
    if schedule.cancel_after is not None:
        overshoot = observed.elapsed - schedule.cancel_after
        assert observed.elapsed <= schedule.cancel_after + observed.loop_lateness + CANCEL_SLACK, (
            f"invariant 3 (cancellation reaches the caller): ended {overshoot:.3f}s after asyncio.timeout"
            f"({schedule.cancel_after}){' (only the second cancellation ended it)' * (observed.result == 'stuck')}"
            f"{where}"
        )
    if schedule.retries is not None:
        assert observed.reached <= schedule.retries, (
            f"invariant 4 (attempts <= retries): {observed.reached} runs reached the server{where}"
        )
    if schedule.timeout is not None:
        budget_start = observed.first_failure or 0.0
        spent = observed.elapsed - budget_start
        assert spent <= schedule.timeout + schedule.attempt_allowance, (
            f"invariant 5 (time <= budget + one attempt): {spent:.3f}s after the first failure"
            f" > {schedule.timeout} + {schedule.attempt_allowance}{where}"
        )
    assert not observed.alive, f"invariant 6 (nothing retained): still referenced: {observed.alive}{where}"
    assert not observed.tasks, f"invariant 6 (nothing retained): tasks still running: {observed.tasks}{where}"
    assert not observed.leftovers, f"invariant 6 (nothing retained): sessions left: {observed.leftovers}{where}"
    assert observed.result != "stuck", f"the call never ended; the test's own bound stopped it{where}"


@SETTINGS
@hypothesis.given(data=st.data())
def test_generated_fault_schedules_keep_the_invariants(nodes: Nodes, data: st.DataObject) -> None:
    schedule = draw_schedule(data)
    observed = run_schedule(schedule, nodes)
    hypothesis.note(f"{schedule}\n{observed}")
    _check(schedule, observed)


# -- regression tests: examples the generated schedules found failing when this file was written ---------------
@pytest.mark.parametrize("resolve_commit", [False, True])
@pytest.mark.parametrize("style", AUTOCOMMIT)
@pytest.mark.parametrize("driver", DRIVERS)
def test_an_autocommit_insert_whose_answer_was_lost_is_not_written_twice(
    nodes: Nodes, driver: str, style: str, resolve_commit: bool
) -> None:
    # Invariant 1 (no write doubled): the INSERT committed itself, then the connection was cut; it was retried
    # as a lost connection and stored twice (resolve_commit or not: no COMMIT was in flight).
    schedule = Schedule(
        style=style, driver=driver, fault="cut after COMMIT", moment="at COMMIT", resolve_commit=resolve_commit
    )
    _check(schedule, run_schedule(schedule, nodes))


@pytest.mark.parametrize("moment", ["idle pool", "mid-statement"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_a_cancelled_call_on_a_silent_server_ends_at_once(nodes: Nodes, driver: str, moment: str) -> None:
    # Invariant 3 (cancellation reaches the caller): asyncpg's call ended about 2 s after asyncio.timeout(0.3);
    # psycopg's never ended by itself (only a second cancellation, 3 s later, ended it).
    sleep = STRIKE_SLEEP if moment == "mid-statement" else 0.0
    schedule = Schedule(
        style="engine.begin", driver=driver, fault="silent server", moment=moment, sleep=sleep, cancel_after=0.3
    )
    _check(schedule, run_schedule(schedule, nodes))


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_time_budget_ends_a_call_on_a_silent_server(nodes: Nodes, driver: str) -> None:
    # Invariant 5 (time <= budget + one attempt): with timeout=0.3 and no cancellation, the first attempt hangs
    # on the silent pooled connection and never fails, so the budget never starts: the call never ended.
    schedule = Schedule(style="session.commit", driver=driver, fault="silent server", moment="idle pool", timeout=0.3)
    _check(schedule, run_schedule(schedule, nodes))


@pytest.mark.parametrize(
    ("driver", "fault", "stop_after"),
    [
        ("asyncpg", "backend terminated", None),  # 4 runs reached the server with retries=1
        ("asyncpg", "crash restart", None),  # 3 runs
        ("psycopg", "crash restart", None),  # 3 runs
        ("psycopg", "backend terminated", 2.0),  # 4 runs: stop= replaced the attempt count
    ],
)
def test_retries_bound_the_runs_that_reached_the_server(
    nodes: Nodes, driver: str, fault: str, stop_after: float | None
) -> None:
    # Invariant 4 (attempts <= retries): the fault strikes each of the first three runs mid-statement, on warm
    # pooled connections that had never committed; each run reached the server, yet retries=1 did not stop them.
    schedule = Schedule(
        style="engine.begin",
        driver=driver,
        fault=fault,
        moment="mid-statement",
        strikes=(1, 2, 3),
        sleep=STRIKE_SLEEP,
        retries=1,
        stop_after=stop_after,
    )
    _check(schedule, run_schedule(schedule, nodes))


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_write_refused_by_a_demoted_node_waits_for_a_writable_one(nodes: Nodes, driver: str) -> None:
    # The pooled connection reached the demoted server, its INSERT got 25006 from a node that reports itself
    # read-only, and a second run went to the new read-write server. First found as "2 runs with retries=1":
    # the refusal is a wait for a writable node (like no host fitting target_session_attrs), not an attempt,
    # and invariant 4 counts it so; the call must succeed, stored once.
    schedule = Schedule(
        style="engine.begin", driver=driver, fault="demoted to read-only", moment="idle pool", retries=1
    )
    _check(schedule, run_schedule(schedule, nodes))
