"""The pipeline: document -> macros -> transformer -> staged file -> check ->
atomic replace -> reload -> (reload failed) restore the last good file, reload again.

Two ways in. An edit (REST) is applied to the stored document, rendered and
checked *before* it is committed (compare-and-set, retried on a concurrent
write), so an invalid change reaches neither the store nor the target. A change
from outside (the store's watch, the registry's) is rendered after the
quiescence window and installed only if its check passes. Outputs that did not
change are not written, and one reload covers every template of a window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consulate.control.configurator import macros
from consulate.control.configurator.quiescence import Quiescence, Wait
from consulate.control.configurator.services import ServiceFollower
from consulate.control.configurator.stores import (
    TOO_DEEP,
    Conflict,
    Snapshot,
    Store,
    StoreError,
    too_deep,
)
from consulate.control.configurator.target import (
    TargetFile,
    check_command,
    discard,
    run_command,
)
from consulate.control.configurator.transform_errors import TransformError
from consulate.control.configurator.transformers import Transformer
from consulate.control.registry.backend import RegistryBackend
from consulate.control.tasks import cancel_and_wait

log = logging.getLogger("consulate.configurator")

COMMIT_ATTEMPTS = 8  # compare-and-set retries before an edit gives up
WATCH_TIMEOUT = 30.0  # seconds per blocking read of the store
REGISTRY_READY_TIMEOUT = 10.0  # how long start() waits for a first registry read
STORE_RETRY = 1.0
NO_WAIT = Wait()  # render at once after each change


class InvalidConfig(Exception):
    """The document cannot be rendered (a macro or the transformer refused it)."""


class CheckFailed(Exception):
    """The program's checker refused the rendered file; carries its output."""


class CannotRender(Exception):
    """No instance (or no registry answer) for a ``$services``: keep the last output."""


class ReloadFailed(Exception):
    """The reload command failed; the last good files were restored and reloaded."""


class EditConflict(Exception):
    """The store kept changing under the edit; retrying later may succeed."""


@dataclass(frozen=True)
class Template:
    transformer: Transformer
    target: TargetFile
    check: str  # a command with {{.src}} for the staged file, or "" for none


@dataclass(frozen=True)
class Rendered:
    template: Template
    text: str


def _read_file(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def render_all(document: Any, templates: Sequence[Template], sources: macros.Sources) -> list[
        Rendered]:
    """Expand the macros once, then run every template's transformer (no I/O but
    what the sources read)."""
    if too_deep(document):
        raise InvalidConfig(f"the document {TOO_DEEP}: flatten it")
    try:
        expanded = macros.expand(document, sources)
        return [Rendered(t, t.transformer.render(expanded)) for t in templates]
    except (macros.MacroError, TransformError) as exc:
        raise InvalidConfig(str(exc)) from None
    except RecursionError:  # $value macros that splice deep values into deep places
        raise InvalidConfig("the document's macros expand to arrays and objects nested "
                            "too deeply (a long chain of $value?): flatten it") from None
    except (macros.NoInstances, macros.ServicesUnavailable) as exc:
        raise CannotRender(str(exc)) from None


class Configurator:
    """One store, its templates and one reload command."""

    def __init__(self, store: Store, templates: Sequence[Template], *, reload: str = "",
                 wait: Wait = NO_WAIT, registry: RegistryBackend | None = None,
                 registry_describe: str = "", owns_registry: bool = False,
                 environ: Mapping[str, str] | None = None) -> None:
        self.store = store
        self.templates = list(templates)
        self.reload = reload
        self.environ = environ if environ is not None else os.environ
        self.snapshot = Snapshot({}, "")
        self.last_output: list[str | None] = [t.target.current() for t in self.templates]
        self._registry = registry if owns_registry else None
        self.follower = (ServiceFollower(registry, registry_describe, self._registry_moved)
                         if registry is not None else None)
        self._used_services: set[str] = set()
        self._quiescence = Quiescence(wait)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # -- rendering ---------------------------------------------------------------

    def _services(self, name: str) -> Sequence[macros.ServiceInstance]:
        if self.follower is None:
            raise macros.ServicesUnavailable(
                f"$services {name!r}: this configurator has no registry (pass --registry)")
        self.follower.start()  # the first use starts following
        return self.follower.instances(name)

    def render(self, document: Any) -> list[Rendered]:
        sources = macros.Sources(document, self.environ, _read_file, self._services)
        try:
            return render_all(document, self.templates, sources)
        finally:
            self._used_services |= sources.used_services

    async def check(self, rendered: Sequence[Rendered]) -> list[Path]:
        """Stage and check each output; the staged files, or CheckFailed (none left)."""
        staged: list[Path] = []
        try:
            for item in rendered:
                path = item.template.target.stage(item.text)
                staged.append(path)
                if item.template.check:
                    result = await run_command(check_command(item.template.check, path))
                    if not result.ok:
                        raise CheckFailed(result.output)
        except BaseException:
            discard(staged)
            raise
        return staged

    async def dry_run(self, document: Any) -> list[Rendered]:
        """Render and check ``document`` without touching the store or the targets."""
        rendered = self.render(document)
        discard(await self.check(rendered))
        return rendered

    # -- edits (REST) -------------------------------------------------------------

    async def edit(self, change: Callable[[Any], Any]) -> Any:
        """Apply ``change`` to the stored document, check the result, commit it with
        compare-and-set (re-applying ``change`` after a concurrent write), then
        install it (at once, or after the quiescence window with ``--wait``)."""
        for _attempt in range(COMMIT_ATTEMPTS):
            current = await self.store.load()
            document = change(current.document)
            await self.dry_run(document)
            try:
                committed = await self.store.save(document, current)
            except Conflict:
                continue
            log.info("event=commit store=%s version=%s", self.store.describe,
                     committed.version)
            self.snapshot = committed
            if self._quiescence.wait.max > 0:
                self.changed("api")
            else:
                await self.apply("api")
            return document
        raise EditConflict(f"{self.store.describe} changed {COMMIT_ATTEMPTS} times during "
                           "the edit: retry it")

    # -- applying -----------------------------------------------------------------

    async def apply(self, reason: str) -> bool:
        """Render the current document and install what changed.

        Raises CheckFailed or InvalidConfig (nothing installed), CannotRender (the
        last output stays) and ReloadFailed (the last good files are back). True
        when a target changed."""
        async with self._lock:
            rendered = self.render(self.snapshot.document)
            changed = [r for r in rendered if r.template.target.current() != r.text]
            if changed:
                staged = await self.check(changed)
                for item, path in zip(changed, staged, strict=True):
                    item.template.target.install(path)
                    log.info("event=install target=%s reason=%s bytes=%d",
                             item.template.target.path, reason, len(item.text.encode()))
                if self.reload:
                    await self._reload([r.template.target for r in changed])
            else:
                log.debug("event=unchanged reason=%s", reason)
            self.last_output = [r.text for r in rendered]
            return bool(changed)

    async def _reload(self, installed: list[TargetFile]) -> None:
        result = await run_command(self.reload)
        if result.ok:
            log.info("event=reload ok=true targets=%d", len(installed))
            return
        restored = [target for target in installed if target.restore()]
        again = await run_command(self.reload) if restored else None
        for position, template in enumerate(self.templates):
            self.last_output[position] = template.target.current()
        after = "nothing to restore" if again is None else (
            "ok" if again.ok else f"that failed too: {again.output}")
        log.error("event=reload ok=false output=%r restored=%d reload_after_restore=%r",
                  result.output, len(restored), after)
        raise ReloadFailed(f"the reload command failed: {result.output}; "
                           + (f"restored the last good file of {len(restored)} target(s) and "
                              f"reloaded again ({after})" if restored else
                              "there was no earlier file to restore"))

    def changed(self, reason: str) -> None:
        """Something the output depends on moved: render after the quiescence window."""
        log.debug("event=change reason=%s", reason)
        self._quiescence.change(asyncio.get_running_loop().time())
        self._wake.set()

    def _registry_moved(self, services: set[str]) -> None:
        if services & self._used_services:
            self.changed("registry")

    async def _apply_logged(self, reason: str) -> None:
        try:
            await self.apply(reason)
        except CannotRender as exc:
            log.warning("event=render-skipped reason=%s detail=%r", reason, str(exc))
        except (InvalidConfig, CheckFailed) as exc:
            log.error("event=render-refused reason=%s detail=%r", reason, str(exc))
        except ReloadFailed:
            pass  # logged by _reload
        except OSError as exc:  # the target's directory went away, a full disk...
            log.error("event=install-failed reason=%s error=%r", reason, str(exc))

    async def _render_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._quiescence.deadline()
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            if self._quiescence.due(loop.time()):
                self._quiescence.fired()
                await self._apply_logged("change")

    async def _watch_store(self) -> None:
        while True:
            try:
                found = await self.store.wait(self.snapshot, WATCH_TIMEOUT)
            except StoreError as exc:
                log.warning("event=store-watch-retry error=%r retry_in=%.1fs", str(exc),
                            STORE_RETRY)
                await asyncio.sleep(STORE_RETRY)
                continue
            if found.version != self.snapshot.version:
                self.snapshot = found
                self.changed("store")
            else:
                self.snapshot = found  # a newer watch position, same document

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the document and install it; InvalidConfig or CheckFailed when the
        initial document cannot be used (``consulate configurator`` exits 3)."""
        self.snapshot = await self.store.load()
        try:
            self.render(self.snapshot.document)
        except CannotRender:
            if self.follower is not None and self.follower.started:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REGISTRY_READY_TIMEOUT):
                        await self.follower.ready.wait()
        try:
            await self.apply("start")
        except CannotRender as exc:
            log.warning("event=render-skipped reason=start detail=%r", str(exc))
        except ReloadFailed:
            pass  # the old file is back and serving; later changes may fix it
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._render_loop()),
                       loop.create_task(self._watch_store())]
        log.info("event=ready store=%s templates=%d targets=%s", self.store.describe,
                 len(self.templates), ",".join(str(t.target.path) for t in self.templates))

    async def close(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks = []
        if self.follower is not None:
            await self.follower.close()
        if self._registry is not None:
            await self._registry.close()
        await self.store.close()
