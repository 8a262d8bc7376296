"""DB_RETRY_* settings: defaults, the legacy name, call-time reads and clear errors."""

import pytest

from db_retry import SettingsError
from db_retry.settings import get_retries_number, get_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DB_RETRY_RETRIES_NUMBER", "DB_UTILS_RETRIES_NUMBER", "DB_RETRY_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    assert get_retries_number() == 3
    assert get_settings().timeout is None
    assert get_settings().conflict_timeout is None  # opt-in: by default conflicts count as attempts (0.8.4)


def test_environment_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_RETRY_RETRIES_NUMBER", "5")
    assert get_retries_number() == 5
    monkeypatch.setenv("DB_RETRY_RETRIES_NUMBER", "7")
    assert get_retries_number() == 7


def test_legacy_name_is_accepted_and_the_new_one_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DB_RETRY_RETRIES_NUMBER", raising=False)
    monkeypatch.setenv("DB_UTILS_RETRIES_NUMBER", "4")
    assert get_retries_number() == 4
    monkeypatch.setenv("DB_RETRY_RETRIES_NUMBER", "6")
    assert get_retries_number() == 6


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("DB_RETRY_RETRIES_NUMBER", "three", "DB_RETRY_RETRIES_NUMBER='three'"),
        ("DB_RETRY_RETRIES_NUMBER", "0", "DB_RETRY_RETRIES_NUMBER='0'"),
        ("DB_UTILS_RETRIES_NUMBER", "-2", "DB_UTILS_RETRIES_NUMBER='-2'"),
        ("DB_RETRY_TIMEOUT", "soon", "DB_RETRY_TIMEOUT='soon'"),
        ("DB_RETRY_CONFLICT_DELAY", "0", "DB_RETRY_CONFLICT_DELAY='0'"),
        ("DB_RETRY_CONFLICT_TIMEOUT", "-1", "DB_RETRY_CONFLICT_TIMEOUT='-1'"),
    ],
)
def test_bad_values_name_the_variable_and_value(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
    expected: str,
) -> None:
    monkeypatch.delenv("DB_RETRY_RETRIES_NUMBER", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=expected) as caught:
        get_settings()
    assert isinstance(caught.value, ValueError)
