"""The one number check and the one error describer every module uses."""

import argparse
import errno
import re
import socket
import typing

import pytest

from db_retry.validation import check_number, describe_error, number_argument


@pytest.mark.parametrize(
    ("value", "options", "expected"),
    [
        (2, {}, 2.0),
        (0.5, {"unit": "seconds"}, 0.5),
        (0, {"inclusive": True}, 0.0),
        (None, {"allow_none": True}, None),
        (3, {"integer": True, "minimum": 1, "inclusive": True}, 3),
        ("1.5", {"from_text": True}, 1.5),
        ("4", {"integer": True, "from_text": True}, 4),
    ],
)
def test_acceptable_numbers_come_back(value: object, options: dict[str, typing.Any], expected: object) -> None:
    checked = check_number("x", value, **options)
    assert checked == expected
    assert type(checked) is type(expected)


@pytest.mark.parametrize(
    ("value", "options", "message"),
    [
        (0, {"unit": "seconds"}, "timeout must be a number of seconds > 0, got 0"),
        (-1, {"inclusive": True}, "timeout must be a number >= 0, got -1"),
        (True, {}, "timeout must be a number > 0, got True"),
        ("5", {}, "timeout must be a number > 0, got '5'"),  # a Python caller passes numbers
        (float("inf"), {}, "timeout must be a number > 0, got inf"),
        (float("nan"), {}, "timeout must be a number > 0, got nan"),
        (None, {}, "timeout must be a number > 0, got None"),
        (0, {"allow_none": True}, "timeout must be a number > 0 or None, got 0"),
        (1.5, {"integer": True, "minimum": 1, "inclusive": True}, "timeout must be an integer >= 1, got 1.5"),
        ("soon", {"from_text": True, "unit": "seconds"}, "timeout must be a number of seconds > 0, got 'soon'"),
        ("inf", {"from_text": True}, "timeout must be a number > 0, got 'inf'"),
        ("2.5", {"from_text": True, "integer": True}, "timeout must be an integer > 0, got '2.5'"),
    ],
)
def test_a_bad_number_is_named_with_its_value(value: object, options: dict[str, typing.Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_number("timeout", value, **options)


def test_a_command_line_option_is_parsed_and_argparse_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="prog")
    parser.add_argument("--workers", type=number_argument(minimum=1, inclusive=True, integer=True))
    assert parser.parse_args(["--workers", "3"]).workers == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["--workers", "0"])
    assert "argument --workers: must be an integer >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "options", "reason"),
    [
        (TimeoutError(), {"timeout": 0.5}, "timed out after 0.5s"),
        (TimeoutError(), {}, "timed out"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"), {}, "connection refused"),
        (OSError(-5, "negative"), {}, "OSError: [Errno -5] negative"),
        (
            socket.gaierror(-2, "Name or service not known"),
            {},
            "cannot resolve the host name: name or service not known",
        ),
        (OSError("no errno"), {}, "OSError: no errno"),
        (RuntimeError("first line\nsecond line"), {}, "RuntimeError: first line"),
        (RuntimeError(), {}, "RuntimeError"),
        (RuntimeError("password s3cret rejected"), {"password": "s3cret"}, "RuntimeError: password *** rejected"),
        (RuntimeError("nothing secret"), {"password": ""}, "RuntimeError: nothing secret"),
    ],
)
def test_describe_error_is_one_line_without_the_password(
    error: BaseException, options: dict[str, typing.Any], reason: str
) -> None:
    assert describe_error(error, **options) == reason
