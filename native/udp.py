"""Batched UDP (recvmmsg/sendmmsg) for the DNS responder; ``ffi`` stays in here.

One ``receive`` returns every datagram waiting (up to the batch's slots) and one
``send`` sends every reply of the batch, each to the address of the query it
answers, named by its index in the batch: addresses stay in C.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence

from consulate.native import _relay  # type: ignore[attr-defined]

_ffi, _lib = _relay.ffi, _relay.lib

DEFAULT_SLOTS = 64
# A query is a header, one question and an OPT record: far below this. Longer
# datagrams are dropped (counted in ``truncated``), never half-read.
DEFAULT_SLOT_SIZE = 4096


class UdpBatch:
    """Reads and answers datagrams of one non-blocking UDP socket, a batch at a time."""

    def __init__(self, sock: socket.socket, *, slots: int = DEFAULT_SLOTS,
                 slot_size: int = DEFAULT_SLOT_SIZE) -> None:
        handle = _lib.consulate_udp_batch_new(sock.fileno(), slots, slot_size)
        if handle == _ffi.NULL:
            code = _ffi.errno
            raise OSError(code, f"cannot set up batched UDP ({slots} slots of {slot_size} "
                                f"bytes): {os.strerror(code)}")
        self._handle = handle
        self._sock = sock  # keeps the descriptor alive as long as the batch
        self._slot_size = slot_size
        self._view = memoryview(_ffi.buffer(handle.buf, slots * slot_size))

    def receive(self) -> list[bytes]:
        """The datagrams waiting now (empty when none): index i is slot i for ``send``.

        A datagram longer than a slot comes back empty (it was dropped).
        """
        count = _lib.consulate_udp_recv(self._open())
        if count < 0:
            raise OSError(-count, f"recvmmsg: {os.strerror(-count)}")
        size, view = self._slot_size, self._view
        return [bytes(view[i * size:i * size + length])
                for i, length in enumerate(_ffi.unpack(self._handle.lens, count))]

    def send(self, replies: Sequence[tuple[int, bytes]]) -> int:
        """Send each ``(slot, reply)`` to the sender of datagram ``slot``; returns how
        many went (replies the socket refused are dropped and counted)."""
        if not replies:
            return 0
        offsets, lengths, position = [], [], 0
        for _, reply in replies:
            offsets.append(position)
            lengths.append(len(reply))
            position += len(reply)
        sent = _lib.consulate_udp_send(
            self._open(), b"".join(reply for _, reply in replies),
            _ffi.new("uint32_t[]", offsets), _ffi.new("uint32_t[]", lengths),
            _ffi.new("int[]", [slot for slot, _ in replies]), len(replies))
        if sent < 0:
            raise OSError(-sent, f"sendmmsg: {os.strerror(-sent)} (a slot outside the batch)")
        return int(sent)

    def peer(self, slot: int) -> tuple[str, int]:
        """Who sent datagram ``slot`` (for a reply that cannot wait for ``send``)."""
        addr, port = _ffi.new("uint32_t *"), _ffi.new("uint16_t *")
        rc = _lib.consulate_udp_peer(self._open(), slot, addr, port)
        if rc != 0:
            raise OSError(-rc, f"no IPv4 sender for slot {slot}: {os.strerror(-rc)}")
        return socket.inet_ntoa(int(addr[0]).to_bytes(4, "big")), int(port[0])

    def _open(self) -> object:
        if self._handle is None:
            raise OSError(errno.EBADF, "the UDP batch is closed")
        return self._handle

    @property
    def truncated(self) -> int:
        """Datagrams dropped for being longer than a slot."""
        return int(self._handle.truncated)

    @property
    def send_dropped(self) -> int:
        """Replies the socket refused (buffer full, client unreachable)."""
        return int(self._handle.send_dropped)

    def close(self) -> None:
        """Free the batch (the socket stays the caller's)."""
        if self._handle is not None:
            self._view.release()
            _lib.consulate_udp_batch_free(self._handle)
            self._handle = None
