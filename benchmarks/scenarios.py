"""The scenario process: ``python -I scenarios.py NAME PARAMS_JSON``, run in one interpreter per package.

``run.py`` starts it in ours and in db-retry 0.8.4's virtualenv (both import as ``db_retry``) from a directory
outside the repository, so ``db_retry`` is whatever that interpreter has installed. NAME is the module of the
scenario in this directory (``overhead``, ``connect``, ``contention``, ``callers``, ``disconnects``); its
``child(params)`` coroutine is the side measured here. Only the API both packages share is used:
``postgres_retry``, ``build_connection_factory``, ``build_db_dsn`` and ``Transaction``, with default settings.

The process talks to ``run.py`` through lines on stdout that start with ``@`` (``@HELLO``, ``@READY``,
``@RESULT``, each followed by JSON) and reads commands (``go``, ``stop``, ``exit``) on stdin. Everything else
(log records, warnings) goes to stderr, which ``run.py`` keeps in a log file.
"""

import asyncio
import importlib
import importlib.metadata
import json
import pathlib
import sys
import typing


# `-I` leaves the script's directory off sys.path (so no `db_retry` from the repository); the scenario modules
# live next to this file, and this directory holds no `db_retry`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from child import Params, Result, emit

import db_retry


CHILDREN: typing.Final = ("overhead", "connect", "contention", "callers", "disconnects")


def main() -> None:
    name, params = sys.argv[1], json.loads(sys.argv[2])
    if name not in CHILDREN:
        msg = f"unknown scenario {name!r}: one of {', '.join(CHILDREN)}"
        raise SystemExit(msg)
    child: typing.Callable[[Params], typing.Coroutine[typing.Any, typing.Any, Result]] = importlib.import_module(
        name
    ).child
    versions = {
        package: importlib.metadata.version(package)
        for package in ("db-retry", "sqlalchemy", "asyncpg", "greenlet", "tenacity")
        if package != "tenacity" or _installed(package)
    }
    emit("HELLO", {"file": db_retry.__file__, "python": sys.version.split()[0], "versions": versions})
    result = asyncio.run(child(params))
    emit("RESULT", result)
    sys.stdin.readline()  # run.py may look at the server (leftover sessions) before this process exits


def _installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
