"""RPC on channels: one method call per channel, in four shapes.

======================  ====================================  =============================
server function         client                                frames (request -> reply)
======================  ====================================  =============================
``def``, ``async def``  ``await peer.call(m, *args)``         OPEN+args+last -> result+last
async generator         ``async for x in peer.stream(...)``   OPEN+args+last -> item... last
``@stream_input`` def   ``await peer.send_stream(m, items)``  OPEN, item..., last -> result
``@stream_input`` gen   ``peer.exchange(m, items)``           both ways at once
======================  ====================================  =============================

Arguments travel as one array of positional arguments, results and stream items
as single values, all through the peer's codec. A method that fails ends the
channel with a final error, which the caller raises as RemoteError with the
remote message: unknown method, bad arguments, the exception it raised. Either
end may interrupt (a caller that stops reading a stream, a timeout): the other
side's task is cancelled.

Functions that are plain ``def`` and take their arguments at once are run
inline, as their call arrives, with no task: the fast path of unary calls.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from .channel import Channel, State
from .codec import Codec, MsgpackCodec
from .connection import RemotePeer
from .errors import DuplexError, ProtocolError
from .peer import Peer

F = TypeVar("F", bound=Callable[..., Any])

_current: contextvars.ContextVar[Channel] = contextvars.ContextVar("duplex_channel")
_STREAM_INPUT = "__duplex_stream_input__"


def stream_input(fn: F) -> F:
    """Mark a function as taking its input as a stream: it is called with one async
    iterator of the values the caller sends (``send_stream``/``exchange``)."""
    setattr(fn, _STREAM_INPUT, True)
    return fn


def current_channel() -> Channel:
    """The channel of the call being served (its ``headers``, ``peer``...); only
    inside a registered function. LookupError elsewhere."""
    return _current.get()


class _CallError(Exception):
    """A call that cannot be made or answered (bad arguments, undecodable input, a
    result the codec cannot encode): its text is the whole final error."""


@dataclass(frozen=True)
class _Method:
    name: str
    fn: Callable[..., Any]
    stream_in: bool
    stream_out: bool
    inline: bool  # a plain function with arguments: runs as the call arrives

    def invoke(self, args: Any) -> Any:
        """Call the function; a TypeError from binding the arguments is the caller's."""
        try:
            return self.fn(*args)
        except TypeError as exc:
            signature = inspect.signature(self.fn)
            try:
                signature.bind(*args)
            except TypeError:
                names = ", ".join(str(p.replace(annotation=p.empty))
                                  for p in signature.parameters.values())
                raise _CallError(f"bad arguments for {self.name}({names}): {exc}") from None
            raise


class RPCPeer(Peer):
    """A :class:`Peer` that serves registered functions and calls remote ones.

    Every channel opened to it is a call; use a plain Peer for raw channels. Both
    ends of a connection can serve and call. ``options`` are Peer's.
    """

    def __init__(self, name: str | None = None, *, codec: Codec | None = None,
                 **options: Any) -> None:
        super().__init__(name, handler=self._serve, **options)
        self.codec: Codec = codec if codec is not None else MsgpackCodec()
        self._methods: dict[str, _Method] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- serving ------------------------------------------------------------------

    def register(self, obj: object, prefix: str | None = None) -> list[str]:
        """Serve every public method of ``obj`` as ``PREFIX.method`` (``prefix``
        defaults to the class name); returns the names."""
        prefix = type(obj).__name__ if prefix is None else prefix
        names = []
        for attr in dir(obj):
            fn = getattr(obj, attr)
            if not attr.startswith("_") and callable(fn):
                names.append(f"{prefix}.{attr}" if prefix else attr)
                self.register_function(names[-1], fn)
        if not names:
            raise ValueError(f"{obj!r} has no public method to register")
        return names

    def register_function(self, name: str, fn: Callable[..., Any]) -> None:
        """Serve ``fn`` as ``name`` (its shape is read from it: see the module doc)."""
        if not callable(fn):
            raise TypeError(f"cannot register {name!r}: {fn!r} is not callable")
        stream_in = getattr(fn, _STREAM_INPUT, False)
        stream_out = inspect.isasyncgenfunction(fn)
        self._methods[name] = _Method(
            name, fn, stream_in, stream_out,
            inline=not (stream_in or stream_out or inspect.iscoroutinefunction(fn)))

    def _serve(self, channel: Channel) -> None:
        method = self._methods.get(channel.method)
        if method is None:
            served = ", ".join(sorted(self._methods)) or "nothing"
            channel.fail(f"unknown method {channel.method!r} (peer {self.name!r} serves: "
                         f"{served[:500]})")
            return
        if method.inline and channel.remote_done and channel.buffered == 1:
            token = _current.set(channel)
            try:
                self._reply(channel, method, channel.receive_nowait())
            finally:
                _current.reset(token)
            return
        task = asyncio.get_running_loop().create_task(self._run(channel, method))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def cancel(_: DuplexError) -> None:
            task.cancel()

        channel.on_abort = cancel

    def _reply(self, channel: Channel, method: _Method, request: bytes | None) -> None:
        """The inline path: call, reply or fail, all before the next frame is read."""
        try:
            payload = self._encode_result(method, method.invoke(self._args(method, request)))
        except Exception as exc:
            channel.fail(_describe(method, exc))
            return
        channel.write(payload, last=True)

    async def _run(self, channel: Channel, method: _Method) -> None:
        _current.set(channel)  # the task's own context
        try:
            if method.stream_in:
                args: Any = (self._inputs(channel, method),)
            else:
                args = self._args(method, await channel.receive())
            if method.stream_out:
                generator = method.invoke(args)
                try:
                    async for item in generator:
                        await channel.send(self._encode_result(method, item))
                finally:
                    await generator.aclose()
                channel.end()
            else:
                result = method.invoke(args)
                if inspect.isawaitable(result):
                    result = await result
                channel.write(self._encode_result(method, result), last=True)
        except asyncio.CancelledError:
            if channel.state is not State.ABORTED:
                raise  # not the caller's interrupt: someone else cancels this task
        except Exception as exc:
            if channel.state not in (State.CLOSED, State.ABORTED):
                channel.fail(_describe(method, exc))

    def _args(self, method: _Method, payload: bytes | None) -> Any:
        if payload is None:
            raise _CallError(f"no arguments were sent for {method.name}")
        try:
            args = self.codec.decode(payload)
        except Exception as exc:
            raise _CallError(f"cannot decode the arguments of {method.name} with "
                           f"{self.codec.name}: {exc}") from None
        if not isinstance(args, list):
            raise _CallError(f"bad arguments for {method.name}: expected an array of "
                           f"positional arguments, got {type(args).__name__}")
        return args

    async def _inputs(self, channel: Channel, method: _Method) -> AsyncIterator[Any]:
        async for payload in channel:
            try:
                yield self.codec.decode(payload)
            except Exception as exc:
                raise _CallError(f"cannot decode an input of {method.name} with "
                               f"{self.codec.name}: {exc}") from None

    def _encode_result(self, method: _Method, value: Any) -> bytes:
        try:
            return self.codec.encode(value)
        except Exception as exc:
            raise _CallError(f"cannot encode the result of {method.name} with "
                              f"{self.codec.name}: {type(exc).__name__}: {exc}") from None

    async def shutdown(self, timeout: float = 5.0) -> None:
        await super().shutdown(timeout)
        for task in list(self._tasks):  # left running past the drain timeout
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    # -- calling ------------------------------------------------------------------

    async def call(self, method: str, *args: Any, peer: RemotePeer | str | None = None,
                   headers: dict[str, str] | None = None, timeout: float | None = None) -> Any:
        """Call a remote function and return its result. ``peer``: that peer, else
        the next one round robin. RemoteError if it failed; TimeoutError after
        ``timeout`` seconds (the remote call is then interrupted)."""
        channel = self._open(peer, method, self.codec.encode(args), True, headers, timeout)
        try:
            if timeout is None:
                reply = await channel.receive()
            else:
                async with asyncio.timeout(timeout):
                    reply = await channel.receive()
        except BaseException:
            channel.interrupt("the caller gave up (timeout or cancel)")
            raise
        if reply is None:
            raise ProtocolError(f"{method} ended without a result")
        return self.codec.decode(reply)

    def stream(self, method: str, *args: Any, peer: RemotePeer | str | None = None,
               headers: dict[str, str] | None = None) -> Stream:
        """Call a remote generator: iterate its items (see :class:`Stream`)."""
        return Stream(self.codec, self._open(peer, method, self.codec.encode(args), True,
                                             headers, None))

    async def send_stream(self, method: str, items: Iterable[Any] | AsyncIterable[Any], *,
                          peer: RemotePeer | str | None = None,
                          headers: dict[str, str] | None = None) -> Any:
        """Call a remote ``@stream_input`` function with ``items`` and return its result."""
        channel = self._open(peer, method, None, False, headers, None)
        try:
            await _pump(self.codec, channel, items)
            reply = await channel.receive()
        except BaseException:
            channel.interrupt("the caller gave up")
            raise
        if reply is None:
            raise ProtocolError(f"{method} ended without a result")
        return self.codec.decode(reply)

    def exchange(self, method: str, items: Iterable[Any] | AsyncIterable[Any], *,
                 peer: RemotePeer | str | None = None,
                 headers: dict[str, str] | None = None) -> Stream:
        """Call a remote ``@stream_input`` generator: ``items`` are sent (by a task)
        while the returned Stream yields what comes back."""
        channel = self._open(peer, method, None, False, headers, None)
        return Stream(self.codec, channel,
                      asyncio.create_task(_pump(self.codec, channel, items)))

    def _open(self, peer: RemotePeer | str | None, method: str, payload: bytes | None,
              last: bool, headers: dict[str, str] | None, timeout: float | None) -> Channel:
        if peer is None:
            return self.open(method, payload, last=last, headers=headers, timeout=timeout)
        return self.open_with(peer, method, payload, last=last, headers=headers)


class Stream:
    """The results of a streaming call: ``async for item in stream``.

    Reading to the end closes it. To stop early, leave an ``async with stream:``
    block or call :meth:`aclose`: that interrupts the call, so the remote side
    stops producing.
    """

    def __init__(self, codec: Codec, channel: Channel,
                 pump: asyncio.Task[None] | None = None) -> None:
        self.channel = channel
        self._codec = codec
        self._pump = pump

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        try:
            payload = await self.channel.receive()
        except BaseException:
            await self.aclose()
            raise
        if payload is None:
            await self.aclose()
            raise StopAsyncIteration
        return self._codec.decode(payload)

    async def aclose(self) -> None:
        self.channel.interrupt("the caller stopped reading")  # no-op once ended
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.wait([self._pump])
            if not self._pump.cancelled():
                self._pump.exception()  # the reader has seen the channel's outcome

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


async def _pump(codec: Codec, channel: Channel,
                items: Iterable[Any] | AsyncIterable[Any]) -> None:
    """Send every item, then ``last``; waits while the connection is backed up. If
    the items fail (or cannot be encoded), the call is interrupted with the reason."""
    try:
        if isinstance(items, AsyncIterable):
            async for item in items:
                await channel.send(codec.encode(item))
        else:
            for item in items:
                await channel.send(codec.encode(item))
    except DuplexError:
        raise  # the channel ended: its reader sees why
    except Exception as exc:
        channel.interrupt(f"the caller's input failed: {type(exc).__name__}: {exc}")
        raise
    channel.end()


def _describe(method: _Method, exc: Exception) -> str:
    """The text of a final error: what the caller's RemoteError will say."""
    text = str(exc) if isinstance(exc, _CallError) else (
        f"{method.name} failed: {type(exc).__name__}: {exc}")
    return text if len(text) <= 4000 else text[:4000] + "..."  # frames cap strings
