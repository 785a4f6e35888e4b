"""How every part of consulate opens an etcd v3 client (aetcd over a gRPC channel).

One place decides the channel's target, its liveness settings and which errors
mean "etcd is not answering", so the registry, the configurator's store, the
registrator's adapter and the ambassador's KV watch behave alike when a member
goes away or a link is cut:

- Several members become one channel through gRPC's ``ipv4:`` resolver (a list of
  addresses, pick_first), which fails over between them.
- HTTP/2 keepalive pings find a connection whose peer vanished or hung without a
  reset (a link cut, a host gone, a stopped process): without them a watch waits on
  a dead connection for ever (measured: a SIGSTOPped etcd stalls a watch with no
  error at all). 10 s stays above etcd's default ``--grpc-keepalive-min-time``
  (5 s), below which etcd answers "too many pings"; an unanswered ping closes the
  connection after 5 s (this gRPC needs ``ping_timeout_ms`` for that, besides
  ``keepalive_timeout_ms``).
- Reconnect backoff capped at 2 s (gRPC's default grows to 120 s; gRPC adds 20 %
  jitter): a member that comes back is used again within seconds, as Consul's
  agents retry their servers. Each dial still gets 5 s to complete.
- A watch being created can always be cancelled (``Client.watch``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aetcd
import aetcd.exceptions

log = logging.getLogger("consulate.etcd")

REQUEST_TIMEOUT = 5  # seconds per etcd call (and per watch creation)

CHANNEL_OPTIONS: dict[str, int] = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,  # keep pinging an idle watch stream
    "grpc.http2.ping_timeout_ms": 5_000,
    "grpc.initial_reconnect_backoff_ms": 200,
    # gRPC's floor for each dial's own timeout (TCP and HTTP/2 handshake), not a wait.
    "grpc.min_reconnect_backoff_ms": 5_000,
    "grpc.max_reconnect_backoff_ms": 2_000,
}

# The errors that say the cluster did not answer (as opposed to refusing a request):
# callers report them as "not answering" and retry. A watch whose creation was not
# acknowledged in time is one of them.
UNAVAILABLE = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
    aetcd.exceptions.WatchTimeoutError,
)


class Client(aetcd.Client):  # type: ignore[misc]  # aetcd has no type information
    """aetcd's client, whose watch creation a cancellation always interrupts.

    aetcd waits for etcd to acknowledge a new watch with ``asyncio.wait_for``, which
    on Python 3.11 returns the watch instead of raising CancelledError when the
    acknowledgement and the cancellation arrive in the same loop iteration. The
    cancelled task then runs on: a configurator's store watch went on renewing
    itself every 30 s after ``close()`` had cancelled it, and ``close()`` waited for
    ever (a stuck CI run; measured with plain aetcd: 4 of 120 cancellations timed
    across the acknowledgement were lost). Here the creation runs in a task of its
    own, awaited through ``asyncio.shield``: the caller's cancellation raises at
    once, whatever the creation does, and a watch created anyway is cancelled.
    """

    async def watch(self, *args: Any, **kwargs: Any) -> Any:
        creating = asyncio.ensure_future(super().watch(*args, **kwargs))
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            creating.add_done_callback(_cancel_unwanted_watch)
            raise


_unwanted_cancels: set[asyncio.Task[None]] = set()  # held until done (tasks are weak)


def _cancel_unwanted_watch(creating: asyncio.Future[Any]) -> None:
    """Cancel a watch whose creator was cancelled meanwhile; a failed creation has
    nothing to undo (its error is read so that asyncio does not report it)."""
    if creating.cancelled() or creating.exception() is not None:
        return
    task = asyncio.ensure_future(creating.result().cancel())
    _unwanted_cancels.add(task)
    task.add_done_callback(_forget_unwanted_cancel)


def _forget_unwanted_cancel(task: asyncio.Task[None]) -> None:
    """The cancel is best effort: a client closed meanwhile has no watcher left."""
    _unwanted_cancels.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.debug("event=watch-cancel-failed error=%r", task.exception())


def channel_target(endpoints: Sequence[tuple[str, int]]) -> tuple[str, int]:
    """aetcd's (host, port) for these members: it dials ``f"{host}:{port}"``, so
    more than one member is written as an ``ipv4:`` address list ending in the last."""
    if not endpoints:
        raise ValueError("etcd needs at least one HOST:PORT endpoint")
    host, port = endpoints[-1]
    if len(endpoints) > 1:
        host = "ipv4:" + ",".join(f"{h}:{p}" for h, p in endpoints[:-1]) + f",{host}"
    return host, port


def open_client(endpoints: Sequence[tuple[str, int]],
                timeout: float = REQUEST_TIMEOUT) -> Client:
    """A client for these members (it connects on its first call)."""
    host, port = channel_target(endpoints)
    return Client(host=host, port=port, timeout=timeout, options=dict(CHANNEL_OPTIONS))
