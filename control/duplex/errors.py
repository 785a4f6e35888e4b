"""What can go wrong, sorted by whose fault it is.

* :class:`ProtocolError`: the remote end sent something that is not Duplex (a bad
  frame, a bad greeting). The connection that carried it is closed; the peer goes on.
* :class:`ChannelError` and its subclasses: a channel ended abnormally. The remote
  application said so (:class:`RemoteError`, :class:`ChannelInterrupted`) or the
  connection under it went away (:class:`ConnectionLost`).
* :class:`NoPeerError`: there was nobody to talk to (no connection in time, an
  unknown peer id).
* :class:`ChannelClosedError`, :class:`PeerClosedError`: this process misused the
  API (sending after ``last``, opening on a peer that was shut down).

Bad arguments to the API itself (an endpoint URI that does not parse) raise the
builtin ``ValueError``/``TypeError``.
"""

from __future__ import annotations


class DuplexError(Exception):
    """Base class of every error this library raises on purpose."""


class ProtocolError(DuplexError):
    """The remote end broke the wire protocol; the message says how."""


class ChannelError(DuplexError):
    """A channel ended abnormally."""


class RemoteError(ChannelError):
    """The other side ended its half of the channel with an error (a final error).

    For RPC this is the exception the remote method raised, as text: ``message``
    is what the remote side sent, ``method`` the method of the channel.
    """

    def __init__(self, method: str, message: str) -> None:
        super().__init__(message)
        self.method = method
        self.message = message


class ChannelInterrupted(ChannelError):
    """The channel was aborted in both directions by an interrupt (an error frame
    without ``last``), sent by either side; ``reason`` is the text that came with it."""

    def __init__(self, reason: str, *, by_remote: bool) -> None:
        who = "the remote side" if by_remote else "this side"
        super().__init__(f"channel interrupted by {who}: {reason}")
        self.reason = reason
        self.by_remote = by_remote


class ConnectionLost(ChannelError):
    """The connection that carried the channel closed before the channel ended."""


class NoPeerError(DuplexError):
    """No connected peer could take a channel (none in time, or not the one asked for)."""


class ChannelClosedError(DuplexError):
    """This side used a channel past its end (sent after ``last``, or after an abort)."""


class PeerClosedError(DuplexError):
    """The peer was shut down: it opens and serves nothing any more."""
