"""The job specification: what a user submits, parsed and checked field by field.

Field names follow Nomad's JSON/HCL in lowercase snake case, one task per group:

    {"name": "web", "type": "service", "strategy": "spread",
     "constraints": [{"attribute": "${attr.kernel.name}", "operator": "=", "value": "linux"}],
     "groups": [{"name": "web", "count": 4, "driver": "docker",
                 "config": {"image": "busybox:local", "command": "httpd", "args": ["-f"]},
                 "resources": {"cpu": 100, "memory": 64},
                 "ports": [{"label": "http", "to": 80}],
                 "env": {"SERVICE_NAME": "web"}, "labels": {}}]}

The same structure comes as TOML (``[[groups]]`` tables). Every error names the
field by its path (``groups[0].resources.cpu``), shows the value and says what to
send instead; unknown fields are errors, as ``nomad job validate`` makes them.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from consulate.control.scheduler.constraints import Constraint, parse_constraint
from consulate.control.service_definition import InvalidDefinition, parse_duration

JOB_TYPES = ("service", "batch", "system")
STRATEGIES = ("binpack", "spread", "random")
DRIVERS = ("docker", "exec")
RESTART_MODES = ("fail", "delay")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
MAX_COUNT = 100_000

T = TypeVar("T")


class JobSpecError(ValueError):
    """The submitted job is unusable; ``field`` is the path of the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.field = path


@dataclass(frozen=True)
class Port:
    """A host port: ``static`` fixed, else dynamic (chosen from the node's range);
    ``to`` is the port inside the container (default: the same as the host's)."""

    label: str
    static: int | None = None
    to: int | None = None


@dataclass(frozen=True)
class RestartPolicy:
    """Nomad's restart block: restarts in place on the same node, ``attempts``
    within ``interval`` seconds, ``delay`` apart; then ``mode`` fail (reschedule)
    or delay (wait for the interval to pass and try again)."""

    attempts: int = 2
    interval: float = 1800.0
    delay: float = 15.0
    mode: str = "fail"


@dataclass(frozen=True)
class ReschedulePolicy:
    """Nomad's reschedule block: placing a failed allocation elsewhere, with an
    exponential delay from ``delay`` up to ``max_delay``."""

    attempts: int = 0
    interval: float = 0.0
    delay: float = 30.0
    max_delay: float = 3600.0
    unlimited: bool = True


@dataclass(frozen=True)
class Group:
    """A task group: ``count`` identical allocations of one task."""

    name: str
    count: int
    driver: str
    image: str
    command: str
    args: tuple[str, ...]
    cpu: int
    memory: int
    ports: tuple[Port, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    constraints: tuple[Constraint, ...] = ()
    version: str = ""  # a digest of the task's definition: a change replaces allocations


@dataclass(frozen=True)
class Job:
    name: str
    type: str
    strategy: str
    groups: tuple[Group, ...]
    constraints: tuple[Constraint, ...] = ()
    colocate_with: tuple[str, ...] = ()
    conflicts_with: tuple[str, ...] = ()
    rebalance: bool = False
    restart: RestartPolicy = RestartPolicy()
    reschedule: ReschedulePolicy = ReschedulePolicy()
    source: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)


class _Fields:
    """Reads the fields of one object of the spec, then rejects any left unread."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise JobSpecError(path, f"expected an object, got {_show(value)}")
        self.values: dict[str, Any] = dict(value)
        self.path = path
        self.known: list[str] = []

    def at(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def take(self, name: str, kind: type[T], default: T | None = None) -> T:
        self.known.append(name)
        if name not in self.values:
            if default is None:
                raise JobSpecError(self.at(name), "missing: this field is required")
            return default
        value = self.values.pop(name)
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise JobSpecError(self.at(name), f"expected {_KIND_NAMES[kind]}, "
                                              f"got {_show(value)}")
        return value

    def take_choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.take(name, str, default)
        if value not in choices:
            raise JobSpecError(self.at(name), f"{value!r} is not one of {', '.join(choices)}")
        return value

    def take_duration(self, name: str, default: float) -> float:
        text = self.take(name, str, "")
        if not text:
            return default
        try:
            return parse_duration(text)
        except InvalidDefinition as exc:
            raise JobSpecError(self.at(name), str(exc)) from None

    def take_count(self, name: str, default: int, low: int = 0, high: int = MAX_COUNT) -> int:
        value = self.take(name, int, default)
        if not low <= value <= high:
            raise JobSpecError(self.at(name), f"{value} is out of range: use {low} to {high}")
        return value

    def take_list(self, name: str, parse: Callable[[object, str], T]) -> tuple[T, ...]:
        items = self.take(name, list, [])
        return tuple(parse(item, f"{self.at(name)}[{i}]") for i, item in enumerate(items))

    def take_strings(self, name: str) -> dict[str, str]:
        mapping = self.take(name, dict, {})
        for key, value in mapping.items():
            if not isinstance(value, str):
                raise JobSpecError(f"{self.at(name)}.{key}", f"expected a string, got "
                                                             f"{_show(value)}")
        return mapping

    def finish(self) -> None:
        if self.values:
            unknown = sorted(self.values)[0]
            raise JobSpecError(self.at(unknown), "unknown field (known fields: "
                                                 f"{', '.join(self.known)})")


_KIND_NAMES: dict[type, str] = {str: "a string", int: "an integer", bool: "true or false",
                                list: "a list", dict: "an object"}


def _show(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(fields: _Fields, name: str) -> str:
    value = fields.take(name, str)
    if not _NAME.match(value):
        raise JobSpecError(fields.at(name), f"{value!r} is not a valid name: use up to 128 "
                                            "letters, digits, '_', '.' or '-'")
    return value


def _constraint(value: object, path: str) -> Constraint:
    fields = _Fields(value, path)
    raw = {name: fields.take(name, str, "") for name in ("attribute", "operator", "value")}
    weight = fields.take_count("weight", 50, 1, 100) if "weight" in fields.values else None
    fields.finish()
    try:
        return parse_constraint(raw["attribute"], raw["operator"] or "=", raw["value"], weight)
    except ValueError as exc:
        raise JobSpecError(path, str(exc)) from None


def _port(value: object, path: str) -> Port:
    fields = _Fields(value, path)
    label = _name(fields, "label")
    static = fields.take_count("static", 0, 1, 65535) if "static" in fields.values else None
    to = fields.take_count("to", 0, 1, 65535) if "to" in fields.values else None
    fields.finish()
    return Port(label, static, to)


def _group(value: object, path: str) -> Group:
    fields = _Fields(value, path)
    name = _name(fields, "name")
    count = fields.take_count("count", 1)
    driver = fields.take_choice("driver", DRIVERS, "docker")
    config = _Fields(fields.take("config", dict, {}), fields.at("config"))
    image = config.take("image", str, "")
    command = config.take("command", str, "")
    args = tuple(config.take_list("args", _string))
    config.finish()
    if driver == "docker" and not image:
        raise JobSpecError(config.at("image"), "missing: the docker driver needs an image")
    if driver == "exec" and not command:
        raise JobSpecError(config.at("command"), "missing: the exec driver needs a command")
    resources = _Fields(fields.take("resources", dict, {}), fields.at("resources"))
    cpu = resources.take_count("cpu", 100, 1, 10_000_000)
    memory = resources.take_count("memory", 300, 1, 10_000_000)
    resources.finish()
    ports = fields.take_list("ports", _port)
    _check_unique([p.label for p in ports], fields.at("ports"), "label")
    statics = [p.static for p in ports if p.static is not None]
    _check_unique(statics, fields.at("ports"), "static port")
    env = fields.take_strings("env")
    for key in env:
        if not _ENV_NAME.match(key):
            raise JobSpecError(f"{fields.at('env')}.{key}", "not a valid environment "
                                                            "variable name")
    labels = fields.take_strings("labels")
    constraints = fields.take_list("constraints", _constraint)
    fields.finish()
    # What the task runs, not how many or where: a count or a constraint changes
    # no running allocation (Nomad's in-place update), the rest replaces them.
    assert isinstance(value, dict)  # _Fields refused anything else
    task = {k: v for k, v in value.items() if k not in ("count", "constraints")}
    digest = hashlib.sha256(json.dumps(task, sort_keys=True).encode()).hexdigest()[:12]
    return Group(name, count, driver, image, command, args, cpu, memory, ports, env, labels,
                 constraints, digest)


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise JobSpecError(path, f"expected a string, got {_show(value)}")
    return value


def _check_unique(values: list[Any], path: str, what: str) -> None:
    seen = set()
    for value in values:
        if value in seen:
            raise JobSpecError(path, f"{what} {value!r} appears twice: each must be unique")
        seen.add(value)


def _restart(value: object, path: str) -> RestartPolicy:
    fields = _Fields(value, path)
    default = RestartPolicy()
    policy = RestartPolicy(
        attempts=fields.take_count("attempts", default.attempts, 0, 1000),
        interval=fields.take_duration("interval", default.interval),
        delay=fields.take_duration("delay", default.delay),
        mode=fields.take_choice("mode", RESTART_MODES, default.mode))
    fields.finish()
    return policy


def _reschedule(value: object, path: str) -> ReschedulePolicy:
    fields = _Fields(value, path)
    default = ReschedulePolicy()
    policy = ReschedulePolicy(
        attempts=fields.take_count("attempts", default.attempts, 0, 1000),
        interval=fields.take_duration("interval", default.interval),
        delay=fields.take_duration("delay", default.delay),
        max_delay=fields.take_duration("max_delay", default.max_delay),
        unlimited=fields.take("unlimited", bool, default.unlimited))
    fields.finish()
    return policy


def _globs(fields: _Fields, name: str) -> tuple[str, ...]:
    return fields.take_list(name, _string)


def job_from_dict(value: object) -> Job:
    """Check every field of a decoded job; raises JobSpecError naming the first bad one."""
    fields = _Fields(value, "")
    name = _name(fields, "name")
    kind = fields.take_choice("type", JOB_TYPES, "service")
    strategy = fields.take_choice("strategy", STRATEGIES, "binpack")
    constraints = fields.take_list("constraints", _constraint)
    colocate = _globs(fields, "colocate_with")
    conflicts = _globs(fields, "conflicts_with")
    rebalance = fields.take("rebalance", bool, False)
    restart = _restart(fields.take("restart", dict, {}), "restart")
    reschedule = _reschedule(fields.take("reschedule", dict, {}), "reschedule")
    groups = fields.take_list("groups", _group)
    fields.finish()
    if not groups:
        raise JobSpecError("groups", "missing: a job needs at least one group")
    _check_unique([g.name for g in groups], "groups", "group name")
    for i, group in enumerate(groups):
        _check_satisfiable((*constraints, *group.constraints), f"groups[{i}].constraints")
    assert isinstance(value, dict)
    return Job(name, kind, strategy, groups, constraints, colocate, conflicts, rebalance,
               restart, reschedule, source=value)


def _check_satisfiable(constraints: tuple[Constraint, ...], path: str) -> None:
    """Reject hard constraints that contradict each other whatever the node: two
    different required values of one attribute, or a value both required and
    excluded. (Those that no current node meets leave the job pending instead.)"""
    required: dict[str, str] = {}
    for c in constraints:
        if c.soft or c.operator != "=":
            continue
        if required.setdefault(c.attribute, c.value) != c.value:
            raise JobSpecError(path, f"impossible constraints: {c.attribute} must equal both "
                                     f"{required[c.attribute]!r} and {c.value!r}")
    for c in constraints:
        if not c.soft and c.operator == "!=" and required.get(c.attribute) == c.value:
            raise JobSpecError(path, f"impossible constraints: {c.attribute} must both equal "
                                     f"and differ from {c.value!r}")


def parse_job(text: str | bytes, *, format: str = "auto") -> Job:
    """Decode a job file (JSON or TOML; ``auto``: JSON when it starts with ``{``)."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise JobSpecError("", "the job file is not UTF-8 text") from None
    if format == "auto":
        format = "json" if text.lstrip().startswith("{") else "toml"
    try:
        data: object = json.loads(text) if format == "json" else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise JobSpecError("", f"invalid JSON at line {exc.lineno} column {exc.colno}: "
                               f"{exc.msg}") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError("", f"invalid TOML: {exc}") from None
    return job_from_dict(data)
