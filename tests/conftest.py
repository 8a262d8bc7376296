"""Shared test wiring.

The kit's fixtures (``pg_cluster``, ``pg_dsn``, ``fresh_cluster``) come from
``db_retry.testing.pytest_plugin``. Installed, the package registers that module as the ``db_retry``
pytest11 entry point, but pytest imports entry-point plugins before pytest-cov starts measuring, which
would leave every module-level line of ``db_retry`` unmeasured. So ``pyproject.toml`` blocks the entry
point for this suite (``-p no:db_retry``) and the plugin is loaded here instead, after coverage starts.
"""

import os

import pytest

from db_retry import liveness
from db_retry.testing.pytest_plugin import DSN_ENV, STANDBY_SKIP_REASON


pytest_plugins = ["pytester", "db_retry.testing.pytest_plugin"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip tests marked ``standby`` when ``DB_RETRY_TEST_DSN`` points the suite at one external server."""
    if item.get_closest_marker("standby") is not None and os.environ.get(DSN_ENV):
        pytest.skip(STANDBY_SKIP_REASON)


@pytest.fixture(autouse=True)
def _no_silent_hosts_from_earlier_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no host remembered as silent (the memory is per process; ports are reused)."""
    monkeypatch.setattr(liveness, "_SILENT", {})
