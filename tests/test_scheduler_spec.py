"""Job files: every field checked, every error naming the field and the fix."""

from __future__ import annotations

import hashlib
import json

import pytest

from consulate.control.scheduler.spec import (
    Group,
    JobSpecError,
    Port,
    ReschedulePolicy,
    RestartPolicy,
    parse_job,
)

GOOD = {"name": "web", "type": "service", "strategy": "spread",
        "constraints": [{"attribute": "${attr.kernel.name}", "operator": "=", "value": "linux"}],
        "restart": {"attempts": 3, "delay": "5s", "interval": "1m", "mode": "delay"},
        "reschedule": {"delay": "1s", "max_delay": "10s", "unlimited": False, "attempts": 4},
        "groups": [{"name": "web", "count": 4, "driver": "docker",
                    "config": {"image": "busybox:local", "command": "httpd", "args": ["-f"]},
                    "resources": {"cpu": 200, "memory": 64},
                    "ports": [{"label": "http", "to": 80}, {"label": "admin", "static": 9000}],
                    "env": {"SERVICE_NAME": "web"}, "labels": {"team": "a"}}]}

# sha256 of the group without count and constraints, as JSON with sorted keys
TASK_DIGEST = hashlib.sha256(json.dumps(
    {k: v for k, v in GOOD["groups"][0].items()  # type: ignore[index, attr-defined]
     if k not in ("count", "constraints")}, sort_keys=True).encode()).hexdigest()[:12]

TOML = """
name = "web"
type = "service"
strategy = "spread"
restart = { attempts = 3, delay = "5s", interval = "1m", mode = "delay" }
reschedule = { delay = "1s", max_delay = "10s", unlimited = false, attempts = 4 }

[[constraints]]
attribute = "${attr.kernel.name}"
operator = "="
value = "linux"

[[groups]]
name = "web"
count = 4
driver = "docker"
config = { image = "busybox:local", command = "httpd", args = ["-f"] }
resources = { cpu = 200, memory = 64 }
ports = [{ label = "http", to = 80 }, { label = "admin", static = 9000 }]
env = { SERVICE_NAME = "web" }
labels = { team = "a" }
"""


def test_json_and_toml_give_the_same_job() -> None:
    from_json = parse_job(json.dumps(GOOD))
    assert from_json == parse_job(TOML)
    assert from_json.groups == (Group(
        name="web", count=4, driver="docker", image="busybox:local", command="httpd",
        args=("-f",), cpu=200, memory=64,
        ports=(Port("http", None, 80), Port("admin", 9000, None)),
        env={"SERVICE_NAME": "web"}, labels={"team": "a"}, version=TASK_DIGEST),)
    assert from_json.restart == RestartPolicy(attempts=3, interval=60.0, delay=5.0,
                                              mode="delay")
    assert from_json.reschedule == ReschedulePolicy(attempts=4, interval=0.0, delay=1.0,
                                                    max_delay=10.0, unlimited=False)
    assert [str(c) for c in from_json.constraints] == ["${attr.kernel.name} = linux"]


def test_the_version_covers_the_task_not_count_or_constraints() -> None:
    group = dict(GOOD["groups"][0])  # type: ignore[index]
    more = {**group, "count": 9, "constraints": [{"operator": "distinct_hosts"}]}
    image = {**group, "config": {**group["config"], "image": "busybox:2"}}
    versions = [parse_job(json.dumps({**GOOD, "groups": [g]})).groups[0].version
                for g in (group, more, image)]
    assert versions[0] == versions[1] == TASK_DIGEST != versions[2]


def test_defaults_follow_nomad() -> None:
    job = parse_job('{"name": "j", "groups": [{"name": "g", "config": {"image": "i"}}]}')
    assert (job.type, job.strategy, job.rebalance) == ("service", "binpack", False)
    assert (job.groups[0].count, job.groups[0].cpu, job.groups[0].memory) == (1, 100, 300)
    assert job.restart == RestartPolicy(attempts=2, interval=1800.0, delay=15.0, mode="fail")


def _with(path: str, value: object) -> str:
    job = json.loads(json.dumps(GOOD))
    target = job
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    target[int(last) if last.isdigit() else last] = value
    return json.dumps(job)


@pytest.mark.parametrize(("path", "value", "message"), [
    ("groups.0.count", -1, "groups[0].count: -1 is out of range: use 0 to 100000"),
    ("groups.0.cpus", 5, "groups[0].cpus: unknown field (known fields: name, count, driver, "
                         "config, resources, ports, env, labels, constraints)"),
    ("colour", "red", "colour: unknown field (known fields: name, type, strategy, "
                      "constraints, colocate_with, conflicts_with, rebalance, restart, "
                      "reschedule, groups)"),
    ("groups.0.resources.cpu", "lots", 'groups[0].resources.cpu: expected an integer, '
                                       'got "lots"'),
    ("groups.0.count", True, "groups[0].count: expected an integer, got true"),
    ("type", "cron", "type: 'cron' is not one of service, batch, system"),
    ("strategy", "fleet", "strategy: 'fleet' is not one of binpack, spread, random"),
    ("name", "a b", "name: 'a b' is not a valid name: use up to 128 letters, digits, '_', "
                    "'.' or '-'"),
    ("groups.0.config.image", "", "groups[0].config.image: missing: the docker driver needs "
                                  "an image"),
    ("restart.delay", "soon", "restart.delay: duration 'soon' is not a string like '10s' or "
                              "'1m30s'"),
    ("groups.0.ports.1.static", 70000, "groups[0].ports[1].static: 70000 is out of range: "
                                       "use 1 to 65535"),
    ("groups.0.env.SERVICE_NAME", 5, "groups[0].env.SERVICE_NAME: expected a string, got 5"),
    ("groups", [], "groups: missing: a job needs at least one group"),
    ("constraints.0.operator", "like", "constraints[0]: operator 'like' is unknown: use one of "
     "=, !=, <, <=, >, >=, regexp, set_contains, set_contains_any, version, is_set, "
     "is_not_set, distinct_hosts, distinct_property (prefix an attribute operator with ~ for "
     "a soft constraint)"),
    ("constraints.0.attribute", "kernel", "constraints[0]: attribute 'kernel' is not one of "
     "${attr.<name>}, ${meta.<key>}, ${node.unique.name}, ${node.unique.id}, "
     "${node.datacenter}"),
    ("constraints.0.operator", "regexp", None),  # value "linux" compiles: fine
])
def test_bad_fields_are_named(path: str, value: object, message: str | None) -> None:
    if message is None:
        parse_job(_with(path, value))
        return
    with pytest.raises(JobSpecError) as caught:
        parse_job(_with(path, value))
    assert str(caught.value) == message
    assert caught.value.field == message.split(":")[0]


def test_impossible_constraints_are_refused() -> None:
    both = [{"attribute": "${attr.kernel.name}", "value": "linux"},
            {"attribute": "${attr.kernel.name}", "value": "windows"}]
    with pytest.raises(JobSpecError, match=r"^groups\[0\]\.constraints: impossible constraints"
                       r": \$\{attr.kernel.name\} must equal both 'linux' and 'windows'$"):
        parse_job(_with("constraints", both))
    excluded = [{"attribute": "${meta.rack}", "value": "r1"},
                {"attribute": "${meta.rack}", "operator": "!=", "value": "r1"}]
    with pytest.raises(JobSpecError, match="must both equal and differ from 'r1'"):
        parse_job(_with("groups.0.constraints", excluded))
    with pytest.raises(JobSpecError, match=r"regexp '\(' does not compile"):
        parse_job(_with("constraints.0", {"attribute": "${attr.x}", "operator": "regexp",
                                          "value": "("}))
    with pytest.raises(JobSpecError, match="version constraint 'newest' is not like"):
        parse_job(_with("constraints.0", {"attribute": "${attr.x}", "operator": "version",
                                          "value": "newest"}))
    with pytest.raises(JobSpecError, match="distinct_property value '0' must be a positive"):
        parse_job(_with("constraints.0", {"attribute": "${meta.rack}",
                                          "operator": "distinct_property", "value": "0"}))
    with pytest.raises(JobSpecError, match="weight is for soft constraints only"):
        parse_job(_with("constraints.0", {"attribute": "${meta.rack}", "value": "a",
                                          "weight": 10}))
    with pytest.raises(JobSpecError, match="only attribute operators can be soft"):
        parse_job(_with("constraints.0", {"operator": "~distinct_hosts"}))


def test_undecodable_files() -> None:
    with pytest.raises(JobSpecError, match=r"^invalid JSON at line 1 column 2: "):
        parse_job("{oops")
    with pytest.raises(JobSpecError, match=r"^invalid TOML: "):
        parse_job("name = ")
    with pytest.raises(JobSpecError, match=r"^the job file is not UTF-8 text$"):
        parse_job(b"\xff\xfe")
    with pytest.raises(JobSpecError, match=r"^expected an object, got \[1\]$"):
        parse_job("[1]", format="json")


def test_duplicates_are_refused() -> None:
    with pytest.raises(JobSpecError, match=r"^groups: group name 'web' appears twice"):
        parse_job(_with("groups", [GOOD["groups"][0], GOOD["groups"][0]]))  # type: ignore[index]
    with pytest.raises(JobSpecError, match=r"^groups\[0\]\.ports: label 'http' appears twice"):
        parse_job(_with("groups.0.ports", [{"label": "http"}, {"label": "http"}]))
