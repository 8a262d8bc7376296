"""Checked by mypy --strict in the test command: decorated functions keep their exact types.

Each ``# type: ignore[...]`` line must really be an error: strict mode reports unused ignores,
so if the decorator ever erased a signature, those lines would fail the check.
"""

import typing

from sqlalchemy.ext.asyncio import AsyncSession

from db_retry import RetryEvent, Transaction, postgres_retry


@postgres_retry
async def bare(user_id: int, *, name: str = "x") -> list[str]:
    return [name] * user_id


@postgres_retry(retries=5, timeout=2.0)
async def called(session: AsyncSession, /, amount: float) -> dict[str, float]:
    async with Transaction(session=session, isolation_level="SERIALIZABLE") as transaction:
        await transaction.commit()
    return {"amount": amount}


def on_retry(event: RetryEvent) -> None:
    typing.assert_type(event.attempt, int)
    typing.assert_type(event.sqlstate, str | None)


class Service:
    @postgres_retry(on_retry=on_retry)
    async def method(self, key: str) -> bytes:
        return key.encode()


class BareSignature(typing.Protocol):
    def __call__(self, user_id: int, *, name: str = ...) -> typing.Coroutine[typing.Any, typing.Any, list[str]]: ...


async def use(session: AsyncSession) -> None:
    exact: BareSignature = bare  # parameter names, kinds and defaults all survive
    del exact
    typing.assert_type(await bare(3, name="y"), list[str])
    typing.assert_type(await called(session, 1.5), dict[str, float])
    typing.assert_type(await Service().method("k"), bytes)

    await bare("3")  # type: ignore[arg-type]
    await bare(3, nickname="y")  # type: ignore[call-arg]
    await called(session=session, amount=1.0)  # type: ignore[call-arg]
    await Service().method(1)  # type: ignore[arg-type]
    wrong: str = await bare(1)  # type: ignore[assignment]
    del wrong
