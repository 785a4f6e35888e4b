"""An error as a log line or message shows it.

Many errors carry no message (``TimeoutError()``, aiohttp's
``ServerDisconnectedError()``, aetcd's ``WatchTimeoutError()``): their ``str`` is
empty, and a message built from it would read "(watch: )". Their class name says
what happened instead. (``exc or name`` does not do it: an exception is always true.)
"""

from __future__ import annotations


def error_text(exc: BaseException) -> str:
    """The error's message, or its class name when it has none."""
    return str(exc) or type(exc).__name__
