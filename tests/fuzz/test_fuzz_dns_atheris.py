"""The coverage-guided DNS target (atheris_dns.py) for a bounded time: FUZZ_SECONDS
(60 by default), from the committed seeds in corpus/dns. libFuzzer's exit status
says whether it found a crash; its last status line (runs, coverage) is printed
for the run's report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz

HERE = Path(__file__).parent
SECONDS = int(os.environ.get("FUZZ_SECONDS", "60"))


def test_dns_packets_coverage_guided(tmp_path: Path) -> None:
    working = tmp_path / "corpus"
    working.mkdir()
    result = subprocess.run(
        [sys.executable, str(HERE / "atheris_dns.py"), f"-max_total_time={SECONDS}",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(working),
         str(HERE / "corpus" / "dns")],
        capture_output=True, text=True, timeout=SECONDS + 300, check=False)
    done = [line for line in result.stderr.splitlines() if "DONE" in line or "Done " in line]
    print("\n".join(done))
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("crash-"))
    assert result.returncode == 0 and not crashes, result.stderr[-4000:]
