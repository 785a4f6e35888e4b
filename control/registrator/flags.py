"""registrator's command line, parsed the way Go's ``flag`` package parses it (pure).

Operators' scripts say ``-cleanup -resync 30 -ip=10.0.0.5 consul://...``: one
dash or two, ``-flag value`` or ``-flag=value``, booleans alone or as
``-flag=false``, options before the registry URI. argparse reads none of that
the same way, hence this small parser. Usage errors carry exit status 2 and the
usage text, as Go's flag package and registrator print them; option values that
registrator rejects after parsing are ``InvalidOptions`` (exit status 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

DEREGISTER_MODES = ("always", "on-success")
PROGRAM = "consulate registrator"


class UsageError(Exception):
    """The command line cannot be parsed; print the message, then ``usage()``; exit 2."""


class HelpRequested(Exception):
    """``-h`` or ``-help``: print ``usage()`` and exit 0."""


class InvalidOptions(ValueError):
    """Options that parse but that registrator refuses; the message is registrator's."""


@dataclass(frozen=True)
class Options:
    """registrator's flags, by their Go names with ``_`` for ``-`` (the defaults are
    registrator's), and the registry URI."""

    cleanup: bool = False
    deregister: str = "always"
    explicit: bool = False
    internal: bool = False
    ip: str = ""
    resync: int = 0
    retry_attempts: int = 0
    retry_interval: int = 2000
    tags: str = ""
    ttl: int = 0
    ttl_refresh: int = 0
    use_ip_from_label: str = ""
    version: bool = False
    uri: str = ""

    def validate(self) -> None:
        """registrator's checks after parsing, with its messages."""
        if self.deregister not in DEREGISTER_MODES:
            raise InvalidOptions('-deregister must be "always" or "on-success"')
        if (self.ttl_refresh > 0) != (self.ttl > 0):
            raise InvalidOptions("-ttl and -ttl-refresh must be specified together or not at all")
        if self.ttl > 0 and self.ttl <= self.ttl_refresh:
            raise InvalidOptions("-ttl must be greater than -ttl-refresh")
        if self.retry_interval <= 0:
            raise InvalidOptions("-retry-interval must be greater than 0")
        if self.resync < 0:
            raise InvalidOptions("-resync must be 0 (never) or a number of seconds")


# Go flag name -> (Options field, help). The type comes from the field's default.
_FLAGS = {
    "cleanup": ("cleanup", "Remove dangling services"),
    "deregister": ("deregister", 'Deregister exited services "always" or "on-success"'),
    "explicit": ("explicit", "Only register containers which have SERVICE_NAME label set"),
    "internal": ("internal", "Use internal ports instead of published ones"),
    "ip": ("ip", "IP for ports mapped to the host"),
    "resync": ("resync", "Frequency with which services are resynchronized"),
    "retry-attempts": ("retry_attempts", "Max retry attempts to establish a connection "
                       "with the backend. Use -1 for infinite retries"),
    "retry-interval": ("retry_interval", "Interval (in millisecond) between retry-attempts."),
    "tags": ("tags", "Append tags for all registered services"),
    "ttl": ("ttl", "TTL for services (default is no expiry)"),
    "ttl-refresh": ("ttl_refresh", "Frequency with which service TTLs are refreshed"),
    "useIpFromLabel": ("use_ip_from_label",
                       "Use IP which is stored in a label assigned to the container"),
    "version": ("version", "Show version"),
}
_DEFAULTS = {f.name: f.default for f in fields(Options)}
_TRUE = ("1", "t", "T", "true", "TRUE", "True")
_FALSE = ("0", "f", "F", "false", "FALSE", "False")


def usage() -> str:
    """What ``-h`` prints: Go's flag defaults layout, then what consulate adds."""
    lines = [f"Usage of {PROGRAM}:", f"  {PROGRAM} [options] <registry URI>", ""]
    for name in sorted(_FLAGS, key=str.lower):
        attr, text = _FLAGS[name]
        default = _DEFAULTS[attr]
        kind = {bool: "", int: " int", str: " string"}[type(default)]
        shown = f'"{default}"' if isinstance(default, str) else str(default)
        suffix = f" (default {shown})" if default and not isinstance(default, bool) else ""
        lines += [f"  -{name}{kind}", f"    \t{text}{suffix}"]
    lines += ["", "Registry URIs: consulate://HOST:PORT, consul://HOST:PORT, "
              "consulkv://HOST:PORT/PREFIX,",
              "  etcd://HOST:PORT/PREFIX, skydns2://HOST:PORT/DOMAIN, "
              "zookeeper://HOST:PORT/PREFIX,",
              "  consul-tls://HOST:PORT (https; or CONSUL_HTTP_SSL=true for the consul ones)",
              "Consul TLS: CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, "
              "CONSUL_TLS_SERVER_NAME,",
              "  CONSUL_HTTP_SSL_VERIFY; token: CONSUL_HTTP_TOKEN",
              "Docker: DOCKER_HOST (default unix:///var/run/docker.sock)",
              "",
              "Example:",
              f"  {PROGRAM} -internal -resync 30 -cleanup consul://127.0.0.1:8500"]
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str], base: Options | None = None) -> Options:
    """``[options] <registry URI>`` -> Options; a later flag overrides an earlier one."""
    values, rest = _parse_flags(argv)
    options = replace(base or Options(), **values)
    if options.version:
        return options
    if not rest:
        raise UsageError("Missing required argument for registry URI.")
    if len(rest) > 1:
        raise UsageError("Extra unparsed arguments:\n  " + " ".join(rest[1:]) +
                         "\nOptions should come before the registry URI argument.")
    return replace(options, uri=rest[0])


def parse_options(argv: Sequence[str], base: Options | None = None) -> Options:
    """Flags alone, without a URI (``consulate agent --registrator-flags``)."""
    values, rest = _parse_flags(argv)
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}: give registrator options only "
                         "(the agent registers into itself)")
    return replace(base or Options(), **values)


def _parse_flags(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    values: dict[str, Any] = {}
    args = list(argv)
    while args:
        arg = args[0]
        if len(arg) < 2 or not arg.startswith("-"):
            break
        args.pop(0)
        if arg == "--":
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {arg}")
        name, has_value, text = name.partition("=")
        if name not in _FLAGS:
            if name in ("h", "help"):
                raise HelpRequested()
            raise UsageError(f"flag provided but not defined: -{name}")
        attr = _FLAGS[name][0]
        default = _DEFAULTS[attr]
        if isinstance(default, bool):
            values[attr] = _parse_bool(name, text) if has_value else True
            continue
        if not has_value:
            if not args:
                raise UsageError(f"flag needs an argument: -{name}")
            text = args.pop(0)
        values[attr] = _parse_int(name, text) if isinstance(default, int) else text
    return values, args


def _parse_bool(name: str, text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f'invalid boolean value "{text}" for -{name}: parse error')


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text, 0) if text.lower().startswith(("0x", "0o", "0b")) else int(text)
    except ValueError:
        raise UsageError(f'invalid value "{text}" for flag -{name}: parse error') from None
