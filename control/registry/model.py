"""The registry's data model: service instances and the changes a watch streams."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal


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


CheckKind = Literal["ttl", "http", "tcp", "script"]
CheckStatus = Literal["passing", "warning", "critical"]
CHECK_STATUSES: tuple[CheckStatus, ...] = ("passing", "warning", "critical")  # best first


@dataclass(frozen=True)
class HealthCheck:
    """One of an instance's health checks: Consul's model, run by the agent of its node.

    ``kind`` says who decides the status: ``ttl`` checks are set by their
    application through ``/v1/agent/check/pass|warn|fail`` and go critical when
    no update comes within ``ttl``; ``http``, ``tcp`` and ``script`` checks are
    probed by the agent every ``interval``. ``target`` is the URL (http) or
    ``host:port`` (tcp); ``args`` the command (script). An instance critical for
    ``deregister_after`` seconds is deregistered (Consul's
    DeregisterCriticalServiceAfter). ``status`` and ``output`` are the last result.
    """

    id: str
    kind: CheckKind
    name: str = ""
    target: str = ""
    args: tuple[str, ...] = ()
    method: str = "GET"
    header: tuple[tuple[str, str], ...] = ()
    tls_skip_verify: bool = False
    interval: float = 10.0
    timeout: float = 10.0
    ttl: float | None = None
    deregister_after: float | None = None
    notes: str = ""
    status: CheckStatus = "critical"
    output: str = ""

    def same_definition(self, other: HealthCheck) -> bool:
        """True when only the result differs: the check needs no restart."""
        return replace(self, status="critical", output="") == replace(
            other, status="critical", output="")


def worst_status(checks: tuple[HealthCheck, ...]) -> CheckStatus:
    """Consul's aggregate: critical over warning over passing; no checks is passing."""
    return max((c.status for c in checks), key=CHECK_STATUSES.index, default="passing")


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
    checks: tuple[HealthCheck, ...] = ()
    create_index: int = 0
    modify_index: int = 0

    @property
    def status(self) -> CheckStatus:
        return worst_status(self.checks)

    @property
    def routed_weight(self) -> int | None:
        """The instance's weight in balancing and SRV answers, or None while it is
        critical: Consul's DNS and health queries leave critical instances out and
        give warning ones their Warning weight."""
        status = self.status
        if status == "critical":
            return None
        return self.warning_weight if status == "warning" else self.weight

    def with_check_result(self, check_id: str, status: CheckStatus,
                          output: str) -> Instance:
        """The instance with one check's result replaced (indexes kept)."""
        return replace(self, checks=tuple(
            replace(c, status=status, output=output) if c.id == check_id else c
            for c in self.checks))

    def keeping_check_results(self, old: Instance | None) -> Instance:
        """This registration with the results of ``old``'s checks whose definition is
        unchanged: a re-registration (registrator's resync) must not reset health."""
        if old is None or not old.checks:
            return self
        before = {c.id: c for c in old.checks}
        return replace(self, checks=tuple(
            replace(c, status=before[c.id].status, output=before[c.id].output)
            if c.id in before and before[c.id].same_definition(c) else c
            for c in self.checks))

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


def instance_to_dict(instance: Instance) -> dict[str, Any]:
    """The instance as JSON-ready data: the stored form of the embedded and etcd
    backends."""
    return asdict(instance)


def instance_from_dict(data: dict[str, Any]) -> Instance:
    """The inverse of ``instance_to_dict``; fields added since a record was written
    (``weight``, ``checks``) take their defaults, so older records load unchanged."""
    body = dict(data)
    body["tags"] = tuple(body.get("tags", ()))
    body["checks"] = tuple(
        HealthCheck(**{**check, "args": tuple(check.get("args", ())),
                       "header": tuple(tuple(pair) for pair in check.get("header", ()))})
        for check in body.get("checks", ()))
    return Instance(**body)
