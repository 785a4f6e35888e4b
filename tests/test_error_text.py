"""error_text (control/error_text.py): an error's message, or its class name."""

from __future__ import annotations

import aiohttp

from consulate.control.error_text import error_text


def test_a_message_is_kept() -> None:
    assert error_text(OSError(111, "Connection refused")) == "[Errno 111] Connection refused"


def test_an_error_without_a_message_is_named() -> None:
    assert error_text(TimeoutError()) == "TimeoutError"
    assert error_text(aiohttp.ServerDisconnectedError("")) == "ServerDisconnectedError"
