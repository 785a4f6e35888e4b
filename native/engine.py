"""The native relay engine's Python API: sockets in, results out; ``ffi`` stays in here.

Every C call's return code is checked and errors become ``OSError`` with the
errno, as the kernel reported it. Ownership is explicit: ``add`` takes both
sockets (detaching them from their Python objects) only when the engine accepted
them; when it declines, the caller still owns them and can relay in Python.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from consulate.native import _relay  # type: ignore[attr-defined]

_ffi, _lib = _relay.ffi, _relay.lib

REASONS = ("done", "error", "idle", "stopped", "connect-failed")
MAX_CANDIDATES = 8
DEFAULT_PIPE_SIZE = 1 << 20  # 1 MiB pipes move ~45% more than 64 KiB ones here
DEFAULT_SPLICE_THRESHOLD = 4096  # below this a splice read drops back to copying
# Mode policies, in the order of relay.c's POLICY_* values (the index is passed).
# adaptive: copy, splice once a recv fills 16 KiB, copy again below the threshold;
# copy: never splice; splice: splice from the first read on, never drop back.
MODES = ("adaptive", "copy", "splice")


@dataclass(frozen=True)
class RelayResult:
    """How one relayed connection ended, with its byte counters."""

    id: int
    bytes_a_to_b: int
    bytes_b_to_a: int
    spliced_a_to_b: int
    spliced_b_to_a: int
    reason: str  # done | error | idle | stopped | connect-failed
    error: int  # errno when reason is "error" (the last attempt's for "connect-failed")
    failed_mask: int = 0  # bit i: candidate i of connect() was tried and failed


@dataclass(frozen=True)
class EngineStats:
    active: int
    pipes_pooled: int
    pipes_open: int


class SpliceEngine:
    """One epoll thread relaying socket pairs with splice(2), the GIL released."""

    def __init__(
        self,
        *,
        pipe_size: int = DEFAULT_PIPE_SIZE,
        splice_threshold: int = DEFAULT_SPLICE_THRESHOLD,
        idle_timeout: float = 0.0,
        connect_timeout: float = 2.0,
        mode: str = "adaptive",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        handle = _lib.consulate_relay_new(pipe_size, splice_threshold, idle_timeout,
                                          connect_timeout, MODES.index(mode))
        if handle == _ffi.NULL:
            code = _ffi.errno
            raise OSError(code, f"cannot start the relay engine: {os.strerror(code)}")
        self._handle = handle
        self._results = _ffi.new("consulate_relay_result[]", 256)

    @property
    def notify_fd(self) -> int:
        """An eventfd that becomes readable when results are waiting for ``poll``."""
        return int(_lib.consulate_relay_notify_fd(self._handle))

    def add(self, conn_id: int, a: socket.socket, b: socket.socket) -> None:
        """Relay between ``a`` and ``b`` until both directions end; takes both sockets.

        Raises OSError (the sockets stay the caller's) when the engine declines.
        """
        if self._handle is None:
            raise OSError(errno.ESHUTDOWN, "the relay engine is closed")
        rc = _lib.consulate_relay_add(self._handle, conn_id, a.fileno(), b.fileno())
        if rc != 0:
            raise OSError(-rc, f"relay engine declined the connection: {os.strerror(-rc)}")
        a.detach()
        b.detach()

    def connect(self, conn_id: int, client: socket.socket,
                candidates: Sequence[tuple[str, int]], mark: int = 0) -> None:
        """Connect to the first candidate that accepts, then relay; takes ``client``.

        The engine tries the candidates in order, each within its connect timeout,
        without a round trip through Python; the result's ``failed_mask`` tells
        which failed, and "connect-failed" means none accepted (client reset).
        """
        if self._handle is None:
            raise OSError(errno.ESHUTDOWN, "the relay engine is closed")
        if not 1 <= len(candidates) <= MAX_CANDIDATES:
            raise ValueError(f"{len(candidates)} candidates: give 1 to {MAX_CANDIDATES}")
        addrs = _ffi.new("uint32_t[]", [int.from_bytes(socket.inet_aton(a), "little")
                                        for a, _ in candidates])
        ports = _ffi.new("uint16_t[]", [socket.htons(p) for _, p in candidates])
        rc = _lib.consulate_relay_connect(self._handle, conn_id, client.fileno(), addrs, ports,
                                          len(candidates), mark)
        if rc != 0:
            raise OSError(-rc, f"relay engine declined the connection: {os.strerror(-rc)}")
        client.detach()

    def poll(self) -> list[RelayResult]:
        """Results of connections that ended since the last poll."""
        if self._handle is None:
            return []
        count = _lib.consulate_relay_poll(self._handle, self._results, len(self._results))
        return [self._result(self._results[i]) for i in range(count)]

    def stats(self) -> EngineStats:
        out = _ffi.new("consulate_relay_stats *")
        _lib.consulate_relay_stats_get(self._handle, out)
        return EngineStats(int(out.active), int(out.pipes_pooled), int(out.pipes_open))

    def stop(self) -> list[RelayResult]:
        """End every connection (closed, reported as stopped) and the thread."""
        if self._handle is None:
            return []
        _lib.consulate_relay_stop(self._handle)
        results = []
        while batch := self.poll():
            results += batch
        return results

    def close(self) -> list[RelayResult]:
        """Stop, then free every resource; returns the last results."""
        results = self.stop()
        if self._handle is not None:
            _lib.consulate_relay_free(self._handle)
            self._handle = None
        return results

    @staticmethod
    def _result(raw: object) -> RelayResult:
        r = raw  # a cdata struct
        return RelayResult(
            id=int(r.id), bytes_a_to_b=int(r.bytes[0]), bytes_b_to_a=int(r.bytes[1]),  # type: ignore[attr-defined]
            spliced_a_to_b=int(r.spliced[0]), spliced_b_to_a=int(r.spliced[1]),  # type: ignore[attr-defined]
            reason=REASONS[r.reason], error=int(r.error),  # type: ignore[attr-defined]
            failed_mask=int(r.failed_mask),  # type: ignore[attr-defined]
        )
