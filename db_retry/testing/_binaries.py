"""Locate the PostgreSQL server binaries the test kit runs."""

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


def _version_key(directory: pathlib.Path) -> tuple[int, ...]:
    """The numbers in a path, so that ``postgresql/15`` sorts after ``postgresql/9.6``."""
    digits = "".join(ch if ch.isdigit() else " " for ch in str(directory)).split()
    return tuple(int(part) for part in digits)


def _from_pg_config(searched: list[str]) -> pathlib.Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        searched.append("pg_config --bindir (no pg_config on PATH)")
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10)  # noqa: S603
    except (OSError, subprocess.SubprocessError):
        searched.append(f"{pg_config} --bindir (failed)")
        return None
    directory = pathlib.Path(out.stdout.strip())
    searched.append(f"{pg_config} --bindir ({directory})")
    return directory if _has_server(directory) else None


def _from_usual_locations(searched: list[str]) -> pathlib.Path | None:
    root = pathlib.Path("/")
    for pattern in _USUAL_PATTERNS:
        searched.append(pattern)
        for found in sorted(root.glob(pattern.lstrip("/")), key=_version_key, reverse=True):
            if _has_server(found):
                return found
    return None


def _from_path(searched: list[str]) -> pathlib.Path | None:
    on_path = shutil.which("postgres")
    searched.append(f"PATH ({on_path or 'no postgres on PATH'})")
    if on_path is None:
        return None
    # A `postgres` on PATH may be a lone symlink (e.g. /usr/local/bin/postgres): try where it points too.
    for directory in (pathlib.Path(on_path).parent, pathlib.Path(on_path).resolve().parent):
        if _has_server(directory):
            return directory
    return None


def find_postgres_bindir(explicit: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return the directory of the PostgreSQL server binaries.

    Looked up in order: ``explicit``, the ``DB_RETRY_PG_BINDIR`` environment variable,
    ``pg_config --bindir``, the usual install locations (newest version first), then ``PATH``.
    """
    searched: list[str] = []
    candidates: list[tuple[str, pathlib.Path]] = []
    if explicit is not None:
        candidates.append(("argument", pathlib.Path(explicit)))
    env_value = os.environ.get(BINDIR_ENV)
    if env_value:
        candidates.append((BINDIR_ENV, pathlib.Path(env_value)))
    for label, directory in candidates:
        searched.append(f"{label}={directory}")
        if _has_server(directory):
            return directory
    if candidates:
        # An explicit choice that is wrong must not silently fall back to another server.
        raise PostgresBinariesNotFoundError(searched)
    for search in (_from_pg_config, _from_usual_locations, _from_path):
        found = search(searched)
        if found is not None:
            return found
    raise PostgresBinariesNotFoundError(searched)
