"""The native byte movers: the relay engine (``engine``) and batched UDP (``udp``).

They know no services: the engine routes by a table of VIP -> endpoints that
the proxy computes and hands it, and moves bytes between file descriptors.
The C extension ``consulate.native._relay`` is used when it is built and the
kernel lets it work; ``CONSULATE_NO_EXTENSIONS=1`` forces the pure-Python paths
(the switch aiohttp calls NO_EXTENSIONS), so both stay tested. ``capabilities()``
reports what this process can use, so the agent can say so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """What this process can use for relaying bytes."""

    extension: bool  # consulate.native._relay imported
    splice: bool  # splice(2) from a socket into a pipe works here


def _probe() -> Capabilities:
    if os.environ.get("CONSULATE_NO_EXTENSIONS", "") not in ("", "0"):
        return Capabilities(extension=False, splice=False)
    try:
        from consulate.native import _relay  # type: ignore[attr-defined]
    except ImportError:
        return Capabilities(extension=False, splice=False)
    return Capabilities(extension=True, splice=int(_relay.lib.consulate_splice_probe()) == 0)


_CAPABILITIES = _probe()


def capabilities() -> Capabilities:
    """The relay capabilities probed once at import."""
    return _CAPABILITIES
