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


@pytest.mark.lab
@needs_tools
def test_demo_passes_alternates_survives_a_dead_backend_and_cleans_up() -> None:
    done = subprocess.run([sys.executable, "-m", "consulate.control.cli", "demo"],
                          capture_output=True, text=True, timeout=120)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert out.rstrip().endswith("demo passed"), out

    answers = re.findall(r"->\s+hello from (web-\d) \(", out)
    balanced, after_kill = answers[:4], answers[4:]
    assert set(balanced) == {"web-1", "web-2"}, out
    assert all(a != b for a, b in itertools.pairwise(balanced)), out
    assert after_kill == ["web-2"] * 6, out
    assert re.search(r"web\.service\.consul -> 2(4[0-9]|5[0-5])\.\d+\.\d+\.\d+ ", out), out

    match = re.search(r"lab (consulate-[a-z0-9-]+):", out)
    assert match, out
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    assert f"{match.group(1)}-" not in netns
