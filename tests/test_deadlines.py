"""ConnectDeadlines: one loop timer serving the connect timeouts of many tasks."""

from __future__ import annotations

import asyncio

from consulate.proxy.deadlines import ConnectDeadlines

SLACK = 0.01  # uvloop's clock ticks in milliseconds: elapsed times may read a hair short


async def _wait_forever(started: asyncio.Event) -> None:
    started.set()
    await asyncio.Event().wait()


async def test_each_task_is_cancelled_at_its_own_deadline_and_knows_it() -> None:
    deadlines = ConnectDeadlines()
    loop = asyncio.get_running_loop()
    started = [asyncio.Event() for _ in range(3)]
    tasks = [loop.create_task(_wait_forever(e)) for e in started]
    for event in started:
        await event.wait()
    begin = loop.time()
    deadlines.start(tasks[0], 0.2)
    await asyncio.sleep(0.1)
    deadlines.start(tasks[1], 0.2)
    deadlines.start(tasks[2], 0.2)
    assert deadlines.stop(tasks[2]) is False  # stopped in time: never cancelled
    done, _ = await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
    assert done == {tasks[0]} and tasks[0].cancelled()
    assert loop.time() - begin >= 0.2 - SLACK
    await asyncio.wait([tasks[1]])
    assert tasks[1].cancelled()
    assert loop.time() - begin >= 0.3 - SLACK  # its own deadline, not the first one's
    assert (deadlines.stop(tasks[0]), deadlines.stop(tasks[1])) == (True, True)
    assert deadlines.stop(tasks[0]) is False  # told once
    assert not tasks[2].done()
    tasks[2].cancel()
    deadlines.close()


async def test_a_restart_gives_the_full_time_again() -> None:
    deadlines = ConnectDeadlines()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    task = loop.create_task(_wait_forever(started))
    await started.wait()
    begin = loop.time()
    deadlines.start(task, 0.2)
    await asyncio.sleep(0.15)
    deadlines.start(task, 0.2)  # a retry on the next endpoint
    await asyncio.wait([task])
    assert task.cancelled() and loop.time() - begin >= 0.35 - SLACK
    assert deadlines.stop(task) is True


async def test_close_forgets_every_wait() -> None:
    deadlines = ConnectDeadlines()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    task = loop.create_task(_wait_forever(started))
    await started.wait()
    deadlines.start(task, 0.05)
    deadlines.close()
    await asyncio.sleep(0.15)
    assert not task.done()
    assert deadlines.stop(task) is False
    task.cancel()
