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
        description="Total attempts, the first call included.",
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
        default=15.0,
        ge=0,
        description="How long to keep waiting for an unreachable server; those attempts do not count in retries.",
    )
    timeout: float | None = pydantic.Field(
        validation_alias="DB_RETRY_TIMEOUT",
        default=None,
        gt=0,
        description="Time budget of the retries of one call, from its first failure.",
    )


# Environment variable of each field (the first alias wins when several are set).
_ENV_NAMES: typing.Final[typing.Mapping[str, tuple[str, ...]]] = {
    "retries_number": (RETRIES_ENV, LEGACY_RETRIES_ENV),
    **{name: (f"DB_RETRY_{name.upper()}",) for name in RetrySettings.model_fields if name != "retries_number"},
}
_WATCHED: typing.Final = tuple(env for names in _ENV_NAMES.values() for env in names)
# pydantic reports a field by its name or by an alias; both lead to the field's variables.
_BY_LOC: typing.Final = {key: names for field, names in _ENV_NAMES.items() for key in (field, *names)}


@functools.lru_cache(maxsize=8)
def _load(snapshot: tuple[str | None, ...]) -> RetrySettings:
    del snapshot  # only the cache key: pydantic-settings reads the same environment itself
    try:
        return RetrySettings()
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors():
            names = _BY_LOC[str(error["loc"][0])]
            env = next((name for name in names if name in os.environ), names[0])
            problems.append(f"{env}={os.environ.get(env)!r}: {error['msg'].lower()}")
        msg = "invalid db-retry setting " + "; ".join(problems)
        raise SettingsError(msg) from None


def get_settings() -> RetrySettings:
    """The current settings; re-validated only when one of the ``DB_RETRY_*`` variables changed."""
    return _load(tuple(os.environ.get(name) for name in _WATCHED))


def get_retries_number() -> int:
    """Default total attempts of :func:`db_retry.postgres_retry` (``DB_RETRY_RETRIES_NUMBER``, default 3)."""
    return get_settings().retries_number
