"""The caller's side of one request: an async iterator of chunks, and what happened when.

The engine's worker thread puts chunks (or an error, then an end marker) on the handle's queue
through the caller's event loop; ``aclose()`` flags the request so the worker frees it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from decoding.params import Chunk, Usage


@dataclass(frozen=True)
class StepRecord:
    start_ns: int  # wall clock, time.time_ns()
    gamma: int
    accepted: int
    emitted: int
    draft_s: float
    verify_s: float


@dataclass
class Timeline:
    """When things happened to one request (time.time_ns()), for spans and metrics."""

    submitted_ns: int = 0
    admitted_ns: int = 0
    target_prefill_ns: tuple[int, int] = (0, 0)
    draft_prefill_ns: tuple[int, int] = (0, 0)
    finished_ns: int = 0
    steps: list[StepRecord] = field(default_factory=list)


_END = object()


class RequestHandle:
    """The caller's side of one request: ``async for chunk in handle``; ``aclose()`` cancels."""

    def __init__(self, request_id: str, prompt_tokens: int, wake: Callable[[], None]) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.timeline = Timeline(submitted_ns=time.time_ns())
        self.usage = Usage(prompt_tokens=prompt_tokens)
        self.cancelled = False
        self.abort_error: BaseException | None = None  # set by Engine.abort_all
        self._wake = wake
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._done = False

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Cancel: the worker frees this request's caches before its next step."""
        if not self._done:
            self._done = True
            self.cancelled = True
            self._wake()

    def _put(self, item: Any) -> None:  # called from the worker thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self.cancelled = True
