"""HTTPS for the Consul-API adapters (consul, consulate, consulkv): what to trust,
which client certificate to present, and what to tell the user when it fails.

A standalone registrator takes TLS the way its users already set it up:
registrator's ``consul-tls://`` scheme, or Consul's client variables, which the
Consul API clients read: CONSUL_HTTP_SSL (https for any of the Consul schemes),
CONSUL_CACERT, CONSUL_CLIENT_CERT/CONSUL_CLIENT_KEY (registrator's CONSUL_TLSCERT/
CONSUL_TLSKEY are read too, as its ``consul-tls`` backend documents them),
CONSUL_TLS_SERVER_NAME and CONSUL_HTTP_SSL_VERIFY.

The agent's own registrator (:func:`own_agent_https`) reaches its agent over
loopback, where the address is not a name the certificate carries; so instead of
a CA and a host name it trusts exactly one certificate, the agent's own.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from consulate.control.tls import TlsError, client_context

log = logging.getLogger("consulate.registrator")

ENV_NAMES = ("CONSUL_CACERT", "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY")
REGISTRATOR_NAMES = ("CONSUL_TLSCERT", "CONSUL_TLSKEY")  # registrator's consul-tls backend
ENV_HINT = ("set CONSUL_CACERT to the CA that signed its certificate, and CONSUL_CLIENT_CERT "
            "and CONSUL_CLIENT_KEY if it verifies clients")
_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # Go's strconv.ParseBool, as Consul reads them
_FALSE = ("0", "f", "F", "FALSE", "false", "False")
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class HttpsSettings:
    """How to speak https to the store: the context, the name its certificate must
    carry (None: the URI's host, or not checked), and what to do when TLS fails."""

    context: ssl.SSLContext
    server_name: str | None
    hint: str


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "")
    if not value:
        return default
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise TlsError(f"{name}={value!r} is not a boolean: use true or false")


def https_from_environment(tls_scheme: bool,
                           env: Mapping[str, str]) -> HttpsSettings | None:
    """The settings Consul's variables describe; None for plain http (neither a
    ``*-tls`` scheme nor CONSUL_HTTP_SSL=true). Unreadable files raise TlsError
    naming the variable."""
    if not _flag(env, "CONSUL_HTTP_SSL", tls_scheme):
        return None
    cert_name, key_name = ENV_NAMES[1:]
    if not env.get(cert_name) and not env.get(key_name):
        cert_name, key_name = REGISTRATOR_NAMES
    context = client_context(env.get(ENV_NAMES[0], ""), env.get(cert_name, ""),
                             env.get(key_name, ""), names=(ENV_NAMES[0], cert_name, key_name))
    if not _flag(env, "CONSUL_HTTP_SSL_VERIFY", True):
        log.warning("event=tls verify=off reason='CONSUL_HTTP_SSL_VERIFY=false': the store's "
                    "certificate is not checked")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return HttpsSettings(context, env.get("CONSUL_TLS_SERVER_NAME") or None, ENV_HINT)


def own_agent_https(cert: str, key: str, *, client_cert: bool) -> HttpsSettings:
    """The agent's registrator to its own API: verification stays on, pinned.

    The only trust anchor is the agent's own certificate (the first one of
    ``--tls-cert``; partial chains allowed so that it needs no root), so the
    handshake succeeds with this agent's key holder only; the host name is then
    not checked, since loopback or 0.0.0.0 is rarely in the certificate and the
    pin is stricter than a name. When the agent verifies clients (``--tls-ca``)
    it presents that same certificate, as Consul's agents do with theirs.
    """
    try:
        own = _PEM_CERTIFICATE.search(Path(cert).read_bytes())
    except OSError as exc:
        raise TlsError(f"--tls-cert {cert!r} cannot be read ({exc.strerror}): give the path "
                       "of a PEM file this user can read") from None
    if own is None:
        raise TlsError(f"--tls-cert {cert!r} holds no PEM certificate: the file starts with "
                       "-----BEGIN CERTIFICATE-----")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cadata=own.group().decode("ascii"))
    hint = "the agent's own registrator trusts --tls-cert only"
    if client_cert:
        context.load_cert_chain(cert, key)
        hint += (" and presents it as its client certificate: --tls-cert must be signed by "
                 "--tls-ca and allowed for client authentication (no extendedKeyUsage, or "
                 "one with clientAuth), or pass --no-registrator")
    return HttpsSettings(context, None, hint)
