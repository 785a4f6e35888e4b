"""The target file and the commands around it: staging, backup, restore, and
commands whose daemons keep their output open."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from pathlib import Path

import pytest

from consulate.control.configurator.engine import Configurator, ReloadFailed, Template
from consulate.control.configurator.stores import FileStore, pretty
from consulate.control.configurator.target import TargetFile, check_command, run_command
from consulate.control.configurator.transformers import make_transformer


def test_stage_install_backup_restore(tmp_path: Path) -> None:
    path = tmp_path / "app.conf"
    path.write_text("one\n")
    path.chmod(0o640)
    target = TargetFile(path)
    staged = target.stage("two\n")
    assert staged.parent == tmp_path and staged.read_text() == "two\n"
    assert stat.S_IMODE(staged.stat().st_mode) == 0o640
    target.install(staged)
    assert (path.read_text(), target.backup.read_text()) == ("two\n", "one\n")
    assert not staged.exists()
    assert target.restore() is True
    assert path.read_text() == "one\n" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.conf", "app.conf.bak"]


def test_a_new_target_has_nothing_to_restore(tmp_path: Path) -> None:
    target = TargetFile(tmp_path / "new.conf")
    target.install(target.stage("x\n"))
    assert stat.S_IMODE(target.path.stat().st_mode) == 0o644
    assert target.restore() is False
    assert target.path.read_text() == "x\n"


def test_check_command_quotes_the_staged_file() -> None:
    assert check_command("nginx -t -c {{.src}}", Path("/tmp/a b/.x")) == \
        "nginx -t -c '/tmp/a b/.x'"


async def test_run_command_output_and_status() -> None:
    done = await run_command("echo out; echo err >&2; exit 3")
    assert (done.ok, done.output) == (False, "out\nerr\n(exit status 3)")
    assert await run_command("true") == (await run_command(":"))
    slow = await run_command("sleep 5", timeout=0.2)
    assert (slow.ok, slow.output) == (False, "'sleep 5' did not finish within 0.2 s")


async def test_a_daemon_started_by_the_command_does_not_hold_it() -> None:
    """A reload that starts a daemon (haproxy -D) returns when the command does, not
    when the daemon closes the output it inherited."""
    async with asyncio.timeout(30):
        done = await run_command("sleep 60 & echo $!")
    assert done.ok
    os.kill(int(done.output), signal.SIGTERM)


async def test_failed_first_reload_keeps_the_new_file(tmp_path: Path) -> None:
    (tmp_path / "doc.json").write_bytes(pretty({"a": 1}))
    template = Template(make_transformer("toml"), TargetFile(tmp_path / "out.toml"), "")
    configurator = Configurator(FileStore(tmp_path / "doc.json"), [template],
                                reload="echo not running; exit 1")
    configurator.snapshot = await configurator.store.load()
    with pytest.raises(ReloadFailed) as caught:
        await configurator.apply("test")
    assert str(caught.value) == ("the reload command failed: not running\n(exit status 1); "
                                 "there was no earlier file to restore")
    assert (tmp_path / "out.toml").read_text() == "a = 1\n"
