"""The ``db-retry`` command line."""

import argparse
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


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: db-retry")
    assert "--version" in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: db-retry")


def test_unknown_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--no-such-option"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def _add_echo(subparsers: cli.SubParsers) -> None:
    parser = subparsers.add_parser("echo", help="print the words and exit with their count")
    parser.add_argument("words", nargs="*")

    def run(args: argparse.Namespace) -> int:
        print(" ".join(args.words))  # noqa: T201 - the command's output
        return len(args.words)

    parser.set_defaults(handler=run)


def test_registered_subcommand_is_listed_and_dispatched(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "COMMANDS", (_add_echo,))

    assert cli.main(["echo", "a", "b", "c"]) == 3
    assert capsys.readouterr().out == "a b c\n"

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    assert "commands:" in help_text
    assert "print the words and exit with their count" in help_text

    assert cli.main([]) == 2
    assert "echo" in capsys.readouterr().err


def test_without_subcommands_there_is_no_commands_section(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "COMMANDS", ())
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: db-retry [-h] [--version]\n")
    assert "commands:" not in err


def test_console_script_is_installed() -> None:
    script = pathlib.Path(sys.executable).with_name("db-retry")
    completed = subprocess.run([script, "--version"], capture_output=True, text=True, check=False, timeout=60)  # noqa: S603
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"db-retry {VERSION}\n"

    completed = subprocess.run([script, "--help"], capture_output=True, text=True, check=False, timeout=60)  # noqa: S603
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: db-retry")
