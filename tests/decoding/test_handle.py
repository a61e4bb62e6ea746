"""The handle's delivery from the worker thread to the caller's event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from decoding.handle import _END, RequestHandle, _Mailbox, delivered_together


async def received_from(
    handles: list[RequestHandle], worker: Callable[[], None], on_wake: Callable[[], None]
) -> list[list[object]]:
    """What each handle received from ``worker``, run in a thread; ``on_wake()`` is called at
    each wake of the loop (each ``call_soon_threadsafe``)."""
    loop = asyncio.get_running_loop()
    original = loop.call_soon_threadsafe

    def counting(callback, *args):  # type: ignore[no-untyped-def]
        on_wake()
        return original(callback, *args)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        received = [[item async for item in handle] for handle in handles]
        thread.join()
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
    return received


async def test_items_from_a_thread_arrive_in_order_with_one_wake_per_burst() -> None:
    handles = [RequestHandle(f"r{i}", 1, lambda: None) for i in range(3)]
    wakes: list[None] = []

    def worker() -> None:
        for step in range(50):  # a burst: every handle gets a chunk per "step"
            for handle in handles:
                handle._put(step)
        for handle in handles:
            handle._put(_END)

    received = await received_from(handles, worker, lambda: wakes.append(None))
    assert received == [list(range(50))] * 3
    assert 1 <= len(wakes) < 50 * 3  # handles on one loop share wakes


async def test_items_put_together_wake_each_loop_once_when_the_block_ends() -> None:
    handles = [RequestHandle(f"r{i}", 1, lambda: None) for i in range(4)]
    doing = ["nothing"]
    wakes: list[str] = []  # what the worker was doing at each wake

    def worker() -> None:
        for step in range(3):
            with delivered_together():
                doing.append(f"putting {step}")
                for handle in handles:
                    handle._put(step)
                    with delivered_together():  # nested: the outer block delivers
                        handle._put(-step)
                doing.append(f"put {step}")
        doing.append("ending")
        for handle in handles:
            handle._put(_END)  # outside a block: woken at once, as before

    received = await received_from(handles, worker, lambda: wakes.append(doing[-1]))
    assert received == [[0, 0, 1, -1, 2, -2]] * 4
    # A block wakes the loop once, after its last put, unless a wake is pending still; the
    # ends wake it at most once each.
    blocks = [doing for doing in wakes if doing != "ending"]
    assert blocks[0] == "put 0" and all(doing.startswith("put ") for doing in blocks)
    assert len(blocks) == len(set(blocks)) and len(wakes) <= 3 + 4


def test_a_block_whose_loop_closed_drops_its_items_quietly() -> None:
    loop = asyncio.new_event_loop()
    mailbox = _Mailbox(loop)
    with delivered_together():
        mailbox.put(asyncio.Queue(), 1)
        loop.close()  # before the block ends and schedules the delivery
    with pytest.raises(RuntimeError):
        mailbox.put(asyncio.Queue(), 2)


def test_a_closed_loop_refuses_and_cancels_the_request() -> None:
    loop = asyncio.new_event_loop()
    mailbox = _Mailbox(loop)
    mailbox.put(asyncio.Queue(), 1)  # scheduled; the loop closes before it runs
    loop.close()
    with pytest.raises(RuntimeError):
        mailbox.put(asyncio.Queue(), 2)

    async def make() -> RequestHandle:
        return RequestHandle("r", 1, lambda: None)

    other = asyncio.new_event_loop()
    handle = other.run_until_complete(make())
    other.close()
    handle._put("chunk")
    assert handle.cancelled


def test_a_finished_loop_is_not_kept_alive_by_its_mailbox() -> None:
    """Each asyncio.run that submitted a request leaves no loop (and no mailbox) behind."""
    import gc
    import weakref

    from decoding.handle import _MAILBOXES

    loops = []

    async def make() -> None:
        RequestHandle("r", 1, lambda: None)
        loops.append(weakref.ref(asyncio.get_running_loop()))

    for _ in range(5):
        asyncio.run(make())
    gc.collect()
    assert [ref() for ref in loops] == [None] * 5
    assert not any(ref() in _MAILBOXES for ref in loops)


async def test_items_put_after_a_delivery_arrive_too() -> None:
    """The mailbox schedules a new delivery for items put after the last one ran (a mailbox
    that never did passed the burst tests above; the engine's tests then hung)."""
    handle = RequestHandle("r", 1, lambda: None)
    for step in range(3):  # one item per burst, each put after the last was delivered
        thread = threading.Thread(target=handle._put, args=(step,))
        thread.start()
        thread.join()
        assert await asyncio.wait_for(handle.__anext__(), timeout=5) == step
    thread = threading.Thread(target=handle._put, args=(_END,))
    thread.start()
    thread.join()
    assert [item async for item in handle] == []
