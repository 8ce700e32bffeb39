"""The background tasks of one owner (an avatar stream, a transport): started together, failing loudly,
stopped within a bounded time. Shared by both halves of a session so each owns and ends its own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 1.5
"""How long closing waits for an owner's tasks to stop (and for each release step, e.g. the peer
connection); past that it logs what hung and releases the rest anyway, so a session always ends."""


class OwnedTasks:
    """Tasks named `<name>-<owner>`; one that dies of an exception calls `on_failure(task, exc)`."""

    def __init__(self, owner: str, on_failure: Callable[[asyncio.Task[Any], BaseException], None]) -> None:
        self.owner = owner
        self.on_failure = on_failure
        self.timeout_s = CLOSE_TIMEOUT_S
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{name}-{self.owner}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        log.error("session %s: task %s failed", self.owner, task.get_name(), exc_info=exc)
        self.on_failure(task, exc)

    async def stop(self) -> None:
        """Cancel every task and wait for them, at most `timeout_s` (a task may swallow the cancel)."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if not tasks:
            return
        _, running = await asyncio.wait(tasks, timeout=self.timeout_s)
        if running:
            names = ", ".join(sorted(t.get_name() for t in running))
            log.error(
                "session %s: tasks still running %.1f s after cancel (%s); closing anyway",
                self.owner,
                self.timeout_s,
                names,
            )


async def bounded(owner: str, step: Any, what: str, timeout_s: float) -> None:
    """Await one release step, at most `timeout_s`; a failure or a hang is logged, not raised."""
    try:
        async with asyncio.timeout(timeout_s):
            await step
    except TimeoutError:
        log.error("session %s: %s took over %.1f s; closing anyway", owner, what, timeout_s)
    except Exception:
        log.exception("session %s: %s failed; closing anyway", owner, what)


def log_task_failure(task: asyncio.Task[Any]) -> None:
    """Done callback of a background task of its own (no owner to tell): its failure goes to the log,
    never unretrieved."""
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())
