"""Batched UDP (recvmmsg/sendmmsg) of the native module, on loopback sockets."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest

from consulate.native import capabilities
from consulate.native.udp import UdpBatch


@pytest.fixture
def server() -> Iterator[socket.socket]:
    assert capabilities().extension, "native module not built"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def _client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    return sock


def test_each_reply_goes_to_the_sender_of_its_query(server: socket.socket) -> None:
    batch = UdpBatch(server, slots=8)
    clients = [_client() for _ in range(3)]
    payloads = {i: os.urandom(20 + i) for i in range(len(clients))}
    for i, client in enumerate(clients):
        client.sendto(payloads[i], server.getsockname())
    received = batch.receive()
    assert sorted(received) == sorted(payloads.values())
    senders = {batch.peer(slot) for slot in range(len(received))}
    assert senders == {client.getsockname() for client in clients}
    assert batch.send([(slot, data[::-1]) for slot, data in enumerate(received)]) == 3
    for i, client in enumerate(clients):
        assert client.recv(100) == payloads[i][::-1]  # its own query, reversed
        client.close()
    assert batch.receive() == []  # nothing waiting
    batch.close()


def test_a_batch_holds_at_most_its_slots(server: socket.socket) -> None:
    batch = UdpBatch(server, slots=4)
    client = _client()
    for i in range(6):
        client.sendto(bytes([i]), server.getsockname())
    assert batch.receive() == [bytes([i]) for i in range(4)]
    assert batch.receive() == [bytes([4]), bytes([5])]
    client.close()
    batch.close()


def test_a_datagram_longer_than_a_slot_is_dropped_and_counted(server: socket.socket) -> None:
    batch = UdpBatch(server, slot_size=512)
    client = _client()
    client.sendto(b"x" * 513, server.getsockname())
    client.sendto(b"y" * 512, server.getsockname())
    assert batch.receive() == [b"", b"y" * 512]
    assert batch.truncated == 1
    client.close()
    batch.close()


def test_bad_arguments_are_refused(server: socket.socket) -> None:
    for slots, slot_size in ((0, 4096), (2000, 4096), (8, 100)):
        with pytest.raises(OSError) as caught:
            UdpBatch(server, slots=slots, slot_size=slot_size)
        assert caught.value.errno == errno.EINVAL
    batch = UdpBatch(server, slots=2)
    with pytest.raises(OSError, match="a slot outside the batch"):
        batch.send([(5, b"x")])
    with pytest.raises(OSError, match="no IPv4 sender for slot 5"):
        batch.peer(5)
    batch.close()
    with pytest.raises(OSError, match="closed"):
        batch.receive()
