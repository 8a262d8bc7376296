"""The project's one answer to two questions: is this number acceptable, and how is this failure told.

:func:`check_number` validates every numeric option (``postgres_retry``'s ``retries`` and ``timeout``,
the connection factory's timeouts, ``RoutingSessionMaker``'s bounds, the CLI's options) with pydantic,
and its error names the parameter and the bad value. :func:`number_argument` is the same check as an
argparse ``type``. :func:`describe_error` turns a failed connect or check into the one-line reason
that health reports, ``NoHostAvailableError`` and replica statuses show.
"""

import argparse
import functools
import os
import socket
import typing

import pydantic


__all__ = ["check_number", "describe_error", "number_argument"]

Number: typing.TypeAlias = int | float


@functools.cache
def _adapter(*, integer: bool, minimum: float, inclusive: bool, from_text: bool) -> pydantic.TypeAdapter[Number]:
    bound = {"ge": minimum} if inclusive else {"gt": minimum}
    # Strict for Python values (no bool, no "5"); lax for text from a DSN or a command line.
    field = pydantic.Field(strict=not from_text, allow_inf_nan=False, **bound)  # type: ignore[call-overload]
    kind: type[Number] = int if integer else float
    return pydantic.TypeAdapter(typing.Annotated[kind, field])  # type: ignore[arg-type] # a type built at run time


def _wanted(*, integer: bool, minimum: float, inclusive: bool, unit: str | None, allow_none: bool) -> str:
    noun = "an integer" if integer else "a number"
    of_unit = f" of {unit}" if unit else ""
    return f"{noun}{of_unit} {'>=' if inclusive else '>'} {minimum:g}{' or None' if allow_none else ''}"


@typing.overload
def check_number(
    name: str,
    value: object,
    *,
    minimum: float = 0,
    inclusive: bool = False,
    integer: bool = False,
    unit: str | None = None,
    allow_none: typing.Literal[False] = False,
    from_text: bool = False,
) -> Number: ...


@typing.overload
def check_number(
    name: str,
    value: object,
    *,
    minimum: float = 0,
    inclusive: bool = False,
    integer: bool = False,
    unit: str | None = None,
    allow_none: bool,
    from_text: bool = False,
) -> Number | None: ...


def check_number(  # noqa: PLR0913 - every constraint is keyword-only
    name: str,
    value: object,
    *,
    minimum: float = 0,
    inclusive: bool = False,
    integer: bool = False,
    unit: str | None = None,
    allow_none: bool = False,
    from_text: bool = False,
) -> Number | None:
    """``value`` as a finite number above ``minimum`` (at it too when ``inclusive``), else ``ValueError``.

    The message reads ``"<name> must be a number of <unit> > 0, got <value>"``. ``integer`` wants an
    ``int``; ``allow_none`` lets ``None`` through; ``from_text`` parses a string (DSN entries, command
    lines), where Python values must already be numbers (``True`` and ``"5"`` are refused).
    """
    if value is None and allow_none:
        return None
    try:
        return _adapter(integer=integer, minimum=minimum, inclusive=inclusive, from_text=from_text).validate_python(
            value
        )
    except pydantic.ValidationError:
        wanted = _wanted(integer=integer, minimum=minimum, inclusive=inclusive, unit=unit, allow_none=allow_none)
        msg = f"{name} must be {wanted}, got {value!r}" if name else f"must be {wanted}, got {value!r}"
        raise ValueError(msg) from None


def number_argument(
    *,
    minimum: float = 0,
    inclusive: bool = False,
    integer: bool = False,
    unit: str | None = None,
) -> typing.Callable[[str], Number]:
    """An argparse ``type`` running :func:`check_number` on the option's text (argparse names the option)."""

    def parse(text: str) -> Number:
        try:
            number = check_number(
                "", text, minimum=minimum, inclusive=inclusive, integer=integer, unit=unit, from_text=True
            )
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return number

    return parse


def describe_error(exc: BaseException, *, timeout: float | None = None, password: str | None = None) -> str:
    """One line saying why a connect or a check failed, never holding ``password``.

    A timeout says how long was waited; a failed name lookup says so; an ``OSError`` with an errno
    is the system's words for it (``connection refused``); anything else is the class name and the
    first line of its message.
    """
    if isinstance(exc, TimeoutError):
        reason = "timed out" if timeout is None else f"timed out after {timeout:g}s"
    elif isinstance(exc, socket.gaierror):  # its errno is negative: not an os.strerror() code
        reason = f"cannot resolve the host name: {str(exc.strerror).lower()}"
    elif isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        reason = os.strerror(exc.errno).lower()
    else:
        first_line = str(exc).strip().split("\n", 1)[0]
        reason = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    # No driver message is known to echo the password; this makes sure none ever does.
    return reason.replace(password, "***") if password else reason
