"""postgres_retry: decoration rules, attempt counting, backoff, logging, and real server errors."""

import asyncio
import collections.abc
import inspect
import logging
import random
import typing

import asyncpg
import pytest
import sqlalchemy as sa
import tenacity
from advanced_alchemy.exceptions import RepositoryError, wrap_sqlalchemy_exception
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from db_retry import ErrorKind, RetryEvent, Transaction, postgres_retry, wait_for_error
from db_retry import retry as retry_module
from db_retry.settings import get_settings


async def _no_sleep(_: float) -> None:
    """Injected sleep for unit tests: backoff is checked through events, not by waiting."""


class _Coded(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def _failing(
    errors: collections.abc.Sequence[BaseException],
    result: str = "done",
) -> tuple[collections.abc.Callable[[], collections.abc.Coroutine[typing.Any, typing.Any, str]], list[int]]:
    calls: list[int] = []

    async def work() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return work, calls


# -- decoration -------------------------------------------------------------------------------------


async def test_bare_and_called_forms_keep_name_doc_and_signature() -> None:
    async def fetch(user_id: int, *, verbose: bool = False) -> str:
        """Fetch a user."""
        return f"{user_id}:{verbose}"

    for decorated in (postgres_retry(fetch), postgres_retry(retries=2)(fetch)):
        assert decorated.__name__ == "fetch"
        assert decorated.__doc__ == "Fetch a user."
        assert inspect.signature(decorated) == inspect.signature(fetch)
        assert inspect.iscoroutinefunction(decorated)
        assert await decorated(7, verbose=True) == "7:True"


async def test_methods_are_decorated_too() -> None:
    class Repo:
        def __init__(self) -> None:
            self.calls = 0

        @postgres_retry(sleep=_no_sleep)
        async def load(self, key: str) -> str:
            self.calls += 1
            if self.calls == 1:
                raise _Coded("40001")
            return key

    repo = Repo()
    assert await repo.load("k") == "k"
    assert repo.calls == 2


def test_non_coroutine_functions_are_refused_at_decoration() -> None:
    def sync_work() -> None: ...

    with pytest.raises(TypeError, match="sync_work"):
        postgres_retry(sync_work)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sync_work"):
        postgres_retry(retries=2)(sync_work)  # type: ignore[arg-type]


@pytest.mark.parametrize("retries", [0, -1, True, 1.5])
def test_bad_retries_are_refused(retries: typing.Any) -> None:
    with pytest.raises(ValueError, match=f"got {retries!r}"):
        postgres_retry(retries=retries)


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_bad_timeout_is_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        postgres_retry(timeout=timeout)


# -- attempts -----------------------------------------------------------------------------------------


async def test_retries_counts_total_attempts_and_reraises_the_original() -> None:
    errors = [_Coded("40001"), _Coded("40P01"), _Coded("08006")]
    work, calls = _failing(errors)
    with pytest.raises(_Coded) as caught:
        await postgres_retry(retries=3, sleep=_no_sleep)(work)()
    assert caught.value is errors[2]
    assert len(calls) == 3


async def test_non_transient_errors_propagate_at_once_as_the_same_object() -> None:
    error = _Coded("23505")
    work, calls = _failing([error])
    with pytest.raises(_Coded) as caught:
        await postgres_retry(work)()
    assert caught.value is error
    assert calls == [1]


async def test_a_non_transient_error_after_a_retry_stops(caplog: pytest.LogCaptureFixture) -> None:
    final = ValueError("bug")
    work, calls = _failing([_Coded("40001"), final])
    with caplog.at_level(logging.INFO, logger="db_retry.retry"), pytest.raises(ValueError, match="bug") as caught:
        await postgres_retry(sleep=_no_sleep)(work)()
    assert caught.value is final
    assert len(calls) == 2
    assert "non-transient builtins.ValueError; not retrying" in caplog.text


async def test_default_attempts_come_from_the_environment_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    @postgres_retry(sleep=_no_sleep)
    async def always_conflicts() -> None:
        calls.append(1)
        raise _Coded("40001")

    for attempts in ("2", "4"):
        calls: list[int] = []
        monkeypatch.setenv("DB_RETRY_RETRIES_NUMBER", attempts)
        with pytest.raises(_Coded):
            await always_conflicts()
        assert len(calls) == int(attempts)


async def test_unreachable_server_attempts_do_not_count_but_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_RETRY_OUTAGE_TIMEOUT", "1")
    unavailable = [ConnectionRefusedError(111, "refused")] * 6
    work, calls = _failing([*unavailable, _Coded("40001")])
    assert await postgres_retry(retries=2)(work)() == "done"
    assert len(calls) == 8

    refused = ConnectionRefusedError(111, "refused")

    @postgres_retry(retries=2)
    async def never_up() -> None:
        raise refused

    with pytest.raises(ConnectionRefusedError) as caught:
        await never_up()
    assert caught.value is refused


async def test_total_time_budget_stops_retrying() -> None:
    calls: list[float] = []

    @postgres_retry(retries=1000, timeout=0.05)
    async def conflicts() -> None:
        calls.append(asyncio.get_running_loop().time())
        raise _Coded("40001")

    with pytest.raises(_Coded):
        await conflicts()
    assert 2 <= len(calls) < 1000


async def test_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_RETRY_TIMEOUT", "0.05")
    calls: list[int] = []

    @postgres_retry(retries=1000)
    async def conflicts() -> None:
        calls.append(1)
        raise _Coded("40001")

    with pytest.raises(_Coded):
        await conflicts()
    assert 2 <= len(calls) < 1000


async def test_tenacity_strategies_are_accepted() -> None:
    work, calls = _failing([_Coded("40001")] * 10)
    decorated = postgres_retry(stop=tenacity.stop_after_attempt(5), wait=tenacity.wait_fixed(0), sleep=_no_sleep)
    with pytest.raises(_Coded):
        await decorated(work)()
    assert len(calls) == 5


async def test_ambiguous_commits_are_retried_only_on_request() -> None:
    class Unknown(Exception):
        db_retry_kind = ErrorKind.AMBIGUOUS

    work, calls = _failing([Unknown()])
    with pytest.raises(Unknown):
        await postgres_retry(sleep=_no_sleep)(work)()
    assert len(calls) == 1

    work, calls = _failing([Unknown()])
    assert await postgres_retry(retry_ambiguous_commit=True, sleep=_no_sleep)(work)() == "done"
    assert len(calls) == 2


# -- contention -------------------------------------------------------------------------------------


async def test_calls_arriving_during_a_conflict_queue_behind_it() -> None:
    release = asyncio.Event()
    conflicted = asyncio.Event()
    order: list[str] = []

    async def held_sleep(_: float) -> None:
        await release.wait()  # keeps the first call in its conflict retry while the second arrives

    @postgres_retry(sleep=held_sleep)
    async def hot(name: str) -> str:
        order.append(name)
        if name == "bug":
            raise ValueError(name)
        if order.count(name) == 1 and name != "second":
            conflicted.set()
            raise _Coded("40001")
        return name

    first = asyncio.create_task(hot("first"))
    await conflicted.wait()
    gates = retry_module._GATES.setdefault(asyncio.get_running_loop(), {})
    gates.pop(hot.__qualname__, None)
    assert await hot("second") == "second"  # a conflict is being retried: this call took the gate
    assert hot.__qualname__ in gates
    with pytest.raises(ValueError, match="bug"):
        await hot("bug")  # a queued call's own error still propagates at once
    third = asyncio.create_task(hot("third"))  # queued, conflicts, and retries like any other
    await asyncio.sleep(0.01)
    release.set()
    assert list(await asyncio.gather(first, third)) == ["first", "third"]
    assert order == ["first", "second", "bug", "third", "first", "third"]

    @postgres_retry
    async def calm() -> str:
        return "parallel again"

    assert await calm() == "parallel again"


async def test_a_stuck_turn_holds_the_queue_only_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_RETRY_CONFLICT_MAX_DELAY", "0.005")  # patience: 10 x 5 ms
    work, calls = _failing([_Coded("40001")])
    decorated = postgres_retry(sleep=_no_sleep)(work)
    lock = retry_module._GATES.setdefault(asyncio.get_running_loop(), {}).setdefault(
        "_failing.<locals>.work",
        asyncio.Lock(),
    )
    async with lock:  # someone else's turn that never ends
        assert await decorated() == "done"
    assert len(calls) == 2


async def test_many_writers_on_one_hot_row_all_succeed_with_the_default_budget(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(sa.text("INSERT INTO retry_items VALUES (1, '0')"))

    @postgres_retry
    async def increment() -> None:
        async with Transaction(session=AsyncSession(engine), isolation_level="SERIALIZABLE") as transaction:
            note = await transaction.session.scalar(sa.text("SELECT note FROM retry_items WHERE id = 1"))
            await transaction.session.execute(
                sa.text("UPDATE retry_items SET note = :note WHERE id = 1"),
                {"note": str(int(str(note)) + 1)},
            )
            await transaction.commit()

    await asyncio.gather(*(increment() for _ in range(16)))
    async with engine.connect() as connection:
        assert await connection.scalar(sa.text("SELECT note FROM retry_items")) == "16"


# -- backoff ------------------------------------------------------------------------------------------


async def test_waits_depend_on_the_kind_of_failure() -> None:
    random.seed(7)
    events: list[RetryEvent] = []
    settings = get_settings()
    errors = [_Coded("40001")] * 4 + [_Coded("57P01")] * 4
    work, _ = _failing(errors)
    await postgres_retry(retries=20, on_retry=events.append, sleep=_no_sleep)(work)()
    conflict_waits = [event.wait for event in events if event.kind is ErrorKind.CONFLICT]
    outage_waits = [event.wait for event in events if event.kind is ErrorKind.OUTAGE]
    assert len(conflict_waits) == len(outage_waits) == 4
    assert all(0 <= wait <= settings.conflict_max_delay for wait in conflict_waits)
    assert all(0 <= wait <= settings.outage_max_delay for wait in outage_waits)
    # Full jitter under an exponential ceiling: the n-th conflict wait is at most base * 2**(n-1).
    assert all(wait <= settings.conflict_delay * 2**index for index, wait in enumerate(conflict_waits))


def test_wait_for_error_composes_with_other_strategies() -> None:
    strategy = wait_for_error(conflict=tenacity.wait_fixed(0.01), outage=tenacity.wait_fixed(1))
    state = tenacity.RetryCallState(retry_object=tenacity.AsyncRetrying(), fn=None, args=(), kwargs={})
    state.set_exception((_Coded, _Coded("40001"), None))
    assert strategy(state) == pytest.approx(0.01)
    state.set_exception((_Coded, _Coded("57P01"), None))
    assert strategy(state) == pytest.approx(1)
    assert (strategy + tenacity.wait_fixed(1))(state) == pytest.approx(2)
    empty = tenacity.RetryCallState(retry_object=tenacity.AsyncRetrying(), fn=None, args=(), kwargs={})
    assert strategy(empty) == pytest.approx(1)


# -- telemetry ----------------------------------------------------------------------------------------


async def test_each_retry_and_the_give_up_are_logged_with_fields(caplog: pytest.LogCaptureFixture) -> None:
    work, _ = _failing([_Coded("40001")] * 5)
    with caplog.at_level(logging.INFO, logger="db_retry.retry"), pytest.raises(_Coded):
        await postgres_retry(retries=2, sleep=_no_sleep)(work)()
    retry_record, give_up = caplog.records
    assert retry_record.levelno == logging.INFO
    assert retry_record.db_retry_function.endswith("_failing.<locals>.work")  # type: ignore[attr-defined]
    assert retry_record.db_retry_attempt == 1  # type: ignore[attr-defined]
    assert retry_record.db_retry_sqlstate == "40001"  # type: ignore[attr-defined]
    assert retry_record.db_retry_kind == "conflict"  # type: ignore[attr-defined]
    assert retry_record.db_retry_error_class == "test_retry._Coded"  # type: ignore[attr-defined]
    assert retry_record.db_retry_wait >= 0  # type: ignore[attr-defined]
    assert give_up.levelno == logging.WARNING
    assert "giving up" in give_up.getMessage()
    assert give_up.db_retry_attempt == 2  # type: ignore[attr-defined]


async def test_on_retry_hook_failures_do_not_break_the_call(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[RetryEvent] = []

    def broken_hook(event: RetryEvent) -> None:
        seen.append(event)
        raise RuntimeError

    work, calls = _failing([_Coded("40P01")])
    with caplog.at_level(logging.ERROR, logger="db_retry.retry"):
        assert await postgres_retry(on_retry=broken_hook, sleep=_no_sleep)(work)() == "done"
    assert len(calls) == 2
    assert seen[0].sqlstate == "40P01"
    assert "on_retry hook" in caplog.text
    assert "error=" not in repr(seen[0])


# -- against a real server -------------------------------------------------------------------------------


@pytest.fixture(params=["asyncpg", "psycopg"])
async def engine(pg_dsn: str, request: pytest.FixtureRequest) -> collections.abc.AsyncIterator[AsyncEngine]:
    """The same tests through both drivers: SQLAlchemy's asyncpg and psycopg 3 dialects."""
    engine = create_async_engine(sa.make_url(pg_dsn).set(drivername=f"postgresql+{request.param}"), pool_size=2)
    async with engine.begin() as connection:
        await connection.execute(sa.text("DROP TABLE IF EXISTS retry_items"))
        await connection.execute(sa.text("CREATE TABLE retry_items (id int PRIMARY KEY, note text)"))
    yield engine
    await engine.dispose()


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(sa.text("SELECT count(*) FROM retry_items"))).scalar_one())


@pytest.mark.parametrize("sqlstate", ["40001", "40P01", "08000", "08003", "08006", "57P01", "57P02", "25006"])
async def test_server_raised_transient_codes_are_retried_without_losing_or_doubling_writes(
    engine: AsyncEngine,
    sqlstate: str,
) -> None:
    attempts: list[int] = []

    @postgres_retry(retries=3, sleep=_no_sleep)
    async def insert_then_fail_twice() -> None:
        attempts.append(1)
        async with Transaction(session=AsyncSession(engine)) as transaction:
            await transaction.session.execute(sa.text("INSERT INTO retry_items VALUES (1, 'x')"))
            if len(attempts) < 3:
                await transaction.session.execute(sa.text(f"DO $$ BEGIN RAISE SQLSTATE '{sqlstate}'; END $$"))
            await transaction.commit()

    await insert_then_fail_twice()
    assert len(attempts) == 3
    assert await _count(engine) == 1


@pytest.mark.parametrize("sqlstate", ["57P03", "53300"])
async def test_server_raised_unavailable_codes_do_not_use_up_attempts(engine: AsyncEngine, sqlstate: str) -> None:
    attempts: list[int] = []

    @postgres_retry(retries=1, sleep=_no_sleep)
    async def fails_four_times() -> None:
        attempts.append(1)
        async with engine.begin() as connection:
            if len(attempts) <= 4:
                await connection.execute(sa.text(f"DO $$ BEGIN RAISE SQLSTATE '{sqlstate}'; END $$"))

    await fails_four_times()
    assert len(attempts) == 5


async def test_server_raised_non_transient_error_is_not_retried(engine: AsyncEngine) -> None:
    attempts: list[int] = []
    async with engine.begin() as connection:
        await connection.execute(sa.text("INSERT INTO retry_items VALUES (1, 'x')"))

    @postgres_retry
    async def duplicate() -> None:
        attempts.append(1)
        async with engine.begin() as connection:
            await connection.execute(sa.text("INSERT INTO retry_items VALUES (1, 'again')"))

    with pytest.raises(sa.exc.IntegrityError) as caught:
        await duplicate()
    assert isinstance(caught.value.orig, Exception)
    assert attempts == [1]


async def test_real_serialization_conflict_between_two_transactions(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(sa.text("INSERT INTO retry_items VALUES (1, '0')"))
    both_read = asyncio.Barrier(2)
    attempts: list[str] = []

    @postgres_retry(retries=3, sleep=_no_sleep)
    async def increment(name: str) -> None:
        attempts.append(name)
        first_attempt = attempts.count(name) == 1
        async with Transaction(session=AsyncSession(engine), isolation_level="SERIALIZABLE") as transaction:
            note = (await transaction.session.execute(sa.text("SELECT note FROM retry_items WHERE id = 1"))).scalar()
            if first_attempt:
                await both_read.wait()  # both transactions have read the old value
            await transaction.session.execute(
                sa.text("UPDATE retry_items SET note = :note WHERE id = 1"),
                {"note": str(int(str(note)) + 1)},
            )
            await transaction.commit()

    await asyncio.gather(increment("a"), increment("b"))
    async with engine.connect() as connection:
        assert (await connection.execute(sa.text("SELECT note FROM retry_items"))).scalar() == "2"
    assert len(attempts) == 3  # exactly one transaction lost the conflict and ran again


async def test_real_deadlock_between_two_sessions(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(sa.text("INSERT INTO retry_items VALUES (1, ''), (2, '')"))
    both_locked = asyncio.Barrier(2)
    attempts: list[int] = []

    @postgres_retry(retries=3, sleep=_no_sleep)
    async def lock_in_order(first: int, second: int) -> None:
        attempts.append(first)
        first_attempt = attempts.count(first) == 1
        async with Transaction(session=AsyncSession(engine)) as transaction:
            update = sa.text("UPDATE retry_items SET note = note || :tag WHERE id = :id")
            await transaction.session.execute(update, {"tag": str(first), "id": first})
            if first_attempt:
                await both_locked.wait()
            await transaction.session.execute(update, {"tag": str(first), "id": second})
            await transaction.commit()

    await asyncio.gather(lock_in_order(1, 2), lock_in_order(2, 1))
    assert len(attempts) == 3  # the deadlock victim ran once more
    async with engine.connect() as connection:
        notes = (await connection.execute(sa.text("SELECT note FROM retry_items ORDER BY id"))).scalars().all()
    assert sorted(notes[0]) == sorted(notes[1]) == ["1", "2"]  # each transaction applied once to each row


async def test_real_stale_pooled_connection_killed_by_the_server(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        pid = (await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
    # NullPool: a one-off admin connection, outside the engine under test, closed at once.
    async with create_async_engine(engine.url, poolclass=sa.NullPool).connect() as admin:
        await admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    attempts: list[int] = []

    @postgres_retry(sleep=_no_sleep)
    async def write() -> None:
        attempts.append(1)
        async with Transaction(session=AsyncSession(engine)) as transaction:
            await transaction.session.execute(sa.text("INSERT INTO retry_items VALUES (1, 'after')"))
            await transaction.commit()

    await write()
    assert len(attempts) == 2
    assert await _count(engine) == 1


async def test_errors_rewrapped_by_advanced_alchemy_are_retried(engine: AsyncEngine) -> None:
    attempts: list[int] = []

    @postgres_retry(sleep=_no_sleep)
    async def repository_call() -> None:
        attempts.append(1)
        with wrap_sqlalchemy_exception(dialect_name="postgresql"):
            async with engine.begin() as connection:
                if len(attempts) == 1:
                    await connection.execute(sa.text("DO $$ BEGIN RAISE SQLSTATE '40001'; END $$"))

    with pytest.raises(RepositoryError), wrap_sqlalchemy_exception(dialect_name="postgresql"):
        async with engine.begin() as connection:  # the wrapper really is what a caller sees
            await connection.execute(sa.text("DO $$ BEGIN RAISE SQLSTATE '40001'; END $$"))
    await repository_call()
    assert len(attempts) == 2


async def test_asyncpg_errors_without_sqlalchemy_are_classified(pg_dsn: str) -> None:
    url = sa.make_url(pg_dsn).set(drivername="postgresql")
    attempts: list[int] = []

    @postgres_retry(sleep=_no_sleep)
    async def raw() -> None:
        attempts.append(1)
        connection = await asyncpg.connect(url.render_as_string(hide_password=False))
        try:
            if len(attempts) == 1:
                await connection.execute("DO $$ BEGIN RAISE SQLSTATE '40P01'; END $$")
        finally:
            await connection.close()

    await raw()
    assert len(attempts) == 2
