"""Pure classification tables: which errors are transient, and of which kind."""

import asyncio

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

from db_retry.retriable import (
    ErrorKind,
    classify,
    is_retriable,
    leaves_connection_unusable,
    sqlstate_of,
    sqlstate_on_chain,
)


class _Coded(Exception):
    """Any driver's error carrying a SQLSTATE (psycopg and asyncpg both expose ``sqlstate``)."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"error {sqlstate}")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("40001", ErrorKind.CONFLICT),
        ("40P01", ErrorKind.CONFLICT),
        ("08000", ErrorKind.OUTAGE),
        ("08003", ErrorKind.OUTAGE),
        ("08006", ErrorKind.OUTAGE),
        ("08001", ErrorKind.OUTAGE),
        ("57P01", ErrorKind.OUTAGE),
        ("57P02", ErrorKind.OUTAGE),
        ("25006", ErrorKind.OUTAGE),
        ("57P03", ErrorKind.UNAVAILABLE),
        ("53300", ErrorKind.UNAVAILABLE),
        ("08004", ErrorKind.OUTAGE),
        ("08007", ErrorKind.AMBIGUOUS),
        # Deliberately not transient (architecture/retriable.md says why).
        ("40002", None),
        ("40003", None),
        ("25P02", None),
        ("23505", None),
        ("42P01", None),
        ("57014", None),
        ("28P01", None),
        ("08P01", None),  # protocol violation: a client bug sends the same bytes again
        ("08999", None),  # a class 08 code nobody documented: not assumed transient
    ],
)
def test_sqlstate_table(sqlstate: str, kind: ErrorKind | None) -> None:
    assert classify(_Coded(sqlstate)) is kind
    assert is_retriable(_Coded(sqlstate)) is (kind in {ErrorKind.CONFLICT, ErrorKind.OUTAGE, ErrorKind.UNAVAILABLE})


def test_real_asyncpg_exception_classes_carry_their_codes() -> None:
    assert classify(asyncpg.SerializationError("x")) is ErrorKind.CONFLICT
    assert classify(asyncpg.DeadlockDetectedError("x")) is ErrorKind.CONFLICT
    assert classify(asyncpg.ConnectionDoesNotExistError("x")) is ErrorKind.OUTAGE
    assert classify(asyncpg.CannotConnectNowError("x")) is ErrorKind.UNAVAILABLE
    assert classify(asyncpg.UniqueViolationError("x")) is None


def _wrapped_by_sqlalchemy(error: Exception) -> sa.exc.DBAPIError:
    """What SQLAlchemy's asyncpg dialect raises: DBAPIError -> adapted error -> asyncpg error."""
    try:
        try:
            raise error
        except Exception as driver_error:
            adapted = AsyncAdapt_asyncpg_dbapi.Error(str(driver_error))  # type: ignore[no-untyped-call]
            raise adapted from driver_error
    except Exception as adapted_error:
        return sa.exc.DBAPIError("SELECT 1", None, adapted_error)


def test_walks_through_sqlalchemy_wrappers() -> None:
    wrapped = _wrapped_by_sqlalchemy(asyncpg.SerializationError("conflict"))
    assert classify(wrapped) is ErrorKind.CONFLICT
    assert sqlstate_on_chain(wrapped) == "40001"


def test_invalidated_connection_is_an_outage() -> None:
    error = sa.exc.DBAPIError("SELECT 1", None, Exception("connection is closed"), connection_invalidated=True)
    assert classify(error) is ErrorKind.OUTAGE
    assert classify(sa.exc.DBAPIError("SELECT 1", None, Exception("boom"))) is None


@pytest.mark.parametrize("error", [ConnectionRefusedError(111, "refused"), ConnectionResetError(104, "reset")])
def test_socket_errors_while_connecting_mean_unavailable(error: OSError) -> None:
    assert classify(error) is ErrorKind.UNAVAILABLE


def test_plain_errors_are_not_transient() -> None:
    assert classify(ValueError("x")) is None
    assert classify(TimeoutError()) is None
    assert sqlstate_on_chain(ValueError("x")) is None


def test_explicit_wrappers_are_seen_through_and_cycles_end() -> None:
    outer = RuntimeError("wrapper, e.g. advanced-alchemy's RepositoryError (raised `from` the database error)")
    inner = _Coded("40P01")
    outer.__cause__ = inner
    inner.__context__ = outer  # a cycle
    assert classify(outer) is ErrorKind.CONFLICT
    lonely = RuntimeError("a")
    other = RuntimeError("b")
    lonely.__cause__ = other
    other.__cause__ = lonely
    assert classify(lonely) is None


@pytest.mark.parametrize(
    "outer",
    [
        ValueError("the caller's own error"),
        _Coded("23505"),  # a fallback INSERT's unique violation
        asyncio.CancelledError(),  # a cancellation that arrived during the rollback
        KeyboardInterrupt(),
    ],
    ids=["ValueError", "23505", "CancelledError", "KeyboardInterrupt"],
)
def test_an_error_raised_while_handling_a_transient_one_decides(outer: BaseException) -> None:
    # Raised inside an ``except`` block that handled a 40001 (or a lost connection): only ``__context__``
    # links them. The outer error is what happened to the call; the conflict underneath no longer matters.
    for underneath in (_Coded("40001"), _Coded("08006")):
        outer.__context__ = underneath
        assert classify(outer) is None
        assert not is_retriable(outer)


def test_a_library_error_with_only_a_context_is_seen_through() -> None:
    # SQLAlchemy's and the drivers' own errors that say nothing themselves show what they were raised over.
    outer = sa.exc.InvalidRequestError("the transaction is inactive")
    outer.__context__ = _Coded("40001")
    assert classify(outer) is ErrorKind.CONFLICT


def test_ambiguous_anywhere_on_the_chain_wins() -> None:
    outer = _Coded("08006")
    outer.__cause__ = _Coded("08007")
    assert classify(outer) is ErrorKind.AMBIGUOUS
    assert not is_retriable(outer)


def test_outermost_transient_link_decides_the_kind() -> None:
    outer = _Coded("40001")
    outer.__context__ = _Coded("57P01")
    assert classify(outer) is ErrorKind.CONFLICT


def test_own_errors_declare_their_kind() -> None:
    class Declared(Exception):
        db_retry_kind = ErrorKind.UNAVAILABLE

    assert classify(Declared()) is ErrorKind.UNAVAILABLE


@pytest.mark.parametrize("value", [None, 40001, "4000", "400011"])
def test_only_five_character_codes_count(value: object) -> None:
    error = Exception()
    error.sqlstate = value  # type: ignore[attr-defined]
    assert sqlstate_of(error) is None


class _Said(Exception):
    """A server (or pooler) error as the drivers give it: a SQLSTATE and the message."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        # PgBouncer has no codes of its own: it says what happened in an 08P01.
        ("server login has been failing, try again later (server_login_retry)", ErrorKind.UNAVAILABLE),
        ("pgbouncer cannot connect to server", ErrorKind.UNAVAILABLE),
        ("query_wait_timeout", ErrorKind.UNAVAILABLE),
        ("no more connections allowed (max_client_conn)", ErrorKind.UNAVAILABLE),
        ("server conn crashed?", ErrorKind.OUTAGE),
        ("server shutting down", ErrorKind.OUTAGE),
        ("bind message supplies 2 parameters, but prepared statement requires 1", None),
        ("invalid frontend message type 0", None),
    ],
)
def test_protocol_violations_from_a_pooler(message: str, kind: ErrorKind | None) -> None:
    assert classify(_Said("08P01", message)) is kind
    assert classify(asyncpg.ProtocolViolationError(message)) is kind


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        # What psycopg raises without a SQLSTATE: connect failures (even when the server said why) ...
        ('connection failed: connection to server at "127.0.0.1", port 5 failed: Connection refused', "unavailable"),
        ("connection failed: FATAL:  the database system is starting up", "unavailable"),
        ("connection timeout expired", "unavailable"),
        # ... and a connection lost under a running statement.
        ("consuming input failed: server closed the connection unexpectedly", "outage"),
        ("the connection is lost", "outage"),
        ("the connection is closed", "outage"),
        ("sending query failed: another command is already in progress", None),
    ],
)
def test_psycopg_errors_without_a_sqlstate(message: str, kind: str | None) -> None:
    psycopg = pytest.importorskip("psycopg")
    error = psycopg.OperationalError(message)
    assert error.sqlstate is None
    assert classify(error) is (ErrorKind(kind) if kind else None)
    assert classify(psycopg.errors.ConnectionTimeout("timeout expired")) is ErrorKind.UNAVAILABLE
    assert classify(psycopg.ProgrammingError("the connection is closed")) is None  # not an OperationalError


def test_asyncpg_errors_without_a_sqlstate() -> None:
    assert classify(asyncpg.InterfaceError("connection is closed")) is ErrorKind.OUTAGE
    assert classify(asyncpg.InterfaceError("cannot perform operation: another operation is in progress")) is None
    assert classify(asyncpg.InternalClientError("cannot switch to state 11; another operation (2) is in progress")) is (
        ErrorKind.OUTAGE
    )
    # asyncpg's own multi-host connect found no host of the wanted role: worth waiting for, like ours.
    assert classify(asyncpg.TargetServerAttributeNotMatched("none")) is ErrorKind.UNAVAILABLE
    assert classify(ValueError("connection is closed")) is None


def test_which_errors_leave_a_connection_unusable() -> None:
    assert leaves_connection_unusable(_wrapped_by_sqlalchemy(asyncpg.InternalClientError("cannot switch to state 11")))
    assert not leaves_connection_unusable(asyncpg.TargetServerAttributeNotMatched("none"))
    assert not leaves_connection_unusable(asyncpg.InterfaceError("connection is closed"))


def test_an_error_whose_str_fails_is_still_classified() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise TypeError

    assert classify(Unprintable()) is None
    unprintable = Unprintable()
    unprintable.__cause__ = asyncpg.InterfaceError("connection is closed")
    assert classify(unprintable) is ErrorKind.OUTAGE
    protocol = Unprintable()
    protocol.sqlstate = "08P01"  # type: ignore[attr-defined]
    assert classify(protocol) is None


def test_a_driver_error_says_more_than_the_invalidated_flag_above_it() -> None:
    # PgBouncer's 08P01 on a connection SQLAlchemy invalidated: waiting for the server is right, not a
    # counted outage (before, the flag on the outermost link decided).
    wrapped = _wrapped_by_sqlalchemy(asyncpg.ProtocolViolationError("server login has been failing, try again later"))
    wrapped.connection_invalidated = True
    assert classify(wrapped) is ErrorKind.UNAVAILABLE
    # With nothing below that says anything, the flag still decides.
    assert classify(sa.exc.DBAPIError("SELECT 1", None, ValueError("?"), connection_invalidated=True)) is (
        ErrorKind.OUTAGE
    )


def test_asyncpg_holding_a_failed_begin_leaves_its_connection_unusable() -> None:
    assert leaves_connection_unusable(asyncpg.InterfaceError("nested transaction has a different isolation level"))
    assert leaves_connection_unusable(
        _wrapped_by_sqlalchemy(asyncpg.NoActiveSQLTransactionError("SAVEPOINT can only be used in transaction blocks")),
    )
    assert not leaves_connection_unusable(asyncpg.NoActiveSQLTransactionError("there is no transaction in progress"))


def test_psycopg_reading_another_commands_results_is_a_lost_connection() -> None:
    # What psycopg raises when a result it did not ask for comes first (PgBouncer's error on an idle client
    # connection while its server restarts, read as the first result of the next BEGIN): built by hand, as
    # no server sends it on demand; the PgBouncer proof meets it for real.
    import psycopg  # noqa: PLC0415 - the optional driver

    out_of_step = psycopg.InternalError("received 2 results from command 'BEGIN ISOLATION LEVEL READ COMMITTED'")
    assert classify(out_of_step) is ErrorKind.OUTAGE
    assert leaves_connection_unusable(out_of_step)
    other = psycopg.InternalError("something else")
    assert classify(other) is None
    assert not leaves_connection_unusable(other)
