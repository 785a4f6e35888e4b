"""Discoverd's view of a service: its instances, its leader, and the events between.

A registry watch streams changes for every service (snapshots, ups, downs). A
Discoverd subscriber wants something richer for the service it watches: the
instances that exist when it subscribes, then a ``current`` marker (it now
knows the whole set), then ``up`` for a new instance, ``update`` for a changed
one, ``down`` for one that left, and ``leader`` whenever the service's leader
changes. The leader is the oldest live instance (lowest create index; the id
breaks ties), so leadership moves only when the leader leaves.

This module turns the one stream into the other, without I/O: the HTTP API's
long polls and SSE streams, and the Python client, all consume it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from consulate.control.registry.model import Change, Instance

EventKind = Literal["up", "update", "down", "current", "leader"]


@dataclass(frozen=True)
class ServiceEvent:
    """One step of a subscription; ``instance`` is None for ``current`` and for a
    ``leader`` event when the service has no instance left."""

    kind: EventKind
    instance: Instance | None
    index: int


def leader_of(instances: dict[str, Instance]) -> Instance | None:
    """The oldest live instance: the service's leader."""
    if not instances:
        return None
    return min(instances.values(), key=lambda i: (i.create_index, i.id))


class ServiceView:
    """The live instances of one service, fed registry changes, yielding its events."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.instances: dict[str, Instance] = {}
        self.leader: Instance | None = None
        self._current_sent = False

    def apply(self, change: Change) -> list[ServiceEvent]:
        """The events ``change`` means for this service (none when it is not concerned)."""
        events: list[ServiceEvent] = []
        if change.kind == "snapshot":
            now = {i.id: i for i in change.instances if i.name == self.service}
            for gone in sorted(set(self.instances) - set(now)):
                events.append(ServiceEvent("down", self.instances[gone], change.index))
            for instance in sorted(now.values(), key=lambda i: (i.create_index, i.id)):
                events += self._put(instance, change.index)
            self.instances = now
            if not self._current_sent:
                self._current_sent = True
                events.append(ServiceEvent("current", None, change.index))
        else:
            for instance in change.instances:
                if instance.name != self.service and instance.id not in self.instances:
                    continue
                if change.kind == "up" and instance.name == self.service:
                    events += self._put(instance, change.index)
                    self.instances[instance.id] = instance
                elif instance.id in self.instances:  # down, or moved to another service
                    events.append(ServiceEvent("down", self.instances.pop(instance.id),
                                               change.index))
        return events + self._leader_change(change.index)

    def _put(self, instance: Instance, index: int) -> list[ServiceEvent]:
        old = self.instances.get(instance.id)
        if old is None:
            return [ServiceEvent("up", instance, index)]
        if old.same_registration(instance):
            return []  # a heartbeat or a re-registration that changed nothing
        return [ServiceEvent("update", instance, index)]

    def _leader_change(self, index: int) -> list[ServiceEvent]:
        leader = leader_of(self.instances)
        before = self.leader.id if self.leader is not None else None
        after = leader.id if leader is not None else None
        self.leader = leader
        if before == after or not self._current_sent:
            return []
        return [ServiceEvent("leader", leader, index)]
