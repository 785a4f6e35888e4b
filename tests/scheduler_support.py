"""What the scheduler's lab tests share: waiting for a condition, running the CLI in
a lab host, and the web job they run (busybox httpd answering with its allocation's
name, registered by the registrator as `web`)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from consulate.control import lab as labmod
from consulate.control.labdocker import IMAGE


def web_job(count: int, **extra: Any) -> dict[str, Any]:
    return {"name": "web", "strategy": "spread", **extra,
            "groups": [{"name": "web", "count": count, "driver": "docker",
                        "config": {"image": IMAGE, "command": "sh", "args": [
                            "-c", "mkdir /www; echo hello from $NOMAD_ALLOC_NAME "
                                  ">/www/index.html; exec httpd -f -p 80 -h /www"]},
                        "resources": {"cpu": 100, "memory": 64},
                        "ports": [{"label": "http", "to": 80}],
                        "env": {"SERVICE_NAME": "web"}}]}


def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not reached within {timeout}s"
        time.sleep(0.1)


def consulate(lab: labmod.Lab, where: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``consulate ARGS`` in lab host ``where`` (its agent at 127.0.0.1:8500 there)."""
    return lab.exec(where, [sys.executable, "-m", "consulate.control.cli", *args],
                    capture_output=True, text=True, timeout=60)
