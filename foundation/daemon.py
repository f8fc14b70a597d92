"""Blocking work that a process may walk away from.

`asyncio.to_thread` runs on the default executor, whose threads the interpreter joins at exit: a
download or a weights load still running there holds a stopping process for minutes. A daemon thread
is not joined, so a process told to stop can end within the time it announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_in_daemon(fn: Callable[[], T], *, name: str) -> T:
    """`fn()` in a daemon thread of its own; cancelling the await abandons it (the thread runs on
    until it ends or the process exits)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def hand_over(result: T | None, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: no one waits for the answer any more
            loop.call_soon_threadsafe(settle, result, error)

    def body() -> None:
        try:
            result = context.run(fn)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, which raises it
            hand_over(None, exc)
        else:
            hand_over(result, None)

    threading.Thread(target=body, name=name, daemon=True).start()
    return await done
