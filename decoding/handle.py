"""The caller's side of one request: an async iterator of chunks, and what happened when.

The engine's worker thread puts chunks (or an error, then an end marker) on the handle's queue
through the caller's event loop; ``aclose()`` flags the request so the worker frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
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


_held = threading.local()
"""``mailboxes``: on a thread inside :func:`delivered_together`, the mailboxes it put into."""


@contextlib.contextmanager
def delivered_together() -> Iterator[None]:
    """What this thread puts inside it reaches each event loop in one callback, scheduled
    when it ends. Without it each put wakes its loop unless a wake is already pending, and the
    loop, woken, takes the GIL and delivers while the worker is still putting: a batched step of
    16 requests woke it up to 16 times, now once. On an idle 2-core VM that saved no time (the
    tiny test models: 42-45 µs a step in the puts before, 49-56 µs in the puts and the wake at
    the block's end after; bench/RESULTS.md, 15th session)."""
    if getattr(_held, "mailboxes", None) is not None:  # nested: the outer one delivers
        yield
        return
    mailboxes: dict[_Mailbox, None] = {}
    _held.mailboxes = mailboxes
    try:
        yield
    finally:
        _held.mailboxes = None
        for mailbox in mailboxes:
            with contextlib.suppress(RuntimeError):  # its loop closed since: nobody listens
                mailbox.schedule()


class _Mailbox:
    """Items for the queues of one event loop, delivered by one callback for all the items
    put since the last one: a batched step wakes the loop once, not once per request (each
    wake is a write to the loop's self-pipe, and a turn of the loop that takes the GIL from
    the worker; see :func:`delivered_together`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the mailbox is the value of its loop's entry in _MAILBOXES, and a strong
        # reference would keep the loop, and the entry, alive for good.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """From any thread. RuntimeError when the loop is closed."""
        loop = self._loop()
        if loop is None or loop.is_closed():  # a callback scheduled before it closed never ran
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((queue, item))
        held: dict[_Mailbox, None] | None = getattr(_held, "mailboxes", None)
        if held is not None:
            held[self] = None
            return
        self.schedule()

    def schedule(self) -> None:
        """Have the loop deliver what was put, unless it is to already. RuntimeError when the
        loop is closed."""
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the event loop is closed")
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
            raise

    def _deliver(self) -> None:  # on the loop
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = (
    weakref.WeakKeyDictionary()
)
"""One mailbox per event loop, made on that loop's thread."""


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
        loop = asyncio.get_running_loop()
        mailbox = _MAILBOXES.get(loop)
        if mailbox is None:
            mailbox = _MAILBOXES[loop] = _Mailbox(loop)
        self._mailbox = mailbox
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
            self._mailbox.put(self._queue, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self.cancelled = True
