"""``consulate configurator``'s exit statuses: 64 for bad arguments (sysexits'
EX_USAGE, with the reason), 3 when the initial configuration is invalid, 1 when
the store cannot be reached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from consulate.control.cli import main


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "consulate.control.cli", "configurator",
                           *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("args", "message"), [
    ((), "error: the following arguments are required: store, transformer, target"),
    (("file://x.json", "toml", "out.toml", "--bogus"), "error: unrecognized arguments: --bogus"),
    (("file://x.json", "toml", "out.toml", "-p", "x"), "argument -p/--port: invalid int value"),
    (("file://x.json", "yaml", "out"), "error: transformer 'yaml' is unknown: use one of "
     "nginx-conf, haproxy-cfg, toml, jinja2:PATH"),
    (("redis://x", "toml", "out"), "error: store 'redis://x' is unknown: use file://PATH"),
    (("file://x.json", "toml", "/nonexistent/out"), "error: target '/nonexistent/out': the "
     "directory '/nonexistent' does not exist"),
    (("file://x.json", "nginx-conf", "out", "-c", "nginx -t"), "error: -c 'nginx -t' must "
     "name the staged file as {{.src}}"),
    (("file://x.json", "toml", "out", "--wait", "soon"), "error: --wait 'soon' is not "
     "MIN[:MAX]"),
    (("file://x.json", "toml", "out", "--registry", "embedded"), "error: --registry "
     "embedded lives inside the agent"),
    (("file://x.json", "toml", "out", "--template", "nocolon"), "error: --template 'nocolon' "
     "is not TRANSFORMER:TARGET"),
])
def test_bad_arguments_exit_64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                              message: str) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        status = main(["configurator", *args])
    except SystemExit as exc:  # argparse's own errors
        status = int(exc.code or 0)
    assert status == 64
    assert message in capsys.readouterr().err


def test_invalid_initial_config_exits_3(tmp_path: Path) -> None:
    (tmp_path / "doc.json").write_text(json.dumps({"events": {}, "bogus_directive": 1}))
    done = run(f"file://{tmp_path}/doc.json", "nginx-conf", str(tmp_path / "nginx.conf"),
               "-c", f"nginx -t -q -p {tmp_path} -c {{{{.src}}}}", "-p", "0")
    assert done.returncode == 3, done.stderr
    assert f"the initial configuration from file://{tmp_path}/doc.json is invalid: " in \
        done.stderr
    assert 'unknown directive "bogus_directive"' in done.stderr
    assert not (tmp_path / "nginx.conf").exists()
    (tmp_path / "doc.json").write_text(json.dumps({"a": {"$value": "missing"}}))
    done = run(f"file://{tmp_path}/doc.json", "toml", str(tmp_path / "out.toml"), "-p", "0")
    assert done.returncode == 3
    assert done.stderr.endswith('is invalid: {"$value": "missing"}: no value at that path; '
                                'add a "default"\n')


def test_unreachable_store_exits_1(tmp_path: Path) -> None:
    done = run("consulate://127.0.0.1:9/app", "toml", str(tmp_path / "out.toml"), "-p", "0")
    assert done.returncode == 1
    assert "error: KV store consulate://127.0.0.1:9/app is not answering (read: " in done.stderr
