"""The ``db-retry`` command line: its commands, help, version and exit statuses."""

import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

from db_retry import cli


VERSION = importlib.metadata.version("db-retry")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"db-retry {VERSION}\n"


def test_help_lists_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: db-retry")
    assert "--version" in out
    assert "check" in out
    assert "probe every host of a DSN" in out
    assert "demo" in out
    assert "run transfers through the library" in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: db-retry")
    assert "commands:" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["check"], "the following arguments are required: DSN"),
        (["check", "postgresql://h/db", "--timeout", "0"], "argument --timeout: must be a number of seconds > 0"),
        (["demo", "--workers", "0"], "argument --workers: must be an integer >= 1, got '0'"),
    ],
)
def test_usage_errors_exit_2_naming_the_bad_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_malformed_dsn_exits_2_before_any_connect(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "mysql://app:s3cret@127.0.0.1/db"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "db-retry check: malformed DSN 'mysql://app:***@127.0.0.1/db': mysql:// is not PostgreSQL; "
        "expected postgresql://, postgresql+asyncpg:// or postgresql+psycopg://\n"
    )


def test_console_script_is_installed() -> None:
    script = pathlib.Path(sys.executable).with_name("db-retry")
    completed = subprocess.run([script, "--version"], capture_output=True, text=True, check=False, timeout=60)  # noqa: S603
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"db-retry {VERSION}\n"

    completed = subprocess.run([script, "--help"], capture_output=True, text=True, check=False, timeout=60)  # noqa: S603
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: db-retry")

    completed = subprocess.run(  # noqa: S603
        [script, "check", "http://h/db"], capture_output=True, text=True, check=False, timeout=60
    )
    assert completed.returncode == 2
    assert "http:// is not PostgreSQL" in completed.stderr
