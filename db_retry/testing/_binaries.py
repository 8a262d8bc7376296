"""Locate the PostgreSQL server binaries the test kit runs."""

import glob
import os
import pathlib
import shutil
import subprocess
import typing


BINDIR_ENV: typing.Final = "DB_RETRY_PG_BINDIR"
_REQUIRED: typing.Final = ("initdb", "pg_ctl", "postgres", "pg_basebackup")
_USUAL_PATTERNS: typing.Final = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/usr/local/pgsql/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
    "/usr/local/opt/postgresql@*/bin",
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)
INSTALL_HINT: typing.Final = (
    "Install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`; "
    "Fedora/RHEL: `dnf install postgresql-server`; macOS: `brew install postgresql@16`) "
    f"or point {BINDIR_ENV} at the directory holding initdb and pg_ctl."
)


class PostgresBinariesNotFoundError(RuntimeError):
    """No directory with the PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_basebackup) was found."""

    def __init__(self, searched: typing.Sequence[str]) -> None:
        self.searched = tuple(searched)
        listing = "; ".join(self.searched) or "nothing"
        super().__init__(f"PostgreSQL server binaries not found (searched: {listing}). {INSTALL_HINT}")


def _has_server(directory: pathlib.Path) -> bool:
    return all((directory / name).is_file() and os.access(directory / name, os.X_OK) for name in _REQUIRED)


def _version_key(directory: str) -> tuple[int, ...]:
    digits = "".join(ch if ch.isdigit() else " " for ch in directory).split()
    return tuple(int(part) for part in digits)


def _pg_config_bindir(pg_config: str | None) -> pathlib.Path | None:
    if pg_config is None:
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10)  # noqa: S603
    except (OSError, subprocess.SubprocessError):
        return None
    return pathlib.Path(out.stdout.strip())


def find_postgres_bindir(explicit: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return the directory of the PostgreSQL server binaries.

    Looked up in order: ``explicit``, the ``DB_RETRY_PG_BINDIR`` environment variable,
    ``pg_config --bindir``, the usual install locations (newest version first), then ``PATH``.
    """
    searched: list[str] = []
    candidates: list[tuple[str, pathlib.Path | None]] = []
    if explicit is not None:
        candidates.append(("argument", pathlib.Path(explicit)))
    env_value = os.environ.get(BINDIR_ENV)
    if env_value:
        candidates.append((BINDIR_ENV, pathlib.Path(env_value)))
    for label, directory in candidates:
        searched.append(f"{label}={directory}")
        if directory is not None and _has_server(directory):
            return directory
    if candidates:
        # An explicit choice that is wrong must not silently fall back to another server.
        raise PostgresBinariesNotFoundError(searched)

    pg_config = shutil.which("pg_config")
    from_pg_config = _pg_config_bindir(pg_config)
    searched.append(f"pg_config --bindir ({from_pg_config or 'no pg_config on PATH'})")
    if from_pg_config is not None and _has_server(from_pg_config):
        return from_pg_config

    for pattern in _USUAL_PATTERNS:
        searched.append(pattern)
        for found in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            if _has_server(pathlib.Path(found)):
                return pathlib.Path(found)

    searched.append("PATH")
    on_path = shutil.which("postgres")
    if on_path is not None and _has_server(pathlib.Path(on_path).parent):
        return pathlib.Path(on_path).parent
    raise PostgresBinariesNotFoundError(searched)
