"""Environment-driven settings (``DB_RETRY_*``), validated by pydantic-settings and read at call time."""

import functools
import os
import typing

import pydantic
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """An environment variable of db-retry holds a value it cannot use; the message names both."""


RETRIES_ENV: typing.Final = "DB_RETRY_RETRIES_NUMBER"
LEGACY_RETRIES_ENV: typing.Final = "DB_UTILS_RETRIES_NUMBER"


class RetrySettings(BaseSettings):
    """Defaults for :func:`db_retry.postgres_retry`; every field can be set per call site too.

    Durations are in seconds.
    """

    model_config = SettingsConfigDict(case_sensitive=True, frozen=True, extra="ignore")

    retries_number: int = pydantic.Field(
        default=3,
        ge=1,
        validation_alias=pydantic.AliasChoices(RETRIES_ENV, LEGACY_RETRIES_ENV),
        description="Total attempts that reach a server, the first call included (0.8.4's count).",
    )
    conflict_delay: float = pydantic.Field(
        validation_alias="DB_RETRY_CONFLICT_DELAY", default=0.005, gt=0, description="Base wait after 40001/40P01."
    )
    conflict_max_delay: float = pydantic.Field(
        validation_alias="DB_RETRY_CONFLICT_MAX_DELAY",
        default=0.1,
        gt=0,
        description="Cap of one wait after a conflict.",
    )
    conflict_timeout: float | None = pydantic.Field(
        validation_alias="DB_RETRY_CONFLICT_TIMEOUT",
        default=None,
        ge=0,
        description="Opt-in: conflicts do not count as attempts and are retried this long from the first failure.",
    )
    outage_delay: float = pydantic.Field(
        validation_alias="DB_RETRY_OUTAGE_DELAY", default=0.02, gt=0, description="Base wait after a lost server."
    )
    outage_max_delay: float = pydantic.Field(
        validation_alias="DB_RETRY_OUTAGE_MAX_DELAY",
        default=0.2,
        gt=0,
        description="Cap of one wait after a lost server.",
    )
    outage_timeout: float = pydantic.Field(
        validation_alias="DB_RETRY_OUTAGE_TIMEOUT",
        default=40.0,
        ge=0,
        description="How long to keep waiting for an unreachable server; those attempts do not count in retries.",
    )
    timeout: float | None = pydantic.Field(
        validation_alias="DB_RETRY_TIMEOUT",
        default=None,
        gt=0,
        description="Time budget of the retries of one call, from its first failure.",
    )
    deadline: float | None = pydantic.Field(
        validation_alias="DB_RETRY_DEADLINE",
        default=None,
        gt=0,
        description="Bound of a whole call, attempts and waits included; each attempt runs under the time left.",
    )
    keepalive_idle: float = pydantic.Field(
        validation_alias="DB_RETRY_KEEPALIVE_IDLE",
        default=3.0,
        ge=0,
        description="TCP keepalive: seconds of silence before the first probe (0: keepalives and user timeout off).",
    )
    keepalive_interval: float = pydantic.Field(
        validation_alias="DB_RETRY_KEEPALIVE_INTERVAL", default=1.0, gt=0, description="Seconds between probes."
    )
    keepalive_count: int = pydantic.Field(
        validation_alias="DB_RETRY_KEEPALIVE_COUNT", default=3, ge=1, description="Unanswered probes before failing."
    )
    tcp_user_timeout: float = pydantic.Field(
        validation_alias="DB_RETRY_TCP_USER_TIMEOUT",
        default=6.0,
        ge=0,
        description="Seconds sent data may stay unacknowledged before the kernel fails the connection (0: off).",
    )
    probe_after: float = pydantic.Field(
        validation_alias="DB_RETRY_PROBE_AFTER",
        default=4.0,
        ge=0,
        description="A wait for the server this long makes the watchdog probe that server (0: no watchdog).",
    )
    probe_timeout: float = pydantic.Field(
        validation_alias="DB_RETRY_PROBE_TIMEOUT",
        default=2.0,
        gt=0,
        description="A server whose probe is not answered this fast is silent: its waiting connections are cut.",
    )


def _variables(field: str) -> tuple[str, ...]:
    """The environment variables of a field, from its alias (the first one wins when several are set)."""
    alias = RetrySettings.model_fields[field].validation_alias
    return tuple(map(str, alias.choices)) if isinstance(alias, pydantic.AliasChoices) else (str(alias),)


_VARIABLES: typing.Final = tuple(name for field in RetrySettings.model_fields for name in _variables(field))
# pydantic reports an error at one of the field's aliases (the first, or with pydantic-settings 2.2 the
# one that was set): from any of them to all of the field's variables.
_SIBLINGS: typing.Final = {name: names for names in map(_variables, RetrySettings.model_fields) for name in names}


@functools.lru_cache(maxsize=1)
def _load(values: tuple[str | None, ...]) -> RetrySettings:
    """Validate once per distinct set of values (building the model reads the environment: ~0.3 ms)."""
    try:
        return RetrySettings()
    except pydantic.ValidationError as exc:
        found = dict(zip(_VARIABLES, values, strict=True))
        problems = []
        for error in exc.errors():
            names = _SIBLINGS[str(error["loc"][0])]
            name = next((name for name in names if found[name] is not None), names[0])
            problems.append(f"{name}={found[name]!r}: {error['msg'].lower()}")
        msg = "invalid db-retry setting " + "; ".join(problems)
        raise SettingsError(msg) from None


def get_settings() -> RetrySettings:
    """The current settings: re-validated only when one of the ``DB_RETRY_*`` variables changed."""
    return _load(tuple(map(os.environ.get, _VARIABLES)))


def get_retries_number() -> int:
    """Default total attempts of :func:`db_retry.postgres_retry` (``DB_RETRY_RETRIES_NUMBER``, default 3)."""
    return get_settings().retries_number
