"""The registry's data model: service instances and the changes a watch streams."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal


class RegistryError(Exception):
    """Base of the errors a registry backend raises to its callers."""


class RegistryUnavailable(RegistryError):
    """The backend cannot be reached; the message names it and what to do."""


class UnknownInstance(RegistryError):
    """The caller named an instance id the registry does not hold."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(
            f"Unknown service ID {instance_id!r}: list registered ids with "
            "GET /v1/catalog/service/<name> or `consulate services`"
        )
        self.instance_id = instance_id


@dataclass(frozen=True)
class Instance:
    """One running copy of a service, as registered.

    ``ttl`` is liveness in seconds (Discoverd's meaning): without a heartbeat
    within ``ttl`` the registry removes the instance. ``None`` means it stays
    until deregistered. ``weight`` and ``warning_weight`` are Consul's
    ``Weights.Passing`` and ``Weights.Warning``: the instance's share of the load
    while its checks pass (the SRV weight) or warn. Indexes are set by the
    registry, never by callers.
    """

    id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)
    ttl: float | None = None
    node: str = ""
    weight: int = 1
    warning_weight: int = 1
    create_index: int = 0
    modify_index: int = 0

    def indexed(self, create_index: int, modify_index: int) -> Instance:
        return replace(self, create_index=create_index, modify_index=modify_index)

    def same_registration(self, other: Instance) -> bool:
        """True when only the indexes differ: re-registering it changes nothing."""
        return self.indexed(0, 0) == other.indexed(0, 0)


ChangeKind = Literal["snapshot", "up", "down"]


@dataclass(frozen=True)
class Change:
    """One step of a watch.

    ``snapshot`` carries every live instance and replaces what the consumer had
    (sent first, and again whenever the consumer's index can no longer be replayed);
    ``up`` carries a registered or updated instance; ``down`` one that left.
    ``index`` only grows.
    """

    index: int
    kind: ChangeKind
    instances: tuple[Instance, ...]


def changes_between(known: dict[str, Instance], current: list[Instance],
                    index: int) -> list[Change]:
    """The changes that turn the set ``known`` into ``current`` (by id): what a
    backend without a replayable change log emits after reading the set again."""
    now = {i.id for i in current}
    changes = [Change(index, "down", (gone,))
               for instance_id, gone in sorted(known.items()) if instance_id not in now]
    changes += [Change(index, "up", (instance,)) for instance in current
                if known.get(instance.id) != instance]
    return changes


@dataclass(frozen=True)
class KVEntry:
    """One key of the KV store, with Consul's fields (the value is raw bytes)."""

    key: str
    value: bytes
    flags: int = 0
    create_index: int = 0
    modify_index: int = 0
