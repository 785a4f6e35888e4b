"""One probe per check kind, with Consul's verdicts and output lines.

HTTP: a 2xx answer is passing, 429 Too Many Requests is warning, anything else
(or no answer within the timeout) critical; the output is ``HTTP GET <url>:
<code> <reason> Output: <body>``. TCP: a completed connect is passing. Script:
exit status 0 passing, 1 warning, anything else critical, the output is what
it printed. Outputs are cut at 4 KiB, Consul's limit.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from consulate.control.error_text import error_text
from consulate.control.registry.model import CheckStatus, HealthCheck

OUTPUT_MAX = 4096
Result = tuple[CheckStatus, str]


def _cut(text: str) -> str:
    return text if len(text) <= OUTPUT_MAX else text[:OUTPUT_MAX] + " ... (truncated)"


def http_verdict(code: int) -> CheckStatus:
    """Consul's reading of an HTTP check's status code."""
    if 200 <= code < 300:
        return "passing"
    return "warning" if code == 429 else "critical"


async def http_probe(check: HealthCheck, session: aiohttp.ClientSession) -> Result:
    try:
        async with asyncio.timeout(check.timeout):
            async with session.request(check.method, check.target, ssl=not check.tls_skip_verify,
                                       headers=list(check.header),
                                       allow_redirects=True) as response:
                body = await response.content.read(OUTPUT_MAX)
                line = (f"HTTP {check.method} {check.target}: {response.status} "
                        f"{response.reason or ''} Output: {body.decode(errors='replace')}")
                return http_verdict(response.status), _cut(line)
    except TimeoutError:
        return "critical", (f"HTTP {check.method} {check.target}: timed out after "
                            f"{check.timeout:g}s")
    except (aiohttp.ClientError, OSError) as exc:
        return "critical", f"HTTP {check.method} {check.target}: {error_text(exc)}"


async def tcp_probe(check: HealthCheck) -> Result:
    host, _, port = check.target.rpartition(":")
    try:
        async with asyncio.timeout(check.timeout):
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    except TimeoutError:
        return "critical", f"TCP connect {check.target}: timed out after {check.timeout:g}s"
    except OSError as exc:
        return "critical", f"TCP connect {check.target}: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return "passing", f"TCP connect {check.target}: Success"


async def script_probe(check: HealthCheck) -> Result:
    try:
        process = await asyncio.create_subprocess_exec(
            *check.args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        return "critical", f"could not run {check.args[0]!r}: {exc.strerror or exc}"
    try:
        async with asyncio.timeout(check.timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return "critical", f"Timed out ({check.timeout:g}s) running check"
    code = process.returncode
    status: CheckStatus = "passing" if code == 0 else "warning" if code == 1 else "critical"
    return status, _cut(output.decode(errors="replace"))
