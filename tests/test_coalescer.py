"""The first write of a turn of the event loop goes out at once; the rest of a busy turn's
writes go out together early in the next turn, in the order they were made."""

from __future__ import annotations

import asyncio
import threading

from codex_gateway.coalescer import WriteCoalescer


class Writer:
    """A holder that writes to a shared log through the coalescer, as the transports do."""

    def __init__(self, name: str, coalescer: WriteCoalescer, log: list[str]):
        self.name = name
        self.coalescer = coalescer
        self.log = log
        self.held: list[str] = []

    def write(self, data: str) -> None:
        if self.held:
            self.held.append(data)
        elif self.coalescer.may_write_now():
            self.log.append(f"{self.name}:{data}")
        else:
            self.held.append(data)
            self.coalescer.hold(self)

    def flush(self) -> bool:
        held, self.held = self.held, []
        self.log.extend(f"{self.name}:{data}" for data in held)
        return bool(held)


def _writers(*names: str) -> tuple[list[Writer], list[str]]:
    coalescer = WriteCoalescer()
    log: list[str] = []
    return [Writer(name, coalescer, log) for name in names], log


async def _busy() -> tuple[list[Writer], list[str]]:
    """Three writers after a turn in which b and c had their writes held: a busy loop."""
    (a, b, c), log = _writers("a", "b", "c")
    a.write("1")
    b.write("1")
    c.write("1")
    await asyncio.sleep(0)
    return [a, b, c], log


async def test_a_lone_write_in_each_turn_goes_out_at_once() -> None:
    (a,), log = _writers("a")

    a.write("request")
    assert log == ["a:request"]
    await asyncio.sleep(0)
    a.write("answer")

    assert log == ["a:request", "a:answer"]


async def test_the_other_writes_of_a_turn_go_out_together_when_the_next_turn_starts() -> None:
    (a, b, c), log = _writers("a", "b", "c")

    a.write("1")
    b.write("1")
    c.write("1")
    b.write("2")
    assert log == ["a:1"]
    await asyncio.sleep(0)

    assert log == ["a:1", "b:1", "b:2", "c:1"]


async def test_after_a_turn_that_held_several_connections_the_next_holds_its_first_too() -> None:
    (a, b, _), log = await _busy()

    a.write("2")
    assert log == ["a:1", "b:1", "c:1"]
    await asyncio.sleep(0)  # only a's write was held: the loop is no longer busy
    assert log == ["a:1", "b:1", "c:1", "a:2"]
    await asyncio.sleep(0)
    b.write("2")

    assert log == ["a:1", "b:1", "c:1", "a:2", "b:2"]


async def test_a_holder_with_nothing_left_does_not_count_as_a_held_write() -> None:
    (a, b, c), log = _writers("a", "b", "c")
    a.write("1")
    b.write("1")
    c.write("1")
    b.flush()  # sent by other means before the turn ended (a connection that closed)
    c.flush()
    await asyncio.sleep(0)

    a.write("2")

    assert log == ["a:1", "b:1", "c:1", "a:2"]


async def test_a_turn_without_writes_ends_a_busy_spell() -> None:
    (a, _, _), log = await _busy()
    await asyncio.sleep(0)  # a turn with nothing written

    a.write("2")

    assert log == ["a:1", "b:1", "c:1", "a:2"]


class Failing:
    def flush(self) -> bool:
        raise OSError("the connection broke")


async def test_a_holder_that_fails_does_not_strand_the_others() -> None:
    (a, b), log = _writers("a", "b")
    a.write("1")
    a.coalescer.hold(Failing())
    b.write("1")

    await asyncio.sleep(0)

    assert log == ["a:1", "b:1"]


def test_a_flush_left_queued_on_a_stopped_loop_does_not_stop_the_next_loop() -> None:
    coalescer = WriteCoalescer()
    log: list[str] = []
    a, b, c = (Writer(name, coalescer, log) for name in "abc")

    async def write_and_stop() -> None:
        a.write("1")
        b.write("1")  # held; the loop stops before the turn that would send it
        asyncio.get_running_loop().stop()

    async def write_again() -> None:
        a.write("2")
        c.write("1")
        await asyncio.sleep(0)

    stopped = asyncio.new_event_loop()
    stopped.run_until_complete(write_and_stop())
    stopped.close()
    assert log == ["a:1"]
    asyncio.run(write_again())

    # b's connection went with its loop, and what it held with it.
    assert log == ["a:1", "a:2", "c:1"]


async def test_the_next_loop_starts_out_of_a_busy_spell() -> None:
    (a, _, _), log = await _busy()

    async def write() -> None:
        a.write("2")
        sent_at_once.extend(log)

    sent_at_once: list[str] = []
    # Joined without yielding, so this loop's busy spell cannot end meanwhile.
    other = threading.Thread(target=asyncio.run, args=(write(),))
    other.start()
    other.join()

    assert sent_at_once == ["a:1", "b:1", "c:1", "a:2"]
