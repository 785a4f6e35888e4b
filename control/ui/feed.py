"""The UI's live catalog feed (pure): registry changes in, Server-Sent Events out.

The browser keeps one EventSource on ``/v1/internal/ui/events`` for the whole
catalog. A per-service stream (the Discoverd API's) would need one connection
per service, and browsers open at most six per origin over HTTP/1.1; a Consul
blocking query would re-send the whole catalog after every change and leave a
gap between two polls. One stream of instance-level events costs one
connection, sends only what changed and arrives as soon as the registry has it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from consulate.control.registry.model import Change, Instance

UiEventKind = Literal["snapshot", "up", "down", "unavailable"]
RETRY_MS = 2000  # how soon an EventSource reconnects after the stream ends


@dataclass(frozen=True)
class UiEvent:
    """One event of the stream: ``snapshot`` {Index, Instances}, ``up`` {Index,
    Instance}, ``down`` {Index, ID} or ``unavailable`` {Error} (not "error":
    that name is the EventSource's own connection event)."""

    kind: UiEventKind
    data: dict[str, Any]


def instance_view(instance: Instance) -> dict[str, Any]:
    """What the UI shows of an instance, in the Consul API's CamelCase."""
    return {
        "ID": instance.id,
        "Service": instance.name,
        "Node": instance.node,
        "Address": instance.address,
        "Port": instance.port,
        "Tags": list(instance.tags),
        "Meta": dict(instance.meta),
        "Status": instance.status,
        "Checks": [{"CheckID": c.id, "Name": c.name, "Status": c.status, "Output": c.output}
                   for c in instance.checks],
    }


class CatalogFeed:
    """Turns one watch's changes into UI events, dropping the changes that alter
    nothing the UI shows (a heartbeat, an index moved by a re-registration)."""

    def __init__(self) -> None:
        self._shown: dict[str, dict[str, Any]] = {}

    def apply(self, change: Change) -> list[UiEvent]:
        if change.kind == "snapshot":
            self._shown = {i.id: instance_view(i) for i in change.instances}
            return [UiEvent("snapshot", {"Index": change.index,
                                         "Instances": list(self._shown.values())})]
        events: list[UiEvent] = []
        for instance in change.instances:
            if change.kind == "down":
                if self._shown.pop(instance.id, None) is not None:
                    events.append(UiEvent("down", {"Index": change.index, "ID": instance.id}))
                continue
            view = instance_view(instance)
            if self._shown.get(instance.id) != view:
                self._shown[instance.id] = view
                events.append(UiEvent("up", {"Index": change.index, "Instance": view}))
        return events


def sse_frame(event: UiEvent) -> bytes:
    """The event as one Server-Sent Events frame (JSON data on a single line)."""
    data = json.dumps(event.data, separators=(",", ":"))
    return f"event: {event.kind}\ndata: {data}\n\n".encode()


def sse_preamble() -> bytes:
    """Sent first: how long the browser waits before it reconnects."""
    return f"retry: {RETRY_MS}\n\n".encode()
