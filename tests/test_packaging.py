"""`pip install .` into a fresh venv: the console script, the commands, the native part."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pip_install_into_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(REPO)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    helped = subprocess.run([str(venv / "bin" / "consulate"), "--help"],
                            capture_output=True, text=True, check=True)
    commands = helped.stdout.split("positional arguments:")[1]
    for command in ("agent", "register", "deregister", "services", "lab", "demo"):
        assert f"\n    {command} " in commands, helped.stdout

    probe = "import consulate.native as n; c = n.capabilities(); print(c.extension, c.splice)"
    python = str(venv / "bin" / "python")
    # Run outside the checkout so the installed package, not the source tree, is imported.
    built = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                           check=True, cwd=tmp_path)
    assert built.stdout.split()[0] == "True"  # the cffi extension was compiled and imports
    forced = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True,
                            cwd=tmp_path, env={**os.environ, "CONSULATE_NO_EXTENSIONS": "1"})
    assert forced.stdout.split() == ["False", "False"]
