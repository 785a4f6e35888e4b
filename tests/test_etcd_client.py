"""The etcd client (control/etcd_client.py): its channel's target, and watch
creation that a cancellation always interrupts (a real etcd). The channel's
liveness settings are tested against a real etcd that hangs in
test_registry_conformance.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from etcdproc import EtcdProcess

from consulate.control.etcd_client import Client, channel_target, open_client


def test_one_member_is_dialled_as_it_is() -> None:
    assert channel_target([("10.0.0.1", 2379)]) == ("10.0.0.1", 2379)


def test_several_members_are_one_ipv4_address_list_ending_in_the_last() -> None:
    """aetcd dials f"{host}:{port}": the list ends with the last member's port."""
    host, port = channel_target([("10.0.0.1", 2379), ("10.0.0.2", 2380), ("10.0.0.3", 2381)])
    assert f"{host}:{port}" == "ipv4:10.0.0.1:2379,10.0.0.2:2380,10.0.0.3:2381"


def test_no_member_is_refused() -> None:
    with pytest.raises(ValueError, match="etcd needs at least one HOST:PORT endpoint"):
        channel_target([])


async def test_a_watch_being_created_is_always_cancellable(tmp_path: Path) -> None:
    """Cancellations swept across the moment etcd acknowledges a new watch: each one
    ends the task at once. (With aetcd's own client some are lost on Python 3.11:
    its wait_for returns the watch and the task runs on, here into a 30 s sleep.)"""
    with EtcdProcess(tmp_path / "etcd", "127.42.0.7") as etcd:
        client = open_client([etcd.endpoint])
        try:
            await client.get(b"/warm-up")  # the channel is up before the sweep
            lost = 0
            for _repetition in range(3):
                for delay_us in range(0, 3000, 50):
                    task = asyncio.ensure_future(_watch_then_wait(client))
                    await asyncio.sleep(delay_us / 1e6)
                    task.cancel()
                    done, _ = await asyncio.wait({task}, timeout=2)
                    if not done:
                        lost += 1
                        task.cancel()
                        await asyncio.wait({task})
            assert lost == 0
            # every watch made in the sweep was cancelled, none left on the stream
            for _ in range(50):
                if not client._watcher._callbacks:
                    break
                await asyncio.sleep(0.1)
            assert client._watcher._callbacks == {}
        finally:
            await client.close()


async def _watch_then_wait(client: Client) -> None:
    watch = await client.watch(b"/swept")
    try:
        await asyncio.sleep(30)
    finally:
        await watch.cancel()
