"""TLS for the agent's HTTP API: the server's context (``--tls-cert``, ``--tls-key``,
``--tls-ca``) and the CLI client's (``--ca-file``, ``--client-cert``, ``--client-key``).

The names follow Consul: its agent takes ``cert_file``/``key_file``/``ca_file`` and,
with ``verify_incoming``, asks every client for a certificate signed by that CA;
its CLI takes ``-ca-file``/``-client-cert``/``-client-key`` (CONSUL_CACERT, ...).
Here giving ``--tls-ca`` is what turns client verification on: a CA file is only
ever given to check clients with it.

Every file problem is a :class:`TlsError` that names the flag, the path and the
fix, raised while the agent starts (so it never listens half-configured).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from consulate.control.config import ConfigError


class TlsError(ConfigError):
    """A certificate, key or CA file cannot be used; the message names the flag."""


@dataclass(frozen=True)
class ServerTls:
    """The agent's files: its certificate chain and key, and the CA its clients'
    certificates must be signed by ("" : clients need none)."""

    cert: str
    key: str
    ca: str = ""

    def context(self) -> ssl.SSLContext:
        """A server context (TLS 1.2 or later) that requires client certificates
        when a CA is given."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_chain(context, ("--tls-cert", self.cert), ("--tls-key", self.key))
        if self.ca:
            _load_ca(context, "--tls-ca", self.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def server_tls(cert: str, key: str, ca: str) -> ServerTls | None:
    """The agent's TLS settings from its three flags; None when TLS is off.

    A certificate needs its key and the other way round, and a CA only checks
    clients of a server that speaks TLS.
    """
    if not cert and not key:
        if ca:
            raise TlsError(f"--tls-ca {ca!r} checks client certificates, which needs TLS: "
                           "also give --tls-cert and --tls-key")
        return None
    if not cert or not key:
        given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
        raise TlsError(f"{given} is given without {missing}: the API serves TLS with both "
                       "(PEM files: the certificate chain and its private key)")
    return ServerTls(cert, key, ca)


CLI_NAMES = ("--ca-file", "--client-cert", "--client-key")


def client_context(ca: str = "", cert: str = "", key: str = "", *,
                   names: tuple[str, str, str] = CLI_NAMES) -> ssl.SSLContext:
    """The CLI's context for an https:// agent: the agent's certificate checked
    against ``ca`` (the system's CAs without one), and a client certificate when
    the agent verifies clients. ``names`` are what the user set the three files
    with (flags, or Consul's CONSUL_CACERT-style variables), for the errors."""
    ca_name, cert_name, key_name = names
    if bool(cert) != bool(key):
        given, missing = (cert_name, key_name) if cert else (key_name, cert_name)
        raise TlsError(f"{given} is given without {missing}: a client certificate needs "
                       "its key")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca:
        _load_ca(context, ca_name, ca)
    if cert:
        _load_chain(context, (cert_name, cert), (key_name, key))
    return context


def _readable(flag: str, path: str) -> None:
    """Raise a TlsError saying what is wrong with ``path`` if it cannot be read."""
    try:
        with Path(path).open("rb") as file:
            file.read(1)
    except OSError as exc:
        raise TlsError(f"{flag} {path!r} cannot be read ({exc.strerror}): give the path of "
                       "a PEM file this user can read") from None


def _load_chain(context: ssl.SSLContext, cert: tuple[str, str], key: tuple[str, str]) -> None:
    (cert_flag, cert_path), (key_flag, key_path) = cert, key
    _readable(cert_flag, cert_path)
    _readable(key_flag, key_path)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"{key_flag} {key_path!r} is not the key of the certificate in "
                           f"{cert_flag} {cert_path!r}: give the key the certificate was "
                           "issued for") from None
        raise TlsError(f"{cert_flag} {cert_path!r} / {key_flag} {key_path!r}: not a PEM "
                       f"certificate and its unencrypted private key ({exc.reason or exc}); "
                       "the files start with -----BEGIN CERTIFICATE----- and -----BEGIN "
                       "PRIVATE KEY-----") from None


def _load_ca(context: ssl.SSLContext, flag: str, path: str) -> None:
    _readable(flag, path)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsError(f"{flag} {path!r} holds no PEM CA certificate ({exc.reason or exc}): "
                       "give the CA certificate that signed the certificates to trust") from None
