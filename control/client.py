"""A small synchronous client of the agent's HTTP API, for the CLI.

It talks to an agent the way Consul's CLI does: ``--token`` (sent as
X-Consul-Token), and for an agent serving TLS an ``https://`` address with
``--ca-file`` and, when the agent verifies clients, ``--client-cert`` and
``--client-key`` (Consul's CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY).
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from consulate.control.tls import client_context


class ApiError(Exception):
    """The agent refused a request or could not be reached; the message says which."""


class AgentClient:
    """Calls the agent at ``address`` (``HOST:PORT``, or a URL): https when ``tls``
    is given or the address says so."""

    def __init__(self, address: str, timeout: float = 10.0, *, token: str = "",
                 tls: ssl.SSLContext | None = None) -> None:
        scheme = "https" if tls is not None else "http"
        self.base = address if "://" in address else f"{scheme}://{address}"
        self.timeout = timeout
        self.tls = tls
        self.headers = {"X-Consul-Token": token} if token else {}

    def request(self, method: str, path: str, body: object = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.tls) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            hint = (" (consulate: pass --token or set CONSULATE_TOKEN)"
                    if exc.code == 403 and not self.headers else "")
            raise ApiError(f"{method} {path}: {exc.code} {detail}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(self._unreachable(getattr(exc, "reason", exc))) from None
        return json.loads(raw) if raw else None

    def _unreachable(self, reason: object) -> str:
        """What went wrong reaching the agent, and what to do about it."""
        hung_up = isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError))
        https = self.base.startswith("https://")
        # An agent that refuses the client's certificate may just hang up.
        if isinstance(reason, ssl.SSLError) or (https and hung_up):
            return (f"TLS with the agent at {self.base} failed ({reason}): pass --ca-file "
                    "with the CA that signed the agent's certificate, and --client-cert and "
                    "--client-key if the agent verifies clients (--tls-ca)")
        if hung_up:
            return (f"the agent at {self.base} closed the connection without an answer "
                    f"({reason}): if it serves TLS (--tls-cert), use an https:// address")
        return (f"no agent answers at {self.base} ({reason}): start one with "
                "`consulate agent` or pass --http-addr")


def client_for(args: argparse.Namespace) -> AgentClient:
    """The client the CLI's connection flags describe (``--http-addr``, ``--token``,
    ``--ca-file``, ``--client-cert``, ``--client-key``)."""
    ca, cert, key = (getattr(args, name, "") for name in ("ca_file", "client_cert",
                                                           "client_key"))
    address: str = args.http_addr
    tls = (client_context(ca, cert, key) if ca or cert or key or address.startswith("https://")
           else None)
    return AgentClient(address, token=getattr(args, "token", ""), tls=tls)
