"""The target file and the commands around it: stage, check, replace, reload, restore.

A new output is written to a staged file in the target's own directory (so that
the final rename stays on one filesystem and is atomic), checked there by the
program's own validator, then renamed over the target with the file and the
directory fsynced: a crash leaves the old file or the new one, never half of
one. The file it replaced is kept as ``<target>.bak``, the last good one, which
``restore`` puts back when the reload refuses the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

SRC = "{{.src}}"  # confd's name for the staged file in a check command
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class CommandResult:
    ok: bool
    output: str


async def run_command(command: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
    """``sh -c command``, its exit status and its output (stdout and stderr together).

    The output goes to a temporary file, not a pipe: a reload command that starts
    a daemon (``haproxy -D``, a first ``nginx``) leaves it holding whatever it
    inherited, and a pipe would only reach EOF when that daemon exits.
    """
    with tempfile.TemporaryFile() as output:
        process = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, stdin=asyncio.subprocess.DEVNULL, stdout=output,
            stderr=asyncio.subprocess.STDOUT)
        try:
            async with asyncio.timeout(timeout):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            return CommandResult(False, f"{command!r} did not finish within {timeout:g} s")
        output.seek(0)
        text = output.read().decode(errors="replace").strip()
    if process.returncode != 0:
        text = f"{text}\n(exit status {process.returncode})".strip()
    return CommandResult(process.returncode == 0, text)


def check_command(template: str, staged: Path) -> str:
    return template.replace(SRC, shlex.quote(str(staged)))


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the file's own fsync does not)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_beside(path: Path, content: bytes) -> Path:
    """``content`` in a new synced file in ``path``'s directory, with ``path``'s mode
    (0644 when it does not exist yet), ready to be renamed over it."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".staged")
    staged = Path(name)
    try:
        try:
            os.fchmod(fd, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


class TargetFile:
    """One rendered file and its backup."""

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()
        self.backup = self.path.with_name(self.path.name + ".bak")

    def current(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def stage(self, content: str) -> Path:
        """``content`` in a new file beside the target, synced, with the target's mode."""
        return write_beside(self.path, content.encode())

    def install(self, staged: Path) -> None:
        """Rename ``staged`` over the target; what it replaces becomes the backup."""
        previous = self.current()
        if previous is not None:
            keep = self.stage(previous)
            os.replace(keep, self.backup)
        else:
            self.backup.unlink(missing_ok=True)
        os.replace(staged, self.path)
        fsync_directory(self.path.parent)

    def restore(self) -> bool:
        """Put the backup back; False when there is none (the target is new: no good
        file to go back to, and removing it would help nobody)."""
        if not self.backup.exists():
            return False
        os.replace(self.stage(self.backup.read_text()), self.path)
        fsync_directory(self.path.parent)
        return True


def discard(staged: list[Path]) -> None:
    for path in staged:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
