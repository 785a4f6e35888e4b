"""``consulate demo`` as a user runs it: a subprocess that must pass and leave nothing behind."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys

import pytest

needs_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not all(map(shutil.which, ("ip", "iptables", "busybox", "dig")))
    or not os.path.exists("/usr/bin/wget"),
    reason="needs root, iproute2, iptables, busybox, dig and GNU wget",
)


# `consulate` on a machine without etcd-server: shutil.which finds no etcd, as there.
WITHOUT_ETCD = """
import shutil, sys
found = shutil.which
shutil.which = lambda name, *a, **k: None if name == "etcd" else found(name, *a, **k)
from consulate.control.cli import main
sys.exit(main())
"""


def _passing_demo(*args: str, timeout: float, etcd: bool = True) -> str:
    """Run ``consulate demo`` as a user does; its output, once it passed."""
    command = ["-m", "consulate.control.cli"] if etcd else ["-c", WITHOUT_ETCD]
    done = subprocess.run([sys.executable, *command, "demo", *args],
                          capture_output=True, text=True, timeout=timeout)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert out.rstrip().endswith("demo passed"), out
    return out


def _assert_lab_removed(out: str) -> None:
    """The lab the output names has no namespace left (its processes went with them)."""
    match = re.search(r"lab (consulate-[a-z0-9-]+):", out)
    assert match, out
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    assert f"{match.group(1)}-" not in netns


@pytest.mark.lab
@needs_tools
def test_demo_passes_alternates_survives_a_dead_backend_and_cleans_up() -> None:
    out = _passing_demo(timeout=120)

    answers = re.findall(r"->\s+hello from (web-\d) \(", out)
    balanced, after_kill = answers[:4], answers[4:]
    assert set(balanced) == {"web-1", "web-2"}, out
    assert all(a != b for a, b in itertools.pairwise(balanced)), out
    assert after_kill == ["web-2"] * 6, out
    assert re.search(r"web\.service\.consul -> 2(4[0-9]|5[0-5])\.\d+\.\d+\.\d+ ", out), out
    _assert_lab_removed(out)


def _steps(out: str) -> dict[int, str]:
    """The demo's output cut at its ``[n/N]`` step headers: step number -> its text."""
    parts = re.split(r"^\[(\d+)/\d+\] ", out, flags=re.MULTILINE)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2], strict=True)}


@pytest.mark.lab
@needs_tools
@pytest.mark.parametrize("registry", ["etcd", "join"])
def test_demo_on_3_hosts_reaches_h2_and_h3_and_survives_h3_cut_off(registry: str) -> None:
    out = _passing_demo("--hosts", "3", timeout=240, etcd=registry == "etcd")
    steps = _steps(out)
    assert sorted(steps) == list(range(1, 9)), out
    assert all(text.split("\n", 1)[0].endswith(")") and "...  ok (" in text
               for text in steps.values()), out

    def answers(step: int) -> list[str]:
        return re.findall(r"^      h1c1\$ wget http://web\.service\.consul/  ->  "
                          r"hello from (web-h[23]) \(10\.100\.[23]\.11\)$", steps[step], re.M)

    assert steps[2].startswith(
        "Starting the registry: a 3-member etcd cluster, one member per host...  ok ("
        if registry == "etcd" else "Registry: etcd is not installed, so h1's agent embeds "
        "it and the others --join h1...  ok ("), out
    joined = "      h2: consulate agent --join 10.99.0.11:8500 --liveness-ttl 3s\n" in steps[3]
    assert joined == (registry == "join"), out
    assert "      h1's route table: web -> web-h2, web-h3\n" in steps[4], out
    # Both hosts answer while all are up, h2 alone once h3 is cut off, both once it is back.
    assert len(answers(5)) == 4 and set(answers(5)) == {"web-h2", "web-h3"}, out
    assert re.search(r"^      web-h3 left h1's routes \d+\.\d s after the cut \(TTL 3 s\)$",
                     steps[6], re.M), out
    assert answers(6) == ["web-h2"] * 4, out
    assert re.search(r"^      ip -n consulate-demo-[0-9a-f]+-fabric link set h3 up$",
                     steps[7], re.M), out
    assert len(answers(7)) == 4 and set(answers(7)) == {"web-h2", "web-h3"}, out
    _assert_lab_removed(out)


def test_demo_refuses_an_unsupported_host_count() -> None:
    done = subprocess.run([sys.executable, "-m", "consulate.control.cli", "demo", "--hosts", "2"],
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr.splitlines()[-1]) == (
        2, "", "consulate demo: error: argument --hosts: invalid choice: 2 (choose from 1, 3)")
